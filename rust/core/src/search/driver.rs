//! Runs branch-based searches (best-of-N, self-consistency, Tree-of-Thought, MCTS, adaptive)
//! as one [`Strategy`]: every search's branches share one pool, so all of their work goes
//! through one forward pass per step.

use std::collections::HashMap;
use std::sync::Arc;

use super::branch::{BranchId, BranchSpec, Finished, Head, HeadLogits, Pool};
use super::{Advance, FinishReason, RowOutput, Strategy, TextDelta};
use crate::error::Result;
use crate::kv::{SeqId, SeqStore};
use crate::logits::SamplingParams;
use crate::lora::LoraAdapter;
use crate::text::{StopMatcher, Tokenizer};

/// What a search sees while it runs: the sequences, the branch pool, and who it is.
pub(crate) struct Cx<'a> {
    pub store: &'a mut SeqStore,
    pub pool: &'a mut Pool,
    pub owner: usize,
}

impl Cx<'_> {
    pub fn spawn(
        &mut self,
        head: Head,
        adapter: Option<Arc<LoraAdapter>>,
        feed: Vec<u32>,
        logits: Option<HeadLogits>,
        spec: BranchSpec,
    ) -> Result<BranchId> {
        self.pool
            .spawn(self.owner, head, adapter, feed, logits, spec)
    }

    /// Spawns a branch that only feeds `tokens` to `head` and finishes with its last-position
    /// logits, ready to be forked.
    pub fn feed_only(
        &mut self,
        head: Head,
        adapter: Option<Arc<LoraAdapter>>,
        tokens: Vec<u32>,
    ) -> Result<BranchId> {
        // It picks no token, so no sampling, stream or history applies.
        let spec = spec(0, Vec::new(), SamplingParams::greedy(), 0, Arc::default());
        self.spawn(head, adapter, tokens, None, spec)
    }

    /// Spawns `n` branches continuing `head` from its known last-position `logits`, so no token
    /// runs again: each forks `head`, except the last, which takes `head` itself unless
    /// `keep_head`. `spec_for(i)` is branch `i`'s spec.
    pub fn continue_from(
        &mut self,
        head: Head,
        logits: &HeadLogits,
        adapter: &Option<Arc<LoraAdapter>>,
        n: usize,
        keep_head: bool,
        mut spec_for: impl FnMut(usize) -> BranchSpec,
    ) -> Result<Vec<BranchId>> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let child = if i + 1 == n && !keep_head {
                head
            } else {
                head.fork(self.store)?
            };
            let spec = spec_for(i);
            ids.push(self.spawn(
                child,
                adapter.clone(),
                Vec::new(),
                Some(logits.clone()),
                spec,
            )?);
        }
        if n == 0 && !keep_head {
            head.free(self.store);
        }
        Ok(ids)
    }

    pub fn new_head(&mut self) -> Head {
        Head::create(self.store, self.pool.cold())
    }

    pub fn tokenizer(&self) -> Result<&Arc<Tokenizer>> {
        self.pool.tokenizer().ok_or_else(|| {
            crate::error::Error::Tokenizer(
                "this search works on text and the model has no tokenizer".into(),
            )
        })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer()?.decode(ids, true)
    }

    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        // Text appended to a sequence: no BOS in the middle of it.
        let tok = self.tokenizer()?;
        let mut ids = tok.encode(text)?;
        if tok.add_bos_token && ids.first() == tok.bos_token_id.as_ref() {
            ids.remove(0);
        }
        Ok(ids)
    }
}

/// A branch spec with the usual fields.
pub(crate) fn spec(
    max_new_tokens: usize,
    stop: Vec<String>,
    sampling: SamplingParams,
    stream: u64,
    history: Arc<Vec<u32>>,
) -> BranchSpec {
    BranchSpec {
        max_new_tokens,
        stop: StopMatcher::new(stop),
        sampling,
        stream,
        history,
    }
}

