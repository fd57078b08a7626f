//! DTLS 1.2 toward devices, sans-IO: [`DtlsServer`] turns the datagrams of one DTLS
//! listener into decrypted MQTT-SN datagrams tagged with the peer's authenticated
//! identity (its PSK identity, or `cert:` and the name of its certificate), and the
//! engine's datagrams back into records. It holds no socket and reads no clock; the
//! runtime feeds it (with the time, monotonic and wall-clock) and sends what it says.
//!
//! The handshake itself is [`dimpl`]'s (one `dimpl::Dtls` per peer): PSK with
//! TLS_PSK_WITH_AES_128_CCM_8, and, on a listener with certificates
//! ([`DtlsServer::with_certificates`]), TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 with a
//! client certificate required. A dimpl server instance does either PSK or certificates,
//! so the suite the ClientHello prefers (the first of the client's list that the
//! listener has) decides which instance is made. What is here is the part around it:
//!
//! - **No state before a cookie** (RFC 6347 4.2.1). A ClientHello from an address with
//!   no session is answered with a HelloVerifyRequest and forgotten. dimpl's own cookie
//!   check lives inside a per-peer instance, so the instance that checks it is made
//!   on the spot and dropped: its random generator is seeded from an HMAC, under a
//!   cookie key, of the client's address and ClientHello random, so the instance
//!   made for the ClientHello that carries the cookie issues and checks the same cookie.
//!   Only when that check passes is the instance kept. The cookie key is replaced every
//!   `cookie_rotation` (in the caller's time); the one before stays accepted until the
//!   next rotation, so a ClientHello whose cookie fails under the current key is tried
//!   under the previous one (a forged cookie costs two instances, not one).
//! - **Bounds**: at most `max_handshakes` handshakes in progress (further ClientHellos
//!   with a valid cookie are dropped and counted), at most `handshake_rate` new
//!   handshakes per second (a token bucket in the caller's time; the cookie exchange
//!   before it stays stateless and unlimited), a handshake deadline, and an idle
//!   timeout after which a session is closed with close_notify.
//!   The cookie does not depend on the kind of instance (it is an HMAC of the client
//!   random under the seeded secret), so the cheap PSK instance answers and checks
//!   every cookie; a certificate instance, whose configuration costs ECDSA and ECDH
//!   self-tests in dimpl, is made only for a ClientHello with a valid cookie and a free
//!   handshake slot.
//! - **Identity**: the PSK identity the client proved (the handshake's Finished
//!   messages verify only with the key of that identity), or the name of a client
//!   certificate that chains to the listener's CA and is valid now (the client proved it
//!   holds its key by its CertificateVerify), tags every datagram. A certificate that is
//!   refused ends the handshake before the server's Finished.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::panic::{RefUnwindSafe, UnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dimpl::crypto::{CryptoProvider, Dtls12CipherSuite, NamedGroup, SupportedDtls12CipherSuite};
use dimpl::{Config, Dtls, DtlsCertificate, Output, PskResolver};
use tracing::debug;

use super::dtls_cert::DtlsCertificates;

/// Where the pre-shared keys come from (the device registry, in the gateway).
pub trait PskSource: Send + Sync + UnwindSafe + RefUnwindSafe {
    /// The key of `identity`, if one is known.
    fn psk(&self, identity: &str) -> Option<Vec<u8>>;
}

/// Limits of one DTLS listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtlsLimits {
    /// Handshakes in progress at once; ClientHellos beyond are dropped.
    pub max_handshakes: usize,
    /// A session not heard from for this long is closed.
    pub idle_timeout: Duration,
    /// A handshake not done within this is abandoned.
    pub handshake_timeout: Duration,
    /// New handshakes per second (ClientHellos with a valid cookie that would start
    /// one); a token bucket holding one second's worth, so bursts up to this many pass
    /// at once. Beyond, the ClientHello is dropped and counted.
    pub handshake_rate: u32,
    /// How often the cookie key is replaced; a cookie stays good until the rotation
    /// after the one following its issue (one to two periods).
    pub cookie_rotation: Duration,
}

impl Default for DtlsLimits {
    fn default() -> Self {
        DtlsLimits {
            max_handshakes: 256,
            idle_timeout: Duration::from_secs(600),
            handshake_timeout: Duration::from_secs(20),
            handshake_rate: 500,
            cookie_rotation: Duration::from_secs(300),
        }
    }
}

