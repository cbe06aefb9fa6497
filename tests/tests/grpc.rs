//! Standard tooling works against the coordinator: gRPC health checking,
//! server reflection (what grpcurl uses), and the HTTP endpoints.

use std::io::{Read, Write};

use anyhow::Result;
use kiln_tests::{Coordinator, CoordinatorOptions};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_every_service_as_serving() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let channel = Channel::from_shared(coordinator.url())?.connect().await?;
    let mut health = HealthClient::new(channel);
    for service in ["", "kiln.v1.AgentService", "kiln.v1.ControlService"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        assert_eq!(
            response.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.Service".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_services_and_describes_them() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    let channel = coordinator.channel().await?;
    let mut reflection = ServerReflectionClient::new(channel);
    let requests = tokio_stream::iter([
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "kiln.v1.ControlService".into(),
            )),
        },
    ]);
    let mut responses = reflection
        .server_reflection_info(requests)
        .await?
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = responses
        .next()
        .await
        .transpose()?
        .and_then(|r| r.message_response)
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for expected in [
        "kiln.v1.AgentService",
        "kiln.v1.ControlService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} missing from {names:?}"
        );
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) = responses
        .next()
        .await
        .transpose()?
        .and_then(|r| r.message_response)
    else {
        panic!("expected a file descriptor");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn http_serves_health_and_prometheus_metrics() -> Result<()> {
    let data = tempfile::tempdir()?;
    let coordinator = Coordinator::start(data.path(), &CoordinatorOptions::default())?;
    assert!(http_get(&coordinator.http, "/healthz")?.ends_with("ok\n"));
    let metrics = http_get(&coordinator.http, "/metrics")?;
    assert!(
        metrics.contains("# TYPE kiln_connected_agents gauge"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_runs_finished_total{state=\"succeeded\"} 0"),
        "{metrics}"
    );
    Ok(())
}

fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    Ok(response)
}
