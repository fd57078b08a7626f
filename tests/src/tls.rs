//! TLS for the end-to-end tests: a certificate authority, a server certificate for
//! 127.0.0.1 (an IP subjectAltName) and a client certificate, made with the `openssl`
//! command in a temporary directory; mosquitto with a TLS listener on them; and an MQTT
//! observer that connects over TLS.
//!
//! openssl rather than a certificate crate: it is on every machine that has mosquitto
//! (Debian's mosquitto links libssl, and `openssl` is in the base system), and the test
//! builds nothing more. Missing tools are a failure under `CI=true`, otherwise a loud
//! note and `None` (the test returns early), as for mosquitto itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::broker::mqtt::BrokerConfig;
use gateway::broker::tls::{BrokerTls, TlsFiles};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{BrokerMsg, Mosquitto, WAIT};

static UNIQUE: AtomicU32 = AtomicU32::new(0);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn missing<T>(what: &str) -> Option<T> {
    if in_ci() {
        panic!("{what} is not installed: the TLS end-to-end tests need it under CI=true");
    }
    eprintln!(
        "\n**********************************************************************\n\
         NOTE: {what} not found. This TLS end-to-end test was NOT RUN.\n\
         **********************************************************************\n"
    );
    None
}

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .chain(
            ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"]
                .into_iter()
                .flat_map(|dir| names.iter().map(move |n| Path::new(dir).join(n))),
        )
        .find(|p| p.is_file())
}

/// Certificates for one test, in a temporary directory removed on drop.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    /// The CA's certificate (PEM): what `broker.ca_file` names.
    pub ca: PathBuf,
    /// The broker's certificate, signed by the CA, for IP address 127.0.0.1 only.
    pub server_cert: PathBuf,
    /// Its private key.
    pub server_key: PathBuf,
    /// A client certificate signed by the CA (for `require_certificate`).
    pub client_cert: PathBuf,
    /// Its private key.
    pub client_key: PathBuf,
    /// Another CA, which signed nothing here: trusting it alone, nothing verifies.
    pub other_ca: PathBuf,
    /// A client certificate signed by the other CA (the broker does not accept it).
    pub other_client_cert: PathBuf,
    /// Its private key.
    pub other_client_key: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs openssl with `args` in `dir`; panics with its output when it fails.
