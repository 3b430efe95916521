//! The engine: a loaded model with its tokenizer, and the loop that turns a strategy's work into
//! batched forward passes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::kernels::cpu::parallel::map_parallel;
use crate::kernels::device::DeviceSpec;
use crate::kv::{SeqId, SeqStore};
use crate::logits::{pick_tokens, ColdParams, Pick, SamplingParams};
use crate::lora::verifier::sigmoid;
use crate::lora::{group_by_adapter, LoraAdapter, ValueHead, Verifier};
use crate::model::{self, Entry, LogitsFor, Model, ModelConfig, RowInput, WeightDType};
use crate::search::sampling::StopCriteria;
use crate::search::{
    build_search, Advance, FinishReason, RowOutput, SamplingStrategy, SearchSpec, Strategy,
    TextDelta,
};
use crate::text::{ChatMessage, ChatTemplate, StopMatcher, Tokenizer};

/// Options shared by every prompt of one `generate` call.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Keep generating past end-of-sequence tokens (for benchmarks).
    pub ignore_eos: bool,
    /// Names of loaded adapters the rows decode with: none, one for every prompt, or one per
    /// prompt (`None` for the base model).
    pub adapters: Vec<Option<String>>,
    /// Decode with Contrastive LoRA Decoding instead of `sampling` (needs an adapter per row).
    pub cold: Option<ColdParams>,
    /// A test-time search (beam search, best-of-N, ...) instead of one continuation per prompt.
    pub search: Option<SearchSpec>,
    /// Wall time after which the generation ends at the next step, every unfinished row
    /// keeping what it produced (finish reason `Timeout`).
    pub timeout: Option<Duration>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            stop: Vec::new(),
            sampling: SamplingParams::greedy(),
            ignore_eos: false,
            adapters: Vec::new(),
            cold: None,
            search: None,
            timeout: None,
        }
    }
}

/// The compute spent on one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Tokens run through the model (prompt and generated), all rows together.
    pub tokens_forwarded: usize,
    /// Forward passes (each one batches every active row).
    pub forward_passes: usize,
    /// Decoding steps, each adding one token to every active row; the first also runs the
    /// prompts. Equal to `forward_passes` except where a step runs several (naive CoLD).
    pub steps: usize,
    /// Estimated floating-point operations: 2 x matmul parameters x tokens plus attention.
    pub flops: f64,
    pub seconds: f64,
    /// Seconds until the first step (the prompts and the first new token) had finished.
    pub first_token_seconds: f64,
    /// Seconds inside the model's forward passes; the rest of `seconds` is scoring, search
    /// bookkeeping and callbacks.
    pub forward_seconds: f64,
    /// Tokens that entered the model above the embeddings: a verifier's rows reading text the
    /// policy's rows already took through the layers both compute alike (included in
    /// `tokens_forwarded`; their FLOPs count only the layers they ran).
    pub trunk_tokens: usize,
}

#[derive(Debug, Clone)]
pub struct Output {
    pub row: RowOutput,
    pub stats: Stats,
}

/// Tokens per forward pass of [`Engine::logits_batch`]: checks for an interrupt between passes
/// stay a fraction of a second apart on a small model.
pub const LOGITS_CHUNK: usize = 256;

pub struct Engine {
    model: Arc<Model>,
    adapters: HashMap<String, Arc<LoraAdapter>>,
    verifiers: HashMap<String, Arc<Verifier>>,
    /// Adapter folders merged into the weights, in order.
    merged: Vec<PathBuf>,
    tokenizer: Option<Arc<Tokenizer>>,
    chat_template: Option<Arc<ChatTemplate>>,
    weight_bytes: usize,
    path: PathBuf,
}

impl Engine {
    /// Loads the model at `path` (GGUF file or Hugging Face folder) to run on the CPU.
    pub fn load(path: impl AsRef<Path>, dtype: WeightDType) -> Result<Self> {
        Self::load_on(path, dtype, DeviceSpec::Cpu)
    }

