//! TLS to the broker (`mqtts://`): the rustls client configuration, built once at start
//! from the configured PEM files, and what a failed handshake means for a device.
//!
//! The crypto provider is *ring* (rumqttc's own certificate code already pulls it in,
//! and it builds with a C compiler alone; aws-lc-rs would add a second, larger one).
//! Without `broker.ca_file` the system's trusted roots are used (rustls-native-certs:
//! `/etc/ssl/certs` as the `ca-certificates` package keeps it, so an operator's CA
//! bundle and its updates apply, which a compiled-in list would not).

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::tokio_rustls::TlsConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The files TLS to the broker is configured with (each `None` when not set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// `broker.ca_file`: PEM certificates of the CAs the broker's certificate must chain
    /// to; `None`: the system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// `broker.client_cert`: the gateway's PEM certificate chain, for a broker that
    /// asks for client certificates.
    pub client_cert: Option<PathBuf>,
    /// `broker.client_key`: the private key of `client_cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<PathBuf>,
}

/// A TLS client configuration for the broker link, ready to use (files read and parsed).
/// Compared by the files it came from.
#[derive(Clone)]
pub struct BrokerTls {
    files: TlsFiles,
    /// Kept for the configurations of devices with their own client certificate.
    roots: RootCertStore,
    config: Arc<ClientConfig>,
}

impl fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl PartialEq for BrokerTls {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
    }
}

impl Eq for BrokerTls {}

/// Why TLS to the broker cannot be set up. Each names the configuration key and file.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read.
    #[error("{key}: cannot read {}: {source}", path.display())]
    Read {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file is not valid PEM, or holds nothing of the kind wanted.
    #[error("{key}: {}: {problem}", path.display())]
    Content {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A client certificate without its key, or a key without its certificate.
    #[error("{absent} is not set, but {given} is: a client certificate needs its key")]
    Unpaired {
        /// The key not set.
        absent: &'static str,
        /// The key set.
        given: &'static str,
    },
    /// The system has no usable trusted roots and no `broker.ca_file` was given.
    #[error("broker.ca_file is not set and the system has no trusted root certificates ({0}); set broker.ca_file to the broker's CA")]
    NoSystemRoots(String),
    /// rustls refused the configuration.
    #[error("broker TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Reads a file named by `key`.
fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file (other PEM sections are skipped); at least one.
pub fn read_certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let bad = |problem: String| TlsSetupError::Content {
        key,
        path: path.to_path_buf(),
        problem,
    };
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into()));
    }
    Ok(certs)
}

/// The trusted roots: the certificates of `ca_file`, each one checked, or the system's.
pub fn root_store(ca_file: Option<&Path>, ca_key: &'static str) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for (n, cert) in read_certificates(ca_key, path)?.into_iter().enumerate() {
                roots.add(cert).map_err(|e| TlsSetupError::Content {
                    key: ca_key,
                    path: path.to_path_buf(),
                    problem: format!("certificate #{} is not usable as a CA: {e}", n + 1),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(TlsSetupError::NoSystemRoots(if why.is_empty() {
                    "none found".into()
                } else {
                    why
                }));
            }
        }
    }
    Ok(roots)
}

/// A client configuration on the *ring* provider with TLS 1.2 and 1.3.
pub fn client_config(
    roots: RootCertStore,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, rustls::Error> {
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    match client_auth {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A client certificate chain with its private key, read and checked (the key belongs to
/// the certificate): the gateway's own (`broker.client_cert`) or a device's (its
/// registry entry's `client_cert`). Compared by the files it came from; the key never
/// shows in a debug print.
pub struct ClientIdentity {
    cert_path: PathBuf,
    key_path: PathBuf,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.cert_path == other.cert_path && self.key_path == other.key_path && self.chain == other.chain
    }
}

impl Eq for ClientIdentity {}

impl ClientIdentity {
    /// Reads the certificate chain at `cert` and the private key at `key` (PEM: PKCS#8,
    /// PKCS#1 or SEC1), checking that the key belongs to the certificate. `cert_key` and
    /// `key_key` name the settings in errors.
    pub fn load(
        cert_key: &'static str,
        cert: &Path,
        key_key: &'static str,
        key_path: &Path,
    ) -> Result<ClientIdentity, TlsSetupError> {
        let chain = read_certificates(cert_key, cert)?;
        let pem = read(key_key, key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsSetupError::Content {
            key: key_key,
            path: key_path.to_path_buf(),
            problem: match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "no PEM private key (PKCS#8, PKCS#1 or SEC1) in it".into()
                }
                e => format!("not a PEM private key: {e}"),
            },
        })?;
        let identity = ClientIdentity {
            cert_path: cert.to_path_buf(),
            key_path: key_path.to_path_buf(),
            chain,
            key,
        };
        // rustls checks that the key matches the certificate when a configuration is built.
        client_config(RootCertStore::empty(), Some(identity.pair())).map_err(|e| TlsSetupError::Content {
            key: key_key,
            path: key_path.to_path_buf(),
            problem: format!("not usable with {cert_key} {}: {e}", cert.display()),
        })?;
        Ok(identity)
    }

    fn pair(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.chain.clone(), self.key.clone_key())
    }
}

