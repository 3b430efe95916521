//! Self-consistency (Wang et al. 2023): sample several reasoning paths, extract each one's
//! answer, vote. With `stop_when_confident` it samples in rounds and stops as soon as
//! Adaptive-Consistency's Beta rule is sure enough of the leading answer.

use std::collections::HashMap;

use super::answers::{beta_confidence, extract, tally, Vote};
use super::best_of_n::{candidate, PromptJob};
use super::branch::{BranchId, Finished, Head, HeadLogits};
use super::driver::{Cx, Search};
use super::spec::SelfConsistencyParams;
use super::verify::{Grader, Taken};
use super::{Candidate, RowOutput};
use crate::error::{Error, Result};

pub(crate) struct SelfConsistency {
    job: PromptJob,
    params: SelfConsistencyParams,
    root: Option<(Head, HeadLogits)>,
    spawned: usize,
    slots: HashMap<BranchId, usize>,
    round: Vec<Option<Finished>>,
    candidates: Vec<Candidate>,
    votes: Vec<(String, f64)>,
    /// The Beta rule's confidence after each round (with `stop_when_confident`).
    pub confidence: Vec<f64>,
    /// With a verifier weight: the grader and the round's scores as they come.
    grader: Option<Grader>,
    verified: Vec<Option<Vec<f64>>>,
}

impl SelfConsistency {
    pub fn new(job: PromptJob, params: SelfConsistencyParams) -> Self {
        Self {
            root: None,
            spawned: 0,
            slots: HashMap::new(),
            round: Vec::new(),
            candidates: Vec::new(),
            votes: Vec::new(),
            confidence: Vec::new(),
            grader: params.verifier.clone().map(|v| Grader::new(v, &job)),
            verified: Vec::new(),
            job,
            params,
        }
    }

    fn round_complete(&self) -> bool {
        self.round.iter().all(Option::is_some)
            && (self.grader.is_none() || self.verified.iter().all(Option::is_some))
    }

    fn next_round(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        let size = match self.params.stop_when_confident {
            Some(_) => self.params.round_size,
            None => self.params.n,
        }
        .min(self.params.n - self.spawned);
        let Some((head, logits)) = &self.root else {
            return Err(Error::invalid("self-consistency: prompt not fed"));
        };
        let (head, logits) = (*head, logits.clone());
        let first = self.spawned;
        let ids = cx.continue_from(head, &logits, &self.job.adapter, size, true, |i| {
            super::driver::spec(
                self.job.max_new_tokens,
                self.job.stop.clone(),
                self.params.sampling,
                (first + i) as u64,
                self.job.prompt.clone(),
            )
        })?;
        self.round = vec![None; size];
        self.verified = vec![None; size];
        self.slots = ids.into_iter().enumerate().map(|(i, id)| (id, i)).collect();
        self.spawned += size;
        Ok(())
    }

    /// The vote weight of each finished sample of the round (a callback weighs all of them in
    /// one call).
    fn weigh(&self, done: &[(usize, Finished)], prompt_text: &str) -> Result<Vec<f64>> {
        if let Some(g) = &self.grader {
            // A sample cut short before its score arrived weighs nothing.
            return Ok(done
                .iter()
                .map(|(slot, _)| {
                    self.verified
                        .get(*slot)
                        .and_then(Option::as_ref)
                        .map_or(0.0, |steps| g.aggregate(steps))
                })
                .collect());
        }
        Ok(match (&self.params.vote, &self.params.weight) {
            (Vote::Majority, _) => vec![1.0; done.len()],
            (Vote::Weighted, None) => done.iter().map(|(_, d)| d.mean_score().exp()).collect(),
            (Vote::Weighted, Some(f)) => {
                let texts: Vec<&str> = done.iter().map(|(_, d)| d.text.as_str()).collect();
                f.call_many("scorer", prompt_text, &texts)?
            }
        })
    }

