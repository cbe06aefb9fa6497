//! `matrix:` expansion and the best-of gate's `select:`.

use super::{Select, check, parse_ok};

#[test]
fn a_matrix_becomes_one_stage_per_cell_and_needs_wait_for_all() {
    let pipeline = parse_ok(
        "
        pipeline: sweep
        stages:
          prepare: { commands: [prep] }
          train:
            needs: [prepare]
            commands: [train]
            matrix:
              lr: [0.1, 0.01]
              depth: [3, 5]
              exclude: [{ lr: 0.01, depth: 5 }]
              include: [{ lr: 0.5, depth: 1 }]
          pick:
            needs: [train]
            gate: { select: { metric: recall, max: true }, require: { recall: \">= 0.5\" } }
        ",
    );
    let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "prepare",
            "train[lr=0.1,depth=3]",
            "train[lr=0.1,depth=5]",
            "train[lr=0.01,depth=3]",
            "train[lr=0.5,depth=1]",
            "pick"
        ]
    );
    let cell = &pipeline.stages[1];
    assert_eq!(cell.env["lr"], "0.1");
    assert_eq!(cell.env["depth"], "3");
    assert_eq!(cell.needs, vec![0]);
    assert_eq!(cell.cell_of.as_deref(), Some("train"));
    let pick = &pipeline.stages[5];
    assert_eq!(
        pick.needs,
        vec![1, 2, 3, 4],
        "needs: [train] waits for every cell"
    );
    assert_eq!(
        pick.gate.as_ref().unwrap().select,
        Some(Select {
            metric: "recall".into(),
            highest: true
        })
    );
}

#[test]
fn bad_matrices_say_what_to_write() {
    check(
        "
        pipeline: demo
        stages:
          train: { commands: [x], matrix: { lr: [] } }
        ",
        "kiln.yml:3:41: `matrix` in stage `train` must be a non-empty list of values for `lr`; \
         found a list",
    );
    check(
        "
        pipeline: demo
        stages:
          deploy: { commands: [x], environment: production, matrix: { lr: [1, 2] } }
        ",
        "kiln.yml:3:61: stage `deploy` has a matrix and is a gate or an environment stage; \
         sweep the stages before it and pick a winner with `gate: {select: ...}`",
    );
    check(
        "
        pipeline: demo
        stages:
          pick: { gate: { select: { metric: recall } } }
        ",
        "kiln.yml:3:27: `select` in `gate` of stage `pick` must be `{metric: recall, max: true}` \
         or `{metric: loss, min: true}`; found a mapping",
    );
}
