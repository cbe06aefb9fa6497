//! One stage container once it exists: its output, its exit code, and its
//! removal, which happens even when the attempt's future is dropped.

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::RemoveContainerOptionsBuilder;
use futures::{Stream, StreamExt};
use kiln_proto::v1::LogStream;
use tracing::warn;

use crate::error::Error;
use crate::logs::{LogSink, OutputLines};

/// A created container, removed when dropped unless [`Container::remove`]
/// already did: even an abandoned attempt leaves no container behind.
pub(super) struct Container {
    docker: Docker,
    /// What the engine knows it by (`kiln-<agent>-<attempt>`).
    pub(super) name: String,
    /// Set once removed, so dropping it does nothing more.
    removed: bool,
}

impl Container {
    pub(super) fn new(docker: Docker, name: String) -> Self {
        Container {
            docker,
            name,
            removed: false,
        }
    }

    /// Force-removes the container (stopping it if needed) and its anonymous
    /// volumes. A failure is only logged: the next start of the agent
    /// removes what is left.
    pub(super) async fn remove(mut self) {
        self.removed = true;
        if let Err(err) = remove(&self.docker, &self.name).await {
            warn!(container = %self.name, %err, "cannot remove a finished stage's container");
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let (docker, name) = (self.docker.clone(), std::mem::take(&mut self.name));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = remove(&docker, &name).await {
                    warn!(container = %name, %err, "cannot remove an abandoned stage's container");
                }
            });
        }
    }
}

pub(super) async fn remove(docker: &Docker, name: &str) -> Result<(), BollardError> {
    let options = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(name, Some(options)).await {
        Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        removed => removed,
    }
}

/// The container's exit code, once it has stopped.
pub(super) async fn wait_for_exit(docker: &Docker, name: &str) -> Result<i64, Error> {
    let mut waiting = docker.wait_container(name, None);
    match waiting.next().await {
        Some(Ok(response)) => Ok(response.status_code),
        // bollard reports a non-zero exit code as an error.
        Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(code),
        Some(Err(err)) => Err(Error::docker("container wait")(err)),
        None => Err(Error::Docker {
            action: "container wait",
            detail: "the engine closed the wait without an exit code".into(),
        }),
    }
}

/// Masks the attached stdout and stderr and splits them into lines, in the
/// order the engine sends them, and hands them to `sink`.
pub(super) async fn forward_output(
    mut output: impl Stream<Item = Result<LogOutput, BollardError>> + Unpin,
    mut sink: LogSink,
) {
    let mut stdout = OutputLines::new(&sink);
    let mut stderr = OutputLines::new(&sink);
    let mut lines = Vec::new();
    while let Some(Ok(chunk)) = output.next().await {
        let (stream, output_lines, bytes) = match chunk {
            LogOutput::StdOut { message } => (LogStream::Stdout, &mut stdout, message),
            LogOutput::StdErr { message } => (LogStream::Stderr, &mut stderr, message),
            // Without a tty there is no console output, and stdin is closed.
            LogOutput::Console { message } => (LogStream::Stdout, &mut stdout, message),
            LogOutput::StdIn { .. } => continue,
        };
        output_lines.feed(&bytes, &mut lines);
        for line in lines.drain(..) {
            if sink.line(stream, line).await.is_err() {
                return;
            }
        }
    }
    for (stream, output_lines) in [(LogStream::Stdout, stdout), (LogStream::Stderr, stderr)] {
        for line in output_lines.finish() {
            if sink.line(stream, line).await.is_err() {
                return;
            }
        }
    }
}