    /// The samples of the current round that finished become candidates with their answers.
    fn absorb_round(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        let prompt_text = match &self.params.weight {
            Some(_) if self.params.vote == Vote::Weighted => cx.decode(&self.job.prompt)?,
            _ => String::new(),
        };
        let done: Vec<(usize, Finished)> = self
            .round
            .iter_mut()
            .enumerate()
            .filter_map(|(i, d)| Some((i, d.take()?)))
            .collect();
        let weights = self.weigh(&done, &prompt_text)?;
        for ((slot, d), weight) in done.iter().zip(weights) {
            let answer = extract(&self.params.extract, &d.text)?;
            let mut c = candidate(d, cx, weight);
            c.answer = answer;
            c.step_scores = self
                .verified
                .get(*slot)
                .cloned()
                .flatten()
                .unwrap_or_default();
            self.candidates.push(c);
        }
        Ok(())
    }

    fn finish_round(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        self.absorb_round(cx)?;
        let more = self.spawned < self.params.n;
        let settled = match self.params.stop_when_confident {
            Some(threshold) => {
                let counts = tally(self.candidates.iter().map(|c| (c.answer.as_deref(), 1.0)));
                let top = counts.first().map_or(0, |c| c.1 as usize);
                let second = counts.get(1).map_or(0, |c| c.1 as usize);
                let conf = beta_confidence(top, second);
                self.confidence.push(conf);
                top > 0 && conf >= threshold
            }
            None => false,
        };
        if more && !settled {
            return self.next_round(cx);
        }
        self.vote(cx);
        Ok(())
    }

    /// Tallies the candidates' answers and frees the prompt.
    fn vote(&mut self, cx: &mut Cx<'_>) {
        if let Some((head, _)) = self.root.take() {
            head.free(cx.store);
        }
        if let Some(g) = &mut self.grader {
            g.release(cx);
        }
        self.votes = tally(
            self.candidates
                .iter()
                .map(|c| (c.answer.as_deref(), c.score)),
        );
    }
}

impl Search for SelfConsistency {
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
                    return if self.round_complete() {
                        self.finish_round(cx)
                    } else {
                        Ok(())
                    };
                }
            }
        }
        if let Some(logits) = done.logits.clone() {
            self.root = Some((done.head, logits));
            return self.next_round(cx);
        }
        let slot = self.slots.get(&done.id).copied().ok_or_else(|| {
            Error::invalid(format!("self-consistency: unknown branch {}", done.id))
        })?;
        if let Some(g) = &mut self.grader {
            g.request(cx, slot, None, &done.tokens, Some(done.head.seq))?;
        }
        self.round[slot] = Some(done);
        if self.round_complete() {
            self.finish_round(cx)?;
        }
        Ok(())
    }

    /// The vote over every sample that finished, those of the unfinished round included.
    fn on_cut_short(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        self.absorb_round(cx)?;
        self.vote(cx);
        Ok(())
    }

    fn outputs(&self) -> Vec<RowOutput> {
        vec![vote_output(
            &self.candidates,
            &self.votes,
            self.job.prompt.len(),
        )]
    }
}

/// The output of a vote: the first candidate that gave the winning answer (or the first
/// candidate when none answered), with every candidate and the votes.
pub(crate) fn vote_output(
    candidates: &[Candidate],
    votes: &[(String, f64)],
    prompt_tokens: usize,
) -> RowOutput {
    let winner = votes.first().map(|v| v.0.clone());
    let chosen = candidates
        .iter()
        .find(|c| c.answer.is_some() && c.answer == winner)
        .or_else(|| candidates.first());
    let mut out = match chosen {
        Some(c) => RowOutput::from_candidate(c, prompt_tokens),
        None => RowOutput::plain(
            Vec::new(),
            Vec::new(),
            None,
            super::FinishReason::Length,
            prompt_tokens,
        ),
    };
    out.answer = winner;
    out.votes = votes.to_vec();
    out.candidates = candidates.to_vec();
    out
}