/// Counters and gauges of one DTLS listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DtlsCounters {
    /// Handshakes completed.
    pub handshakes_ok: u64,
    /// Handshakes that failed (wrong key, unknown identity, bad messages, timeout).
    pub handshakes_failed: u64,
    /// ClientHellos with a valid cookie dropped because `max_handshakes` were running.
    pub handshakes_busy: u64,
    /// ClientHellos with a valid cookie dropped because `handshake_rate` was exceeded.
    pub handshakes_rate_limited: u64,
    /// HelloVerifyRequests sent (each answers a ClientHello without a valid cookie).
    pub cookies_sent: u64,
    /// Datagrams that are not DTLS records, or records from an address with no session
    /// that are not a ClientHello: never given to the engine.
    pub plaintext_dropped: u64,
    /// Sessions closed for being idle.
    pub idle_closed: u64,
    /// Client certificates refused (another CA, expired or not yet valid, no name for
    /// the identity); each also counts as a failed handshake.
    pub certs_rejected: u64,
    /// Datagrams from the engine for a peer with no session (or another identity),
    /// not sent.
    pub unsent: u64,
    /// Sessions held now (established or handshaking).
    pub sessions: u64,
    /// Of those, handshakes in progress.
    pub handshaking: u64,
}

impl DtlsCounters {
    /// Adds `other` to these counters (to total several listeners).
    pub fn add(&mut self, other: &DtlsCounters) {
        self.handshakes_ok += other.handshakes_ok;
        self.handshakes_failed += other.handshakes_failed;
        self.handshakes_busy += other.handshakes_busy;
        self.handshakes_rate_limited += other.handshakes_rate_limited;
        self.cookies_sent += other.cookies_sent;
        self.plaintext_dropped += other.plaintext_dropped;
        self.idle_closed += other.idle_closed;
        self.certs_rejected += other.certs_rejected;
        self.unsent += other.unsent;
        self.sessions += other.sessions;
        self.handshaking += other.handshaking;
    }
}

/// What the server asks of its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DtlsOutput {
    /// Send this record datagram to `to`.
    Transmit {
        /// The peer.
        to: SocketAddr,
        /// One UDP datagram.
        data: Vec<u8>,
    },
    /// A decrypted datagram from an authenticated peer.
    Receive {
        /// The peer.
        from: SocketAddr,
        /// The identity it proved in the handshake: its PSK identity, or
        /// [`super::dtls_cert::CERT_IDENTITY_PREFIX`] and its certificate's name.
        identity: Arc<str>,
        /// The plaintext (one MQTT-SN message).
        data: Vec<u8>,
    },
}

/// Error building the DTLS configuration.
#[derive(Debug, thiserror::Error)]
#[error("DTLS configuration: {0}")]
pub struct DtlsConfigError(String);

/// Handshake record content type.
const HANDSHAKE: u8 = 22;
/// Handshake message type of ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Handshake message type of HelloVerifyRequest.
const HELLO_VERIFY_REQUEST: u8 = 3;
/// DTLS record header length.
const RECORD_HEADER: usize = 13;
/// DTLS handshake header length.
const HANDSHAKE_HEADER: usize = 12;
/// Octets a handshake may bring (every datagram of it); beyond, it is abandoned. A
/// certificate flight is a few kilobytes; this also bounds the certificate dimpl copies
/// into the output buffer (which must hold it: see [`DtlsServer::buf`]).
const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;
/// TLS_PSK_WITH_AES_128_CCM_8.
const SUITE_PSK: [u8; 2] = [0xC0, 0xA8];
/// TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256.
const SUITE_ECDSA: [u8; 2] = [0xC0, 0x2B];

/// The parts of an unfragmented ClientHello in the first record of a datagram.
struct ClientHello<'a> {
    record_version: [u8; 2],
    message_seq: u16,
    random: &'a [u8],
    /// Everything of the body before the cookie (version, random, session id).
    before_cookie: &'a [u8],
    /// Everything of the body after the cookie (suites, compression, extensions).
    after_cookie: &'a [u8],
}

/// How a session authenticates its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    Psk,
    Certificate,
}

fn u24(b: &[u8]) -> usize {
    b.iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x))
}

impl<'a> ClientHello<'a> {
    fn parse(datagram: &'a [u8]) -> Option<Self> {
        let header = datagram.get(..RECORD_HEADER)?;
        // Epoch 0 only: a ClientHello is never encrypted.
        if header[0] != HANDSHAKE || header[3..5] != [0, 0] {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([header[11], header[12]]));
        let record = datagram.get(RECORD_HEADER..RECORD_HEADER + len)?;
        let hs = record.get(..HANDSHAKE_HEADER)?;
        if hs[0] != CLIENT_HELLO {
            return None;
        }
        let length = u24(&hs[1..4]);
        // Unfragmented only (a PSK ClientHello is small).
        if u24(&hs[6..9]) != 0 || u24(&hs[9..12]) != length {
            return None;
        }
        let body = record.get(HANDSHAKE_HEADER..HANDSHAKE_HEADER + length)?;
        let random = body.get(2..34)?;
        let sid_len = usize::from(*body.get(34)?);
        let cookie_at = 35 + sid_len;
        let cookie_len = usize::from(*body.get(cookie_at)?);
        let after = cookie_at + 1 + cookie_len;
        Some(ClientHello {
            record_version: [header[1], header[2]],
            message_seq: u16::from_be_bytes([hs[4], hs[5]]),
            random,
            before_cookie: body.get(..cookie_at)?,
            after_cookie: body.get(after..)?,
        })
    }

