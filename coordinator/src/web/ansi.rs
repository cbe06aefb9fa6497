//! ANSI colours of a log line as HTML: SGR sequences (`ESC [ … m`) become
//! `<span>`s with classes the stylesheet colours (in light and dark
//! themes); every other escape sequence is dropped, and the text is
//! escaped.

use super::format::escape;

/// The SGR attributes that are on.
#[derive(Clone, Copy, Default, PartialEq)]
struct Style {
    bold: bool,
    dim: bool,
    italic: bool,
    underline: bool,
    /// 0–7 normal, 8–15 bright.
    fg: Option<u8>,
    bg: Option<u8>,
}

impl Style {
    fn classes(&self) -> String {
        let mut classes = Vec::new();
        if self.bold {
            classes.push("ab".to_owned());
        }
        if self.dim {
            classes.push("ad".to_owned());
        }
        if self.italic {
            classes.push("ai".to_owned());
        }
        if self.underline {
            classes.push("au".to_owned());
        }
        if let Some(fg) = self.fg {
            classes.push(format!("f{fg}"));
        }
        if let Some(bg) = self.bg {
            classes.push(format!("g{bg}"));
        }
        classes.join(" ")
    }

    fn apply(&mut self, params: &[u16]) {
        let mut i = 0;
        if params.is_empty() {
            *self = Style::default();
        }
        while i < params.len() {
            match params[i] {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => {
                    self.bold = false;
                    self.dim = false;
                }
                23 => self.italic = false,
                24 => self.underline = false,
                n @ 30..=37 => self.fg = Some((n - 30) as u8),
                n @ 90..=97 => self.fg = Some((n - 90 + 8) as u8),
                39 => self.fg = None,
                n @ 40..=47 => self.bg = Some((n - 40) as u8),
                n @ 100..=107 => self.bg = Some((n - 100 + 8) as u8),
                49 => self.bg = None,
                // 256 colours and true colour: the first 16 of the 256 map
                // onto the palette, the rest are skipped.
                38 | 48 => {
                    let is_fg = params[i] == 38;
                    match params.get(i + 1) {
                        Some(5) => {
                            let colour = params.get(i + 2).copied().unwrap_or(0);
                            if colour < 16 {
                                let slot = if is_fg { &mut self.fg } else { &mut self.bg };
                                *slot = Some(colour as u8);
                            }
                            i += 2;
                        }
                        Some(2) => i += 4,
                        _ => {}
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
}

/// One log line as HTML.
pub(crate) fn to_html(line: &str) -> String {
    let mut out = String::with_capacity(line.len() + 16);
    let mut style = Style::default();
    let mut open = false;
    let mut text = String::new();
    let mut chars = line.chars().peekable();
    let flush = |text: &mut String, out: &mut String| {
        escape(text, out);
        text.clear();
    };
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            // A line never holds a line break on the page.
            text.push(if c == '\n' || c == '\r' { ' ' } else { c });
            continue;
        }
        if chars.peek() != Some(&'[') {
            // A lone ESC or another kind of sequence: drop the ESC.
            continue;
        }
        chars.next();
        let mut body = String::new();
        let mut end = None;
        for c in chars.by_ref() {
            if ('\u{40}'..='\u{7e}').contains(&c) {
                end = Some(c);
                break;
            }
            body.push(c);
        }
        if end != Some('m') {
            continue;
        }
        let params: Vec<u16> = body
            .split(';')
            .map(|p| p.parse().unwrap_or(0))
            .collect::<Vec<_>>();
        let params = if body.is_empty() { Vec::new() } else { params };
        let mut next = style;
        next.apply(&params);
        if next == style {
            continue;
        }
        flush(&mut text, &mut out);
        if open {
            out.push_str("</span>");
            open = false;
        }
        style = next;
        let classes = style.classes();
        if !classes.is_empty() {
            out.push_str("<span class=\"");
            out.push_str(&classes);
            out.push_str("\">");
            open = true;
        }
    }
    flush(&mut text, &mut out);
    if open {
        out.push_str("</span>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_become_spans_and_text_is_escaped() {
        assert_eq!(to_html("plain <b>"), "plain &lt;b&gt;");
        assert_eq!(
            to_html("\u{1b}[31mred\u{1b}[0m then \u{1b}[1;92mbold green"),
            "<span class=\"f1\">red</span> then <span class=\"ab f10\">bold green</span>"
        );
        assert_eq!(to_html("\u{1b}[2K\u{1b}[Gcleared"), "cleared");
        assert_eq!(
            to_html("\u{1b}[38;5;4mblue\u{1b}[m"),
            "<span class=\"f4\">blue</span>"
        );
        assert_eq!(to_html("a\rb"), "a b");
    }
}
