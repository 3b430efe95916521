//! Greedy decoding and sampling: one sequence per prompt, one token per step.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Advance, FinishReason, RowOutput, Strategy, TextDelta};
use crate::error::{Error, Result};
use crate::kernels::cpu::parallel::map_parallel;
use crate::kv::{SeqId, SeqStore};
use crate::logits::{self, ColdParams, Pick, Picked, Rng, SamplingParams};
use crate::lora::LoraAdapter;
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

type SharedLogits = Arc<Vec<f32>>;

struct Row {
    /// Unset (`None`) while the row waits for another row with the same prompt and adapter to
    /// run it: it then forks that row's sequence instead of running the prompt again.
    seq: Option<SeqId>,
    shares_prompt_of: Option<usize>,
    /// CoLD's base-model twin of `seq`, fed the same tokens.
    base_seq: Option<SeqId>,
    adapter: Option<Arc<LoraAdapter>>,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    logprobs: Vec<f32>,
    rng: Rng,
    finish: Option<FinishReason>,
    text: String,
    streamed: usize,
}

/// One sequence per prompt, with the adapter the rows decode with; with CoLD, each also has a
/// twin through the base model whose logits the expert's are contrasted with.
pub struct SamplingStrategy {
    params: SamplingParams,
    /// One per prompt, or a single one for every prompt.
    adapters: Vec<Option<Arc<LoraAdapter>>>,
    cold: Option<ColdParams>,
    stop: StopCriteria,
    tokenizer: Option<Arc<Tokenizer>>,
    rows: Vec<Row>,
    deltas: Vec<TextDelta>,
    step: usize,
    /// The rows (and the rows holding their logits) of the pending device picks.
    picking: Vec<(usize, usize)>,
}

impl SamplingStrategy {
    pub fn new(
        params: SamplingParams,
        stop: StopCriteria,
        tokenizer: Option<Arc<Tokenizer>>,
        adapters: Vec<Option<Arc<LoraAdapter>>>,
        cold: Option<ColdParams>,
    ) -> Self {
        Self {
            params,
            adapters,
            cold,
            stop,
            tokenizer,
            rows: Vec::new(),
            deltas: Vec::new(),
            step: 0,
            picking: Vec::new(),
        }
    }

    /// Row `idx`'s next token and its log-probability under the model's own distribution
    /// (before any penalty or contrast). Needs only the row's own state, so rows choose in
    /// parallel.
    fn choose(
        &self,
        idx: usize,
        rng: &mut Rng,
        scores: &[f32],
        base: Option<&[f32]>,
    ) -> Result<(u32, f32)> {
        if !logits::all_finite(scores) || !base.is_none_or(logits::all_finite) {
            return Err(Error::NonFiniteLogits {
                row: idx,
                step: self.step,
            });
        }
        let row = &self.rows[idx];
        let token = if let (Some(cold), Some(base)) = (&self.cold, base) {
            logits::cold_choose(scores, base, cold, rng)
        } else if self.params.repetition_penalty != 1.0 {
            let mut penalized = scores.to_vec();
            let seen: Vec<u32> = row.prompt.iter().chain(&row.generated).copied().collect();
            logits::apply_repetition_penalty(&mut penalized, &seen, self.params.repetition_penalty);
            logits::choose(&penalized, &self.params, rng)
        } else {
            logits::choose(scores, &self.params, rng)
        };
        Ok((token, logits::log_prob(scores, token as usize)))
    }