    /// Whether the client prefers the certificate suite to the PSK one (the first of
    /// its list that is either); a ClientHello with neither is given to the PSK
    /// instance, which refuses it.
    fn prefers_certificate(&self) -> bool {
        let Some(len) = self.after_cookie.get(..2) else {
            return false;
        };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let suites = self.after_cookie.get(2..2 + len).unwrap_or_default();
        suites
            .chunks_exact(2)
            .find(|s| *s == SUITE_PSK || *s == SUITE_ECDSA)
            .is_some_and(|s| s == SUITE_ECDSA)
    }

    /// The same ClientHello as first sent: message_seq 0 and no cookie (what the
    /// client sent before our HelloVerifyRequest, up to the cookie).
    fn without_cookie(&self) -> Vec<u8> {
        let body_len = self.before_cookie.len() + 1 + self.after_cookie.len();
        let record_len = HANDSHAKE_HEADER + body_len;
        let mut out = Vec::with_capacity(RECORD_HEADER + record_len);
        out.push(HANDSHAKE);
        out.extend_from_slice(&self.record_version);
        out.extend_from_slice(&[0; 8]); // epoch 0, sequence number 0
        out.extend_from_slice(&u16::try_from(record_len).unwrap_or(u16::MAX).to_be_bytes());
        let l = u32::try_from(body_len).unwrap_or(0).to_be_bytes();
        out.push(CLIENT_HELLO);
        out.extend_from_slice(&l[1..]);
        out.extend_from_slice(&[0, 0, 0, 0, 0]); // message_seq 0, fragment_offset 0
        out.extend_from_slice(&l[1..]);
        out.extend_from_slice(self.before_cookie);
        out.push(0);
        out.extend_from_slice(self.after_cookie);
        out
    }
}

/// Whether `datagram` starts like a DTLS 1.x record (content type 20 to 25, version
/// 254.x).
fn looks_like_record(datagram: &[u8]) -> bool {
    datagram.len() >= RECORD_HEADER && (20..=25).contains(&datagram[0]) && datagram[1] == 254
}

/// dimpl's RustCrypto provider cut down to TLS_PSK_WITH_AES_128_CCM_8: no key exchange
/// groups, one DTLS 1.3 suite (not offered). Building a [`Config`] checks every part of its provider
/// (with ECDSA verifications and key exchanges for the full provider); a configuration
/// is built for each ClientHello, so that check must be cheap.
fn psk_provider() -> &'static CryptoProvider {
    static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        let full = dimpl::crypto::rust_crypto::default_provider();
        let psk: Vec<&'static dyn SupportedDtls12CipherSuite> = full
            .cipher_suites
            .iter()
            .copied()
            .filter(|cs| cs.suite() == Dtls12CipherSuite::PSK_AES128_CCM_8)
            .collect();
        CryptoProvider {
            // Made once per process.
            cipher_suites: Vec::leak(psk),
            kx_groups: &[],
            // dimpl insists on one; the configuration disables DTLS 1.3.
            dtls13_cipher_suites: full.dtls13_cipher_suites.get(..1).unwrap_or_default(),
            ..full
        }
    })
}

/// dimpl's RustCrypto provider cut down to TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 with
/// P-256 (the RFC 7925 certificate profile but for GCM instead of CCM_8, which dimpl
/// lacks): building a [`Config`] verifies one ECDSA signature and runs one ECDH per
/// group of its provider, so the fewer the cheaper.
fn cert_provider() -> &'static CryptoProvider {
    static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        let full = dimpl::crypto::rust_crypto::default_provider();
        let suites: Vec<&'static dyn SupportedDtls12CipherSuite> = full
            .cipher_suites
            .iter()
            .copied()
            .filter(|cs| cs.suite() == Dtls12CipherSuite::ECDHE_ECDSA_AES128_GCM_SHA256)
            .collect();
        let groups: Vec<_> = full
            .kx_groups
            .iter()
            .copied()
            .filter(|kx| kx.name() == NamedGroup::Secp256r1)
            .collect();
        CryptoProvider {
            // Made once per process.
            cipher_suites: Vec::leak(suites),
            kx_groups: Vec::leak(groups),
            dtls13_cipher_suites: full.dtls13_cipher_suites.get(..1).unwrap_or_default(),
            ..full
        }
    })
}

/// A token bucket for new handshakes, in virtual time (the caller's `now`). Tokens are
/// counted in billionths, so that a refill of `rate` per second is exact per nanosecond.
#[derive(Debug)]
struct TokenBucket {
    /// Tokens per second, and also the most the bucket holds.
    rate: u32,
    /// Billionths of a token held.
    credit: u128,
    /// When `credit` was last brought up to date; `None` until the first take (full).
    last: Option<Instant>,
}

/// One token, in the bucket's units.
const TOKEN: u128 = 1_000_000_000;

impl TokenBucket {
    fn new(rate: u32) -> Self {
        TokenBucket {
            rate,
            credit: 0,
            last: None,
        }
    }