    /// Loads the model to run on `device`; a device this build or machine lacks is a
    /// [`Error::DeviceUnavailable`] that says what is missing, before any file is read.
    pub fn load_on(path: impl AsRef<Path>, dtype: WeightDType, device: DeviceSpec) -> Result<Self> {
        crate::kernels::cpu::isa::check_env()?;
        let device = device.open()?;
        let path = path.as_ref();
        let loaded = model::load(path, dtype, &device)?;
        crate::kernels::cpu::weight_memory::return_freed_memory();
        if let Some(tok) = &loaded.tokenizer.tokenizer {
            tok.check_fits(loaded.model.config(), path)?;
        }
        let chat_template = match &loaded.tokenizer.chat_template {
            Some(src) => {
                let tok = loaded.tokenizer.tokenizer.as_ref();
                Some(Arc::new(ChatTemplate::new(
                    src,
                    tok.and_then(|t| t.bos_token.as_deref()),
                    tok.and_then(|t| t.eos_token.as_deref()),
                )?))
            }
            None => None,
        };
        Ok(Self {
            model: Arc::new(loaded.model),
            adapters: HashMap::new(),
            verifiers: HashMap::new(),
            merged: Vec::new(),
            tokenizer: loaded.tokenizer.tokenizer.map(Arc::new),
            chat_template,
            weight_bytes: loaded.weight_bytes,
            path: path.to_path_buf(),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of weights read by one decode step.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_deref().ok_or_else(|| {
            Error::Tokenizer(
                "this model has no tokenizer (no tokenizer.json or GGUF vocabulary)".into(),
            )
        })
    }

    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.chat_template
            .as_ref()
            .ok_or_else(|| Error::ChatTemplate("this model has no chat template".into()))?
            .render(messages, add_generation_prompt)
    }

    /// Logits `[len, vocab]` at every position of `ids`, run as one fresh sequence.
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor> {
        self.logits_batch(&[(ids, None)])?
            .pop()
            .ok_or_else(|| Error::invalid("forward returned no rows"))
    }

    /// Logits at every position of several sequences, each through the named adapter or the
    /// base model, batched into passes of at most [`LOGITS_CHUNK`] tokens (one pass when they
    /// fit; see [`Self::logits_batch_with`]).
    pub fn logits_batch(&self, items: &[(&[u32], Option<&str>)]) -> Result<Vec<Tensor>> {
        self.logits_batch_with(items, &mut || Ok(()))
    }

    /// [`Self::logits_batch`] in forward passes of at most [`LOGITS_CHUNK`] tokens: each pass
    /// advances the sequences in order by their next pieces (so short batches still share one
    /// pass, and a long input runs in chunks over its growing cache), and `between` is called
    /// between passes: an error from it (an interrupt) ends the call.
    pub fn logits_batch_with(
        &self,
        items: &[(&[u32], Option<&str>)],
        between: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<Tensor>> {
        let rows = items
            .iter()
            .map(|&(ids, name)| Ok((ids, name.map(|n| self.adapter(n)).transpose()?, None)))
            .collect::<Result<Vec<_>>>()?;
        self.run_sequences(&rows, between)
    }

    /// The value head's logit at every position of several sequences, each read by the named
    /// verifier, batched as [`Self::logits_batch_with`] batches logits: `[len]` per sequence.
    pub fn verifier_logits_batch_with(
        &self,
        items: &[(&[u32], &str)],
        between: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<Vec<f32>>> {
        let rows = items
            .iter()
            .map(|&(ids, name)| {
                let v = self.verifier(name)?;
                Ok((ids, Some(v.adapter.clone()), Some(v.head.clone())))
            })
            .collect::<Result<Vec<_>>>()?;
        self.run_sequences(&rows, between)?
            .into_iter()
            .map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            .collect()
    }

    /// Each step's probability under verifier `name` for solutions given as text, read as the
    /// verifier was trained to read them: the prompt as the chat template's user turn (with the
    /// generation prompt), then every step followed by the verifier's step tag, the head read at
    /// the token that holds the tag's last byte. One list per `(prompt, steps)` item.
    pub fn score_steps(&self, name: &str, items: &[(&str, Vec<&str>)]) -> Result<Vec<Vec<f64>>> {
        let verifier = self.verifier(name)?;
        let tok = self.tokenizer()?;
        let mut inputs = Vec::with_capacity(items.len());
        for (prompt, steps) in items {
            let mut text = self.apply_chat_template(&[ChatMessage::user(prompt)], true)?;
            let mut ends = Vec::with_capacity(steps.len());
            for step in steps {
                text.push_str(step);
                text.push_str(&verifier.step_tag);
                ends.push(text.len());
            }
            let (ids, offsets) = tok.encode_with_offsets(&text)?;
            let positions: Vec<usize> = ends
                .iter()
                .map(|&end| {
                    offsets
                        .iter()
                        .rposition(|&(start, _)| start < end)
                        .unwrap_or(0)
                })
                .collect();
            inputs.push((ids, positions));
        }
        let rows: Vec<(&[u32], &str)> = inputs.iter().map(|(ids, _)| (&ids[..], name)).collect();
        let logits = self.verifier_logits_batch_with(&rows, &mut || Ok(()))?;
        Ok(inputs
            .iter()
            .zip(logits)
            .map(|((_, positions), l)| positions.iter().map(|&p| sigmoid(l[p])).collect())
            .collect())
    }

    /// Every position's output of fresh sequences (see [`Self::logits_batch_with`]).
    #[allow(clippy::type_complexity)]
    fn run_sequences(
        &self,
        items: &[(&[u32], Option<Arc<LoraAdapter>>, Option<Arc<ValueHead>>)],
        between: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<Tensor>> {
        let mut store = SeqStore::new(self.model.kv_shape(), self.model.device());
        for (ids, _, _) in items {
            self.check_prompt(ids)?;
        }
        let seqs: Vec<_> = items.iter().map(|_| store.create()).collect();
        let mut fed = vec![0usize; items.len()];
        let mut parts: Vec<Vec<Tensor>> = vec![Vec::new(); items.len()];
        let mut first = true;
        while fed.iter().zip(items).any(|(&f, (ids, _, _))| f < ids.len()) {
            if !first {
                between()?;
            }
            first = false;
            let mut budget = LOGITS_CHUNK;
            let mut rows = Vec::new();
            let mut owners = Vec::new();
            for (i, (ids, adapter, head)) in items.iter().enumerate() {
                let take = (ids.len() - fed[i]).min(budget);
                if take == 0 {
                    continue;
                }
                let piece = &ids[fed[i]..fed[i] + take];
                rows.push(
                    RowInput::new(seqs[i], piece, LogitsFor::All)
                        .with_adapter(adapter.as_deref())
                        .with_head(head.as_deref()),
                );
                owners.push(i);
                fed[i] += take;
                budget -= take;
            }
            for (i, logits) in owners
                .into_iter()
                .zip(self.model.forward(&mut store, &rows)?)
            {
                parts[i].push(logits);
            }
        }
        parts.into_iter().map(|p| Ok(Tensor::cat(&p, 0)?)).collect()
    }

    /// Loads the peft LoRA adapter folder `path` under `name`, to be named by rows.
    pub fn load_adapter(&mut self, path: impl AsRef<Path>, name: &str) -> Result<()> {
        let path = path.as_ref();
        check_new_name(ADAPTER, name, &self.adapters)?;
        let adapter = LoraAdapter::load(path, name, self.model.config())?;
        self.adapters.insert(name.to_string(), Arc::new(adapter));
        Ok(())
    }

    /// Merges the peft LoRA adapter folder `path` into the model's weights: every later forward
    /// pass runs the adapted model at the base model's speed. A float base gets `W + scale·B·A`
    /// in its dtype; a quantized one keeps its GGML format, the sum rounded stochastically onto
    /// each block's grid (see `model::requantize`: unbiased, but it adds rounding noise; use a
    /// float base, or the adapter unmerged, for exact adapter logits). Adapters loaded by name
    /// apply on top of the merged weights. Generations already running keep the weights they
    /// started with.
    pub fn merge_adapter(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let adapter = LoraAdapter::load(path, "merged", self.model.config())?;
        Arc::make_mut(&mut self.model).merge_adapter(&adapter)?;
        self.merged.push(path.to_path_buf());
        Ok(())
    }

    /// The dtype of the key/value cache of every later generation.
    pub fn kv_dtype(&self) -> DType {
        self.model.kv_dtype()
    }

    /// Keeps the key/value cache of later generations in `dtype` (see [`Model::set_kv_dtype`]).
    pub fn set_kv_dtype(&mut self, dtype: DType) -> Result<()> {
        if dtype != self.model.kv_dtype() {
            Arc::make_mut(&mut self.model).set_kv_dtype(dtype)?;
        }
        Ok(())
    }

    /// The adapter folders merged into the weights, in the order they were merged.
    pub fn merged_adapters(&self) -> &[PathBuf] {
        &self.merged
    }

    /// Loads the verifier folder `path` (a peft adapter plus a value head, as `peftscale train`
    /// writes for methods `prm` and `orm`) under `name`. Its step tag must be text this model's
    /// tokenizer encodes and decodes back unchanged, since the head reads the token ending it.
    pub fn load_verifier(&mut self, path: impl AsRef<Path>, name: &str) -> Result<()> {
        let path = path.as_ref();
        check_new_name(VERIFIER, name, &self.verifiers)?;
        let verifier = Verifier::load(path, name, self.model.config())?;
        if let Some(tok) = &self.tokenizer {
            let ids = tok.encode(&verifier.step_tag)?;
            let ids: Vec<u32> = ids
                .into_iter()
                .filter(|&t| Some(t) != tok.bos_token_id)
                .collect();
            let back = tok.decode(&ids, false)?;
            if ids.is_empty() || back != verifier.step_tag {
                return Err(Error::adapter(
                    path,
                    format!(
                        "the step tag {:?} is not text this model's tokenizer can read back \
                         (it encodes to {ids:?}, which decodes to {back:?}): the verifier was \
                         trained with another tokenizer",
                        verifier.step_tag
                    ),
                ));
            }
        }
        self.verifiers.insert(name.to_string(), Arc::new(verifier));
        Ok(())
    }

    pub fn verifier(&self, name: &str) -> Result<Arc<Verifier>> {
        loaded(VERIFIER, name, &self.verifiers).cloned()
    }

    /// Names of the loaded verifiers, sorted.
    pub fn verifier_names(&self) -> Vec<String> {
        sorted_names(&self.verifiers)
    }

    /// Forgets the verifier `name`; generations already running keep their own reference.
    pub fn unload_verifier(&mut self, name: &str) -> Result<()> {
        loaded(VERIFIER, name, &self.verifiers)?;
        self.verifiers.remove(name);
        Ok(())
    }

    /// Forgets the adapter `name`; generations already running keep their own reference.
    pub fn unload_adapter(&mut self, name: &str) -> Result<()> {
        loaded(ADAPTER, name, &self.adapters)?;
        self.adapters.remove(name);
        Ok(())
    }

    pub fn adapter(&self, name: &str) -> Result<Arc<LoraAdapter>> {
        loaded(ADAPTER, name, &self.adapters).cloned()
    }

    /// Names of the loaded adapters, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        sorted_names(&self.adapters)
    }

    /// A fresh sequence store for running the model by hand ([`Engine::forward`]).
    pub fn new_store(&self) -> SeqStore {
        SeqStore::new(self.model.kv_shape(), self.model.device())
    }

    /// One batched forward pass over `rows` (for strategies and tests that drive the model).
    pub fn forward(&self, store: &mut SeqStore, rows: &[RowInput<'_>]) -> Result<Vec<Tensor>> {
        self.model.forward(store, rows)
    }

    fn check_prompt(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::invalid("prompt is empty: give at least one token"));
        }
        let ctx = self.config().max_position_embeddings;
        if ids.len() >= ctx {
            return Err(Error::ContextOverflow {
                prompt_tokens: ids.len(),
                context: ctx,
            });
        }
        Ok(())
    }

    /// Starts decoding `prompts` (token ids); drive it with [`Generation::step`].
    pub fn start(&self, prompts: Vec<Vec<u32>>, opts: &GenerateOptions) -> Result<Generation> {
        if prompts.is_empty() {
            return Err(Error::invalid("no prompts given"));
        }
        if opts.max_new_tokens == 0 {
            return Err(Error::invalid("max_new_tokens must be at least 1"));
        }
        opts.sampling.validate()?;
        if let Some(i) = opts.stop.iter().position(String::is_empty) {
            return Err(Error::invalid(format!(
                "stop string {i} is empty: it would match before any text"
            )));
        }
        for p in &prompts {
            self.check_prompt(p)?;
        }
        let eos_token_ids = match (&self.tokenizer, opts.ignore_eos) {
            (Some(t), false) => t.eos_token_ids.clone(),
            _ => Vec::new(),
        };
        let criteria = StopCriteria {
            max_new_tokens: opts.max_new_tokens,
            eos_token_ids,
            stop: StopMatcher::new(opts.stop.clone()),
            context: self.config().max_position_embeddings,
        };
        if opts.adapters.len() > 1 && opts.adapters.len() != prompts.len() {
            return Err(Error::invalid(format!(
                "{} adapters given for {} prompts: give one for all, or one per prompt",
                opts.adapters.len(),
                prompts.len()
            )));
        }
        let adapters = opts
            .adapters
            .iter()
            .map(|a| a.as_deref().map(|n| self.adapter(n)).transpose())
            .collect::<Result<Vec<_>>>()?;
        let cold = opts
            .search
            .as_ref()
            .map_or(opts.cold, |s| s.cold().or(opts.cold));
        if let Some(cold) = &cold {
            cold.validate()?;
            if adapters.is_empty() || adapters.iter().any(Option::is_none) {
                return Err(Error::invalid(
                    "CoLD contrasts an adapter with its base model: every prompt needs an adapter",
                ));
            }
        }
        if let Some(search) = &opts.search {
            search.validate()?;
            let strategy =
                build_search(search, &prompts, adapters, criteria, self.tokenizer.clone())?;
            return Generation::new(self.model.clone(), strategy, prompts, false, opts.timeout);
        }
        let strategy: Box<dyn Strategy> = Box::new(SamplingStrategy::new(
            opts.sampling,
            criteria,
            self.tokenizer.clone(),
            adapters,
            opts.cold,
        ));
        let separate_passes = opts.cold.is_some_and(|c| !c.paired);
        Generation::new(
            self.model.clone(),
            strategy,
            prompts,
            separate_passes,
            opts.timeout,
        )
    }

    /// Decodes `prompts` to completion.
    pub fn generate(&self, prompts: Vec<Vec<u32>>, opts: &GenerateOptions) -> Result<Vec<Output>> {
        let mut generation = self.start(prompts, opts)?;
        while !generation.is_done() {
            generation.step()?;
        }
        Ok(generation.outputs())
    }
}

/// What the engine loads by name: adapters and verifiers, as `(article, noun)` for messages.
type Kind = (&'static str, &'static str);
const ADAPTER: Kind = ("an", "adapter");
const VERIFIER: Kind = ("a", "verifier");

fn sorted_names<T>(map: &HashMap<String, T>) -> Vec<String> {
    let mut names: Vec<String> = map.keys().cloned().collect();
    names.sort();
    names
}

/// Refuses an empty name or one already loaded.
fn check_new_name<T>((article, noun): Kind, name: &str, map: &HashMap<String, T>) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(format!(
            "{article} {noun} needs a non-empty name"
        )));
    }
    if map.contains_key(name) {
        return Err(Error::invalid(format!(
            "{article} {noun} named `{name}` is already loaded; unload it first or pick another name"
        )));
    }
    Ok(())
}