fn openssl(bin: &Path, dir: &Path, args: &[&str]) {
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `openssl` command, for tests that make certificates of their own.
pub struct Openssl(PathBuf);

impl Openssl {
    /// The command on PATH; `None` (and a loud note) when it is missing outside CI, a
    /// failure under `CI=true`.
    pub fn find() -> Option<Openssl> {
        match find(&["openssl"]) {
            Some(bin) => Some(Openssl(bin)),
            None => missing("openssl"),
        }
    }

    /// In `dir`: a P-256 CA certificate `name.pem` with key `name.key`.
    pub fn ca(&self, dir: &Path, name: &str) {
        make_ca(&self.0, dir, name);
    }

    /// In `dir`: `name.pem` / `name.key`, a P-256 certificate for CN `cn` signed by CA
    /// `ca` (in `dir`), valid for `days` days from now (negative: expired already), with
    /// the X.509 v3 extensions `ext` (openssl extension-file lines).
    pub fn leaf(&self, dir: &Path, name: &str, cn: &str, ca: &str, days: &str, ext: &str) {
        make_leaf(&self.0, dir, name, cn, ca, days, ext);
    }
}

/// A P-256 CA certificate `name.pem` with key `name.key`.
fn make_ca(bin: &Path, dir: &Path, name: &str) {
    openssl(
        bin,
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "3",
            "-subj",
            &format!("/CN=e2e {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// An end-entity certificate `name.pem` (key `name.key`) for CN `cn` signed by CA `ca`,
/// valid `days` days, with the extensions `ext` (one per line).
fn make_leaf(bin: &Path, dir: &Path, name: &str, cn: &str, ca: &str, days: &str, ext: &str) {
    let ext_file = format!("{name}.ext");
    std::fs::write(dir.join(&ext_file), ext).expect("writing an extensions file");
    openssl(
        bin,
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    openssl(
        bin,
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            days,
            "-extfile",
            &ext_file,
        ],
    );
    // Throwaway test keys: mosquitto started as root drops to its own user before it
    // reads them, and openssl writes keys readable by their owner only.
    let key = dir.join(format!("{name}.key"));
    let _ = std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644));
}

const SERVER_EXT: &str = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                          extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n";
const CLIENT_EXT: &str =
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";

impl Pki {
    /// Makes the CA, the server and client certificates, and another CA. `None` when
    /// openssl is missing outside CI.
    pub fn generate() -> Option<Pki> {
        let Some(bin) = find(&["openssl"]) else {
            return missing("openssl");
        };
        let dir = std::env::temp_dir().join(format!(
            "e2e-pki-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating the certificate directory");
        make_ca(&bin, &dir, "ca");
        make_leaf(&bin, &dir, "server", "e2e server", "ca", "3", SERVER_EXT);
        make_leaf(&bin, &dir, "client", "e2e client", "ca", "3", CLIENT_EXT);
        make_ca(&bin, &dir, "other-ca");
        make_leaf(
            &bin,
            &dir,
            "other-client",
            "e2e other-client",
            "other-ca",
            "3",
            CLIENT_EXT,
        );
        let at = |f: &str| dir.join(f);
        Some(Pki {
            ca: at("ca.pem"),
            server_cert: at("server.pem"),
            server_key: at("server.key"),
            client_cert: at("client.pem"),
            client_key: at("client.key"),
            other_ca: at("other-ca.pem"),
            other_client_cert: at("other-client.pem"),
            other_client_key: at("other-client.key"),
            dir,
        })
    }

    /// The gateway's broker settings for mosquitto at `addr` over TLS, trusting `ca`
    /// and offering `client` (certificate, key) when given.
    pub fn broker_config(&self, addr: SocketAddr, ca: &Path, client: Option<(&Path, &Path)>) -> BrokerConfig {
        let tls = BrokerTls::load(TlsFiles {
            ca_file: Some(ca.to_path_buf()),
            client_cert: client.map(|c| c.0.to_path_buf()),
            client_key: client.map(|c| c.1.to_path_buf()),
        })
        .expect("the test certificates load");
        BrokerConfig {
            host: addr.ip().to_string(),
            port: addr.port(),
            tls: Some(tls),
            connect_timeout_secs: 5,
            ..BrokerConfig::default()
        }
    }
}

/// mosquitto with one TLS listener on 127.0.0.1, killed on drop.
#[derive(Debug)]
pub struct TlsMosquitto(Mosquitto);

impl TlsMosquitto {
    /// Starts mosquitto with a TLS listener on the certificates of `pki`; with
    /// `require_certificate`, clients must present a certificate from the CA. `None`
    /// when mosquitto is missing outside CI.
    pub fn start(pki: &Pki, require_certificate: bool) -> Option<TlsMosquitto> {
        let listener = |port: u16| {
            format!(
                "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_certificate}\n",
                pki.ca.display(),
                pki.server_cert.display(),
                pki.server_key.display(),
            )
        };
        Mosquitto::start_with_listener(&listener).map(TlsMosquitto)
    }

    /// The TLS listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.0.addr()
    }

    /// What mosquitto logged so far.
    pub fn log(&self) -> String {
        self.0.log()
    }
}

/// An MQTT client on the broker side, over TLS (the certificate checked against the
/// CA and 127.0.0.1): subscribes, collects messages, publishes at QoS 1.
pub struct TlsObserver {
    client: AsyncClient,
    msgs: mpsc::UnboundedReceiver<BrokerMsg>,
    acks: mpsc::UnboundedReceiver<Result<(), String>>,
    task: JoinHandle<()>,
}

impl Drop for TlsObserver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsObserver {
    /// Connects to `addr` with `broker`'s TLS settings and waits for the CONNACK.
    pub async fn connect(broker: &BrokerConfig, id: &str) -> TlsObserver {
        let tls = broker.tls.as_ref().expect("a TLS broker configuration");
        let mut o = MqttOptions::new(id, broker.host.clone(), broker.port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls.config())));
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let (msg_tx, msgs) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            use rumqttc::Packet as P;
            loop {
                let ack = match eventloop.poll().await {
                    Ok(Event::Incoming(P::Publish(p))) => {
                        let _ = msg_tx.send(BrokerMsg {
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                            qos: p.qos as u8,
                            retain: p.retain,
                        });
                        continue;
                    }
                    Ok(Event::Incoming(P::ConnAck(_) | P::SubAck(_) | P::PubAck(_))) => Ok(()),
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => continue,
                    Err(e) => Err(e.to_string()),
                };
                let end = ack.is_err();
                let _ = ack_tx.send(ack);
                if end {
                    return;
                }
            }
        });
        let mut obs = TlsObserver {
            client,
            msgs,
            acks,
            task,
        };
        obs.ack("CONNACK").await;
        obs
    }

    async fn ack(&mut self, what: &str) {
        match tokio::time::timeout(WAIT, self.acks.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => panic!("TLS observer: connection failed before {what}: {e}"),
            Ok(None) => panic!("TLS observer: connection ended before {what}"),
            Err(_) => panic!("TLS observer: no {what} within {WAIT:?}"),
        }
    }

    /// Subscribes at QoS 1 and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        self.ack("SUBACK").await;
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .expect("publish queued");
        self.ack("PUBACK").await;
    }

    /// The next message (panics after [`WAIT`]).
    pub async fn expect_msg(&mut self) -> BrokerMsg {
        match tokio::time::timeout(WAIT, self.msgs.recv()).await {
            Ok(Some(m)) => m,
            _ => panic!("TLS observer: no message within {WAIT:?}"),
        }
    }
}

/// A `tracing` writer into a shared buffer, to check what the gateway logs.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits (bounded by [`WAIT`]) until the log contains `needle`; the log.
    pub async fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.text();
            if text.contains(needle) || Instant::now() >= deadline {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// A subscriber writing warnings and above, without colour, to `capture`: set as the
/// default of the test's thread (a current-thread runtime runs the gateway's tasks on
/// it too, so their lines are caught).
pub fn capture_logs(capture: &LogCapture) -> tracing::subscriber::DefaultGuard {
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_ansi(false)
        .with_writer(capture.clone())
        .finish();
    tracing::subscriber::set_default(subscriber)
}