    /// Takes one token at `now`, if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let cap = u128::from(self.rate.max(1)) * TOKEN;
        self.credit = match self.last {
            None => cap,
            Some(last) => {
                let elapsed = now.saturating_duration_since(last).as_nanos();
                self.credit
                    .saturating_add(elapsed.saturating_mul(u128::from(self.rate)))
                    .min(cap)
            }
        };
        // A `now` earlier than the last one (it should not happen) refills nothing.
        self.last = Some(self.last.map_or(now, |last| last.max(now)));
        if self.credit >= TOKEN {
            self.credit -= TOKEN;
            true
        } else {
            false
        }
    }
}

/// The cookie keys: the current one, which issues cookies, and the one before it, whose
/// cookies are still accepted, so that a handshake that got its cookie just before a
/// rotation completes. Rotated in the caller's time, at the first datagram after a
/// period has passed; after two periods without a datagram, the old key is dropped too.
struct CookieKeys {
    period: Duration,
    current: ring::hmac::Key,
    previous: Option<ring::hmac::Key>,
    /// When `current` began; `None` until the first datagram.
    since: Option<Instant>,
    rng: ring::rand::SystemRandom,
}

impl CookieKeys {
    fn new(period: Duration) -> Option<Self> {
        let rng = ring::rand::SystemRandom::new();
        Some(CookieKeys {
            period,
            current: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).ok()?,
            previous: None,
            since: None,
            rng,
        })
    }

    /// Rotates the keys if a period has passed at `now`.
    fn rotate(&mut self, now: Instant) {
        let Some(since) = self.since else {
            self.since = Some(now);
            return;
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed < self.period {
            return;
        }
        let Ok(fresh) = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &self.rng) else {
            // Keep the keys rather than stop answering; tried again at the next datagram.
            debug!("no random source for a new DTLS cookie key; the old one stays");
            return;
        };
        let old = std::mem::replace(&mut self.current, fresh);
        // A cookie of `old` was issued at least two periods ago: no longer good.
        self.previous = (elapsed < self.period.saturating_mul(2)).then_some(old);
        self.since = Some(now);
    }

    /// The keys whose cookies are accepted, the current one first.
    fn valid(&self) -> impl Iterator<Item = &ring::hmac::Key> {
        std::iter::once(&self.current).chain(self.previous.as_ref())
    }
}

/// The seed of the dimpl instance for the ClientHello with `random` from `from`, under
/// a cookie key (see the module documentation).
fn seed(key: &ring::hmac::Key, from: SocketAddr, random: &[u8]) -> u64 {
    let mut ctx = ring::hmac::Context::with_key(key);
    ctx.update(from.to_string().as_bytes());
    ctx.update(random);
    let tag = ctx.sign();
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&tag.as_ref()[..8]);
    u64::from_be_bytes(seed)
}

/// The resolver given to one handshake: it looks keys up in the source and remembers
/// the identity asked for, which is the peer's proven identity once the handshake
/// completes.
struct Recorder {
    source: Arc<dyn PskSource>,
    asked: Mutex<Option<Arc<str>>>,
}

impl PskResolver for Recorder {
    fn resolve(&self, identity: &[u8]) -> Option<Vec<u8>> {
        let identity = std::str::from_utf8(identity).ok()?;
        let key = self.source.psk(identity)?;
        *self.asked.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::from(identity));
        Some(key)
    }
}

struct Session {
    dtls: Dtls,
    auth: Auth,
    recorder: Arc<Recorder>,
    /// Set when the handshake completes.
    identity: Option<Arc<str>>,
    /// The identity of the client certificate, once verified (certificate sessions).
    cert_identity: Option<Arc<str>>,
    /// Octets received while handshaking.
    handshake_bytes: usize,
    /// The ClientHello random of its handshake (a late copy of it is not a new one).
    random: Vec<u8>,
    last_heard: Instant,
    started: Instant,
    /// dimpl's next timer.
    timer: Option<Instant>,
    /// Its deadline as filed in [`DtlsServer::timers`] (set by [`DtlsServer::put`]).
    queued: Instant,
}

/// The DTLS side of one listener (see the module documentation).
pub struct DtlsServer {
    limits: DtlsLimits,
    source: Arc<dyn PskSource>,
    certs: Option<Arc<DtlsCertificates>>,
    /// The wall-clock time of the last datagram (certificates are valid in wall time).
    wall: SystemTime,
    cookie_keys: CookieKeys,
    /// Only through [`DtlsServer::put`] and [`DtlsServer::take`], which keep `timers`
    /// and `handshaking` in step with it.
    sessions: HashMap<SocketAddr, Session>,
    /// Every session's deadline and address, ordered: the next deadline, and those due,
    /// in O(log n) (the runtime asks for the next one at every turn of its loop).
    timers: BTreeSet<(Instant, SocketAddr)>,
    /// Sessions still handshaking.
    handshaking: usize,
    /// New handshakes per second (`handshake_rate`).
    bucket: TokenBucket,
    out: VecDeque<DtlsOutput>,
    counters: DtlsCounters,
    /// dimpl's output buffer. With certificates it holds [`MAX_HANDSHAKE_BYTES`]: dimpl
    /// copies the client's certificate into it in one piece and panics when it does not
    /// fit, and a certificate is never longer than the handshake that brought it.
    buf: Vec<u8>,
}

