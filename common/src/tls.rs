//! TLS material read from PEM files: certificate chains, private keys and CA
//! bundles, checked when they are loaded so that a wrong file is reported by
//! name before anything listens or dials.
//!
//! Everything uses rustls with the `ring` provider; the same files feed
//! tonic's TLS (gRPC) and a plain rustls `ServerConfig` (the HTTP listener).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Why TLS material could not be used. Every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("tls: cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file parsed but has nothing of the kind asked for.
    #[error("tls: {} holds no {what}", path.display())]
    Missing { path: PathBuf, what: &'static str },
    #[error("tls: {} is not valid PEM: {detail}", path.display())]
    Pem { path: PathBuf, detail: String },
    /// rustls refused the material, e.g. a key that does not fit the
    /// certificate or a CA certificate it cannot use as a trust anchor.
    #[error("tls: {what}: {detail}")]
    Rejected { what: String, detail: String },
}

/// A PEM file of certificates (a chain, or a CA bundle), as read and parsed.
#[derive(Clone)]
pub struct Certificates {
    path: PathBuf,
    /// The file as it is: tonic takes PEM.
    pem: Vec<u8>,
    der: Vec<CertificateDer<'static>>,
}

impl Certificates {
    /// Reads `path`; it must hold at least one `CERTIFICATE` block.
    pub fn read(path: &Path) -> Result<Self, TlsError> {
        let pem = read(path)?;
        let der = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| pem_error(path, error))?;
        if der.is_empty() {
            return Err(TlsError::Missing {
                path: path.to_owned(),
                what: "certificate (-----BEGIN CERTIFICATE-----)",
            });
        }
        Ok(Self {
            path: path.to_owned(),
            pem,
            der,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn der(&self) -> &[CertificateDer<'static>] {
        &self.der
    }

    /// The certificates as trust anchors; fails when one is not a usable CA.
    pub fn root_store(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &self.der {
            roots
                .add(cert.clone())
                .map_err(|error| TlsError::Rejected {
                    what: format!("CA bundle {}", self.path.display()),
                    detail: error.to_string(),
                })?;
        }
        Ok(roots)
    }

    fn tonic(&self) -> Certificate {
        Certificate::from_pem(&self.pem)
    }
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("path", &self.path)
            .field("count", &self.der.len())
            .finish()
    }
}

/// A PEM private key (PKCS#8, PKCS#1 or SEC1), as read and parsed.
pub struct PrivateKey {
    path: PathBuf,
    pem: Vec<u8>,
    der: PrivateKeyDer<'static>,
}

impl PrivateKey {
    /// Reads `path`; the first private key in it is the one used.
    pub fn read(path: &Path) -> Result<Self, TlsError> {
        let pem = read(path)?;
        let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|error| match error {
            pem::Error::NoItemsFound => TlsError::Missing {
                path: path.to_owned(),
                what: "private key",
            },
            other => pem_error(path, other),
        })?;
        Ok(Self {
            path: path.to_owned(),
            pem,
            der,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn der(&self) -> &PrivateKeyDer<'static> {
        &self.der
    }
}

impl fmt::Debug for PrivateKey {
    /// Never the key itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Where a server's TLS material is; the coordinator's flags fill it in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The leaf certificate's private key.
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to. When given, gRPC
    /// clients without such a certificate are refused (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// A server's TLS material, read and checked by [`ServerTls::load`].
#[derive(Debug)]
pub struct ServerTls {
    cert: Certificates,
    key: PrivateKey,
    client_ca: Option<Certificates>,
}

impl ServerTls {
    /// Reads the files and lets rustls check them together: the key must fit
    /// the certificate and the client CA must be usable as a trust anchor.
    pub fn load(files: &ServerTlsFiles) -> Result<Self, TlsError> {
        let tls = Self {
            cert: Certificates::read(&files.cert)?,
            key: PrivateKey::read(&files.key)?,
            client_ca: files
                .client_ca
                .as_deref()
                .map(Certificates::read)
                .transpose()?,
        };
        tls.http_config()?;
        if let Some(client_ca) = &tls.client_ca {
            client_ca.root_store()?;
        }
        Ok(tls)
    }

    /// Whether clients must present a certificate (gRPC only).
    pub fn requires_client_certs(&self) -> bool {
        self.client_ca.is_some()
    }

    /// tonic's server TLS: the identity, plus the client CA when given, in
    /// which case a client certificate is required.
    pub fn grpc_config(&self) -> ServerTlsConfig {
        let config =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert.pem, &self.key.pem));
        match &self.client_ca {
            Some(client_ca) => config.client_ca_root(client_ca.tonic()),
            None => config,
        }
    }

