//! A run's DAG as SVG, laid out on the server in layers: a stage's column
//! is the length of the longest `needs` chain before it, and within a
//! column stages sit near the average row of what they need (one
//! barycentre pass, enough for pipelines people draw). Boxes link to the
//! stage pages; gates are hexagons, environment stages are pills with a
//! double border, and a running stage pulses (CSS).
//!
//! Linear in stages plus edges: a 500-stage run lays out in well under a
//! millisecond.

use std::collections::HashMap;
use std::fmt::Write;

use super::format::escape;

const BOX_W: f64 = 176.0;
const BOX_H: f64 = 44.0;
const GAP_X: f64 = 56.0;
const GAP_Y: f64 = 18.0;
const PAD: f64 = 12.0;
/// Characters of a stage name shown in its box; the full name is in the
/// box's title and in the table below.
const NAME_CHARS: usize = 22;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Stage,
    Gate,
    Environment,
}

pub(crate) struct Node<'a> {
    pub(crate) name: &'a str,
    /// A `format::stage_state` name; also the CSS class.
    pub(crate) state: &'static str,
    pub(crate) kind: Kind,
    pub(crate) needs: &'a [String],
    pub(crate) href: String,
}

/// Column of every node: 0 for stages without needs, else one more than
/// the deepest need. Needs that name no node are ignored.
fn columns(nodes: &[Node<'_>]) -> Vec<usize> {
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name, i)).collect();
    let needs: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| {
            n.needs
                .iter()
                .filter_map(|need| index.get(need.as_str()).copied())
                .collect()
        })
        .collect();
    // Kahn's order; a cycle (never stored: specs are validated) would
    // leave its members in column 0.
    let mut waiting: Vec<usize> = needs.iter().map(Vec::len).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, list) in needs.iter().enumerate() {
        for &need in list {
            dependents[need].push(i);
        }
    }
    let mut column = vec![0usize; nodes.len()];
    let mut ready: Vec<usize> = (0..nodes.len()).filter(|&i| waiting[i] == 0).collect();
    while let Some(i) = ready.pop() {
        for &next in &dependents[i] {
            column[next] = column[next].max(column[i] + 1);
            waiting[next] -= 1;
            if waiting[next] == 0 {
                ready.push(next);
            }
        }
    }
    column
}

