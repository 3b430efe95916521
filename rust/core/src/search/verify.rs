//! A verifier inside a search: its rows run in the same forward passes as the policy's.
//!
//! A [`Grader`] serves one prompt. It feeds the prompt once to a verifier sequence (the root);
//! every text to score is then a fork of the root, or of an earlier scored sequence (a beam's
//! steps so far), fed the new tokens in one row whose output is the value head's logit at every
//! position. The head is read where each step tag ends, as training reads it: at the token that
//! holds the tag's last byte.
//!
//! When the verifier's adapter computes what the policy's does on the bottom layers (it was
//! trained with those layers left as the policy has them), it shares them: the policy's rows keep
//! their hidden states entering the first layer that differs, and a scored text the policy
//! generated enters the verifier there, its lower layers' keys and values copied from the
//! policy's cache. Scoring then costs the upper layers alone; the tokens the policy never fed
//! (the last one sampled, a closing tag) run through every layer in a second pass.

use std::collections::HashMap;
use std::sync::Arc;

use super::best_of_n::PromptJob;
use super::branch::{BranchId, Finished};
use super::driver::Cx;
use super::EntryHidden;
use crate::error::{Error, Result};
use crate::kv::SeqId;
use crate::lora::verifier::sigmoid;
use crate::lora::Verifier;
use crate::text::Tokenizer;

/// A scored text: the verifier's sequence after it and the probability of each step it ended.
#[derive(Debug, Clone)]
pub(crate) struct Scored {
    pub key: usize,
    /// The verifier's sequence with the text fed (without a closing tag the grader added):
    /// the caller's to fork (a beam's next step) or free.
    pub seq: SeqId,
    /// One probability per step tag in the text (at least one: a text that does not end with
    /// the tag is scored as if it did).
    pub steps: Vec<f64>,
}

/// What a finished branch was to a grader.
pub(crate) enum Taken {
    /// Not one of the grader's branches: the search's own.
    No,
    /// One of the grader's own feeds (the prompt's, a text's first part): nothing for the search.
    Own,
    /// A text the search asked to score.
    Scored(Scored),
}

struct Request {
    key: usize,
    from: Option<SeqId>,
    tokens: Vec<u32>,
    /// Trailing tokens of `tokens` that are the step tag added to close the text.
    closing: usize,
    /// The policy's sequence that generated the text, if its kept hidden states may be shared.
    source: Option<SeqId>,
    /// Head values of the tokens fed so far, one per token.
    values: Vec<f32>,
}

pub(crate) struct Grader {
    pub verifier: Arc<Verifier>,
    prompt: Arc<Vec<u32>>,
    /// Bottom layers the verifier computes as the policy does (0: none shared).
    shared: usize,
    root: Option<SeqId>,
    root_job: Option<BranchId>,
    /// Requests made before the root was fed.
    queued: Vec<Request>,
    /// Scoring branches in flight.
    jobs: HashMap<BranchId, Request>,
}

impl Grader {
    /// A grader for the texts `job`'s policy (its adapter, or the base model) generates after
    /// its prompt.
    pub fn new(verifier: Arc<Verifier>, job: &PromptJob) -> Self {
        let shared = verifier.adapter.shared_layers(job.adapter.as_deref());
        Self {
            verifier,
            prompt: job.prompt.clone(),
            shared,
            root: None,
            root_job: None,
            queued: Vec::new(),
            jobs: HashMap::new(),
        }
    }

    /// Feeds the prompt to the verifier (in the same pass as the policy's prefill).
    pub fn start(&mut self, cx: &mut Cx<'_>) -> Result<()> {
        if self.shared > 0 {
            cx.pool.keep_trunk(cx.owner, self.shared);
        }
        let seq = cx.store.create();
        self.root_job = Some(self.feed(cx, seq, self.prompt.to_vec(), None)?);
        Ok(())
    }

    /// A branch feeding `tokens` to the verifier's sequence `seq`, entering at `entry`'s layer
    /// when given.
    fn feed(
        &self,
        cx: &mut Cx<'_>,
        seq: SeqId,
        tokens: Vec<u32>,
        entry: Option<Arc<EntryHidden>>,
    ) -> Result<BranchId> {
        let v = &self.verifier;
        cx.pool.spawn_scoring(
            cx.owner,
            seq,
            v.adapter.clone(),
            v.head.clone(),
            tokens,
            entry,
        )
    }

    /// Whether the verifier shares the policy's bottom layers: a text's policy sequence is then
    /// worth keeping until it is asked for ([`Self::request`]'s `source`).
    pub fn shares_layers(&self) -> bool {
        self.shared > 0
    }

    /// Whether scores are still to come.
    pub fn is_busy(&self) -> bool {
        !self.jobs.is_empty() || !self.queued.is_empty()
    }

    /// Scores `tokens` (generated text, end-of-sequence tokens included or not) after the prompt
    /// (`from: None`) or after the scored sequence `from` (which stays the caller's); the
    /// result comes back from [`Self::on_finished`] under `key`. `source` is the policy's
    /// sequence that generated them right after the same text, while it still holds them.
    pub fn request(
        &mut self,
        cx: &mut Cx<'_>,
        key: usize,
        from: Option<SeqId>,
        tokens: &[u32],
        source: Option<SeqId>,
    ) -> Result<()> {
        let (tokens, closing) = self.prepare(cx, tokens)?;
        let mut request = Request {
            key,
            from,
            tokens,
            closing,
            source,
            values: Vec::new(),
        };
        if self.root.is_none() && from.is_none() {
            // Fed later, when the policy's sequence may be gone.
            request.source = None;
            self.queued.push(request);
            return Ok(());
        }
        self.spawn(cx, request)
    }