impl std::fmt::Debug for DtlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsServer")
            .field("limits", &self.limits)
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

/// What one drain of a dimpl instance saw.
#[derive(Default)]
struct Drained {
    connected: bool,
    closed: bool,
    hello_verify: bool,
    /// The client's leaf certificate (DER), when the drain saw it.
    peer_cert: Option<Vec<u8>>,
}

impl DtlsServer {
    /// A server taking keys from `source`, with a fresh random cookie key.
    pub fn new(limits: DtlsLimits, source: Arc<dyn PskSource>) -> Result<Self, DtlsConfigError> {
        let cookie_keys = CookieKeys::new(limits.cookie_rotation)
            .ok_or_else(|| DtlsConfigError("no random source for the cookie key".into()))?;
        let server = DtlsServer {
            limits,
            source,
            certs: None,
            wall: UNIX_EPOCH,
            cookie_keys,
            sessions: HashMap::new(),
            timers: BTreeSet::new(),
            handshaking: 0,
            bucket: TokenBucket::new(limits.handshake_rate),
            out: VecDeque::new(),
            counters: DtlsCounters::default(),
            buf: vec![0; 2048],
        };
        // Fail at start, not at the first handshake.
        server.config(0)?;
        Ok(server)
    }

    /// Gives the listener its certificates (or none: PSK only): the certificate suite
    /// is offered beside the PSK one, with a client certificate required.
    pub fn with_certificates(mut self, certs: Option<Arc<DtlsCertificates>>) -> Result<Self, DtlsConfigError> {
        self.certs = certs;
        if self.certs.is_some() {
            self.buf.resize(MAX_HANDSHAKE_BYTES, 0);
            // Fail at start, not at the first handshake.
            self.cert_config(0)?;
        }
        Ok(self)
    }

    /// Replaces the certificates (a SIGHUP reload read the files again): handshakes
    /// that start or finish afterwards present the new server certificate and verify
    /// against the new device CA; sessions already established keep going. Returns
    /// whether they changed. A listener without certificates keeps none (turning them
    /// on or off changes `[[dtls]]`, which needs a restart).
    pub fn set_certificates(&mut self, certs: Arc<DtlsCertificates>) -> bool {
        match &self.certs {
            Some(old) if **old != *certs => {
                self.certs = Some(certs);
                true
            }
            _ => false,
        }
    }

    /// Replaces the key source; handshakes started afterwards use it, sessions already
    /// established keep going.
    pub fn set_source(&mut self, source: Arc<dyn PskSource>) {
        self.source = source;
    }

    /// The counters, with the gauges as of now.
    pub fn counters(&self) -> DtlsCounters {
        let mut c = self.counters;
        c.sessions = self.sessions.len() as u64;
        c.handshaking = self.handshaking as u64;
        c
    }

    /// The authenticated identity of the session at `peer`, if it is established.
    pub fn identity(&self, peer: &SocketAddr) -> Option<&Arc<str>> {
        self.sessions.get(peer).and_then(|s| s.identity.as_ref())
    }

    /// The next queued output.
    pub fn poll_output(&mut self) -> Option<DtlsOutput> {
        self.out.pop_front()
    }

