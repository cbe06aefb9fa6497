//! Property tests of `kiln_common::masking`: streaming in chunks of any size
//! gives what masking the whole text gives, which is what a brute-force
//! reference gives, and no secret survives.

use kiln_common::masking::{MASK, Masker};
use proptest::prelude::*;

/// Secrets from a small alphabet, so they overlap and share prefixes often.
fn secrets() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec("[abé€]{4,9}", 1..5)
}

/// Text made of random characters, whole secrets and secrets' beginnings.
fn text(secrets: Vec<String>) -> impl Strategy<Value = (Vec<String>, String)> {
    let n_secrets = secrets.len();
    let piece = prop_oneof![
        "[abé€x\n ]{0,6}".prop_map(Piece::Text),
        (0..n_secrets).prop_map(Piece::Secret),
        (0..n_secrets, 1usize..8).prop_map(|(idx, len)| Piece::Prefix(idx, len)),
    ];
    prop::collection::vec(piece, 0..20).prop_map(move |pieces| {
        let mut text = String::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => text.push_str(&t),
                Piece::Secret(idx) => text.push_str(&secrets[idx]),
                Piece::Prefix(idx, len) => text.extend(secrets[idx].chars().take(len)),
            }
        }
        (secrets.clone(), text)
    })
}

#[derive(Clone, Debug)]
enum Piece {
    Text(String),
    Secret(usize),
    Prefix(usize, usize),
}

fn secrets_and_text() -> impl Strategy<Value = (Vec<String>, String)> {
    secrets().prop_flat_map(text)
}

/// Every byte of every occurrence hidden; overlapping occurrences share one
/// marker. Only for one-line secrets of at least four characters.
fn reference(secrets: &[String], text: &[u8]) -> Vec<u8> {
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for start in 0..text.len() {
        for secret in secrets {
            if text[start..].starts_with(secret.as_bytes()) {
                spans.push((start, start + secret.len()));
            }
        }
    }
    spans.sort();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start < last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut out = Vec::new();
    let mut at = 0;
    for (start, end) in merged {
        out.extend_from_slice(&text[at..start]);
        out.extend_from_slice(MASK.as_bytes());
        at = end;
    }
    out.extend_from_slice(&text[at..]);
    out
}

/// Streams `text` cut at `cuts` (byte offsets, any order, may split
/// characters); also checks that each piece is whole characters.
fn streamed(masker: &Masker, text: &str, cuts: &[usize]) -> String {
    let bytes = text.as_bytes();
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.push(bytes.len());
    cuts.sort();
    let mut stream = masker.stream();
    let mut out = String::new();
    let mut at = 0;
    for cut in cuts {
        let mut piece = Vec::new();
        stream.push(&bytes[at..cut], &mut piece);
        out.push_str(std::str::from_utf8(&piece).expect("pieces are whole characters"));
        at = cut;
    }
    let mut piece = Vec::new();
    stream.finish(&mut piece);
    out.push_str(std::str::from_utf8(&piece).expect("pieces are whole characters"));
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn streaming_in_any_chunks_equals_masking_at_once(
        (secrets, text) in secrets_and_text(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let masker = Masker::new(&secrets);
        let whole = masker.mask(&text).into_owned();
        prop_assert_eq!(&streamed(&masker, &text, &cuts), &whole);
        let expected = String::from_utf8(reference(&secrets, text.as_bytes())).unwrap();
        prop_assert_eq!(&whole, &expected);
        for secret in &secrets {
            prop_assert!(!whole.contains(secret.as_str()), "{secret:?} survived in {whole:?}");
        }
    }

    #[test]
    fn multi_line_secrets_leave_no_line_behind(
        lines in prop::collection::vec("[a-z0-9+/]{4,12}", 2..5),
        prefix in "[ a-z]{0,5}",
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let secret = lines.join("\n");
        let masker = Masker::new([&secret]);
        // Printed whole, and printed line by line with other text between.
        let text = format!("{prefix}{secret}\n{}", lines.join(&format!("\n{prefix}\n")));
        let masked = streamed(&masker, &text, &cuts);
        for line in &lines {
            prop_assert!(!masked.contains(line.as_str()), "{line:?} survived in {masked:?}");
        }
    }

    #[test]
    fn text_without_secrets_is_untouched(text in "\\PC{0,64}", cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let masker = Masker::new(["\u{1F512}never-printed"]);
        prop_assert_eq!(streamed(&masker, &text, &cuts), text.clone());
        prop_assert!(matches!(masker.mask(&text), std::borrow::Cow::Borrowed(_)));
    }
}
