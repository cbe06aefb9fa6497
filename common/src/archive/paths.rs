//! Path rules shared by packing and unpacking: what an artifact path may be,
//! what an entry name may be, and where a symlink really points.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::ArchiveError;

/// Longest entry name or symlink target accepted, in bytes: Linux's
/// `PATH_MAX`, which also bounds what one entry can make us hold in memory.
pub(crate) const MAX_NAME_BYTES: usize = 4096;

/// Symlinks followed while resolving one link before it counts as a loop;
/// the kernel gives up at the same number.
const MAX_SYMLINK_HOPS: usize = 40;

pub(crate) const LINK_ABSOLUTE: &str = "is absolute";
pub(crate) const LINK_OUTSIDE: &str = "points outside";
pub(crate) const LINK_LOOPS: &str = "loops";

const EXAMPLES: &str = "such as `build/model` or `build/metrics.json`";

/// The rule the `kiln.yml` validator applies to an artifact path: relative,
/// non-empty, `/`-separated, no `..`, no NUL, not a Windows drive path, and
/// naming something below the workspace rather than the workspace itself.
///
/// The error completes a sentence that starts with the path ("artifact path
/// `../x` has a `..` component; ...") and says what to write instead.
pub fn check_artifact_path(path: &str) -> Result<(), String> {
    artifact_components(path).map(drop)
}

/// The artifact path as entry-name prefix: `./build//model/` becomes
/// `build/model`.
pub(crate) fn normalize_artifact_path(path: &str) -> Result<PathBuf, ArchiveError> {
    match artifact_components(path) {
        Ok(parts) => Ok(parts.iter().collect()),
        Err(reason) => Err(ArchiveError::InvalidPath {
            path: path.to_owned(),
            reason,
        }),
    }
}

fn artifact_components(path: &str) -> Result<Vec<&str>, String> {
    if path.is_empty() {
        return Err(format!(
            "is empty; write a path relative to the workspace, {EXAMPLES}"
        ));
    }
    if path.contains('\0') {
        return Err("contains a NUL byte; remove it".to_owned());
    }
    if path.contains('\\') {
        return Err(format!(
            "contains `\\`; separate directories with `/`, {EXAMPLES}"
        ));
    }
    let bytes = path.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(format!(
            "is a Windows drive path; write a path relative to the workspace, {EXAMPLES}"
        ));
    }
    if path.starts_with('/') {
        let relative = path.trim_start_matches('/');
        return Err(if relative.is_empty() {
            format!("is absolute; write a path relative to the workspace, {EXAMPLES}")
        } else {
            format!("is absolute; write it relative to the workspace, as `{relative}`")
        });
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "has a `..` component; artifacts stay inside the workspace, so name a \
                     path below it, {EXAMPLES}"
                ));
            }
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(format!(
            "names the workspace itself; name what the stage produces inside it, {EXAMPLES}"
        ));
    }
    Ok(parts)
}

/// An archive entry's name as a relative path of plain components (empty for
/// `./`), or why the name is refused.
pub(crate) fn entry_path(name: &[u8]) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("its name is empty".to_owned());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("its name is longer than {MAX_NAME_BYTES} bytes"));
    }
    if name.contains(&0) {
        return Err("its name contains a NUL byte".to_owned());
    }
    if name[0] == b'/' {
        return Err("its name is an absolute path".to_owned());
    }
    let mut path = PathBuf::new();
    for part in name.split(|&byte| byte == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("its name has a `..` component".to_owned()),
            part => path.push(OsStr::from_bytes(part)),
        }
    }
    Ok(path)
}

/// Why a symlink at `link_dir/<name>` with this target would leave the tree,
/// judging by the text alone; `link_dir` is relative to the tree's root.
pub(crate) fn lexical_link_problem(link_dir: &Path, target: &Path) -> Option<&'static str> {
    let mut depth = link_dir.components().count();
    for component in target.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => return Some(LINK_ABSOLUTE),
            Component::CurDir => {}
            Component::ParentDir if depth == 0 => return Some(LINK_OUTSIDE),
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
        }
    }
    None
}

