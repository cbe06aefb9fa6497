//! Runs a stage's commands as host processes: `sh -e <script>` in a process
//! group of its own, so a timeout or a stop reaches every process the
//! commands started, and none outlives the stage.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_common::duration;
use kiln_proto::v1::LogStream;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

use crate::error::Error;
use crate::executor::contract::{Ended, Executor, Exit, Job, Stop, StopSignal};
use crate::logs::{LogSink, forward_lines};
use crate::timer::sleep_until_some;

/// How long output may keep flowing after the shell is gone. Only a process
/// that left the group (`setsid`) can hold the pipes open that long.
const OUTPUT_DRAIN: Duration = Duration::from_secs(10);

pub(crate) struct ProcessExecutor {
    /// Between SIGTERM and SIGKILL; short in tests.
    grace: Duration,
    /// The only variables the commands inherit from the agent (`PATH`,
    /// `HOME`), so the agent's own settings never leak into stages.
    inherited_env: Vec<(OsString, OsString)>,
}

impl ProcessExecutor {
    pub(crate) fn new(grace: Duration) -> Self {
        // Reading the agent's environment here is not configuration: it is
        // the host's search path and home that any shell expects.
        let inherited_env = ["PATH", "HOME"]
            .into_iter()
            .filter_map(|name| Some((OsString::from(name), std::env::var_os(name)?)))
            .collect();
        ProcessExecutor {
            grace,
            inherited_env,
        }
    }

    async fn run_job(&self, job: Job, log: LogSink, mut stop: StopSignal) -> Result<Ended, Error> {
        if !job.services.is_empty() {
            // The coordinator places such stages on docker agents only; an
            // older coordinator may not.
            let message = "the stage has `services:`, which start only beside a docker stage; \
                           this agent runs host processes"
                .to_owned();
            log.system(message.clone()).await;
            return Ok(Exit::CannotStart(message).into());
        }
        let script = job.scratch.join(format!("{}.sh", job.name));
        let mut text = job.commands.join("\n");
        text.push('\n');
        tokio::fs::write(&script, text)
            .await
            .map_err(Error::work_dir(&script))?;
        let ended = self.run_script(&job, &script, &log, &mut stop).await;
        let _ = tokio::fs::remove_file(&script).await;
        ended
    }

