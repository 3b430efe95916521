//! Monte Carlo Tree Search over reasoning steps. Nodes are steps (text up to the delimiter);
//! selection by PUCT with the step's probability as prior; expansion samples candidate next
//! steps from the node's forked sequence; each new step is evaluated by a rollout to an answer,
//! scored by the reward; the value is back-propagated. All expansions and rollouts of an
//! iteration run as branches of one batch; the tree itself is [`super::tree::Tree`].

use std::collections::HashMap;

use super::answers::extract;
use super::best_of_n::PromptJob;
use super::branch::{BranchId, Finished, Head, HeadLogits};
use super::driver::{spec, Cx, Search};
use super::spec::{MctsParams, Reward, Rollout};
use super::tree::{Tree, TreeNodeReport, TreeReport};
use super::verify::{Grader, Taken};
use super::{FinishReason, RowOutput};
use crate::error::{Error, Result};
use crate::logits::SamplingParams;

#[derive(Debug, Default, Clone)]
struct Step {
    head: Option<Head>,
    /// Tokens of the path not in the head's cache yet.
    pending: Vec<u32>,
    logits: Option<HeadLogits>,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    text: String,
    /// Generated tokens from the root to here, this step included.
    path_len: usize,
    rollout_tokens: Vec<u32>,
    rollout_logprobs: Vec<f32>,
    /// The rollout's sequence, kept until its reward is asked for when the verifier shares the
    /// policy's bottom layers (its hidden states and cache are what the verifier starts from).
    rollout_head: Option<Head>,
    reward: f64,
    answer: Option<String>,
}

enum Job {
    /// Feeding a node's pending tokens before expanding it (`true`) or rolling it out.
    Feed(usize, bool),
    Expand(usize),
    Rollout(usize),
}

pub(crate) struct Mcts {
    job: PromptJob,
    params: MctsParams,
    tree: Tree,
    steps: Vec<Step>,
    jobs: HashMap<BranchId, Job>,
    /// Expansion branches of the current iteration, in spawn order.
    expanding: Vec<(BranchId, Option<Finished>)>,
    /// New nodes of the current iteration waiting for their rollouts.
    evaluating: Vec<usize>,
    /// The evaluated nodes in evaluation order (their answers make the self-consistency reward).
    evaluated: Vec<usize>,
    /// Every back-propagation, by the node whose reward went up the tree.
    backups: Vec<usize>,
    iterations_done: usize,
    streams: u64,
    prompt_text: Option<String>,
    finished: bool,
    /// With a verifier reward: the grader, and the new nodes' rewards as they come.
    grader: Option<Grader>,
    verified: HashMap<usize, f64>,
    asked: bool,
}

impl Mcts {
    pub fn new(job: PromptJob, params: MctsParams) -> Self {
        Self {
            tree: Tree::new(),
            steps: vec![Step::default()],
            jobs: HashMap::new(),
            expanding: Vec::new(),
            evaluating: Vec::new(),
            evaluated: Vec::new(),
            backups: Vec::new(),
            iterations_done: 0,
            streams: 0,
            prompt_text: None,
            finished: false,
            grader: match &params.reward {
                Reward::Verifier(v) => Some(Grader::new(v.clone(), &job)),
                _ => None,
            },
            verified: HashMap::new(),
            asked: false,
            job,
            params,
        }
    }

    fn sampling(&self, rollout: bool) -> SamplingParams {
        if rollout && self.params.rollout == Rollout::Greedy {
            SamplingParams {
                temperature: 0.0,
                ..self.params.sampling
            }
        } else {
            self.params.sampling
        }
    }

    fn history(&self, node: usize) -> std::sync::Arc<Vec<u32>> {
        let mut ids = self.job.prompt.to_vec();
        ids.extend(self.path_tokens(node));
        std::sync::Arc::new(ids)
    }

    /// Generated tokens from the root to `node`.
    fn path_tokens(&self, node: usize) -> Vec<u32> {
        let mut chain = Vec::new();
        let mut at = Some(node);
        while let Some(i) = at {
            chain.push(i);
            at = self.tree.nodes[i].parent;
        }
        chain
            .iter()
            .rev()
            .flat_map(|&i| self.steps[i].tokens.iter().copied())
            .collect()
    }

    /// The tokens of `node`'s path completed by its rollout: what its reward scores.
    fn path_and_rollout(&self, node: usize) -> Vec<u32> {
        let mut ids = self.path_tokens(node);
        ids.extend(&self.steps[node].rollout_tokens);
        ids
    }

    fn next_stream(&mut self) -> u64 {
        self.streams += 1;
        self.streams - 1
    }

