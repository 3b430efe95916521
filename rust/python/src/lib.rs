//! PyO3 bindings for peftscale-core: conversions and error mapping only, no logic.

mod answers;
mod search;

use candle_core::{DType, Tensor};
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use peftscale_core::logits::{ColdParams, SamplingParams};
use peftscale_core::search::{Candidate, FinishReason, TextDelta, TreeReport};
use peftscale_core::text::ChatMessage;
use peftscale_core::{DeviceSpec, Engine, Error, GenerateOptions, Generation, Output, WeightDType};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::{RwLock, RwLockReadGuard};

create_exception!(
    _core,
    PeftscaleError,
    PyException,
    "Base class of every peftscale error."
);
create_exception!(
    _core,
    ModelLoadError,
    PeftscaleError,
    "A model file or folder cannot be loaded."
);
create_exception!(
    _core,
    AdapterError,
    ModelLoadError,
    "A LoRA adapter cannot be loaded: unreadable, made for another base model, or using a feature the engine does not apply."
);
create_exception!(
    _core,
    InvalidArgument,
    PeftscaleError,
    "A parameter or input is out of range."
);
create_exception!(
    _core,
    ContextLengthError,
    InvalidArgument,
    "A prompt does not fit the model's context."
);
create_exception!(
    _core,
    DeviceError,
    PeftscaleError,
    "The requested device is missing from this build or this machine."
);
create_exception!(
    _core,
    TokenizerError,
    PeftscaleError,
    "Text could not be encoded or decoded."
);
create_exception!(
    _core,
    ChatTemplateError,
    PeftscaleError,
    "The chat template failed to render."
);
create_exception!(
    _core,
    NumericalError,
    PeftscaleError,
    "The model produced NaN or infinite logits."
);
create_exception!(
    _core,
    CallbackError,
    PeftscaleError,
    "A user callback failed (raised only when its own exception could not be kept)."
);
create_exception!(
    _core,
    EngineError,
    PeftscaleError,
    "An internal tensor operation failed."
);

pub(crate) fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::ModelLoad { .. } => ModelLoadError::new_err(msg),
        Error::AdapterLoad { .. } => AdapterError::new_err(msg),
        Error::InvalidArgument(_) => InvalidArgument::new_err(msg),
        Error::ContextOverflow { .. } => ContextLengthError::new_err(msg),
        Error::DeviceUnavailable { .. } => DeviceError::new_err(msg),
        Error::Tokenizer(_) => TokenizerError::new_err(msg),
        Error::ChatTemplate(_) => ChatTemplateError::new_err(msg),
        Error::NonFiniteLogits { .. } => NumericalError::new_err(msg),
        Error::Callback { .. } => CallbackError::new_err(msg),
        Error::Tensor(_) => EngineError::new_err(msg),
    }
}

/// A callback's own exception when it caused `err`, else the typed error.
fn to_py_with(err: Error, callbacks: &search::CallbackError) -> PyErr {
    if matches!(err, Error::Callback { .. }) {
        if let Some(e) = callbacks.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return e;
        }
    }
    to_py(err)
}

#[pyclass(name = "Engine", module = "peftscale._core", frozen)]
struct PyEngine {
    /// Written only by `load_adapter` / `unload_adapter`; generations hold their own references.
    inner: RwLock<Engine>,
}

impl PyEngine {
    fn engine(&self) -> RwLockReadGuard<'_, Engine> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn logits_array(py: Python<'_>, t: Tensor) -> PyResult<Bound<'_, PyAny>> {
    let (rows, vocab) = t.dims2().map_err(|e| to_py(e.into()))?;
    let data = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| to_py(e.into()))?;
    Ok(PyArray1::from_vec(py, data)
        .reshape([rows, vocab])?
        .into_any())
}

fn candidate_dict<'py>(py: Python<'py>, c: &Candidate) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("token_ids", &c.token_ids)?;
    d.set_item("logprobs", &c.logprobs)?;
    d.set_item("text", &c.text)?;
    d.set_item("finish_reason", c.finish_reason.as_str())?;
    d.set_item("score", c.score)?;
    d.set_item("answer", &c.answer)?;
    d.set_item("step_scores", &c.step_scores)?;
    Ok(d)
}

