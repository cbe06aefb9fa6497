//! TLS against the real `kiln-coordinator`: gRPC with the right and a wrong
//! CA, mutual TLS (a real agent with a client certificate), `/healthz` over
//! HTTPS, and the refusal to serve plain text off loopback.
//!
//! Certificates are made at test time with rcgen. Every client in this file
//! is described by one [`Client`]: when the coordinator starts requiring
//! tokens, `Client::options` and `Client::flags` are where one goes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_common::channel::{ClientOptions, CoordinatorEndpoint, Token};
use kiln_proto::v1 as pb;
use kiln_tests::{Coordinator, CoordinatorOptions, Process, binary, eventually};
use pb::control_service_client::ControlServiceClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA with a server certificate (localhost, 127.0.0.1) and an agent's
/// client certificate, as PEM files in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem);

        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::new())?;
        // Named after the temp dir: two test CAs never share a name.
        let ca_name = format!("kiln test CA {}", dir.path().display());
        ca.distinguished_name.push(DnType::CommonName, ca_name);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        write("ca.pem", ca.self_signed(&ca_key)?.pem())?;
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |sans: &[&str], usage: ExtendedKeyUsagePurpose, name: &str| -> Result<()> {
            let key = KeyPair::generate()?;
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let mut params = CertificateParams::new(sans)?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            write(
                &format!("{name}.pem"),
                params.signed_by(&key, &issuer)?.pem(),
            )?;
            write(&format!("{name}-key.pem"), key.serialize_pem())?;
            Ok(())
        };
        leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        )?;
        leaf(&[], ExtendedKeyUsagePurpose::ClientAuth, "agent")?;
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// `--tls-*` flags for a coordinator with this PKI's server certificate.
    fn coordinator_flags(&self, mutual: bool) -> Vec<String> {
        let mut flags = vec![
            format!("--tls-cert={}", self.path("server.pem").display()),
            format!("--tls-key={}", self.path("server-key.pem").display()),
        ];
        if mutual {
            flags.push(format!("--tls-client-ca={}", self.ca().display()));
        }
        flags
    }

    /// What the test helpers' `kiln` needs to reach such a coordinator.
    fn client_args(&self, mutual: bool) -> Vec<String> {
        let mut args = vec![format!("--ca-file={}", self.ca().display())];
        if mutual {
            args.push(format!("--tls-cert={}", self.path("agent.pem").display()));
            args.push(format!(
                "--tls-key={}",
                self.path("agent-key.pem").display()
            ));
        }
        args
    }

    /// A client that trusts this PKI's CA and has no certificate.
    fn client(&self) -> Client {
        Client {
            ca_file: Some(self.ca()),
            identity: None,
            token: None,
        }
    }

    /// A client that trusts `server_ca` and shows this PKI's agent
    /// certificate.
    fn agent_client(&self, server_ca: &Path) -> Client {
        Client {
            ca_file: Some(server_ca.to_owned()),
            identity: Some((self.path("agent.pem"), self.path("agent-key.pem"))),
            token: None,
        }
    }
}

/// What a client trusts and shows.
#[derive(Default)]
struct Client {
    /// None for plain text.
    ca_file: Option<PathBuf>,
    /// Certificate and key for mutual TLS.
    identity: Option<(PathBuf, PathBuf)>,
    /// Bearer token; the TLS checks happen before it matters.
    token: Option<String>,
}

impl Client {
    fn with_token(self, token: &str) -> Self {
        Self {
            token: Some(token.to_owned()),
            ..self
        }
    }

    fn options(&self) -> ClientOptions {
        ClientOptions {
            ca_file: self.ca_file.clone(),
            client_cert: self.identity.as_ref().map(|(cert, _)| cert.clone()),
            client_key: self.identity.as_ref().map(|(_, key)| key.clone()),
            token: self
                .token
                .as_deref()
                .map(Token::new)
                .transpose()
                .expect("test tokens are not empty"),
        }
    }

    /// The same as flags; `kiln` and `kiln-agent` spell them alike.
    fn flags(&self) -> Vec<OsString> {
        let mut flags = Vec::new();
        if let Some(ca_file) = &self.ca_file {
            flags.extend(["--ca-file".into(), ca_file.clone().into()]);
        }
        if let Some((cert, key)) = &self.identity {
            flags.extend(["--tls-cert".into(), cert.clone().into()]);
            flags.extend(["--tls-key".into(), key.clone().into()]);
        }
        flags
    }
}

/// The one RPC this file makes: the agents the coordinator knows, by name.
async fn agent_names(url: &str, client: &Client) -> Result<Vec<String>> {
    let channel = CoordinatorEndpoint::new(url, &client.options())?
        .map_endpoint(|endpoint| endpoint.connect_timeout(Duration::from_secs(5)))
        .connect()
        .await?;
    let reply = ControlServiceClient::new(channel)
        .list_agents(pb::ListAgentsRequest {})
        .await?;
    Ok(reply
        .into_inner()
        .agents
        .into_iter()
        .map(|a| a.name)
        .collect())
}

