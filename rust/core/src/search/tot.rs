//! Tree-of-Thought (Yao et al. 2023). A state is the prompt plus the thoughts so far; each step
//! adds one thought (text up to the delimiter), either sampled from the state's own sequence or
//! proposed several at a time by one completion of a propose prompt. States are valued by a
//! callback or by the model itself (sure / likely / impossible from a value prompt, sampled
//! `value_samples` times), every state of a level in one batch. BFS keeps the best `breadth`
//! states per level; DFS follows the best child first and backtracks below the threshold.

use std::collections::HashMap;
use std::sync::Arc;

use super::answers::extract;
use super::best_of_n::PromptJob;
use super::branch::{BranchId, Finished, Head, HeadLogits};
use super::driver::{spec, Cx, Search};
use super::spec::{ToTEvaluator, ToTGenerate, ToTParams, ToTSearch};
use super::tree::{TreeNodeReport, TreeReport};
use super::verify::{Grader, Taken};
use super::{FinishReason, RowOutput};
use crate::error::{Error, Result};
use crate::kv::SeqId;

#[derive(Debug, Clone, Default)]
struct State {
    parent: Option<usize>,
    head: Option<Head>,
    pending: Vec<u32>,
    logits: Option<HeadLogits>,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    text: String,
    /// Generated tokens from the root to here, this state's included.
    path_len: usize,
    depth: usize,
    value: f64,
    terminal: bool,
    selected: bool,
    /// With a verifier as evaluator: its sequence after this state's steps, and their scores.
    vseq: Option<SeqId>,
    steps: Vec<f64>,
}

enum Job {
    /// Feeding a state before sampling its next thoughts.
    Feed(usize),
    /// A sampled next thought.
    Thought,
    /// A propose completion for a state.
    Propose(usize),
    /// A value prompt's prefill for a state.
    ValuePrompt(usize),
    /// One value sample for a state.
    Value(usize),
}

pub(crate) struct TreeOfThought {
    job: PromptJob,
    params: ToTParams,
    states: Vec<State>,
    jobs: HashMap<BranchId, Job>,
    /// States created in the current expansion, in order.
    new_states: Vec<usize>,
    /// Finished thoughts per parent, in spawn order.
    thoughts: Vec<(BranchId, usize, Option<Finished>)>,
    frontier: Vec<usize>,
    stack: Vec<usize>,
    solution: Option<usize>,
    /// The chosen path's answer, when `params.extract` is set.
    answer: Option<String>,
    problem: Option<String>,
    streams: u64,
    grader: Option<Grader>,
}

fn judge(text: &str) -> f64 {
    // The last of the three words in the reply decides (the ToT paper reads the last line);
    // whole words only, so "unsure" is not "sure".
    text.split(|c: char| !c.is_alphabetic())
        .rev()
        .find_map(|w| match w.to_lowercase().as_str() {
            "impossible" => Some(0.001),
            "likely" => Some(1.0),
            "sure" => Some(20.0),
            _ => None,
        })
        .unwrap_or(0.0)
}

impl TreeOfThought {
    pub fn new(job: PromptJob, params: ToTParams) -> Self {
        let grader = match &params.evaluator {
            ToTEvaluator::Verifier(v) => Some(Grader::new(v.clone(), &job)),
            _ => None,
        };
        Self {
            job,
            params,
            grader,
            states: vec![State::default()],
            jobs: HashMap::new(),
            new_states: Vec::new(),
            thoughts: Vec::new(),
            frontier: Vec::new(),
            stack: Vec::new(),
            solution: None,
            answer: None,
            problem: None,
            streams: 0,
        }
    }

    fn path_tokens(&self, s: usize) -> Vec<u32> {
        let mut chain = vec![s];
        while let Some(p) = self.states[*chain.last().unwrap_or(&0)].parent {
            chain.push(p);
        }
        chain
            .iter()
            .rev()
            .flat_map(|&i| self.states[i].tokens.iter().copied())
            .collect()
    }

    fn history(&self, s: usize) -> Arc<Vec<u32>> {
        let mut ids = self.job.prompt.to_vec();
        ids.extend(self.path_tokens(s));
        Arc::new(ids)
    }

