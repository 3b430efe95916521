//! User callbacks a search calls at step boundaries (never inside the per-token loop): scorers,
//! answer extractors, state evaluators and rewards. The Python bindings wrap Python callables in
//! these; Rust users pass closures.

use std::fmt;
use std::sync::Arc;

use crate::error::Result;

type ScoreManyFn = dyn Fn(&str, &[&str]) -> Result<Vec<f64>> + Send + Sync;
type ExtractAnswerFn = dyn Fn(&str) -> Result<Option<String>> + Send + Sync;

/// Scores completions of a prompt, higher is better. A search calls it once per step with every
/// candidate of that step: `(prompt, [completion, ...]) -> [score, ...]`.
#[derive(Clone)]
pub struct Scorer(pub Arc<ScoreManyFn>);

/// Values a partial solution (a Tree-of-Thought state): `(prompt, state) -> value`.
pub type Evaluator = Scorer;

/// Pulls the final answer out of a completion: `text -> answer`, `None` when there is none.
#[derive(Clone)]
pub struct ExtractFn(pub Arc<ExtractAnswerFn>);

impl Scorer {
    /// A scorer of one completion at a time: `(prompt, completion) -> score`.
    pub fn new(f: impl Fn(&str, &str) -> Result<f64> + Send + Sync + 'static) -> Self {
        Self(Arc::new(move |prompt: &str, completions: &[&str]| {
            completions.iter().map(|c| f(prompt, c)).collect()
        }))
    }

    /// A scorer of all candidates of a step at once.
    pub fn batch(f: impl Fn(&str, &[&str]) -> Result<Vec<f64>> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Every completion's score, each checked to be finite; `what` names the callback in errors.
    pub fn call_many(&self, what: &str, prompt: &str, completions: &[&str]) -> Result<Vec<f64>> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let scores = (self.0)(prompt, completions)?;
        if scores.len() != completions.len() {
            return Err(crate::error::Error::Callback {
                what: what.to_string(),
                message: format!(
                    "returned {} scores for {} completions",
                    scores.len(),
                    completions.len()
                ),
            });
        }
        scores
            .into_iter()
            .map(|s| super::best_of_n::finite(what, s))
            .collect()
    }
}

impl ExtractFn {
    pub fn new(f: impl Fn(&str) -> Result<Option<String>> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl fmt::Debug for Scorer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scorer(<callback>)")
    }
}

impl fmt::Debug for ExtractFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExtractFn(<callback>)")
    }
}