    /// When [`DtlsServer::handle_timeout`] is next needed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    fn deadline(&self, s: &Session) -> Instant {
        let limit = match s.identity {
            Some(_) => s.last_heard + self.limits.idle_timeout,
            None => s.started + self.limits.handshake_timeout,
        };
        s.timer.map_or(limit, |t| t.min(limit))
    }

    /// Files `session` at `peer` (replacing any there) with its deadline.
    fn put(&mut self, peer: SocketAddr, mut session: Session) {
        self.take(peer);
        session.queued = self.deadline(&session);
        self.timers.insert((session.queued, peer));
        if session.identity.is_none() {
            self.handshaking += 1;
        }
        self.sessions.insert(peer, session);
    }

    /// Removes the session at `peer` (with its deadline); the caller puts it back
    /// after changing it, or drops it.
    fn take(&mut self, peer: SocketAddr) -> Option<Session> {
        let session = self.sessions.remove(&peer)?;
        self.timers.remove(&(session.queued, peer));
        if session.identity.is_none() {
            self.handshaking = self.handshaking.saturating_sub(1);
        }
        Some(session)
    }

    fn config(&self, seed: u64) -> Result<(Arc<Config>, Arc<Recorder>), DtlsConfigError> {
        let recorder = Arc::new(Recorder {
            source: self.source.clone(),
            asked: Mutex::new(None),
        });
        let config = Config::builder()
            .with_crypto_provider(psk_provider().clone())
            .with_psk_server(None, recorder.clone())
            .dtls12_cipher_suites(&[Dtls12CipherSuite::PSK_AES128_CCM_8])
            .dtls13_cipher_suites(&[])
            .handshake_timeout(self.limits.handshake_timeout)
            // The only thing this seed makes repeatable is the instance's cookie
            // secret and randoms for one (address, ClientHello random) pair; it is an
            // HMAC under a key nobody else knows. See the module documentation.
            .dangerously_set_rng_seed(seed)
            .build()
            .map_err(|e| DtlsConfigError(e.to_string()))?;
        Ok((Arc::new(config), recorder))
    }

    /// The configuration of a certificate instance (see [`DtlsServer::config`] for the
    /// seed). The same timing settings as the PSK one: the instance's cookie secret is
    /// drawn after its timers, so equal settings give the PSK instance's cookie.
    fn cert_config(&self, seed: u64) -> Result<Arc<Config>, DtlsConfigError> {
        let config = Config::builder()
            .with_crypto_provider(cert_provider().clone())
            .dtls12_cipher_suites(&[Dtls12CipherSuite::ECDHE_ECDSA_AES128_GCM_SHA256])
            .dtls13_cipher_suites(&[])
            .require_client_certificate(true)
            .handshake_timeout(self.limits.handshake_timeout)
            .dangerously_set_rng_seed(seed)
            .build()
            .map_err(|e| DtlsConfigError(e.to_string()))?;
        Ok(Arc::new(config))
    }

    /// Feeds one datagram received from `from`; `now` is the monotonic time, `wall` the
    /// wall-clock time (what certificate validity is checked against).
    pub fn handle_datagram(&mut self, now: Instant, wall: SystemTime, from: SocketAddr, data: &[u8]) {
        self.wall = wall;
        self.cookie_keys.rotate(now);
        if !looks_like_record(data) {
            self.counters.plaintext_dropped += 1;
            debug!(peer = %from, len = data.len(), "non-DTLS datagram on a DTLS listener dropped");
            return;
        }
        if let Some(hello) = ClientHello::parse(data) {
            let known = self.sessions.get(&from).is_some_and(|s| s.random == hello.random);
            if !known {
                self.new_hello(now, from, &hello, data);
                return;
            }
        }
        let Some(mut session) = self.take(from) else {
            self.counters.plaintext_dropped += 1;
            debug!(peer = %from, "DTLS record from an address without a session dropped");
            return;
        };
        session.last_heard = now;
        if session.identity.is_none() {
            session.handshake_bytes += data.len();
            if session.handshake_bytes > MAX_HANDSHAKE_BYTES {
                self.counters.handshakes_failed += 1;
                debug!(peer = %from, "DTLS handshake abandoned: too many octets");
                return;
            }
        }
        let result = session
            .dtls
            .handle_timeout(now)
            .and_then(|()| session.dtls.handle_packet(data));
        self.after_input(now, from, session, result);
    }

    /// A ClientHello from an address without a session of that hello: answered with a
    /// HelloVerifyRequest unless it carries a valid cookie, in which case a session is
    /// started (replacing any older one at that address).
    fn new_hello(&mut self, now: Instant, from: SocketAddr, hello: &ClientHello<'_>, data: &[u8]) {
        if hello.message_seq == 0 {
            // A first ClientHello: the instance of the current key answers with a
            // HelloVerifyRequest, which is sent, and the instance is dropped.
            let seed = seed(&self.cookie_keys.current, from, hello.random);
            let Ok((config, _)) = self.config(seed) else {
                return;
            };
            let mut dtls = Dtls::new_12_psk(config, now);
            let mut scratch = VecDeque::new();
            let _ = dtls.handle_timeout(now).and_then(|()| dtls.handle_packet(data));
            let seen = drain(&mut dtls, &mut self.buf, from, &mut scratch);
            if seen.hello_verify {
                self.counters.cookies_sent += 1;
                self.out.extend(scratch);
            }
            return;
        }
        // The ClientHello after our HelloVerifyRequest: the instance is brought to the
        // same point (the first ClientHello rebuilt, its answer discarded), then checks
        // the cookie.
        let auth = match &self.certs {
            Some(_) if hello.prefers_certificate() => Auth::Certificate,
            _ => Auth::Psk,
        };
        let first = hello.without_cookie();
        // The instance of each key still valid, the current one first, until one finds
        // the cookie good (a cookie issued before the last rotation is the previous
        // key's).
        let mut answer: Option<VecDeque<DtlsOutput>> = None;
        let mut checked = None;
        for key in self.cookie_keys.valid() {
            let seed = seed(key, from, hello.random);
            let Ok((config, recorder)) = self.config(seed) else {
                return;
            };
            let mut dtls = Dtls::new_12_psk(config, now);
            let result = prime(&mut dtls, now, &first, data, &mut self.buf, from);
            let mut session = Session {
                dtls,
                auth: Auth::Psk,
                recorder,
                identity: None,
                cert_identity: None,
                handshake_bytes: data.len(),
                random: hello.random.to_vec(),
                last_heard: now,
                started: now,
                timer: None,
                queued: now,
            };
            let mut scratch = VecDeque::new();
            let mut app = Vec::new();
            let seen = drain_session(&mut session, &mut self.buf, from, &mut scratch, &mut app);
            if !seen.hello_verify {
                checked = Some((seed, session, result, scratch, app));
                break;
            }
            // Answered with a new cookie: the current key's answer is the one sent.
            answer.get_or_insert(scratch);
        }
        let Some((seed, mut session, result, mut scratch, mut app)) = checked else {
            // No valid cookie: answered again, and nothing kept.
            if let Some(answer) = answer {
                self.counters.cookies_sent += 1;
                self.out.extend(answer);
            }
            return;
        };
        // A valid cookie and a ClientHello for certificates: the PSK instance finds no
        // suite it has, which is expected; any other error is the client's.
        let no_psk_suite = matches!(
            result,
            Err(dimpl::Error::SecurityError(
                dimpl::SecurityError::NoMutuallyAcceptableCipherSuite
            ))
        );
        if result.is_err() && !(auth == Auth::Certificate && no_psk_suite) {
            self.counters.handshakes_failed += 1;
            return;
        }
        if self.handshaking >= self.limits.max_handshakes {
            self.counters.handshakes_busy += 1;
            debug!(peer = %from, "DTLS handshake refused: max_handshakes in progress");
            return;
        }
        // After the cookie (which proves the address and is stateless and unlimited)
        // and before any handshake work: the expensive part is what is rationed.
        if !self.bucket.take(now) {
            self.counters.handshakes_rate_limited += 1;
            debug!(peer = %from, "DTLS handshake refused: handshake_rate exceeded");
            return;
        }
        if auth == Auth::Certificate {
            // The cookie is good: now the certificate instance, brought to the same point.
            let Some(certs) = self.certs.clone() else {
                return;
            };
            let Ok(config) = self.cert_config(seed) else {
                self.counters.handshakes_failed += 1;
                return;
            };
            let certificate = DtlsCertificate {
                certificate: certs.certificate.clone(),
                private_key: certs.private_key.clone(),
            };
            session.dtls = Dtls::new_12(config, certificate, now);
            session.auth = Auth::Certificate;
            let result = prime(&mut session.dtls, now, &first, data, &mut self.buf, from);
            scratch.clear();
            let seen = drain_session(&mut session, &mut self.buf, from, &mut scratch, &mut app);
            if result.is_err() || seen.hello_verify {
                self.counters.handshakes_failed += 1;
                debug!(peer = %from, error = ?result.err(), "DTLS certificate handshake refused at its ClientHello");
                return;
            }
        }
        // A valid cookie proves the address: a new handshake from it replaces the old
        // session (a device that restarted).
        self.take(from);
        self.out.extend(scratch);
        self.put(from, session);
    }

    /// Drains a session after input or a timer, and keeps, upgrades or drops it.
    fn after_input(&mut self, now: Instant, from: SocketAddr, mut session: Session, result: Result<(), dimpl::Error>) {
        let mut out = VecDeque::new();
        let was_established = session.identity.is_some();
        let mut app = Vec::new();
        let seen = drain_session(&mut session, &mut self.buf, from, &mut out, &mut app);
        if let Some(leaf) = &seen.peer_cert {
            let verdict = match (&self.certs, session.auth) {
                (Some(certs), Auth::Certificate) => certs.verify(leaf, self.wall),
                _ => Err(super::dtls_cert::CertRefusal::Invalid("no certificate expected".into())),
            };
            match verdict {
                Ok(identity) => session.cert_identity = Some(identity),
                Err(e) => {
                    // Nothing of this drain is sent (not the server's Finished), nothing kept.
                    self.counters.certs_rejected += 1;
                    self.counters.handshakes_failed += 1;
                    debug!(peer = %from, error = %e, "DTLS client certificate refused");
                    return;
                }
            }
        }
        self.out.extend(out);
        if seen.connected && session.identity.is_none() {
            let identity = match session.auth {
                Auth::Psk => session.recorder.asked.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                Auth::Certificate => session.cert_identity.clone(),
            };
            match identity {
                Some(identity) => {
                    self.counters.handshakes_ok += 1;
                    debug!(peer = %from, identity = %identity, "DTLS session established");
                    session.identity = Some(identity);
                    session.last_heard = now;
                }
                None => {
                    self.counters.handshakes_failed += 1;
                    return;
                }
            }
        }
        if let Some(identity) = &session.identity {
            for data in app {
                self.out.push_back(DtlsOutput::Receive {
                    from,
                    identity: identity.clone(),
                    data,
                });
            }
        }
        if let Err(e) = result {
            debug!(peer = %from, error = %e, "DTLS session ended");
            if !was_established && session.identity.is_none() {
                self.counters.handshakes_failed += 1;
            }
            return;
        }
        if seen.closed || session.dtls.is_closed() {
            debug!(peer = %from, "DTLS session closed by the peer");
            return;
        }
        self.put(from, session);
    }

    /// Handles timers: retransmissions, handshake deadlines, idle sessions.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<SocketAddr> = self
            .timers
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, a)| *a)
            .collect();
        for addr in due {
            let Some(mut session) = self.take(addr) else {
                continue;
            };
            match &session.identity {
                Some(_) if session.last_heard + self.limits.idle_timeout <= now => {
                    self.counters.idle_closed += 1;
                    debug!(peer = %addr, "idle DTLS session closed");
                    self.close_session(addr, session);
                }
                None if session.started + self.limits.handshake_timeout <= now => {
                    self.counters.handshakes_failed += 1;
                    debug!(peer = %addr, "DTLS handshake timed out");
                }
                _ => {
                    let result = session.dtls.handle_timeout(now);
                    self.after_input(now, addr, session, result);
                }
            }
        }
    }

    /// Encrypts `data` for the session at `to`, if it is established with `identity`.
    pub fn send(&mut self, now: Instant, to: SocketAddr, identity: &str, data: &[u8]) {
        let Some(mut session) = self.take(to) else {
            self.counters.unsent += 1;
            return;
        };
        if session.identity.as_deref() != Some(identity) {
            self.counters.unsent += 1;
            self.put(to, session);
            return;
        }
        let result = session
            .dtls
            .handle_timeout(now)
            .and_then(|()| session.dtls.send_application_data(data).map(|_| ()));
        self.after_input(now, to, session, result);
    }

    /// Closes the session at `peer` with close_notify (DISCONNECT, shutdown).
    pub fn close(&mut self, peer: SocketAddr) {
        if let Some(session) = self.take(peer) {
            self.close_session(peer, session);
        }
    }

    /// Closes every session with close_notify.
    pub fn close_all(&mut self) {
        let peers: Vec<SocketAddr> = self.sessions.keys().copied().collect();
        for peer in peers {
            self.close(peer);
        }
    }

    fn close_session(&mut self, peer: SocketAddr, mut session: Session) {
        if session.dtls.close().is_ok() {
            let mut out = VecDeque::new();
            let _ = drain(&mut session.dtls, &mut self.buf, peer, &mut out);
            self.out.extend(out);
        }
    }
}

