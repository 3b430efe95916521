//! The one rule set that reads answers out of replies, for voting (self-consistency, MCTS,
//! adaptive compute) and for grading (`peftscale.eval`) alike, and the canonical spelling it gives
//! them: two replies that state the same answer in different ways extract to the same string.
//!
//! - Numbers: `1,250` -> `1250`, `2.50` -> `2.5`, `3/4` and `0.75` -> `0.75`, `1/3` -> `1/3`,
//!   `50%` -> `50`, `−7` (U+2212) -> `-7`. A minus sign right after a letter, digit or closing
//!   bracket is subtraction, not a sign (`x-5` and `10-5` end in `5`; `is -12` is negative).
//!   Commas group thousands only in threes (`2,3` is two numbers).
//! - MATH answers: the last `\boxed{}` or `\fbox{}`, else what follows the last "answer is",
//!   else the last number; normalised so that `\dfrac12`, `\frac{1}{2}`, `1/2` and `0.5` are one
//!   answer, as are `90^\circ` and `90`, `x = 5` and `5`, `\$12` and `12`, `12 \text{ cm}` and
//!   `12`.

use std::sync::OnceLock;

use regex::Regex;

/// The canonical spelling of the last number in `text`, or `None` when it has none.
pub fn last_number(text: &str) -> Option<String> {
    numbers(text).last().map(|n| n.canonical())
}

/// `answer` (a whole string, such as a gold answer) in the spelling [`last_number`] gives: the
/// canonical number when the string is one number (with `$`, `%` or units around it), else the
/// trimmed string.
pub fn normalize_number(answer: &str) -> String {
    let found = numbers(answer);
    match found.as_slice() {
        [n] => n.canonical(),
        _ => answer.trim().to_string(),
    }
}

/// A number as written: its sign, digits before and after the point, and an optional
/// denominator.
#[derive(Debug, Clone)]
struct Number {
    negative: bool,
    int: String,
    frac: String,
    denominator: Option<String>,
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Every number in `text`, in order.
fn numbers(text: &str) -> Vec<Number> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts_fraction_only =
            chars[i] == '.' && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit());
        let glued = i > 0 && (is_word(chars[i - 1]) || chars[i - 1] == '.');
        if !(chars[i].is_ascii_digit() || starts_fraction_only) || glued {
            i += 1;
            continue;
        }
        let (int, mut j) = integer_part(&chars, i);
        let mut frac = String::new();
        if chars.get(j) == Some(&'.') && chars.get(j + 1).is_some_and(|c| c.is_ascii_digit()) {
            j += 1;
            while j < chars.len() && chars[j].is_ascii_digit() {
                frac.push(chars[j]);
                j += 1;
            }
        }
        // A simple fraction: whole numbers on both sides of one slash, the denominator not zero.
        let mut denominator = None;
        if frac.is_empty() && chars.get(j) == Some(&'/') {
            let mut k = j + 1;
            let mut den = String::new();
            while k < chars.len() && chars[k].is_ascii_digit() {
                den.push(chars[k]);
                k += 1;
            }
            let next_is_word_or_point = chars.get(k).is_some_and(|&c| is_word(c))
                || (chars.get(k) == Some(&'.')
                    && chars.get(k + 1).is_some_and(|c| c.is_ascii_digit()));
            if !den.is_empty() && !next_is_word_or_point && den.chars().any(|c| c != '0') {
                denominator = Some(den);
                j = k;
            }
        }
        out.push(Number {
            negative: is_sign(&chars, i),
            int,
            frac,
            denominator,
        });
        i = j.max(i + 1);
    }
    out
}

/// The digits of the integer part starting at `i` (thousands separators dropped) and where they
/// end. A comma groups thousands only when three digits follow it and no fourth.
fn integer_part(chars: &[char], i: usize) -> (String, usize) {
    let mut int = String::new();
    let mut j = i;
    while j < chars.len() && chars[j].is_ascii_digit() {
        int.push(chars[j]);
        j += 1;
    }
    // Grouped digits: the first group holds one to three digits.
    if (1..=3).contains(&int.len()) {
        loop {
            let group = chars.get(j + 1..j + 4);
            let is_group = chars.get(j) == Some(&',')
                && group.is_some_and(|g| g.iter().all(|c| c.is_ascii_digit()))
                && !chars.get(j + 4).is_some_and(|c| c.is_ascii_digit());
            if !is_group {
                break;
            }
            int.extend(&chars[j + 1..j + 4]);
            j += 4;
        }
    }
    (int, j)
}

