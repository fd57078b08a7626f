//! The firmware client over a serial line, end to end: `sn_codec`'s `UartClient` (the
//! `no_std` client engine and its UART adapter, as linked into firmware) drives one end of
//! a pseudo-terminal pair through a small shim implementing the `embedded-hal-nb` serial
//! traits; the gateway's serial transport serves the other end; a real broker (Debian's
//! `mosquitto`, started by the test on a free loopback port) is behind it, watched by a
//! rumqttc client.
//!
//! Without mosquitto a test prints a note and returns, except under `CI=true`, where it
//! fails. `RUST_LOG=gateway=debug` shows the gateway's log.
//!
//! Needs `sn-codec`'s feature `uart` (a dev-dependency of the gateway enables it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use e2e::{init_logging, Mosquitto};
use gateway::broker::mqtt::BrokerConfig;
use gateway::config::Settings;
use gateway::engine::EngineConfig;
use gateway::runtime::Running;
use gateway::transport::serial::SerialPortConfig;
use rumqttc::{AsyncClient, MqttOptions};
use sn_codec::client::uart::embedded_hal_nb::nb;
use sn_codec::client::uart::embedded_hal_nb::serial::{self, ErrorKind, ErrorType};
use sn_codec::client::uart::{Incoming, UartClient};
use sn_codec::client::{Config, Event, State};
use sn_codec::framing::FramingKind;
use sn_codec::{QoS, TopicFilter, TopicRef};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_serial::{SerialPort, SerialStream};

/// How long anything may take before a test fails.
const WAIT: Duration = Duration::from_secs(15);

fn unique() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

// ---- mosquitto -------------------------------------------------------------------

// ---- a broker-side MQTT client -----------------------------------------------------

/// A message seen at the broker.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct BrokerMsg {
    topic: String,
    payload: Vec<u8>,
    /// The QoS it was delivered with (the observer subscribes with QoS 2, so this is the
    /// QoS the gateway published with).
    qos: u8,
}

struct Observer {
    client: AsyncClient,
    msgs: mpsc::UnboundedReceiver<BrokerMsg>,
}

impl Observer {
    async fn subscribed(broker: SocketAddr, filter: &str) -> Observer {
        let mut o = MqttOptions::new(
            format!("fw-observer-{}", unique()),
            broker.ip().to_string(),
            broker.port(),
        );
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(o, 256);
        let (msg_tx, msgs) = mpsc::unbounded_channel();
        let (sub_tx, mut subacks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let _ = msg_tx.send(BrokerMsg {
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                            qos: p.qos as u8,
                        });
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        client
            .subscribe(filter, rumqttc::QoS::ExactlyOnce)
            .await
            .expect("subscribe queued");
        timeout(WAIT, subacks.recv())
            .await
            .expect("SUBACK from the broker")
            .expect("observer running");
        Observer { client, msgs }
    }

    async fn next(&mut self) -> BrokerMsg {
        timeout(WAIT, self.msgs.recv())
            .await
            .expect("a message at the broker")
            .expect("observer running")
    }

    async fn publish(&self, topic: &str, payload: &[u8], qos: rumqttc::QoS) {
        self.client
            .publish(topic, qos, false, payload.to_vec())
            .await
            .expect("publish queued");
    }
}

// ---- the firmware's UART: the pty master behind the embedded-hal-nb traits ---------

/// What a HAL's UART driver is to firmware: non-blocking, one octet at a time. Reads
/// come from a small buffer refilled with one non-blocking `read(2)` on the pty master.
struct PtyUart {
    port: SerialStream,
    buf: [u8; 256],
    pos: usize,
    len: usize,
}

impl ErrorType for PtyUart {
    type Error = ErrorKind;
}

impl serial::Read<u8> for PtyUart {
    fn read(&mut self) -> nb::Result<u8, ErrorKind> {
        if self.pos == self.len {
            match self.port.try_read(&mut self.buf) {
                Ok(0) => return Err(nb::Error::WouldBlock),
                Ok(n) => {
                    self.pos = 0;
                    self.len = n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Err(nb::Error::WouldBlock),
                Err(_) => return Err(nb::Error::Other(ErrorKind::Other)),
            }
        }
        let b = self.buf[self.pos];
        self.pos += 1;
        Ok(b)
    }
}

impl serial::Write<u8> for PtyUart {
    fn write(&mut self, byte: u8) -> nb::Result<(), ErrorKind> {
        match self.port.try_write(&[byte]) {
            Ok(1) => Ok(()),
            Ok(_) => Err(nb::Error::WouldBlock),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(nb::Error::WouldBlock),
            Err(_) => Err(nb::Error::Other(ErrorKind::Other)),
        }
    }

