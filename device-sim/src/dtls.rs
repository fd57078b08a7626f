//! A device's side of DTLS 1.2, over the sans-IO `dimpl` engine: records in, records and
//! plaintext datagrams out, time a parameter. The [`crate::station::Station`] runs the
//! handshake and then carries every MQTT-SN datagram as one DTLS record.
//!
//! A device proves who it is with a pre-shared key (TLS_PSK_WITH_AES_128_CCM_8, the suite
//! of constrained devices, RFC 7925) or with an ECDSA certificate
//! (TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 and the other ECDHE-ECDSA AEAD suites). With a
//! certificate it also checks the gateway's: dimpl hands over the gateway's leaf
//! certificate and checks the handshake signatures made with its key; whether the
//! certificate chains to the trusted CA, is valid now, is for a TLS server and names the
//! gateway is webpki's verdict, through rustls's [`WebPkiServerVerifier`] (the ring
//! provider the broker link already uses).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dimpl::crypto::{CryptoProvider, Dtls12CipherSuite, Dtls13CipherSuite, SupportedDtls12CipherSuite};
use dimpl::{Config, Dtls, DtlsCertificate, Output, PskResolver};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// A PSK identity and its key, as the device registry holds them.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk {
    /// The PSK identity sent in the handshake.
    pub identity: String,
    /// The key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Psk")
            .field("identity", &self.identity)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Psk {
    /// An identity and a key given in hex (`--psk-identity`, `--psk`).
    pub fn from_hex(identity: &str, hex: &str) -> Result<Psk, String> {
        if identity.is_empty() || identity.len() > 128 {
            return Err("the PSK identity must have 1 to 128 octets".into());
        }
        let hex = hex.trim();
        if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 128 {
            return Err("the PSK must be 1 to 64 octets in hex (an even number of hex digits)".into());
        }
        let key = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|d| u8::from_str_radix(d, 16).ok())
                    .ok_or_else(|| format!("the PSK is not hex: {hex:?}"))
            })
            .collect::<Result<Vec<u8>, String>>()?;
        Ok(Psk {
            identity: identity.into(),
            key,
        })
    }
}

/// Why a DTLS session could not go on.
#[derive(Debug, thiserror::Error)]
pub enum DtlsError {
    /// The configuration was refused by the DTLS engine.
    #[error("DTLS configuration: {0}")]
    Config(String),
    /// The peer's records could not be processed (bad key, bad record, alert).
    #[error("DTLS: {0}")]
    Protocol(String),
    /// The handshake did not complete in time.
    #[error("DTLS handshake with the gateway did not complete within {0:?}")]
    HandshakeTimeout(Duration),
    /// The gateway closed the session (close_notify).
    #[error("the gateway closed the DTLS session")]
    Closed,
    /// The gateway's certificate was refused.
    #[error("the gateway's certificate is not trusted: {0}")]
    Certificate(String),
}

/// A device's certificate and key, and how it checks the gateway's certificate
/// (`--cert`, `--key`, `--ca`, `--server-name`).
pub struct CertAuth {
    /// The device's certificate (DER).
    certificate: Vec<u8>,
    /// Its private key (DER, PKCS#8 or SEC1).
    private_key: Vec<u8>,
    verifier: Arc<WebPkiServerVerifier>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for CertAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuth")
            .field("certificate", &self.certificate.len())
            .field("private_key", &"<redacted>")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl CertAuth {
    /// The certificate in `cert` (PEM, the first certificate is the device's) with the
    /// key in `key` (PEM: PKCS#8 or SEC1, ECDSA P-256 or P-384), trusting the CA(s) in
    /// `ca` (PEM) or, without it, the system's roots, for a gateway certificate that
    /// names `server_name` (a DNS name or an IP address). Errors name the option.
    pub fn load(cert: &Path, key: &Path, ca: Option<&Path>, server_name: &str) -> Result<CertAuth, String> {
        let pem = std::fs::read(cert).map_err(|e| format!("--cert: cannot read {}: {e}", cert.display()))?;
        let certificate = CertificateDer::pem_slice_iter(&pem)
            .next()
            .ok_or_else(|| format!("--cert: {}: no PEM certificate in it", cert.display()))?
            .map_err(|e| format!("--cert: {}: not a PEM file: {e}", cert.display()))?
            .to_vec();
        let pem = std::fs::read(key).map_err(|e| format!("--key: cannot read {}: {e}", key.display()))?;
        let private_key = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| format!("--key: {}: no PEM private key in it: {e}", key.display()))?
            .secret_der()
            .to_vec();
        // dimpl panics on a key it cannot load when the handshake starts: load it here.
        dimpl::crypto::rust_crypto::default_provider()
            .key_provider
            .load_private_key(&private_key)
            .map_err(|e| format!("--key: {}: not an ECDSA P-256 or P-384 key: {e}", key.display()))?;
        let roots = crate::verifier::load_roots(ca, "--ca", "a certificate without --ca")?;
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| format!("--ca: {e}"))?;
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| format!("--server-name {server_name:?}: not a DNS name or an IP address"))?;
        Ok(CertAuth {
            certificate,
            private_key,
            verifier,
            server_name,
        })
    }

    /// webpki's verdict on the gateway's leaf certificate `der`.
    fn verify(&self, der: &[u8]) -> Result<(), String> {
        self.verifier
            .verify_server_cert(&CertificateDer::from(der), &[], &self.server_name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// How a device proves who it is.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// A pre-shared key.
    Psk(Psk),
    /// A certificate (shared by reference: one file for a tool's whole run).
    Certificate(Arc<CertAuth>),
}

/// How long a handshake may take in all (retransmissions included).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// dimpl checks its crypto provider every time a configuration is built, by running it:
/// a key exchange on every curve and a signature check for every certificate suite, a few
/// milliseconds of CPU, and a fleet builds one configuration per device (the PSK identity
/// is part of it). A PSK device needs none of those algorithms, so its configurations are
/// built on the provider cut down to the PSK suite, whose check costs next to nothing.
fn psk_provider() -> CryptoProvider {
    static PSK_SUITES: OnceLock<&'static [&'static dyn SupportedDtls12CipherSuite]> = OnceLock::new();
    let full = dimpl::crypto::rust_crypto::default_provider();
    let suites = *PSK_SUITES.get_or_init(|| {
        let psk: Vec<&'static dyn SupportedDtls12CipherSuite> = full
            .cipher_suites
            .iter()
            .copied()
            .filter(|cs| cs.suite() == Dtls12CipherSuite::PSK_AES128_CCM_8)
            .collect();
        // Once per process: the provider takes its suites as a static list.
        Box::leak(psk.into_boxed_slice())
    });
    CryptoProvider {
        cipher_suites: suites,
        kx_groups: &[],
        // The check wants one DTLS 1.3 suite to exist; none is offered (see `new`).
        dtls13_cipher_suites: full.dtls13_cipher_suites.get(..1).unwrap_or_default(),
        ..full
    }
}

