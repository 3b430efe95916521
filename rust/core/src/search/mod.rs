//! Decoding strategies as state machines. A strategy never calls the model: each iteration it
//! hands the engine a list of sequences to advance, the engine runs all of them in one batched
//! forward pass, and the strategy consumes the resulting logits.

pub(crate) mod adaptive;
pub(crate) mod answers;
pub(crate) mod beam;
pub(crate) mod best_of_n;
pub(crate) mod branch;
pub mod callbacks;
pub(crate) mod driver;
pub mod extract;
pub(crate) mod mcts;
pub(crate) mod sampling;
pub(crate) mod self_consistency;
pub(crate) mod spec;
pub(crate) mod tot;
pub mod tree;
pub(crate) mod verifier_beam;
pub(crate) mod verify;

pub use answers::{extract, tally, Extractor, Vote};
pub use beam::{BeamParams, EarlyStopping};
pub use callbacks::{Evaluator, ExtractFn, Scorer};
pub use sampling::SamplingStrategy;
pub use spec::{
    AdaptiveParams, BestOfNParams, MctsParams, Ranking, Reward, Rollout, SearchSpec,
    SelfConsistencyParams, ToTEvaluator, ToTGenerate, ToTParams, ToTSearch, TokenScorer,
    VerifierSearchParams,
};
pub use tree::{TreeNodeReport, TreeReport};

use std::sync::Arc;

use crate::error::Result;
use crate::kv::{SeqId, SeqStore};
use crate::logits::{Pick, Picked};
use crate::lora::{LoraAdapter, ValueHead};

/// Append `tokens` to `seq` in the next forward pass, with `adapter`'s updates or through the
/// base model; its last-position logits come back.
#[derive(Debug, Clone)]
pub struct Advance {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
    pub adapter: Option<Arc<LoraAdapter>>,
    /// A verifier's value head: the sequence gets the head's logit at every fed position in
    /// place of last-position vocabulary logits.
    pub head: Option<Arc<ValueHead>>,
    /// Keep the hidden states entering this layer (see [`crate::model::RowInput::capture`]).
    pub capture: Option<usize>,
    /// Enter the model above the embeddings (see [`crate::model::Entry`]).
    pub entry: Option<Arc<EntryHidden>>,
}

/// The hidden states a row enters a layer with (`[tokens, hidden_size]`).
#[derive(Debug)]
pub struct EntryHidden {
    pub layer: usize,
    pub hidden: Vec<f32>,
}

impl Advance {
    /// Work that feeds `tokens` to `seq` with `adapter`, and to its CoLD base twin `base` (if
    /// any) through the base model.
    pub(crate) fn with_twin(
        seq: SeqId,
        base: Option<SeqId>,
        adapter: &Option<Arc<LoraAdapter>>,
        tokens: &[u32],
    ) -> impl Iterator<Item = Advance> {
        let twin = base.map(|b| Advance {
            seq: b,
            tokens: tokens.to_vec(),
            adapter: None,
            head: None,
            capture: None,
            entry: None,
        });
        std::iter::once(Advance {
            seq,
            tokens: tokens.to_vec(),
            adapter: adapter.clone(),
            head: None,
            capture: None,
            entry: None,
        })
        .chain(twin)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string appeared in the text.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
    /// The model's context is full.
    Context,
    /// The generation's `timeout` passed first; the row keeps what it produced.
    Timeout,
    /// The caller ended the generation (Ctrl-C); the row keeps what it produced.
    Interrupted,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Context => "context",
            FinishReason::Timeout => "timeout",
            FinishReason::Interrupted => "interrupted",
        }
    }
}

/// Text produced for one output row since the previous step (for streaming).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextDelta {
    pub row: usize,
    pub text: String,
}

/// One continuation a search strategy considered.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub token_ids: Vec<u32>,
    /// Log-probability of each token under the model's unmodified distribution.
    pub logprobs: Vec<f32>,
    pub text: Option<String>,
    pub finish_reason: FinishReason,
    /// The strategy's score (beam: transformers' `sequences_scores`; best-of-N: the scorer's).
    pub score: f64,
    /// The answer extracted from the text (self-consistency, adaptive).
    pub answer: Option<String>,
    /// A verifier's probability for each step (strategies that use one; empty otherwise).
    pub step_scores: Vec<f64>,
}

/// The finished result of one output row.
#[derive(Debug, Clone)]
pub struct RowOutput {
    pub token_ids: Vec<u32>,
    /// Log-probability of each chosen token under the model's unmodified distribution.
    pub logprobs: Vec<f32>,
    /// The generated text, cut before any stop string; `None` when the model has no tokenizer.
    pub text: Option<String>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// The chosen output's score under the strategy (search strategies only).
    pub score: Option<f64>,
    /// What the strategy considered, best first where it ranks them.
    pub candidates: Vec<Candidate>,
    /// The voted or extracted answer (self-consistency, adaptive, tree searches).
    pub answer: Option<String>,
    /// Votes per answer, largest first (ties in first-seen order).
    pub votes: Vec<(String, f64)>,
    /// The search tree (Tree-of-Thought, MCTS).
    pub tree: Option<TreeReport>,
    /// Tokens forwarded for this row alone (adaptive compute's spend per question).
    pub tokens_spent: usize,
}

impl RowOutput {
    /// A plain output with no search details.
    pub fn plain(
        token_ids: Vec<u32>,
        logprobs: Vec<f32>,
        text: Option<String>,
        finish_reason: FinishReason,
        prompt_tokens: usize,
    ) -> Self {
        Self {
            token_ids,
            logprobs,
            text,
            finish_reason,
            prompt_tokens,
            score: None,
            candidates: Vec::new(),
            answer: None,
            votes: Vec::new(),
            tree: None,
            tokens_spent: 0,
        }
    }

