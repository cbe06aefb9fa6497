//! One stage attempt from start to end: prepare its workspace, run its
//! commands with the executor, remove the workspace, and say how it ended.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use std::path::{Path, PathBuf};

use kiln_common::archive::{self, Limits};
use kiln_common::channel::KilnChannel;
use kiln_common::duration;
use kiln_proto::v1::artifact_service_client::ArtifactServiceClient;
use kiln_proto::v1::{Artifact, Assign, Outcome, Source};
use tokio::time::Instant;
use tracing::info;

use crate::attempt::{AttemptKey, Report};
use crate::cache::Caches;
use crate::error::Error;
use crate::executor::contract::{
    Ended, Executor, Exit, Job, Stop, StopSignal, out_of_memory_message,
};
use crate::logs::LogSink;
use crate::metrics::Metrics;
use crate::transfer;
use crate::workspace::Workspaces;

/// What the attempt reports when its commands ended as `ended` says.
fn ended_report(ended: Ended) -> Report {
    Report {
        image_digest: ended.image_digest,
        ..exit_report(ended.exit)
    }
}

/// What the attempt reports when its commands ended with `exit`.
fn exit_report(exit: Exit) -> Report {
    match exit {
        Exit::Code(0) => Report::new(Outcome::Succeeded, 0, ""),
        Exit::Code(code) => Report::new(Outcome::Failed, code, format!("exited with code {code}")),
        Exit::Signal(signal) => Report::new(
            Outcome::Failed,
            128 + signal,
            format!("killed by signal {signal}"),
        ),
        Exit::TimedOut(limit) => Report::new(
            Outcome::TimedOut,
            -1,
            format!("timed out after {}", duration::format(limit)),
        ),
        Exit::Stopped(Stop::Cancel(reason)) if reason.is_empty() => {
            Report::new(Outcome::Cancelled, -1, "cancelled")
        }
        Exit::Stopped(Stop::Cancel(reason)) => {
            Report::new(Outcome::Cancelled, -1, format!("cancelled: {reason}"))
        }
        Exit::Stopped(Stop::HandBack) => Report::new(
            Outcome::HandedBack,
            -1,
            "handed back: the agent is shutting down",
        ),
        // 137 is what a shell reports for a SIGKILLed command, which is
        // how the kernel ends a process at its memory limit.
        Exit::OutOfMemory { limit_bytes } => {
            Report::new(Outcome::Failed, 137, out_of_memory_message(limit_bytes))
        }
        Exit::CannotStart(message) => Report::new(Outcome::Failed, -1, message),
        // Nobody reads this one: the attempt was forgotten.
        Exit::Stopped(Stop::Forget) => Report::new(
            Outcome::Cancelled,
            -1,
            "the stage is no longer this agent's",
        ),
    }
}

/// What the attempt reports when the agent failed it, not its commands.
fn infra_report(err: &Error) -> Report {
    Report::new(Outcome::InfraError, -1, err.to_string())
}

/// When an attempt reached each step before its commands ran.
struct Preparation {
    /// The `Assign` arrived.
    received: Instant,
    /// The workspace held the sources (checkout or snapshot).
    source_ready: Instant,
    /// The inputs were restored; the executor was called.
    inputs_ready: Instant,
    /// The commands started (spawned, or the container started).
    started_at: Instant,
}

impl Preparation {
    /// One info line per attempt, `stage prepared in N ms`, which
    /// benchmarks read: the agent's own overhead before a stage's commands
    /// run, and where it went.
    fn log(&self, key: AttemptKey) {
        let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_millis();
        let total_ms = ms(self.received, self.started_at);
        info!(
            stage = %key,
            source_ms = ms(self.received, self.source_ready),
            inputs_ms = ms(self.source_ready, self.inputs_ready),
            start_ms = ms(self.inputs_ready, self.started_at),
            "stage prepared in {total_ms} ms"
        );
    }
}