    async fn run_script(
        &self,
        job: &Job,
        script: &Path,
        log: &LogSink,
        stop: &mut StopSignal,
    ) -> Result<Ended, Error> {
        let mut child = Command::new("sh")
            .arg("-e")
            .arg(script)
            .current_dir(&job.dir)
            .env_clear()
            .envs(self.inherited_env.iter().map(|(k, v)| (k, v)))
            .envs(&job.env)
            .envs(gpu_env(&job.gpus))
            .envs(&job.secrets)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::Spawn)?;
        let started_at = Instant::now();
        let mut group = ProcessGroup(child.id().map(|pid| pid as libc::pid_t));
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            unreachable!("stdout and stderr are piped");
        };
        let mut output = pin!(futures::future::join(
            forward_lines(stdout, LogStream::Stdout, log.clone()),
            forward_lines(stderr, LogStream::Stderr, log.clone()),
        ));
        let mut output_done = false;

        let deadline = job.timeout.map(|limit| Instant::now() + limit);
        let ending = loop {
            tokio::select! {
                _ = &mut output, if !output_done => output_done = true,
                status = child.wait() => break Ending::Exited(status.map_err(Error::Spawn)?),
                () = sleep_until_some(deadline) => break Ending::TimedOut(job.timeout.unwrap_or_default()),
                stop = stop.stopped() => break Ending::Stopped(stop),
            }
        };

        let exit = match ending {
            Ending::Exited(status) => exit_of(status),
            Ending::TimedOut(limit) => {
                let limit = duration::format(limit);
                log.system(format!("timed out after {limit}; stopping the commands"))
                    .await;
                self.terminate(&mut child, &group, &mut output, &mut output_done, log)
                    .await
                    .map_err(Error::Spawn)?;
                Exit::TimedOut(job.timeout.unwrap_or_default())
            }
            Ending::Stopped(stop) => {
                log.system(format!("{stop}; stopping the commands")).await;
                self.terminate(&mut child, &group, &mut output, &mut output_done, log)
                    .await
                    .map_err(Error::Spawn)?;
                Exit::Stopped(stop)
            }
        };

        // The shell is gone; whatever it left running in the background goes
        // too, or it would hold the pipes open and outlive the stage.
        if group.signal(0) {
            log.system("stopping processes the commands left running")
                .await;
            group.signal(libc::SIGKILL);
        }
        group.disarm();
        if !output_done && timeout(OUTPUT_DRAIN, &mut output).await.is_err() {
            log.system("output stayed open after the commands ended (a process left the stage's process group); not waiting for it")
                .await;
        }
        Ok(Ended {
            started_at: Some(started_at),
            ..Ended::from(exit)
        })
    }

    /// SIGTERM to the whole group, SIGKILL after the grace period, and wait
    /// for the shell, all while its output keeps flowing.
    async fn terminate(
        &self,
        child: &mut Child,
        group: &ProcessGroup,
        output: &mut (impl Future<Output = ((), ())> + Unpin),
        output_done: &mut bool,
        log: &LogSink,
    ) -> io::Result<ExitStatus> {
        group.signal(libc::SIGTERM);
        let mut grace = pin!(sleep(self.grace));
        let mut killed = false;
        loop {
            tokio::select! {
                _ = &mut *output, if !*output_done => *output_done = true,
                status = child.wait() => return status,
                () = &mut grace, if !killed => {
                    killed = true;
                    let grace = duration::format(self.grace);
                    log.system(format!("commands still running {grace} after SIGTERM; sending SIGKILL")).await;
                    group.signal(libc::SIGKILL);
                }
            }
        }
    }
}

impl Executor for ProcessExecutor {
    fn run<'a>(
        &'a self,
        job: Job,
        log: LogSink,
        stop: StopSignal,
    ) -> BoxFuture<'a, Result<Ended, Error>> {
        Box::pin(self.run_job(job, log, stop))
    }
}

enum Ending {
    Exited(ExitStatus),
    TimedOut(Duration),
    Stopped(Stop),
}

fn exit_of(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        (None, None) => Exit::Code(-1),
    }
}

/// The process group of one stage's shell. Dropping it kills whatever is
/// still in the group, so even an abandoned future leaves no process behind.
struct ProcessGroup(Option<libc::pid_t>);

impl ProcessGroup {
    /// Sends `signal` to every process in the group (0 only checks that one
    /// exists); true when at least one process got it.
    fn signal(&self, signal: libc::c_int) -> bool {
        match self.0 {
            // A pgid of 0 or 1 would address our own group or every process.
            // SAFETY: kill(2) has no memory-safety preconditions.
            Some(pgid) if pgid > 1 => unsafe { libc::kill(-pgid, signal) == 0 },
            _ => false,
        }
    }

