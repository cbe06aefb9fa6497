//! Hand-made archives that try to write outside the target directory.
//!
//! Headers are built byte by byte: the tar crate's `set_path` refuses `..`
//! and absolute names, and a real attacker would not use it anyway.
//!
//! Every case runs in a sandbox holding the target, an empty `sentinel`
//! directory and a `victim.txt` beside it; after the refusal the sandbox
//! must hold exactly that, untouched.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use super::assert_mentions;
use crate::archive::{Limits, unpack};

/// One raw tar member.
pub(super) enum Raw {
    File(&'static str, &'static str),
    Dir(&'static str),
    Symlink(&'static str, String),
    HardLink(&'static str, String),
    Special(&'static str, EntryType),
    /// A GNU long-name header (type `L`) carrying this name for the next
    /// member.
    LongName(String),
    /// A pax extended header (type `x`) with these records.
    Pax(Vec<(&'static str, String)>),
    /// A member of this type whose data is `size` zero bytes.
    Sized(EntryType, u64),
}

pub(super) use Raw::*;

struct Sandbox {
    _dir: tempfile::TempDir,
    root: PathBuf,
    target: PathBuf,
}

const VICTIM: &str = "original contents";

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        fs::create_dir(root.join("sentinel")).unwrap();
        fs::write(root.join("victim.txt"), VICTIM).unwrap();
        let target = root.join("target");
        Sandbox {
            _dir: dir,
            root,
            target,
        }
    }

    fn sentinel(&self) -> String {
        self.root.join("sentinel").display().to_string()
    }

    fn victim(&self) -> String {
        self.root.join("victim.txt").display().to_string()
    }

    /// Nothing was written beside or above the target.
    fn assert_untouched(&self) {
        let mut names: Vec<_> = fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["sentinel", "target", "victim.txt"]);
        assert_eq!(fs::read_dir(self.root.join("sentinel")).unwrap().count(), 0);
        let victim = self.root.join("victim.txt");
        assert_eq!(fs::read_to_string(&victim).unwrap(), VICTIM);
        assert_eq!(fs::metadata(&victim).unwrap().nlink(), 1);
        assert!(!Path::new("/abs").exists());
        assert!(!self.root.parent().unwrap().join("evil").exists());
    }
}

/// Unpacks `members` (made for this sandbox) with `limits` and expects a
/// refusal mentioning `message`, with nothing written outside the target.
fn check(members: impl FnOnce(&Sandbox) -> Vec<Raw>, limits: Limits, message: &str) {
    let sandbox = Sandbox::new();
    let archive = craft(&members(&sandbox));
    let error = unpack(&archive[..], &sandbox.target, &limits).unwrap_err();
    assert_mentions(&error, message);
    sandbox.assert_untouched();
}

fn refused(members: impl FnOnce(&Sandbox) -> Vec<Raw>, message: &str) {
    check(members, Limits::UNLIMITED, message);
}

#[test]
fn names_that_climb_out_or_are_absolute() {
    refused(
        |_| vec![File("../evil", "x")],
        "archive entry `../evil` is refused: its name has a `..` component",
    );
    refused(
        |_| vec![File("/abs/evil", "x")],
        "entry `/abs/evil` is refused: its name is an absolute path",
    );
    refused(
        |_| vec![Dir("a"), File("a/../../evil", "x")],
        "entry `a/../../evil` is refused: its name has a `..`",
    );
    refused(|_| vec![Dir("../sentinel/sub")], "`..` component");
    let long = format!("{}/../../../evil", "a".repeat(120));
    refused(
        move |_| vec![LongName(long), File("placeholder", "x")],
        "its name has a `..` component",
    );
    refused(
        |_| {
            vec![
                Pax(vec![("path", "../evil".to_owned())]),
                File("placeholder", "x"),
            ]
        },
        "entry `../evil` is refused",
    );
}

#[test]
fn symlinks_that_point_out_or_are_written_through() {
    // An absolute link, then a file through it. The sentinel stands in for
    // `/etc`: these tests run as root, and a regression must not clobber
    // the machine.
    refused(
        |s| vec![Symlink("link", s.sentinel()), File("link/passwd", "pwned")],
        "symlink `link` -> ",
    );
    refused(|s| vec![Symlink("link", s.sentinel())], "is absolute");
    refused(
        |_| {
            vec![
                Symlink("link", "../sentinel".into()),
                File("link/evil", "pwned"),
            ]
        },
        "symlink `link` -> `../sentinel` points outside; use a relative link that stays inside the target directory",
    );
    refused(|_| vec![Symlink("link", "../..".into())], "points outside");
    refused(
        |_| vec![Dir("d"), Symlink("d/link", "../../sentinel".into())],
        "points outside",
    );
    // Each stays inside on paper; together `m` is the target's parent.
    refused(
        |_| {
            vec![
                Dir("d"),
                Symlink("d/l", "..".into()),
                Symlink("m", "d/l/..".into()),
            ]
        },
        "symlink `m` -> `d/l/..` points outside",
    );
    // A harmless link used as a directory by a later member: the member
    // lands in a real directory, and the link then has no place to go.
    refused(
        |_| {
            vec![
                Dir("sub"),
                Symlink("link", "sub".into()),
                File("link/x", "x"),
            ]
        },
        "archive entry `link` is refused: a directory is already at its path",
    );
    refused(
        |_| vec![Symlink("loop", "loop".into())],
        "symlink `loop` -> `loop` loops",
    );
}

#[test]
fn hard_links_and_special_files() {
    refused(
        |s| vec![HardLink("evil", s.victim()), File("evil", "pwned")],
        "archive entry `evil` is refused: it is a hard link; kiln archives never contain hard links",
    );
    refused(
        |_| vec![HardLink("evil", "/etc/passwd".into())],
        "it is a hard link",
    );
    refused(
        |_| vec![File("a", "a"), HardLink("b", "a".into())],
        "it is a hard link",
    );
    refused(
        |_| vec![Special("null", EntryType::Char)],
        "entry `null` is refused: it is a character device",
    );
    refused(
        |_| vec![Special("sda", EntryType::Block)],
        "it is a block device",
    );
    refused(|_| vec![Special("pipe", EntryType::Fifo)], "it is a fifo");
    refused(
        |_| vec![Special("sparse", EntryType::GNUSparse)],
        "it is a sparse file",
    );
    refused(
        |_| vec![Special("global", EntryType::XGlobalHeader)],
        "pax global header",
    );
}

#[test]
fn headers_that_would_make_us_read_or_skip_too_much() {
    refused(
        |_| vec![LongName("a".repeat(1 << 20)), File("x", "x")],
        "long name` is refused: it is 1048577 bytes, over the 4097 accepted",
    );
    refused(
        |_| vec![Pax(vec![("size", "1".to_owned())]), File("x", "xx")],
        "it sets `size`",
    );
    check(
        |_| vec![Sized(EntryType::Directory, 4096)],
        Limits {
            max_bytes: 1000,
            max_entries: 10,
        },
        "over its max_bytes limit of 1000 (reached 4096)",
    );
}

#[test]
fn limits_stop_the_unpack_before_the_data_is_written() {
    let two_files = || vec![File("a", "0123456789"), File("b", "0123456789")];
    check(
        |_| two_files(),
        Limits {
            max_bytes: 19,
            max_entries: 10,
        },
        "archive is over its max_bytes limit of 19 (reached 20)",
    );
    check(
        |_| two_files(),
        Limits {
            max_bytes: 20,
            max_entries: 1,
        },
        "archive is over its max_entries limit of 1 (reached 2)",
    );

    let sandbox = Sandbox::new();
    let archive = craft(&two_files());
    let exact = Limits {
        max_bytes: 20,
        max_entries: 2,
    };
    let summary = unpack(&archive[..], &sandbox.target, &exact).unwrap();
    assert_eq!((summary.files, summary.bytes), (2, 20));
}

#[test]
fn symlinks_already_in_the_target_are_never_followed() {
    // As a parent: refused.
    let sandbox = Sandbox::new();
    fs::create_dir(&sandbox.target).unwrap();
    symlink("../sentinel", sandbox.target.join("out")).unwrap();
    let error = unpack(
        &craft(&[File("out/evil", "pwned")])[..],
        &sandbox.target,
        &Limits::UNLIMITED,
    )
    .unwrap_err();
    assert_mentions(
        &error,
        "archive entry `out/evil` is refused: `out` on its path is a symlink",
    );
    sandbox.assert_untouched();

    // As the file itself: replaced, not written through.
    let sandbox = Sandbox::new();
    fs::create_dir(&sandbox.target).unwrap();
    symlink(sandbox.victim(), sandbox.target.join("evil")).unwrap();
    unpack(
        &craft(&[File("evil", "replaced")])[..],
        &sandbox.target,
        &Limits::UNLIMITED,
    )
    .unwrap();
    assert_eq!(
        fs::read_to_string(sandbox.target.join("evil")).unwrap(),
        "replaced"
    );
    assert!(
        !fs::symlink_metadata(sandbox.target.join("evil"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    sandbox.assert_untouched();
}

/// A zstd-compressed tar of `members`, names and link targets written raw.
pub(super) fn craft(members: &[Raw]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for member in members {
        match member {
            File(name, text) => append(&mut tar, EntryType::Regular, name, "", text.as_bytes()),
            Dir(name) => append(&mut tar, EntryType::Directory, name, "", b""),
            Symlink(name, target) => append(&mut tar, EntryType::Symlink, name, target, b""),
            HardLink(name, target) => append(&mut tar, EntryType::Link, name, target, b""),
            Special(name, entry_type) => append(&mut tar, *entry_type, name, "", b""),
            LongName(name) => {
                let mut data = name.clone().into_bytes();
                data.push(0);
                append(&mut tar, EntryType::GNULongName, "././@LongLink", "", &data);
            }
            Pax(records) => {
                let mut data = Vec::new();
                for (key, value) in records {
                    // Each record is "<len> <key>=<value>\n", len counting itself.
                    let body = format!(" {key}={value}\n");
                    let mut len = body.len() + 1;
                    while len != body.len() + len.to_string().len() {
                        len = body.len() + len.to_string().len();
                    }
                    data.extend(format!("{len}{body}").into_bytes());
                }
                append(&mut tar, EntryType::XHeader, "PaxHeader", "", &data);
            }
            Sized(entry_type, size) => {
                append(&mut tar, *entry_type, "sized", "", &vec![0; *size as usize])
            }
        }
    }
    let archive = tar.into_inner().unwrap();
    let mut encoder = zstd::Encoder::new(Vec::new(), 3).unwrap();
    encoder.write_all(&archive).unwrap();
    encoder.finish().unwrap()
}

fn append(
    tar: &mut tar::Builder<Vec<u8>>,
    entry_type: EntryType,
    name: &str,
    link: &str,
    data: &[u8],
) {
    let mut header = Header::new_gnu();
    header.set_entry_type(entry_type);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    let old = header.as_old_mut();
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_cksum();
    tar.append(&header, data).unwrap();
}
