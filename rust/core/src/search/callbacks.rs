//! User callbacks a search calls at step boundaries (never inside the per-token loop): scorers,
//! answer extractors, state evaluators and rewards. The Python bindings wrap Python callables in
//! these; Rust users pass closures.

use std::fmt;
use std::sync::Arc;

use crate::error::Result;

type ScoreFn = dyn Fn(&str, &str) -> Result<f64> + Send + Sync;
type ExtractAnswerFn = dyn Fn(&str) -> Result<Option<String>> + Send + Sync;

/// Scores a completion of a prompt: `(prompt, completion) -> score`, higher is better.
#[derive(Clone)]
pub struct Scorer(pub Arc<ScoreFn>);

/// Values a partial solution (a Tree-of-Thought state): `(prompt, state) -> value`.
pub type Evaluator = Scorer;

/// Pulls the final answer out of a completion: `text -> answer`, `None` when there is none.
#[derive(Clone)]
pub struct ExtractFn(pub Arc<ExtractAnswerFn>);

impl Scorer {
    pub fn new(f: impl Fn(&str, &str) -> Result<f64> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub fn call(&self, prompt: &str, completion: &str) -> Result<f64> {
        (self.0)(prompt, completion)
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