    fn flush(&mut self) -> nb::Result<(), ErrorKind> {
        Ok(())
    }
}

// ---- the firmware --------------------------------------------------------------------

/// The firmware's client: as a microcontroller would size it.
type Fw = UartClient<'static, PtyUart, 8, 128, 128, 256>;
/// Something to do on the firmware's client, at its `now`.
type Op = Box<dyn FnOnce(&mut Fw, u64) + Send>;

/// What the firmware's `poll` callback was given, owned.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Msg {
        /// The topic name, as the engine resolves it.
        topic: Option<String>,
        payload: Vec<u8>,
        qos: QoS,
    },
    Ev(Event),
}

/// The firmware main loop, in a task: apply the test's operations, `poll`, sleep 2 ms.
struct Firmware {
    ops: mpsc::UnboundedSender<Op>,
    got: mpsc::UnboundedReceiver<Got>,
    task: JoinHandle<()>,
}

impl Firmware {
    fn spawn(master: SerialStream, client_id: &'static str) -> Firmware {
        let config = Config {
            keep_alive: 60,
            t_retry: 2000,
            n_retry: 5,
            ..Config::new(client_id)
        };
        let uart = PtyUart {
            port: master,
            buf: [0; 256],
            pos: 0,
            len: 0,
        };
        let mut fw: Box<Fw> = Box::new(UartClient::new(uart, FramingKind::Cobs, config));
        let (ops, mut ops_rx) = mpsc::unbounded_channel::<Op>();
        let (got_tx, got) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            loop {
                let now = u64::try_from(start.elapsed().as_millis()).expect("ms fit");
                loop {
                    match ops_rx.try_recv() {
                        Ok(op) => op(&mut fw, now),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => return,
                    }
                }
                let _ = fw.poll(now, |client, incoming| {
                    let g = match incoming {
                        Incoming::Message(m) => Got::Msg {
                            topic: client.topic_name(&m.topic).map(str::to_owned),
                            payload: m.payload.to_vec(),
                            qos: m.qos,
                        },
                        Incoming::Event(e) => Got::Ev(e),
                    };
                    let _ = got_tx.send(g);
                });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        Firmware { ops, got, task }
    }

    /// Runs `f` on the firmware's client in its loop and returns its result.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut Fw, u64) -> T + Send + 'static) -> T {
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(Box::new(move |fw: &mut Fw, now| {
                let _ = tx.send(f(fw, now));
            }))
            .map_err(|_| "firmware loop ended")
            .unwrap();
        timeout(WAIT, rx)
            .await
            .expect("the firmware loop runs")
            .expect("answered")
    }

    /// The first thing `pick` accepts, skipping others (e.g. `GatewayFound` from an
    /// ADVERTISE).
    async fn expect<T>(&mut self, what: &str, mut pick: impl FnMut(&Got) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let g = tokio::time::timeout_at(deadline, self.got.recv())
                .await
                .unwrap_or_else(|_| panic!("firmware: no {what} in time"))
                .expect("firmware loop running");
            if let Some(t) = pick(&g) {
                return t;
            }
        }
    }

    async fn expect_event(&mut self, what: &str, want: Event) {
        self.expect(what, |g| (*g == Got::Ev(want)).then_some(())).await;
    }

    async fn connect(&mut self) {
        self.run(|fw, now| fw.client_mut().connect(now))
            .await
            .expect("can connect");
        self.expect("CONNACK", |g| match g {
            Got::Ev(Event::Connected) => Some(()),
            Got::Ev(e @ (Event::ConnectRejected(_) | Event::GatewayLost)) => panic!("connect failed: {e:?}"),
            _ => None,
        })
        .await;
    }

    async fn subscribe(&mut self, filter: &'static str, qos: QoS) -> u16 {
        let id = self
            .run(move |fw, now| fw.client_mut().subscribe(now, TopicFilter::Name(filter), qos))
            .await
            .expect("can subscribe");
        self.expect("SUBACK", |g| match g {
            Got::Ev(Event::Subscribed { msg_id, topic_id, .. }) if *msg_id == id => Some(*topic_id),
            Got::Ev(e @ Event::SubscribeRejected { .. }) => panic!("subscribe rejected: {e:?}"),
            _ => None,
        })
        .await
    }

    /// Publishes and, for QoS 1 and 2, waits for the end of the exchange.
    async fn publish(&mut self, topic: TopicRef, payload: &'static [u8], qos: QoS) {
        let id = self
            .run(move |fw, now| fw.client_mut().publish(now, topic, payload, qos, false))
            .await
            .expect("can publish");
        if matches!(qos, QoS::AtLeastOnce | QoS::ExactlyOnce) {
            self.expect("PUBACK / PUBCOMP", |g| match g {
                Got::Ev(Event::Published { msg_id }) if *msg_id == id => Some(()),
                Got::Ev(e @ Event::PublishRejected { .. }) => panic!("publish rejected: {e:?}"),
                _ => None,
            })
            .await;
        }
    }

    async fn state(&self) -> State {
        self.run(|fw, _| fw.client().state()).await
    }

    /// Frames the firmware dropped (damaged, too long) and serial errors it saw.
    async fn line_errors(&self) -> (u32, u32) {
        self.run(|fw, _| {
            (
                fw.frame_stats().dropped(),
                fw.stats().read_errors + fw.stats().write_errors,
            )
        })
        .await
    }

    /// Nothing arrives for a while.
    async fn expect_silence(&mut self, for_: Duration) {
        if let Ok(Some(g)) = timeout(for_, self.got.recv()).await {
            panic!("firmware got {g:?} while nothing was expected");
        }
    }
}

