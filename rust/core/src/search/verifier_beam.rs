//! Verifier-guided step-level search, as search-and-learn runs it (Snell et al. 2024; Beeching
//! et al. 2024): PRM beam search and diverse verifier tree search (DVTS).
//!
//! Every step samples `n` next steps (text up to the step delimiter) from the kept beams, the
//! verifier scores each new step, and the best `n / beam_width` continue, each sampled
//! `beam_width` times at the next step. DVTS splits the `n` samples into `n / beam_width`
//! independent subtrees that each keep only their best sample. A beam whose step ends the answer
//! (end of sequence, a caller's stop string, the token budget) is finished; the search ends when
//! no beam is left or after `max_steps` steps. The answer is the weighted majority of the
//! finished beams, each weighted by its verifier score.
//!
//! A sample's scoring row and the feed of its last token (so that a kept beam forks without
//! running again) share the pass after the sample ends, so the verifier costs rows, not passes.

use std::collections::HashMap;
use std::sync::Arc;

use super::answers::{extract, tally};
use super::best_of_n::PromptJob;
use super::branch::{BranchId, Finished, Head, HeadLogits};
use super::driver::{spec, Cx, Search};
use super::self_consistency::vote_output;
use super::spec::VerifierSearchParams;
use super::verify::{Grader, Taken};
use super::{Candidate, FinishReason, RowOutput};
use crate::error::{Error, Result};
use crate::kv::SeqId;

#[derive(Debug, Clone, Default)]
struct Node {
    parent: Option<usize>,
    /// The subtree (DVTS) it belongs to; 0 for beam search.
    group: usize,
    head: Option<Head>,
    logits: Option<HeadLogits>,
    /// The verifier's sequence after this node's steps.
    vseq: Option<SeqId>,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    /// Step probabilities from the root to here.
    steps: Vec<f64>,
    path_len: usize,
    depth: usize,
    terminal: bool,
    finish: Option<FinishReason>,
    scored: bool,
}

enum Job {
    /// A sampled next step of node `parent`.
    Sample { parent: usize },
    /// The feed of a new node's last token.
    Feed(usize),
}

pub(crate) struct VerifierSearch {
    job: PromptJob,
    params: VerifierSearchParams,
    grader: Grader,
    nodes: Vec<Node>,
    jobs: HashMap<BranchId, Job>,
    /// Nodes of the current step, in the order their samples were spawned.
    step: Vec<(BranchId, Option<usize>)>,
    kept: Vec<usize>,
    finished: Vec<usize>,
    streams: u64,
    candidates: Vec<Candidate>,
    votes: Vec<(String, f64)>,
    done: bool,
}

impl VerifierSearch {
    pub fn new(job: PromptJob, params: VerifierSearchParams) -> Self {
        let grader = Grader::new(params.verifier.clone(), &job);
        Self {
            job,
            params,
            grader,
            nodes: vec![Node::default()],
            jobs: HashMap::new(),
            step: Vec::new(),
            kept: Vec::new(),
            finished: Vec::new(),
            streams: 0,
            candidates: Vec::new(),
            votes: Vec::new(),
            done: false,
        }
    }

    fn groups(&self) -> usize {
        if self.params.subtrees {
            self.params.n / self.params.beam_width
        } else {
            1
        }
    }

    /// Beams each group keeps per step.
    fn keep(&self) -> usize {
        if self.params.subtrees {
            1
        } else {
            self.params.n / self.params.beam_width
        }
    }

    /// The nodes from the root to `s`.
    fn chain(&self, mut s: usize) -> Vec<usize> {
        let mut chain = vec![s];
        while let Some(p) = self.nodes[s].parent {
            chain.push(p);
            s = p;
        }
        chain.reverse();
        chain
    }

    fn path_tokens(&self, s: usize) -> Vec<u32> {
        self.chain(s)
            .iter()
            .flat_map(|&i| self.nodes[i].tokens.iter().copied())
            .collect()
    }

