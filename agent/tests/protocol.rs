//! The agent's side of `AgentService.Connect`, driven through the public API
//! (`Config`, `run`) against a scripted stand-in coordinator on 127.0.0.1:0.
//! The real coordinator is tested end to end in `kiln-tests`.

use std::time::Duration;

use kiln_agent::{Config, ExecutorKind};
use kiln_proto::v1::agent_message::Msg;
use kiln_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use kiln_proto::v1::coordinator_message::Msg as CoordinatorMsg;
use kiln_proto::v1::{
    Ack, AgentMessage, Assign, Cancel, CoordinatorMessage, Hello, LogBatch, Outcome, ResumeStage,
    StageFinished, StageRef, Welcome,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const WAIT: Duration = Duration::from_secs(10);

/// One agent stream as the stand-in coordinator sees it.
struct Conn {
    hello: Hello,
    inbound: mpsc::UnboundedReceiver<AgentMessage>,
    outbound: mpsc::Sender<Result<CoordinatorMessage, Status>>,
}

impl Conn {
    async fn send(&self, msg: CoordinatorMsg) {
        let message = CoordinatorMessage { msg: Some(msg) };
        self.outbound.send(Ok(message)).await.unwrap();
    }

    /// The next message that is not a heartbeat.
    async fn recv(&mut self) -> Msg {
        loop {
            let message = timeout(WAIT, self.inbound.recv()).await;
            let message = message
                .expect("agent message in time")
                .expect("stream open");
            match message.msg.unwrap() {
                Msg::Heartbeat(_) => continue,
                msg => return msg,
            }
        }
    }

    /// Log batches up to the attempt's `StageFinished`; checks that the
    /// sequence numbers continue from `first_seq` without gaps.
    async fn logs_until_finished(&mut self, mut next_seq: u64) -> (Vec<String>, StageFinished) {
        let mut texts = Vec::new();
        loop {
            match self.recv().await {
                Msg::Logs(LogBatch {
                    first_seq, lines, ..
                }) => {
                    assert_eq!(
                        first_seq, next_seq,
                        "batches continue without gap or overlap"
                    );
                    assert!(lines.len() <= 256, "batches hold at most 256 lines");
                    next_seq += lines.len() as u64;
                    texts.extend(lines.into_iter().map(|l| l.text));
                }
                Msg::Finished(finished) => {
                    assert_eq!(finished.log_lines, next_seq);
                    return (texts, finished);
                }
                other => panic!("expected logs or finished, got {other:?}"),
            }
        }
    }
}

struct Stand {
    conns: mpsc::UnboundedSender<Conn>,
}

#[tonic::async_trait]
impl AgentService for Stand {
    type ConnectStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        // Like the real coordinator: headers go out only after Hello.
        let hello = match inbound.message().await? {
            Some(AgentMessage {
                msg: Some(Msg::Hello(hello)),
            }) => hello,
            other => {
                return Err(Status::invalid_argument(format!(
                    "hello first, not {other:?}"
                )));
            }
        };
        let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if inbound_tx.send(message).is_err() {
                    break;
                }
            }
        });
        let (outbound, outbound_rx) = mpsc::channel(64);
        let conn = Conn {
            hello,
            inbound: inbound_rx,
            outbound,
        };
        self.conns.send(conn).unwrap();
        Ok(Response::new(ReceiverStream::new(outbound_rx)))
    }
}

struct Harness {
    conns: mpsc::UnboundedReceiver<Conn>,
    shutdown: Option<oneshot::Sender<()>>,
    agent: JoinHandle<anyhow::Result<()>>,
    server: JoinHandle<()>,
    _work_dir: tempfile::TempDir,
}

impl Harness {
    async fn start(capacity: u32, drain_timeout: Duration) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (conns_tx, conns) = mpsc::unbounded_channel();
        let service = AgentServiceServer::new(Stand { conns: conns_tx });
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        let work_dir = tempfile::tempdir().unwrap();
        let config = Config {
            coordinator: format!("http://{address}"),
            client: Default::default(),
            name: "agent-1".into(),
            labels: [("role".to_owned(), "test".to_owned())].into(),
            capacity,
            work_dir: work_dir.path().to_owned(),
            executor: ExecutorKind::Process,
            drain_timeout,
            gpus: vec![1],
            cache_max_bytes: 1 << 30,
        };
        let (shutdown, shutdown_rx) = oneshot::channel();
        let agent = tokio::spawn(kiln_agent::run(config, async move {
            let _ = shutdown_rx.await;
        }));
        Harness {
            conns,
            shutdown: Some(shutdown),
            agent,
            server,
            _work_dir: work_dir,
        }
    }

    /// The next stream, welcomed with `resume`.
    async fn accept(&mut self, resume: Vec<ResumeStage>) -> Conn {
        let conn = timeout(WAIT, self.conns.recv())
            .await
            .expect("agent connects");
        let conn = conn.unwrap();
        let welcome = Welcome {
            heartbeat_ms: 100,
            resume,
            drop: vec![],
        };
        conn.send(CoordinatorMsg::Welcome(welcome)).await;
        conn
    }

    /// Asks the agent to stop; returns once `run` returned.
    async fn stop(mut self, conn: &mut Conn) {
        self.shutdown.take().unwrap().send(()).unwrap();
        assert!(matches!(conn.recv().await, Msg::Draining(_)));
        let result = timeout(WAIT, self.agent)
            .await
            .expect("agent stops in time");
        result.unwrap().unwrap();
        self.server.abort();
    }
}