impl Drop for Firmware {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- the gateway -------------------------------------------------------------------

/// A gateway serving the slave end of a fresh pty pair, and the firmware on its master.
struct Bench {
    gw: Running,
    fw: Firmware,
    // Kept open so that the line stays up while the gateway (re)opens it.
    _slave: SerialStream,
    _broker: Mosquitto,
    broker: SocketAddr,
}

impl Bench {
    async fn start(client_id: &'static str) -> Option<Bench> {
        init_logging();
        let broker = Mosquitto::start()?;
        let (master, slave) = SerialStream::pair().expect("a pty pair");
        let path = PathBuf::from(slave.name().expect("the pty has a name"));
        let settings = Settings {
            engine: EngineConfig {
                advertise_interval: None,
                ..EngineConfig::default()
            },
            udp: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
            broker: BrokerConfig {
                host: broker.addr().ip().to_string(),
                port: broker.addr().port(),
                ..BrokerConfig::default()
            },
            stats_interval: None,
            serial: vec![SerialPortConfig::new(&path)],
            ..Settings::default()
        };
        let gw = gateway::runtime::start(settings).await.expect("the gateway starts");
        wait_for("the serial port to open", || gw.serial_stats()[0].open).await;
        Some(Bench {
            gw,
            fw: Firmware::spawn(master, client_id),
            _slave: slave,
            broker: broker.addr(),
            _broker: broker,
        })
    }

