//! Who may call what, over the wire. Every method the coordinator serves
//! (from the descriptor sets it registers for reflection) is called with no
//! token, a wrong one, a revoked one and a token of every role, and the
//! answer is checked against the table below: UNAUTHENTICATED, or
//! PERMISSION_DENIED, or let through to the handler (which may well say
//! INVALID_ARGUMENT or NOT_FOUND to an empty request). A method the table
//! does not name fails the test, so a new RPC needs a decision here.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_common::channel::{KilnChannel, Token};
use kiln_proto::v1 as pb;
use kiln_tests::{Coordinator, CoordinatorOptions, Repo, kiln, kiln_as};
use pb::control_service_client::ControlServiceClient;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The least caller a method accepts.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
enum Least {
    /// Anyone, without a token.
    Public,
    Viewer,
    Operator,
    Admin,
    /// No user at all: agent tokens only.
    AgentsOnly,
}

/// The spec of one method.
#[derive(Clone, Copy, Debug)]
struct Expect {
    least: Least,
    /// Agent tokens are let through.
    agents: bool,
    /// Pipeline tokens are let through (the handler checks the pipeline).
    pipelines: bool,
}

const fn users(least: Least) -> Expect {
    Expect {
        least,
        agents: false,
        pipelines: false,
    }
}

const fn with_agents(expect: Expect) -> Expect {
    Expect {
        agents: true,
        ..expect
    }
}

const fn with_pipelines(expect: Expect) -> Expect {
    Expect {
        pipelines: true,
        ..expect
    }
}

/// Method → who may call it. This is the spec; the coordinator's own
/// table (`auth::rule`) is what is being tested against it.
fn spec() -> BTreeMap<String, Expect> {
    use Least::{Admin, AgentsOnly, Operator, Public, Viewer};
    let mut spec = BTreeMap::new();
    let mut add = |service: &str, methods: &[&str], expect: Expect| {
        for method in methods {
            spec.insert(format!("/{service}/{method}"), expect);
        }
    };
    add("grpc.health.v1.Health", &["Check", "Watch"], users(Public));
    for reflection in [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        add(reflection, &["ServerReflectionInfo"], users(Viewer));
    }
    add(
        "kiln.v1.AgentService",
        &["Connect"],
        with_agents(users(AgentsOnly)),
    );
    add("kiln.v1.AdminService", &["Backup"], users(Admin));
    let artifacts = "kiln.v1.ArtifactService";
    add(
        artifacts,
        &["StatBlob"],
        with_pipelines(with_agents(users(Viewer))),
    );
    add(
        artifacts,
        &["UploadBlob"],
        with_pipelines(with_agents(users(Operator))),
    );
    add(artifacts, &["DownloadBlob"], with_agents(users(Viewer)));
    add(
        artifacts,
        &["GetCache", "PutCache"],
        with_agents(users(AgentsOnly)),
    );
    let control = "kiln.v1.ControlService";
    add(
        control,
        &["RegisterPipeline", "AddRepository", "TriggerRun"],
        with_pipelines(users(Operator)),
    );
    add(
        control,
        &["WhoAmI"],
        with_pipelines(with_agents(users(Viewer))),
    );
    add(
        control,
        &[
            "ListPipelines",
            "GetPipeline",
            "GetRun",
            "ListRuns",
            "WatchRun",
            "StreamLogs",
            "ListAgents",
            "ListArtifacts",
            "ListEnvironments",
            "EnvironmentHistory",
            "MetricHistory",
            "GetRelease",
            "GetProvenance",
            "GetProvenanceKey",
            "Lineage",
            "ListCaches",
            "ListModels",
            "GetModelVersion",
            "RolloutStatus",
        ],
        users(Viewer),
    );
    add(
        control,
        &[
            "CancelRun",
            "RetryStage",
            "ApproveStage",
            "RejectStage",
            "Rollback",
            "ClearCaches",
            "UnfreezeEnvironment",
            "SetModelAlias",
            "Promote",
            "RolloutPromote",
            "RolloutAbort",
        ],
        users(Operator),
    );
    add(
        control,
        &[
            "DrainAgent",
            "CollectGarbage",
            "CreateToken",
            "RevokeToken",
            "SetSecret",
            "DeleteSecret",
            "ListTokens",
            "ListSecrets",
            "ListAudit",
        ],
        users(Admin),
    );
    spec
}

/// Every method of the descriptor sets the coordinator serves.
fn served_methods() -> Result<Vec<String>> {
    let mut methods = Vec::new();
    for encoded in [
        kiln_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let set = prost_types::FileDescriptorSet::decode(encoded)?;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    Ok(methods)
}

/// Who calls.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Caller {
    NoToken,
    WrongToken,
    RevokedAdmin,
    Viewer,
    Operator,
    Admin,
    Agent,
    /// Limited to a pipeline that the empty requests never name.
    Pipeline,
}

