//! How the agent, the CLI, `kiln demo` and the tests reach a coordinator:
//! one [`CoordinatorEndpoint`] (plain `http://`, or `https://` with a CA
//! file and optionally a client certificate), and a [`KilnChannel`] that puts
//! the bearer token on every request of every service.
//!
//! The generated clients stay `XClient::new(channel)`: [`KilnChannel`] is a
//! `tower::Service` in front of tonic's `Channel`, so no call site has to
//! remember an interceptor.

use std::fmt;
use std::path::{Path, PathBuf};
use std::task::{Context, Poll};

use http::HeaderValue;
use http::header::AUTHORIZATION;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower_service::Service;

use crate::tls::{self, TlsError};

/// Why a coordinator endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    #[error("`{url}` is not a valid coordinator URL: {detail}")]
    Url { url: String, detail: String },
    #[error(
        "`{url}` is plain http://, but {what} was given; use an https:// coordinator URL \
         or drop the TLS flags"
    )]
    TlsWithoutHttps { url: String, what: &'static str },
    #[error(
        "a client certificate needs its key and the key its certificate: give both --tls-cert and --tls-key"
    )]
    HalfIdentity,
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot read the token file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token {where_} is empty")]
    EmptyToken { where_: String },
    #[error("the token {where_} holds characters an HTTP header cannot carry")]
    BadToken { where_: String },
    #[error("give the token either as a value or as a file, not both")]
    TokenTwice,
}

/// A bearer token. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// `text` without surrounding whitespace; must not be empty.
    pub fn new(text: &str) -> Result<Self, ChannelError> {
        Self::checked(text, "given".to_owned())
    }

    /// The contents of `path`, without surrounding whitespace or the final
    /// newline editors add.
    pub fn from_file(path: &Path) -> Result<Self, ChannelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ChannelError::TokenFile {
            path: path.to_owned(),
            source,
        })?;
        Self::checked(&text, format!("in {}", path.display()))
    }

    /// The token from a pair of flags (`--token`, `--token-file`): at most
    /// one may be given.
    pub fn from_flags(
        value: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Option<Self>, ChannelError> {
        match (value, file) {
            (Some(_), Some(_)) => Err(ChannelError::TokenTwice),
            (Some(value), None) => Self::new(value).map(Some),
            (None, Some(file)) => Self::from_file(file).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The secret itself, for the rare caller that must send it elsewhere.
    pub fn secret(&self) -> &str {
        &self.0
    }

    fn checked(text: &str, where_: String) -> Result<Self, ChannelError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ChannelError::EmptyToken { where_ });
        }
        if HeaderValue::from_str(&format!("Bearer {text}")).is_err() {
            return Err(ChannelError::BadToken { where_ });
        }
        Ok(Self(text.to_owned()))
    }

    fn header(&self) -> HeaderValue {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.0))
            .expect("checked when the token was made");
        value.set_sensitive(true);
        value
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// How a client proves who it is and checks whom it talks to; the agent's
/// and the CLI's flags fill it in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientOptions {
    /// PEM bundle the coordinator's certificate must chain to (`--ca-file`).
    /// Without it an `https://` coordinator is checked against the system's
    /// roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS (`--tls-cert`), with `client_key`.
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (`--tls-key`).
    pub client_key: Option<PathBuf>,
    /// Sent as `authorization: Bearer <token>` on every request.
    pub token: Option<Token>,
}

/// A coordinator's address with its TLS settings and token: what to dial.
/// Cheap to clone; every [`connect`](Self::connect) is a new connection.
#[derive(Clone, Debug)]
pub struct CoordinatorEndpoint {
    endpoint: Endpoint,
    /// `Bearer <token>`, marked sensitive so it is never logged.
    authorization: Option<HeaderValue>,
}