    /// Appends the chosen token to row `idx` and settles its text and finish.
    fn accept(&mut self, idx: usize, rng: Rng, token: u32, logprob: f32) -> Result<()> {
        let row = &mut self.rows[idx];
        row.rng = rng;
        row.logprobs.push(logprob);
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

    /// After a step's choices: the next step's work, and the finished rows' sequences freed.
    fn next_work(&mut self, store: &mut SeqStore) -> Result<Vec<Advance>> {
        self.step += 1;
        let mut work = Vec::new();
        for row in &self.rows {
            let Some(seq) = row.seq else { continue };
            match (row.finish, row.generated.last()) {
                (None, Some(&t)) => {
                    work.extend(Advance::with_twin(seq, row.base_seq, &row.adapter, &[t]))
                }
                (Some(_), _) => {
                    for seq in std::iter::once(seq).chain(row.base_seq) {
                        if store.len(seq).is_ok() {
                            store.free(seq);
                        }
                    }
                }
                (None, None) => {}
            }
        }
        Ok(work)
    }

    /// The rows that choose a token this step, in the order `consume` takes them: each row
    /// that ran (an unfinished one with a sequence), then the rows sharing its prompt (their
    /// first step), each with the row whose logits it reads.
    fn ready_order(&self) -> Vec<(usize, usize)> {
        let mut waiting = self.waiting_for_prompts();
        let mut order = Vec::new();
        for (idx, row) in self.rows.iter().enumerate() {
            if row.seq.is_none() || row.finish.is_some() {
                continue;
            }
            order.push((idx, idx));
            let followers = waiting.remove(&idx).unwrap_or_default();
            order.extend(followers.into_iter().map(|f| (f, idx)));
        }
        order
    }

    /// The rows still waiting for another row to run their prompt, by that row, in row order.
    fn waiting_for_prompts(&self) -> HashMap<usize, Vec<usize>> {
        let mut waiting: HashMap<usize, Vec<usize>> = HashMap::new();
        for (f, row) in self.rows.iter().enumerate() {
            if let (None, Some(leader)) = (row.seq, row.shares_prompt_of) {
                waiting.entry(leader).or_default().push(f);
            }
        }
        waiting
    }
}

impl Strategy for SamplingStrategy {
    fn start(&mut self, store: &mut SeqStore, prompts: &[Vec<u32>]) -> Result<Vec<Advance>> {
        let mut work = Vec::with_capacity(prompts.len());
        let seed = self.cold.map_or(self.params.seed, |c| c.seed);
        // The first row of each (prompt, adapter) pair runs the prompt for all of them.
        let mut leaders: HashMap<(&[u32], usize), usize> = HashMap::new();
        for (i, p) in prompts.iter().enumerate() {
            let adapter = super::adapter_for(&self.adapters, i);
            let adapter_key = adapter.as_ref().map_or(0, |a| Arc::as_ptr(a) as usize);
            let leader = match leaders.entry((p.as_slice(), adapter_key)) {
                std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(self.rows.len());
                    None
                }
            };
            let (seq, base_seq) = match leader {
                Some(_) => (None, None),
                None => (Some(store.create()), self.cold.map(|_| store.create())),
            };
            self.rows.push(Row {
                seq,
                shares_prompt_of: leader,
                base_seq,
                adapter: adapter.clone(),
                prompt: p.clone(),
                generated: Vec::new(),
                logprobs: Vec::new(),
                rng: Rng::new(seed, i as u64),
                finish: None,
                text: String::new(),
                streamed: 0,
            });
            if let Some(seq) = seq {
                work.extend(Advance::with_twin(seq, base_seq, &adapter, p));
            }
        }
        Ok(work)
    }

    fn consume(
        &mut self,
        store: &mut SeqStore,
        logits: Vec<(SeqId, Vec<f32>)>,
    ) -> Result<Vec<Advance>> {
        let mut by_seq: HashMap<SeqId, Vec<f32>> = logits.into_iter().collect();
        // (row, its logits, its CoLD base logits), the rows that share a prompt reading the
        // logits of the row that ran it.
        let mut ready: Vec<(usize, SharedLogits, Option<SharedLogits>)> = Vec::new();
        let mut waiting = self.waiting_for_prompts();
        for idx in 0..self.rows.len() {
            let (Some(seq), base_seq) = (self.rows[idx].seq, self.rows[idx].base_seq) else {
                continue;
            };
            let Some(scores) = by_seq.remove(&seq) else {
                continue;
            };
            let base = match base_seq {
                Some(b) => Some(by_seq.remove(&b).ok_or_else(|| {
                    Error::invalid(format!("no base-model logits for sequence {seq}"))
                })?),
                None => None,
            };
            // Rows that share this row's prompt fork its sequence now, while it holds exactly
            // the prompt, and draw their first token from the same logits.
            let followers = waiting.remove(&idx).unwrap_or_default();
            for &f in &followers {
                self.rows[f].seq = Some(store.fork(seq)?);
                self.rows[f].base_seq = base_seq.map(|b| store.fork(b)).transpose()?;
            }
            let (scores, base) = (Arc::new(scores), base.map(Arc::new));
            for f in std::iter::once(idx).chain(followers) {
                ready.push((f, scores.clone(), base.clone()));
            }
        }
        let jobs: Vec<_> = ready
            .into_iter()
            .map(|(idx, scores, base)| (idx, self.rows[idx].rng.clone(), scores, base))
            .collect();
        let this = &*self;
        let chosen = map_parallel(jobs, |(idx, mut rng, scores, base)| {
            this.choose(idx, &mut rng, &scores, base.as_deref().map(Vec::as_slice))
                .map(|(token, logprob)| (idx, rng, token, logprob))
        });
        for c in chosen {
            let (idx, rng, token, logprob) = c?;
            self.accept(idx, rng, token, logprob)?;
        }
        if let Some(seq) = by_seq.keys().next() {
            return Err(Error::invalid(format!("logits for unknown sequence {seq}")));
        }
        self.next_work(store)
    }

