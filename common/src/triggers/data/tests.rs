use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;

use super::*;

const SECOND: u64 = 1_000;

fn digest(root: &Path) -> TreeDigest {
    digest_tree(root).unwrap_or_else(|error| panic!("{error}"))
}

#[test]
fn settled_digest_triggers_once() {
    let mut watch = DataWatch::new(None, Duration::from_secs(30));
    assert_eq!(watch.observe("sha256:a", 0), None, "just seen");
    assert_eq!(
        watch.observe("sha256:a", 29 * SECOND),
        None,
        "not settled yet"
    );
    assert_eq!(
        watch.observe("sha256:a", 30 * SECOND),
        Some("sha256:a".to_owned())
    );
    assert_eq!(watch.observe("sha256:a", 31 * SECOND), None);
    assert_eq!(watch.observe("sha256:a", 3_600 * SECOND), None);
    assert_eq!(watch.last_triggered(), Some("sha256:a"));
}

#[test]
fn a_change_restarts_the_wait() {
    let mut watch = DataWatch::new(Some("sha256:old".to_owned()), Duration::from_secs(30));
    assert_eq!(watch.observe("sha256:old", 0), None);
    // A file being written: a new digest on every poll.
    assert_eq!(watch.observe("sha256:part1", 10 * SECOND), None);
    assert_eq!(watch.observe("sha256:part2", 40 * SECOND), None);
    assert_eq!(watch.observe("sha256:done", 70 * SECOND), None);
    assert_eq!(watch.observe("sha256:done", 99 * SECOND), None);
    assert_eq!(
        watch.observe("sha256:done", 100 * SECOND),
        Some("sha256:done".to_owned())
    );
}

#[test]
fn the_last_triggered_digest_never_triggers_again() {
    let mut watch = DataWatch::new(Some("sha256:a".to_owned()), Duration::from_secs(1));
    for now in 0..10 {
        assert_eq!(watch.observe("sha256:a", now * SECOND), None);
    }
    // A short-lived change that goes back before settling starts nothing.
    let mut watch = DataWatch::new(Some("sha256:a".to_owned()), Duration::from_secs(30));
    assert_eq!(watch.observe("sha256:b", 0), None);
    assert_eq!(watch.observe("sha256:a", 10 * SECOND), None);
    assert_eq!(watch.observe("sha256:a", 60 * SECOND), None);
    // ...and `b` coming back later waits the whole settle again.
    assert_eq!(watch.observe("sha256:b", 70 * SECOND), None);
    assert_eq!(watch.observe("sha256:b", 99 * SECOND), None);
    assert_eq!(
        watch.observe("sha256:b", 100 * SECOND),
        Some("sha256:b".to_owned())
    );
}

#[test]
fn returning_to_an_older_digest_triggers_again() {
    let settle = Duration::from_secs(5);
    let mut watch = DataWatch::new(None, settle);
    assert_eq!(watch.observe("sha256:a", 0), None);
    assert_eq!(
        watch.observe("sha256:a", 5 * SECOND),
        Some("sha256:a".to_owned())
    );
    assert_eq!(watch.observe("sha256:b", 10 * SECOND), None);
    assert_eq!(
        watch.observe("sha256:b", 15 * SECOND),
        Some("sha256:b".to_owned())
    );
    assert_eq!(watch.observe("sha256:a", 20 * SECOND), None);
    assert_eq!(
        watch.observe("sha256:a", 25 * SECOND),
        Some("sha256:a".to_owned())
    );
}

#[test]
fn a_clock_going_back_does_not_count_as_time() {
    let mut watch = DataWatch::new(None, Duration::from_secs(30));
    assert_eq!(watch.observe("sha256:a", 100 * SECOND), None);
    assert_eq!(watch.observe("sha256:a", 50 * SECOND), None);
    assert_eq!(
        watch.observe("sha256:a", 130 * SECOND),
        Some("sha256:a".to_owned())
    );
}