impl BrokerTls {
    /// Reads and checks the files: the CA certificates (or the system's roots), and the
    /// client certificate with its key when both are given (one without the other is an
    /// error, as is a key that does not belong to the certificate).
    pub fn load(files: TlsFiles) -> Result<BrokerTls, TlsSetupError> {
        match (&files.client_cert, &files.client_key) {
            (Some(_), None) => return Err(unpaired("broker.client_key", "broker.client_cert")),
            (None, Some(_)) => return Err(unpaired("broker.client_cert", "broker.client_key")),
            _ => {}
        }
        let roots = root_store(files.ca_file.as_deref(), "broker.ca_file")?;
        let identity = match (&files.client_cert, &files.client_key) {
            (Some(cert), Some(key)) => Some(ClientIdentity::load(
                "broker.client_cert",
                cert,
                "broker.client_key",
                key,
            )?),
            _ => None,
        };
        let config = client_config(roots.clone(), identity.as_ref().map(ClientIdentity::pair))?;
        Ok(BrokerTls {
            files,
            roots,
            config: Arc::new(config),
        })
    }

    /// The files this configuration came from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The rustls configuration of a broker connection ([`super::conn::ConnOptions::tls`]).
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// The configuration with no client certificate at all.
    pub fn config_without_client_auth(&self) -> Arc<ClientConfig> {
        match client_config(self.roots.clone(), None) {
            Ok(c) => Arc::new(c),
            // The same roots and provider built `config` already.
            Err(_) => self.config.clone(),
        }
    }

    /// The rustls configuration for a device that presents its own client certificate
    /// (from the device registry) instead of the gateway's. Built per connection: only
    /// devices with their own certificate pay for it.
    pub fn config_for(&self, identity: &ClientIdentity) -> Result<Arc<ClientConfig>, rustls::Error> {
        client_config(self.roots.clone(), Some(identity.pair())).map(Arc::new)
    }

    /// Connects to `host:port` and completes a TLS handshake, checking the broker's
    /// certificate and that it names `host`, then closes (TLS close_notify). For the
    /// health probe: a broker whose certificate the gateway would refuse is as good as
    /// unreachable for every device.
    pub async fn handshake(&self, host: &str, port: u16, timeout: Duration) -> Result<(), String> {
        let name = server_name(host)?;
        let attempt = async {
            let tcp = TcpStream::connect((host, port)).await.map_err(|e| e.to_string())?;
            let mut tls = TlsConnector::from(self.config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| describe_io(&e, host).unwrap_or_else(|| format!("TLS handshake: {e}")))?;
            let _ = tls.shutdown().await;
            Ok(())
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("no TLS handshake within {} s", timeout.as_secs_f64())),
        }
    }
}

fn unpaired(absent: &'static str, given: &'static str) -> TlsSetupError {
    TlsSetupError::Unpaired { absent, given }
}

/// The name the broker's certificate must carry: a DNS name, or an IP address (a
/// certificate for an address names it in an IP subjectAltName).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is neither a DNS name nor an IP address the broker's certificate could name"))
}

/// The rustls error in `e`'s chain of sources, looking inside I/O errors too (whose
/// `source` skips the error they wrap).
fn find_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut at = Some(e);
    while let Some(err) = at {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(t) = err
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(t);
        }
        at = err.source();
    }
    None
}

/// The TLS problem behind a failed broker connection, as a line for the log, or `None`
/// when the failure is not a TLS one (the rustls error inside the I/O error, as
/// tokio-rustls reports a handshake failure and a read reports an alert, looked for along
/// the whole chain). A TLS failure is a refusal (the device is told "rejected"): a
/// certificate the gateway does not trust, one that does not name the broker's host, a
/// client certificate the broker refuses or requires, or no common protocol, are all
/// answered the same way on every retry. A connection merely cut during the handshake
/// (no TLS error in it) is not one: that is transient.
pub fn describe_io(io: &io::Error, host: &str) -> Option<String> {
    find_rustls(io).map(|t| describe(t, host))
}

