//! Best-of-N: the prompt is run once and forked `n` ways, every candidate is sampled to the end
//! in the same forward passes, and the scorer picks one.

use std::sync::Arc;

use std::collections::HashMap;

use super::branch::{BranchId, Finished};
use super::driver::{spec, Cx, Search};
use super::spec::{BestOfNParams, Ranking};
use super::verify::{Grader, Taken};
use super::{Candidate, FinishReason, RowOutput};
use crate::error::{Error, Result};
use crate::lora::LoraAdapter;

/// What every search over one prompt shares: the prompt, its adapter and the limits of a
/// completion.
#[derive(Debug, Clone)]
pub(crate) struct PromptJob {
    pub prompt: Arc<Vec<u32>>,
    pub adapter: Option<Arc<LoraAdapter>>,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
}

impl PromptJob {
    /// Whether a step that ends a path of `path_len` generated tokens ends the whole answer: an
    /// end-of-sequence token, a full context, one of the caller's stop strings (not the step
    /// delimiter), or the generation's `max_new_tokens` spent.
    pub fn ends_answer(&self, step: &Finished, path_len: usize) -> bool {
        let at_callers_stop = step.finish == FinishReason::Stop
            && step
                .full_text
                .get(step.text.len()..)
                .is_some_and(|rest| self.stop.iter().any(|s| rest.starts_with(s.as_str())));
        matches!(step.finish, FinishReason::Eos | FinishReason::Context)
            || at_callers_stop
            || self.room(path_len) == 0
    }

    /// Tokens a path of `path_len` generated tokens may still add: `max_new_tokens` bounds the
    /// whole path, not each step.
    pub fn room(&self, path_len: usize) -> usize {
        self.max_new_tokens.saturating_sub(path_len)
    }

    /// Starts the prompt's prefill on a new sequence: a branch that only feeds it.
    pub fn prefill(&self, cx: &mut Cx<'_>) -> Result<BranchId> {
        let head = cx.new_head();
        cx.feed_only(head, self.adapter.clone(), self.prompt.to_vec())
    }

    /// Forks `n` completions (random streams `0..n`) off a fed prompt, the last one taking the
    /// prompt's own sequence; returns the branches in order.
    pub fn fork_completions(
        &self,
        cx: &mut Cx<'_>,
        fed: &Finished,
        n: usize,
        sampling: crate::logits::SamplingParams,
    ) -> Result<Vec<BranchId>> {
        let logits = fed
            .logits
            .as_ref()
            .ok_or_else(|| Error::invalid("prefill finished without logits"))?;
        let ids = cx.continue_from(fed.head, logits, &self.adapter, n, false, |i| {
            spec(
                self.max_new_tokens,
                self.stop.clone(),
                sampling,
                i as u64,
                self.prompt.clone(),
            )
        })?;
        Ok(ids)
    }
}

/// A finished branch as a candidate (its sequences freed).
pub(crate) fn candidate(done: &Finished, cx: &mut Cx<'_>, score: f64) -> Candidate {
    done.head.free(cx.store);
    Candidate {
        token_ids: done.tokens.clone(),
        logprobs: done.logprobs.clone(),
        text: cx.pool.tokenizer().map(|_| done.text.clone()),
        finish_reason: done.finish,
        score,
        answer: None,
        step_scores: Vec::new(),
    }
}

/// Index of the highest score; the first one on ties.
pub(crate) fn best_index(scores: impl IntoIterator<Item = f64>) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, s) in scores.into_iter().enumerate() {
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

/// Checks a callback's number.
pub(crate) fn finite(what: &str, value: f64) -> Result<f64> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Error::Callback {
            what: what.to_string(),
            message: format!("returned {value}, expected a finite number"),
        })
    }
}

pub(crate) struct BestOfN {
    job: PromptJob,
    params: BestOfNParams,
    /// Candidates in the order of their streams, filled as they finish.
    done: Vec<Option<Finished>>,
    slots: HashMap<BranchId, usize>,
    candidates: Vec<Candidate>,
    chosen: Option<usize>,
    /// With a verifier ranking: the grader.
    grader: Option<Grader>,
    /// Each candidate's step probabilities under the verifier, once scored.
    verified: Vec<Option<Vec<f64>>>,
}

