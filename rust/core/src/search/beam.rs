//! Beam search with transformers' semantics (its vectorised `_beam_search`, transformers 5.x):
//! each step keeps the top `max(2, 1 + n_eos) * num_beams` continuations of all beams by summed
//! log-probability; those that hit a stopping criterion and rank within the top `num_beams`
//! may join the finished hypotheses, scored `sum_logprob / generated_len ** length_penalty`;
//! the best `num_beams` that did not stop run on. Scores are f32 and the `-1e9` masks are
//! added as there, so ties and near-ties resolve the same way.
//!
//! Beams are sequences: a surviving beam's first child takes its parent's sequence, the others
//! fork it (sharing the cached prefix), and beams without children are freed.

use std::sync::Arc;

use super::branch::Head;
use super::sampling::StopCriteria;
use super::{Advance, Candidate, FinishReason, RowOutput, Strategy, TextDelta};
use crate::error::{Error, Result};
use crate::kernels::cpu::parallel::map_parallel;
use crate::kv::{SeqId, SeqStore};
use crate::logits::{self, ColdParams};
use crate::lora::LoraAdapter;
use crate::text::{StopMatcher, Tokenizer};

/// When beam search stops (transformers' `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    /// Stop as soon as `num_beams` hypotheses have finished.
    True,
    /// Stop when the best running beam, at its current length, cannot beat the worst finished
    /// hypothesis (transformers' default heuristic).
    False,
    /// Stop only when no running beam can improve (the canonical rule; with a positive
    /// length penalty the best case is taken at the maximum length).
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamParams {
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    pub num_return_sequences: usize,
    pub cold: Option<ColdParams>,
}

impl Default for BeamParams {
    fn default() -> Self {
        Self {
            num_beams: 4,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            num_return_sequences: 1,
            cold: None,
        }
    }
}

impl BeamParams {
    pub fn validate(&self) -> Result<()> {
        if self.num_beams == 0 {
            return Err(Error::invalid("num_beams must be at least 1, got 0"));
        }
        if self.num_return_sequences == 0 || self.num_return_sequences > self.num_beams {
            return Err(Error::invalid(format!(
                "num_return_sequences must be in 1..=num_beams ({}), got {}",
                self.num_beams, self.num_return_sequences
            )));
        }
        if !self.length_penalty.is_finite() {
            return Err(Error::invalid(format!(
                "length_penalty must be finite, got {}",
                self.length_penalty
            )));
        }
        super::spec::check_token_scorer(&self.cold)
    }
}

const MASK: f32 = -1.0e9;

/// Tokens decoded before a stop string's length in tokens' worth: a token holds at least one
/// byte of text, so `longest + slack` tokens cover any stop string plus a partial character.
const STOP_TAIL_SLACK: usize = 4;

#[derive(Debug, Clone)]
struct Beam {
    head: Head,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    score: f32,
}

#[derive(Debug, Clone)]
struct Hypothesis {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    finish: FinishReason,
}

/// The beams of one prompt.
struct Group {
    prompt: Vec<u32>,
    adapter: Option<Arc<LoraAdapter>>,
    running: Vec<Beam>,
    /// `num_beams` slots, best first; `None` is transformers' empty `-1e9` slot.
    finished: Vec<(f32, Option<Hypothesis>)>,
    heuristic_unsatisfied: bool,
    done: bool,
    /// Why the generation ended the search before it finished (a timeout, the caller).
    cut_short: Option<FinishReason>,
}

pub(crate) struct BeamSearch {
    params: BeamParams,
    max_new_tokens: usize,
    eos: Vec<u32>,
    context: usize,
    /// Stop strings: a continuation whose text completes one finishes its beam, as an
    /// end-of-sequence token does (transformers' `StopStringCriteria`).
    stop: StopMatcher,
    tokenizer: Option<Arc<Tokenizer>>,
    adapters: Vec<Option<Arc<LoraAdapter>>>,
    groups: Vec<Group>,
    step: usize,
}

struct Cand {
    score: f32,
    beam: usize,
    token: u32,
    logprob: f32,
    hit: Option<FinishReason>,
}

impl BeamSearch {
    pub fn new(
        params: BeamParams,
        criteria: StopCriteria,
        tokenizer: Option<Arc<Tokenizer>>,
        adapters: Vec<Option<Arc<LoraAdapter>>>,
    ) -> Result<Self> {
        if !criteria.stop.strings().is_empty() && tokenizer.is_none() {
            return Err(Error::Tokenizer(
                "beam search with stop strings reads text and this model has no tokenizer".into(),
            ));
        }
        Ok(Self {
            params,
            max_new_tokens: criteria.max_new_tokens,
            eos: criteria.eos_token_ids,
            context: criteria.context,
            stop: criteria.stop,
            tokenizer,
            adapters,
            groups: Vec::new(),
            step: 0,
        })
    }

