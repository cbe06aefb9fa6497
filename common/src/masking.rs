//! Secret masking: every occurrence of a secret's value in a log line, an
//! error message or a stored line becomes `***`.
//!
//! A [`Masker`] is built once per stage attempt from the secrets' values.
//! [`Masker::mask`] handles a complete string; a [`MaskStream`] handles output
//! that arrives in chunks of any size, so a secret written in two parts (two
//! `write`s, two reads of a pipe) is still masked. Both give the same result
//! for the same bytes.
//!
//! What is masked:
//! - every occurrence of every secret value, without the whitespace around
//!   it (a value read from a file often ends in a newline that the program
//!   does not print); for a value of several lines (a PEM key), also each of
//!   its lines on its own, trimmed, because programs print such values line
//!   by line (GitHub Actions does the same). A multi-line value printed whole
//!   becomes a single `***`;
//! - occurrences that overlap or touch nothing else become one `***` each;
//!   overlapping ones (`abcd` and `cdef` in `abcdef`, or a secret and a
//!   longer one that starts with it) become one `***` together, so the
//!   longest secret wins and no part of either is left;
//! - values and lines shorter than [`MIN_SECRET_CHARS`] characters (after
//!   trimming whitespace) are ignored: masking `a` or `42` everywhere would
//!   destroy the logs and protect nothing. Callers that accept secrets should
//!   refuse such values (see [`is_maskable`]).
//!
//! The one thing the output may still contain is a value that includes `*`
//! and is spelled by the `***` marker next to surrounding text (`ab*` in
//! `ab***`). That reveals nothing the log did not already show.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::nfa::contiguous::NFA;
use aho_corasick::{Anchored, Input, MatchKind};

/// What a masked occurrence becomes.
pub const MASK: &str = "***";

/// Values (and lines of multi-line values) shorter than this many characters,
/// not counting surrounding whitespace, are not masked.
pub const MIN_SECRET_CHARS: usize = 4;

/// Whether `value` is long enough to be masked as a whole. A multi-line value
/// that is maskable may still have lines too short to be masked on their own.
pub fn is_maskable(value: &str) -> bool {
    value.trim().chars().count() >= MIN_SECRET_CHARS
}

/// Masks a fixed set of secret values. Cheap to clone; its `Debug` output
/// never shows a value.
#[derive(Clone, Default)]
pub struct Masker {
    /// `None` when no value is maskable: everything passes through.
    patterns: Option<Arc<Patterns>>,
}

/// The compiled patterns, shared by every stream of one masker.
struct Patterns {
    /// Standard (overlapping) match semantics, so every occurrence of every
    /// pattern is seen and the state after a byte is the trie node of the
    /// longest suffix that could begin a pattern.
    nfa: NFA,
    /// The depth of each trie node: how many trailing bytes of the input may
    /// still be the beginning of a pattern when the automaton is in it.
    depths: HashMap<StateID, usize>,
    n_patterns: usize,
}