    fn spawn(&mut self, cx: &mut Cx<'_>, mut r: Request) -> Result<()> {
        let from = r
            .from
            .or(self.root)
            .ok_or_else(|| Error::invalid("verifier: the prompt is not fed yet"))?;
        let seq = cx.store.fork(from)?;
        let at = cx.store.len(seq)?;
        let hidden = match r.source.take() {
            Some(src) if self.shared > 0 => {
                let generated = &r.tokens[..r.tokens.len() - r.closing];
                cx.store
                    .trunk(src, self.shared, at, generated)
                    .map(|h| (src, h))
            }
            _ => None,
        };
        let id = match hidden {
            Some((src, (n, hidden))) => {
                cx.store.adopt_lower_layers(seq, src, at, n, self.shared)?;
                let entry = EntryHidden {
                    layer: self.shared,
                    hidden,
                };
                self.feed(cx, seq, r.tokens[..n].to_vec(), Some(Arc::new(entry)))?
            }
            None => self.feed(cx, seq, r.tokens.clone(), None)?,
        };
        self.jobs.insert(id, r);
        Ok(())
    }

    /// The tokens to feed for generated `tokens` and how many of them close it: without
    /// end-of-sequence tokens (training never saw them), and closed by the step tag when the text
    /// does not already end with it (the verifier reads steps at their tags).
    fn prepare(&self, cx: &Cx<'_>, tokens: &[u32]) -> Result<(Vec<u32>, usize)> {
        let mut ids: Vec<u32> = tokens.to_vec();
        while ids.last().is_some_and(|&t| cx.pool.is_eos(t)) {
            ids.pop();
        }
        let tag = &self.verifier.step_tag;
        let mut closing = 0;
        if !cx.decode(&ids)?.ends_with(tag.as_str()) {
            let extra = cx.encode_continuation(tag)?;
            closing = extra.len();
            ids.extend(extra);
        }
        Ok((ids, closing))
    }

    /// Takes a finished branch if it is one of this grader's.
    pub fn on_finished(&mut self, done: &Finished, cx: &mut Cx<'_>) -> Result<Taken> {
        if self.root_job == Some(done.id) {
            self.root_job = None;
            self.root = Some(done.head.seq);
            for r in std::mem::take(&mut self.queued) {
                self.spawn(cx, r)?;
            }
            return Ok(Taken::Own);
        }
        let Some(mut r) = self.jobs.remove(&done.id) else {
            return Ok(Taken::No);
        };
        let fed = done
            .logits
            .as_ref()
            .map(|l| l.expert.clone())
            .ok_or_else(|| Error::invalid("verifier: a scoring row returned no values"))?;
        r.values.extend(fed.iter());
        if r.values.len() < r.tokens.len() {
            // The first part entered above the shared layers; the rest runs through all of them.
            let rest = r.tokens[r.values.len()..].to_vec();
            let id = self.feed(cx, done.head.seq, rest, None)?;
            self.jobs.insert(id, r);
            return Ok(Taken::Own);
        }
        let Request {
            key,
            tokens,
            closing,
            values,
            ..
        } = r;
        if values.len() != tokens.len() {
            return Err(Error::invalid(format!(
                "verifier: {} values for {} fed tokens",
                values.len(),
                tokens.len()
            )));
        }
        let ends = step_ends(cx.tokenizer()?, &tokens, &self.verifier.step_tag)?;
        let steps = ends.iter().map(|&i| sigmoid(values[i])).collect();
        // The closing tag is taken back: the sequence holds the generated text alone, so a step
        // scored after it continues from the same text as the policy.
        cx.store.truncate_tail(done.head.seq, closing)?;
        Ok(Taken::Scored(Scored {
            key,
            seq: done.head.seq,
            steps,
        }))
    }

    /// Frees the prompt's verifier sequence (the search is over).
    pub fn release(&mut self, cx: &mut Cx<'_>) {
        if let Some(root) = self.root.take() {
            cx.store.free(root);
        }
    }

    /// One score for a finished solution from its step probabilities.
    pub fn aggregate(&self, steps: &[f64]) -> f64 {
        self.verifier.aggregation.apply(steps).unwrap_or(0.0)
    }
}

/// The index of the token holding the last byte of each occurrence of `tag` in the text of
/// `tokens` (the last token when the tag does not occur).
pub(crate) fn step_ends(tok: &Tokenizer, tokens: &[u32], tag: &str) -> Result<Vec<usize>> {
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    let text = tok.decode(tokens, false)?;
    let mut ends = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find(tag) {
        from += at + tag.len();
        ends.push(from);
    }
    let mut out = Vec::with_capacity(ends.len().max(1));
    for end in ends {
        // The first prefix of the tokens whose text reaches `end` (prefix texts grow with the
        // prefix, so a binary search finds it).
        let (mut lo, mut hi) = (0, tokens.len() - 1);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if tok.decode(&tokens[..=mid], false)?.len() >= end {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        if out.last() != Some(&lo) {
            out.push(lo);
        }
    }
    if out.is_empty() {
        out.push(tokens.len() - 1);
    }
    Ok(out)
}