const CALLERS: [Caller; 8] = [
    Caller::NoToken,
    Caller::WrongToken,
    Caller::RevokedAdmin,
    Caller::Viewer,
    Caller::Operator,
    Caller::Admin,
    Caller::Agent,
    Caller::Pipeline,
];

/// What became of a call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Unauthenticated,
    PermissionDenied,
    /// Reached the handler.
    Handled,
}

fn expected(expect: Expect, caller: Caller) -> Outcome {
    let role_rank = match caller {
        // A credential that is not valid is refused even where none is
        // needed.
        Caller::WrongToken | Caller::RevokedAdmin => return Outcome::Unauthenticated,
        Caller::NoToken if expect.least == Least::Public => return Outcome::Handled,
        Caller::NoToken => return Outcome::Unauthenticated,
        _ if expect.least == Least::Public => return Outcome::Handled,
        Caller::Agent if expect.agents => return Outcome::Handled,
        Caller::Pipeline if expect.pipelines => return Outcome::Handled,
        Caller::Agent | Caller::Pipeline => return Outcome::PermissionDenied,
        Caller::Viewer => Least::Viewer,
        Caller::Operator => Least::Operator,
        Caller::Admin => Least::Admin,
    };
    if expect.least != Least::AgentsOnly && role_rank >= expect.least {
        Outcome::Handled
    } else {
        Outcome::PermissionDenied
    }
}

/// The outcome of an answer. A pipeline token that names another pipeline
/// is refused by the handler, after the layer let it through.
fn outcome(caller: Caller, answer: &Result<(), Status>) -> Outcome {
    match answer {
        Ok(()) => Outcome::Handled,
        Err(status) => match status.code() {
            Code::Unauthenticated => Outcome::Unauthenticated,
            Code::PermissionDenied
                if caller == Caller::Pipeline
                    && status.message().contains("may only act on pipeline") =>
            {
                Outcome::Handled
            }
            Code::PermissionDenied => Outcome::PermissionDenied,
            _ => Outcome::Handled,
        },
    }
}

/// Passes message bytes through untouched, so any method can be called
/// without its generated types.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Calls `method` with one empty message (valid for every message type) as
/// a stream, which works on the wire for unary and streaming methods alike.
/// The answer is the response headers: a refusal comes as a trailers-only
/// response; streams that stay open are dropped once they started.
async fn call(channel: KilnChannel, method: &str) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| Status::unavailable(format!("channel not ready: {error}")))?;
    let path = PathAndQuery::try_from(method.to_owned())
        .map_err(|error| Status::internal(format!("bad path {method}: {error}")))?;
    let request = tonic::Request::new(tokio_stream::iter([Vec::<u8>::new()]));
    grpc.streaming(request, path, RawCodec).await.map(drop)
}

/// The tokens of every caller, made through the API.
struct Callers {
    channel: Channel,
    tokens: BTreeMap<String, Option<Token>>,
}

impl Callers {
    async fn create(coordinator: &Coordinator) -> Result<Self> {
        let channel = Channel::from_shared(coordinator.url())?.connect().await?;
        let mut admin = coordinator.client().await?;
        let viewer = create_token(&mut admin, "matrix-viewer", pb::Role::Viewer, "").await?;
        let operator = create_token(&mut admin, "matrix-operator", pb::Role::Operator, "").await?;
        let pipeline =
            create_token(&mut admin, "matrix-pipeline", pb::Role::Pipeline, "scoped").await?;
        let revoked = create_token(&mut admin, "matrix-revoked", pb::Role::Admin, "").await?;
        admin
            .revoke_token(pb::RevokeTokenRequest {
                name: "matrix-revoked".into(),
            })
            .await?;
        let wrong = format!("kiln_{}", "deadbeef".repeat(8));
        let mut tokens = BTreeMap::new();
        for (caller, secret) in [
            (Caller::NoToken, None),
            (Caller::WrongToken, Some(wrong)),
            (Caller::RevokedAdmin, Some(revoked)),
            (Caller::Viewer, Some(viewer)),
            (Caller::Operator, Some(operator)),
            (Caller::Admin, Some(coordinator.admin_token.clone())),
            (Caller::Agent, Some(coordinator.agent_token.clone())),
            (Caller::Pipeline, Some(pipeline)),
        ] {
            let token = secret.as_deref().map(Token::new).transpose()?;
            tokens.insert(format!("{caller:?}"), token);
        }
        Ok(Self { channel, tokens })
    }