impl Masker {
    /// A masker for `secrets`, the secret values (not their names).
    pub fn new<I, S>(secrets: I) -> Masker
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut patterns: Vec<String> = Vec::new();
        for secret in secrets {
            let secret = secret.as_ref().trim();
            if is_maskable(secret) {
                patterns.push(secret.to_owned());
            }
            if secret.contains('\n') {
                let lines = secret.lines().map(str::trim).filter(|l| is_maskable(l));
                patterns.extend(lines.map(str::to_owned));
            }
        }
        patterns.sort();
        patterns.dedup();
        if patterns.is_empty() {
            return Masker::default();
        }
        let nfa = NFA::builder()
            .match_kind(MatchKind::Standard)
            .build(&patterns)
            // Only an automaton too large for 32-bit state ids fails.
            .expect("secret patterns fit an Aho-Corasick automaton");
        let mut depths = HashMap::new();
        if let Ok(start) = nfa.start_state(Anchored::No) {
            for pattern in &patterns {
                let mut state = start;
                for (idx, &byte) in pattern.as_bytes().iter().enumerate() {
                    state = nfa.next_state(Anchored::No, state, byte);
                    depths.insert(state, idx + 1);
                }
            }
        }
        let n_patterns = patterns.len();
        Masker {
            patterns: Some(Arc::new(Patterns {
                nfa,
                depths,
                n_patterns,
            })),
        }
    }

    /// True when this masker masks nothing.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_none()
    }

    /// `text` with every secret replaced by [`MASK`]; borrowed when there
    /// was nothing to mask.
    pub fn mask<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.mask_bytes(text.as_bytes()) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            // Patterns are whole characters, so masking valid UTF-8 leaves
            // valid UTF-8; the lossy path never runs.
            Cow::Owned(bytes) => Cow::Owned(
                String::from_utf8(bytes)
                    .unwrap_or_else(|err| String::from_utf8_lossy(err.as_bytes()).into_owned()),
            ),
        }
    }

    /// [`Masker::mask`] for bytes that need not be UTF-8.
    pub fn mask_bytes<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        let Some(patterns) = &self.patterns else {
            return Cow::Borrowed(bytes);
        };
        // The prefiltered search is much faster than walking every byte.
        if let Ok(None) = patterns.nfa.try_find(&Input::new(bytes)) {
            return Cow::Borrowed(bytes);
        }
        let mut stream = self.stream();
        let mut out = Vec::with_capacity(bytes.len());
        stream.push(bytes, &mut out);
        stream.finish(&mut out);
        Cow::Owned(out)
    }

    /// A stream masker for one output stream (stdout, stderr, ...).
    pub fn stream(&self) -> MaskStream {
        let state = self
            .patterns
            .as_ref()
            .and_then(|p| p.nfa.start_state(Anchored::No).ok());
        MaskStream {
            patterns: self.patterns.clone(),
            state,
            pending: Vec::new(),
            pending_at: 0,
            received: 0,
            spans: VecDeque::new(),
        }
    }
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n_patterns = self.patterns.as_ref().map_or(0, |p| p.n_patterns);
        f.debug_struct("Masker")
            .field("n_patterns", &n_patterns)
            .finish()
    }
}

/// Masks a byte stream that arrives in chunks. It holds back only the bytes
/// that could still be the beginning of a secret (and the first bytes of a
/// UTF-8 character cut by the chunk's end), emits the rest, and
/// [`MaskStream::finish`] flushes what it held. Its output, concatenated, is
/// exactly [`Masker::mask_bytes`] of the input, concatenated; for UTF-8 input
/// every piece it emits is UTF-8 on its own.
pub struct MaskStream {
    patterns: Option<Arc<Patterns>>,
    /// The automaton's state after the last byte received.
    state: Option<StateID>,
    /// Bytes received but not emitted yet.
    pending: Vec<u8>,
    /// Stream offset of `pending[0]`.
    pending_at: u64,
    /// Stream offset just past the last byte received.
    received: u64,
    /// Masked ranges of stream offsets (merged, in order) that end after
    /// `pending_at`. Only the first may start before it, and then its
    /// marker has been emitted.
    spans: VecDeque<Span>,
}

#[derive(Debug)]
struct Span {
    start: u64,
    end: u64,
    /// Its `***` has been emitted.
    announced: bool,
}