    pub(crate) fn from_candidate(c: &Candidate, prompt_tokens: usize) -> Self {
        Self {
            score: Some(c.score),
            answer: c.answer.clone(),
            ..Self::plain(
                c.token_ids.clone(),
                c.logprobs.clone(),
                c.text.clone(),
                c.finish_reason,
                prompt_tokens,
            )
        }
    }
}

/// The adapter of prompt `i`: none, one for every prompt, or one per prompt.
pub(crate) fn adapter_for(
    adapters: &[Option<Arc<LoraAdapter>>],
    i: usize,
) -> Option<Arc<LoraAdapter>> {
    match adapters.len() {
        0 => None,
        1 => adapters[0].clone(),
        _ => adapters.get(i).cloned().flatten(),
    }
}

/// The strategy that runs `spec` over `prompts`.
pub(crate) fn build_search(
    spec: &SearchSpec,
    prompts: &[Vec<u32>],
    adapters: Vec<Option<Arc<LoraAdapter>>>,
    criteria: sampling::StopCriteria,
    tokenizer: Option<Arc<crate::text::Tokenizer>>,
) -> Result<Box<dyn Strategy>> {
    if let SearchSpec::Beam(p) = spec {
        return Ok(Box::new(beam::BeamSearch::new(
            *p, criteria, tokenizer, adapters,
        )?));
    }
    let stop = criteria.stop.strings().to_vec();
    let jobs: Vec<best_of_n::PromptJob> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| best_of_n::PromptJob {
            prompt: Arc::new(p.clone()),
            adapter: adapter_for(&adapters, i),
            max_new_tokens: criteria.max_new_tokens,
            stop: stop.clone(),
        })
        .collect();
    let needs_text = !matches!(spec, SearchSpec::BestOfN(_));
    if needs_text && tokenizer.is_none() {
        return Err(crate::error::Error::Tokenizer(format!(
            "{} reads text and this model has no tokenizer",
            spec.name()
        )));
    }
    let searches: Vec<Box<dyn driver::Search>> = match spec {
        SearchSpec::Beam(_) => Vec::new(),
        SearchSpec::BestOfN(p) => jobs
            .into_iter()
            .map(|j| Box::new(best_of_n::BestOfN::new(j, p.clone())) as Box<dyn driver::Search>)
            .collect(),
        SearchSpec::SelfConsistency(p) => jobs
            .into_iter()
            .map(|j| {
                Box::new(self_consistency::SelfConsistency::new(j, p.clone()))
                    as Box<dyn driver::Search>
            })
            .collect(),
        SearchSpec::TreeOfThought(p) => jobs
            .into_iter()
            .map(|j| Box::new(tot::TreeOfThought::new(j, p.clone())) as Box<dyn driver::Search>)
            .collect(),
        SearchSpec::Mcts(p) => jobs
            .into_iter()
            .map(|j| Box::new(mcts::Mcts::new(j, p.clone())) as Box<dyn driver::Search>)
            .collect(),
        SearchSpec::Adaptive(p) => vec![Box::new(adaptive::Adaptive::new(jobs, p.clone())?)],
        SearchSpec::VerifierSearch(p) => jobs
            .into_iter()
            .map(|j| {
                Box::new(verifier_beam::VerifierSearch::new(j, p.clone()))
                    as Box<dyn driver::Search>
            })
            .collect(),
    };
    let pool = branch::Pool::new(branch::PoolConfig {
        cold: spec.cold(),
        tokenizer,
        eos_token_ids: criteria.eos_token_ids,
        context: criteria.context,
    });
    Ok(Box::new(driver::SearchDriver::new(searches, pool)))
}

pub trait Strategy: Send + Sync {
    /// Creates the sequences for `prompts` and returns the prefill work.
    fn start(&mut self, store: &mut SeqStore, prompts: &[Vec<u32>]) -> Result<Vec<Advance>>;

    /// Consumes the logits of the last forward (one `[vocab]` row per advanced sequence, in the
    /// order of the work) and returns the next work; empty work means the strategy is done.
    fn consume(
        &mut self,
        store: &mut SeqStore,
        logits: Vec<(SeqId, Vec<f32>)>,
    ) -> Result<Vec<Advance>>;

    /// The step's choices as [`Pick`]s, one per row that chooses now, when every one is a plain
    /// draw or greedy CoLD (no penalty, no score over whole rows): the engine then makes them
    /// where the logits are (on a GPU, only the tokens cross to the host) and hands the results
    /// to [`Self::consume_picks`]. `None` (the default) hands over whole rows to
    /// [`Self::consume`]. Advances the rows' random streams as `consume` would, so it is called
    /// only when the picks will be made.
    fn device_picks(&mut self) -> Option<Vec<Pick<SeqId>>> {
        None
    }

    /// Takes the results of [`Self::device_picks`], in its order, and returns the next work.
    fn consume_picks(
        &mut self,
        _store: &mut SeqStore,
        _picked: Vec<Picked>,
    ) -> Result<Vec<Advance>> {
        Err(crate::error::Error::invalid(
            "this strategy chooses from whole logit rows, not device picks",
        ))
    }

    /// Text that became final since the last call.
    fn take_deltas(&mut self) -> Vec<TextDelta>;

    fn outputs(&self) -> Vec<RowOutput>;

    /// Ends every unfinished row now (the generation's timeout passed, or its caller stopped
    /// it): plain rows keep their tokens and report `reason`; searches report the best of what
    /// they finished (a vote over the samples that finished), each of their rows marked `reason`.
    fn finish_early(&mut self, store: &mut SeqStore, reason: FinishReason) -> Result<()>;
}