/// The run's DAG as an `<svg>` element.
pub(crate) fn svg(nodes: &[Node<'_>]) -> String {
    let column = columns(nodes);
    let n_columns = column.iter().copied().max().map_or(0, |max| max + 1);
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name, i)).collect();
    // Rows: column by column, ordered by the mean row of their needs.
    let mut row = vec![0f64; nodes.len()];
    let mut n_rows = 0usize;
    for c in 0..n_columns {
        let mut members: Vec<(f64, usize)> = (0..nodes.len())
            .filter(|&i| column[i] == c)
            .map(|i| {
                let rows: Vec<f64> = nodes[i]
                    .needs
                    .iter()
                    .filter_map(|need| index.get(need.as_str()).map(|&j| row[j]))
                    .collect();
                let mean = if rows.is_empty() {
                    i as f64
                } else {
                    rows.iter().sum::<f64>() / rows.len() as f64
                };
                (mean, i)
            })
            .collect();
        members.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (r, (_, i)) in members.iter().enumerate() {
            row[*i] = r as f64;
        }
        n_rows = n_rows.max(members.len());
    }
    let x = |i: usize| PAD + column[i] as f64 * (BOX_W + GAP_X);
    let y = |i: usize| PAD + row[i] * (BOX_H + GAP_Y);
    let width = PAD * 2.0 + n_columns as f64 * (BOX_W + GAP_X) - GAP_X;
    let height = PAD * 2.0 + n_rows as f64 * (BOX_H + GAP_Y) - GAP_Y;
    let mut out = String::with_capacity(256 + nodes.len() * 400);
    let _ = write!(
        out,
        r#"<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" role="img" aria-label="stages of the run and what each needs">"#
    );
    out.push_str(r#"<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>"#);
    for (i, node) in nodes.iter().enumerate() {
        for need in node.needs {
            let Some(&j) = index.get(need.as_str()) else {
                continue;
            };
            let (x1, y1) = (x(j) + BOX_W, y(j) + BOX_H / 2.0);
            let (x2, y2) = (x(i) - 2.0, y(i) + BOX_H / 2.0);
            let mid = (x1 + x2) / 2.0;
            let _ = write!(
                out,
                r#"<path class="edge" d="M{x1:.1},{y1:.1} C{mid:.1},{y1:.1} {mid:.1},{y2:.1} {x2:.1},{y2:.1}" marker-end="url(#arrow)"/>"#
            );
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        let (bx, by) = (x(i), y(i));
        let kind = match node.kind {
            Kind::Stage => "stage",
            Kind::Gate => "gate",
            Kind::Environment => "environment",
        };
        out.push_str(r#"<a href=""#);
        escape(&node.href, &mut out);
        out.push_str(r#""><g class="node "#);
        out.push_str(kind);
        out.push(' ');
        out.push_str(node.state);
        out.push_str(r#"" data-stage=""#);
        escape(node.name, &mut out);
        let _ = write!(out, r#"" data-state="{}"><title>"#, node.state);
        escape(node.name, &mut out);
        let _ = write!(out, " — {}</title>", node.state.replace('_', " "));
        match node.kind {
            Kind::Stage => {
                let _ = write!(
                    out,
                    r#"<rect class="shape" x="{bx:.1}" y="{by:.1}" width="{BOX_W}" height="{BOX_H}" rx="6"/>"#
                );
            }
            Kind::Environment => {
                let _ = write!(
                    out,
                    r#"<rect class="shape" x="{bx:.1}" y="{by:.1}" width="{BOX_W}" height="{BOX_H}" rx="22"/><rect class="inner" x="{:.1}" y="{:.1}" width="{}" height="{}" rx="18"/>"#,
                    bx + 4.0,
                    by + 4.0,
                    BOX_W - 8.0,
                    BOX_H - 8.0
                );
            }
            Kind::Gate => {
                let (r, m, b) = (bx + BOX_W, by + BOX_H / 2.0, by + BOX_H);
                let _ = write!(
                    out,
                    r#"<polygon class="shape" points="{:.1},{by:.1} {:.1},{by:.1} {r:.1},{m:.1} {:.1},{b:.1} {:.1},{b:.1} {bx:.1},{m:.1}"/>"#,
                    bx + 14.0,
                    r - 14.0,
                    r - 14.0,
                    bx + 14.0
                );
            }
        }
        let name: String = if node.name.chars().count() > NAME_CHARS {
            let cut: String = node.name.chars().take(NAME_CHARS - 1).collect();
            format!("{cut}…")
        } else {
            node.name.to_owned()
        };
        let _ = write!(
            out,
            r#"<text class="name" x="{:.1}" y="{:.1}">"#,
            bx + BOX_W / 2.0,
            by + 19.0
        );
        escape(&name, &mut out);
        let _ = write!(
            out,
            r#"</text><text class="state" x="{:.1}" y="{:.1}">{}</text></g></a>"#,
            bx + BOX_W / 2.0,
            by + 34.0,
            node.state.replace('_', " ")
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node<'a>(name: &'a str, needs: &'a [String]) -> Node<'a> {
        Node {
            name,
            state: "pending",
            kind: Kind::Stage,
            needs,
            href: format!("/runs/1/stages/{name}"),
        }
    }

    #[test]
    fn columns_follow_the_longest_chain() {
        let none: Vec<String> = Vec::new();
        let a = vec!["a".to_owned()];
        let ab = vec!["a".to_owned(), "b".to_owned()];
        let nodes = [
            node("c", &ab),
            node("a", &none),
            node("b", &a),
            node("d", &none),
        ];
        assert_eq!(columns(&nodes), vec![2, 0, 1, 0]);
        let svg = svg(&nodes);
        assert_eq!(svg.matches("class=\"edge\"").count(), 3);
        assert!(
            svg.contains(r#"data-stage="c" data-state="pending""#),
            "{svg}"
        );
    }

    #[test]
    fn a_500_stage_chain_lays_out_quickly() {
        let names: Vec<String> = (0..500).map(|i| format!("s{i}")).collect();
        let needs: Vec<Vec<String>> = (0..500)
            .map(|i| {
                if i == 0 {
                    Vec::new()
                } else {
                    vec![names[i - 1].clone()]
                }
            })
            .collect();
        let nodes: Vec<Node<'_>> = (0..500).map(|i| node(&names[i], &needs[i])).collect();
        let started = std::time::Instant::now();
        let svg = svg(&nodes);
        assert!(started.elapsed() < std::time::Duration::from_millis(200));
        assert_eq!(svg.matches("<g class=").count(), 500);
        assert_eq!(columns(&nodes)[499], 499);
    }

    #[test]
    fn names_are_escaped() {
        let none: Vec<String> = Vec::new();
        let svg = svg(&[node("<x>", &none)]);
        assert!(svg.contains("&lt;x&gt;") && !svg.contains("<x>"), "{svg}");
    }
}