/// A coordinator on 127.0.0.1 with this PKI's server certificate (and
/// client CA when `mutual`), and its data dir.
fn start(pki: &Pki, mutual: bool) -> Result<(tempfile::TempDir, Coordinator)> {
    let data = tempfile::tempdir()?;
    let options = CoordinatorOptions {
        extra_args: pki.coordinator_flags(mutual),
        client_args: pki.client_args(mutual),
        ..CoordinatorOptions::default()
    };
    let coordinator = Coordinator::start(data.path(), &options)?;
    Ok((data, coordinator))
}

/// `scheme://127.0.0.1:PORT` for the coordinator's gRPC port, whatever
/// address it is bound to.
fn loopback_url(scheme: &str, coordinator: &Coordinator) -> String {
    let port = coordinator.grpc.rsplit(':').next().unwrap_or_default();
    format!("{scheme}://127.0.0.1:{port}")
}

fn kiln(url: &str, client: &Client, args: &[&str]) -> std::process::Output {
    let mut command = Command::new(binary("kiln"));
    command
        .args(client.flags())
        .args(args)
        .env("KILN_COORDINATOR", url)
        .stdin(Stdio::null());
    if let Some(token) = &client.token {
        command.env("KILN_TOKEN", token);
    }
    command.output().expect("running kiln")
}

