//! PyO3 bindings for peftscale-core: conversions and error mapping only, no logic.

use numpy::{PyArray1, PyArrayMethods};
use peftscale_core::search::TextDelta;
use peftscale_core::text::ChatMessage;
use peftscale_core::{
    Engine, Error, GenerateOptions, Generation, Output, SamplingParams, WeightDType,
};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;

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
    EngineError,
    PeftscaleError,
    "An internal tensor operation failed."
);

fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::ModelLoad { .. } => ModelLoadError::new_err(msg),
        Error::InvalidArgument(_) => InvalidArgument::new_err(msg),
        Error::ContextOverflow { .. } => ContextLengthError::new_err(msg),
        Error::Tokenizer(_) => TokenizerError::new_err(msg),
        Error::ChatTemplate(_) => ChatTemplateError::new_err(msg),
        Error::NonFiniteLogits { .. } => NumericalError::new_err(msg),
        Error::Tensor(_) => EngineError::new_err(msg),
    }
}

#[pyclass(name = "Engine", module = "peftscale._core", frozen)]
struct PyEngine {
    inner: Engine,
}

fn output_dict<'py>(py: Python<'py>, out: &Output) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("token_ids", &out.row.token_ids)?;
    d.set_item("logprobs", &out.row.logprobs)?;
    d.set_item("text", &out.row.text)?;
    d.set_item("finish_reason", out.row.finish_reason.as_str())?;
    d.set_item("prompt_tokens", out.row.prompt_tokens)?;
    let s = PyDict::new(py);
    s.set_item("tokens_forwarded", out.stats.tokens_forwarded)?;
    s.set_item("forward_passes", out.stats.forward_passes)?;
    s.set_item("flops", out.stats.flops)?;
    s.set_item("seconds", out.stats.seconds)?;
    d.set_item("stats", s)?;
    Ok(d)
}

#[pymethods]
impl PyEngine {
    #[staticmethod]
    #[pyo3(signature = (path, dtype = "auto"))]
    fn load(py: Python<'_>, path: std::path::PathBuf, dtype: &str) -> PyResult<Self> {
        let dtype = WeightDType::parse(dtype).map_err(to_py)?;
        let inner = py
            .allow_threads(|| Engine::load(&path, dtype))
            .map_err(to_py)?;
        Ok(Self { inner })
    }

    #[pyo3(signature = (prompts, max_new_tokens, stop, temperature, top_k, top_p, min_p,
                        repetition_penalty, seed, ignore_eos = false))]
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
    ) -> PyResult<PyGeneration> {
        let opts = GenerateOptions {
            max_new_tokens,
            stop,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                seed,
            },
            ignore_eos,
        };
        let inner = py
            .allow_threads(|| self.inner.start(prompts, &opts))
            .map_err(to_py)?;
        Ok(PyGeneration { inner })
    }

    fn logits<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyAny>> {
        let (data, rows, vocab) = py
            .allow_threads(|| -> peftscale_core::Result<_> {
                let t = self.inner.logits(&ids)?;
                let (rows, vocab) = t.dims2()?;
                Ok((t.flatten_all()?.to_vec1::<f32>()?, rows, vocab))
            })
            .map_err(to_py)?;
        let arr = PyArray1::from_vec(py, data).reshape([rows, vocab])?;
        Ok(arr.into_any())
    }

    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        self.inner
            .tokenizer()
            .and_then(|t| t.encode(text))
            .map_err(to_py)
    }

    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        self.inner
            .tokenizer()
            .and_then(|t| t.decode(&ids, skip_special_tokens))
            .map_err(to_py)
    }

    fn token_to_id(&self, token: &str) -> PyResult<Option<u32>> {
        Ok(self.inner.tokenizer().map_err(to_py)?.token_to_id(token))
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
        self.inner
            .apply_chat_template(&messages, add_generation_prompt)
            .map_err(to_py)
    }

    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner
            .tokenizer()
            .map(|t| t.eos_token_ids.clone())
            .unwrap_or_default()
    }

    #[getter]
    fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes()
    }

    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.inner.config();
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
}

#[pymethods]
impl PyGeneration {
    /// Runs one batched forward step; returns `(row, text)` pieces that became final.
    fn step(&mut self, py: Python<'_>) -> PyResult<Vec<(usize, String)>> {
        let deltas = py.allow_threads(|| self.inner.step()).map_err(to_py)?;
        Ok(deltas
            .into_iter()
            .map(|TextDelta { row, text }| (row, text))
            .collect())
    }

    /// Decodes to the end with the GIL released.
    fn run(&mut self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| {
            while !self.inner.is_done() {
                self.inner.step()?;
            }
            Ok(())
        })
        .map_err(to_py)
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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyEngine>()?;
    m.add_class::<PyGeneration>()?;
    m.add("PeftscaleError", py.get_type::<PeftscaleError>())?;
    m.add("ModelLoadError", py.get_type::<ModelLoadError>())?;
    m.add("InvalidArgument", py.get_type::<InvalidArgument>())?;
    m.add("ContextLengthError", py.get_type::<ContextLengthError>())?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add("ChatTemplateError", py.get_type::<ChatTemplateError>())?;
    m.add("NumericalError", py.get_type::<NumericalError>())?;
    m.add("EngineError", py.get_type::<EngineError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
