//! The answer rules of the search strategies, for Python's graders: `ps.extract_answer`,
//! `ps.normalize_answer` and `ps.vote` call the very functions that self-consistency, MCTS and
//! adaptive compute vote with.

use peftscale_core::search::{extract, tally, Extractor};
use pyo3::prelude::*;

use crate::InvalidArgument;

/// The built-in extractor named `kind`.
pub(crate) fn named_extractor(kind: &str) -> PyResult<Extractor> {
    match kind {
        "last_number" => Ok(Extractor::LastNumber),
        "boxed" => Ok(Extractor::Boxed),
        "choice_letter" => Ok(Extractor::ChoiceLetter),
        other => Err(InvalidArgument::new_err(format!(
            "invalid argument: extract must be 'last_number', 'boxed', 'choice_letter' or a \
             callable, got '{other}'"
        ))),
    }
}

/// The answer `kind` reads from `text`, in its canonical spelling, or None.
#[pyfunction]
#[pyo3(signature = (text, kind = "last_number"))]
pub(crate) fn extract_answer(text: &str, kind: &str) -> PyResult<Option<String>> {
    let extractor = named_extractor(kind)?;
    extract(&extractor, text).map_err(crate::to_py)
}

/// `answer` (a whole answer, such as a gold one) in the spelling `extract_answer` gives.
#[pyfunction]
#[pyo3(signature = (answer, kind = "last_number"))]
pub(crate) fn normalize_answer(answer: &str, kind: &str) -> PyResult<String> {
    use peftscale_core::search::extract as rules;
    Ok(match named_extractor(kind)? {
        Extractor::Boxed => rules::normalize_math(answer),
        Extractor::ChoiceLetter => answer.trim().to_ascii_uppercase(),
        _ => rules::normalize_number(answer),
    })
}

/// The vote of self-consistency over `texts`: `(answer, votes)` pairs, most votes first, ties in
/// order of first appearance; texts without an answer do not vote.
#[pyfunction]
#[pyo3(signature = (texts, kind = "last_number", weights = None))]
pub(crate) fn vote(
    texts: Vec<String>,
    kind: &str,
    weights: Option<Vec<f64>>,
) -> PyResult<Vec<(String, f64)>> {
    let extractor = named_extractor(kind)?;
    let weights = weights.unwrap_or_else(|| vec![1.0; texts.len()]);
    if weights.len() != texts.len() {
        return Err(InvalidArgument::new_err(format!(
            "invalid argument: {} weights for {} texts",
            weights.len(),
            texts.len()
        )));
    }
    let answers = texts
        .iter()
        .map(|t| extract(&extractor, t))
        .collect::<peftscale_core::Result<Vec<_>>>()
        .map_err(crate::to_py)?;
    Ok(tally(answers.iter().map(|a| a.as_deref()).zip(weights)))
}
