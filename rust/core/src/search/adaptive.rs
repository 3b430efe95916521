//! Difficulty-adaptive compute over a list of questions (after Snell et al. 2024): `probe`
//! samples per question, difficulty from how much their answers disagree, questions binned by
//! difficulty quantile (by value: equally hard questions share a bin, whatever their order), and
//! the rest of the token budget spent on the unsettled questions, harder bins getting more
//! samples; questions whose probes all agree get none beyond `min_n`; then every question votes.

use std::collections::HashMap;

use super::answers::{extract, tally};
use super::best_of_n::{candidate, PromptJob};
use super::branch::{BranchId, Finished, Head, HeadLogits};
use super::driver::{spec, Cx, Search};
use super::self_consistency::vote_output;
use super::spec::AdaptiveParams;
use super::{Candidate, RowOutput};
use crate::error::{Error, Result};

pub(crate) struct Adaptive {
    jobs: Vec<PromptJob>,
    params: AdaptiveParams,
    roots: Vec<Option<(Head, HeadLogits)>>,
    prefills: HashMap<BranchId, usize>,
    samples: HashMap<BranchId, usize>,
    candidates: Vec<Vec<Candidate>>,
    spent: Vec<usize>,
    generated: usize,
    /// 0: probing, 1: spending the rest, 2: done.
    phase: u8,
    /// Per question: the share of probes that agree with the leading answer.
    pub agreement: Vec<f64>,
}

impl Adaptive {
    pub fn new(jobs: Vec<PromptJob>, params: AdaptiveParams) -> Result<Self> {
        let first = params.probe.max(params.min_n);
        let most = jobs.iter().map(|j| first * j.max_new_tokens).sum::<usize>();
        if params.budget_tokens < most {
            return Err(Error::invalid(format!(
                "budget_tokens ({}) must cover every question's first samples: {} questions x \
                 max(probe, min_n) {first} x max_new_tokens = {most}",
                params.budget_tokens,
                jobs.len(),
            )));
        }
        let n = jobs.len();
        Ok(Self {
            jobs,
            params,
            roots: vec![None; n],
            prefills: HashMap::new(),
            samples: HashMap::new(),
            candidates: vec![Vec::new(); n],
            spent: vec![0; n],
            generated: 0,
            phase: 0,
            agreement: Vec::new(),
        })
    }

    fn sample(&mut self, q: usize, count: usize, cx: &mut Cx<'_>) -> Result<()> {
        let Some((head, logits)) = self.roots[q].clone() else {
            return Err(Error::invalid("adaptive: question not fed"));
        };
        let first = self.candidates[q].len() + self.samples.values().filter(|&&x| x == q).count();
        let job = &self.jobs[q];
        let ids = cx.continue_from(head, &logits, &job.adapter, count, true, |i| {
            spec(
                job.max_new_tokens,
                job.stop.clone(),
                self.params.sampling,
                (first + i) as u64,
                job.prompt.clone(),
            )
        })?;
        self.samples.extend(ids.into_iter().map(|id| (id, q)));
        Ok(())
    }

    /// Splits what is left of the budget: first `min_n` samples for every question, then the
    /// rest over the unsettled ones by difficulty bin.
    fn allocate(&mut self) -> Vec<usize> {
        let n = self.jobs.len();
        let probe = self.params.probe;
        self.agreement = self
            .candidates
            .iter()
            .map(|c| {
                let votes = tally(c.iter().map(|c| (c.answer.as_deref(), 1.0)));
                votes.first().map_or(0.0, |v| v.1 / probe as f64)
            })
            .collect();
        let weight = bin_weights(&self.agreement, self.params.bins);
        let mean_len = |q: usize| {
            let c = &self.candidates[q];
            let total: usize = c.iter().map(|c| c.token_ids.len().max(1)).sum();
            total as f64 / c.len().max(1) as f64
        };
        let floor = self.params.min_n.saturating_sub(probe);
        let reserved: f64 = (0..n).map(|q| floor as f64 * mean_len(q)).sum();
        let left =
            (self.params.budget_tokens.saturating_sub(self.generated) as f64 - reserved).max(0.0);
        let cost: f64 = (0..n).map(|q| weight[q] * mean_len(q)).sum();
        (0..n)
            .map(|q| {
                let extra = if cost <= 0.0 || weight[q] == 0.0 {
                    0
                } else {
                    (left * weight[q] / cost).floor() as usize
                };
                (floor + extra).min(self.params.max_n - probe)
            })
            .collect()
    }
}

