//! A pool of branches: continuations of sequences, decoded token by token, every live branch
//! advanced in the same forward pass. Best-of-N, self-consistency, Tree-of-Thought, MCTS and
//! adaptive compute are state machines that spawn branches here and react when they finish.
//!
//! A branch starts either from tokens to feed (a prompt, a value prompt, a thought whose last
//! token is not cached yet) or from known last-position logits (a fork of a fed sequence), so a
//! prefix is run once however many branches continue it. With `max_new_tokens == 0` a branch
//! only feeds its tokens and finishes with the logits, ready to be forked.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{Advance, EntryHidden, FinishReason};
use crate::error::{Error, Result};
use crate::kernels::cpu::parallel::map_parallel;
use crate::kv::{SeqId, SeqStore};
use crate::logits::{self, ColdParams, Rng, SamplingParams};
use crate::lora::{LoraAdapter, ValueHead};
use crate::text::{StopMatcher, Tokenizer};

pub(crate) type BranchId = usize;

/// A sequence and, under CoLD, its base-model twin fed the same tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub seq: SeqId,
    pub base: Option<SeqId>,
}

impl Head {
    pub fn create(store: &mut SeqStore, cold: bool) -> Self {
        Self {
            seq: store.create(),
            base: cold.then(|| store.create()),
        }
    }

    /// A child sharing every cached position (see [`SeqStore::fork`]).
    pub fn fork(&self, store: &mut SeqStore) -> Result<Self> {
        Ok(Self {
            seq: store.fork(self.seq)?,
            base: self.base.map(|b| store.fork(b)).transpose()?,
        })
    }

    pub fn free(&self, store: &mut SeqStore) {
        store.free(self.seq);
        if let Some(b) = self.base {
            store.free(b);
        }
    }
}

/// Last-position logits of a head: the expert's (or the only model's) and the base twin's.
#[derive(Debug, Clone)]
pub(crate) struct HeadLogits {
    pub expert: Arc<Vec<f32>>,
    pub base: Option<Arc<Vec<f32>>>,
}

/// How one branch decodes.
#[derive(Debug, Clone)]
pub(crate) struct BranchSpec {
    /// 0: feed the tokens and finish with the logits.
    pub max_new_tokens: usize,
    pub stop: StopMatcher,
    pub sampling: SamplingParams,
    /// The branch's random stream (with the sampling seed).
    pub stream: u64,
    /// Tokens before the branch's first new one (its cached prefix plus its feed), for the
    /// repetition penalty and the context limit.
    pub history: Arc<Vec<u32>>,
}

/// A branch that has finished, handed back with its sequence to the search that spawned it.
#[derive(Debug, Clone)]
pub(crate) struct Finished {
    pub owner: usize,
    pub id: BranchId,
    pub head: Head,
    pub tokens: Vec<u32>,
    /// Each token's log-probability under the model's unmodified distribution.
    pub logprobs: Vec<f32>,
    /// Each token's score under the token scorer: its log-probability, or under CoLD its
    /// log-softmax of the contrastive scores.
    pub scores: Vec<f32>,
    /// The decoded tokens, cut before a stop string.
    pub text: String,
    /// The decoded tokens, uncut.
    pub full_text: String,
    pub finish: FinishReason,
    /// Last-position logits when every token of the branch is in the cache (feed-only
    /// branches); otherwise the last token is not cached yet.
    pub logits: Option<HeadLogits>,
}

impl Finished {
    pub fn mean_score(&self) -> f64 {
        mean(&self.scores)
    }

    pub fn sum_score(&self) -> f64 {
        self.scores.iter().map(|&s| s as f64).sum()
    }
}

pub(crate) fn mean(xs: &[f32]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64
    }
}

struct Branch {
    owner: usize,
    head: Head,
    adapter: Option<Arc<LoraAdapter>>,
    /// A verifier's feed: the pass returns its head's logit at every fed position.
    value_head: Option<Arc<ValueHead>>,
    /// A verifier's feed entering above the embeddings.
    entry: Option<Arc<EntryHidden>>,
    spec: BranchSpec,
    rng: Rng,
    feed: Vec<u32>,
    logits: Option<HeadLogits>,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    scores: Vec<f32>,
    finish: Option<FinishReason>,
    text: String,
    full_text: String,
}

/// Settings shared by every branch of a pool.
pub(crate) struct PoolConfig {
    pub cold: Option<ColdParams>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub eos_token_ids: Vec<u32>,
    pub context: usize,
}

/// A branch's next token as [`Pool::choose`] picks it.
struct Choice {
    token: u32,
    score: f32,
    logprob: f32,
}

pub(crate) struct Pool {
    cfg: PoolConfig,
    branches: BTreeMap<BranchId, Branch>,
    next_id: BranchId,
    finished: Vec<Finished>,
    /// Tokens forwarded per owner.
    spent: HashMap<usize, usize>,
    step: usize,
    /// Per owner: the layer whose incoming hidden states its generating rows keep (a verifier
    /// sharing the layers below with the policy enters there).
    keep_trunk: HashMap<usize, usize>,
}