/// A rustls error with what it usually means for an operator.
fn describe(t: &rustls::Error, host: &str) -> String {
    let hint = match t {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "the broker's certificate is not signed by a CA the gateway trusts (broker.ca_file, or the system's roots)".to_string()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the broker's certificate does not name {host:?} (the host of broker.url) in its subjectAltName")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the broker's certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the broker's certificate is not valid yet (check the clocks)".into()
            }
            _ => "the broker's certificate is not acceptable".into(),
        },
        rustls::Error::AlertReceived(a) => match a {
            AlertDescription::CertificateRequired => {
                "the broker requires a client certificate (broker.client_cert, broker.client_key)".into()
            }
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied => "the broker refused the gateway's client certificate".into(),
            _ => "the broker ended the TLS handshake".into(),
        },
        _ => "TLS protocol failure".into(),
    };
    format!("TLS with the broker failed: {hint}: {t}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gw-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn unreadable_and_invalid_files_name_the_key_and_the_file() {
        let missing = PathBuf::from("/nonexistent/ca.pem");
        let e = BrokerTls::load(TlsFiles {
            ca_file: Some(missing),
            ..TlsFiles::default()
        })
        .expect_err("missing file");
        assert!(
            e.to_string()
                .starts_with("broker.ca_file: cannot read /nonexistent/ca.pem"),
            "{e}"
        );

        let junk = temp("junk.pem", "not a certificate\n");
        let e = BrokerTls::load(TlsFiles {
            ca_file: Some(junk.clone()),
            ..TlsFiles::default()
        })
        .expect_err("no certificate");
        let text = e.to_string();
        assert!(
            text.contains("broker.ca_file") && text.contains(&*junk.to_string_lossy()),
            "{text}"
        );
        assert!(text.contains("no PEM certificate"), "{text}");

        let broken = temp(
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        );
        let e = BrokerTls::load(TlsFiles {
            ca_file: Some(broken),
            ..TlsFiles::default()
        })
        .expect_err("not a certificate");
        assert!(e.to_string().contains("broker.ca_file"), "{e}");
        if let Some(dir) = junk.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let e = BrokerTls::load(TlsFiles {
            ca_file: None,
            client_cert: Some("/x/cert.pem".into()),
            client_key: None,
        })
        .expect_err("no key");
        assert_eq!(
            e.to_string(),
            "broker.client_key is not set, but broker.client_cert is: a client certificate needs its key"
        );
    }

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/broker/testdata")
            .join(name)
    }

    #[test]
    fn a_ca_file_and_a_client_certificate_load() {
        let files = TlsFiles {
            ca_file: Some(testdata("ca.pem")),
            client_cert: Some(testdata("client.pem")),
            client_key: Some(testdata("client.key")),
        };
        let tls = BrokerTls::load(files.clone()).expect("valid files");
        assert_eq!(tls.files(), &files);
        assert!(tls.config().client_auth_cert_resolver.has_certs());
        let without = BrokerTls::load(TlsFiles {
            ca_file: Some(testdata("ca.pem")),
            ..TlsFiles::default()
        })
        .expect("a CA alone");
        assert!(!without.config().client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let e = BrokerTls::load(TlsFiles {
            ca_file: Some(testdata("ca.pem")),
            client_cert: Some(testdata("client.pem")),
            client_key: Some(testdata("other.key")),
        })
        .expect_err("mismatched key");
        let text = e.to_string();
        assert!(
            text.starts_with("broker.client_key: ") && text.contains("other.key") && text.contains("client.pem"),
            "{text}"
        );
        // A certificate where the key should be: no key in it.
        let e = BrokerTls::load(TlsFiles {
            ca_file: Some(testdata("ca.pem")),
            client_cert: Some(testdata("client.pem")),
            client_key: Some(testdata("client.pem")),
        })
        .expect_err("no key");
        assert!(e.to_string().contains("no PEM private key"), "{e}");
        // A key where the certificate should be.
        let e = BrokerTls::load(TlsFiles {
            ca_file: Some(testdata("client.key")),
            ..TlsFiles::default()
        })
        .expect_err("no certificate");
        assert!(e.to_string().starts_with("broker.ca_file: "), "{e}");
    }

    #[test]
    fn failures_that_are_tls_ones() {
        let cert =
            |e: CertificateError| io::Error::new(io::ErrorKind::InvalidData, rustls::Error::InvalidCertificate(e));
        let unknown = describe_io(&cert(CertificateError::UnknownIssuer), "b").expect("a TLS failure");
        assert!(unknown.contains("not signed by a CA the gateway trusts"), "{unknown}");
        let name = describe_io(&cert(CertificateError::NotValidForName), "b.example").expect("a TLS failure");
        assert!(name.contains("does not name \"b.example\""), "{name}");
        // An alert after the handshake, read while waiting for CONNACK.
        let alert = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        );
        let required = describe_io(&alert, "b").expect("a TLS failure");
        assert!(required.contains("requires a client certificate"), "{required}");
        // Cut during the handshake, or not TLS at all: transient, not a TLS failure.
        assert_eq!(describe_io(&io::Error::from(io::ErrorKind::ConnectionReset), "b"), None);
        assert_eq!(
            describe_io(&io::Error::from(io::ErrorKind::ConnectionRefused), "b"),
            None
        );
    }

    #[test]
    fn server_names_for_hosts_and_addresses() {
        assert!(matches!(server_name("127.0.0.1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(server_name("::1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(server_name("broker.example"), Ok(ServerName::DnsName(_))));
        assert!(server_name("bad name").is_err());
    }
}