struct Fixed(Vec<u8>);

impl PskResolver for Fixed {
    fn resolve(&self, _identity: &[u8]) -> Option<Vec<u8>> {
        Some(self.0.clone())
    }
}

/// One device's DTLS client session.
pub struct DtlsClient {
    dtls: Dtls,
    /// With a certificate: how the gateway's is checked.
    cert: Option<Arc<CertAuth>>,
    /// The gateway's certificate passed the check (or none is needed).
    verified: bool,
    /// Why the gateway's certificate was refused.
    refused: Option<String>,
    connected: bool,
    closed: bool,
    transmit: VecDeque<Vec<u8>>,
    received: VecDeque<Vec<u8>>,
    timeout: Option<Instant>,
    buf: Vec<u8>,
}

impl DtlsClient {
    /// A client that starts its handshake at `now` (the ClientHello is in
    /// [`DtlsClient::poll_transmit`]).
    pub fn new(credentials: &Credentials, now: Instant) -> Result<Self, DtlsError> {
        let config_error = |e: dimpl::Error| DtlsError::Config(e.to_string());
        let no_dtls13: &[Dtls13CipherSuite] = &[];
        let (mut dtls, cert) = match credentials {
            Credentials::Psk(psk) => {
                let config = Config::builder()
                    .with_crypto_provider(psk_provider())
                    .with_psk_client(psk.identity.as_bytes().to_vec(), Arc::new(Fixed(psk.key.clone())))
                    .dtls12_cipher_suites(&[Dtls12CipherSuite::PSK_AES128_CCM_8])
                    .dtls13_cipher_suites(no_dtls13)
                    .handshake_timeout(HANDSHAKE_TIMEOUT)
                    .build()
                    .map_err(config_error)?;
                (Dtls::new_12_psk(Arc::new(config), now), None)
            }
            Credentials::Certificate(auth) => {
                let config = Config::builder()
                    .dtls12_cipher_suites(&[
                        Dtls12CipherSuite::ECDHE_ECDSA_AES128_GCM_SHA256,
                        Dtls12CipherSuite::ECDHE_ECDSA_AES256_GCM_SHA384,
                        Dtls12CipherSuite::ECDHE_ECDSA_CHACHA20_POLY1305_SHA256,
                    ])
                    .dtls13_cipher_suites(no_dtls13)
                    .handshake_timeout(HANDSHAKE_TIMEOUT)
                    .build()
                    .map_err(config_error)?;
                let certificate = DtlsCertificate {
                    certificate: auth.certificate.clone(),
                    private_key: auth.private_key.clone(),
                };
                (Dtls::new_12(Arc::new(config), certificate, now), Some(auth.clone()))
            }
        };
        dtls.set_active(true);
        let mut c = DtlsClient {
            dtls,
            verified: cert.is_none(),
            cert,
            refused: None,
            connected: false,
            closed: false,
            transmit: VecDeque::new(),
            received: VecDeque::new(),
            timeout: None,
            buf: vec![0; 2048],
        };
        c.dtls
            .handle_timeout(now)
            .map_err(|e| DtlsError::Protocol(e.to_string()))?;
        c.drain();
        Ok(c)
    }