impl BestOfN {
    pub fn new(job: PromptJob, params: BestOfNParams) -> Self {
        let grader = match &params.ranking {
            Ranking::Verifier(v) => Some(Grader::new(v.clone(), &job)),
            _ => None,
        };
        Self {
            job,
            done: vec![None; params.n],
            verified: vec![None; params.n],
            slots: HashMap::new(),
            params,
            candidates: Vec::new(),
            chosen: None,
            grader,
        }
    }

    fn all_in(&self) -> bool {
        self.done.iter().all(Option::is_some)
            && (self.grader.is_none() || self.verified.iter().all(Option::is_some))
    }

    fn rank(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        let prompt_text = match &self.params.ranking {
            Ranking::Callback(_) => cx.decode(&self.job.prompt)?,
            _ => String::new(),
        };
        let done: Vec<Finished> = self.done.iter_mut().filter_map(Option::take).collect();
        // A callback scores every candidate in one call.
        let called = match &self.params.ranking {
            Ranking::Callback(f) => {
                let texts: Vec<&str> = done.iter().map(|d| d.text.as_str()).collect();
                f.call_many("scorer", &prompt_text, &texts)?
            }
            _ => Vec::new(),
        };
        for (i, d) in done.iter().enumerate() {
            let score = match &self.params.ranking {
                Ranking::MeanLogprob => d.mean_score(),
                Ranking::SumLogprob => d.sum_score(),
                Ranking::Callback(_) => called[i],
                Ranking::Verifier(_) => match (&self.grader, &self.verified[i]) {
                    (Some(g), Some(steps)) => g.aggregate(steps),
                    _ => 0.0,
                },
            };
            let mut c = candidate(d, cx, score);
            c.step_scores = self.verified[i].take().unwrap_or_default();
            self.candidates.push(c);
        }
        if let Some(g) = &mut self.grader {
            g.release(cx);
        }
        self.chosen = best_index(self.candidates.iter().map(|c| c.score));
        Ok(())
    }
}

impl Search for BestOfN {
    fn start(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        self.job.prefill(cx)?;
        if let Some(g) = &mut self.grader {
            g.start(cx)?;
        }
        Ok(())
    }

    fn on_finished(&mut self, done: Finished, cx: &mut Cx<'_>) -> Result<()> {
        if let Some(g) = &mut self.grader {
            match g.on_finished(&done, cx)? {
                Taken::No => {}
                Taken::Own => return Ok(()),
                Taken::Scored(scored) => {
                    cx.store.free(scored.seq);
                    self.verified[scored.key] = Some(scored.steps);
                    return if self.all_in() { self.rank(cx) } else { Ok(()) };
                }
            }
        }
        if done.logits.is_some() {
            let ids = self
                .job
                .fork_completions(cx, &done, self.params.n, self.params.sampling)?;
            self.slots = ids.into_iter().enumerate().map(|(i, id)| (id, i)).collect();
            return Ok(());
        }
        let slot = self
            .slots
            .get(&done.id)
            .copied()
            .ok_or_else(|| Error::invalid(format!("best-of-N: unknown branch {}", done.id)))?;
        if let Some(g) = &mut self.grader {
            g.request(cx, slot, None, &done.tokens, Some(done.head.seq))?;
        }
        self.done[slot] = Some(done);
        if self.all_in() {
            self.rank(cx)?;
        }
        Ok(())
    }

    fn on_cut_short(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        if let Some(g) = &mut self.grader {
            g.release(cx);
        }
        Ok(())
    }

    fn outputs(&self) -> Vec<RowOutput> {
        let prompt_tokens = self.job.prompt.len();
        let Some(best) = self.chosen.and_then(|i| self.candidates.get(i)) else {
            // Cut short by a timeout: the finished candidate of best mean log-probability
            // (a scorer only ranks a complete set), or nothing when none finished.
            let best = self
                .done
                .iter()
                .flatten()
                .max_by(|a, b| a.mean_score().total_cmp(&b.mean_score()));
            let (tokens, logprobs) = best
                .map(|d| (d.tokens.clone(), d.logprobs.clone()))
                .unwrap_or_default();
            return vec![RowOutput::plain(
                tokens,
                logprobs,
                None,
                FinishReason::Timeout,
                prompt_tokens,
            )];
        };
        let mut out = RowOutput::from_candidate(best, prompt_tokens);
        out.candidates = self.candidates.clone();
        vec![out]
    }
}