#[test]
fn tree_digest_covers_paths_types_and_content() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("raw/2025")).unwrap();
    fs::write(root.join("raw/2025/a.csv"), "1,2\n").unwrap();
    fs::write(root.join("b.csv"), "3,4\n").unwrap();
    let first = digest(root);
    assert!(first.digest.starts_with("sha256:") && first.digest.len() == 7 + 64);
    assert_eq!((first.n_files, first.n_bytes), (2, 8));
    assert_eq!(digest(root), first, "same tree, same digest");

    // Same content under other names, or other content, is another digest.
    fs::rename(root.join("b.csv"), root.join("c.csv")).unwrap();
    let renamed = digest(root);
    assert_ne!(renamed.digest, first.digest);
    fs::write(root.join("c.csv"), "3,5\n").unwrap();
    assert_ne!(digest(root).digest, renamed.digest);

    // An empty directory counts; a file and an empty directory of the same
    // name differ.
    fs::create_dir(root.join("empty")).unwrap();
    let with_dir = digest(root);
    fs::remove_dir(root.join("empty")).unwrap();
    fs::write(root.join("empty"), "").unwrap();
    assert_ne!(digest(root).digest, with_dir.digest);
}

#[test]
fn identical_trees_in_different_places_have_one_digest() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Created in different orders: the walk sorts.
    for name in ["b", "a", "c"] {
        fs::write(one.path().join(name), name).unwrap();
    }
    for name in ["c", "a", "b"] {
        fs::write(two.path().join(name), name).unwrap();
    }
    assert_eq!(digest(one.path()), digest(two.path()));
}

#[test]
fn symlinks_are_recorded_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    fs::create_dir(&root).unwrap();
    let outside = dir.path().join("outside.csv");
    fs::write(&outside, "secret").unwrap();
    symlink(&outside, root.join("link")).unwrap();
    let before = digest(&root);
    assert_eq!((before.n_files, before.n_bytes), (1, 0));
    fs::write(&outside, "changed").unwrap();
    assert_eq!(digest(&root), before, "the target's content is not read");
    fs::remove_file(root.join("link")).unwrap();
    symlink("elsewhere", root.join("link")).unwrap();
    assert_ne!(digest(&root), before, "the target's name is");
    // A dangling link is fine too.
    assert_eq!(digest(&root).n_files, 1);
}

#[test]
fn errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let error = digest_tree(&missing).unwrap_err();
    assert!(
        matches!(&error, DataError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    );
    assert!(error.to_string().contains(&missing.display().to_string()));

    let file = dir.path().join("file");
    fs::write(&file, "x").unwrap();
    assert_eq!(
        digest_tree(&file).unwrap_err().to_string(),
        format!(
            "`{}` is not a directory; `watch` must name a directory",
            file.display()
        )
    );

    let fifo = dir.path().join("pipe");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    assert_eq!(
        digest_tree(dir.path()).unwrap_err().to_string(),
        format!(
            "`{}` is a fifo; a watched directory may hold only files, directories and symlinks",
            fifo.display()
        )
    );
}

/// A file written in two parts, polled in between, triggers once, with the
/// complete content, after it has held still for `settle`.
#[test]
fn a_file_written_in_two_parts_triggers_once_when_complete() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::write(root.join("old.csv"), "0\n").unwrap();
    let settle = Duration::from_secs(60);
    let old = digest(root).digest;
    let mut watch = DataWatch::new(Some(old.clone()), settle);
    assert_eq!(watch.observe(&old, 0), None);

    let mut file = fs::File::create(root.join("new.csv")).unwrap();
    file.write_all(b"1,2,3\n").unwrap();
    let half = digest(root);
    assert_eq!(watch.observe(&half.digest, 30 * SECOND), None);

    file.write_all(b"4,5,6\n").unwrap();
    drop(file);
    let whole = digest(root);
    assert_ne!(whole.digest, half.digest);
    assert_eq!((whole.n_files, whole.n_bytes), (2, 14));
    // 60 s after the first half appeared, but the content changed since.
    assert_eq!(watch.observe(&whole.digest, 90 * SECOND), None);
    assert_eq!(watch.observe(&digest(root).digest, 120 * SECOND), None);
    assert_eq!(
        watch.observe(&digest(root).digest, 150 * SECOND),
        Some(whole.digest.clone())
    );
    assert_eq!(watch.observe(&digest(root).digest, 210 * SECOND), None);
}
