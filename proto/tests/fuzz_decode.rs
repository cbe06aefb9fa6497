//! Decoding untrusted bytes never panics: what the coordinator decodes from
//! agents (`AgentMessage`), what agents decode from the coordinator
//! (`CoordinatorMessage`), and every request of `ControlService` and
//! `ArtifactService`. Deep nesting and huge length prefixes are errors.

use kiln_proto::v1::agent_message::Msg as AgentMsg;
use kiln_proto::v1::coordinator_message::Msg as CoordinatorMsg;
use kiln_proto::v1::*;
use proptest::prelude::*;
use prost::Message;

/// Decodes `bytes` as every message an endpoint accepts from a peer; a
/// result either way is fine, a panic is not.
fn decode_all(bytes: &[u8]) {
    macro_rules! decode {
        ($($message:ty),* $(,)?) => {
            $(let _ = <$message>::decode(bytes);)*
        };
    }
    decode!(
        AgentMessage,
        CoordinatorMessage,
        // ControlService
        RegisterPipelineRequest,
        ListPipelinesRequest,
        GetPipelineRequest,
        TriggerRunRequest,
        GetRunRequest,
        ListRunsRequest,
        CancelRunRequest,
        RetryStageRequest,
        StreamLogsRequest,
        ListAgentsRequest,
        DrainAgentRequest,
        ListArtifactsRequest,
        ListEnvironmentsRequest,
        EnvironmentHistoryRequest,
        GetReleaseRequest,
        DecideStageRequest,
        RollbackRequest,
        GcRequest,
        ProvenanceKeyRequest,
        LineageRequest,
        WhoAmIRequest,
        CreateTokenRequest,
        ListTokensRequest,
        RevokeTokenRequest,
        SetSecretRequest,
        ListSecretsRequest,
        DeleteSecretRequest,
        ListAuditRequest,
        // ArtifactService
        StatBlobRequest,
        UploadChunk,
        DownloadBlobRequest,
    );
}

fn stage() -> Option<StageRef> {
    Some(StageRef {
        run_id: 7,
        stage_idx: 2,
        attempt: 1,
    })
}

/// Valid encodings with every kind of field in them, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let agent = [
        AgentMsg::Hello(Hello {
            name: "agent-1".into(),
            labels: [("gpu".to_owned(), "yes".to_owned())].into(),
            capacity: 4,
            version: "0.1.0".into(),
            ..Hello::default()
        }),
        AgentMsg::Logs(LogBatch {
            stage: stage(),
            first_seq: 1 << 40,
            lines: vec![
                LogLine {
                    stream: LogStream::Stderr as i32,
                    text: "héllo\u{0}".into(),
                    at_ms: u64::MAX,
                };
                3
            ],
        }),
        AgentMsg::Finished(StageFinished {
            stage: stage(),
            outcome: Outcome::Failed as i32,
            exit_code: -1,
            message: "exited with code 1".into(),
            log_lines: 3,
            image_digest: "sha256:00".into(),
            outputs: vec![Artifact {
                path: "out/".into(),
                digest: "sha256:ab".into(),
                size: 1 << 33,
                stage: "train".into(),
            }],
        }),
    ];
    let coordinator = [
        CoordinatorMsg::Welcome(Welcome {
            heartbeat_ms: 1000,
            resume: vec![ResumeStage {
                stage: stage(),
                ..ResumeStage::default()
            }],
            drop: vec![StageRef::default()],
        }),
        CoordinatorMsg::Assign(Assign {
            stage: stage(),
            pipeline: "demo".into(),
            commands: vec!["make".into(), "echo ok".into()],
            env: [("A".to_owned(), "1".to_owned())].into(),
            secrets: [("TOKEN".to_owned(), "hunter2".to_owned())].into(),
            timeout_ms: 60_000,
            source: Some(Source {
                repo: "/repo".into(),
                commit: "abc".into(),
                ..Source::default()
            }),
            docker: Some(DockerOptions {
                cpus: 1.5,
                ..DockerOptions::default()
            }),
            ..Assign::default()
        }),
        CoordinatorMsg::Ack(Ack {
            stage: stage(),
            next_log_seq: 9,
            finished: true,
            ..Ack::default()
        }),
    ];
    let mut seeds: Vec<Vec<u8>> = agent
        .into_iter()
        .map(|msg| AgentMessage { msg: Some(msg) }.encode_to_vec())
        .collect();
    seeds.extend(
        coordinator
            .into_iter()
            .map(|msg| CoordinatorMessage { msg: Some(msg) }.encode_to_vec()),
    );
    seeds
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, bits)| Mutation::Flip(at, bits)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..12))
            .prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
        (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Delete(at, len)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let at = |at: usize, len: usize| at % (len + 1);
    match mutation {
        Mutation::Flip(idx, bits) if !bytes.is_empty() => {
            let idx = idx % bytes.len();
            bytes[idx] ^= bits;
        }
        Mutation::Flip(..) => {}
        Mutation::Insert(idx, insert) => {
            let idx = at(*idx, bytes.len());
            bytes.splice(idx..idx, insert.iter().copied());
        }
        Mutation::Delete(idx, len) => {
            let start = at(*idx, bytes.len());
            let end = (start + len).min(bytes.len());
            bytes.drain(start..end);
        }
        Mutation::Truncate(len) => bytes.truncate(at(*len, bytes.len())),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_valid_encodings(
        seed in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let seeds = seeds();
        let mut bytes = seeds[seed.index(seeds.len())].clone();
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        decode_all(&bytes);
    }
}

#[test]
fn seeds_round_trip() {
    for seed in seeds() {
        let agent = AgentMessage::decode(&seed[..]).map(|m| m.encode_to_vec());
        let coordinator = CoordinatorMessage::decode(&seed[..]).map(|m| m.encode_to_vec());
        assert!(agent.ok() == Some(seed.clone()) || coordinator.ok() == Some(seed.clone()));
    }
}

/// A varint as protobuf writes it.
fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
    out
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    // Unknown field 99 as a start-group, nested far beyond any limit.
    let start_group = varint((99 << 3) | 3);
    let deep_groups = start_group.repeat(100_000);
    decode_all(&deep_groups);
    assert!(AgentMessage::decode(&deep_groups[..]).is_err());
    assert!(CoordinatorMessage::decode(&deep_groups[..]).is_err());

    // Length-delimited fields nested 10 000 deep. No kiln.v1 message is
    // recursive, so below the schema's depth they are skipped as bytes.
    let mut nested: Vec<u8> = Vec::new();
    for _ in 0..10_000 {
        let mut outer = varint((4 << 3) | 2);
        outer.extend(varint(nested.len() as u64));
        outer.extend(&nested);
        nested = outer;
    }
    decode_all(&nested);
}

#[test]
fn huge_length_prefixes_are_errors() {
    for length in [u64::MAX, 1 << 62, u32::MAX as u64, 1 << 20] {
        // Known and unknown fields claim `length` bytes and get a handful.
        for field in [1u64, 2, 4, 99] {
            let mut bytes = varint((field << 3) | 2);
            bytes.extend(varint(length));
            bytes.extend(b"short");
            decode_all(&bytes);
            assert!(AgentMessage::decode(&bytes[..]).is_err(), "field {field}");
            assert!(
                CoordinatorMessage::decode(&bytes[..]).is_err(),
                "field {field}"
            );
        }
    }
    // A varint longer than ten bytes.
    let mut bytes = varint(2 << 3);
    bytes.extend([0xff; 11]);
    assert!(AgentMessage::decode(&bytes[..]).is_err());
}
