//! `kiln demo`'s canary act: following a rollout of production as the
//! coordinator runs it, one line per step, analysis round and decision.
//!
//! Everything printed comes from the coordinator's rollout record
//! (`RolloutStatus`, the same call as `kiln rollout status`), polled while
//! the pipeline's run goes on. That makes the act independent of whether
//! the run finishes at the first step or only when the rollout has ended:
//! the demo waits for the rollout's end, not the run's.

use std::time::Duration;

use kiln_proto::v1 as pb;
use tokio::sync::watch;

use crate::args::OutputFormat;
use crate::client::Coordinator;
use crate::error::CliError;
use crate::output;

/// How often the record is read: well under the example's 2 s analysis
/// interval, so every round is printed as it is recorded.
const POLL: Duration = Duration::from_millis(300);
/// Beyond this a rollout that has not ended is reported as stuck.
const ROLLOUT_LIMIT: Duration = Duration::from_secs(180);
/// How long after its run succeeded a rollout may take to appear; the run
/// records it with its environment stage, so this only bounds a surprise.
const APPEAR_LIMIT: Duration = Duration::from_secs(20);

/// What the run that may start a rollout did: `None` while it runs, then
/// whether it succeeded.
pub(crate) type RunDone = watch::Receiver<Option<bool>>;

/// The rollout of `pipeline`/`environment` recorded now, if any.
pub(crate) async fn current(
    coordinator: &Coordinator,
    pipeline: &str,
    environment: &str,
) -> Option<pb::Rollout> {
    let request = pb::RolloutRequest {
        pipeline: pipeline.to_owned(),
        environment: environment.to_owned(),
    };
    // "No rollout yet" is an error reply; either way there is none to show.
    coordinator
        .control()
        .rollout_status(request)
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

/// The environment whose next rollout is followed.
pub(crate) struct Watched<'a> {
    pub(crate) pipeline: &'a str,
    pub(crate) environment: &'a str,
    /// The candidate of the rollout recorded before (it is not the new one).
    pub(crate) before: Option<u64>,
}