/// The loaded item `name`, or an error that lists what is loaded.
fn loaded<'m, T>((_, noun): Kind, name: &str, map: &'m HashMap<String, T>) -> Result<&'m T> {
    map.get(name).ok_or_else(|| {
        let names = sorted_names(map);
        Error::invalid(if names.is_empty() {
            format!("no {noun} named `{name}` is loaded (none are; use load_{noun})")
        } else {
            format!(
                "no {noun} named `{name}` is loaded (loaded: {})",
                names.join(", ")
            )
        })
    })
}

/// One decoding run in progress: the strategy, its sequences, and the compute account.
pub struct Generation {
    model: Arc<Model>,
    store: SeqStore,
    strategy: Box<dyn Strategy>,
    pending: Vec<Advance>,
    stats: Stats,
    started: Instant,
    /// Run rows with different adapters in separate forward passes (naive CoLD, for comparison).
    separate_passes: bool,
    /// Choose tokens from the logit tensors (as on a GPU) even on the CPU: see
    /// [`Generation::set_picks_where_logits_are`].
    picks_where_logits_are: bool,
    deadline: Option<Instant>,
}

impl Generation {
    fn new(
        model: Arc<Model>,
        mut strategy: Box<dyn Strategy>,
        prompts: Vec<Vec<u32>>,
        separate_passes: bool,
        timeout: Option<Duration>,
    ) -> Result<Self> {
        let started = Instant::now();
        let mut store = SeqStore::new(model.kv_shape(), model.device());
        let pending = strategy.start(&mut store, &prompts)?;
        Ok(Self {
            model,
            store,
            strategy,
            pending,
            stats: Stats::default(),
            started,
            separate_passes,
            picks_where_logits_are: false,
            deadline: timeout.map(|t| started + t),
        })
    }