fn tree_dict<'py>(py: Python<'py>, t: &TreeReport) -> PyResult<Bound<'py, PyDict>> {
    let nodes = t
        .nodes
        .iter()
        .map(|n| {
            let d = PyDict::new(py);
            d.set_item("parent", n.parent)?;
            d.set_item("depth", n.depth)?;
            d.set_item("text", &n.text)?;
            d.set_item("token_count", n.token_count)?;
            d.set_item("visits", n.visits)?;
            d.set_item("value", n.value)?;
            d.set_item("prior", n.prior)?;
            d.set_item("terminal", n.terminal)?;
            d.set_item("rollout_tokens", n.rollout_tokens)?;
            d.set_item("selected", n.selected)?;
            Ok(d)
        })
        .collect::<PyResult<Vec<_>>>()?;
    let d = PyDict::new(py);
    d.set_item("nodes", nodes)?;
    Ok(d)
}

fn output_dict<'py>(py: Python<'py>, out: &Output) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("token_ids", &out.row.token_ids)?;
    d.set_item("logprobs", &out.row.logprobs)?;
    d.set_item("text", &out.row.text)?;
    d.set_item("finish_reason", out.row.finish_reason.as_str())?;
    d.set_item("prompt_tokens", out.row.prompt_tokens)?;
    d.set_item("score", out.row.score)?;
    let candidates = out
        .row
        .candidates
        .iter()
        .map(|c| candidate_dict(py, c))
        .collect::<PyResult<Vec<_>>>()?;
    d.set_item("candidates", candidates)?;
    d.set_item("answer", &out.row.answer)?;
    d.set_item("votes", out.row.votes.clone())?;
    match &out.row.tree {
        Some(t) => d.set_item("tree", tree_dict(py, t)?)?,
        None => d.set_item("tree", py.None())?,
    }
    d.set_item("tokens_spent", out.row.tokens_spent)?;
    let s = PyDict::new(py);
    s.set_item("tokens_forwarded", out.stats.tokens_forwarded)?;
    s.set_item("forward_passes", out.stats.forward_passes)?;
    s.set_item("steps", out.stats.steps)?;
    s.set_item("flops", out.stats.flops)?;
    s.set_item("seconds", out.stats.seconds)?;
    s.set_item("first_token_seconds", out.stats.first_token_seconds)?;
    s.set_item("forward_seconds", out.stats.forward_seconds)?;
    s.set_item("trunk_tokens", out.stats.trunk_tokens)?;
    d.set_item("stats", s)?;
    Ok(d)
}

#[pymethods]
impl PyEngine {
    #[staticmethod]
    #[pyo3(signature = (path, dtype = "auto", kv_dtype = "auto", device = "cpu"))]
    fn load(
        py: Python<'_>,
        path: std::path::PathBuf,
        dtype: &str,
        kv_dtype: &str,
        device: &str,
    ) -> PyResult<Self> {
        let dtype = WeightDType::parse(dtype).map_err(to_py)?;
        let kv_dtype = WeightDType::parse_kv(kv_dtype).map_err(to_py)?;
        let device: DeviceSpec = device.parse().map_err(to_py)?;
        let inner = py
            .allow_threads(|| {
                let mut engine = Engine::load_on(&path, dtype, device)?;
                if let Some(kv) = kv_dtype {
                    engine.set_kv_dtype(kv)?;
                }
                Ok::<_, Error>(engine)
            })
            .map_err(to_py)?;
        Ok(Self {
            inner: RwLock::new(inner),
        })
    }

    #[pyo3(signature = (path, name))]
    fn load_adapter(&self, py: Python<'_>, path: std::path::PathBuf, name: &str) -> PyResult<()> {
        py.allow_threads(|| {
            self.inner
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .load_adapter(&path, name)
        })
        .map_err(to_py)
    }