impl MaskStream {
    /// Takes the next chunk and appends to `out` what can be emitted now.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        self.pending.extend_from_slice(chunk);
        let (Some(patterns), Some(mut state)) = (self.patterns.clone(), self.state) else {
            self.received += chunk.len() as u64;
            let safe = utf8_safe_end(&self.pending);
            self.emit_until(self.pending_at + safe as u64, out);
            return;
        };
        let nfa = &patterns.nfa;
        for &byte in chunk {
            state = nfa.next_state(Anchored::No, state, byte);
            self.received += 1;
            if nfa.is_match(state) {
                // Every pattern matched here ends here: the longest covers
                // the others.
                let longest = (0..nfa.match_len(state))
                    .map(|idx| nfa.pattern_len(nfa.match_pattern(state, idx)))
                    .max()
                    .unwrap_or(0);
                self.add_span(self.received - longest as u64, self.received);
            }
        }
        self.state = Some(state);
        // A missing depth cannot happen (every state is a trie node); holding
        // back all we may then is the safe answer.
        let max_hold = nfa.max_pattern_len().saturating_sub(1);
        let may_begin_secret = patterns.depths.get(&state).copied().unwrap_or(max_hold);
        let held_from = self.pending.len().saturating_sub(may_begin_secret);
        let safe = utf8_safe_end(&self.pending[..held_from]);
        self.emit_until(self.pending_at + safe as u64, out);
    }

    /// Appends everything still held back to `out`.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        self.emit_until(self.received, out);
    }

    /// [`MaskStream::push`] for text; what it appends is whole characters.
    pub fn push_str(&mut self, chunk: &str, out: &mut String) {
        let mut bytes = Vec::new();
        self.push(chunk.as_bytes(), &mut bytes);
        out.push_str(&String::from_utf8_lossy(&bytes));
    }

    /// [`MaskStream::finish`] for text.
    pub fn finish_str(self, out: &mut String) {
        let mut bytes = Vec::new();
        self.finish(&mut bytes);
        out.push_str(&String::from_utf8_lossy(&bytes));
    }

    /// How many bytes are held back, waiting to see whether they begin a
    /// secret.
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// Records a masked range, merging it with the ranges it overlaps.
    fn add_span(&mut self, start: u64, end: u64) {
        let mut span = Span {
            start,
            end,
            announced: false,
        };
        // Spans are found in order of their end, so a new one can only
        // overlap the last few.
        while let Some(last) = self.spans.back() {
            if last.end <= span.start {
                break;
            }
            span.start = span.start.min(last.start);
            span.announced |= last.announced;
            self.spans.pop_back();
        }
        self.spans.push_back(span);
    }

    /// Emits stream offsets `pending_at..until`, each masked range as one
    /// marker.
    fn emit_until(&mut self, until: u64, out: &mut Vec<u8>) {
        let mut at = self.pending_at;
        while at < until {
            let idx = |offset: u64| (offset - self.pending_at) as usize;
            match self.spans.front_mut() {
                Some(span) if span.start <= at => {
                    if !span.announced {
                        out.extend_from_slice(MASK.as_bytes());
                        span.announced = true;
                    }
                    if span.end <= until {
                        at = span.end;
                        self.spans.pop_front();
                    } else {
                        at = until;
                    }
                }
                Some(span) if span.start < until => {
                    out.extend_from_slice(&self.pending[idx(at)..idx(span.start)]);
                    at = span.start;
                }
                _ => {
                    out.extend_from_slice(&self.pending[idx(at)..idx(until)]);
                    at = until;
                }
            }
        }
        let emitted = (at.max(self.pending_at) - self.pending_at) as usize;
        self.pending.drain(..emitted);
        self.pending_at += emitted as u64;
    }
}