/// Feeds an instance the ClientHello as first sent (`first`, its answer discarded), then
/// the one that carries the cookie (`data`).
fn prime(
    dtls: &mut Dtls,
    now: Instant,
    first: &[u8],
    data: &[u8],
    buf: &mut Vec<u8>,
    from: SocketAddr,
) -> Result<(), dimpl::Error> {
    let primed = dtls.handle_timeout(now).and_then(|()| dtls.handle_packet(first));
    let _ = drain(dtls, buf, from, &mut VecDeque::new());
    primed.and_then(|()| dtls.handle_packet(data))
}

fn drain(dtls: &mut Dtls, buf: &mut Vec<u8>, to: SocketAddr, out: &mut VecDeque<DtlsOutput>) -> Drained {
    let mut ignored = Vec::new();
    let mut timer = None;
    drain_into(dtls, buf, to, out, &mut ignored, &mut timer)
}

fn drain_session(
    session: &mut Session,
    buf: &mut Vec<u8>,
    to: SocketAddr,
    out: &mut VecDeque<DtlsOutput>,
    app: &mut Vec<Vec<u8>>,
) -> Drained {
    let mut timer = None;
    let seen = drain_into(&mut session.dtls, buf, to, out, app, &mut timer);
    session.timer = timer;
    seen
}