    fn merge_adapter(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        py.allow_threads(|| {
            self.inner
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .merge_adapter(&path)
        })
        .map_err(to_py)
    }

    #[getter]
    fn merged_adapters(&self) -> Vec<std::path::PathBuf> {
        self.engine().merged_adapters().to_vec()
    }

    fn unload_adapter(&self, name: &str) -> PyResult<()> {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .unload_adapter(name)
            .map_err(to_py)
    }

    #[getter]
    fn adapter_names(&self) -> Vec<String> {
        self.engine().adapter_names()
    }

    #[pyo3(signature = (path, name))]
    fn load_verifier(&self, py: Python<'_>, path: std::path::PathBuf, name: &str) -> PyResult<()> {
        py.allow_threads(|| {
            self.inner
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .load_verifier(&path, name)
        })
        .map_err(to_py)
    }

    fn unload_verifier(&self, name: &str) -> PyResult<()> {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .unload_verifier(name)
            .map_err(to_py)
    }

    #[getter]
    fn verifier_names(&self) -> Vec<String> {
        self.engine().verifier_names()
    }

    /// `(kind, step_tag, aggregation)` of a loaded verifier.
    fn verifier_info(&self, name: &str) -> PyResult<(String, String, String)> {
        let v = self.engine().verifier(name).map_err(to_py)?;
        Ok((
            v.kind.clone(),
            v.step_tag.clone(),
            v.aggregation.as_str().to_string(),
        ))
    }

    fn score_steps(
        &self,
        py: Python<'_>,
        verifier: &str,
        items: Vec<(String, Vec<String>)>,
    ) -> PyResult<Vec<Vec<f64>>> {
        py.allow_threads(|| {
            let items: Vec<(&str, Vec<&str>)> = items
                .iter()
                .map(|(p, steps)| (p.as_str(), steps.iter().map(String::as_str).collect()))
                .collect();
            self.engine().score_steps(verifier, &items)
        })
        .map_err(to_py)
    }

    fn verifier_logits(
        &self,
        py: Python<'_>,
        verifier: &str,
        sequences: Vec<Vec<u32>>,
    ) -> PyResult<Vec<Vec<f32>>> {
        py.allow_threads(|| {
            let items: Vec<(&[u32], &str)> =
                sequences.iter().map(|s| (s.as_slice(), verifier)).collect();
            self.engine()
                .verifier_logits_batch_with(&items, &mut || Ok(()))
        })
        .map_err(to_py)
    }