/// Why a symlink at `link_dir/<name>` with this target leaves `root` once
/// the symlinks already under `root` are followed, the way the kernel would
/// follow them. The text alone is not enough: `d/l -> ..` and
/// `m -> d/l/..` each stay inside on paper, yet `m` is `root/..`.
///
/// `root` must be canonical and `link_dir` relative to it. Components that do
/// not exist (yet) are taken as plain names.
pub(crate) fn resolved_link_problem(
    root: &Path,
    link_dir: &Path,
    target: &Path,
) -> io::Result<Option<&'static str>> {
    let mut at: Vec<OsString> = link_dir
        .components()
        .map(|component| component.as_os_str().to_owned())
        .collect();
    let mut pending = VecDeque::new();
    if let Some(problem) = queue_components(target, &mut pending) {
        return Ok(Some(problem));
    }
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            if at.pop().is_none() {
                return Ok(Some(LINK_OUTSIDE));
            }
            continue;
        }
        at.push(part);
        let here: PathBuf = root.join(at.iter().collect::<PathBuf>());
        match fs::symlink_metadata(&here) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Ok(Some(LINK_LOOPS));
                }
                let next = fs::read_link(&here)?;
                at.pop();
                let mut front = VecDeque::new();
                if let Some(problem) = queue_components(&next, &mut front) {
                    return Ok(Some(problem));
                }
                front.append(&mut pending);
                pending = front;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Appends the components of a relative link target, keeping `..` as a
/// marker; an absolute target is the problem returned.
fn queue_components(target: &Path, queue: &mut VecDeque<OsString>) -> Option<&'static str> {
    for component in target.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => return Some(LINK_ABSOLUTE),
            Component::CurDir => {}
            Component::ParentDir => queue.push_back(OsString::from("..")),
            Component::Normal(name) => queue.push_back(name.to_owned()),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_paths() {
        let ok = ["build/model", "build/metrics.json", "./out/", "a//b", "x"];
        for path in ok {
            assert_eq!(check_artifact_path(path), Ok(()), "{path}");
        }
        // (path, part of the message)
        let bad = [
            ("", "is empty; write a path relative to the workspace"),
            (
                "/build/model",
                "is absolute; write it relative to the workspace, as `build/model`",
            ),
            ("/", "is absolute"),
            ("../x", "has a `..` component"),
            ("build/../../x", "has a `..` component"),
            ("build/..", "has a `..` component"),
            ("C:/out", "Windows drive"),
            ("c:out", "Windows drive"),
            ("build\\model", "separate directories with `/`"),
            ("\\\\server\\share", "separate directories with `/`"),
            ("build\0x", "NUL"),
            (".", "names the workspace itself"),
            ("./", "names the workspace itself"),
        ];
        for (path, message) in bad {
            let err = check_artifact_path(path).unwrap_err();
            assert!(err.contains(message), "{path:?}: {err}");
        }
        let normalized = normalize_artifact_path("./build//model/").unwrap();
        assert_eq!(normalized, Path::new("build/model"));
    }

    #[test]
    fn entry_names() {
        assert_eq!(entry_path(b"./a/b/").unwrap(), Path::new("a/b"));
        assert_eq!(entry_path(b"./").unwrap(), Path::new(""));
        for (name, reason) in [
            (&b""[..], "empty"),
            (b"/etc/passwd", "absolute"),
            (b"../evil", "`..`"),
            (b"a/../../evil", "`..`"),
            (b"a/..", "`..`"),
            (&[b'a'; MAX_NAME_BYTES + 1], "longer than"),
        ] {
            let err = entry_path(name).unwrap_err();
            assert!(
                err.contains(reason),
                "{}: {err}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn lexical_links() {
        let check =
            |dir: &str, target: &str| lexical_link_problem(Path::new(dir), Path::new(target));
        assert_eq!(check("a/b", "../c"), None);
        assert_eq!(check("a/b", "../../c"), None);
        assert_eq!(check("a/b", "./x/../../../c"), None);
        assert_eq!(check("a/b", "../../../c"), Some(LINK_OUTSIDE));
        assert_eq!(check("", ".."), Some(LINK_OUTSIDE));
        assert_eq!(check("a", "/etc"), Some(LINK_ABSOLUTE));
    }

    #[test]
    fn resolved_links_follow_existing_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        fs::create_dir(root.join("d")).unwrap();
        std::os::unix::fs::symlink("..", root.join("d/l")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        let check = |dir: &str, target: &str| {
            resolved_link_problem(&root, Path::new(dir), Path::new(target)).unwrap()
        };
        assert_eq!(check("", "d/l"), None);
        assert_eq!(check("", "d/l/d"), None);
        assert_eq!(check("", "d/l/.."), Some(LINK_OUTSIDE));
        assert_eq!(check("d", "l/../x"), Some(LINK_OUTSIDE));
        assert_eq!(check("", "missing/../d"), None);
        assert_eq!(check("", "loop"), Some(LINK_LOOPS));
        assert_eq!(check("", "/"), Some(LINK_ABSOLUTE));
    }
}