    /// The tail of a beam's `tokens` long enough for any stop string, and its text; `None`
    /// without stop strings. Decoded once per beam and step, for all of its candidates.
    fn stop_tail<'t>(&self, tokens: &'t [u32]) -> Result<Option<(&'t [u32], String)>> {
        let Some(tok) = &self.tokenizer else {
            return Ok(None);
        };
        let Some(longest) = self.stop.strings().iter().map(|s| s.len()).max() else {
            return Ok(None);
        };
        let tail = &tokens[tokens.len().saturating_sub(longest + STOP_TAIL_SLACK)..];
        Ok(Some((tail, tok.decode(tail, true)?)))
    }

    /// Whether appending `token` to the beam whose [`Self::stop_tail`] is `tail` completes a
    /// stop string.
    fn completes_stop(&self, tail: &Option<(&[u32], String)>, token: u32) -> Result<bool> {
        let (Some(tok), Some((tokens, before))) = (&self.tokenizer, tail) else {
            return Ok(false);
        };
        let mut with = tokens.to_vec();
        with.push(token);
        let after = tok.decode(&with, true)?;
        Ok(self.stop.find(&after).is_some() && self.stop.find(before).is_none())
    }

    /// The log-softmax of one beam's token scores (its logits, or under CoLD the contrastive
    /// scores) as the scores and their `(max, ln_sum)`: `lp[t] = scores[t] - max - ln_sum`.
    fn token_scores<'a>(
        &self,
        expert: &'a [f32],
        base: Option<&[f32]>,
    ) -> (std::borrow::Cow<'a, [f32]>, f32, f32) {
        let scores = match (&self.params.cold, base) {
            (Some(c), Some(b)) => std::borrow::Cow::Owned(logits::cold_scores(expert, b, c)),
            _ => std::borrow::Cow::Borrowed(expert),
        };
        let (max, ln_sum) = logits::log_normalizer(&scores);
        (scores, max, ln_sum)
    }

    /// One step of group `gi`: picks continuations, updates finished hypotheses, decides
    /// whether to go on.
    fn step_group(
        &mut self,
        gi: usize,
        store: &mut SeqStore,
        rows: Vec<(Vec<f32>, Option<Vec<f32>>)>,
    ) -> Result<()> {
        let p = self.params;
        let k = p.num_beams;
        let keep = (1 + self.eos.len()).max(2) * k;
        let g = &self.groups[gi];
        let prompt_len = g.prompt.len();
        let generated = g.running.first().map_or(0, |b| b.tokens.len()) + 1;
        // Each beam's best `keep` tokens as (token, log-probability under the scores, the
        // expert's own log-probability); beams on the team: a row is four scans of the
        // vocabulary, which otherwise leave the other threads idle between forward passes.
        let step = self.step;
        let best = map_parallel(rows, |(expert, base)| -> Result<Vec<(usize, f32, f32)>> {
            if !logits::all_finite(&expert) || !base.as_deref().is_none_or(logits::all_finite) {
                return Err(Error::NonFiniteLogits { row: gi, step });
            }
            let (scores, max, ln_sum) = self.token_scores(&expert, base.as_deref());
            // Under CoLD the reported log-probabilities are still the expert's own.
            let (e_max, e_ln_sum) = match p.cold {
                Some(_) => logits::log_normalizer(&expert),
                None => (max, ln_sum),
            };
            Ok(logits::top_k_indices(&scores, keep)
                .into_iter()
                // As torch's log_softmax rounds it: (x - max) - ln_sum.
                .map(|t| (t, scores[t] - max - ln_sum, expert[t] - e_max - e_ln_sum))
                .collect())
        });
        let mut cands: Vec<Cand> = Vec::with_capacity(keep * best.len());
        for (bi, tokens) in best.into_iter().enumerate() {
            let beam_score = g.running[bi].score;
            let tail = self.stop_tail(&g.running[bi].tokens)?;
            for (t, lp_t, logprob) in tokens? {
                let hit = if self.eos.contains(&(t as u32)) {
                    Some(FinishReason::Eos)
                } else if self.completes_stop(&tail, t as u32)? {
                    Some(FinishReason::Stop)
                } else if generated >= self.max_new_tokens {
                    Some(FinishReason::Length)
                } else if prompt_len + generated >= self.context {
                    Some(FinishReason::Context)
                } else {
                    None
                };
                cands.push(Cand {
                    score: lp_t + beam_score,
                    beam: bi,
                    token: t as u32,
                    logprob,
                    hit,
                });
            }
        }
        // torch.topk over the flattened [num_beams * vocab] scores: best first, and on equal
        // scores the smaller flat index (beam, then token) first.
        cands.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(a.beam.cmp(&b.beam))
                .then(a.token.cmp(&b.token))
        });
        cands.truncate(keep);

        // Finished hypotheses: only hits among the top `num_beams` may enter.
        let g = &mut self.groups[gi];
        let all_finished = g.finished.iter().all(|f| f.1.is_some());
        let divisor = length_divisor(generated, p.length_penalty);
        let mut merged: Vec<(f32, Option<Hypothesis>)> = std::mem::take(&mut g.finished);
        for (ci, c) in cands.iter().enumerate() {
            let mut s = c.score / divisor;
            if all_finished && p.early_stopping == EarlyStopping::True {
                s += MASK;
            }
            if !g.heuristic_unsatisfied {
                s += MASK;
            }
            let eligible = c.hit.is_some() && ci < k;
            if !eligible {
                s += MASK;
            }
            let hyp = eligible.then(|| {
                let parent = &g.running[c.beam];
                let mut tokens = parent.tokens.clone();
                tokens.push(c.token);
                let mut logprobs = parent.logprobs.clone();
                logprobs.push(c.logprob);
                Hypothesis {
                    tokens,
                    logprobs,
                    finish: c.hit.unwrap_or(FinishReason::Length),
                }
            });
            merged.push((s, hyp));
        }
        let order = stable_top(merged.iter().map(|m| m.0), k);
        g.finished = order.into_iter().map(|i| merged[i].clone()).collect();

        // Running beams: the best `num_beams` continuations, the stopped ones masked.
        let masked: Vec<f32> = cands
            .iter()
            .map(|c| c.score + if c.hit.is_some() { MASK } else { 0.0 })
            .collect();
        let next = stable_top(masked.iter().copied(), k);
        let all_hit = cands.iter().all(|c| c.hit.is_some());

        // transformers' stopping rule, evaluated on the new running beams.
        let best_len = if p.early_stopping == EarlyStopping::Never && p.length_penalty > 0.0 {
            self.max_new_tokens
        } else {
            generated
        };
        let best_running = next.first().map_or(f32::NEG_INFINITY, |&i| masked[i])
            / length_divisor(best_len, p.length_penalty);
        let worst_finished = g.finished.iter().map(|f| f.0).fold(f32::INFINITY, f32::min);
        let improvement = g.finished.iter().any(|f| {
            let worst = if f.1.is_some() { worst_finished } else { MASK };
            best_running > worst
        });
        g.heuristic_unsatisfied &= improvement;
        let full = g.finished.iter().all(|f| f.1.is_some());
        let open_beam = !(full && p.early_stopping == EarlyStopping::True);
        g.done = !(g.heuristic_unsatisfied && open_beam && !all_hit);
        if g.done {
            for b in &g.running {
                b.head.free(store);
            }
            g.running.clear();
            return Ok(());
        }

        let mut children_left: Vec<usize> = vec![0; g.running.len()];
        for &ci in &next {
            children_left[cands[ci].beam] += 1;
        }
        for (bi, beam) in g.running.iter().enumerate() {
            if children_left[bi] == 0 {
                beam.head.free(store);
            }
        }
        let mut running = Vec::with_capacity(k);
        for &ci in &next {
            let c = &cands[ci];
            let parent = &g.running[c.beam];
            children_left[c.beam] -= 1;
            // The last child takes the parent's own sequence; the others fork it.
            let head = if children_left[c.beam] == 0 {
                parent.head
            } else {
                parent.head.fork(store)?
            };
            let mut tokens = parent.tokens.clone();
            tokens.push(c.token);
            let mut logprobs = parent.logprobs.clone();
            logprobs.push(c.logprob);
            running.push(Beam {
                head,
                tokens,
                logprobs,
                score: masked[ci],
            });
        }
        g.running = running;
        Ok(())
    }

    /// A hypothesis's text, cut before its stop string (its tokens keep the one completing it).
    fn hypothesis_text(&self, h: &Hypothesis) -> Result<Option<String>> {
        let Some(tok) = &self.tokenizer else {
            return Ok(None);
        };
        let mut text = tok.decode(&h.tokens, true)?;
        if h.finish == FinishReason::Stop {
            if let Some(at) = self.stop.find(&text) {
                text.truncate(at);
            }
        }
        Ok(Some(text))
    }
}