    /// Selects leaves until one needs model work (or the iterations run out).
    fn iterate(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        while self.iterations_done < self.params.iterations {
            let leaf = self.tree.select(self.params.c_puct);
            let node = &self.tree.nodes[leaf];
            let expandable = !node.terminal && node.depth < self.params.max_depth;
            if !expandable {
                // Nothing new to learn here: count its known value once more.
                let reward = self.steps[leaf].reward;
                self.tree.backpropagate(leaf, reward);
                self.backups.push(leaf);
                self.iterations_done += 1;
                continue;
            }
            return match self.steps[leaf].logits.clone() {
                Some(_) => self.expand(leaf, cx),
                None => self.feed(leaf, true, cx),
            };
        }
        self.finish(cx);
        Ok(())
    }

    fn feed(&mut self, node: usize, expand: bool, cx: &mut Cx<'_>) -> Result<()> {
        let step = &mut self.steps[node];
        let head = step
            .head
            .ok_or_else(|| Error::invalid("MCTS: node has no sequence"))?;
        let feed = std::mem::take(&mut step.pending);
        let id = cx.feed_only(head, self.job.adapter.clone(), feed)?;
        self.jobs.insert(id, Job::Feed(node, expand));
        Ok(())
    }

    fn expand(&mut self, node: usize, cx: &mut Cx<'_>) -> Result<()> {
        let logits = self.steps[node]
            .logits
            .clone()
            .ok_or_else(|| Error::invalid("MCTS: expanding an unfed node"))?;
        let head = self.steps[node]
            .head
            .take()
            .ok_or_else(|| Error::invalid("MCTS: node has no sequence"))?;
        let room = self.job.room(self.steps[node].path_len);
        let max_tokens = self.params.max_step_tokens.min(room).max(1);
        let history = self.history(node);
        let mut stop = self.job.stop.clone();
        stop.push(self.params.step_delimiter.clone());
        let first = self.streams;
        self.streams += self.params.expansions as u64;
        let sampling = self.params.sampling;
        let ids = cx.continue_from(
            head,
            &logits,
            &self.job.adapter,
            self.params.expansions,
            false,
            |i| {
                spec(
                    max_tokens,
                    stop.clone(),
                    sampling,
                    first + i as u64,
                    history.clone(),
                )
            },
        )?;
        self.expanding = ids.iter().map(|&id| (id, None)).collect();
        self.jobs
            .extend(ids.into_iter().map(|id| (id, Job::Expand(node))));
        Ok(())
    }

    /// Every expansion of `parent` has finished: add the children and evaluate them.
    fn add_children(&mut self, parent: usize, cx: &mut Cx<'_>) -> Result<()> {
        let done: Vec<Finished> = self
            .expanding
            .iter_mut()
            .filter_map(|(_, f)| f.take())
            .collect();
        self.expanding.clear();
        for d in done {
            let path_len = self.steps[parent].path_len + d.tokens.len();
            let terminal = self.job.ends_answer(&d, path_len);
            let prior = d.mean_score().exp();
            let id = self.tree.add_child(parent, prior, terminal);
            let last = d.tokens.last().copied();
            self.steps.push(Step {
                head: Some(d.head),
                pending: last.into_iter().collect(),
                logits: None,
                tokens: d.tokens.clone(),
                logprobs: d.logprobs.clone(),
                text: d.full_text.clone(),
                path_len,
                ..Step::default()
            });
            self.evaluating.push(id);
            if terminal {
                d.head.free(cx.store);
                self.steps[id].head = None;
            } else {
                self.feed(id, false, cx)?;
            }
        }
        self.maybe_score(cx)
    }

    fn rollout(&mut self, node: usize, cx: &mut Cx<'_>) -> Result<()> {
        let step = &self.steps[node];
        let (Some(head), Some(logits)) = (step.head, step.logits.clone()) else {
            return Err(Error::invalid("MCTS: rolling out an unfed node"));
        };
        let room = self.job.room(step.path_len).max(1);
        let history = self.history(node);
        let stream = self.next_stream();
        let (stop, sampling) = (self.job.stop.clone(), self.sampling(true));
        let ids = cx.continue_from(head, &logits, &self.job.adapter, 1, true, |_| {
            spec(room, stop.clone(), sampling, stream, history.clone())
        })?;
        let id = ids[0];
        self.jobs.insert(id, Job::Rollout(node));
        Ok(())
    }