/// What every stage task shares.
pub(crate) struct StageRunner {
    workspaces: Workspaces,
    executor: Arc<dyn Executor>,
    /// The coordinator's blob store: inputs, outputs, source snapshots.
    artifacts: ArtifactServiceClient<KilnChannel>,
    /// Start latencies and output bytes, for `--metrics`.
    metrics: Metrics,
    /// `cache:` directories kept on this agent (and shared ones fetched).
    caches: Arc<Caches>,
}

/// What one restored input may unpack to; the coordinator's limits bound
/// what was uploaded, these bound what a hostile archive may expand to.
const INPUT_LIMITS: Limits = Limits {
    max_bytes: 256 << 30,
    max_entries: 10_000_000,
};

impl StageRunner {
    pub(crate) fn new(
        workspaces: Workspaces,
        executor: Arc<dyn Executor>,
        artifacts: ArtifactServiceClient<KilnChannel>,
        metrics: Metrics,
        caches: Arc<Caches>,
    ) -> Self {
        StageRunner {
            workspaces,
            executor,
            artifacts,
            metrics,
            caches,
        }
    }

    /// Runs the attempt `assign` describes until it ends or `stop` fires.
    /// Output and progress go to `log`; the workspace is gone on return.
    /// `received` is when the `Assign` arrived: the attempt logs how long it
    /// took from then until its commands started.
    pub(crate) async fn run(
        &self,
        assign: Assign,
        received: Instant,
        log: &LogSink,
        mut stop: StopSignal,
    ) -> Report {
        let key = AttemptKey::from(&assign.stage.unwrap_or_default());
        let report = self
            .prepare_and_execute(key, assign, received, log, &mut stop)
            .await;
        self.workspaces.remove(key).await;
        report
    }

    async fn prepare_and_execute(
        &self,
        key: AttemptKey,
        assign: Assign,
        received: Instant,
        log: &LogSink,
        stop: &mut StopSignal,
    ) -> Report {
        let source = assign.source.clone().unwrap_or_default();
        let mut source_ready = received;
        let restore = async {
            let dir = self.prepare_source(key, &source, log).await?;
            source_ready = Instant::now();
            self.restore_inputs(&assign.inputs, &dir, log).await?;
            Ok::<_, Error>(dir)
        };
        let prepared = tokio::select! {
            prepared = restore => prepared,
            stop = stop.stopped() => {
                log.system(format!("{stop}; not starting the commands")).await;
                return exit_report(Exit::Stopped(stop));
            }
        };
        let dir = match prepared {
            Ok(dir) => dir,
            Err(err) => {
                log.system(err.to_string()).await;
                return infra_report(&err);
            }
        };
        let (output_paths, outputs_always) = (assign.output_paths.clone(), assign.outputs_always);
        let cwd = dir.clone();
        let cache = match &assign.cache {
            Some(cache) => {
                let mut client = self.artifacts.clone();
                let restore = self
                    .caches
                    .restore(&assign.pipeline, cache, &dir, &mut client, log);
                tokio::select! {
                    lookup = restore => lookup,
                    stop = stop.stopped() => {
                        log.system(format!("{stop}; not starting the commands")).await;
                        return exit_report(Exit::Stopped(stop));
                    }
                }
            }
            None => None,
        };
        let (env, secrets) = stage_env(&assign);
        let job = Job {
            key,
            name: key.dir_name(),
            workspace: self.workspaces.attempt_dir(key),
            dir,
            scratch: self.workspaces.scratch_dir().to_owned(),
            env,
            secrets,
            timeout: (assign.timeout_ms > 0).then(|| Duration::from_millis(assign.timeout_ms)),
            stage_name: assign.stage_name,
            commands: assign.commands,
            image: assign.image,
            docker: assign.docker.unwrap_or_default(),
            gpus: assign.gpus,
            services: assign.services,
        };
        let inputs_ready = Instant::now();
        let report = match self.executor.run(job, log.clone(), stop.clone()).await {
            Ok(ended) => {
                if let Some(started_at) = ended.started_at {
                    let times = Preparation {
                        received,
                        source_ready,
                        inputs_ready,
                        started_at,
                    };
                    times.log(key);
                    self.metrics.stage_started(
                        started_at.saturating_duration_since(received),
                        started_at.saturating_duration_since(inputs_ready),
                    );
                }
                ended_report(ended)
            }
            Err(err) => {
                log.system(err.to_string()).await;
                return infra_report(&err);
            }
        };
        if let Some(lookup) = cache.filter(|lookup| !lookup.hit)
            && report.outcome == Outcome::Succeeded
        {
            let mut client = self.artifacts.clone();
            self.caches.save(&lookup, &cwd, &mut client, log).await;
        }
        let wanted = match report.outcome {
            Outcome::Succeeded => true,
            Outcome::Failed | Outcome::TimedOut => outputs_always,
            _ => false,
        };
        if !wanted || output_paths.is_empty() {
            return report;
        }
        self.upload_outputs(report, &output_paths, &cwd, log).await
    }