    fn problem(&mut self, cx: &Cx<'_>) -> Result<String> {
        if self.problem.is_none() {
            self.problem = Some(cx.decode(&self.job.prompt)?);
        }
        Ok(self.problem.clone().unwrap_or_default())
    }

    fn fill(&mut self, template: &str, s: usize, cx: &Cx<'_>) -> Result<String> {
        let state = cx.decode(&self.path_tokens(s))?;
        let problem = self.problem(cx)?;
        Ok(fill_template(template, &problem, &state))
    }

    fn stream(&mut self) -> u64 {
        self.streams += 1;
        self.streams - 1
    }

    /// Expands `parents` (one level of BFS, or one DFS state).
    fn expand(&mut self, parents: Vec<usize>, cx: &mut Cx<'_>) -> Result<()> {
        self.new_states.clear();
        self.thoughts.clear();
        for s in parents {
            if self.states[s].logits.is_some() {
                self.generate_children(s, cx)?;
                continue;
            }
            // Feed the state first, so that its children fork it instead of repeating it.
            let head = self.head(s)?;
            let feed = std::mem::take(&mut self.states[s].pending);
            let id = cx.feed_only(head, self.job.adapter.clone(), feed)?;
            self.jobs.insert(id, Job::Feed(s));
        }
        self.after_expansion_step(cx)
    }

    fn generate_children(&mut self, s: usize, cx: &mut Cx<'_>) -> Result<()> {
        let ToTGenerate::Propose { template } = self.params.generate.clone() else {
            return self.sample_thoughts(s, cx);
        };
        let text = self.fill(&template, s, cx)?;
        let ids = cx.tokenizer()?.encode(&text)?;
        let head = cx.new_head();
        let stream = self.stream();
        let max = self.params.max_step_tokens * self.params.proposals;
        let id = cx.spawn(
            head,
            self.job.adapter.clone(),
            ids.clone(),
            None,
            spec(
                max,
                vec!["\n\n".into()],
                self.params.sampling,
                stream,
                Arc::new(ids),
            ),
        )?;
        self.jobs.insert(id, Job::Propose(s));
        Ok(())
    }

    fn head(&self, s: usize) -> Result<Head> {
        self.states[s]
            .head
            .ok_or_else(|| Error::invalid("Tree-of-Thought: state has no sequence"))
    }

    fn sample_thoughts(&mut self, s: usize, cx: &mut Cx<'_>) -> Result<()> {
        let logits = self.states[s]
            .logits
            .clone()
            .ok_or_else(|| Error::invalid("Tree-of-Thought: state not fed"))?;
        let head = self.head(s)?;
        self.states[s].head = None;
        let history = self.history(s);
        let mut stop = self.job.stop.clone();
        stop.push(self.params.step_delimiter.clone());
        let first = self.streams;
        self.streams += self.params.proposals as u64;
        let max = self
            .params
            .max_step_tokens
            .min(self.job.room(self.states[s].path_len))
            .max(1);
        let sampling = self.params.sampling;
        let ids = cx.continue_from(
            head,
            &logits,
            &self.job.adapter,
            self.params.proposals,
            false,
            |i| {
                spec(
                    max,
                    stop.clone(),
                    sampling,
                    first + i as u64,
                    history.clone(),
                )
            },
        )?;
        for id in ids {
            self.jobs.insert(id, Job::Thought);
            self.thoughts.push((id, s, None));
        }
        Ok(())
    }

    fn add_state(&mut self, parent: usize, s: State) -> usize {
        let id = self.states.len();
        self.states.push(State {
            parent: Some(parent),
            depth: self.states[parent].depth + 1,
            ..s
        });
        self.new_states.push(id);
        id
    }

