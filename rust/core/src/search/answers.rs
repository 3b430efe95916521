//! Answers out of completions, and votes over them: the extractors, majority and weighted
//! votes with a documented tie-break, and Adaptive-Consistency's Beta stopping rule.

use super::callbacks::ExtractFn;
use super::extract as rules;
use crate::error::Result;

/// How the final answer is read from a completion.
#[derive(Debug, Clone)]
pub enum Extractor {
    /// The last number in the text, in one spelling (`1,234.50` -> `1234.5`, `3/4` -> `0.75`):
    /// see [`extract`](super::extract).
    LastNumber,
    /// A MATH answer: the last `\boxed{...}` (braces balanced), else what follows "answer is",
    /// else the last number, normalised so that equivalent spellings are one answer.
    Boxed,
    /// A multiple-choice letter A-J: the last `(X)`, else the letter after the last "answer is"
    /// or "answer:", else the whole trimmed text when it is one letter.
    ChoiceLetter,
    Callback(ExtractFn),
}

/// How the votes of the answers are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vote {
    /// One vote per completion with an answer.
    Majority,
    /// Each completion votes with its weight (its mean token probability or a scorer's value).
    Weighted,
}

pub fn extract(extractor: &Extractor, text: &str) -> Result<Option<String>> {
    Ok(match extractor {
        Extractor::LastNumber => rules::last_number(text),
        Extractor::Boxed => rules::math_answer(text),
        Extractor::ChoiceLetter => rules::choice_letter(text),
        Extractor::Callback(f) => (f.0)(text)?,
    })
}

/// Votes per answer, largest first; ties keep the order in which answers first appeared, so
/// the winner of a tie is the answer sampled first. Completions without an answer do not vote.
pub fn tally<'a>(answers: impl IntoIterator<Item = (Option<&'a str>, f64)>) -> Vec<(String, f64)> {
    let mut votes: Vec<(String, f64)> = Vec::new();
    for (answer, weight) in answers {
        let Some(a) = answer else { continue };
        match votes.iter_mut().find(|(v, _)| v == a) {
            Some(v) => v.1 += weight,
            None => votes.push((a.to_string(), weight)),
        }
    }
    // A stable sort keeps first-seen order among equal counts.
    votes.sort_by(|x, y| y.1.total_cmp(&x.1));
    votes
}

/// Adaptive-Consistency's stopping probability (Aggarwal et al. 2023): with `top` votes for the
/// leading answer and `second` for the runner-up, `P(p_top > p_second)` where
/// `p_top ~ Beta(top + 1, second + 1)` over the two, i.e. `P(X > 1/2)` for that Beta. For whole
/// counts this is the binomial sum `sum_{j<=top} C(n, j) / 2^n` with `n = top + second + 1`.
pub fn beta_confidence(top: usize, second: usize) -> f64 {
    let n = top + second + 1;
    let ln2 = std::f64::consts::LN_2;
    // ln C(n, j) built up term by term, summed in log space.
    let mut ln_c = 0.0f64;
    let mut terms = Vec::with_capacity(top + 1);
    for j in 0..=top {
        if j > 0 {
            ln_c += ((n - j + 1) as f64).ln() - (j as f64).ln();
        }
        terms.push(ln_c - n as f64 * ln2);
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = terms.iter().map(|t| (t - max).exp()).sum();
    (max + sum.ln()).exp().min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_the_first_seen_answer() {
        let v = tally([
            (Some("5"), 1.0),
            (None, 1.0),
            (Some("7"), 1.0),
            (Some("7"), 1.0),
            (Some("5"), 1.0),
            (Some("9"), 1.0),
        ]);
        assert_eq!(v[0], ("5".to_string(), 2.0));
        assert_eq!(v[1], ("7".to_string(), 2.0));
        assert_eq!(v[2], ("9".to_string(), 1.0));
        let w = tally([(Some("5"), 0.2), (Some("7"), 0.9)]);
        assert_eq!(w[0].0, "7");
    }

    #[test]
    fn beta_confidence_matches_the_integral() {
        // P(X > 1/2) for X ~ Beta(a, b), integrated numerically, against the closed form.
        for (top, second) in [(0, 0), (1, 0), (3, 1), (5, 2), (8, 0), (4, 4), (20, 11)] {
            let (a, b) = ((top + 1) as f64, (second + 1) as f64);
            let density = |x: f64| x.powf(a - 1.0) * (1.0 - x).powf(b - 1.0);
            let steps = 200_000;
            let (mut upper, mut all) = (0.0, 0.0);
            for i in 0..steps {
                let x = (i as f64 + 0.5) / steps as f64;
                all += density(x);
                if x > 0.5 {
                    upper += density(x);
                }
            }
            let want = upper / all;
            let got = beta_confidence(top, second);
            assert!((got - want).abs() < 1e-6, "{top},{second}: {got} vs {want}");
        }
        assert_eq!(beta_confidence(0, 0), 0.5);
    }
}