    #[pyo3(signature = (prompts, max_new_tokens, stop, temperature, top_k, top_p, min_p,
                        repetition_penalty, seed, ignore_eos = false, adapters = Vec::new(),
                        cold = None, search = None, timeout_s = None))]
    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<u32>>,
        max_new_tokens: usize,
        stop: Vec<String>,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        seed: u64,
        ignore_eos: bool,
        adapters: Vec<Option<String>>,
        cold: Option<(f32, f32, f32, bool, f32, u64, bool)>,
        search: Option<Bound<'_, PyDict>>,
        timeout_s: Option<f64>,
    ) -> PyResult<PyGeneration> {
        let timeout = match timeout_s {
            Some(t) if !(t.is_finite() && t >= 0.0) => {
                return Err(InvalidArgument::new_err(format!(
                    "invalid argument: timeout_s must be a finite number of seconds >= 0, got {t}"
                )))
            }
            t => t.map(std::time::Duration::from_secs_f64),
        };
        let callbacks = search::CallbackError::default();
        let cold = search::cold(cold);
        let search = search
            .map(|d| search::spec(&d, &callbacks, &*self.engine()))
            .transpose()?;
        let opts = GenerateOptions {
            max_new_tokens,
            stop,
            sampling: search::sampling_params((
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                seed,
            )),
            ignore_eos,
            adapters,
            cold,
            search,
            timeout,
        };
        let inner = py
            .allow_threads(|| self.engine().start(prompts, &opts))
            .map_err(|e| to_py_with(e, &callbacks))?;
        Ok(PyGeneration { inner, callbacks })
    }

    /// Logits `[len, vocab]` of each sequence, each through its adapter (or the base model),
    /// all in one forward pass.
    fn logits_batch<'py>(
        &self,
        py: Python<'py>,
        sequences: Vec<Vec<u32>>,
        adapters: Vec<Option<String>>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        if adapters.len() != sequences.len() {
            return Err(InvalidArgument::new_err(format!(
                "{} adapters given for {} sequences",
                adapters.len(),
                sequences.len()
            )));
        }
        // Pending signals are handled between chunks of a long input: Ctrl-C raises promptly.
        let interrupted = search::CallbackError::default();
        let tensors = py
            .allow_threads(|| {
                let items: Vec<(&[u32], Option<&str>)> = sequences
                    .iter()
                    .zip(&adapters)
                    .map(|(s, a)| (s.as_slice(), a.as_deref()))
                    .collect();
                self.engine().logits_batch_with(&items, &mut || {
                    Python::with_gil(|py| py.check_signals())
                        .map_err(|e| search::remember(&interrupted, "signal", e))
                })
            })
            .map_err(|e| to_py_with(e, &interrupted))?;
        tensors.into_iter().map(|t| logits_array(py, t)).collect()
    }

    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        self.engine()
            .tokenizer()
            .and_then(|t| t.encode(text))
            .map_err(to_py)
    }

    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        self.engine()
            .tokenizer()
            .and_then(|t| t.decode(&ids, skip_special_tokens))
            .map_err(to_py)
    }

    fn token_to_id(&self, token: &str) -> PyResult<Option<u32>> {
        Ok(self.engine().tokenizer().map_err(to_py)?.token_to_id(token))
    }

    #[pyo3(signature = (messages, add_generation_prompt = true))]
    fn apply_chat_template(
        &self,
        messages: Vec<(String, String)>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let messages: Vec<ChatMessage> = messages
            .into_iter()
            .map(|(role, content)| ChatMessage { role, content })
            .collect();
        self.engine()
            .apply_chat_template(&messages, add_generation_prompt)
            .map_err(to_py)
    }

    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.engine()
            .tokenizer()
            .map(|t| t.eos_token_ids.clone())
            .unwrap_or_default()
    }

    #[getter]
    fn weight_bytes(&self) -> usize {
        self.engine().weight_bytes()
    }

    #[getter]
    fn kv_dtype(&self) -> &'static str {
        match self.engine().kv_dtype() {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            _ => "f32",
        }
    }

    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let engine = self.engine();
        let c = engine.config();
        let d = PyDict::new(py);
        d.set_item("architecture", &c.architecture)?;
        d.set_item("vocab_size", c.vocab_size)?;
        d.set_item("hidden_size", c.hidden_size)?;
        d.set_item("intermediate_size", c.intermediate_size)?;
        d.set_item("num_layers", c.num_layers)?;
        d.set_item("num_heads", c.num_heads)?;
        d.set_item("num_kv_heads", c.num_kv_heads)?;
        d.set_item("head_dim", c.head_dim)?;
        d.set_item("context_length", c.max_position_embeddings)?;
        d.set_item("matmul_parameters", c.matmul_parameters())?;
        Ok(d)
    }
}

#[pyclass(name = "Generation", module = "peftscale._core")]
struct PyGeneration {
    inner: Generation,
    callbacks: search::CallbackError,
}

#[pymethods]
impl PyGeneration {
    /// Runs one batched forward step; returns `(row, text)` pieces that became final.
    fn step(&mut self, py: Python<'_>) -> PyResult<Vec<(usize, String)>> {
        let deltas = py
            .allow_threads(|| self.inner.step())
            .map_err(|e| to_py_with(e, &self.callbacks))?;
        Ok(deltas
            .into_iter()
            .map(|TextDelta { row, text }| (row, text))
            .collect())
    }