/// transformers' length normalisation: a hypothesis scores `sum_logprob / len ** length_penalty`.
fn length_divisor(len: usize, length_penalty: f32) -> f32 {
    ((len as f64).powf(length_penalty as f64)) as f32
}

/// Indices of the `k` largest of `xs`, best first, the earlier one first on ties.
fn stable_top(xs: impl Iterator<Item = f32>, k: usize) -> Vec<usize> {
    let v: Vec<f32> = xs.collect();
    logits::top_k_indices(&v, k)
}

impl Strategy for BeamSearch {
    fn start(&mut self, store: &mut SeqStore, prompts: &[Vec<u32>]) -> Result<Vec<Advance>> {
        let k = self.params.num_beams;
        let mut work = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let adapter = super::adapter_for(&self.adapters, i);
            let head = Head::create(store, self.params.cold.is_some());
            let g = Group {
                prompt: p.clone(),
                adapter,
                // transformers starts with beam 0 at 0 and the others at -1e9: with at least
                // 2 * num_beams candidates from beam 0, only beam 0 matters in the first step.
                running: vec![Beam {
                    head,
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    score: 0.0,
                }],
                finished: vec![(MASK, None); k],
                heuristic_unsatisfied: true,
                done: false,
                cut_short: None,
            };
            work.extend(Advance::with_twin(head.seq, head.base, &g.adapter, p));
            self.groups.push(g);
        }
        Ok(work)
    }

    fn consume(
        &mut self,
        store: &mut SeqStore,
        logits: Vec<(SeqId, Vec<f32>)>,
    ) -> Result<Vec<Advance>> {
        let mut by_seq: std::collections::HashMap<SeqId, Vec<f32>> = logits.into_iter().collect();
        for gi in 0..self.groups.len() {
            if self.groups[gi].done {
                continue;
            }
            let mut rows = Vec::with_capacity(self.groups[gi].running.len());
            for b in &self.groups[gi].running {
                let mut take = |seq: SeqId| {
                    by_seq
                        .remove(&seq)
                        .ok_or_else(|| Error::invalid(format!("no logits for beam sequence {seq}")))
                };
                let e = take(b.head.seq)?;
                let base = b.head.base.map(&mut take).transpose()?;
                rows.push((e, base));
            }
            self.step_group(gi, store, rows)?;
        }
        self.step += 1;
        let mut work = Vec::new();
        for g in &self.groups {
            if g.done {
                continue;
            }
            for b in &g.running {
                let last: Vec<u32> = b.tokens.last().copied().into_iter().collect();
                work.extend(Advance::with_twin(
                    b.head.seq,
                    b.head.base,
                    &g.adapter,
                    &last,
                ));
            }
        }
        Ok(work)
    }

    fn take_deltas(&mut self) -> Vec<TextDelta> {
        Vec::new()
    }

    fn finish_early(&mut self, _store: &mut SeqStore, reason: FinishReason) -> Result<()> {
        let (k, lp) = (self.params.num_beams, self.params.length_penalty);
        for g in self.groups.iter_mut().filter(|g| !g.done) {
            // The running beams compete with the finished hypotheses on the same score.
            let mut merged = std::mem::take(&mut g.finished);
            for b in g.running.drain(..).filter(|b| !b.tokens.is_empty()) {
                let divisor = length_divisor(b.tokens.len(), lp);
                let hyp = Hypothesis {
                    tokens: b.tokens,
                    logprobs: b.logprobs,
                    finish: reason,
                };
                merged.push((b.score / divisor, Some(hyp)));
            }
            let order = stable_top(merged.iter().map(|m| m.0), k);
            g.finished = order.into_iter().map(|i| merged[i].clone()).collect();
            g.done = true;
            g.cut_short = Some(reason);
        }
        Ok(())
    }

    fn outputs(&self) -> Vec<RowOutput> {
        let n = self.params.num_return_sequences;
        self.groups
            .iter()
            .map(|g| {
                let candidates: Vec<Candidate> = g
                    .finished
                    .iter()
                    .filter_map(|f| f.1.as_ref().map(|h| (f.0, h)))
                    .take(n)
                    .map(|(score, h)| Candidate {
                        token_ids: h.tokens.clone(),
                        logprobs: h.logprobs.clone(),
                        text: self.hypothesis_text(h).ok().flatten(),
                        finish_reason: h.finish,
                        score: score as f64,
                        answer: None,
                        step_scores: Vec::new(),
                    })
                    .collect();
                let mut out = match candidates.first() {
                    Some(best) => {
                        let mut out = RowOutput::from_candidate(best, g.prompt.len());
                        out.candidates = candidates;
                        out
                    }
                    None => RowOutput::plain(
                        Vec::new(),
                        Vec::new(),
                        None,
                        FinishReason::Length,
                        g.prompt.len(),
                    ),
                };
                if let Some(reason) = g.cut_short {
                    out.finish_reason = reason;
                }
                out
            })
            .collect()
    }
}