fn stage(idx: u32) -> StageRef {
    StageRef {
        run_id: 1,
        stage_idx: idx,
        attempt: 1,
    }
}

fn assign(idx: u32, commands: &[&str]) -> CoordinatorMsg {
    CoordinatorMsg::Assign(Assign {
        stage: Some(stage(idx)),
        pipeline: "demo".into(),
        stage_name: format!("stage-{idx}"),
        commands: commands.iter().map(|c| c.to_string()).collect(),
        timeout_ms: 60_000,
        ..Assign::default()
    })
}

fn ack(idx: u32, next_log_seq: u64, finished: bool) -> CoordinatorMsg {
    CoordinatorMsg::Ack(Ack {
        stage: Some(stage(idx)),
        next_log_seq,
        finished,
        ..Ack::default()
    })
}

#[tokio::test]
async fn runs_an_assigned_stage_and_reports_it() {
    let mut harness = Harness::start(2, Duration::from_secs(5)).await;
    let mut conn = harness.accept(vec![]).await;
    assert_eq!(conn.hello.name, "agent-1");
    assert_eq!(conn.hello.capacity, 2);
    assert_eq!(conn.hello.labels["role"], "test");
    assert_eq!(
        conn.hello.labels["executor"], "process",
        "the agent advertises its executor"
    );
    assert!(conn.hello.held.is_empty());
    let resources = conn
        .hello
        .resources
        .as_ref()
        .expect("the hello declares the machine");
    assert!(resources.cpus >= 1.0 && resources.memory_bytes > 0);
    assert_eq!(resources.gpus, vec![1], "the configured gpus");

    conn.send(assign(0, &["echo one", "echo two >&2"])).await;
    assert!(matches!(conn.recv().await, Msg::Started(s) if s.stage == Some(stage(0))));
    let (texts, finished) = conn.logs_until_finished(0).await;
    assert!(
        texts.contains(&"one".to_owned()) && texts.contains(&"two".to_owned()),
        "{texts:?}"
    );
    assert_eq!(finished.outcome, Outcome::Succeeded as i32);

    conn.send(ack(0, finished.log_lines, true)).await;
    harness.stop(&mut conn).await;
}

#[tokio::test]
async fn secrets_reach_the_commands_but_not_the_coordinator() {
    let mut harness = Harness::start(1, Duration::from_secs(5)).await;
    let mut conn = harness.accept(vec![]).await;
    let CoordinatorMsg::Assign(mut stage_assign) = assign(
        0,
        &[
            r#"echo "token: $API_TOKEN""#,
            "{ printf 'hunter'; sleep 0.2; printf '2secret\\n'; } >&2",
            r#"test "$API_TOKEN" = hunter2secret && echo set"#,
        ],
    ) else {
        unreachable!()
    };
    stage_assign.secrets = [("API_TOKEN".to_owned(), "hunter2secret".to_owned())].into();
    conn.send(CoordinatorMsg::Assign(stage_assign)).await;
    assert!(matches!(conn.recv().await, Msg::Started(_)));
    let (mut texts, finished) = conn.logs_until_finished(0).await;
    texts.sort();
    assert_eq!(texts, ["***", "set", "token: ***"]);
    assert_eq!(finished.outcome, Outcome::Succeeded as i32);
    conn.send(ack(0, finished.log_lines, true)).await;
    harness.stop(&mut conn).await;
}

#[tokio::test]
async fn many_lines_arrive_in_order() {
    let mut harness = Harness::start(1, Duration::from_secs(5)).await;
    let mut conn = harness.accept(vec![]).await;
    conn.send(assign(0, &["seq 1 20000"])).await;
    assert!(matches!(conn.recv().await, Msg::Started(_)));
    let (texts, finished) = conn.logs_until_finished(0).await;
    let expected: Vec<String> = (1..=20_000).map(|n| n.to_string()).collect();
    assert_eq!(texts, expected);
    assert_eq!(finished.outcome, Outcome::Succeeded as i32);
    conn.send(ack(0, finished.log_lines, true)).await;
    harness.stop(&mut conn).await;
}