    /// Decodes to the end, the GIL released during each step. Pending signals are handled
    /// between steps, so Ctrl-C raises `KeyboardInterrupt` within one step (the generation is
    /// then abandoned; the engine stays usable).
    fn run(&mut self, py: Python<'_>) -> PyResult<()> {
        while !self.inner.is_done() {
            py.allow_threads(|| self.inner.step())
                .map_err(|e| to_py_with(e, &self.callbacks))?;
            py.check_signals()?;
        }
        Ok(())
    }

    /// Ends the generation now, as its timeout does (`reason`: "timeout" or "interrupted"):
    /// unfinished rows keep what they produced; a search reports the best of what finished
    /// (self-consistency: the vote over the samples that finished).
    fn finish_early(&mut self, reason: &str) -> PyResult<()> {
        let reason = match reason {
            "timeout" => FinishReason::Timeout,
            "interrupted" => FinishReason::Interrupted,
            other => {
                return Err(InvalidArgument::new_err(format!(
                    "invalid argument: finish_early takes 'timeout' or 'interrupted', got '{other}'"
                )))
            }
        };
        self.inner
            .finish_early(reason)
            .map_err(|e| to_py_with(e, &self.callbacks))
    }

    #[getter]
    fn done(&self) -> bool {
        self.inner.is_done()
    }

    fn outputs<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .outputs()
            .iter()
            .map(|o| output_dict(py, o))
            .collect()
    }
}

/// The CPU kernels this machine runs (`isa`), the threads they use, and the measured peak of the
/// 8-bit dot-product instruction they rely on (`int8_peak_gops`, measured for about `seconds`).
#[pyfunction]
#[pyo3(signature = (seconds = 0.3))]
fn cpu_kernels(py: Python<'_>, seconds: f64) -> PyResult<Bound<'_, PyDict>> {
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 60.0) {
        return Err(InvalidArgument::new_err(format!(
            "seconds must be in (0, 60], got {seconds}"
        )));
    }
    use peftscale_core::kernels::cpu::peak;
    let gops = py.allow_threads(|| peak::int8_peak_gops(seconds));
    let d = PyDict::new(py);
    d.set_item("isa", peak::kernel_isa())?;
    d.set_item("threads", peak::threads())?;
    d.set_item("int8_peak_gops", gops)?;
    Ok(d)
}

/// The dtype rows are rounded to before a kernel scores them.
fn activation_dtype(name: &str) -> PyResult<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(InvalidArgument::new_err(format!(
            "dtype must be \"f32\", \"f16\" or \"bf16\", got {other:?}"
        ))),
    }
}

/// A `[rows, cols]` f32 array copied out of NumPy, to be used with the GIL released.
struct HostRows {
    data: Vec<f32>,
    shape: (usize, usize),
}

impl HostRows {
    fn new(a: &PyReadonlyArray2<'_, f32>) -> Self {
        let dims = a.shape();
        Self {
            data: a.as_array().iter().copied().collect(),
            shape: (dims[0], dims[1]),
        }
    }

    /// The rows as a `dtype` tensor on `device`.
    fn tensor(self, device: &candle_core::Device, dtype: DType) -> peftscale_core::Result<Tensor> {
        Ok(Tensor::from_vec(self.data, self.shape, device)?.to_dtype(dtype)?)
    }
}

/// The token each row of `logits` draws with its number from `uniforms` after temperature,
/// top-k, top-p and min-p (the argmax at temperature 0), on `device` in `dtype`. On a CUDA
/// device the kernel of `cuda/sample.cu` draws them and only the ids leave the GPU.
#[pyfunction]
#[pyo3(signature = (logits, uniforms, temperature = 1.0, top_k = 0, top_p = 1.0, min_p = 0.0, device = "cpu", dtype = "f32"))]
#[allow(clippy::too_many_arguments)]
fn sample_tokens<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray2<'py, f32>,
    uniforms: Vec<f32>,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    device: &str,
    dtype: &str,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let device: DeviceSpec = device.parse().map_err(to_py)?;
    let dtype = activation_dtype(dtype)?;
    let logits = HostRows::new(&logits);
    let params = SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        ..SamplingParams::greedy()
    };
    let tokens = py
        .allow_threads(|| -> peftscale_core::Result<Vec<u32>> {
            let device = device.open()?;
            let logits = logits.tensor(&device, dtype)?;
            peftscale_core::logits::sample_rows(&logits, &params, &uniforms)
        })
        .map_err(to_py)?;
    Ok(PyArray1::from_vec(
        py,
        tokens.into_iter().map(i64::from).collect(),
    ))
}