    fn device_picks(&mut self) -> Option<Vec<Pick<SeqId>>> {
        let greedy_cold = self.cold.is_none_or(|c| !c.sample);
        if self.params.repetition_penalty != 1.0 || !greedy_cold {
            return None;
        }
        let order = self.ready_order();
        let mut picks = Vec::with_capacity(order.len());
        for &(idx, holder) in &order {
            let (seq, base) = (self.rows[holder].seq?, self.rows[holder].base_seq);
            picks.push(match (self.cold, base) {
                (Some(params), Some(base)) => Pick::Cold {
                    row: seq,
                    base,
                    params,
                },
                _ => {
                    // `logits::choose` draws one number per sampled step, none when greedy.
                    let u = if self.params.is_greedy() {
                        0.0
                    } else {
                        self.rows[idx].rng.next_f32()
                    };
                    Pick::Sample {
                        row: seq,
                        params: self.params,
                        u,
                    }
                }
            });
        }
        self.picking = order;
        Some(picks)
    }

    fn consume_picks(&mut self, store: &mut SeqStore, picked: Vec<Picked>) -> Result<Vec<Advance>> {
        let order = std::mem::take(&mut self.picking);
        if picked.len() != order.len() {
            return Err(Error::invalid(format!(
                "{} device picks for {} rows",
                picked.len(),
                order.len()
            )));
        }
        for &(idx, holder) in &order {
            if idx != holder {
                // As in `consume`: a row sharing the prompt forks the sequences that ran it.
                let (seq, base) = (self.rows[holder].seq, self.rows[holder].base_seq);
                let seq = seq.ok_or_else(|| Error::invalid("a shared prompt has no sequence"))?;
                self.rows[idx].seq = Some(store.fork(seq)?);
                self.rows[idx].base_seq = base.map(|b| store.fork(b)).transpose()?;
            }
        }
        for (&(idx, _), p) in order.iter().zip(picked) {
            let rng = self.rows[idx].rng.clone();
            self.accept(idx, rng, p.token, p.logprob)?;
        }
        self.next_work(store)
    }

    fn take_deltas(&mut self) -> Vec<TextDelta> {
        std::mem::take(&mut self.deltas)
    }

    fn finish_early(&mut self, _store: &mut SeqStore, reason: FinishReason) -> Result<()> {
        for (idx, row) in self.rows.iter_mut().enumerate() {
            if row.finish.is_some() {
                continue;
            }
            row.finish = Some(reason);
            // Text held back in case it began a stop string is final now.
            if row.text.len() > row.streamed && row.text.is_char_boundary(row.streamed) {
                self.deltas.push(TextDelta {
                    row: idx,
                    text: row.text[row.streamed..].to_string(),
                });
                row.streamed = row.text.len();
            }
        }
        Ok(())
    }

    fn outputs(&self) -> Vec<RowOutput> {
        self.rows
            .iter()
            .map(|r| {
                RowOutput::plain(
                    r.generated.clone(),
                    r.logprobs.clone(),
                    self.tokenizer.as_ref().map(|_| r.text.clone()),
                    r.finish.unwrap_or(FinishReason::Length),
                    r.prompt.len(),
                )
            })
            .collect()
    }
}