fn drain_into(
    dtls: &mut Dtls,
    buf: &mut Vec<u8>,
    to: SocketAddr,
    out: &mut VecDeque<DtlsOutput>,
    app: &mut Vec<Vec<u8>>,
    timer: &mut Option<Instant>,
) -> Drained {
    let mut seen = Drained::default();
    // Bounded: dimpl ends every poll cycle with a timeout; this only guards against a
    // cycle that would not.
    for _ in 0..1024 {
        match dtls.poll_output(buf) {
            Output::Packet(p) => {
                if p.len() > RECORD_HEADER && p[0] == HANDSHAKE && p[RECORD_HEADER] == HELLO_VERIFY_REQUEST {
                    seen.hello_verify = true;
                }
                out.push_back(DtlsOutput::Transmit { to, data: p.to_vec() });
            }
            Output::BufferTooSmall { needed } => buf.resize(needed, 0),
            Output::Timeout(t) => {
                *timer = Some(t);
                break;
            }
            Output::Connected => seen.connected = true,
            Output::ApplicationData(d) => app.push(d.to_vec()),
            Output::CloseNotify => seen.closed = true,
            Output::PeerCert(der) => seen.peer_cert = Some(der.to_vec()),
            _ => {}
        }
    }
    seen
}

#[cfg(test)]
#[path = "dtls_tests.rs"]
mod tests;