/// Whether the number starting at `i` carries a minus sign: a `-` (or `−`) right before it that is
/// not subtraction, i.e. not itself right after a letter, digit or closing bracket (`x-5`, `10-5`
/// and `10 - 5` subtract; `is -12`, `(-3)` and `= -5` are negative).
fn is_sign(chars: &[char], i: usize) -> bool {
    if i == 0 || !matches!(chars[i - 1], '-' | '−') {
        return false;
    }
    let before = i.checked_sub(2).map(|j| chars[j]);
    !before.is_some_and(|c| is_word(c) || matches!(c, ')' | ']' | '}'))
}

impl Number {
    /// `-0012.500` -> `-12.5`; a fraction reduced to a terminating decimal where it has one
    /// (`3/4` -> `0.75`), else to lowest terms (`2/6` -> `1/3`); no `-0`.
    fn canonical(&self) -> String {
        let body = match &self.denominator {
            Some(den) => fraction(&self.int, den),
            None => decimal(&self.int, &self.frac),
        };
        if self.negative && body != "0" {
            format!("-{body}")
        } else {
            body
        }
    }
}

fn decimal(int: &str, frac: &str) -> String {
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        int.to_string()
    } else {
        format!("{int}.{frac}")
    }
}

fn fraction(num: &str, den: &str) -> String {
    let (Ok(n), Ok(d)) = (num.parse::<u128>(), den.parse::<u128>()) else {
        // Too long to reduce: the digits as written, without leading zeros.
        return format!("{}/{}", decimal(num, ""), decimal(den, ""));
    };
    let g = gcd(n, d);
    let (n, d) = (n / g, d / g);
    if d == 1 {
        return n.to_string();
    }
    // A terminating decimal when the denominator has no prime factors but 2 and 5.
    let (mut rest, mut digits) = (d, 0u32);
    while rest % 10 == 0 {
        rest /= 10;
        digits += 1;
    }
    while rest % 2 == 0 || rest % 5 == 0 {
        rest /= if rest % 2 == 0 { 2 } else { 5 };
        digits += 1;
    }
    if rest != 1 {
        return format!("{n}/{d}");
    }
    let scale = 10u128.checked_pow(digits);
    match scale.and_then(|s| n.checked_mul(s)) {
        Some(scaled) => {
            let scaled = scaled / d;
            let s = scale.unwrap_or(1);
            let frac = format!("{:0width$}", scaled % s, width = digits as usize);
            decimal(&(scaled / s).to_string(), &frac)
        }
        None => format!("{n}/{d}"),
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// The contents of the last `\boxed{...}` or `\fbox{...}` (braces balanced; `\boxed 5` takes the
/// next word), or `None`.
pub fn last_boxed(text: &str) -> Option<String> {
    let at = [text.rfind("\\boxed"), text.rfind("\\fbox")]
        .into_iter()
        .flatten()
        .max()?;
    let name = if text[at..].starts_with("\\boxed") {
        "\\boxed"
    } else {
        "\\fbox"
    };
    let rest = &text[at + name.len()..];
    if !rest.starts_with('{') {
        let word = rest.split_whitespace().next()?;
        let word = word.trim_end_matches(['$', '.']);
        return (!word.is_empty()).then(|| word.to_string());
    }
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(rest[1..i].trim().to_string());
                }
            }
            _ => {}
        }
    }
    None
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    // The patterns are constants of this module; a test compiles every one.
    cell.get_or_init(|| Regex::new(pattern).expect("a valid constant pattern"))
}

/// The MATH answer of a reply: the last `\boxed{}`, else the statement after the last "answer
/// is", else the last number; normalised by [`normalize_math`].
pub fn math_answer(text: &str) -> Option<String> {
    static ANSWER_IS: OnceLock<Regex> = OnceLock::new();
    let raw = last_boxed(text).or_else(|| {
        let m = re(
            &ANSWER_IS,
            r"(?i)answer is[:\s]*\$?([^$\n]+?)\$?\s*(?:\.\s*)?$",
        )
        .captures(text.trim())?;
        Some(m[1].to_string())
    });
    match raw {
        Some(raw) => Some(normalize_math(&raw)),
        None => last_number(text),
    }
}