    /// Once every new node has its rollout, scores them in order and back-propagates.
    fn maybe_score(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        if !self.jobs.is_empty() {
            return Ok(());
        }
        if self.grader.is_some() {
            // Every rollout is scored in the pass after the last one ends, then all are backed up.
            if !self.asked {
                let mut texts: Vec<(usize, Vec<u32>, Option<Head>)> = Vec::new();
                for node in self.evaluating.clone() {
                    let head = self.steps[node].rollout_head.take();
                    texts.push((node, self.path_and_rollout(node), head));
                }
                if let Some(g) = &mut self.grader {
                    for (node, ids, head) in texts {
                        g.request(cx, node, None, &ids, head.map(|h| h.seq))?;
                        if let Some(h) = head {
                            h.free(cx.store);
                        }
                    }
                }
                self.asked = true;
            }
            if self.grader.as_ref().is_some_and(Grader::is_busy) {
                return Ok(());
            }
            self.asked = false;
        }
        let nodes = std::mem::take(&mut self.evaluating);
        let texts = nodes
            .iter()
            .map(|&node| cx.decode(&self.path_and_rollout(node)))
            .collect::<Result<Vec<String>>>()?;
        // A callback rewards every rollout of the iteration in one call.
        let called = match &self.params.reward {
            Reward::Callback(f) => {
                if self.prompt_text.is_none() {
                    self.prompt_text = Some(cx.decode(&self.job.prompt)?);
                }
                let prompt = self.prompt_text.as_deref().unwrap_or_default();
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                f.call_many("reward", prompt, &refs)?
            }
            _ => Vec::new(),
        };
        for (i, (node, text)) in nodes.into_iter().zip(&texts).enumerate() {
            self.steps[node].answer = extract(&self.params.extract, text)?;
            self.evaluated.push(node);
            let reward = match &self.params.reward {
                Reward::SelfConsistency => {
                    let answers = self.evaluated_answers();
                    share(&answers, self.steps[node].answer.as_deref())
                }
                Reward::Callback(_) => called[i],
                Reward::Verifier(_) => self.verified.remove(&node).unwrap_or(0.0),
            };
            self.steps[node].reward = reward;
            self.tree.backpropagate(node, reward);
            self.backups.push(node);
        }
        self.iterations_done += 1;
        self.iterate(cx)
    }

    /// The answers of the evaluated nodes, in evaluation order.
    fn evaluated_answers(&self) -> Vec<Option<&str>> {
        self.evaluated
            .iter()
            .map(|&n| self.steps[n].answer.as_deref())
            .collect()
    }

    fn finish(&mut self, cx: &mut Cx<'_>) {
        if self.finished {
            return;
        }
        self.finished = true;
        if matches!(self.params.reward, Reward::SelfConsistency) {
            // During the search a rollout is scored against the answers before it; the result
            // must not depend on that order: every rollout is scored again against the final
            // tally and the values backed up again.
            let rewards = consensus_rewards(&self.evaluated_answers());
            for (&node, reward) in self.evaluated.iter().zip(rewards) {
                self.steps[node].reward = reward;
            }
            let by_node: Vec<f64> = self.steps.iter().map(|s| s.reward).collect();
            back_up_again(&mut self.tree, &self.backups, &by_node);
        }
        for step in &mut self.steps {
            for h in [step.head.take(), step.rollout_head.take()]
                .into_iter()
                .flatten()
            {
                h.free(cx.store);
            }
        }
        if let Some(g) = &mut self.grader {
            g.release(cx);
        }
    }
}

/// The self-consistency reward of `answer` among `answers`: the share of them that reached it
/// (0 without one).
fn share(answers: &[Option<&str>], answer: Option<&str>) -> f64 {
    match answer {
        Some(a) => {
            let same = answers.iter().filter(|x| **x == Some(a)).count();
            same as f64 / answers.len().max(1) as f64
        }
        None => 0.0,
    }
}

/// Each rollout's self-consistency reward against all of them.
fn consensus_rewards(answers: &[Option<&str>]) -> Vec<f64> {
    answers.iter().map(|&a| share(answers, a)).collect()
}

/// Recomputes every node's value sum from the back-propagations `backups` (visits stay as they
/// are) with the current `rewards` of the nodes they started from. They are added in node order,
/// so that the sums' rounding does not depend on the order the search made them in either.
fn back_up_again(tree: &mut Tree, backups: &[usize], rewards: &[f64]) {
    for n in &mut tree.nodes {
        n.value_sum = 0.0;
    }
    let mut ordered = backups.to_vec();
    ordered.sort_unstable();
    for node in ordered {
        let mut at = Some(node);
        while let Some(i) = at {
            tree.nodes[i].value_sum += rewards[node];
            at = tree.nodes[i].parent;
        }
    }
}