    /// When no generation job is left, the new states are complete: evaluate them.
    fn after_expansion_step(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        if !self.jobs.is_empty() {
            return Ok(());
        }
        // Sampled thoughts become states in spawn order.
        for (_, parent, done) in std::mem::take(&mut self.thoughts) {
            let Some(d) = done else { continue };
            let path_len = self.states[parent].path_len + d.tokens.len();
            let terminal = self.job.ends_answer(&d, path_len);
            let last = d.tokens.last().copied();
            self.add_state(
                parent,
                State {
                    head: Some(d.head),
                    pending: last.into_iter().collect(),
                    tokens: d.tokens,
                    logprobs: d.logprobs,
                    text: d.full_text,
                    path_len,
                    terminal,
                    ..State::default()
                },
            );
        }
        let states = self.new_states.clone();
        match self.params.evaluator.clone() {
            ToTEvaluator::Callback(f) => {
                // Every new state of the level in one call.
                let problem = self.problem(cx)?;
                let texts = states
                    .iter()
                    .map(|&s| cx.decode(&self.path_tokens(s)))
                    .collect::<Result<Vec<String>>>()?;
                let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                let values = f.call_many("evaluator", &problem, &texts)?;
                for (s, value) in states.into_iter().zip(values) {
                    self.states[s].value = value;
                }
                self.select(cx)
            }
            ToTEvaluator::SelfValue { template, .. } => {
                for s in states {
                    let text = self.fill(&template, s, cx)?;
                    let ids = cx.tokenizer()?.encode(&text)?;
                    let head = cx.new_head();
                    let id = cx.feed_only(head, self.job.adapter.clone(), ids)?;
                    self.jobs.insert(id, Job::ValuePrompt(s));
                }
                if self.jobs.is_empty() {
                    self.select(cx)?;
                }
                Ok(())
            }
            ToTEvaluator::Verifier(_) => {
                // Each new state's thought is scored after its parent's verifier sequence.
                for s in states {
                    let parent = self.states[s].parent.unwrap_or(0);
                    let from = self.states[parent].vseq;
                    let tokens = self.states[s].tokens.clone();
                    let source = self.states[s].head.map(|h| h.seq);
                    if let Some(g) = &mut self.grader {
                        g.request(cx, s, from, &tokens, source)?;
                    }
                }
                self.select_when_scored(cx)
            }
        }
    }

    fn select_when_scored(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        if self.jobs.is_empty() && !self.grader.as_ref().is_some_and(Grader::is_busy) {
            self.select(cx)?;
        }
        Ok(())
    }

    /// Every new state has its value: BFS keeps the best, DFS pushes the good ones.
    fn select(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        let mut ranked = self.new_states.clone();
        // Stable: equal values keep generation order.
        ranked.sort_by(|&a, &b| self.states[b].value.total_cmp(&self.states[a].value));
        match self.params.search {
            ToTSearch::Bfs => {
                let keep: Vec<usize> = ranked.iter().copied().take(self.params.breadth).collect();
                for &s in &ranked[keep.len()..] {
                    self.release(s, cx);
                }
                for &s in &keep {
                    self.states[s].selected = true;
                }
                self.frontier = keep
                    .into_iter()
                    .filter(|&s| {
                        !self.states[s].terminal && self.states[s].depth < self.params.depth
                    })
                    .collect();
                if self.frontier.is_empty() {
                    return self.finish(cx);
                }
                let frontier = self.frontier.clone();
                self.expand(frontier, cx)
            }
            ToTSearch::Dfs => {
                for &s in ranked.iter().rev() {
                    if self.states[s].value >= self.params.value_threshold {
                        self.stack.push(s);
                    } else {
                        self.release(s, cx);
                    }
                }
                self.dfs_next(cx)
            }
        }
    }

    fn dfs_next(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        let Some(s) = self.stack.pop() else {
            return self.finish(cx);
        };
        self.states[s].selected = true;
        if self.states[s].terminal || self.states[s].depth >= self.params.depth {
            self.solution = Some(s);
            return self.finish(cx);
        }
        self.expand(vec![s], cx)
    }

    fn release(&mut self, s: usize, cx: &mut Cx<'_>) {
        if let Some(h) = self.states[s].head.take() {
            h.free(cx.store);
        }
        if let Some(v) = self.states[s].vseq.take() {
            cx.store.free(v);
        }
    }