    /// The group is known to be empty: dropping it must not signal a group
    /// id the system may hand out again.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

/// The reserved GPU devices as CUDA numbers them for a host process;
/// nothing when the stage asked for none.
fn gpu_env(gpus: &[u32]) -> Option<(&'static str, String)> {
    if gpus.is_empty() {
        return None;
    }
    let devices: Vec<String> = gpus.iter().map(u32::to_string).collect();
    Some(("CUDA_VISIBLE_DEVICES", devices.join(",")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::executor::contract::stop_signal;
    use crate::logs::testing::{self, Capture};

    const TEST_GRACE: Duration = Duration::from_millis(300);

    struct Setup {
        executor: Arc<ProcessExecutor>,
        dir: tempfile::TempDir,
        scratch: tempfile::TempDir,
    }

    fn setup() -> Setup {
        Setup {
            executor: Arc::new(ProcessExecutor::new(TEST_GRACE)),
            dir: tempfile::tempdir().unwrap(),
            scratch: tempfile::tempdir().unwrap(),
        }
    }

    impl Setup {
        fn job(&self, commands: &[&str], timeout: Option<Duration>) -> Job {
            Job {
                gpus: Vec::new(),
                services: Vec::new(),
                key: crate::attempt::AttemptKey::new(1, 0, 1),
                stage_name: "build".into(),
                name: "1-0-1".into(),
                workspace: self.dir.path().to_owned(),
                dir: self.dir.path().to_owned(),
                scratch: self.scratch.path().to_owned(),
                commands: commands.iter().map(|c| c.to_string()).collect(),
                env: BTreeMap::new(),
                secrets: BTreeMap::new(),
                timeout,
                image: String::new(),
                docker: Default::default(),
            }
        }

        async fn run(&self, job: Job) -> (Exit, Vec<String>) {
            let (sink, mut capture) = testing::sink();
            let (_stop_tx, stop) = stop_signal();
            let ended = self.executor.run(job, sink, stop).await.unwrap();
            (ended.exit, capture.lines())
        }
    }

    /// True once `pid` no longer runs. A killed orphan may linger as a zombie
    /// until init reaps it; it runs nothing, so it counts as gone.
    async fn gone(pid: libc::pid_t) -> bool {
        for _ in 0..100 {
            // SAFETY: kill(2) has no memory-safety preconditions.
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'));
            if !alive || zombie {
                return true;
            }
            sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// The pid a script echoed, from captured lines.
    fn pid_in(lines: &[String]) -> libc::pid_t {
        lines
            .iter()
            .find_map(|l| l.strip_prefix("LOG_STREAM_STDOUT: ")?.parse().ok())
            .expect("the script echoes a pid")
    }

    /// Reads lines until one parses as a pid.
    async fn echoed_pid(capture: &mut Capture) -> libc::pid_t {
        loop {
            let line = capture.next_line().await.expect("the script echoes a pid");
            if let Ok(pid) = line.text.trim().parse() {
                return pid;
            }
        }
    }

    #[test]
    fn reserved_gpus_are_the_cuda_visible_devices() {
        assert_eq!(gpu_env(&[]), None);
        assert_eq!(
            gpu_env(&[1, 3]),
            Some(("CUDA_VISIBLE_DEVICES", "1,3".to_owned()))
        );
    }

    #[tokio::test]
    async fn success_streams_stdout_and_stderr() {
        let setup = setup();
        let job = setup.job(&["echo hello", "echo oops >&2"], None);
        let (exit, lines) = setup.run(job).await;
        assert_eq!(exit, Exit::Code(0));
        assert!(
            lines.contains(&"LOG_STREAM_STDOUT: hello".to_owned()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"LOG_STREAM_STDERR: oops".to_owned()),
            "{lines:?}"
        );
        let scripts = std::fs::read_dir(setup.scratch.path()).unwrap().count();
        assert_eq!(scripts, 0, "the script is removed");
    }

    #[tokio::test]
    async fn first_failing_command_ends_the_stage_with_its_code() {
        let setup = setup();
        let job = setup.job(&["echo before", "exit 3", "echo never"], None);
        let (exit, lines) = setup.run(job).await;
        assert_eq!(exit, Exit::Code(3));
        assert_eq!(lines, ["LOG_STREAM_STDOUT: before"]);
    }

    #[tokio::test]
    async fn env_and_cwd_are_the_jobs() {
        let setup = setup();
        let mut job = setup.job(
            &[
                "pwd",
                "echo \"$GREETING $KILN_RUN_ID\"",
                "echo \"${CARGO_PKG_NAME:-not inherited}\"",
                "command -v sh >/dev/null && echo path ok",
            ],
            None,
        );
        job.env.insert("GREETING".into(), "hi".into());
        job.env.insert("KILN_RUN_ID".into(), "42".into());
        let (exit, lines) = setup.run(job).await;
        assert_eq!(exit, Exit::Code(0));
        let pwd = setup.dir.path().canonicalize().unwrap();
        assert_eq!(
            lines,
            [
                format!("LOG_STREAM_STDOUT: {}", pwd.display()),
                "LOG_STREAM_STDOUT: hi 42".into(),
                "LOG_STREAM_STDOUT: not inherited".into(),
                "LOG_STREAM_STDOUT: path ok".into(),
            ]
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let setup = setup();
        let job = setup.job(
            &["sleep 1000 & echo $!", "sleep 1000"],
            Some(Duration::from_millis(300)),
        );
        let started = std::time::Instant::now();
        let (exit, lines) = setup.run(job).await;
        assert_eq!(exit, Exit::TimedOut(Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            lines.iter().any(|l| l.contains("timed out after 300ms")),
            "{lines:?}"
        );
        let pid = pid_in(&lines);
        assert!(
            gone(pid).await,
            "background sleep {pid} survived the timeout"
        );
    }

    #[tokio::test]
    async fn cancel_stops_every_process_of_the_stage() {
        let setup = setup();
        let job = setup.job(&["sleep 1000 & echo $!", "sleep 1000"], None);
        let (sink, mut capture) = testing::sink();
        let (stop_tx, stop) = stop_signal();
        let executor = setup.executor.clone();
        let running = tokio::spawn(async move { executor.run(job, sink, stop).await });

        let pid = echoed_pid(&mut capture).await;
        stop_tx.stop(Stop::Cancel("user asked".into()));
        let exit = running.await.unwrap().unwrap().exit;
        assert_eq!(exit, Exit::Stopped(Stop::Cancel("user asked".into())));
        assert!(
            gone(pid).await,
            "background sleep {pid} survived the cancel"
        );
        let lines = capture.lines();
        assert!(
            lines.iter().any(|l| l.contains("cancelled (user asked)")),
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn processes_ignoring_sigterm_get_sigkill_after_the_grace() {
        let setup = setup();
        // An ignored SIGTERM stays ignored in the children.
        let job = setup.job(
            &["trap '' TERM", "sleep 1000 & echo $!", "sleep 1000"],
            None,
        );
        let (sink, mut capture) = testing::sink();
        let (stop_tx, stop) = stop_signal();
        let executor = setup.executor.clone();
        let running = tokio::spawn(async move { executor.run(job, sink, stop).await });

        let pid = echoed_pid(&mut capture).await;
        stop_tx.stop(Stop::HandBack);
        let exit = running.await.unwrap().unwrap().exit;
        assert_eq!(exit, Exit::Stopped(Stop::HandBack));
        assert!(gone(pid).await, "background sleep {pid} survived SIGKILL");
        let lines = capture.lines();
        assert!(
            lines.iter().any(|l| l.contains("sending SIGKILL")),
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn background_processes_left_by_a_successful_stage_are_killed() {
        let setup = setup();
        let job = setup.job(&["sleep 1000 & echo $!"], None);
        let (exit, lines) = setup.run(job).await;
        assert_eq!(exit, Exit::Code(0));
        let pid = pid_in(&lines);
        assert!(gone(pid).await, "background sleep {pid} outlived the stage");
        assert!(
            lines.iter().any(|l| l.contains("left running")),
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn a_missing_directory_is_a_spawn_error() {
        let setup = setup();
        let mut job = setup.job(&["true"], None);
        job.dir = setup.dir.path().join("missing");
        let (sink, _capture) = testing::sink();
        let (_stop_tx, stop) = stop_signal();
        let err = setup.executor.run(job, sink, stop).await.unwrap_err();
        assert!(matches!(err, Error::Spawn(_)), "{err}");
    }
}