    /// Neither side dropped a frame or saw a serial error.
    async fn assert_clean_line(&self) {
        assert_eq!(
            self.fw.line_errors().await,
            (0, 0),
            "firmware side: dropped frames, serial errors"
        );
        let s = &self.gw.serial_stats()[0];
        assert_eq!(s.frames_dropped(), 0, "gateway side: {s:?}");
        assert!(s.frames_in > 0 && s.frames_out > 0, "{s:?}");
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- tests -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_connects_publishes_qos_0_1_2_subscribes_and_receives() {
    let Some(mut b) = Bench::start("fw-dev-1").await else {
        return;
    };
    let mut observer = Observer::subscribed(b.broker, "fw/#").await;
    let mut short_observer = Observer::subscribed(b.broker, "fx").await;

    b.fw.connect().await;
    assert_eq!(b.fw.state().await, State::Active);

    // Publish to a registered topic with each QoS; the broker sees each with its QoS.
    let id =
        b.fw.run(|fw, now| fw.client_mut().register(now, "fw/temp"))
            .await
            .expect("can register");
    let topic_id =
        b.fw.expect("REGACK", |g| match g {
            Got::Ev(Event::Registered { msg_id, topic_id }) if *msg_id == id => Some(*topic_id),
            _ => None,
        })
        .await;
    let topic = TopicRef::Normal(topic_id);
    b.fw.publish(topic, b"q0", QoS::AtMostOnce).await;
    b.fw.publish(topic, b"q1", QoS::AtLeastOnce).await;
    b.fw.publish(topic, b"q2", QoS::ExactlyOnce).await;
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        seen.insert(observer.next().await);
    }
    let want: BTreeSet<BrokerMsg> = [(b"q0", 0), (b"q1", 1), (b"q2", 2)]
        .into_iter()
        .map(|(p, qos)| BrokerMsg {
            topic: "fw/temp".into(),
            payload: p.to_vec(),
            qos,
        })
        .collect();
    assert_eq!(seen, want);

    // A short topic name needs no registration.
    b.fw.publish(TopicRef::Short(*b"fx"), b"short", QoS::AtLeastOnce).await;
    let m = short_observer.next().await;
    assert_eq!((m.topic.as_str(), m.payload.as_slice()), ("fx", &b"short"[..]));

    // Subscribe with a wildcard; the broker's messages arrive (the gateway registers the
    // topic first), with QoS 1 and 2 acknowledged by the engine.
    b.fw.subscribe("fw/cmd/+", QoS::ExactlyOnce).await;
    observer.publish("fw/cmd/led", b"on", rumqttc::QoS::AtLeastOnce).await;
    let got =
        b.fw.expect("PUBLISH fw/cmd/led", |g| {
            matches!(g, Got::Msg { .. }).then(|| g.clone())
        })
        .await;
    assert_eq!(
        got,
        Got::Msg {
            topic: Some("fw/cmd/led".into()),
            payload: b"on".to_vec(),
            qos: QoS::AtLeastOnce,
        }
    );
    observer.publish("fw/cmd/fan", b"3", rumqttc::QoS::ExactlyOnce).await;
    let got =
        b.fw.expect("PUBLISH fw/cmd/fan", |g| {
            matches!(g, Got::Msg { .. }).then(|| g.clone())
        })
        .await;
    assert_eq!(
        got,
        Got::Msg {
            topic: Some("fw/cmd/fan".into()),
            payload: b"3".to_vec(),
            qos: QoS::ExactlyOnce,
        }
    );
    // Delivered once: the QoS 2 exchange completes without a duplicate.
    b.fw.expect_silence(Duration::from_millis(300)).await;

    b.fw.run(|fw, now| fw.client_mut().disconnect(now))
        .await
        .expect("can disconnect");
    b.fw.expect_event("DISCONNECT", Event::Disconnected).await;
    b.assert_clean_line().await;
    b.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_sleeps_and_gets_what_was_published_meanwhile_on_wake() {
    let Some(mut b) = Bench::start("fw-dev-2").await else {
        return;
    };
    let mut observer = Observer::subscribed(b.broker, "fw2/#").await;

    b.fw.connect().await;
    b.fw.subscribe("fw2/cmd", QoS::AtLeastOnce).await;

    // Sleep for 30 s: DISCONNECT(30), the gateway's DISCONNECT.
    b.fw.run(|fw, now| fw.client_mut().sleep(now, 30))
        .await
        .expect("can sleep");
    b.fw.expect_event("DISCONNECT (asleep)", Event::Asleep).await;
    wait_for("the gateway to see the client asleep", || b.gw.stats().asleep == 1).await;

    // Published while the device sleeps: the gateway holds it, the device hears nothing.
    observer
        .publish("fw2/cmd", b"while-asleep", rumqttc::QoS::AtLeastOnce)
        .await;
    assert_eq!(observer.next().await.payload, b"while-asleep");
    wait_for("the gateway to hold the message", || b.gw.stats().held_messages >= 1).await;
    b.fw.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(b.fw.state().await, State::Asleep);

    // Wake (PINGREQ with the client id): the held message, then PINGRESP, asleep again.
    b.fw.run(|fw, now| fw.client_mut().wake(now)).await.expect("can wake");
    let got =
        b.fw.expect("the held PUBLISH", |g| match g {
            Got::Msg { .. } => Some(g.clone()),
            Got::Ev(Event::Asleep) => panic!("PINGRESP before the held message"),
            _ => None,
        })
        .await;
    assert_eq!(
        got,
        Got::Msg {
            topic: Some("fw2/cmd".into()),
            payload: b"while-asleep".to_vec(),
            qos: QoS::AtLeastOnce,
        }
    );
    b.fw.expect_event("PINGRESP (asleep again)", Event::Asleep).await;
    assert_eq!(b.fw.state().await, State::Asleep);
    wait_for("the gateway to have delivered it", || b.gw.stats().held_messages == 0).await;

    // Back to active with CONNECT; publishing works again.
    b.fw.connect().await;
    b.fw.publish(TopicRef::Short(*b"fz"), b"awake", QoS::AtLeastOnce).await;
    b.fw.run(|fw, now| fw.client_mut().disconnect(now))
        .await
        .expect("can disconnect");
    b.fw.expect_event("DISCONNECT", Event::Disconnected).await;
    b.assert_clean_line().await;
    b.gw.shutdown().await;
}
