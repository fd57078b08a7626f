//! Certificates of a DTLS listener: the server's own certificate and key (for the
//! TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 suite), and the CA that device certificates
//! must chain to. [`DtlsCertificates::verify`] turns the leaf certificate a device
//! presented into its identity, or refuses it.
//!
//! What is checked where: dimpl checks that the device holds the key of the certificate
//! it sent (its CertificateVerify signature over the handshake); everything else
//! (signature of the issuing CA, validity period, key usage for client authentication)
//! is webpki's, through rustls's [`WebPkiClientVerifier`] with the ring provider the
//! broker link already uses. The names are read with `x509-cert`, which dimpl already
//! brings in.
//!
//! dimpl hands over only the device's leaf certificate, not the intermediates it may
//! have sent; so `client_ca` holds the CA that signs device certificates directly (every
//! certificate in the file is a trust anchor, an intermediate as well).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;

/// The prefix of a certificate identity in [`crate::link::LinkAddr::Dtls`]: a device
/// authenticated by certificate `CN=sensor-7` is `cert:sensor-7`, one authenticated by
/// the PSK identity `sensor-7` is `sensor-7`. The two never meet: the registry binds a
/// client id to a `cert_identity` and to a `psk_identity` separately, and refuses a
/// `psk_identity` that starts with this prefix.
pub const CERT_IDENTITY_PREFIX: &str = "cert:";

/// Which name of a device certificate is its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdentityRule {
    /// The subject's common name (the first CN).
    #[default]
    CommonName,
    /// The first subject alternative name that is a DNS name or a URI, in the
    /// certificate's order.
    SubjectAltName,
}

impl IdentityRule {
    /// The name used in the configuration (`identity = "cn"` or `"san"`).
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityRule::CommonName => "cn",
            IdentityRule::SubjectAltName => "san",
        }
    }

    /// The rule named `s` in the configuration.
    pub fn parse(s: &str) -> Option<IdentityRule> {
        match s {
            "cn" => Some(IdentityRule::CommonName),
            "san" => Some(IdentityRule::SubjectAltName),
            _ => None,
        }
    }
}

