//! Stop strings, matched on decoded text so that a string split across tokens still stops.

/// Finds the earliest stop string in generated text and tells how much text is safe to stream.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    pub fn strings(&self) -> &[String] {
        &self.stops
    }

    /// Byte offset where the earliest stop string starts in `text`, if any occurs.
    pub fn find(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// Length of the prefix of `text` that can be shown now: it excludes a tail that may be the
    /// start of a stop string, and an incomplete UTF-8 character that decodes as U+FFFD.
    pub fn safe_prefix_len(&self, text: &str) -> usize {
        let mut end = text.len();
        if text.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if text[..end].ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        end - hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_earliest_stop_and_holds_back_partial_matches() {
        let m = StopMatcher::new(vec!["###".into(), "\n\n".into()]);
        assert_eq!(m.find("abc\n\nx###"), Some(3));
        assert_eq!(m.find("abc"), None);
        assert_eq!(m.safe_prefix_len("abc##"), 3);
        assert_eq!(m.safe_prefix_len("abc\n"), 3);
        assert_eq!(m.safe_prefix_len("abc"), 3);
        assert_eq!(m.safe_prefix_len("ab\u{FFFD}"), 2);
    }
}