impl Search for Mcts {
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
                    self.verified.insert(scored.key, g.aggregate(&scored.steps));
                    return self.maybe_score(cx);
                }
            }
        }
        if self.steps[0].logits.is_none() && self.jobs.is_empty() {
            // The prompt's prefill.
            self.steps[0].head = Some(done.head);
            self.steps[0].logits = done.logits;
            return self.iterate(cx);
        }
        let job = self
            .jobs
            .remove(&done.id)
            .ok_or_else(|| Error::invalid(format!("MCTS: unknown branch {}", done.id)))?;
        match job {
            Job::Feed(node, expand) => {
                self.steps[node].head = Some(done.head);
                self.steps[node].logits = done.logits;
                if expand {
                    self.expand(node, cx)
                } else {
                    self.rollout(node, cx)
                }
            }
            Job::Expand(parent) => {
                if let Some(slot) = self.expanding.iter_mut().find(|(id, _)| *id == done.id) {
                    slot.1 = Some(done);
                }
                if self.expanding.iter().all(|(_, f)| f.is_some()) {
                    self.add_children(parent, cx)?;
                }
                Ok(())
            }
            Job::Rollout(node) => {
                if self.grader.as_ref().is_some_and(Grader::shares_layers) {
                    self.steps[node].rollout_head = Some(done.head);
                } else {
                    done.head.free(cx.store);
                }
                self.steps[node].rollout_tokens = done.tokens;
                self.steps[node].rollout_logprobs = done.logprobs;
                self.maybe_score(cx)
            }
        }
    }

    fn on_cut_short(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        self.finish(cx);
        Ok(())
    }

    fn outputs(&self) -> Vec<RowOutput> {
        let path = self.tree.best_path();
        let last = path.last().copied().unwrap_or(0);
        let mut tokens = Vec::new();
        let mut logprobs = Vec::new();
        for &i in &path {
            tokens.extend(&self.steps[i].tokens);
            logprobs.extend(&self.steps[i].logprobs);
        }
        tokens.extend(&self.steps[last].rollout_tokens);
        logprobs.extend(&self.steps[last].rollout_logprobs);
        let on_path: std::collections::HashSet<usize> = path.iter().copied().collect();
        let nodes = self
            .tree
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| TreeNodeReport {
                parent: n.parent,
                depth: n.depth,
                text: self.steps[i].text.clone(),
                token_count: self.steps[i].tokens.len(),
                visits: n.visits,
                value: self.tree.mean_value(i),
                prior: n.prior,
                terminal: n.terminal,
                rollout_tokens: self.steps[i].rollout_tokens.len(),
                selected: on_path.contains(&i),
            })
            .collect();
        let mut out = RowOutput::plain(
            tokens,
            logprobs,
            None,
            FinishReason::Length,
            self.job.prompt.len(),
        );
        out.score = Some(self.tree.mean_value(last));
        out.answer = self.steps[last].answer.clone();
        out.tree = Some(TreeReport { nodes });
        vec![out]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root with four children and a grandchild, each evaluated by one rollout; `c` is
    /// revisited (its value backed up again without a rollout). The events run in `order`.
    fn run(order: &[usize]) -> (Vec<f64>, Vec<f64>, Vec<usize>) {
        let mut tree = Tree::new();
        let a = tree.add_child(0, 0.4, false);
        let b = tree.add_child(0, 0.3, false);
        let c = tree.add_child(0, 0.2, true);
        let e = tree.add_child(0, 0.1, false);
        let d = tree.add_child(a, 1.0, false);
        let events = [
            (a, Some(Some("7"))),
            (b, Some(Some("5"))),
            (c, Some(Some("7"))),
            (d, Some(Some("7"))),
            (e, Some(None)),
            (c, None),
        ];
        let (mut answers, mut evaluated, mut backups) = (Vec::new(), Vec::new(), Vec::new());
        for &i in order {
            let (node, rollout) = events[i];
            if let Some(answer) = rollout {
                answers.push(answer);
                evaluated.push(node);
            }
            backups.push(node);
            tree.backpropagate(node, 0.0);
        }
        let mut rewards = vec![0.0; tree.nodes.len()];
        for (&node, r) in evaluated.iter().zip(consensus_rewards(&answers)) {
            rewards[node] = r;
        }
        back_up_again(&mut tree, &backups, &rewards);
        let values = (0..tree.nodes.len()).map(|i| tree.mean_value(i)).collect();
        (rewards, values, tree.best_path())
    }

    #[test]
    fn the_consensus_reward_does_not_depend_on_the_rollouts_order() {
        let (rewards, values, path) = run(&[0, 1, 2, 3, 4, 5]);
        // "7" is 3 of 5 answers, "5" 1 of 5, the fifth has none.
        assert_eq!(rewards[1..=5], [0.6, 0.2, 0.6, 0.0, 0.6]);
        // c: its rollout and its revisit, 0.6 each.
        assert_eq!(values[3], 0.6);
        for order in [[5, 4, 3, 2, 1, 0], [1, 0, 3, 5, 2, 4], [4, 2, 0, 5, 1, 3]] {
            let (r, v, p) = run(&order);
            assert_eq!(
                (r, v, p),
                (rewards.clone(), values.clone(), path.clone()),
                "{order:?}"
            );
        }
    }
}