/// A certificate file that cannot be used, naming the configuration key.
#[derive(Debug, thiserror::Error)]
pub enum CertLoadError {
    /// The file cannot be read.
    #[error("{key}: cannot read {}: {source}", path.display())]
    Read {
        /// The configuration key (`dtls.cert`, ...).
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no usable PEM item of the kind the key wants, or a broken one.
    #[error("{key}: {}: {what}", path.display())]
    Content {
        /// The configuration key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// Why a device certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertRefusal {
    /// Chain, validity period, signature or key usage: webpki's verdict.
    #[error("certificate not valid: {0}")]
    Invalid(String),
    /// Valid, but without the name the identity rule reads.
    #[error("certificate has no {0} to take the identity from")]
    NoName(&'static str),
}

/// The certificates of one DTLS listener, loaded and checked.
pub struct DtlsCertificates {
    /// The server certificate (DER), sent to devices.
    pub certificate: Vec<u8>,
    /// Its private key (DER, PKCS#8 or SEC1), as dimpl takes it.
    pub private_key: Vec<u8>,
    /// The trust anchors' certificates (DER), for comparing configurations.
    ca: Vec<Vec<u8>>,
    verifier: Arc<dyn ClientCertVerifier>,
    rule: IdentityRule,
}

impl std::fmt::Debug for DtlsCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsCertificates")
            .field("certificate", &self.certificate.len())
            .field("ca", &self.ca.len())
            .field("rule", &self.rule)
            .finish_non_exhaustive()
    }
}

impl PartialEq for DtlsCertificates {
    fn eq(&self, other: &Self) -> bool {
        self.certificate == other.certificate
            && self.private_key == other.private_key
            && self.ca == other.ca
            && self.rule == other.rule
    }
}

impl Eq for DtlsCertificates {}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, CertLoadError> {
    std::fs::read(path).map_err(|source| CertLoadError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, CertLoadError> {
    let pem = read(key, path)?;
    let content = |what: String| CertLoadError::Content {
        key,
        path: path.to_path_buf(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| content(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(content("no PEM certificate (BEGIN CERTIFICATE) in the file".into()));
    }
    for (i, c) in certs.iter().enumerate() {
        x509_cert::Certificate::from_der(c.as_ref())
            .map_err(|e| content(format!("certificate #{} does not parse: {e}", i + 1)))?;
    }
    Ok(certs)
}

impl DtlsCertificates {
    /// Reads the server certificate (`dtls.cert`, the first certificate of the file is
    /// sent), its key (`dtls.key`, an ECDSA P-256 or P-384 key, PKCS#8 or SEC1 PEM) and
    /// the device CA (`dtls.client_ca`, one or more certificates).
    pub fn load(cert: &Path, key: &Path, client_ca: &Path, rule: IdentityRule) -> Result<Self, CertLoadError> {
        let server = certificates("dtls.cert", cert)?;
        let pem = read("dtls.key", key)?;
        let key_error = |what: String| CertLoadError::Content {
            key: "dtls.key",
            path: key.to_path_buf(),
            what,
        };
        let private_key =
            PrivateKeyDer::from_pem_slice(&pem).map_err(|e| key_error(format!("no PEM private key: {e}")))?;
        // A key of another certificate would only show as failed handshakes.
        let first = server.first().cloned().map(CertificateDer::into_owned);
        if let Some(first) = first {
            let provider = rustls::crypto::ring::default_provider();
            if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
                CertifiedKey::from_der(vec![first], private_key.clone_key(), &provider)
            {
                return Err(key_error(format!(
                    "not the key of the certificate in {}",
                    cert.display()
                )));
            }
        }
        let private_key = private_key.secret_der().to_vec();
        // dimpl panics on a key it cannot load when a handshake starts: load it here.
        dimpl::crypto::rust_crypto::default_provider()
            .key_provider
            .load_private_key(&private_key)
            .map_err(|e| key_error(format!("not an ECDSA P-256 or P-384 key: {e}")))?;
        let ca = certificates("dtls.client_ca", client_ca)?;
        let mut roots = RootCertStore::empty();
        for (i, c) in ca.iter().enumerate() {
            roots.add(c.clone()).map_err(|e| CertLoadError::Content {
                key: "dtls.client_ca",
                path: client_ca.to_path_buf(),
                what: format!("certificate #{} is not a usable CA: {e}", i + 1),
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| CertLoadError::Content {
                key: "dtls.client_ca",
                path: client_ca.to_path_buf(),
                what: e.to_string(),
            })?;
        Ok(DtlsCertificates {
            certificate: server.first().map(|c| c.to_vec()).unwrap_or_default(),
            private_key,
            ca: ca.iter().map(|c| c.to_vec()).collect(),
            verifier,
            rule,
        })
    }

    /// The identity rule in force.
    pub fn rule(&self) -> IdentityRule {
        self.rule
    }

    /// Verifies a device's leaf certificate (DER) against the CA at wall-clock time
    /// `now`, and gives its identity as it appears in the link address
    /// ([`CERT_IDENTITY_PREFIX`] and the name).
    pub fn verify(&self, leaf: &[u8], now: SystemTime) -> Result<Arc<str>, CertRefusal> {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.verifier
            .verify_client_cert(&CertificateDer::from(leaf), &[], UnixTime::since_unix_epoch(since))
            .map_err(|e| CertRefusal::Invalid(e.to_string()))?;
        let name = identity_of(leaf, self.rule)?;
        Ok(Arc::from(format!("{CERT_IDENTITY_PREFIX}{name}")))
    }
}

/// The name `rule` reads from the certificate `der` (already verified).
fn identity_of(der: &[u8], rule: IdentityRule) -> Result<String, CertRefusal> {
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| CertRefusal::Invalid(e.to_string()))?;
    let tbs = cert.tbs_certificate();
    let name = match rule {
        IdentityRule::CommonName => tbs
            .subject()
            .common_name()
            .ok()
            .flatten()
            .map(|cn| cn.value().into_owned()),
        IdentityRule::SubjectAltName => tbs
            .get_extension::<SubjectAltName>()
            .ok()
            .flatten()
            .and_then(|(_, san)| {
                san.0.iter().find_map(|n| match n {
                    GeneralName::DnsName(s) | GeneralName::UniformResourceIdentifier(s) => Some(s.to_string()),
                    _ => None,
                })
            }),
    };
    match name {
        Some(n) if !n.is_empty() => Ok(n),
        _ => Err(CertRefusal::NoName(match rule {
            IdentityRule::CommonName => "subject CN",
            IdentityRule::SubjectAltName => "DNS or URI subject alternative name",
        })),
    }
}
