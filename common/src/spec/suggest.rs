//! "Did you mean" hints for misspelt keys and stage names.

/// ` (did you mean `x`?)` when one candidate is close to `word`, else "".
pub(super) fn did_you_mean<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> String {
    closest(word, candidates)
        .map(|c| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

/// The candidate nearest to `word`, if it is near enough to be a typo: the
/// same word in another case, or within a third of the word's length in
/// edits (the threshold rustc uses for its suggestions).
fn closest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let max_distance = word.chars().count().max(3) / 3;
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        let distance = if candidate.eq_ignore_ascii_case(word) {
            0
        } else {
            distance(word, candidate)
        };
        if distance <= max_distance && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

/// Edit distance where swapping two neighbouring letters counts as one edit
/// (optimal string alignment), since `trian` for `train` is the typical typo.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // rows[i][j]: distance between a[..i] and b[..j]; three rows are enough.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        current[0] = i;
        for j in 1..=b.len() {
            let substitution = usize::from(a[i - 1] != b[j - 1]);
            current[j] = (previous[j] + 1)
                .min(current[j - 1] + 1)
                .min(previous[j - 1] + substitution);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                current[j] = current[j].min(before[j - 2] + 1);
            }
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        for (a, b, expected) in [
            ("", "", 0),
            ("commands", "commands", 0),
            ("comands", "commands", 1),
            ("trian", "train", 1),
            ("needs", "need", 1),
            ("", "env", 3),
            ("kitten", "sitting", 3),
        ] {
            assert_eq!(distance(a, b), expected, "{a} -> {b}");
            assert_eq!(distance(b, a), expected, "{b} -> {a}");
        }
    }

    #[test]
    fn suggests_only_near_candidates() {
        let keys = [
            "needs", "commands", "env", "timeout", "retries", "image", "agent",
        ];
        assert_eq!(closest("comands", keys), Some("commands"));
        assert_eq!(closest("Commands", keys), Some("commands"));
        assert_eq!(closest("timout", keys), Some("timeout"));
        assert_eq!(closest("artifacts", keys), None);
        assert_eq!(closest("x", keys), None);
        assert_eq!(did_you_mean("imgae", keys), " (did you mean `image`?)");
        assert_eq!(did_you_mean("gate", keys), "");
    }
}