    /// Samples the next steps: each group's `keep * beam_width` samples spread over its kept
    /// beams (a group with fewer beams left samples more from each).
    fn expand(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        self.step.clear();
        let per_group = self.keep() * self.params.beam_width;
        let mut stop = self.job.stop.clone();
        stop.push(self.params.step_delimiter.clone());
        for g in 0..self.groups() {
            let beams: Vec<usize> = self
                .kept
                .iter()
                .copied()
                .filter(|&s| self.nodes[s].group == g)
                .collect();
            for (k, &s) in beams.iter().enumerate() {
                let count = per_group / beams.len() + usize::from(k < per_group % beams.len());
                let node = &mut self.nodes[s];
                let (Some(head), Some(logits)) = (node.head.take(), node.logits.take()) else {
                    return Err(Error::invalid("verifier search: a kept beam is not fed"));
                };
                let max = self
                    .params
                    .max_step_tokens
                    .min(self.job.room(node.path_len))
                    .max(1);
                let mut history = self.job.prompt.to_vec();
                history.extend(self.path_tokens(s));
                let history = Arc::new(history);
                let first = self.streams;
                self.streams += count as u64;
                let sampling = self.params.sampling;
                let ids =
                    cx.continue_from(head, &logits, &self.job.adapter, count, false, |i| {
                        spec(
                            max,
                            stop.clone(),
                            sampling,
                            first + i as u64,
                            history.clone(),
                        )
                    })?;
                for id in ids {
                    self.jobs.insert(id, Job::Sample { parent: s });
                    self.step.push((id, None));
                }
            }
        }
        Ok(())
    }

    fn on_sample(&mut self, parent: usize, done: Finished, cx: &mut Cx<'_>) -> Result<()> {
        let p = &self.nodes[parent];
        let path_len = p.path_len + done.tokens.len();
        let depth = p.depth + 1;
        let terminal = self.job.ends_answer(&done, path_len) || depth >= self.params.max_steps;
        let node = Node {
            parent: Some(parent),
            group: p.group,
            head: Some(done.head),
            tokens: done.tokens.clone(),
            logprobs: done.logprobs.clone(),
            steps: p.steps.clone(),
            path_len,
            depth,
            terminal,
            finish: Some(done.finish),
            ..Node::default()
        };
        let from = p.vseq;
        let id = self.nodes.len();
        self.nodes.push(node);
        if let Some(slot) = self.step.iter_mut().find(|(b, _)| *b == done.id) {
            slot.1 = Some(id);
        }
        self.grader
            .request(cx, id, from, &done.tokens, Some(done.head.seq))?;
        if terminal {
            if let Some(h) = self.nodes[id].head.take() {
                h.free(cx.store);
            }
        } else if let (Some(head), Some(&last)) = (self.nodes[id].head, done.tokens.last()) {
            // Fed now, beside its scoring row: a kept beam then forks without a pass of its own.
            let feed = cx.feed_only(head, self.job.adapter.clone(), vec![last])?;
            self.jobs.insert(feed, Job::Feed(id));
        }
        Ok(())
    }

    fn step_complete(&self) -> bool {
        self.jobs.is_empty()
            && !self.grader.is_busy()
            && self.step.iter().all(|(_, n)| {
                n.is_some_and(|n| {
                    let node = &self.nodes[n];
                    node.scored && (node.terminal || node.logits.is_some())
                })
            })
    }

    /// Every sample of the step is scored (and fed): finished beams leave, each group keeps its
    /// best, the rest are freed.
    fn select(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        for s in std::mem::take(&mut self.kept) {
            if let Some(v) = self.nodes[s].vseq.take() {
                cx.store.free(v);
            }
        }
        let new: Vec<usize> = self.step.iter().filter_map(|(_, n)| *n).collect();
        for g in 0..self.groups() {
            let mut open: Vec<usize> = Vec::new();
            let members: Vec<usize> = new
                .iter()
                .copied()
                .filter(|&s| self.nodes[s].group == g)
                .collect();
            for s in members {
                if self.nodes[s].terminal {
                    self.finished.push(s);
                    if let Some(v) = self.nodes[s].vseq.take() {
                        cx.store.free(v);
                    }
                } else {
                    open.push(s);
                }
            }
            let score = |s: usize| self.grader.aggregate(&self.nodes[s].steps);
            // Stable: equal scores keep sampling order.
            open.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
            let keep = self.keep().min(open.len());
            for &s in &open[keep..] {
                let node = &mut self.nodes[s];
                if let Some(h) = node.head.take() {
                    h.free(cx.store);
                }
                if let Some(v) = node.vseq.take() {
                    cx.store.free(v);
                }
                node.logits = None;
            }
            self.kept.extend_from_slice(&open[..keep]);
        }
        if self.kept.is_empty() {
            return self.finish(cx);
        }
        self.expand(cx)
    }