/// A canonical spelling of a MATH answer: `\dfrac{1}{2}`, `\frac12`, `1/2` and `0.5` all become
/// `0.5`; `90^\circ` -> `90`; `\left( 3, \pi \right)` -> `(3,\pi)`; `x = 5` -> `5`; `\$12` ->
/// `12`; `50\%` -> `50`; `12 \text{ cm}` -> `12`. Applying it twice changes nothing.
pub fn normalize_math(answer: &str) -> String {
    static UNITS: OnceLock<Regex> = OnceLock::new();
    static TEXT: OnceLock<Regex> = OnceLock::new();
    static FRAC_SHORT: OnceLock<Regex> = OnceLock::new();
    static FRAC_HALF: OnceLock<Regex> = OnceLock::new();
    static SQRT_SHORT: OnceLock<Regex> = OnceLock::new();
    static FRAC: OnceLock<Regex> = OnceLock::new();
    static NUMBER: OnceLock<Regex> = OnceLock::new();

    let mut s = answer.trim().trim_matches('$').trim().to_string();
    for (from, to) in [
        ("\n", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\ ", ""),
        ("\\left", ""),
        ("\\right", ""),
        ("\\displaystyle", ""),
        ("dfrac", "frac"),
        ("tfrac", "frac"),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("\\circ", ""),
        ("\\$", ""),
        ("$", ""),
        ("\\%", ""),
        ("%", ""),
    ] {
        s = s.replace(from, to);
    }
    // Unit words after an answer ("12 \text{ cm}", "5 dollars"); no single letters, which are
    // variables.
    let units = re(
        &UNITS,
        r"\\?(?:text\{)?\s*(?:units?|cm|km|inches|inch|feet|foot|ft|degrees?|cents?|dollars?|hours?|minutes?|seconds?|meters?|miles?|mph|square units)\b\}?\s*$",
    );
    s = units.replace(&s, "").trim().to_string();
    s = re(&TEXT, r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
        .replace_all(&s, "$1")
        .into_owned();
    // "x = 5" -> "5" (a short left side naming the variable), not "x + y = 5".
    if s.matches('=').count() == 1 {
        if let Some((left, right)) = s.split_once('=') {
            if left.trim().chars().count() <= 2 {
                s = right.to_string();
            }
        }
    }
    s.retain(|c| c != ' ');
    s = re(&FRAC_SHORT, r"\\frac(\d)(\d)")
        .replace_all(&s, r"\frac{$1}{$2}")
        .into_owned();
    s = re(&FRAC_HALF, r"\\frac(\d)\{")
        .replace_all(&s, r"\frac{$1}{")
        .into_owned();
    s = re(&SQRT_SHORT, r"\\sqrt(\w)")
        .replace_all(&s, r"\sqrt{$1}")
        .into_owned();
    let s = s.trim_end_matches('.').to_string();
    let s = s.replace("{.", "{0.");
    // A number, or a fraction of two numbers, takes the number spelling: 1/2 = \frac{1}{2} = 0.5,
    // and thousands grouped in threes are one number (`58,500`), where `-2,1` stays a list.
    let number = re(
        &NUMBER,
        r"^-?(?:\d+(?:\.\d*)?|\.\d+|\d{1,3}(?:,\d{3})+(?:\.\d+)?)(?:/\d+)?$",
    );
    if number.is_match(&s) {
        return normalize_number(&s);
    }
    if let Some(m) = re(&FRAC, r"^(-?)\\frac\{(-?[\d.]+)\}\{([\d.]+)\}$").captures(&s) {
        if let Some(v) = frac_value(&m[2], &m[3]) {
            // Negative when exactly one of the outer sign and the value's own sign is there.
            let negative = m[1].is_empty() == v.starts_with('-');
            let v = v.trim_start_matches('-');
            return if negative && v != "0" {
                format!("-{v}")
            } else {
                v.to_string()
            };
        }
    }
    s
}

/// `num / den` for decimal numerator and denominator, in the number spelling, or `None` when
/// the denominator is zero.
fn frac_value(num: &str, den: &str) -> Option<String> {
    let split = |s: &str| -> (String, u32) {
        let (i, f) = s.split_once('.').unwrap_or((s, ""));
        (format!("{i}{f}"), f.len() as u32)
    };
    let negative = num.starts_with('-');
    let (n, n_places) = split(num.trim_start_matches('-'));
    let (d, d_places) = split(den);
    if d.chars().all(|c| c == '0') {
        return None;
    }
    // n·10^-a / (d·10^-b) = (n·10^b) / (d·10^a).
    let (n, d) = (
        format!("{n}{}", "0".repeat(d_places as usize)),
        format!("{d}{}", "0".repeat(n_places as usize)),
    );
    let body = fraction(&n, &d);
    Some(if negative && body != "0" {
        format!("-{body}")
    } else {
        body
    })
}

/// A multiple-choice letter A-J: the last `(X)`, else the letter after the last "answer is" or
/// "answer:", else the whole trimmed text when it is one letter.
pub fn choice_letter(text: &str) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_take_one_spelling() {
        let n = |t: &str| last_number(t);
        for (text, want) in [
            ("so 3 + 4 = 7.", Some("7")),
            ("#### 1,234.50", Some("1234.5")),
            ("it is -12 degrees", Some("-12")),
            ("x-5", Some("5")),
            ("10 - 5", Some("5")),
            ("= −7", Some("-7")),
            ("7.0 apples", Some("7")),
            ("3/4", Some("0.75")),
            ("2/6 of it", Some("1/3")),
            ("2,3", Some("3")),
            ("1,2345", Some("2345")),
            ("50%", Some("50")),
            (".5 cups", Some("0.5")),
            ("7/0", Some("0")),
            ("-0", Some("0")),
            ("H2O", None),
            ("no digits", None),
        ] {
            assert_eq!(n(text).as_deref(), want, "{text}");
        }
    }

    #[test]
    fn math_answers_and_their_spellings() {
        for spelling in [r"\frac{1}{2}", "1/2", "0.5", r"\dfrac12", r"\frac12", ".50"] {
            assert_eq!(normalize_math(spelling), "0.5", "{spelling}");
        }
        assert_eq!(normalize_math(r"-\frac{3}{4}"), "-0.75");
        assert_eq!(normalize_math(r"\frac{1}{3}"), "1/3");
        assert_eq!(normalize_math(r"\frac{\sqrt{3}}{2}"), r"\frac{\sqrt{3}}{2}");
        assert_eq!(normalize_math(r"90^\circ"), "90");
        assert_eq!(normalize_math(r"x = 5"), "5");
        assert_eq!(normalize_math(r"12 \text{ cm}"), "12");
        assert_eq!(normalize_math("58,500"), "58500");
        assert_eq!(normalize_math("-2,1"), "-2,1");
        assert_eq!(normalize_math("(1,234)"), "(1,234)");
        assert_eq!(
            math_answer(r"so \boxed{1} or \fbox{\frac{1}{2}} ").as_deref(),
            Some("0.5")
        );
        assert_eq!(math_answer(r"\boxed{open"), None);
        assert_eq!(math_answer("The answer is 42.").as_deref(), Some("42"));
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for s in [
            r"\frac{1}{2}",
            r"\left( 3, \frac{\pi}{2} \right)",
            "1,234",
            r"11\sqrt2",
            "-0.75",
            "1/3",
            r"\text{Evelyn}",
        ] {
            let once = normalize_math(s);
            assert_eq!(normalize_math(&once), once, "{s}");
            let once = normalize_number(s);
            assert_eq!(normalize_number(&once), once, "{s}");
        }
    }

    #[test]
    fn choice_letters() {
        assert_eq!(choice_letter("I pick (B), no (C).").as_deref(), Some("C"));
        assert_eq!(choice_letter("The answer is D.").as_deref(), Some("D"));
        assert_eq!(choice_letter("The answer is Dog"), None);
        assert_eq!(choice_letter(" E ").as_deref(), Some("E"));
        assert_eq!(choice_letter("A cat sat"), None);
    }
}
