//! A 200 MiB artifact through pack, a pipe and unpack, with the process's
//! peak memory watched.
//!
//! Peak memory is per process and tests run in parallel, so the streaming
//! runs in a test process of its own: the visible test starts the test
//! binary again with only the hidden one selected.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::mpsc;
use std::thread;

use crate::archive::{HashingWriter, Limits, pack, unpack};

const SIZE: u64 = 200 << 20;
/// A marker is written at every multiple of this, zeros elsewhere.
const MARK_EVERY: u64 = 16 << 20;
/// Peak memory may grow by this much while the artifact streams; holding
/// the file or the archive whole would take far more.
const MAX_GROWTH: u64 = 32 << 20;

/// Set for the child process, so the hidden test runs only there.
const CHILD_ENV: &str = "KILN_ARCHIVE_STREAMING_CHILD";

#[test]
fn large_artifact_streams_through_a_pipe_in_bounded_memory() {
    let module = module_path!().split_once("::").unwrap().1;
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &format!("{module}::streams_alone"), "--ignored"])
        .args(["--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    // A filter that matched nothing would also succeed.
    assert!(stdout.contains("1 passed"), "{stdout}\n{stderr}");
}

#[test]
#[ignore = "run in its own process by large_artifact_streams_through_a_pipe_in_bounded_memory"]
fn streams_alone() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let workspace = tempfile::tempdir().unwrap();
    fs::create_dir(workspace.path().join("build")).unwrap();
    // Sparse: no disk is used for the zeros, and reading them is cheap.
    let weights = File::create(workspace.path().join("build/weights.bin")).unwrap();
    weights.set_len(SIZE).unwrap();
    for idx in 0..SIZE / MARK_EVERY {
        weights
            .write_all_at(&marker(idx), idx * MARK_EVERY)
            .unwrap();
    }

    let rss_before = reset_peak_rss();
    let (writer, reader) = pipe();
    let workspace_path = workspace.path().to_owned();
    let packer = thread::spawn(move || {
        let mut hashing = HashingWriter::new(writer);
        let summary = pack(&workspace_path, "build/weights.bin", &mut hashing)?;
        Ok::<_, crate::archive::ArchiveError>((summary, hashing.finish().1))
    });
    let target = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_bytes: SIZE,
        max_entries: 10,
    };
    let unpacked = unpack(reader, target.path(), &limits).unwrap();
    let (packed, blob) = packer.join().unwrap().unwrap();
    let growth = peak_rss().saturating_sub(rss_before);

    assert_eq!((packed.bytes_in, unpacked.bytes), (SIZE, SIZE));
    assert!(blob.size < SIZE / 100, "archive of {} bytes", blob.size);
    assert!(
        growth < MAX_GROWTH,
        "peak memory grew by {} KiB from {} KiB",
        growth >> 10,
        rss_before >> 10
    );

    let out = File::open(target.path().join("build/weights.bin")).unwrap();
    assert_eq!(out.metadata().unwrap().len(), SIZE);
    let mut buf = vec![0; 4096];
    for idx in 0..SIZE / MARK_EVERY {
        out.read_exact_at(&mut buf, idx * MARK_EVERY).unwrap();
        assert_eq!(buf, marker(idx), "marker {idx}");
        out.read_exact_at(&mut buf, idx * MARK_EVERY + (1 << 20))
            .unwrap();
        assert!(
            buf.iter().all(|&byte| byte == 0),
            "zeros after marker {idx}"
        );
    }
}

fn marker(idx: u64) -> Vec<u8> {
    format!("marker {idx} ")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(4096)
        .collect()
}

/// Resets the kernel's record of this process's peak resident memory to
/// what is resident now, and returns that.
fn reset_peak_rss() -> u64 {
    // Without this the peak would include whatever the test harness and
    // other tests touched before, hiding growth below that mark.
    fs::write("/proc/self/clear_refs", "5").unwrap();
    proc_status_bytes("VmRSS:")
}

/// The peak resident memory since the last reset.
fn peak_rss() -> u64 {
    proc_status_bytes("VmHWM:")
}

fn proc_status_bytes(key: &str) -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|line| line.starts_with(key)).unwrap();
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

/// An in-process pipe holding at most a few chunks, like a socket buffer.
fn pipe() -> (PipeWriter, PipeReader) {
    let (sender, receiver) = mpsc::sync_channel(4);
    (
        PipeWriter(sender),
        PipeReader {
            receiver,
            chunk: Vec::new(),
            pos: 0,
        },
    )
}

struct PipeWriter(mpsc::SyncSender<Vec<u8>>);

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .send(buf.to_vec())
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct PipeReader {
    receiver: mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.receiver.recv() {
                Ok(chunk) => (self.chunk, self.pos) = (chunk, 0),
                // The writer is gone: end of stream.
                Err(_) => return Ok(0),
            }
        }
        let len = buf.len().min(self.chunk.len() - self.pos);
        buf[..len].copy_from_slice(&self.chunk[self.pos..self.pos + len]);
        self.pos += len;
        Ok(len)
    }
}