    fn finish(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        // Beams still open (a search cut short) count as they stand.
        let mut ends = std::mem::take(&mut self.finished);
        ends.extend(std::mem::take(&mut self.kept));
        for node in &mut self.nodes {
            if let Some(h) = node.head.take() {
                h.free(cx.store);
            }
            if let Some(v) = node.vseq.take() {
                cx.store.free(v);
            }
        }
        self.grader.release(cx);
        let tok = cx.tokenizer()?.clone();
        for s in ends {
            let tokens = self.path_tokens(s);
            let text = tok.decode(&tokens, true)?;
            let score = self.grader.aggregate(&self.nodes[s].steps);
            let logprobs: Vec<f32> = self
                .chain(s)
                .iter()
                .flat_map(|&i| self.nodes[i].logprobs.iter().copied())
                .collect();
            let answer = extract(&self.params.extract, &text)?;
            self.candidates.push(Candidate {
                token_ids: tokens,
                logprobs,
                text: Some(text),
                finish_reason: self.nodes[s].finish.unwrap_or(FinishReason::Length),
                score,
                answer,
                step_scores: self.nodes[s].steps.clone(),
            });
        }
        // Best first, so that the output is the best-scored beam of the winning answer.
        self.candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
        self.votes = tally(
            self.candidates
                .iter()
                .map(|c| (c.answer.as_deref(), c.score)),
        );
        self.done = true;
        Ok(())
    }
}

impl Search for VerifierSearch {
    fn start(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        let head = cx.new_head();
        let id = cx.feed_only(head, self.job.adapter.clone(), self.job.prompt.to_vec())?;
        self.jobs.insert(id, Job::Feed(0));
        self.grader.start(cx)
    }

    fn on_finished(&mut self, done: Finished, cx: &mut Cx<'_>) -> Result<()> {
        match self.grader.on_finished(&done, cx)? {
            // The prompt's verifier sequence stays the grader's; first steps fork it.
            Taken::Own => {}
            Taken::Scored(scored) => {
                let node = &mut self.nodes[scored.key];
                node.steps.extend_from_slice(&scored.steps);
                node.vseq = Some(scored.seq);
                node.scored = true;
            }
            Taken::No => match self.jobs.remove(&done.id) {
                Some(Job::Feed(s)) => {
                    self.nodes[s].head = Some(done.head);
                    self.nodes[s].logits = done.logits;
                    if s == 0 {
                        // Every group starts from the prompt.
                        self.nodes[0].scored = true;
                        self.kept = vec![0];
                        let groups = self.groups();
                        if groups > 1 {
                            return self.start_subtrees(cx, groups);
                        }
                        return self.expand(cx);
                    }
                }
                Some(Job::Sample { parent }) => self.on_sample(parent, done, cx)?,
                None => {
                    return Err(Error::invalid(format!(
                        "verifier search: unknown branch {}",
                        done.id
                    )))
                }
            },
        }
        if !self.done && !self.step.is_empty() && self.step_complete() {
            self.select(cx)?;
        }
        Ok(())
    }

    fn on_cut_short(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        if !self.done {
            // Only scored beams can be ranked.
            self.kept.retain(|&s| self.nodes[s].scored && s != 0);
            self.finish(cx)?;
        }
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

impl VerifierSearch {
    /// DVTS: the prompt becomes one root per subtree (forks of its sequence), each its own
    /// group.
    fn start_subtrees(&mut self, cx: &mut Cx<'_>, groups: usize) -> Result<()> {
        let (Some(head), Some(logits)) = (self.nodes[0].head, self.nodes[0].logits.clone()) else {
            return Err(Error::invalid("verifier search: the prompt is not fed"));
        };
        self.kept.clear();
        for g in 0..groups {
            let head = if g + 1 == groups {
                head
            } else {
                head.fork(cx.store)?
            };
            self.nodes.push(Node {
                group: g,
                head: Some(head),
                logits: Some(logits.clone()),
                scored: true,
                ..Node::default()
            });
            self.kept.push(self.nodes.len() - 1);
        }
        self.nodes[0].head = None;
        self.nodes[0].logits = None;
        self.expand(cx)
    }
}
