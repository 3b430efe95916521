//! Greedy decoding and sampling: one sequence per prompt, one token per step.

use std::sync::Arc;

use super::{Advance, FinishReason, RowOutput, Strategy, TextDelta};
use crate::error::{Error, Result};
use crate::kv::{SeqId, SeqStore};
use crate::logits::{self, Rng, SamplingParams};
use crate::text::{StopMatcher, Tokenizer};

/// Limits shared by every row of a generation.
#[derive(Debug, Clone)]
pub struct StopCriteria {
    pub max_new_tokens: usize,
    pub eos_token_ids: Vec<u32>,
    pub stop: StopMatcher,
    /// The model's context length.
    pub context: usize,
}

struct Row {
    seq: SeqId,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    logprobs: Vec<f32>,
    rng: Rng,
    finish: Option<FinishReason>,
    text: String,
    streamed: usize,
}

pub struct SamplingStrategy {
    params: SamplingParams,
    stop: StopCriteria,
    tokenizer: Option<Arc<Tokenizer>>,
    rows: Vec<Row>,
    deltas: Vec<TextDelta>,
    step: usize,
}

impl SamplingStrategy {
    pub fn new(
        params: SamplingParams,
        stop: StopCriteria,
        tokenizer: Option<Arc<Tokenizer>>,
    ) -> Self {
        Self {
            params,
            stop,
            tokenizer,
            rows: Vec::new(),
            deltas: Vec::new(),
            step: 0,
        }
    }

    fn accept(&mut self, idx: usize, mut scores: Vec<f32>) -> Result<()> {
        if !logits::all_finite(&scores) {
            return Err(Error::NonFiniteLogits {
                row: idx,
                step: self.step,
            });
        }
        let row = &mut self.rows[idx];
        let raw_logprob = |scores: &[f32], tok: u32| logits::log_prob(scores, tok as usize);
        let token = if self.params.repetition_penalty != 1.0 {
            let raw = scores.clone();
            let seen: Vec<u32> = row.prompt.iter().chain(&row.generated).copied().collect();
            logits::apply_repetition_penalty(&mut scores, &seen, self.params.repetition_penalty);
            let t = logits::choose(&scores, &self.params, &mut row.rng);
            row.logprobs.push(raw_logprob(&raw, t));
            t
        } else {
            let t = logits::choose(&scores, &self.params, &mut row.rng);
            row.logprobs.push(raw_logprob(&scores, t));
            t
        };
        row.generated.push(token);

        if self.stop.eos_token_ids.contains(&token) {
            row.finish = Some(FinishReason::Eos);
        }
        if let Some(tok) = &self.tokenizer {
            // Decoding the whole continuation each step keeps multi-byte characters and stop
            // strings that span tokens correct; generations here are short enough for it.
            let full = tok.decode(&row.generated, true)?;
            let cut = self.stop.stop.find(&full);
            let visible = match cut {
                Some(at) => {
                    row.finish = Some(FinishReason::Stop);
                    full[..at].to_string()
                }
                None => full,
            };
            let safe = if row.finish.is_some() {
                visible.len()
            } else {
                self.stop.stop.safe_prefix_len(&visible)
            };
            if safe > row.streamed && visible.is_char_boundary(row.streamed) {
                self.deltas.push(TextDelta {
                    row: idx,
                    text: visible[row.streamed..safe].to_string(),
                });
                row.streamed = safe;
            }
            row.text = visible;
        }
        if row.finish.is_none() {
            if row.generated.len() >= self.stop.max_new_tokens {
                row.finish = Some(FinishReason::Length);
            } else if row.prompt.len() + row.generated.len() >= self.stop.context {
                row.finish = Some(FinishReason::Context);
            }
        }
        Ok(())
    }
}

impl Strategy for SamplingStrategy {
    fn start(&mut self, store: &mut SeqStore, prompts: &[Vec<u32>]) -> Result<Vec<Advance>> {
        let mut work = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            let seq = store.create();
            self.rows.push(Row {
                seq,
                prompt: p.clone(),
                generated: Vec::new(),
                logprobs: Vec::new(),
                rng: Rng::new(self.params.seed, i as u64),
                finish: None,
                text: String::new(),
                streamed: 0,
            });
            work.push(Advance {
                seq,
                tokens: p.clone(),
            });
        }
        Ok(work)
    }

    fn consume(
        &mut self,
        store: &mut SeqStore,
        logits: Vec<(SeqId, Vec<f32>)>,
    ) -> Result<Vec<Advance>> {
        for (seq, scores) in logits {
            let idx = self
                .rows
                .iter()
                .position(|r| r.seq == seq)
                .ok_or_else(|| Error::invalid(format!("logits for unknown sequence {seq}")))?;
            self.accept(idx, scores)?;
        }
        self.step += 1;
        let mut work = Vec::new();
        for row in &self.rows {
            match (row.finish, row.generated.last()) {
                (None, Some(&t)) => work.push(Advance {
                    seq: row.seq,
                    tokens: vec![t],
                }),
                (Some(_), _) => {
                    if store.len(row.seq).is_ok() {
                        store.free(row.seq);
                    }
                }
                (None, None) => {}
            }
        }
        Ok(work)
    }

    fn take_deltas(&mut self) -> Vec<TextDelta> {
        std::mem::take(&mut self.deltas)
    }

    fn outputs(&self) -> Vec<RowOutput> {
        self.rows
            .iter()
            .map(|r| RowOutput {
                token_ids: r.generated.clone(),
                logprobs: r.logprobs.clone(),
                text: self.tokenizer.as_ref().map(|_| r.text.clone()),
                finish_reason: r.finish.unwrap_or(FinishReason::Length),
                prompt_tokens: r.prompt.len(),
            })
            .collect()
    }
}