    fn finish(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        for s in 0..self.states.len() {
            self.release(s, cx);
        }
        if let Some(g) = &mut self.grader {
            g.release(cx);
        }
        self.stack.clear();
        if self.solution.is_none() {
            // BFS: the best complete state (terminal, or at the full depth); else the best of
            // the deepest level reached. The first one wins ties.
            let key = |st: &State| {
                let complete = st.terminal || st.depth >= self.params.depth;
                (complete, if complete { 0 } else { st.depth }, st.value)
            };
            let mut best: Option<usize> = None;
            for (i, st) in self.states.iter().enumerate().skip(1) {
                if !st.selected {
                    continue;
                }
                let better = best.is_none_or(|b| {
                    let (c, d, v) = key(st);
                    let (bc, bd, bv) = key(&self.states[b]);
                    (c, d).cmp(&(bc, bd)).then(v.total_cmp(&bv)) == std::cmp::Ordering::Greater
                });
                if better {
                    best = Some(i);
                }
            }
            self.solution = best;
        }
        if let (Some(extractor), Some(best)) = (&self.params.extract, self.solution) {
            let text = cx.decode(&self.path_tokens(best))?;
            self.answer = extract(extractor, &text)?;
        }
        Ok(())
    }
}

impl Search for TreeOfThought {
    fn start(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        let head = cx.new_head();
        self.states[0].head = Some(head);
        self.states[0].pending = self.job.prompt.to_vec();
        if let Some(g) = &mut self.grader {
            g.start(cx)?;
        }
        self.expand(vec![0], cx)
    }

    fn on_finished(&mut self, done: Finished, cx: &mut Cx<'_>) -> Result<()> {
        if let Some(g) = &mut self.grader {
            match g.on_finished(&done, cx)? {
                Taken::No => {}
                Taken::Own => return Ok(()),
                Taken::Scored(scored) => {
                    let s = scored.key;
                    let parent = self.states[s].parent.unwrap_or(0);
                    let mut steps = self.states[parent].steps.clone();
                    steps.extend_from_slice(&scored.steps);
                    self.states[s].value = g.aggregate(&steps);
                    self.states[s].steps = steps;
                    self.states[s].vseq = Some(scored.seq);
                    return self.select_when_scored(cx);
                }
            }
        }
        let job = self.jobs.remove(&done.id).ok_or_else(|| {
            Error::invalid(format!("Tree-of-Thought: unknown branch {}", done.id))
        })?;
        match job {
            Job::Feed(s) => {
                self.states[s].head = Some(done.head);
                self.states[s].logits = done.logits;
                self.generate_children(s, cx)
            }
            Job::Thought => {
                if let Some(slot) = self.thoughts.iter_mut().find(|t| t.0 == done.id) {
                    slot.2 = Some(done);
                }
                self.after_expansion_step(cx)
            }
            Job::Propose(s) => {
                done.head.free(cx.store);
                let parent_head = self.head(s)?;
                let lines: Vec<String> = done
                    .text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .take(self.params.proposals)
                    .map(str::to_string)
                    .collect();
                let n = lines.len();
                if n > 0 {
                    self.states[s].head = None;
                }
                let room = self.job.room(self.states[s].path_len);
                for (i, line) in lines.into_iter().enumerate() {
                    let thought = format!("{line}{}", self.params.step_delimiter);
                    let mut ids = cx.encode_continuation(&thought)?;
                    // A proposed step longer than the path's remaining budget is cut to it and
                    // ends the path.
                    ids.truncate(room.max(1));
                    let path_len = self.states[s].path_len + ids.len();
                    let head = if i + 1 == n {
                        parent_head
                    } else {
                        parent_head.fork(cx.store)?
                    };
                    let at_stop = self.job.stop.iter().any(|x| thought.contains(x.as_str()));
                    self.add_state(
                        s,
                        State {
                            head: Some(head),
                            pending: ids.clone(),
                            tokens: ids,
                            text: thought,
                            path_len,
                            terminal: self.job.room(path_len) == 0 || at_stop,
                            ..State::default()
                        },
                    );
                }
                self.after_expansion_step(cx)
            }
            Job::ValuePrompt(s) => {
                let logits = done
                    .logits
                    .clone()
                    .ok_or_else(|| Error::invalid("value prompt fed without logits"))?;
                let ToTEvaluator::SelfValue {
                    samples,
                    max_tokens,
                    ..
                } = self.params.evaluator
                else {
                    return Ok(());
                };
                let first = self.streams;
                self.streams += samples as u64;
                let sampling = self.params.sampling;
                let ids =
                    cx.continue_from(done.head, &logits, &self.job.adapter, samples, false, |i| {
                        spec(
                            max_tokens,
                            vec!["\n".into()],
                            sampling,
                            first + i as u64,
                            Arc::new(Vec::new()),
                        )
                    })?;
                self.jobs
                    .extend(ids.into_iter().map(|id| (id, Job::Value(s))));
                Ok(())
            }
            Job::Value(s) => {
                done.head.free(cx.store);
                self.states[s].value += judge(&done.text);
                if self.jobs.is_empty() {
                    self.select(cx)?;
                }
                Ok(())
            }
        }
    }

