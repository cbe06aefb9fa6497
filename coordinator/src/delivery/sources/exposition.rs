//! The Prometheus text exposition format, parsed just far enough to pick
//! one series: names, labels (with escapes) and values. Types, help and
//! timestamps are not needed to sample a metric and are skipped.

use std::collections::BTreeMap;

/// One sample line of an exposition.
#[derive(Debug, PartialEq)]
pub(super) struct Series {
    pub(super) name: String,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) value: f64,
}

impl std::fmt::Display for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            let labels: Vec<String> = self
                .labels
                .iter()
                .map(|(name, value)| format!("{name}={value:?}"))
                .collect();
            write!(f, "{{{}}}", labels.join(","))?;
        }
        Ok(())
    }
}

/// Parses the Prometheus text format (0.0.4; OpenMetrics text parses too):
/// `# ...` lines are comments, every other non-blank line is
/// `name{label="value",...} value [timestamp]` with `\\`, `\"` and `\n`
/// escapes in label values and `NaN`, `+Inf`, `-Inf` as values.
/// Errors are `(line number, what is wrong)`.
pub(super) fn parse_exposition(text: &str) -> Result<Vec<Series>, (usize, String)> {
    let mut series = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        series.push(parse_sample_line(line).map_err(|reason| (index + 1, reason))?);
    }
    Ok(series)
}

fn parse_sample_line(line: &str) -> Result<Series, String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("expected a metric name at the start of {line:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?;
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = fields
        .next()
        .ok_or_else(|| format!("{name} has no value"))?;
    let value = parse_value(value)
        .ok_or_else(|| format!("{name} has the value {value:?}, which is not a number"))?;
    // An optional integer timestamp; an OpenMetrics exemplar (`# {...}`)
    // may follow and is ignored.
    match fields.next() {
        None => {}
        Some(hash) if hash.starts_with('#') => {}
        Some(timestamp) if timestamp.parse::<f64>().is_ok() => {
            if let Some(extra) = fields.next().filter(|field| !field.starts_with('#')) {
                return Err(format!(
                    "unexpected {extra:?} after the timestamp of {name}"
                ));
            }
        }
        Some(other) => return Err(format!("unexpected {other:?} after the value of {name}")),
    }
    Ok(Series {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `a="1",b="2"}` (the text after `{`) into `labels`, returning what
/// follows the closing brace.
fn parse_labels<'a>(
    mut rest: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, String> {
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or("unterminated label set: expected `}`")?;
        let name = &rest[..name_end];
        if name.is_empty() {
            return Err(format!("expected a label name at {rest:?}"));
        }
        rest = rest[name_end..].trim_start();
        rest = rest
            .strip_prefix("=\"")
            .ok_or_else(|| format!("expected =\" after the label name {name}"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let after_value = loop {
            match chars.next() {
                Some((index, '"')) => break index + 1,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, other)) => {
                        return Err(format!(
                            "unknown escape \\{other} in the value of label {name}"
                        ));
                    }
                    None => return Err(format!("unterminated value of label {name}")),
                },
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated value of label {name}")),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} appears twice"));
        }
        rest = rest[after_value..].trim_start();
        if let Some(after_comma) = rest.strip_prefix(',') {
            rest = after_comma;
        } else if !rest.starts_with('}') {
            return Err(format!("expected , or }} after the value of label {name}"));
        }
    }
}

/// A sample value as Prometheus writes it: a float, `NaN`, `+Inf`, `-Inf`.
pub(super) fn parse_value(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        // Rust's parser also takes "inf"/"infinity"/"nan" spelled other
        // ways; Prometheus (Go's ParseFloat) does too.
        _ => text.parse().ok(),
    }
}