    /// The attempt's workspace with the sources in it: a git checkout, or an
    /// uploaded snapshot of the pipeline directory. Returns where the
    /// commands run.
    async fn prepare_source(
        &self,
        key: AttemptKey,
        source: &Source,
        log: &LogSink,
    ) -> Result<PathBuf, Error> {
        if source.snapshot.is_empty() {
            return self.workspaces.prepare(key, source, log).await;
        }
        let empty = Source {
            subdir: source.subdir.clone(),
            ..Source::default()
        };
        let dir = self.workspaces.prepare(key, &empty, log).await?;
        log.system(format!("unpacking the uploaded source {}", source.snapshot))
            .await;
        let mut client = self.artifacts.clone();
        transfer::download_and_unpack(
            &mut client,
            &source.snapshot,
            self.workspaces.scratch_dir(),
            &dir,
            INPUT_LIMITS,
            |_| {},
        )
        .await
        .map_err(|error| Error::Source(format!("cannot unpack the uploaded source: {error}")))?;
        Ok(dir)
    }

    /// Restores the outputs of the stages this one needs, verified by digest.
    async fn restore_inputs(
        &self,
        inputs: &[Artifact],
        dir: &Path,
        log: &LogSink,
    ) -> Result<(), Error> {
        for input in inputs {
            log.system(format!(
                "restoring {} from stage `{}` ({}, {} bytes)",
                input.path, input.stage, input.digest, input.size
            ))
            .await;
            let mut client = self.artifacts.clone();
            transfer::download_and_unpack(
                &mut client,
                &input.digest,
                self.workspaces.scratch_dir(),
                dir,
                INPUT_LIMITS,
                |_| {},
            )
            .await
            .map_err(|error| {
                Error::Source(format!("cannot restore artifact `{}`: {error}", input.path))
            })?;
        }
        Ok(())
    }

    /// Packs and uploads each output path; a path that is missing, unsafe
    /// or refused fails the stage, a transfer problem is an infrastructure
    /// error (retried elsewhere).
    async fn upload_outputs(
        &self,
        mut report: Report,
        paths: &[String],
        dir: &Path,
        log: &LogSink,
    ) -> Report {
        for path in paths {
            let (root, rel) = (dir.to_path_buf(), path.clone());
            let mut client = self.artifacts.clone();
            let uploaded = transfer::pack_and_upload(
                &mut client,
                self.workspaces.scratch_dir(),
                move |out| archive::pack(&root, &rel, out),
                |_| {},
            )
            .await;
            match uploaded {
                Ok((digest, size, summary)) => {
                    self.metrics.output_stored(size);
                    log.system(format!(
                        "stored artifact {path}: {} files, {size} bytes packed, {digest}",
                        summary.files
                    ))
                    .await;
                    report.outputs.push(Artifact {
                        path: path.clone(),
                        digest,
                        size,
                        stage: String::new(),
                    });
                }
                Err(error) => {
                    let message = format!("artifact `{path}`: {error}");
                    log.system(message.clone()).await;
                    let outcome = if error.is_permanent() {
                        Outcome::Failed
                    } else {
                        Outcome::InfraError
                    };
                    let exit_code = if outcome == Outcome::Failed {
                        report.exit_code
                    } else {
                        -1
                    };
                    return Report {
                        outputs: Vec::new(),
                        ..Report::new(outcome, exit_code, message)
                    };
                }
            }
        }
        report
    }
}

