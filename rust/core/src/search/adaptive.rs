//! Difficulty-adaptive compute over a list of questions (after Snell et al. 2024): `probe`
//! samples per question, difficulty from how much their answers disagree, questions binned by
//! difficulty quantile, and the rest of the token budget spent on the unsettled questions,
//! harder bins getting more samples; then every question votes.

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
        let most = jobs
            .iter()
            .map(|j| params.probe * j.max_new_tokens)
            .sum::<usize>();
        if params.budget_tokens < most {
            return Err(Error::invalid(format!(
                "budget_tokens ({}) must cover the probes: {} questions x probe {} x \
                 max_new_tokens = {most}",
                params.budget_tokens,
                jobs.len(),
                params.probe
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

    /// Splits what is left of the budget over the unsettled questions.
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
        // Rank by difficulty (1 - agreement), easiest first; equal ones keep question order.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| self.agreement[b].total_cmp(&self.agreement[a]));
        let bins = self.params.bins.min(n).max(1);
        let mut weight = vec![0.0f64; n];
        for (rank, &q) in order.iter().enumerate() {
            let settled = self.agreement[q] >= 1.0;
            if !settled {
                weight[q] = (rank * bins / n + 1) as f64;
            }
        }
        let mean_len = |q: usize| {
            let c = &self.candidates[q];
            let total: usize = c.iter().map(|c| c.token_ids.len().max(1)).sum();
            total as f64 / c.len().max(1) as f64
        };
        let left = self.params.budget_tokens.saturating_sub(self.generated) as f64;
        let cost: f64 = (0..n).map(|q| weight[q] * mean_len(q)).sum();
        (0..n)
            .map(|q| {
                if cost <= 0.0 || weight[q] == 0.0 {
                    return 0;
                }
                let extra = (left * weight[q] / cost).floor() as usize;
                extra.min(self.params.max_n - probe)
            })
            .collect()
    }
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
