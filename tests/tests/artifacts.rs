//! The content-addressed store over real gRPC: round trip of a multi-GiB
//! blob with bounded memory, dedup, rejected mismatches, resumed downloads,
//! corruption on disk, and garbage collection.

use std::time::{Duration, SystemTime};

use anyhow::Result;
use kiln_agent::transfer::{digest_file, download_file, upload_file};
use kiln_common::channel::KilnChannel;
use kiln_proto::v1 as pb;
use kiln_tests::{Coordinator, CoordinatorOptions, peak_rss_mb, write_generated};
use pb::artifact_service_client::ArtifactServiceClient;

async fn artifacts(coordinator: &Coordinator) -> Result<ArtifactServiceClient<KilnChannel>> {
    let channel = coordinator.channel().await?;
    Ok(ArtifactServiceClient::new(channel).max_decoding_message_size(8 << 20))
}

/// Where the coordinator keeps a blob.
fn blob_path(coordinator: &Coordinator, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    coordinator
        .data_dir
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multi_gib_blob_round_trips_with_bounded_memory() -> Result<()> {
    const SIZE: u64 = 2 << 30;
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let mut client = artifacts(&coordinator).await?;
    let scratch = tempfile::tempdir()?;
    let source = scratch.path().join("big.bin");
    write_generated(&source, SIZE, 7)?;
    let (digest, size) = digest_file(&source).await?;
    assert_eq!(size, SIZE);
    assert!(
        upload_file(
            &mut client,
            &source,
            &digest,
            size,
            "application/octet-stream",
            |_| {}
        )
        .await?
    );
    std::fs::remove_file(&source)?;
    let copy = scratch.path().join("copy.bin");
    let received = download_file(&mut client, &digest, &copy, |_| {}).await?;
    assert_eq!(received, SIZE);
    assert_eq!(
        digest_file(&copy).await?.0,
        digest,
        "the copy hashes to the same digest"
    );
    let peak = peak_rss_mb(coordinator.process.pid())?;
    assert!(
        peak < 256.0,
        "coordinator peak RSS {peak:.0} MB for a {SIZE}-byte blob"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_dedup_and_mismatches_are_rejected() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let mut client = artifacts(&coordinator).await?;
    let scratch = tempfile::tempdir()?;
    let file = scratch.path().join("model.bin");
    write_generated(&file, 3 << 20, 1)?;
    let (digest, size) = digest_file(&file).await?;
    assert!(
        upload_file(&mut client, &file, &digest, size, "x", |_| {}).await?,
        "first upload sends"
    );
    assert!(
        !upload_file(&mut client, &file, &digest, size, "x", |_| {}).await?,
        "second is a dedup hit"
    );

    // A different file declared under a digest it does not have.
    let other = scratch.path().join("other.bin");
    write_generated(&other, 1 << 20, 2)?;
    let (wrong_digest, _) = digest_file(&file).await?;
    let fake = format!("sha256:{}", "ab".repeat(32));
    let error = upload_file(&mut client, &other, &fake, 1 << 20, "x", |_| {})
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("upload rejected: declared"),
        "{error}"
    );
    let stat = client
        .stat_blob(pb::StatBlobRequest {
            digest: fake.clone(),
        })
        .await?
        .into_inner();
    assert!(!stat.exists, "a rejected upload stores nothing");
    // Right digest, wrong size.
    let (other_digest, other_size) = digest_file(&other).await?;
    let error = upload_file(
        &mut client,
        &other,
        &other_digest,
        other_size + 1,
        "x",
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("bytes"), "{error}");
    assert_eq!(wrong_digest, digest);
    let bad = client
        .stat_blob(pb::StatBlobRequest {
            digest: "md5:abc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_resumes_from_an_offset_and_corruption_is_reported() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let mut client = artifacts(&coordinator).await?;
    let scratch = tempfile::tempdir()?;
    let file = scratch.path().join("data.bin");
    write_generated(&file, 5 << 20, 3)?;
    let (digest, size) = digest_file(&file).await?;
    upload_file(&mut client, &file, &digest, size, "x", |_| {}).await?;

    // A dropped download picks up where it stopped: the tail from an offset
    // completes the head that had arrived.
    let whole = std::fs::read(&file)?;
    let offset = 3 * 1024 * 1024 + 17;
    let mut stream = client
        .download_blob(pb::DownloadBlobRequest {
            digest: digest.clone(),
            offset,
        })
        .await?
        .into_inner();
    let mut tail = Vec::new();
    while let Some(chunk) = stream.message().await? {
        tail.extend_from_slice(&chunk.data);
    }
    assert_eq!(tail, whole[offset as usize..]);
    let past_end = client
        .download_blob(pb::DownloadBlobRequest {
            digest: digest.clone(),
            offset: size + 1,
        })
        .await;
    assert_eq!(past_end.unwrap_err().code(), tonic::Code::OutOfRange);

    // Flip one byte on disk: the next read is refused, not served.
    let stored = blob_path(&coordinator, &digest);
    let mut bytes = std::fs::read(&stored)?;
    bytes[1000] ^= 0xff;
    std::fs::write(&stored, bytes)?;
    let error = download_file(&mut client, &digest, &scratch.path().join("copy"), |_| {})
        .await
        .unwrap_err();
    assert!(error.to_string().contains("corrupted on disk"), "{error}");
    assert!(
        !scratch.path().join("copy").exists(),
        "a failed download leaves no file"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_deletes_only_old_unreferenced_blobs() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let mut client = artifacts(&coordinator).await?;
    let mut control = coordinator.client().await?;
    let scratch = tempfile::tempdir()?;
    let mut digests = Vec::new();
    for seed in [10, 11, 12] {
        let file = scratch.path().join(format!("{seed}.bin"));
        write_generated(&file, 64 << 10, seed)?;
        let (digest, size) = digest_file(&file).await?;
        upload_file(&mut client, &file, &digest, size, "x", |_| {}).await?;
        digests.push(digest);
    }
    let (old_garbage, referenced, fresh) = (&digests[0], &digests[1], &digests[2]);
    // `referenced` is the source of a run (a repository-less pipeline run
    // from an uploaded snapshot).
    let repo = kiln_tests::Repo::new("pipeline: keep\nstages:\n  a: { commands: [\"true\"] }\n")?;
    control
        .register_pipeline(pb::RegisterPipelineRequest {
            file_name: "kiln.yml".into(),
            spec_yaml: "pipeline: keep\nstages:\n  a: { commands: [\"true\"] }\n".into(),
            repo: repo.path().display().to_string(),
            branch: "main".into(),
            subdir: String::new(),
            path: String::new(),
        })
        .await?;
    control
        .trigger_run(pb::TriggerRunRequest {
            pipeline: "keep".into(),
            source_digest: referenced.clone(),
            ..Default::default()
        })
        .await?;
    // Age the first two past the grace period; the third stays fresh.
    let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 3600);
    for digest in [old_garbage, referenced] {
        std::fs::File::options()
            .write(true)
            .open(blob_path(&coordinator, digest))?
            .set_modified(two_hours_ago)?;
    }
    let dry = control
        .collect_garbage(pb::GcRequest {
            keep_days: 0,
            dry_run: true,
        })
        .await?
        .into_inner();
    assert_eq!((dry.blobs_deleted, dry.blobs_kept), (1, 2));
    assert!(
        blob_path(&coordinator, old_garbage).exists(),
        "a dry run deletes nothing"
    );
    let report = control
        .collect_garbage(pb::GcRequest {
            keep_days: 0,
            dry_run: false,
        })
        .await?
        .into_inner();
    assert_eq!((report.blobs_deleted, report.blobs_kept), (1, 2));
    assert_eq!(report.bytes_freed, 64 << 10);
    assert!(!blob_path(&coordinator, old_garbage).exists());
    assert!(
        blob_path(&coordinator, referenced).exists(),
        "referenced by a run"
    );
    assert!(
        blob_path(&coordinator, fresh).exists(),
        "within the grace period"
    );
    Ok(())
}
