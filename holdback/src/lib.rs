//! Streaming stop-string matching with minimal hold-back.
//!
//! Text arrives in chunks (detokenized deltas); stop strings may span chunk boundaries.
//! The rule: emit only the text that can no longer become part of a match, and hold back
//! the shortest suffix that could still start one. When a stop string completes, the text
//! before it is emitted and the stream ends; the stop string itself is never emitted.
//!
//! This crate is pure Rust with no dependencies so the host and the plugin SDK (compiled to
//! wasm32-wasip2) share one implementation.

/// What one [`StopMatcher::push`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    /// Text that is safe to emit now.
    pub text: String,
    /// The index (into the patterns given to [`StopMatcher::new`]) of the stop string that
    /// matched; once set, the stream is over and later pushes emit nothing.
    pub stopped: Option<usize>,
}

/// Matches a set of stop strings against a stream of text chunks.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    patterns: Vec<String>,
    /// Text received but not emitted: always a (possibly empty) prefix of some pattern.
    pending: String,
    stopped: Option<usize>,
}

impl StopMatcher {
    /// Builds a matcher; empty patterns are ignored (they would match everywhere).
    pub fn new<I, S>(patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let patterns = patterns.into_iter().map(Into::into).collect();
        StopMatcher { patterns, pending: String::new(), stopped: None }
    }

    /// Whether a stop string has matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// Text currently held back (a prefix of some stop string).
    pub fn held(&self) -> &str {
        &self.pending
    }

    /// Feeds one chunk; returns what may be emitted now and whether the stream stopped.
    pub fn push(&mut self, chunk: &str) -> Step {
        if self.stopped.is_some() {
            return Step { text: String::new(), stopped: self.stopped };
        }
        self.pending.push_str(chunk);
        if let Some((at, idx)) = earliest_match(&self.pending, &self.patterns) {
            self.pending.truncate(at);
            self.stopped = Some(idx);
            return Step { text: std::mem::take(&mut self.pending), stopped: Some(idx) };
        }
        let keep = held_suffix_len(&self.pending, &self.patterns);
        let rest = self.pending.split_off(self.pending.len() - keep);
        let text = std::mem::replace(&mut self.pending, rest);
        Step { text, stopped: None }
    }

    /// Ends the stream: the held-back text can no longer become a match, so it is released
    /// (nothing if a stop string matched).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// The match that completes first in the stream: its start offset and pattern index.
/// "First" is by end position, so the answer does not depend on how the text was chunked;
/// when two matches end at the same byte, the pattern listed first wins.
fn earliest_match(text: &str, patterns: &[String]) -> Option<(usize, usize)> {
    patterns
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.is_empty())
        .filter_map(|(idx, p)| text.find(p.as_str()).map(|at| (at + p.len(), idx, at)))
        .min()
        .map(|(_, idx, at)| (at, idx))
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of a pattern:
/// the text that could still start a match and so must be held back.
///
/// The suffix always starts on a char boundary: its first byte equals a pattern's first
/// byte, which is never a UTF-8 continuation byte.
pub fn held_suffix_len(text: &str, patterns: &[String]) -> usize {
    let bytes = text.as_bytes();
    patterns
        .iter()
        .map(|p| {
            let p = p.as_bytes();
            let longest = p.len().saturating_sub(1).min(bytes.len());
            (1..=longest).rev().find(|&n| bytes[bytes.len() - n..] == p[..n]).unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(patterns: &[&str], chunks: &[&str]) -> (String, Option<usize>) {
        let mut m = StopMatcher::new(patterns.iter().copied());
        let mut out = String::new();
        for c in chunks {
            let step = m.push(c);
            out.push_str(&step.text);
            if step.stopped.is_some() {
                return (out, step.stopped);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn cuts_before_a_stop_split_across_chunks() {
        assert_eq!(run(&["STOP"], &["hello ST", "O", "P world"]), ("hello ".into(), Some(0)));
    }

    #[test]
    fn holds_back_only_a_possible_prefix() {
        let mut m = StopMatcher::new(["</end>"]);
        assert_eq!(m.push("a </e").text, "a ");
        assert_eq!(m.held(), "</e");
        // The held text turns out not to be a stop: released at once.
        assert_eq!(m.push("x").text, "</ex");
        assert_eq!(m.held(), "");
    }

    #[test]
    fn releases_held_text_at_finish() {
        assert_eq!(run(&["###"], &["a#", "#"]), ("a##".into(), None));
    }

    #[test]
    fn the_stop_that_completes_first_wins() {
        assert_eq!(run(&["world", "lo"], &["hello world"]), ("hel".into(), Some(1)));
        // "abc" could begin earlier, but "b" completes first.
        assert_eq!(run(&["abc", "b"], &["ab", "c"]), ("a".into(), Some(1)));
    }

    #[test]
    fn multibyte_text_is_never_split() {
        let (out, stopped) = run(&["€€"], &["a€", "b€", "€c"]);
        assert_eq!((out.as_str(), stopped), ("a€b", Some(0)));
    }

    #[test]
    fn empty_patterns_are_ignored() {
        assert_eq!(run(&[""], &["abc"]), ("abc".into(), None));
    }

    /// The definition, independent of the implementation: grow the text one char at a
    /// time and cut at the first stop string that ends there.
    fn reference(text: &str, patterns: &[String]) -> (String, Option<usize>) {
        for (end, _) in text.char_indices().skip(1).chain([(text.len(), ' ')]) {
            for (idx, p) in patterns.iter().enumerate() {
                if !p.is_empty() && text[..end].ends_with(p.as_str()) {
                    return (text[..end - p.len()].to_string(), Some(idx));
                }
            }
        }
        (text.to_string(), None)
    }

    proptest! {
        /// However the text is chunked, the output equals the whole text cut before its
        /// first stop string, and what was emitted is never taken back.
        #[test]
        fn chunking_never_changes_the_result(
            text in "[ab€]{0,40}",
            patterns in proptest::collection::vec("[ab€]{1,4}", 1..4),
            cuts in proptest::collection::vec(0usize..60, 0..8),
        ) {
            let chars: Vec<char> = text.chars().collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(chars.len())).collect();
            cuts.sort();
            let mut chunks = Vec::new();
            let mut last = 0;
            for c in cuts.into_iter().chain([chars.len()]) {
                chunks.push(chars[last..c].iter().collect::<String>());
                last = c;
            }
            let mut m = StopMatcher::new(patterns.clone());
            let mut out = String::new();
            let mut stopped = None;
            for c in &chunks {
                let step = m.push(c);
                out.push_str(&step.text);
                // Emitted text is always a prefix of the final answer.
                let (want, _) = reference(&text, &patterns);
                prop_assert!(want.starts_with(&out));
                if step.stopped.is_some() { stopped = step.stopped; break; }
            }
            if stopped.is_none() { out.push_str(&m.finish()); }
            let (want, want_stop) = reference(&text, &patterns);
            prop_assert_eq!(out, want);
            prop_assert_eq!(stopped.is_some(), want_stop.is_some());
        }

        /// The held-back text is always a proper prefix of some pattern.
        #[test]
        fn held_text_is_a_pattern_prefix(
            text in "[ab]{0,20}",
            patterns in proptest::collection::vec("[ab]{1,5}", 1..3),
        ) {
            let mut m = StopMatcher::new(patterns.clone());
            m.push(&text);
            if !m.is_stopped() && !m.held().is_empty() {
                prop_assert!(patterns.iter().any(|p| p.starts_with(m.held()) && p.len() > m.held().len()));
            }
        }
    }
}