pub(crate) trait Search: Send + Sync {
    /// Spawns the first branches.
    fn start(&mut self, cx: &mut Cx<'_>) -> Result<()>;

    /// A branch this search spawned has finished; its sequences are now the search's to keep
    /// or free.
    fn on_finished(&mut self, done: Finished, cx: &mut Cx<'_>) -> Result<()>;

    /// Called when no branch is left anywhere in the pool: a search that can still do work
    /// spawns it here (rounds that wait for every question, like adaptive compute).
    fn on_idle(&mut self, _cx: &mut Cx<'_>) -> Result<()> {
        Ok(())
    }

    /// The generation ends now, unfinished branches and all (a timeout, the caller): a search
    /// that reports only at its end (a vote after every round) settles on what finished.
    fn on_cut_short(&mut self, _cx: &mut Cx<'_>) -> Result<()> {
        Ok(())
    }

    /// The results, one per prompt the search covers.
    fn outputs(&self) -> Vec<RowOutput>;
}

pub(crate) struct SearchDriver {
    searches: Vec<Box<dyn Search>>,
    pool: Pool,
    /// Why the searches ended before they finished (a timeout, the caller), if they did.
    cut_short: Option<FinishReason>,
}

impl SearchDriver {
    pub fn new(searches: Vec<Box<dyn Search>>, pool: Pool) -> Self {
        Self {
            searches,
            pool,
            cut_short: None,
        }
    }

    /// Calls `f` on every search in order, each with its own view of the pool.
    fn each_search(
        &mut self,
        store: &mut SeqStore,
        mut f: impl FnMut(&mut dyn Search, &mut Cx<'_>) -> Result<()>,
    ) -> Result<()> {
        for owner in 0..self.searches.len() {
            let mut cx = Cx {
                store,
                pool: &mut self.pool,
                owner,
            };
            f(self.searches[owner].as_mut(), &mut cx)?;
        }
        Ok(())
    }

    /// Lets every ready branch pick its token and hands finished branches to their searches
    /// until nothing more happens without a forward pass.
    fn settle(&mut self, store: &mut SeqStore) -> Result<Vec<Advance>> {
        loop {
            while self.pool.sample_ready()? {
                for done in self.pool.take_finished() {
                    let owner = done.owner;
                    let mut cx = Cx {
                        store,
                        pool: &mut self.pool,
                        owner,
                    };
                    self.searches[owner].on_finished(done, &mut cx)?;
                }
            }
            let work = self.pool.work();
            if !work.is_empty() || !self.pool.is_idle() {
                return Ok(work);
            }
            self.each_search(store, |search, cx| search.on_idle(cx))?;
            if self.pool.is_idle() {
                return Ok(Vec::new());
            }
        }
    }
}

impl Strategy for SearchDriver {
    fn start(&mut self, store: &mut SeqStore, _prompts: &[Vec<u32>]) -> Result<Vec<Advance>> {
        self.each_search(store, |search, cx| search.start(cx))?;
        self.settle(store)
    }

    fn consume(
        &mut self,
        store: &mut SeqStore,
        logits: Vec<(SeqId, Vec<f32>)>,
    ) -> Result<Vec<Advance>> {
        let mut by_seq: HashMap<SeqId, Vec<f32>> = logits.into_iter().collect();
        self.pool.consume(&mut by_seq)?;
        self.settle(store)
    }

    fn take_deltas(&mut self) -> Vec<TextDelta> {
        Vec::new()
    }

    fn finish_early(&mut self, store: &mut SeqStore, reason: FinishReason) -> Result<()> {
        self.cut_short = Some(reason);
        self.each_search(store, |search, cx| search.on_cut_short(cx))
    }

    fn outputs(&self) -> Vec<RowOutput> {
        let mut outs = Vec::new();
        for (owner, search) in self.searches.iter().enumerate() {
            let mine = search.outputs();
            let single = mine.len() == 1;
            for mut out in mine {
                if single && out.tokens_spent == 0 {
                    out.tokens_spent = self.pool.spent(owner);
                }
                if let (None, Some(tok)) = (&out.text, self.pool.tokenizer()) {
                    out.text = tok.decode(&out.token_ids, true).ok();
                }
                if out.token_ids.last().is_some_and(|t| self.pool.is_eos(*t)) {
                    out.finish_reason = super::FinishReason::Eos;
                }
                if let Some(reason) = self.cut_short {
                    out.finish_reason = reason;
                }
                outs.push(out);
            }
        }
        outs
    }
}