#[tokio::test]
async fn heartbeats_count_running_stages() {
    let mut harness = Harness::start(1, Duration::from_secs(5)).await;
    let mut conn = harness.accept(vec![]).await;
    conn.send(assign(0, &["sleep 1000"])).await;
    assert!(matches!(conn.recv().await, Msg::Started(_)));
    loop {
        let message = timeout(WAIT, conn.inbound.recv()).await.unwrap().unwrap();
        if let Some(Msg::Heartbeat(heartbeat)) = message.msg
            && heartbeat.running == 1
        {
            break;
        }
    }
    let cancel = Cancel {
        stage: Some(stage(0)),
        reason: String::new(),
    };
    conn.send(CoordinatorMsg::Cancel(cancel)).await;
    let (_, finished) = conn.logs_until_finished(0).await;
    assert_eq!(finished.outcome, Outcome::Cancelled as i32);
    conn.send(ack(0, finished.log_lines, true)).await;
    harness.stop(&mut conn).await;
}

#[tokio::test]
async fn after_a_reconnect_resends_what_the_coordinator_lacks() {
    let mut harness = Harness::start(1, Duration::from_secs(5)).await;
    let mut conn = harness.accept(vec![]).await;
    conn.send(assign(0, &["echo a", "echo b", "echo c"])).await;
    assert!(matches!(conn.recv().await, Msg::Started(_)));
    let (texts, finished) = conn.logs_until_finished(0).await;
    assert_eq!(texts, ["a", "b", "c"]);
    assert_eq!(finished.outcome, Outcome::Succeeded as i32);
    conn.send(ack(0, 1, false)).await;
    drop(conn); // the stream breaks before the finish is acknowledged

    let resume = ResumeStage {
        stage: Some(stage(0)),
        next_log_seq: 2,
    };
    let mut conn = harness.accept(vec![resume]).await;
    assert_eq!(
        conn.hello.held,
        [stage(0)],
        "the unacknowledged stage is held"
    );
    let (texts, finished) = conn.logs_until_finished(2).await;
    assert_eq!(texts, ["c"]);
    assert_eq!(finished.log_lines, 3);
    conn.send(ack(0, 3, true)).await;
    harness.stop(&mut conn).await;
}

#[tokio::test]
async fn cancels_and_refuses_work_beyond_capacity() {
    let mut harness = Harness::start(1, Duration::from_secs(5)).await;
    let mut conn = harness.accept(vec![]).await;
    conn.send(assign(0, &["sleep 1000"])).await;
    assert!(matches!(conn.recv().await, Msg::Started(_)));

    conn.send(assign(1, &["true"])).await;
    let Msg::Finished(refused) = conn.recv().await else {
        panic!("a stage beyond capacity is refused at once");
    };
    assert_eq!(refused.stage, Some(stage(1)));
    assert_eq!(refused.outcome, Outcome::InfraError as i32);
    assert!(refused.message.contains("capacity"), "{}", refused.message);
    conn.send(ack(1, 0, true)).await;

    let cancel = Cancel {
        stage: Some(stage(0)),
        reason: "run cancelled".into(),
    };
    conn.send(CoordinatorMsg::Cancel(cancel)).await;
    let (texts, finished) = conn.logs_until_finished(0).await;
    assert!(texts.iter().any(|t| t.contains("cancelled")), "{texts:?}");
    assert_eq!(finished.outcome, Outcome::Cancelled as i32);
    assert_eq!(finished.message, "cancelled: run cancelled");
    conn.send(ack(0, finished.log_lines, true)).await;
    harness.stop(&mut conn).await;
}

#[tokio::test]
async fn shutdown_hands_back_stages_that_outlive_the_drain_timeout() {
    let mut harness = Harness::start(1, Duration::from_millis(300)).await;
    let mut conn = harness.accept(vec![]).await;
    conn.send(assign(0, &["echo started", "sleep 1000"])).await;
    assert!(matches!(conn.recv().await, Msg::Started(_)));
    assert!(matches!(conn.recv().await, Msg::Logs(_)));

    harness.shutdown.take().unwrap().send(()).unwrap();
    assert!(matches!(conn.recv().await, Msg::Draining(_)));
    conn.send(assign(1, &["true"])).await;
    let mut handed_back = Vec::new();
    while handed_back.len() < 2 {
        match conn.recv().await {
            Msg::Finished(finished) => {
                assert_eq!(finished.outcome, Outcome::HandedBack as i32, "{finished:?}");
                let idx = finished.stage.unwrap().stage_idx;
                conn.send(ack(idx, finished.log_lines, true)).await;
                handed_back.push(idx);
            }
            Msg::Logs(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    handed_back.sort();
    assert_eq!(handed_back, [0, 1], "the running stage and the late assign");
    let result = timeout(WAIT, harness.agent)
        .await
        .expect("agent stops in time");
    result.unwrap().unwrap();
    harness.server.abort();
}
