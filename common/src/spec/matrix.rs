//! `matrix:` — one stage run over every combination of its axes (for ML: a
//! hyperparameter sweep). Each combination is a stage of its own, named
//! `train[lr=0.1,depth=3]`, with the values as environment variables; a
//! `needs: [train]` waits for every cell. Expanded before `needs` are
//! resolved, so the rest of the pipeline sees ordinary stages.

use std::collections::BTreeMap;

use super::schema::{Path, StageDraft};
use super::values::is_env_name;
use super::yaml::Node;
use super::{Position, Problem};

/// Most cells one stage's matrix may have.
pub(super) const MAX_CELLS: usize = 64;

const EXPECTED: &str = "a mapping of axes to lists of values, like \
                        `matrix: {lr: [0.1, 0.01], depth: [3, 5]}`, with optional `include` and `exclude` lists";

/// A matrix as written.
#[derive(Clone, Debug)]
pub(super) struct MatrixDraft {
    /// Axes in the order written, each with its values as text.
    axes: Vec<(String, Vec<String>)>,
    /// Extra cells, each a full set of values.
    include: Vec<BTreeMap<String, String>>,
    /// Cells to leave out: any cell whose values contain all of one entry's.
    exclude: Vec<BTreeMap<String, String>>,
    position: Position,
}

pub(super) fn read(value: Node<'_>, path: &Path<'_>) -> Result<MatrixDraft, Problem> {
    let entries = value
        .entries()
        .ok_or_else(|| wrong(value, path, EXPECTED))?;
    let mut matrix = MatrixDraft {
        axes: Vec::new(),
        include: Vec::new(),
        exclude: Vec::new(),
        position: value.position(),
    };
    for (key, item) in entries {
        match key.text() {
            Some("include") => matrix.include = combinations(item, path, "include")?,
            Some("exclude") => matrix.exclude = combinations(item, path, "exclude")?,
            Some(axis) if is_env_name(axis) => {
                let values = item
                    .items()
                    .filter(|values| !values.is_empty())
                    .ok_or_else(|| {
                        wrong(
                            item,
                            path,
                            &format!("a non-empty list of values for `{axis}`"),
                        )
                    })?;
                let values = values
                    .into_iter()
                    .map(|value| scalar(value, path))
                    .collect::<Result<Vec<_>, _>>()?;
                matrix.axes.push((axis.to_owned(), values));
            }
            _ => {
                return Err(Problem::new(
                    key.position(),
                    format!(
                        "bad axis {} in {path}; axes are variable names (letters, digits, `_`)",
                        key.describe()
                    ),
                ));
            }
        }
    }
    if matrix.axes.is_empty() && matrix.include.is_empty() {
        return Err(wrong(value, path, EXPECTED));
    }
    Ok(matrix)
}

/// `include:` / `exclude:` — a list of mappings of axis to value.
fn combinations(
    value: Node<'_>,
    path: &Path<'_>,
    what: &str,
) -> Result<Vec<BTreeMap<String, String>>, Problem> {
    let expected = format!("`{what}` as a list of mappings like `- {{lr: 0.5, depth: 1}}`");
    let items = value.items().ok_or_else(|| wrong(value, path, &expected))?;
    items
        .into_iter()
        .map(|item| {
            let entries = item.entries().ok_or_else(|| wrong(item, path, &expected))?;
            entries
                .into_iter()
                .map(|(key, value)| {
                    let axis = key
                        .text()
                        .filter(|axis| is_env_name(axis))
                        .ok_or_else(|| wrong(key, path, &expected))?;
                    Ok((axis.to_owned(), scalar(value, path)?))
                })
                .collect()
        })
        .collect()
}

fn scalar(value: Node<'_>, path: &Path<'_>) -> Result<String, Problem> {
    value
        .text()
        .filter(|text| !text.contains([',', '=', '[', ']']))
        .map(str::to_owned)
        .ok_or_else(|| {
            wrong(
                value,
                path,
                "values that are numbers, booleans or strings without `,` `=` `[` `]`",
            )
        })
}

fn wrong(value: Node<'_>, path: &Path<'_>, must_be: &str) -> Problem {
    Problem::new(
        value.position(),
        format!("{path} must be {must_be}; found {}", value.describe()),
    )
}

/// The stage's cells: one stage per combination, in axis order, excludes
/// left out and includes added.
pub(super) fn expand(stage: StageDraft, matrix: &MatrixDraft) -> Result<Vec<StageDraft>, Problem> {
    if stage.delivery.gate.is_some() || stage.delivery.environment.is_some() {
        return Err(Problem::new(
            matrix.position,
            format!(
                "stage `{}` has a matrix and is a gate or an environment stage; sweep the \
                 stages before it and pick a winner with `gate: {{select: ...}}`",
                stage.name
            ),
        ));
    }
    let mut cells: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (axis, values) in &matrix.axes {
        cells = cells
            .into_iter()
            .flat_map(|cell| {
                values.iter().map(move |value| {
                    let mut cell = cell.clone();
                    cell.push((axis.clone(), value.clone()));
                    cell
                })
            })
            .collect();
        if cells.len() > MAX_CELLS {
            break;
        }
    }
    if matrix.axes.is_empty() {
        cells.clear();
    }
    cells.retain(|cell| {
        !matrix.exclude.iter().any(|exclude| {
            exclude
                .iter()
                .all(|(axis, value)| cell.iter().any(|(a, v)| a == axis && v == value))
        })
    });
    for include in &matrix.include {
        let mut cell: Vec<(String, String)> = matrix
            .axes
            .iter()
            .filter_map(|(axis, _)| Some((axis.clone(), include.get(axis)?.clone())))
            .collect();
        for (axis, value) in include {
            if !cell.iter().any(|(a, _)| a == axis) {
                cell.push((axis.clone(), value.clone()));
            }
        }
        if !cells.contains(&cell) {
            cells.push(cell);
        }
    }
    if cells.is_empty() || cells.len() > MAX_CELLS {
        return Err(Problem::new(
            matrix.position,
            format!(
                "the matrix of stage `{}` has {} cells; it needs from 1 to {MAX_CELLS}",
                stage.name,
                cells.len()
            ),
        ));
    }
    Ok(cells
        .into_iter()
        .map(|cell| {
            let mut draft = stage.clone();
            let label: Vec<String> = cell.iter().map(|(a, v)| format!("{a}={v}")).collect();
            draft.name = format!("{}[{}]", stage.name, label.join(","));
            draft.env.extend(cell);
            draft.matrix = None;
            draft.cell_of = Some(stage.name.clone());
            draft
        })
        .collect())
}