/// The stage's variables and, apart, its secrets. A secret replaces a
/// pipeline variable of the same name (the stage asked for it); Kiln's own
/// variables replace both, so no name is in both maps.
fn stage_env(assign: &Assign) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let stage = assign.stage.unwrap_or_default();
    let kiln = [
        ("KILN_RUN_ID".to_owned(), stage.run_id.to_string()),
        ("KILN_STAGE".to_owned(), assign.stage_name.clone()),
        ("KILN_ATTEMPT".to_owned(), stage.attempt.to_string()),
        ("KILN_PIPELINE".to_owned(), assign.pipeline.clone()),
        (
            "KILN_COMMIT".to_owned(),
            assign
                .source
                .as_ref()
                .map(|source| source.commit.clone())
                .unwrap_or_default(),
        ),
        ("CI".to_owned(), "true".to_owned()),
    ];
    let secrets: BTreeMap<String, String> = assign
        .secrets
        .iter()
        .filter(|(name, _)| !kiln.iter().any(|(kiln_name, _)| kiln_name == *name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let mut env: BTreeMap<String, String> = assign
        .env
        .iter()
        .filter(|(name, _)| !secrets.contains_key(*name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    env.extend(kiln);
    (env, secrets)
}

#[cfg(test)]
mod tests {
    use kiln_common::masking::{MASK, Masker};
    use kiln_proto::v1::{Source, StageRef};

    use super::*;
    use kiln_common::loglines::{MARKER_ROOM, MAX_LINE_BYTES, marker};

    use crate::executor::contract::stop_signal;
    use crate::executor::process::ProcessExecutor;
    use crate::logs::testing;

    #[test]
    fn exits_map_to_outcomes() {
        fn check(exit: Exit, outcome: Outcome, exit_code: i32, message: &str) {
            let report = exit_report(exit.clone());
            assert_eq!(report, Report::new(outcome, exit_code, message), "{exit:?}");
        }
        check(Exit::Code(0), Outcome::Succeeded, 0, "");
        check(Exit::Code(2), Outcome::Failed, 2, "exited with code 2");
        check(Exit::Signal(9), Outcome::Failed, 137, "killed by signal 9");
        check(
            Exit::OutOfMemory {
                limit_bytes: 16 << 20,
            },
            Outcome::Failed,
            137,
            "ran out of memory: the kernel killed the commands at the container's limit of 16Mi; \
             raise `resources.memory` in kiln.yml or make the commands use less",
        );
        check(
            Exit::CannotStart("image `x` is missing".into()),
            Outcome::Failed,
            -1,
            "image `x` is missing",
        );
        let limit = Duration::from_secs(5);
        check(
            Exit::TimedOut(limit),
            Outcome::TimedOut,
            -1,
            "timed out after 5s",
        );
        let cancel = Stop::Cancel("run cancelled".into());
        check(
            Exit::Stopped(cancel),
            Outcome::Cancelled,
            -1,
            "cancelled: run cancelled",
        );
        check(
            Exit::Stopped(Stop::Cancel(String::new())),
            Outcome::Cancelled,
            -1,
            "cancelled",
        );
        let handed_back = "handed back: the agent is shutting down";
        check(
            Exit::Stopped(Stop::HandBack),
            Outcome::HandedBack,
            -1,
            handed_back,
        );
    }

    fn assign(commands: &[&str], source: Source) -> Assign {
        Assign {
            stage: Some(StageRef {
                run_id: 12,
                stage_idx: 4,
                attempt: 2,
            }),
            pipeline: "demo".into(),
            stage_name: "train".into(),
            commands: commands.iter().map(|c| c.to_string()).collect(),
            env: [("CI".to_owned(), "overridden?".to_owned())].into(),
            timeout_ms: 10_000,
            source: Some(source),
            ..Assign::default()
        }
    }

    async fn runner(work_dir: &std::path::Path) -> StageRunner {
        let workspaces = Workspaces::open(work_dir).await.unwrap();
        let executor = Arc::new(ProcessExecutor::new(Duration::from_millis(200)));
        // Nothing listens here: these stages move no artifacts.
        let channel = kiln_common::channel::CoordinatorEndpoint::new(
            "http://127.0.0.1:9",
            &Default::default(),
        )
        .unwrap()
        .connect_lazy();
        StageRunner::new(
            workspaces,
            executor,
            ArtifactServiceClient::new(channel),
            Metrics::new("process"),
            Arc::new(Caches::open(work_dir, 1 << 20).await.unwrap()),
        )
    }

    #[tokio::test]
    async fn runs_in_a_fresh_workspace_with_kiln_variables_and_removes_it() {
        let work_dir = tempfile::tempdir().unwrap();
        let runner = runner(work_dir.path()).await;
        let commands = [
            "echo \"$KILN_PIPELINE $KILN_STAGE $KILN_RUN_ID $KILN_ATTEMPT $CI\"",
            "basename \"$(pwd)\"",
        ];
        let (sink, mut capture) = testing::sink();
        let (_stop_tx, stop) = stop_signal();
        let report = runner
            .run(
                assign(&commands, Source::default()),
                Instant::now(),
                &sink,
                stop,
            )
            .await;
        assert_eq!(report.outcome, Outcome::Succeeded, "{report:?}");
        assert_eq!(
            capture.lines(),
            [
                "LOG_STREAM_STDOUT: demo train 12 2 true",
                "LOG_STREAM_STDOUT: 12-4-2"
            ]
        );
        let left = std::fs::read_dir(work_dir.path().join("ws"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "workspace and script are removed");
    }

    #[tokio::test]
    async fn a_failed_checkout_is_an_infra_error_with_a_log_line() {
        let work_dir = tempfile::tempdir().unwrap();
        let runner = runner(work_dir.path()).await;
        let source = Source {
            repo: work_dir.path().join("no-such-repo").display().to_string(),
            commit: "abc123".into(),
            ..Source::default()
        };
        let (sink, mut capture) = testing::sink();
        let (_stop_tx, stop) = stop_signal();
        let report = runner
            .run(assign(&["true"], source), Instant::now(), &sink, stop)
            .await;
        assert_eq!(report.outcome, Outcome::InfraError);
        assert!(
            report.message.contains("git clone failed"),
            "{}",
            report.message
        );
        let lines = capture.lines();
        assert!(
            lines.last().unwrap().contains("git clone failed"),
            "{lines:?}"
        );
    }

    const TOKEN: &str = "hunter2secret";
    const KEY: &str =
        "-----BEGIN TEST KEY-----\nMIIEline1abc\nMIIEline2def\n-----END TEST KEY-----\n";

    fn assign_with_secrets(commands: &[&str], source: Source) -> Assign {
        Assign {
            secrets: [
                ("TOKEN".to_owned(), TOKEN.to_owned()),
                ("KEY".to_owned(), KEY.to_owned()),
                // A secret cannot replace Kiln's variables.
                ("KILN_STAGE".to_owned(), "not-the-stage".to_owned()),
            ]
            .into(),
            env: [("TOKEN".to_owned(), "the pipeline's".to_owned())].into(),
            ..assign(commands, source)
        }
    }

    /// Lines that show a secret's value, or a line of one.
    fn leaks(lines: &[String]) -> Vec<&String> {
        let needles = ["hunter", "2secret", "MIIEline", "not-the-stage"];
        lines
            .iter()
            .filter(|line| needles.iter().any(|n| line.contains(n)))
            .collect()
    }

    #[tokio::test]
    async fn secrets_are_variables_and_masked_in_every_stream() {
        let work_dir = tempfile::tempdir().unwrap();
        let runner = runner(work_dir.path()).await;
        let commands = [
            r#"[ "$TOKEN" = hunter2secret ] && [ "$KILN_STAGE" = train ] && echo variables ok"#,
            // Written in two parts, with time for the first to be read alone.
            "printf 'hunter'; sleep 0.2; printf '2secret\\n'",
            r#"echo "to stderr: $TOKEN" >&2"#,
            r#"printf 'prefix %s suffix\n' "$KEY""#,
            "printf 'MIIEline1'; sleep 0.2; printf 'abc and more\\n'",
            "head -c 20000 /dev/zero | tr '\\0' x; echo \"$TOKEN\"",
            "echo still running",
        ];
        let assign = assign_with_secrets(&commands, Source::default());
        let (sink, mut capture) = testing::sink_with(Masker::new(assign.secrets.values()));
        let (_stop_tx, stop) = stop_signal();
        let report = runner.run(assign, Instant::now(), &sink, stop).await;
        assert_eq!(report.outcome, Outcome::Succeeded, "{report:?}");
        // Stdout and stderr are read apart; only each one's order is fixed.
        let mut lines = capture.lines();
        assert!(leaks(&lines).is_empty(), "{:?}", leaks(&lines));
        let long = lines.iter().position(|l| l.contains("truncated")).unwrap();
        let kept = MAX_LINE_BYTES - MARKER_ROOM;
        let dropped = 20_000 + MASK.len() - kept;
        let expected_long = "x".repeat(kept) + &marker(dropped);
        assert!(expected_long.len() <= MAX_LINE_BYTES);
        assert!(
            lines[long] == format!("LOG_STREAM_STDOUT: {expected_long}"),
            "the long line ends with {:?}",
            &lines[long][lines[long].len() - 60..]
        );
        lines[long] = "LOG_STREAM_STDOUT: (the long line)".into();
        let stderr = lines.iter().position(|l| l.contains("STDERR")).unwrap();
        assert_eq!(lines.remove(stderr), "LOG_STREAM_STDERR: to stderr: ***");
        assert_eq!(
            lines,
            [
                "LOG_STREAM_STDOUT: variables ok",
                "LOG_STREAM_STDOUT: ***",
                "LOG_STREAM_STDOUT: prefix ***",
                "LOG_STREAM_STDOUT:  suffix",
                "LOG_STREAM_STDOUT: *** and more",
                "LOG_STREAM_STDOUT: (the long line)",
                "LOG_STREAM_STDOUT: still running",
            ]
        );
    }

    #[tokio::test]
    async fn secrets_are_masked_in_error_messages() {
        let work_dir = tempfile::tempdir().unwrap();
        let runner = runner(work_dir.path()).await;
        let source = Source {
            repo: work_dir.path().join(TOKEN).display().to_string(),
            commit: "abc123".into(),
            ..Source::default()
        };
        let assign = assign_with_secrets(&["true"], source);
        let (sink, mut capture) = testing::sink_with(Masker::new(assign.secrets.values()));
        let (_stop_tx, stop) = stop_signal();
        let report = runner.run(assign, Instant::now(), &sink, stop).await;
        sink.done(report).await;
        let lines = capture.lines();
        let report = capture.report.take().unwrap();
        assert_eq!(report.outcome, Outcome::InfraError);
        assert!(
            report.message.contains("git clone failed for "),
            "{}",
            report.message
        );
        assert!(report.message.contains("***"), "{}", report.message);
        assert!(!report.message.contains(TOKEN), "{}", report.message);
        assert!(leaks(&lines).is_empty(), "{:?}", leaks(&lines));
    }

    #[tokio::test]
    async fn a_stop_before_the_commands_start_ends_the_attempt() {
        let work_dir = tempfile::tempdir().unwrap();
        let runner = runner(work_dir.path()).await;
        let (sink, _capture) = testing::sink();
        let (stop_tx, stop) = stop_signal();
        stop_tx.stop(Stop::HandBack);
        let report = runner
            .run(
                assign(&["sleep 1000"], Source::default()),
                Instant::now(),
                &sink,
                stop,
            )
            .await;
        assert_eq!(report.outcome, Outcome::HandedBack);
    }
}