/// The best `k` CoLD candidates of each (expert, base) row pair, scored on `device` in `dtype`:
/// token ids `[pairs, k]` (-1 where a row has fewer plausible tokens) and their scores (-inf
/// there). On a CUDA device the fused kernel of `cuda/cold.cu` scores them.
#[pyfunction]
#[pyo3(signature = (expert, base, k = 1, alpha = 0.1, beta = 0.5, base_temperature = 1.0, device = "cpu", dtype = "f32"))]
#[allow(clippy::too_many_arguments)]
fn cold_top_k<'py>(
    py: Python<'py>,
    expert: PyReadonlyArray2<'py, f32>,
    base: PyReadonlyArray2<'py, f32>,
    k: usize,
    alpha: f32,
    beta: f32,
    base_temperature: f32,
    device: &str,
    dtype: &str,
) -> PyResult<(Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>)> {
    let device: DeviceSpec = device.parse().map_err(to_py)?;
    let dtype = activation_dtype(dtype)?;
    let (expert, base) = (HostRows::new(&expert), HostRows::new(&base));
    let (pairs, vocab) = expert.shape;
    if base.shape != expert.shape {
        return Err(InvalidArgument::new_err(format!(
            "expert and base must have one shape, got {:?} and {:?}",
            [pairs, vocab],
            [base.shape.0, base.shape.1]
        )));
    }
    if k == 0 || k > vocab {
        return Err(InvalidArgument::new_err(format!(
            "CoLD top-k needs 1 <= k <= the vocabulary size (k = {k}, vocabulary {vocab})"
        )));
    }
    let params = ColdParams {
        alpha,
        beta,
        base_temperature,
        ..ColdParams::default()
    };
    let picks = py
        .allow_threads(|| -> peftscale_core::Result<Vec<Vec<(u32, f32)>>> {
            let device = device.open()?;
            let (expert, base) = (expert.tensor(&device, dtype)?, base.tensor(&device, dtype)?);
            peftscale_core::logits::cold_top_k(&expert, &base, &params, k)
        })
        .map_err(to_py)?;
    let mut index = vec![-1i64; pairs * k];
    let mut score = vec![f32::NEG_INFINITY; pairs * k];
    for (r, row) in picks.iter().enumerate() {
        for (j, &(i, s)) in row.iter().enumerate() {
            index[r * k + j] = i64::from(i);
            score[r * k + j] = s;
        }
    }
    Ok((
        PyArray1::from_vec(py, index).reshape([pairs, k])?,
        PyArray1::from_vec(py, score).reshape([pairs, k])?,
    ))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(cpu_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(cold_top_k, m)?)?;
    m.add_function(wrap_pyfunction!(sample_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(answers::extract_answer, m)?)?;
    m.add_function(wrap_pyfunction!(answers::normalize_answer, m)?)?;
    m.add_function(wrap_pyfunction!(answers::vote, m)?)?;
    m.add("compiled_devices", DeviceSpec::compiled_kinds())?;
    m.add_class::<PyEngine>()?;
    m.add_class::<PyGeneration>()?;
    m.add("PeftscaleError", py.get_type::<PeftscaleError>())?;
    m.add("ModelLoadError", py.get_type::<ModelLoadError>())?;
    m.add("AdapterError", py.get_type::<AdapterError>())?;
    m.add("InvalidArgument", py.get_type::<InvalidArgument>())?;
    m.add("ContextLengthError", py.get_type::<ContextLengthError>())?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add("ChatTemplateError", py.get_type::<ChatTemplateError>())?;
    m.add("NumericalError", py.get_type::<NumericalError>())?;
    m.add("EngineError", py.get_type::<EngineError>())?;
    m.add("CallbackError", py.get_type::<CallbackError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
