//! A real headless Chromium for the dashboard's tests, driven over
//! WebDriver (fantoccini) through a `chromedriver` started on a free
//! loopback port, and a TCP proxy that can cut the browser's connections.
//!
//! Nothing here skips: without Chromium or chromedriver the test fails
//! with a message saying what to install.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, MutexGuard, watch};

use crate::Process;

/// One browser at a time per test binary: the machines that run CI have
/// few cores, and a starved browser makes timing-based checks flaky.
static ONE_BROWSER: Mutex<()> = Mutex::const_new(());

const INSTALL: &str = "install them with `apt-get install chromium chromium-driver`";

/// A headless Chromium session; the browser and its driver are stopped
/// when this is dropped.
pub struct Browser {
    pub client: Client,
    /// Where [`Browser::screenshot`] writes PNGs.
    pub shots: PathBuf,
    test: String,
    driver: Process,
    _profile: tempfile::TempDir,
    _turn: MutexGuard<'static, ()>,
}

/// The first of `names` found on `PATH`.
fn find_on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// `target/web-screenshots`, next to the test executable's profile dir.
fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.pop();
    dir.join("web-screenshots")
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; `test` names the
    /// screenshots.
    pub async fn start(test: &str) -> Result<Self> {
        Self::start_with(test, &[]).await
    }

    /// [`Browser::start`] with more Chromium flags.
    pub async fn start_with(test: &str, flags: &[&str]) -> Result<Self> {
        let turn = ONE_BROWSER.lock().await;
        let driver_path = match std::env::var_os("KILN_CHROMEDRIVER") {
            Some(path) => PathBuf::from(path),
            None => find_on_path(&["chromedriver"])
                .with_context(|| format!("chromedriver is not on PATH; {INSTALL}"))?,
        };
        let chromium = match std::env::var_os("KILN_CHROMIUM") {
            Some(path) => PathBuf::from(path),
            None => find_on_path(&["chromium", "chromium-browser", "google-chrome"])
                .with_context(|| format!("no Chromium on PATH; {INSTALL}"))?,
        };
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.port()
        };
        let child = Command::new(&driver_path)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so the browser it starts goes with it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}; {INSTALL}", driver_path.display()))?;
        let driver = Process {
            child,
            name: "chromedriver".into(),
        };
        let profile = tempfile::tempdir()?;
        let mut args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-first-run".to_owned(),
            "--window-size=1280,900".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        args.extend(flags.iter().map(|flag| (*flag).to_owned()));
        let capabilities = json!({
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": args,
            }
        });
        let capabilities = match capabilities {
            Value::Object(map) => map,
            _ => unreachable!("a JSON object"),
        };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => bail!(
                    "cannot start a Chromium session through {} ({error}); {INSTALL}",
                    driver_path.display()
                ),
            }
        };
        let shots = screenshot_dir();
        std::fs::create_dir_all(&shots)?;
        Ok(Self {
            client,
            shots,
            test: test.to_owned(),
            driver,
            _profile: profile,
            _turn: turn,
        })
    }

    /// Saves a PNG of the page as `<test>-<name>.png` and returns its path.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        let png = self.client.screenshot().await?;
        if !png.starts_with(b"\x89PNG") {
            bail!("the browser's screenshot is not a PNG");
        }
        let path = self.shots.join(format!("{}-{name}.png", self.test));
        std::fs::write(&path, png)?;
        eprintln!("screenshot: {}", path.display());
        Ok(path)
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.client
            .goto(url)
            .await
            .with_context(|| format!("opening {url}"))
    }

    /// Runs `script` (a function body that `return`s) in the page.
    pub async fn js(&self, script: &str) -> Result<Value> {
        Ok(self.client.execute(script, Vec::new()).await?)
    }

    /// Runs `script` until it returns something other than null, false or
    /// "" (and returns that), or fails after `limit` naming `what`.
    pub async fn wait_js(&self, limit: Duration, what: &str, script: &str) -> Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let value = self.js(script).await?;
            let empty = matches!(&value, Value::Null | Value::Bool(false))
                || value.as_str().is_some_and(str::is_empty);
            if !empty {
                return Ok(value);
            }
            if Instant::now() > deadline {
                let url = self.client.current_url().await.map(|u| u.to_string());
                let shot = self.screenshot("timeout").await;
                bail!(
                    "timed out after {limit:?} waiting for {what} (page: {url:?}, screenshot: {shot:?})"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Signs in on `base`/login with `token` through the form, as a
    /// person would.
    pub async fn sign_in(&self, base: &str, token: &str) -> Result<()> {
        self.goto(&format!("{base}/login")).await?;
        let field = self
            .client
            .find(fantoccini::Locator::Id("token"))
            .await
            .context("the sign-in page has no token field")?;
        field.send_keys(token).await?;
        self.client
            .find(fantoccini::Locator::Id("sign-in"))
            .await?
            .click()
            .await?;
        self.wait_js(
            Duration::from_secs(10),
            "the signed-in page",
            "return document.getElementById('user') ? document.getElementById('user').textContent : null",
        )
        .await?;
        Ok(())
    }

    /// Ends the WebDriver session (Chromium quits); the driver stops on drop.
    pub async fn finish(self) -> Result<()> {
        self.client.clone().close().await?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium and its helpers are in the driver's process group.
        unsafe { libc::kill(-self.driver.pid(), libc::SIGKILL) };
    }
}

/// A TCP proxy in front of an address whose connections can be cut: the
/// way a test makes a browser lose its connection and come back.
pub struct Proxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
}

impl Proxy {
    pub async fn start(target: &str) -> Result<Self> {
        let target: SocketAddr = target
            .parse()
            .with_context(|| format!("address {target}"))?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let down = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let (is_down, cut_rx) = (down.clone(), cuts.subscribe());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if is_down.load(Ordering::SeqCst) {
                    // Refused while down: closed before any byte.
                    drop(inbound);
                    continue;
                }
                let mut cut = cut_rx.clone();
                cut.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(Self { addr, down, cuts })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every open connection and refuses new ones until
    /// [`Proxy::restore`].
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Where screenshots go, for messages.
pub fn screenshots() -> PathBuf {
    screenshot_dir()
}

/// Whether `path` is a PNG file.
pub fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|bytes| bytes.starts_with(b"\x89PNG"))
}