/// Prints a new rollout of `watched` step by step until it ends, after
/// `on_start` when it first appears; returns it ended, or `None` if none
/// started (the run failed, or the release went live at once) or it did
/// not end in time.
pub(crate) async fn follow(
    coordinator: &Coordinator,
    watched: Watched<'_>,
    on_start: impl std::future::Future<Output = Result<(), CliError>>,
    mut run_done: RunDone,
    format: OutputFormat,
) -> Result<Option<pb::Rollout>, CliError> {
    let started = tokio::time::Instant::now();
    let mut succeeded_at = None;
    let mut shown = Shown::default();
    let mut on_start = Some(on_start);
    loop {
        let rollout = current(coordinator, watched.pipeline, watched.environment)
            .await
            .filter(|r| r.candidate != 0 && Some(r.candidate) != watched.before);
        if let Some(rollout) = rollout {
            if let Some(on_start) = on_start.take() {
                on_start.await?;
            }
            for line in shown.news(&rollout) {
                output::progress(format, &line)?;
            }
            if !rollout.outcome.is_empty() {
                return Ok(Some(rollout));
            }
            if started.elapsed() > ROLLOUT_LIMIT {
                output::progress(
                    format,
                    &format!(
                        "the rollout of release {} did not end within {}s",
                        rollout.candidate,
                        ROLLOUT_LIMIT.as_secs()
                    ),
                )?;
                return Ok(None);
            }
        } else {
            match *run_done.borrow_and_update() {
                Some(false) => return Ok(None),
                Some(true) => {
                    let since = *succeeded_at.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > APPEAR_LIMIT {
                        return Ok(None);
                    }
                }
                None => {}
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What of one rollout has been printed already.
#[derive(Default)]
struct Shown {
    /// The step last announced (1-based; 0: none yet).
    step: u32,
    rounds: usize,
}

impl Shown {
    /// The lines not printed yet: a step when it starts (or when its
    /// first round is seen), each recorded analysis round, and the
    /// decision.
    fn news(&mut self, rollout: &pb::Rollout) -> Vec<String> {
        let mut lines = Vec::new();
        for round in rollout.rounds.iter().skip(self.rounds) {
            self.announce(rollout, round.step, &mut lines);
            let weight = rollout.steps.get(round.step as usize).copied().unwrap_or(0);
            lines.push(format!(
                "      analysis at {weight}%: {}",
                round_text(round)
            ));
        }
        self.rounds = rollout.rounds.len();
        if rollout.outcome.is_empty() && rollout.phase != "restoring" {
            self.announce(rollout, rollout.step, &mut lines);
        }
        match rollout.outcome.as_str() {
            "" => {}
            "promoted" => {
                let breached = rollout.rounds.iter().filter(|r| r.breached).count();
                let breaches = match breached {
                    0 => "none breached".to_owned(),
                    n => format!("{n} breached, never enough in a row to abort"),
                };
                lines.push(format!(
                    "canary decision: promoted to 100%: release {} is live after {} analysis rounds, {breaches}",
                    rollout.candidate,
                    rollout.rounds.len()
                ));
            }
            outcome => lines.push(format!(
                "canary decision: {outcome}: {}; release {} serves all of production's traffic again",
                rollout.reason, rollout.previous
            )),
        }
        lines
    }
}

impl Shown {
    /// Says step `step` (0-based) started, unless it was said.
    fn announce(&mut self, rollout: &pb::Rollout, step: u32, lines: &mut Vec<String>) {
        if step < self.step {
            return;
        }
        self.step = step + 1;
        let weight = rollout.steps.get(step as usize).copied().unwrap_or(0);
        let rest = 100u32.saturating_sub(weight);
        let previous = if rest > 0 {
            format!(", release {} the other {rest}%", rollout.previous)
        } else {
            format!("; release {} leaves", rollout.previous)
        };
        lines.push(format!(
            "canary step {} of {}: release {} takes {weight}% of production's traffic{previous}",
            step + 1,
            rollout.steps.len(),
            rollout.candidate
        ));
    }
}

/// One analysis round: each rule's value, what was missing, and whether it
/// breached.
fn round_text(round: &pb::AnalysisRound) -> String {
    let mut parts: Vec<String> = round
        .values
        .iter()
        .map(|(metric, value)| format!("{metric}={}", output::number(*value)))
        .collect();
    parts.extend(
        round
            .missing
            .iter()
            .map(|metric| format!("{metric} missing (no request reached the candidate yet)")),
    );
    if !round.error.is_empty() {
        parts.push(format!("error: {}", round.error));
    }
    let verdict = if round.breached { "BREACH" } else { "ok" };
    format!("{} -> {verdict}", parts.join(", "))
}

/// One line about a release's rollout for the history: its steps and how
/// it ended, or "" when it had none.
pub(crate) fn summary(release: &pb::Release) -> String {
    let Some(rollout) = &release.rollout else {
        return String::new();
    };
    let steps: Vec<String> = rollout.steps.iter().map(|w| format!("{w}%")).collect();
    format!(
        " {} {} {} after {} analysis rounds",
        rollout.kind,
        steps.join("->"),
        if rollout.outcome.is_empty() {
            "in progress"
        } else {
            &rollout.outcome
        },
        rollout.rounds.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(step: u32, rounds: &[(u32, f64, bool)], outcome: &str) -> pb::Rollout {
        pb::Rollout {
            kind: "canary".into(),
            candidate: 3,
            previous: 1,
            steps: vec![25, 50, 100],
            step,
            weight: [25, 50, 100][step as usize],
            phase: if outcome.is_empty() {
                "analysing"
            } else {
                "ended"
            }
            .into(),
            outcome: outcome.into(),
            reason: "analysis breached: router_error_ratio=1 > 0.05".into(),
            rounds: rounds
                .iter()
                .map(|&(step, value, breached)| pb::AnalysisRound {
                    step,
                    values: [("router_error_ratio".to_owned(), value)].into(),
                    breached,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn each_step_round_and_decision_is_printed_once() {
        let mut shown = Shown::default();
        assert_eq!(
            shown.news(&rollout(0, &[], "")),
            [
                "canary step 1 of 3: release 3 takes 25% of production's traffic, release 1 the other 75%"
            ]
        );
        assert_eq!(
            shown.news(&rollout(0, &[(0, 0.0, false)], "")),
            ["      analysis at 25%: router_error_ratio=0.0000 -> ok"]
        );
        assert!(shown.news(&rollout(0, &[(0, 0.0, false)], "")).is_empty());
        let promoted = shown.news(&rollout(2, &[(0, 0.0, false), (1, 0.0, false)], "promoted"));
        assert_eq!(
            promoted,
            [
                "canary step 2 of 3: release 3 takes 50% of production's traffic, release 1 the other 50%",
                "      analysis at 50%: router_error_ratio=0.0000 -> ok",
                "canary decision: promoted to 100%: release 3 is live after 2 analysis rounds, none breached",
            ]
        );
    }

    #[test]
    fn an_abort_says_why_and_who_serves() {
        let mut shown = Shown::default();
        let lines = shown.news(&rollout(0, &[(0, 1.0, true), (0, 1.0, true)], "aborted"));
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines[0].starts_with("canary step 1 of 3: release 3 takes 25%"));
        assert!(lines[2].ends_with("router_error_ratio=1.0000 -> BREACH"));
        assert_eq!(
            lines[3],
            "canary decision: aborted: analysis breached: router_error_ratio=1 > 0.05; release 1 serves all of production's traffic again"
        );
    }

    #[test]
    fn the_history_names_the_steps_and_the_outcome() {
        let release = pb::Release {
            rollout: Some(rollout(2, &[(0, 0.0, false), (1, 0.0, false)], "promoted")),
            ..Default::default()
        };
        assert_eq!(
            summary(&release),
            " canary 25%->50%->100% promoted after 2 analysis rounds"
        );
        assert_eq!(summary(&pb::Release::default()), "");
    }
}
