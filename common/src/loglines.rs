//! How long one log line may be, for everyone who handles lines: the agent
//! cuts command output before it leaves the machine, and the coordinator
//! cuts again before it stores a line (it trusts no agent). Both use this
//! rule, so a line the agent cut passes the coordinator unchanged.
//!
//! A line longer than [`MAX_LINE_BYTES`] keeps its first
//! `MAX_LINE_BYTES - MARKER_ROOM` bytes (fewer when that would split a
//! character) and ends with [`marker`]: ` [kiln: line truncated, N bytes
//! dropped]`. The stage goes on; only the line is shortened.

/// The longest line, in bytes of UTF-8, marker included.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Room a cut line keeps free for its marker; the longest marker (for a
/// count of `usize::MAX`) is 59 bytes.
pub const MARKER_ROOM: usize = 64;

/// What ends a line that lost `dropped_bytes` bytes.
pub fn marker(dropped_bytes: usize) -> String {
    format!(" [kiln: line truncated, {dropped_bytes} bytes dropped]")
}

/// How many leading bytes of `line` it keeps: all of a line that fits,
/// else `MAX_LINE_BYTES - MARKER_ROOM` moved back to the start of a
/// character. Works on bytes that are not yet known to be UTF-8 (an output
/// stream on its way to lines) as well as on a `str`'s bytes.
pub fn kept_len(line: &[u8]) -> usize {
    if line.len() <= MAX_LINE_BYTES {
        return line.len();
    }
    let at = MAX_LINE_BYTES - MARKER_ROOM;
    let is_continuation = |i: usize| line.get(i).is_some_and(|b| b & 0xC0 == 0x80);
    // A UTF-8 character is at most 4 bytes, so its start is at most 3 back.
    (at - 3..=at)
        .rev()
        .find(|&i| !is_continuation(i))
        .unwrap_or(at)
}

/// `line`, cut to fit [`MAX_LINE_BYTES`] with its marker if it is longer.
pub fn truncate_line(line: String) -> String {
    mark_truncated(line, 0)
}

/// `line`, whose last `dropped_bytes` bytes were already cut off (by a
/// reader that stopped keeping it), cut further if it is still too long,
/// and marked when anything was dropped. With `dropped_bytes == 0` it is
/// [`truncate_line`].
pub fn mark_truncated(mut line: String, dropped_bytes: usize) -> String {
    let needs_cut = line.len() > MAX_LINE_BYTES
        || (dropped_bytes > 0 && line.len() > MAX_LINE_BYTES - MARKER_ROOM);
    let mut dropped = dropped_bytes;
    if needs_cut {
        let mut cut = MAX_LINE_BYTES - MARKER_ROOM;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        dropped = dropped.saturating_add(line.len() - cut);
        line.truncate(cut);
    }
    if dropped > 0 {
        line.push_str(&marker(dropped));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEPT: usize = MAX_LINE_BYTES - MARKER_ROOM;

    #[test]
    fn lines_that_fit_are_unchanged() {
        for len in [0, 1, KEPT, MAX_LINE_BYTES] {
            let line = "a".repeat(len);
            assert_eq!(truncate_line(line.clone()), line);
            assert_eq!(kept_len(line.as_bytes()), len);
        }
    }

    #[test]
    fn long_lines_keep_their_start_and_say_how_much_they_lost() {
        let line = "b".repeat(MAX_LINE_BYTES + 1);
        let cut = truncate_line(line);
        assert_eq!(cut, "b".repeat(KEPT) + &marker(MARKER_ROOM + 1));
        assert!(cut.len() <= MAX_LINE_BYTES);
        assert!(cut.ends_with(" [kiln: line truncated, 65 bytes dropped]"));

        let huge = truncate_line("c".repeat(10 << 20));
        assert!(huge.len() <= MAX_LINE_BYTES);
        assert!(huge.ends_with(&marker((10 << 20) - KEPT)));
    }

    #[test]
    fn cuts_fall_between_characters() {
        for width in 1..=4 {
            let ch = ['a', 'é', '€', '😀'][width - 1];
            for shift in 0..4 {
                let line = "x".repeat(shift) + &ch.to_string().repeat(MAX_LINE_BYTES + 1);
                let cut = truncate_line(line.clone());
                assert!(cut.len() <= MAX_LINE_BYTES, "{width} {shift}");
                let kept = kept_len(line.as_bytes());
                assert!(line.is_char_boundary(kept) && kept > KEPT - 4 && kept <= KEPT);
                assert_eq!(
                    cut,
                    format!("{}{}", &line[..kept], marker(line.len() - kept))
                );
            }
        }
    }

    #[test]
    fn a_cut_line_is_not_cut_again() {
        let once = truncate_line("d".repeat(100_000));
        assert_eq!(truncate_line(once.clone()), once);
    }

    #[test]
    fn the_longest_marker_fits_in_its_room() {
        assert_eq!(marker(usize::MAX).len(), 59);
        assert!(marker(usize::MAX).len() <= MARKER_ROOM);
    }

    #[test]
    fn lines_cut_earlier_are_marked_and_still_fit() {
        assert_eq!(mark_truncated("e".into(), 10), "e".to_owned() + &marker(10));
        // Lossy decoding can make a kept prefix longer than it was.
        let grown = "\u{fffd}".repeat(KEPT);
        let cut = mark_truncated(grown.clone(), 7);
        assert!(cut.len() <= MAX_LINE_BYTES);
        let kept = (KEPT / 3) * 3;
        assert_eq!(
            cut,
            grown[..kept].to_owned() + &marker(7 + grown.len() - kept)
        );
    }
}