    fn channel(&self, caller: Caller) -> KilnChannel {
        let token = self.tokens[&format!("{caller:?}")].as_ref();
        KilnChannel::new(self.channel.clone(), token)
    }
}

/// Creates a token through the API and returns its secret.
async fn create_token(
    admin: &mut ControlServiceClient<KilnChannel>,
    name: &str,
    role: pb::Role,
    pipeline: &str,
) -> Result<String> {
    let created = admin
        .create_token(pb::CreateTokenRequest {
            name: name.into(),
            role: role as i32,
            pipeline: pipeline.into(),
        })
        .await?
        .into_inner();
    Ok(created.secret)
}

/// Per call: some streams stay open, and a hung call must fail the test,
/// not stall it.
const CALL_LIMIT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread")]
async fn every_method_answers_every_caller_as_the_spec_says() -> Result<()> {
    let served = served_methods()?;
    let spec = spec();
    let unspecified: Vec<_> = served.iter().filter(|m| !spec.contains_key(*m)).collect();
    assert!(
        unspecified.is_empty(),
        "served methods without an expectation in this test: {unspecified:?}"
    );
    let stale: Vec<_> = spec.keys().filter(|m| !served.contains(m)).collect();
    assert!(
        stale.is_empty(),
        "expectations for methods not served: {stale:?}"
    );

    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let callers = Callers::create(&coordinator).await?;
    let mut wrong = Vec::new();
    let mut calls = 0;
    for (method, expect) in &spec {
        for caller in CALLERS {
            let answer = tokio::time::timeout(CALL_LIMIT, call(callers.channel(caller), method))
                .await
                .with_context(|| format!("{method} as {caller:?} hung"))?;
            calls += 1;
            let (want, got) = (expected(*expect, caller), outcome(caller, &answer));
            if want != got {
                wrong.push(format!(
                    "{method} as {caller:?}: expected {want:?}, got {:?}",
                    answer.err()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {calls} calls were answered against the spec:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // The matrix ran with every token it made still usable (it revoked none).
    let unknown = call(
        callers.channel(Caller::Admin),
        "/kiln.v1.ControlService/DropDatabase",
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), Code::Unimplemented, "{unknown:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_say_why_and_a_revoked_token_stops_working_on_an_open_channel() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let url = coordinator.url();
    let created = kiln(&url, &["token", "create", "ci-viewer", "--role", "viewer"]);
    assert!(created.status.success(), "{created:?}");
    let secret = String::from_utf8(created.stdout)?.trim().to_owned();
    let mut viewer = ControlServiceClient::new(kiln_tests::channel(&url, &secret).await?);
    viewer.list_runs(pb::ListRunsRequest::default()).await?;

    let denied = viewer
        .cancel_run(pb::CancelRunRequest { run_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("ci-viewer") && denied.message().contains("CancelRun"),
        "{denied:?}"
    );
    let cli = kiln_as(&url, Some(&secret), b"", &["cancel", "1"])?;
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(
        !cli.status.success() && stderr.contains("may not call"),
        "{cli:?}"
    );
    let anonymous = kiln_as(&url, None, b"", &["runs"])?;
    let stderr = String::from_utf8_lossy(&anonymous.stderr);
    assert!(
        !anonymous.status.success() && stderr.contains("KILN_TOKEN"),
        "{anonymous:?}"
    );

    let revoked = kiln(&url, &["token", "revoke", "ci-viewer"]);
    assert!(revoked.status.success(), "{revoked:?}");
    let refused = viewer
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("revoked"), "{refused:?}");
    let list = kiln(&url, &["token", "list", "--output", "json"]);
    let tokens: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    let entry = tokens
        .as_array()
        .and_then(|all| all.iter().find(|t| t["name"] == "ci-viewer"))
        .context("ci-viewer is listed")?;
    assert!(entry["revoked_ms"].as_u64().is_some(), "{entry}");
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&secret),
        "the list shows a secret"
    );
    // A revoked name stays taken, so its audit entries stay unambiguous.
    let again = kiln(&url, &["token", "create", "ci-viewer", "--role", "admin"]);
    assert!(!again.status.success(), "{again:?}");
    Ok(())
}

const PIPELINE: &str = r#"
pipeline: NAME
stages:
  build:
    commands: ["echo built"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_token_registers_and_triggers_only_its_own_pipeline() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let url = coordinator.url();
    let alpha = Repo::new(&PIPELINE.replace("NAME", "alpha"))?;
    let beta = Repo::new(&PIPELINE.replace("NAME", "beta"))?;
    for repo in [&alpha, &beta] {
        let dir = repo.path().to_str().context("utf-8 path")?;
        let registered = kiln(&url, &["pipeline", "register", dir]);
        assert!(registered.status.success(), "{registered:?}");
    }
    let created = kiln(
        &url,
        &[
            "token",
            "create",
            "ci-alpha",
            "--role",
            "pipeline",
            "--pipeline",
            "alpha",
        ],
    );
    assert!(created.status.success(), "{created:?}");
    let token = String::from_utf8(created.stdout)?.trim().to_owned();
    let as_ci = |args: &[&str]| kiln_as(&url, Some(&token), b"", args);

    let whoami = as_ci(&["whoami"])?;
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout).trim(),
        "ci-alpha (pipeline, pipeline alpha)",
        "{whoami:?}"
    );
    let own = as_ci(&["run", "alpha"])?;
    assert!(own.status.success(), "{own:?}");
    let run_id: u64 = String::from_utf8(own.stdout)?.trim().parse()?;
    let other = as_ci(&["run", "beta"])?;
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && stderr.contains("may only act on pipeline `alpha`"),
        "{other:?}"
    );

    let alpha_dir = alpha.path().to_str().context("utf-8 path")?;
    alpha.commit(
        "kiln.yml",
        &PIPELINE
            .replace("NAME", "alpha")
            .replace("built", "built again"),
    )?;
    let reregistered = as_ci(&["pipeline", "register", alpha_dir])?;
    assert!(reregistered.status.success(), "{reregistered:?}");
    let beta_dir = beta.path().to_str().context("utf-8 path")?;
    beta.commit(
        "kiln.yml",
        &PIPELINE.replace("NAME", "beta").replace("built", "x"),
    )?;
    let hijack = as_ci(&["pipeline", "register", beta_dir])?;
    let stderr = String::from_utf8_lossy(&hijack.stderr);
    assert!(
        !hijack.status.success() && stderr.contains("may only act on pipeline `alpha`"),
        "{hijack:?}"
    );
    // A file that renames itself to alpha cannot take over beta's name
    // either way round: it registers alpha.
    let pipelines = kiln(&url, &["pipeline", "list", "--output", "json"]);
    let pipelines: serde_json::Value = serde_json::from_slice(&pipelines.stdout)?;
    let version = |name: &str| {
        pipelines
            .as_array()
            .and_then(|all| all.iter().find(|p| p["name"] == name))
            .map(|p| p["version"].clone())
    };
    assert_eq!(version("alpha"), Some(2.into()), "{pipelines}");
    assert_eq!(version("beta"), Some(1.into()), "{pipelines}");

    // Nor can it point its own pipeline at another repository, which the
    // coordinator and agents would then read from.
    let elsewhere = Repo::new(&PIPELINE.replace("NAME", "alpha"))?;
    let moved = as_ci(&[
        "pipeline",
        "register",
        elsewhere.path().to_str().context("utf-8 path")?,
    ])?;
    let stderr = String::from_utf8_lossy(&moved.stderr);
    assert!(
        !moved.status.success() && stderr.contains("may not move pipeline `alpha`"),
        "{moved:?}"
    );

    // Reads and other writes are not a pipeline token's business.
    for args in [&["runs"][..], &["cancel", &run_id.to_string()]] {
        let refused = as_ci(args)?;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains("may not call"),
            "{args:?}: {refused:?}"
        );
    }
    // The run records who triggered it from the token, not the request.
    let mut admin = coordinator.client().await?;
    let run = kiln_tests::get_run(&mut admin, run_id).await?;
    assert_eq!(run.triggered_by, "manual:ci-alpha");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_token_cannot_use_the_control_api() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let url = coordinator.url();
    let repo = Repo::new(&PIPELINE.replace("NAME", "alpha"))?;
    let dir = repo.path().to_str().context("utf-8 path")?;
    assert!(kiln(&url, &["pipeline", "register", dir]).status.success());
    let agent = &coordinator.agent_token;
    for args in [
        &["run", "alpha"][..],
        &["runs"],
        &["pipeline", "list"],
        &["token", "create", "escalated", "--role", "admin"],
        &["secret", "list"],
        &["agents"],
    ] {
        let refused = kiln_as(&url, Some(agent), b"", args)?;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains("(agent) may not call"),
            "{args:?}: {refused:?}"
        );
    }
    let mut client = ControlServiceClient::new(kiln_tests::channel(&url, agent).await?);
    let refused = client
        .trigger_run(pb::TriggerRunRequest {
            pipeline: "alpha".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // WhoAmI is the one ControlService call open to agent tokens.
    let me = client.who_am_i(pb::WhoAmIRequest {}).await?.into_inner();
    assert_eq!(me.role, pb::Role::Agent as i32);
    Ok(())
}
