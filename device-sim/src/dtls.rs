//! A device's side of DTLS 1.2 with a pre-shared key (TLS_PSK_WITH_AES_128_CCM_8, the
//! suite of constrained devices, RFC 7925), over the sans-IO `dimpl` engine: records in,
//! records and plaintext datagrams out, time a parameter. The [`crate::station::Station`]
//! runs the handshake and then carries every MQTT-SN datagram as one DTLS record.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dimpl::crypto::Dtls12CipherSuite;
use dimpl::{Config, Dtls, Output, PskResolver};

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
}

/// How long a handshake may take in all (retransmissions included).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

struct Fixed(Vec<u8>);

impl PskResolver for Fixed {
    fn resolve(&self, _identity: &[u8]) -> Option<Vec<u8>> {
        Some(self.0.clone())
    }
}

/// One device's DTLS client session.
pub struct DtlsClient {
    dtls: Dtls,
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
    pub fn new(psk: &Psk, now: Instant) -> Result<Self, DtlsError> {
        let config = Config::builder()
            .with_psk_client(psk.identity.as_bytes().to_vec(), Arc::new(Fixed(psk.key.clone())))
            .dtls12_cipher_suites(&[Dtls12CipherSuite::PSK_AES128_CCM_8])
            .dtls13_cipher_suites(&[])
            .handshake_timeout(HANDSHAKE_TIMEOUT)
            .build()
            .map_err(|e| DtlsError::Config(e.to_string()))?;
        let mut dtls = Dtls::new_12_psk(Arc::new(config), now);
        dtls.set_active(true);
        let mut c = DtlsClient {
            dtls,
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

    /// Whether the handshake has completed.
    pub fn is_connected(&self) -> bool {
        self.connected
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
        if self.connected {
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

    #[test]
    fn the_handshake_starts_with_a_client_hello() {
        let psk = Psk::from_hex("dev-1", "30313233343536373839616263646566").expect("valid");
        let mut c = DtlsClient::new(&psk, Instant::now()).expect("client");
        let hello = c.poll_transmit().expect("a ClientHello to send");
        // A DTLS 1.2 handshake record: content type 22, version 0xFEFD (or 0xFEFF on the
        // first flight), handshake type 1 (ClientHello) after the 13-octet record header.
        assert_eq!(hello.first(), Some(&22));
        assert_eq!(hello.get(13), Some(&1));
        assert!(!c.is_connected());
        assert!(c.poll_timeout().is_some(), "a retransmission timer runs");
    }
}
