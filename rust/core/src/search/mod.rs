//! Decoding strategies as state machines. A strategy never calls the model: each iteration it
//! hands the engine a list of sequences to advance, the engine runs all of them in one batched
//! forward pass, and the strategy consumes the resulting logits.

pub(crate) mod sampling;

pub use sampling::SamplingStrategy;

use std::sync::Arc;

use crate::error::Result;
use crate::kv::{SeqId, SeqStore};
use crate::lora::LoraAdapter;

/// Append `tokens` to `seq` in the next forward pass, with `adapter`'s updates or through the
/// base model; its last-position logits come back.
#[derive(Debug, Clone)]
pub struct Advance {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
    pub adapter: Option<Arc<LoraAdapter>>,
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
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Context => "context",
        }
    }
}

/// Text produced for one output row since the previous step (for streaming).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextDelta {
    pub row: usize,
    pub text: String,
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

    /// Text that became final since the last call.
    fn take_deltas(&mut self) -> Vec<TextDelta>;

    fn outputs(&self) -> Vec<RowOutput>;
}