/// The whole error chain, for matching on the innermost cause.
fn chain(error: &anyhow::Error) -> String {
    format!("{error:#}")
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_over_tls_works_with_the_coordinators_ca() -> Result<()> {
    let pki = Pki::new()?;
    let (_data, coordinator) = start(&pki, false)?;
    let url = loopback_url("https", &coordinator);
    let client = pki.client().with_token(&coordinator.admin_token);

    assert_eq!(agent_names(&url, &client).await?, Vec::<String>::new());
    let output = kiln(&url, &client, &["agents", "--output", "json"]);
    assert!(
        output.status.success(),
        "kiln agents over TLS failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A plain-text client gets nowhere on the TLS port.
    let plain = agent_names(&loopback_url("http", &coordinator), &Client::default()).await;
    assert!(plain.is_err(), "plain text was served on the TLS port");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_ca_fails_the_handshake() -> Result<()> {
    let pki = Pki::new()?;
    let stranger = Pki::new()?;
    let (_data, coordinator) = start(&pki, false)?;
    let url = loopback_url("https", &coordinator);

    let error = agent_names(&url, &stranger.client())
        .await
        .expect_err("a server certificate from another CA was accepted");
    assert!(chain(&error).contains("certificate"), "{}", chain(&error));

    let output = kiln(&url, &stranger.client(), &["agents"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.starts_with("error: cannot reach the coordinator"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_admits_only_certificates_of_the_client_ca() -> Result<()> {
    let pki = Pki::new()?;
    let stranger = Pki::new()?;
    let (_data, coordinator) = start(&pki, true)?;
    let url = loopback_url("https", &coordinator);

    let without = agent_names(&url, &pki.client()).await;
    assert!(without.is_err(), "a client without a certificate got in");
    let foreign = agent_names(&url, &stranger.agent_client(&pki.ca())).await;
    assert!(foreign.is_err(), "a certificate of another CA got in");
    // tonic only says "connection closed"; the TLS alerts say why.
    let heard = first_read(&coordinator.grpc, &pki.client()).await?;
    assert!(heard.contains("CertificateRequired"), "{heard}");
    let heard = first_read(&coordinator.grpc, &stranger.agent_client(&pki.ca())).await?;
    assert!(heard.contains("UnknownCA"), "{heard}");

    // A real agent with a certificate the coordinator's client CA signed.
    let agent = pki.agent_client(&pki.ca());
    let work_dir = tempfile::tempdir()?;
    let child = Command::new(binary("kiln-agent"))
        .args([
            "--coordinator",
            &url,
            "--name",
            "tls-agent",
            "--executor",
            "process",
        ])
        .args(["--work-dir".as_ref(), work_dir.path().as_os_str()])
        .args(agent.flags())
        .env("KILN_AGENT_TOKEN", &coordinator.agent_token)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting kiln-agent")?;
    let _agent = Process {
        child,
        name: "kiln-agent tls-agent".into(),
    };
    // Listing agents takes a user token; the certificate is the agent's.
    let admin = pki
        .agent_client(&pki.ca())
        .with_token(&coordinator.admin_token);
    let agent = &admin;
    eventually(Duration::from_secs(15), "the TLS agent to connect", || {
        let url = url.clone();
        async move {
            let names = agent_names(&url, agent).await?;
            Ok(names.contains(&"tls-agent".to_owned()).then_some(()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_is_served_over_tls_without_a_client_certificate() -> Result<()> {
    let pki = Pki::new()?;
    // Mutual TLS on gRPC must not reach the HTTP listener.
    let (_data, coordinator) = start(&pki, true)?;
    let response = https_get(&coordinator.http, &pki.ca(), "/healthz").await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("ok\n"), "{response}");

    // And the HTTP port speaks nothing but TLS.
    let mut plain = tokio::net::TcpStream::connect(&coordinator.http).await?;
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "plain HTTP was served on the TLS port"
    );
    Ok(())
}

/// A raw TLS connection to `addr` as `client`, checking the server as
/// `localhost`.
async fn tls_connect(
    addr: &str,
    client: &Client,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use kiln_common::tls::{Certificates, PrivateKey};
    let ca_file = client
        .ca_file
        .as_deref()
        .context("a TLS client needs a CA")?;
    let roots = Certificates::read(ca_file)?.root_store()?;
    let config = rustls::ClientConfig::builder_with_provider(kiln_common::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match &client.identity {
        Some((cert, key)) => config.with_client_auth_cert(
            Certificates::read(cert)?.der().to_vec(),
            PrivateKey::read(key)?.der().clone_key(),
        )?,
        None => config.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let server = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(connector.connect(server, tcp).await?)
}

/// What a raw TLS client hears first from the gRPC port: with TLS 1.3 a
/// refused client certificate shows as an alert after the handshake.
async fn first_read(addr: &str, client: &Client) -> Result<String> {
    let mut tls = tls_connect(addr, client, b"h2").await?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    let mut buffer = [0; 64];
    let heard = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buffer)).await?;
    Ok(match heard {
        Ok(n) => format!("{n} bytes"),
        Err(error) => error.to_string(),
    })
}

/// `GET path` over TLS to `addr`, checking the server against `ca` as
/// `localhost`; the whole response.
async fn https_get(addr: &str, ca: &Path, path: &str) -> Result<String> {
    let client = Client {
        ca_file: Some(ca.to_owned()),
        identity: None,
        token: None,
    };
    let mut tls = tls_connect(addr, &client, b"http/1.1").await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response).await {
        Ok(_) => {}
        // A server that closes without close_notify still sent it all.
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {
        }
        Err(error) => return Err(error.into()),
    }
    Ok(String::from_utf8(response)?)
}

/// Runs the coordinator with `flags` until it exits (it must, quickly).
fn refused(flags: &[&str]) -> Result<(Option<i32>, String)> {
    let data = tempfile::tempdir()?;
    let mut child = Command::new(binary("kiln-coordinator"))
        .args(["--data-dir".as_ref(), data.path().as_os_str()])
        .args(flags)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    for _ in 0..200 {
        if child.try_wait()?.is_some() {
            let output = child.wait_with_output()?;
            return Ok((output.status.code(), String::from_utf8(output.stderr)?));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    bail!("kiln-coordinator {flags:?} kept running instead of refusing");
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_text_off_loopback_is_refused_in_one_line() -> Result<()> {
    for (flags, what) in [
        (["--grpc=0.0.0.0:0", "--http=127.0.0.1:0"], "gRPC"),
        (["--grpc=127.0.0.1:0", "--http=0.0.0.0:0"], "HTTP"),
    ] {
        let (code, stderr) = refused(&flags)?;
        assert_eq!(code, Some(2), "{flags:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{flags:?}: {stderr}");
        let start = format!("error: refusing to serve {what} on 0.0.0.0:");
        assert!(stderr.starts_with(&start), "{flags:?}: {stderr}");
        assert!(
            stderr.contains("--tls-cert") && stderr.contains("--insecure"),
            "{stderr}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn insecure_or_tls_may_listen_off_loopback() -> Result<()> {
    let data = tempfile::tempdir()?;
    let options = CoordinatorOptions {
        grpc: "0.0.0.0:0".into(),
        extra_args: vec!["--insecure".into()],
        ..CoordinatorOptions::default()
    };
    let insecure = Coordinator::start(data.path(), &options)?;
    let url = loopback_url("http", &insecure);
    assert_eq!(
        agent_names(&url, &Client::default().with_token(&insecure.admin_token)).await?,
        Vec::<String>::new()
    );

    let pki = Pki::new()?;
    let data = tempfile::tempdir()?;
    let options = CoordinatorOptions {
        grpc: "0.0.0.0:0".into(),
        extra_args: pki.coordinator_flags(false),
        client_args: pki.client_args(false),
        ..CoordinatorOptions::default()
    };
    let tls = Coordinator::start(data.path(), &options)?;
    let url = loopback_url("https", &tls);
    assert_eq!(
        agent_names(&url, &pki.client().with_token(&tls.admin_token)).await?,
        Vec::<String>::new()
    );
    Ok(())
}