impl CoordinatorEndpoint {
    /// Checks `url` (`http://` or `https://`) and reads the TLS files now, so
    /// a wrong path is reported before the first dial.
    pub fn new(url: &str, options: &ClientOptions) -> Result<Self, ChannelError> {
        let bad_url = |detail: String| ChannelError::Url {
            url: url.to_owned(),
            detail,
        };
        let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| bad_url(e.to_string()))?;
        let identity = match (&options.client_cert, &options.client_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => return Err(ChannelError::HalfIdentity),
        };
        let endpoint = match endpoint.uri().scheme_str() {
            Some("https") => {
                let config = tls::client_config(options.ca_file.as_deref(), identity)?;
                endpoint
                    .tls_config(config)
                    .map_err(|e| bad_url(e.to_string()))?
            }
            Some("http") => {
                let what = if options.ca_file.is_some() {
                    Some("--ca-file")
                } else if identity.is_some() {
                    Some("a client certificate")
                } else {
                    None
                };
                if let Some(what) = what {
                    return Err(ChannelError::TlsWithoutHttps {
                        url: url.to_owned(),
                        what,
                    });
                }
                endpoint
            }
            _ => return Err(bad_url("use http://HOST:PORT or https://HOST:PORT".into())),
        };
        Ok(Self {
            endpoint,
            authorization: options.token.as_ref().map(Token::header),
        })
    }

    /// Adjusts the underlying tonic endpoint (timeouts, keep-alive, ...).
    pub fn map_endpoint(mut self, configure: impl FnOnce(Endpoint) -> Endpoint) -> Self {
        self.endpoint = configure(self.endpoint);
        self
    }

    pub fn uri(&self) -> &http::Uri {
        self.endpoint.uri()
    }

    /// Dials now: handshake failures (wrong CA, refused client certificate)
    /// surface here.
    pub async fn connect(&self) -> Result<KilnChannel, tonic::transport::Error> {
        let channel = self.endpoint.connect().await?;
        Ok(self.wrap(channel))
    }

    /// Dials on first use, and again after the connection breaks.
    pub fn connect_lazy(&self) -> KilnChannel {
        self.wrap(self.endpoint.connect_lazy())
    }

    fn wrap(&self, channel: Channel) -> KilnChannel {
        KilnChannel {
            channel,
            authorization: self.authorization.clone(),
        }
    }
}

/// tonic's `Channel` plus the bearer token: every request that has no
/// `authorization` header of its own gets `Bearer <token>`.
#[derive(Clone, Debug)]
pub struct KilnChannel {
    channel: Channel,
    authorization: Option<HeaderValue>,
}

impl KilnChannel {
    /// Wraps a channel made elsewhere (e.g. an in-process test server).
    pub fn new(channel: Channel, token: Option<&Token>) -> Self {
        Self {
            channel,
            authorization: token.map(Token::header),
        }
    }
}

impl Service<http::Request<Body>> for KilnChannel {
    type Response = <Channel as Service<http::Request<Body>>>::Response;
    type Error = <Channel as Service<http::Request<Body>>>::Error;
    type Future = <Channel as Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if let Some(value) = &self.authorization {
            request
                .headers_mut()
                .entry(AUTHORIZATION)
                .or_insert_with(|| value.clone());
        }
        Service::call(&mut self.channel, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_are_trimmed_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        let token = Token::from_file(&path).unwrap();
        assert_eq!(token.secret(), "s3cret");
        assert!(!format!("{token:?}").contains("s3cret"));
        assert!(!format!("{:?}", token.header()).contains("s3cret"));
        std::fs::write(&path, "\n").unwrap();
        let error = Token::from_file(&path).unwrap_err().to_string();
        assert_eq!(error, format!("the token in {} is empty", path.display()));
    }

    #[test]
    fn a_token_comes_from_one_flag_at_most() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file").unwrap();
        assert!(matches!(
            Token::from_flags(Some("a"), Some(&path)),
            Err(ChannelError::TokenTwice)
        ));
        let from_file = Token::from_flags(None, Some(&path)).unwrap().unwrap();
        assert_eq!(from_file.secret(), "from-file");
        assert_eq!(Token::from_flags(None, None).unwrap(), None);
        assert!(Token::new("bad\ntoken").is_err());
    }

    #[test]
    fn urls_and_tls_flags_must_agree() {
        let options = ClientOptions {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..ClientOptions::default()
        };
        let error = CoordinatorEndpoint::new("http://127.0.0.1:7700", &options)
            .unwrap_err()
            .to_string();
        assert!(error.contains("plain http://"), "{error}");
        let error = CoordinatorEndpoint::new("https://127.0.0.1:7700", &options)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("tls: cannot read /nonexistent/ca.pem"),
            "{error}"
        );
        let half = ClientOptions {
            client_cert: Some("/x/cert.pem".into()),
            ..ClientOptions::default()
        };
        assert!(matches!(
            CoordinatorEndpoint::new("https://127.0.0.1:7700", &half),
            Err(ChannelError::HalfIdentity)
        ));
        assert!(CoordinatorEndpoint::new("ftp://x", &ClientOptions::default()).is_err());
        assert!(CoordinatorEndpoint::new("http://127.0.0.1:1", &ClientOptions::default()).is_ok());
    }
}