    /// A rustls server config for HTTP/1.1 with the same certificate and no
    /// client certificates: webhooks come from git servers that have none.
    pub fn http_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| self.rejected(error))?
            .with_no_client_auth()
            .with_single_cert(self.cert.der.clone(), self.key.der.clone_key())
            .map_err(|error| self.rejected(error))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    fn rejected(&self, error: rustls::Error) -> TlsError {
        TlsError::Rejected {
            what: format!(
                "certificate {} with key {}",
                self.cert.path.display(),
                self.key.path.display()
            ),
            detail: error.to_string(),
        }
    }
}

/// tonic's client TLS: trust `ca_file` only when given (else the system's
/// roots), and present `identity` (certificate, key) for mutual TLS.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, TlsError> {
    let mut config = ClientTlsConfig::new();
    config = match ca_file {
        Some(path) => {
            let ca = Certificates::read(path)?;
            ca.root_store()?;
            config.ca_certificate(ca.tonic())
        }
        None => config.with_native_roots(),
    };
    if let Some((cert, key)) = identity {
        let cert = Certificates::read(cert)?;
        let key = PrivateKey::read(key)?;
        config = config.identity(Identity::from_pem(&cert.pem, &key.pem));
    }
    Ok(config)
}

/// The one crypto provider Kiln uses, whatever else is compiled in.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &Path, error: pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        detail: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    /// A self-signed certificate for `localhost` and its key, as PEM.
    fn self_signed() -> (String, String) {
        let certified = rcgen::generate_simple_self_signed(["localhost".to_owned()]).unwrap();
        (certified.cert.pem(), certified.signing_key.serialize_pem())
    }

    #[test]
    fn a_key_file_without_a_key_is_named() {
        let files = Files::new();
        let (cert, _) = self_signed();
        let path = files.write("key.pem", &cert);
        let error = PrivateKey::read(&path).unwrap_err().to_string();
        assert_eq!(
            error,
            format!("tls: {} holds no private key", path.display())
        );
    }

    #[test]
    fn a_cert_file_without_a_certificate_is_named() {
        let files = Files::new();
        let (_, key) = self_signed();
        let path = files.write("cert.pem", &key);
        let error = Certificates::read(&path).unwrap_err().to_string();
        assert!(error.starts_with(&format!("tls: {} holds no certificate", path.display())));
    }

    #[test]
    fn missing_and_broken_files_are_named() {
        let files = Files::new();
        let missing = files.dir.path().join("nope.pem");
        let error = Certificates::read(&missing).unwrap_err().to_string();
        assert!(error.starts_with(&format!("tls: cannot read {}", missing.display())));
        let broken = files.write("broken.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
        let error = Certificates::read(&broken).unwrap_err().to_string();
        assert!(error.starts_with(&format!("tls: {} is not valid PEM", broken.display())));
    }

    #[test]
    fn a_server_loads_a_matching_pair_and_refuses_a_foreign_key() {
        let files = Files::new();
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let server = ServerTlsFiles {
            cert: files.write("cert.pem", &cert),
            key: files.write("key.pem", &key),
            client_ca: None,
        };
        let tls = ServerTls::load(&server).unwrap();
        assert!(!tls.requires_client_certs());
        assert_eq!(tls.http_config().unwrap().alpn_protocols, [b"http/1.1"]);

        let foreign = ServerTlsFiles {
            key: files.write("other.pem", &other_key),
            ..server.clone()
        };
        let error = ServerTls::load(&foreign).unwrap_err().to_string();
        assert!(error.contains("cert.pem with key"), "{error}");
        assert!(error.contains("other.pem"), "{error}");

        let mutual = ServerTlsFiles {
            client_ca: Some(server.cert.clone()),
            ..server
        };
        assert!(ServerTls::load(&mutual).unwrap().requires_client_certs());
    }

    #[test]
    fn client_config_reads_the_ca_and_identity() {
        let files = Files::new();
        let (cert, key) = self_signed();
        let cert = files.write("cert.pem", &cert);
        let key = files.write("key.pem", &key);
        assert!(client_config(Some(&cert), Some((&cert, &key))).is_ok());
        let error = client_config(Some(&key), None).unwrap_err().to_string();
        assert!(error.contains("holds no certificate"), "{error}");
        let error = client_config(None, Some((&cert, &cert)))
            .unwrap_err()
            .to_string();
        assert!(error.contains("holds no private key"), "{error}");
    }
}
