//! Dataset snapshots: a watched directory, copied aside so it cannot
//! change while it is read, checked against the digest that settled, and
//! packed like an artifact under the workspace path stages expect.

use std::io;
use std::path::Path;
use std::sync::Arc;

use kiln_common::spec::DataTrigger;
use kiln_common::triggers::data::digest_tree;

use crate::blobs::BlobStore;
use crate::store::DatasetRecord;

/// Copies, checks and stores the watched directory. `Ok(None)` when the
/// copy no longer has the settled content (it changed again).
pub(crate) async fn snapshot(
    blobs: &Arc<BlobStore>,
    trigger: &DataTrigger,
    settled_digest: &str,
) -> anyhow::Result<Option<DatasetRecord>> {
    let (blobs, trigger, settled) = (blobs.clone(), trigger.clone(), settled_digest.to_owned());
    tokio::task::spawn_blocking(move || snapshot_blocking(&blobs, &trigger, &settled)).await?
}

fn snapshot_blocking(
    blobs: &BlobStore,
    trigger: &DataTrigger,
    settled: &str,
) -> anyhow::Result<Option<DatasetRecord>> {
    let scratch = tempfile::tempdir()?;
    let copy = scratch.path().join(&trigger.into);
    copy_tree(&trigger.watch, &copy)?;
    if digest_tree(&copy)?.digest != settled {
        return Ok(None);
    }
    let info = blobs.store_with(|out| {
        kiln_common::archive::pack(scratch.path(), &trigger.into, out)
            .map(drop)
            .map_err(io::Error::other)
    })?;
    Ok(Some(DatasetRecord {
        source: trigger.watch.display().to_string(),
        path: trigger.into.clone(),
        digest: info.digest.to_string(),
        content_digest: settled.to_owned(),
    }))
}

/// Copies regular files and directories; symlinks are recreated as they
/// are (the digest covers their targets).
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