    pub fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    /// On a GPU, a strategy whose every choice is a plain draw or greedy CoLD has the tokens
    /// chosen there ([`crate::search::Strategy::device_picks`]), and only they cross to the
    /// host. This makes the CPU take the same path (it chooses exactly what the per-row host
    /// scorers choose), so that tests can hold the path to them.
    pub fn set_picks_where_logits_are(&mut self, on: bool) {
        self.picks_where_logits_are = on;
    }

    /// Ends the generation now, as its timeout does: every unfinished row keeps what it
    /// produced and reports `reason`; a search reports the best of what it finished.
    pub fn finish_early(&mut self, reason: FinishReason) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.pending.clear();
        self.strategy.finish_early(&mut self.store, reason)
    }

    /// Runs one batched forward pass and lets the strategy consume it; returns newly final text.
    pub fn step(&mut self) -> Result<Vec<TextDelta>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let work = std::mem::take(&mut self.pending);
        self.account(&work)?;
        let rows: Vec<RowInput<'_>> = work
            .iter()
            .map(|a| {
                let positions = if a.head.is_some() {
                    LogitsFor::All
                } else {
                    LogitsFor::Last
                };
                RowInput::new(a.seq, &a.tokens, positions)
                    .with_adapter(a.adapter.as_deref())
                    .with_head(a.head.as_deref())
                    .with_capture(a.capture)
                    .with_entry(a.entry.as_deref().map(|e| Entry {
                        layer: e.layer,
                        hidden: &e.hidden,
                    }))
            })
            .collect();
        let forward_started = Instant::now();
        let logits = if self.separate_passes {
            // One pass per adapter (the base model being one of them), results back in order.
            let mut logits: Vec<Option<Tensor>> = vec![None; rows.len()];
            let groups = group_by_adapter(rows.iter().map(|r| r.adapter));
            self.stats.forward_passes += groups.len().saturating_sub(1);
            for (_, g) in groups {
                let part: Vec<RowInput<'_>> = g.iter().map(|&i| rows[i].clone()).collect();
                for (i, l) in g
                    .into_iter()
                    .zip(self.model.forward(&mut self.store, &part)?)
                {
                    logits[i] = Some(l);
                }
            }
            logits.into_iter().flatten().collect()
        } else {
            self.model.forward(&mut self.store, &rows)?
        };
        self.stats.forward_seconds += forward_started.elapsed().as_secs_f64();
        let on_device = self.picks_where_logits_are || !self.model.device().is_cpu();
        let picks = if on_device {
            self.strategy.device_picks()
        } else {
            None
        };
        self.pending = match picks {
            // Only the chosen tokens (and their log-probabilities) leave the logits' device.
            Some(picks) => {
                let rows: HashMap<SeqId, usize> =
                    work.iter().enumerate().map(|(i, a)| (a.seq, i)).collect();
                let row_of = |seq: SeqId| {
                    rows.get(&seq).copied().ok_or_else(|| {
                        Error::invalid(format!("no logits for sequence {seq} to pick from"))
                    })
                };
                let picks: Vec<Pick> = picks
                    .into_iter()
                    .map(|p| p.map_rows(row_of))
                    .collect::<Result<_>>()?;
                let picked = pick_tokens(&logits, &picks, self.stats.steps)?;
                self.strategy.consume_picks(&mut self.store, picked)?
            }
            None => {
                let per_seq: Vec<(SeqId, Vec<f32>)> =
                    work.iter().map(|a| a.seq).zip(host_rows(logits)?).collect();
                self.strategy.consume(&mut self.store, per_seq)?
            }
        };
        if !self.pending.is_empty() && self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.finish_early(FinishReason::Timeout)?;
        }
        self.stats.steps += 1;
        self.stats.seconds = self.started.elapsed().as_secs_f64();
        if self.stats.first_token_seconds == 0.0 {
            self.stats.first_token_seconds = self.stats.seconds;
        }
        Ok(self.strategy.take_deltas())
    }

    fn account(&mut self, work: &[Advance]) -> Result<()> {
        let cfg = self.model.config();
        let dense = 2.0 * cfg.matmul_parameters() as f64;
        // A verifier row runs its value head (a dot product) in place of the LM head.
        let lm_head = 2.0 * (cfg.hidden_size * cfg.vocab_size) as f64;
        // q·k and p·v: 2 x 2 x layers x q_dim multiply-adds for each (query, key) pair.
        let attn = 4.0 * (cfg.num_layers * cfg.num_heads * cfg.head_dim) as f64;
        for a in work {
            let past = self.store.len(a.seq)?;
            let n = a.tokens.len();
            let pairs: f64 = (0..n).map(|i| (past + i + 1) as f64).sum();
            self.stats.tokens_forwarded += n;
            let body = if a.head.is_some() {
                dense - lm_head
            } else {
                dense
            };
            // A row entering above the embeddings runs only the layers from there up.
            let share = match &a.entry {
                Some(e) => {
                    self.stats.trunk_tokens += n;
                    let above = cfg.num_layers.saturating_sub(e.layer) as f64;
                    above / cfg.num_layers as f64
                }
                _ => 1.0,
            };
            self.stats.flops += share * (body * n as f64 + attn * pairs);
        }
        self.stats.forward_passes += 1;
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn outputs(&self) -> Vec<Output> {
        self.strategy
            .outputs()
            .into_iter()
            .map(|row| Output {
                row,
                stats: self.stats,
            })
            .collect()
    }
}

/// Each row's output as a host vector: `[1, vocab]` logits, or a verifier row's `[positions, 1]`
/// head logits. On the CPU the rows are copied out on the team (a wide batch holds megabytes of
/// them); from a device, in one transfer when every row has the same shape.
fn host_rows(logits: Vec<Tensor>) -> Result<Vec<Vec<f32>>> {
    let same_shape = logits.windows(2).all(|w| w[0].dims() == w[1].dims());
    match logits.first().map(|l| l.device()) {
        None => Ok(Vec::new()),
        Some(d) if !d.is_cpu() && same_shape && logits[0].dims()[0] == 1 => {
            Ok(Tensor::cat(&logits, 0)?.to_vec2::<f32>()?)
        }
        Some(_) => map_parallel(logits, |l| Ok(l.flatten_all()?.to_vec1::<f32>()?))
            .into_iter()
            .collect(),
    }
}
