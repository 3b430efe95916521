//! Answers out of completions, and votes over them: the extractors, majority and weighted
//! votes with a documented tie-break, and Adaptive-Consistency's Beta stopping rule.

use super::callbacks::ExtractFn;
use crate::error::Result;

/// How the final answer is read from a completion.
#[derive(Debug, Clone)]
pub enum Extractor {
    /// The last number in the text (`1,234.50` -> `1234.5`, `-3` -> `-3`).
    LastNumber,
    /// The contents of the last `\boxed{...}` (braces balanced), trimmed.
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
        Extractor::LastNumber => last_number(text),
        Extractor::Boxed => last_boxed(text),
        Extractor::ChoiceLetter => choice_letter(text),
        Extractor::Callback(f) => (f.0)(text)?,
    })
}

fn last_number(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut end = b.len();
    // Scan backwards for the last digit, then take the number it ends.
    while end > 0 && !b[end - 1].is_ascii_digit() {
        end -= 1;
    }
    if end == 0 {
        return None;
    }
    let mut start = end;
    while start > 0 {
        let c = b[start - 1];
        let digit_before = start >= 2 && b[start - 2].is_ascii_digit();
        if c.is_ascii_digit() || ((c == b',' || c == b'.') && digit_before) {
            start -= 1;
        } else {
            break;
        }
    }
    let negative = start > 0 && b[start - 1] == b'-';
    let raw: String = text[start..end].chars().filter(|&c| c != ',').collect();
    Some(normalise_number(&raw, negative))
}

/// `"12.50"` -> `"12.5"`, `"7.0"` -> `"7"`, `"007"` -> `"7"`, with the sign kept (but no `-0`).
fn normalise_number(raw: &str, negative: bool) -> String {
    let (int, frac) = match raw.split_once('.') {
        Some((i, f)) => (i, f.trim_end_matches('0')),
        None => (raw, ""),
    };
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let body = if frac.is_empty() {
        int.to_string()
    } else {
        format!("{int}.{frac}")
    };
    if negative && body != "0" {
        format!("-{body}")
    } else {
        body
    }
}

fn last_boxed(text: &str) -> Option<String> {
    let at = text.rfind("\\boxed{")?;
    let inner = &text[at + "\\boxed{".len()..];
    let mut depth = 1;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(inner[..i].trim().to_string());
                }
            }
            _ => {}
        }
    }
    None
}

fn choice_letter(text: &str) -> Option<String> {
    let is_choice = |c: u8| (b'A'..=b'J').contains(&c);
    let b = text.as_bytes();
    for i in (0..b.len().saturating_sub(2)).rev() {
        if b[i] == b'(' && is_choice(b[i + 1]) && b[i + 2] == b')' {
            return Some((b[i + 1] as char).to_string());
        }
    }
    let lower = text.to_ascii_lowercase();
    for key in ["answer is", "answer:"] {
        if let Some(at) = lower.rfind(key) {
            let rest = text[at + key.len()..].trim_start();
            let mut chars = rest.chars();
            if let Some(c) = chars.next() {
                let next_is_word = chars.next().is_some_and(|n| n.is_ascii_alphanumeric());
                if c.is_ascii() && is_choice(c as u8) && !next_is_word {
                    return Some(c.to_string());
                }
            }
        }
    }
    let t = text.trim();
    (t.len() == 1 && is_choice(t.as_bytes()[0])).then(|| t.to_string())
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
    fn extractors() {
        let n = |t: &str| last_number(t);
        assert_eq!(n("so 3 + 4 = 7.").as_deref(), Some("7"));
        assert_eq!(n("#### 1,234.50").as_deref(), Some("1234.5"));
        assert_eq!(n("it is -12 degrees").as_deref(), Some("-12"));
        assert_eq!(n("x-5").as_deref(), Some("-5"));
        assert_eq!(n("7.0 apples").as_deref(), Some("7"));
        assert_eq!(n("no digits"), None);
        assert_eq!(
            last_boxed(r"so \boxed{1} or \boxed{\frac{1}{2}} ").as_deref(),
            Some(r"\frac{1}{2}")
        );
        assert_eq!(last_boxed(r"\boxed{open"), None);
        assert_eq!(choice_letter("I pick (B), no (C).").as_deref(), Some("C"));
        assert_eq!(choice_letter("The answer is D.").as_deref(), Some("D"));
        assert_eq!(choice_letter("The answer is Dog"), None);
        assert_eq!(choice_letter(" E ").as_deref(), Some("E"));
        assert_eq!(choice_letter("A cat sat"), None);
    }

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