impl Pool {
    pub fn new(cfg: PoolConfig) -> Self {
        Self {
            cfg,
            branches: BTreeMap::new(),
            next_id: 0,
            finished: Vec::new(),
            spent: HashMap::new(),
            step: 0,
            keep_trunk: HashMap::new(),
        }
    }

    pub fn cold(&self) -> bool {
        self.cfg.cold.is_some()
    }

    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.cfg.tokenizer.as_ref()
    }

    pub fn is_eos(&self, token: u32) -> bool {
        self.cfg.eos_token_ids.contains(&token)
    }

    /// Makes `owner`'s generating rows keep the hidden states entering `layer`.
    pub fn keep_trunk(&mut self, owner: usize, layer: usize) {
        self.keep_trunk.insert(owner, layer);
    }

    pub fn spent(&self, owner: usize) -> usize {
        self.spent.get(&owner).copied().unwrap_or(0)
    }

    /// Starts a branch on `head`: it feeds `feed` first, or, with `feed` empty, picks its first
    /// token from `logits` (the head's last-position logits, e.g. its parent's).
    pub fn spawn(
        &mut self,
        owner: usize,
        head: Head,
        adapter: Option<Arc<LoraAdapter>>,
        feed: Vec<u32>,
        logits: Option<HeadLogits>,
        spec: BranchSpec,
    ) -> Result<BranchId> {
        if feed.is_empty() == logits.is_none() {
            return Err(Error::invalid(
                "a branch starts from tokens to feed or from known logits, exactly one of them",
            ));
        }
        let id = self.next_id;
        self.next_id += 1;
        let rng = Rng::new(spec.sampling.seed, spec.stream);
        self.branches.insert(
            id,
            Branch {
                owner,
                head,
                adapter,
                value_head: None,
                entry: None,
                spec,
                rng,
                feed,
                logits,
                tokens: Vec::new(),
                logprobs: Vec::new(),
                scores: Vec::new(),
                finish: None,
                text: String::new(),
                full_text: String::new(),
            },
        );
        Ok(id)
    }

    /// Starts a branch that feeds `tokens` to the verifier sequence `seq` and finishes with its
    /// value head's logit at every fed position (as the finished branch's `logits.expert`).
    pub fn spawn_scoring(
        &mut self,
        owner: usize,
        seq: SeqId,
        adapter: Arc<LoraAdapter>,
        value_head: Arc<ValueHead>,
        tokens: Vec<u32>,
        entry: Option<Arc<EntryHidden>>,
    ) -> Result<BranchId> {
        let spec = BranchSpec {
            max_new_tokens: 0,
            stop: StopMatcher::new(Vec::new()),
            sampling: SamplingParams::greedy(),
            stream: 0,
            history: Arc::default(),
        };
        let head = Head { seq, base: None };
        let id = self.spawn(owner, head, Some(adapter), tokens, None, spec)?;
        if let Some(b) = self.branches.get_mut(&id) {
            b.value_head = Some(value_head);
            b.entry = entry;
        }
        Ok(id)
    }

    pub fn is_idle(&self) -> bool {
        self.branches.is_empty() && self.finished.is_empty()
    }

    /// The work of the next forward pass: every branch with tokens to feed (and its twin).
    pub fn work(&mut self) -> Vec<Advance> {
        let mut work = Vec::new();
        for b in self.branches.values() {
            if b.feed.is_empty() {
                continue;
            }
            let twins = 1 + usize::from(b.head.base.is_some());
            *self.spent.entry(b.owner).or_default() += twins * b.feed.len();
            if b.value_head.is_some() {
                work.push(Advance {
                    seq: b.head.seq,
                    tokens: b.feed.clone(),
                    adapter: b.adapter.clone(),
                    head: b.value_head.clone(),
                    capture: None,
                    entry: b.entry.clone(),
                });
                continue;
            }
            let capture = self.keep_trunk.get(&b.owner).copied();
            let mut rows = Advance::with_twin(b.head.seq, b.head.base, &b.adapter, &b.feed);
            // The policy's row keeps its states; its CoLD twin (the base model) does not.
            if let Some(first) = rows.next() {
                work.push(Advance { capture, ..first });
            }
            work.extend(rows);
        }
        work
    }

    /// Takes the logits of the last forward pass for every branch that fed tokens.
    pub fn consume(&mut self, logits: &mut HashMap<SeqId, Vec<f32>>) -> Result<()> {
        self.step += 1;
        let mut done = Vec::new();
        for (&id, b) in self.branches.iter_mut() {
            if b.feed.is_empty() {
                continue;
            }
            let mut take = |seq: SeqId| {
                logits
                    .remove(&seq)
                    .map(Arc::new)
                    .ok_or_else(|| Error::invalid(format!("no logits for sequence {seq}")))
            };
            let expert = take(b.head.seq)?;
            let base = b.head.base.map(&mut take).transpose()?;
            b.feed.clear();
            b.logits = Some(HeadLogits { expert, base });
            if b.spec.max_new_tokens == 0 {
                b.finish = Some(FinishReason::Length);
                done.push(id);
            }
        }
        for id in done {
            self.retire(id);
        }
        Ok(())
    }

    /// Picks a token for every branch whose logits are known; returns whether any branch
    /// finished (call [`Pool::take_finished`]).
    pub fn sample_ready(&mut self) -> Result<bool> {
        let ready: Vec<(BranchId, HeadLogits, Rng)> = self
            .branches
            .iter_mut()
            .filter(|(_, b)| b.feed.is_empty() && b.finish.is_none())
            .filter_map(|(&id, b)| Some((id, b.logits.take()?, b.rng.clone())))
            .collect();
        // The branches choose in parallel (each from its own logits and random stream), then
        // take their tokens in branch order.
        let this = &*self;
        let chosen = map_parallel(ready, |(id, l, mut rng)| {
            this.choose(id, &l, &mut rng).map(|c| (id, rng, c))
        });
        for c in chosen {
            let (id, rng, choice) = c?;
            if self.accept(id, rng, choice)? {
                self.retire(id);
            }
        }
        Ok(!self.finished.is_empty())
    }

    pub fn take_finished(&mut self) -> Vec<Finished> {
        std::mem::take(&mut self.finished)
    }

    fn retire(&mut self, id: BranchId) {
        let Some(b) = self.branches.remove(&id) else {
            return;
        };
        let logits = if b.spec.max_new_tokens == 0 {
            b.logits
        } else {
            None
        };
        self.finished.push(Finished {
            owner: b.owner,
            id,
            head: b.head,
            tokens: b.tokens,
            logprobs: b.logprobs,
            scores: b.scores,
            text: b.text,
            full_text: b.full_text,
            finish: b.finish.unwrap_or(FinishReason::Length),
            logits,
        });
    }

    /// Branch `id`'s next token from its logits `l`: the token, its score and its log-probability
    /// under the expert alone.
    fn choose(&self, id: BranchId, l: &HeadLogits, rng: &mut Rng) -> Result<Choice> {
        let cfg = &self.cfg;
        let b = self
            .branches
            .get(&id)
            .ok_or_else(|| Error::invalid(format!("branch {id} does not exist")))?;
        let finite = logits::all_finite(&l.expert)
            && l.base.as_deref().is_none_or(|x| logits::all_finite(x));
        if !finite {
            return Err(Error::NonFiniteLogits {
                row: b.owner,
                step: self.step,
            });
        }
        // Under CoLD the branch draws from the contrastive scores (built once), else from the
        // expert's logits; the branch's whole sampling applies either way (temperature, top-k,
        // top-p, min-p, repetition penalty), and the token's score is the log-softmax of what it
        // was drawn from.
        let cold_scores = match (&cfg.cold, &l.base) {
            (Some(cold), Some(base)) => Some(logits::cold_scores(&l.expert, base, cold)),
            _ => None,
        };
        let scores: &[f32] = cold_scores.as_deref().unwrap_or(&l.expert);
        let token = draw(scores, b, rng);
        let score = logits::log_prob(scores, token as usize);
        let logprob = if cfg.cold.is_some() {
            logits::log_prob(&l.expert, token as usize)
        } else {
            score
        };
        Ok(Choice {
            token,
            score,
            logprob,
        })
    }

    /// Appends a chosen token to branch `id`; true when the branch is finished.
    fn accept(&mut self, id: BranchId, rng: Rng, choice: Choice) -> Result<bool> {
        let cfg = &self.cfg;
        let Some(b) = self.branches.get_mut(&id) else {
            return Ok(false);
        };
        let Choice {
            token,
            score,
            logprob,
        } = choice;
        b.rng = rng;
        b.tokens.push(token);
        b.logprobs.push(logprob);
        b.scores.push(score);
        if cfg.eos_token_ids.contains(&token) {
            b.finish = Some(FinishReason::Eos);
        }
        if let Some(tok) = &cfg.tokenizer {
            let full = tok.decode(&b.tokens, true)?;
            b.text = match b.spec.stop.find(&full) {
                Some(at) => {
                    b.finish = b.finish.or(Some(FinishReason::Stop));
                    full[..at].to_string()
                }
                None => full.clone(),
            };
            b.full_text = full;
        }
        if b.finish.is_none() {
            if b.tokens.len() >= b.spec.max_new_tokens {
                b.finish = Some(FinishReason::Length);
            } else if b.spec.history.len() + b.tokens.len() >= cfg.context {
                b.finish = Some(FinishReason::Context);
            }
        }
        if b.finish.is_some() {
            return Ok(true);
        }
        b.feed = vec![token];
        Ok(false)
    }
}

/// Branch `b`'s draw from `scores` under its sampling, the repetition penalty applied to the
/// tokens of its history and its own.
fn draw(scores: &[f32], b: &Branch, rng: &mut Rng) -> u32 {
    let sampling = &b.spec.sampling;
    if sampling.repetition_penalty == 1.0 {
        return logits::choose(scores, sampling, rng);
    }
    let mut penalized = scores.to_vec();
    let seen: Vec<u32> = b.spec.history.iter().chain(&b.tokens).copied().collect();
    logits::apply_repetition_penalty(&mut penalized, &seen, sampling.repetition_penalty);
    logits::choose(&penalized, sampling, rng)
}