    /// Whether the handshake has completed (with a certificate: and the gateway's
    /// certificate passed the check).
    pub fn is_connected(&self) -> bool {
        self.connected && self.verified
    }

    /// Whether the gateway closed the session.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Takes one record from the gateway.
    pub fn handle_record(&mut self, now: Instant, record: &[u8]) -> Result<(), DtlsError> {
        let _ = self.dtls.handle_timeout(now);
        let r = self.dtls.handle_packet(record);
        self.drain();
        if let Some(why) = &self.refused {
            return Err(DtlsError::Certificate(why.clone()));
        }
        r.map_err(|e| DtlsError::Protocol(e.to_string()))
    }

    /// Runs the retransmission timer when it is due.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsError> {
        let r = self.dtls.handle_timeout(now);
        self.drain();
        r.map_err(|e| DtlsError::Protocol(e.to_string()))
    }

    /// Queues one datagram (one MQTT-SN message) as a record for the gateway.
    pub fn send(&mut self, data: &[u8]) -> Result<(), DtlsError> {
        if self.closed {
            return Err(DtlsError::Closed);
        }
        if let Some(why) = &self.refused {
            return Err(DtlsError::Certificate(why.clone()));
        }
        let r = self.dtls.send_application_data(data);
        self.drain();
        r.map(|_| ()).map_err(|e| DtlsError::Protocol(e.to_string()))
    }

    /// Sends close_notify (in [`DtlsClient::poll_transmit`]).
    pub fn close(&mut self) {
        let _ = self.dtls.close();
        self.drain();
    }

    /// The next record to send to the gateway.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// The next datagram the gateway sent (decrypted).
    pub fn poll_received(&mut self) -> Option<Vec<u8>> {
        self.received.pop_front()
    }

    /// When [`DtlsClient::handle_timeout`] is next due (during the handshake).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_connected() {
            None
        } else {
            self.timeout
        }
    }

    fn drain(&mut self) {
        loop {
            match self.dtls.poll_output(&mut self.buf) {
                Output::Packet(p) => self.transmit.push_back(p.to_vec()),
                Output::ApplicationData(d) => self.received.push_back(d.to_vec()),
                Output::Connected => self.connected = true,
                Output::CloseNotify => self.closed = true,
                Output::PeerCert(der) => {
                    if let Some(auth) = &self.cert {
                        match auth.verify(der) {
                            Ok(()) => self.verified = true,
                            Err(why) => self.refused = Some(why),
                        }
                    }
                }
                Output::BufferTooSmall { needed } => self.buf.resize(needed, 0),
                Output::Timeout(t) => {
                    self.timeout = Some(t);
                    return;
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_from_hex() {
        let p = Psk::from_hex("dev-1", "00ff10").expect("valid");
        assert_eq!(
            (p.identity.as_str(), p.key.as_slice()),
            ("dev-1", &[0x00, 0xff, 0x10][..])
        );
        assert!(Psk::from_hex("dev-1", "abc").is_err(), "odd length");
        assert!(Psk::from_hex("dev-1", "zz").is_err(), "not hex");
        assert!(Psk::from_hex("", "00").is_err(), "empty identity");
        assert!(!format!("{p:?}").contains("ff"), "the key never shows");
    }

    /// Prints what a PSK client's start costs (its configuration is built per device);
    /// `cargo test --release -p device-sim dtls::tests::start_cost -- --nocapture`.
    #[test]
    fn start_cost() {
        let psk = Psk::from_hex("dev-1", "30313233343536373839616263646566").expect("valid");
        let n = 20;
        let t = Instant::now();
        for _ in 0..n {
            let c = DtlsClient::new(&Credentials::Psk(psk.clone()), Instant::now()).expect("client");
            assert!(!c.is_connected());
        }
        let cut = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            let config = Config::builder()
                .with_psk_client(b"dev-1".to_vec(), Arc::new(Fixed(psk.key.clone())))
                .dtls12_cipher_suites(&[Dtls12CipherSuite::PSK_AES128_CCM_8])
                .dtls13_cipher_suites(&[])
                .build()
                .expect("config");
            assert!(config.psk().is_some());
        }
        println!(
            "a PSK client starts in {cut:?}; a configuration on the full provider takes {:?}",
            t.elapsed() / n
        );
    }

    #[test]
    fn the_handshake_starts_with_a_client_hello() {
        let psk = Psk::from_hex("dev-1", "30313233343536373839616263646566").expect("valid");
        let mut c = DtlsClient::new(&Credentials::Psk(psk), Instant::now()).expect("client");
        let hello = c.poll_transmit().expect("a ClientHello to send");
        // A DTLS 1.2 handshake record: content type 22, version 0xFEFD (or 0xFEFF on the
        // first flight), handshake type 1 (ClientHello) after the 13-octet record header.
        assert_eq!(hello.first(), Some(&22));
        assert_eq!(hello.get(13), Some(&1));
        assert!(!c.is_connected());
        assert!(c.poll_timeout().is_some(), "a retransmission timer runs");
    }
}