/// Each question's share of the extra samples from its probes' agreement with their leading
/// answer: 0 when they all agree, else `1 + bin`, its bin among `bins` difficulty quantiles
/// counted by value (the questions strictly easier than it), so that questions of equal
/// agreement get equal shares whatever their order.
fn bin_weights(agreement: &[f64], bins: usize) -> Vec<f64> {
    let n = agreement.len();
    let bins = bins.min(n).max(1);
    agreement
        .iter()
        .map(|&a| {
            if a >= 1.0 {
                return 0.0;
            }
            let easier = agreement.iter().filter(|&&b| b > a).count();
            (easier * bins / n + 1) as f64
        })
        .collect()
}

impl Search for Adaptive {
    fn start(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        for q in 0..self.jobs.len() {
            let id = self.jobs[q].prefill(cx)?;
            self.prefills.insert(id, q);
        }
        Ok(())
    }

    fn on_finished(&mut self, done: Finished, cx: &mut Cx<'_>) -> Result<()> {
        let twins = 1 + usize::from(done.head.base.is_some());
        if let Some(q) = self.prefills.remove(&done.id) {
            self.spent[q] += twins * self.jobs[q].prompt.len();
            let logits = done
                .logits
                .clone()
                .ok_or_else(|| Error::invalid("adaptive: prefill without logits"))?;
            self.roots[q] = Some((done.head, logits));
            return self.sample(q, self.params.probe, cx);
        }
        let q = self
            .samples
            .remove(&done.id)
            .ok_or_else(|| Error::invalid(format!("adaptive: unknown branch {}", done.id)))?;
        self.spent[q] += twins * done.tokens.len().saturating_sub(1);
        self.generated += done.tokens.len();
        let answer = extract(&self.params.extract, &done.text)?;
        let mut c = candidate(&done, cx, 1.0);
        c.answer = answer;
        self.candidates[q].push(c);
        Ok(())
    }

    fn on_idle(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        match self.phase {
            0 => {
                self.phase = 1;
                let extra = self.allocate();
                for (q, &e) in extra.iter().enumerate() {
                    if e > 0 {
                        self.sample(q, e, cx)?;
                    }
                }
                if self.samples.is_empty() {
                    self.on_idle(cx)?;
                }
            }
            1 => {
                self.phase = 2;
                for root in self.roots.iter_mut() {
                    if let Some((h, _)) = root.take() {
                        h.free(cx.store);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn outputs(&self) -> Vec<RowOutput> {
        self.jobs
            .iter()
            .enumerate()
            .map(|(q, job)| {
                let c = &self.candidates[q];
                let votes = tally(c.iter().map(|c| (c.answer.as_deref(), 1.0)));
                let mut out = vote_output(c, &votes, job.prompt.len());
                out.tokens_spent = self.spent[q];
                out
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::bin_weights;

    #[test]
    fn equal_agreement_gets_an_equal_share_whatever_the_order() {
        // Unanimous questions get nothing; the rest by the number of questions easier than them.
        let w = bin_weights(&[0.5, 1.0, 0.5, 0.25, 0.5, 0.75], 3);
        assert_eq!(w, vec![2.0, 0.0, 2.0, 3.0, 2.0, 1.0]);
        let mut shuffled = vec![0.25, 0.5, 0.75, 1.0, 0.5, 0.5];
        let ws = bin_weights(&shuffled, 3);
        for (a, w) in shuffled.drain(..).zip(ws) {
            // 1 + (questions easier) * 3 / 6: one is easier than 0.75, two than 0.5, five than 0.25.
            let expected = [(1.0, 0.0), (0.75, 1.0), (0.5, 2.0), (0.25, 3.0)]
                .iter()
                .find(|(agreement, _)| *agreement == a)
                .map(|(_, w)| *w);
            let expected = expected.unwrap_or(f64::NAN);
            assert_eq!(w, expected, "agreement {a}");
        }
    }
}