/// The length of the longest prefix of `bytes` that does not end inside a
/// UTF-8 character: a lead byte at the end, waiting for its continuation
/// bytes, is held back. Invalid sequences are not held.
fn utf8_safe_end(bytes: &[u8]) -> usize {
    let len = bytes.len();
    for back in 1..=len.min(4) {
        let byte = bytes[len - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for the lead
        }
        let char_len = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if char_len > back { len - back } else { len };
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(secrets: &[&str], text: &str, expected: &str) {
        let masker = Masker::new(secrets);
        assert_eq!(masker.mask(text), expected, "secrets {secrets:?}");
        // One byte at a time is the hardest way to stream it.
        let mut stream = masker.stream();
        let mut out = Vec::new();
        for byte in text.as_bytes() {
            stream.push(std::slice::from_ref(byte), &mut out);
        }
        stream.finish(&mut out);
        assert_eq!(String::from_utf8(out).unwrap(), expected, "streamed");
    }

    #[test]
    fn masks_every_occurrence() {
        check(
            &["hunter2"],
            "pw=hunter2, again hunter2.",
            "pw=***, again ***.",
        );
        check(&["hunter2"], "nothing here", "nothing here");
        check(&["hunter2", "s3cr3t"], "s3cr3t:hunter2", "***:***");
        check(&[], "hunter2", "hunter2");
    }

    #[test]
    fn short_and_blank_values_are_ignored() {
        check(&["", "a", "abc", "  ab  ", "    "], "a abc ab", "a abc ab");
        check(&["abcd"], "abc abcd", "abc ***");
        assert!(Masker::new(["abc", " \t "]).is_empty());
        assert!(!is_maskable("abc") && is_maskable("abcd") && is_maskable("ééé€"));
    }

    #[test]
    fn the_longest_of_overlapping_secrets_wins() {
        check(&["abc1", "abc12"], "xabc12y", "x***y");
        check(&["abc12", "abc1"], "xabc1y", "x***y");
        check(&["abcd", "cdefgh"], "abcdefgh!", "***!");
        check(&["cdef", "abcdefgh"], "abcdefgh", "***");
        check(&["abcd"], "abcdabcd", "******");
        check(&["aaaa"], "aaaaaa", "***");
    }

    #[test]
    fn multi_line_secrets_are_masked_whole_and_line_by_line() {
        let key = "-----BEGIN KEY-----\r\nMIIEabc\nxyz\n-----END KEY-----\n";
        check(&[key], &format!("key: {key}done"), "key: ***\ndone");
        check(&[key], "  MIIEabc \r\n", "  *** \r\n");
        check(&[key], "line MIIEabc\n", "line ***\n");
        check(
            &[key],
            "-----END KEY-----\nxyz",
            "***\nxyz", // `xyz` is too short to be a pattern alone
        );
        check(&["hunter2\n"], "echo hunter2\n", "echo ***\n");
    }

    #[test]
    fn unicode_is_masked_on_character_boundaries() {
        check(&["pässwörd"], "→pässwörd←", "→***←");
        check(&["€€€€"], "€€€€€ €", "*** €");
        check(&["日本語です"], "日本語で日本語です", "日本語で***");
    }

    #[test]
    fn a_stream_holds_back_only_what_may_begin_a_secret() {
        let masker = Masker::new(["hunter2secret"]);
        let mut stream = masker.stream();
        let mut out = Vec::new();
        stream.push(b"password: hunter", &mut out);
        assert_eq!(out, b"password: ");
        assert_eq!(stream.held(), "hunter".len());
        stream.push(b"2secret\nnext hun", &mut out);
        assert_eq!(out, b"password: ***\nnext ");
        stream.push(b"gry\n", &mut out);
        stream.finish(&mut out);
        assert_eq!(out, b"password: ***\nnext hungry\n");
    }

    #[test]
    fn a_stream_never_emits_half_a_character() {
        let masker = Masker::new(["zzzz"]);
        let mut stream = masker.stream();
        let mut out = String::new();
        let text = "é€😀";
        for byte in text.as_bytes() {
            // Not valid UTF-8 one byte at a time: go through push.
            let mut piece = Vec::new();
            stream.push(std::slice::from_ref(byte), &mut piece);
            out.push_str(std::str::from_utf8(&piece).expect("whole characters"));
        }
        stream.finish_str(&mut out);
        assert_eq!(out, text);
    }

    #[test]
    fn invalid_utf8_passes_through() {
        let masker = Masker::new(["hunter2"]);
        let masked = masker.mask_bytes(b"\xff\xe2hunter2\xe2");
        assert_eq!(&masked[..], b"\xff\xe2***\xe2");
    }

    #[test]
    fn a_star_in_a_secret_may_be_spelled_by_the_marker() {
        // Documented: `xab*` appears, but only because `***` follows `xab`.
        check(&["xab*", "cdef"], "xabcdef", "xab***");
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let masker = Masker::new(["hunter2"]);
        assert_eq!(format!("{masker:?}"), "Masker { n_patterns: 1 }");
    }

    #[test]
    fn utf8_safe_end_holds_only_a_cut_character() {
        assert_eq!(utf8_safe_end(b"ab"), 2);
        assert_eq!(utf8_safe_end("aé".as_bytes()), 3);
        assert_eq!(utf8_safe_end(&"aé".as_bytes()[..2]), 1);
        assert_eq!(utf8_safe_end(&"a😀".as_bytes()[..4]), 1);
        assert_eq!(utf8_safe_end(b"a\xff"), 2);
        assert_eq!(utf8_safe_end(b"\x80\x80\x80\x80"), 4);
    }
}