    fn outputs(&self) -> Vec<RowOutput> {
        let best = self.solution.unwrap_or(0);
        let mut chain = vec![best];
        while let Some(p) = self.states[*chain.last().unwrap_or(&0)].parent {
            chain.push(p);
        }
        chain.reverse();
        let mut tokens = Vec::new();
        let mut logprobs = Vec::new();
        for &i in &chain {
            tokens.extend(&self.states[i].tokens);
            logprobs.extend(&self.states[i].logprobs);
        }
        let on_path: std::collections::HashSet<usize> = chain.iter().copied().collect();
        let nodes = self
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| TreeNodeReport {
                parent: s.parent,
                depth: s.depth,
                text: s.text.clone(),
                token_count: s.tokens.len(),
                visits: u32::from(s.selected),
                value: s.value,
                prior: 0.0,
                terminal: s.terminal,
                rollout_tokens: 0,
                selected: s.selected || on_path.contains(&i),
            })
            .collect();
        let mut out = RowOutput::plain(
            tokens,
            logprobs,
            None,
            FinishReason::Length,
            self.job.prompt.len(),
        );
        out.score = Some(self.states[best].value);
        out.answer = self.answer.clone();
        out.tree = Some(TreeReport { nodes });
        vec![out]
    }
}

/// `template` with its `{problem}` and `{state}` filled in. Every thought ends with the step
/// delimiter; the state's trailing one is dropped so that `{state}\n` in a template reads as the
/// steps written one per line, the way judgements are written (and trained) by hand.
fn fill_template(template: &str, problem: &str, state: &str) -> String {
    template
        .replace("{problem}", problem)
        .replace("{state}", state.trim_end())
}

#[cfg(test)]
mod tests {
    use super::{fill_template, judge};

    #[test]
    fn the_last_whole_verdict_word_decides_the_value() {
        for (reply, value) in [
            ("sure", 20.0),
            ("Likely.", 1.0),
            ("IMPOSSIBLE", 0.001),
            ("at first sure, but on reflection impossible", 0.001),
            ("impossible? no: likely", 1.0),
            ("unsure", 0.0),
            ("surely not", 0.0),
            ("likelihood is low", 0.0),
            ("", 0.0),
            ("8 * 3 = 24: sure!", 20.0),
        ] {
            assert_eq!(judge(reply), value, "{reply:?}");
        }
    }

    #[test]
    fn states_fill_templates_without_their_last_delimiter() {
        let template = "Problem: {problem}\nSteps so far:\n{state}\nJudgement:";
        let filled = fill_template(
            template,
            "2 3 4",
            "2 + 3 = 5 (left: 4 5)\n4 * 5 = 20 (left: 20)\n",
        );
        assert_eq!(
            filled,
            "Problem: 2 3 4\nSteps so far:\n2 + 3 = 5 (left: 4 5)\n4 * 5 = 20 (left: 20)\nJudgement:"
        );
        assert_eq!(fill_template("{state}|", "", ""), "|");
    }
}
