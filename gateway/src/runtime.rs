//! The tokio shell: one task owns the engine and moves datagrams, broker events and
//! timer ticks into it, and its outputs out to sockets and broker connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::auth::Registry;
use crate::broker::mqtt::{LinkMode, MqttLinks};
use crate::broker::shared::SharedLinks;
use crate::broker::{AnyLink, BrokerEvent, BrokerLink, ClientKey};
use crate::config::Settings;
use crate::engine::{Gateway, LinkAddr, Stats};
use crate::store::StoreLink;
use crate::topics::Predefined;
use crate::transport::dtls::{DtlsOutput, DtlsServer, PskSource};
use crate::transport::dtls_cert::DtlsCertificates;
use crate::transport::serial::{LinkEvent, SerialPortStats, SerialPorts, SerialStatsReader};
use crate::transport::udp::{Inbound, UdpListener};

/// An MQTT-SN DISCONNECT without a duration, as the engine encodes it.
const DISCONNECT: [u8; 2] = [0x02, 0x18];

/// How many queued inputs one loop turn takes before flushing outputs.
const BATCH: usize = 256;

/// How often the broker is probed with a TCP connect for `GET /healthz`.
pub const BROKER_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// A running gateway.
pub struct Running {
    /// The bound UDP addresses, in configuration order.
    pub udp_addrs: Vec<SocketAddr>,
    /// The bound DTLS addresses, in configuration order.
    pub dtls_addrs: Vec<SocketAddr>,
    /// The embedded broker's address, when one runs.
    pub embedded_broker: Option<SocketAddr>,
    /// The bound metrics and health address (`GET /metrics`, `GET /healthz`), when
    /// `[metrics] listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    stats: Arc<Mutex<Stats>>,
    broker_links: Arc<AtomicUsize>,
    serial_stats: SerialStatsReader,
    control: mpsc::Sender<Control>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// A change to the running engine (a configuration reload), answered once applied.
enum Control {
    SetPredefined(Arc<Predefined>, oneshot::Sender<()>),
    SetRegistry(Arc<Registry>, oneshot::Sender<()>),
    /// Each DTLS listener's certificates as read again (in configuration order); the
    /// answer: the numbers (from 0) of the listeners whose certificates changed.
    DtlsCertificates(Vec<Option<Arc<DtlsCertificates>>>, oneshot::Sender<Vec<usize>>),
}

/// The engine task has ended: the gateway stopped, or is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the gateway engine has stopped")]
pub struct Stopped;

/// What a graceful stop is done with.
#[derive(Debug, Clone, Copy)]
struct StopSettings {
    timeout: Duration,
    publish_wills: bool,
}

/// What the engine task publishes for [`Running`] to read.
#[derive(Clone)]
struct Snapshot {
    stats: Arc<Mutex<Stats>>,
    broker_links: Arc<AtomicUsize>,
    /// Set when a graceful stop begins (`GET /healthz` then answers 503).
    stopping: Arc<AtomicBool>,
}

impl Snapshot {
    fn store(&self, stats: Stats, broker_links: usize) {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        self.broker_links.store(broker_links, Ordering::Relaxed);
    }
}

/// The DTLS listeners and the channel their sockets read into.
struct DtlsLinks {
    links: Vec<DtlsLink>,
    inbound: mpsc::Receiver<Inbound>,
}

/// The serial ports and the channel on which they say they came up or went away.
struct SerialLinks {
    ports: SerialPorts,
    events: mpsc::Receiver<LinkEvent>,
}

impl Running {
    /// A recent snapshot of the engine's gauges and counters (refreshed every 100 ms).
    pub fn stats(&self) -> Stats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Broker connections held for sessions (refreshed with [`Running::stats`]).
    pub fn broker_links(&self) -> usize {
        self.broker_links.load(Ordering::Relaxed)
    }

    /// The counters of every serial port, in configuration order.
    pub fn serial_stats(&self) -> Vec<SerialPortStats> {
        self.serial_stats.read()
    }

    /// Stops the gateway gracefully and waits until it has: no new session is taken,
    /// every awake device gets DISCONNECT once its exchanges in flight are done (at
    /// most `shutdown_timeout_secs`), and every broker connection is closed with an
    /// MQTT DISCONNECT, so that no will fires (unless `publish_wills_on_shutdown`). See
    /// [`Gateway::shutdown`] for what happens to each kind of session.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Replaces the predefined topics of the running engine (there is one engine for
    /// every UDP listener and serial port) and returns once it has them, so that any
    /// datagram received afterwards is handled with the new table. See
    /// [`Gateway::set_predefined`] for what that means for sessions already running.
    pub async fn set_predefined(&self, predefined: Arc<Predefined>) -> Result<(), Stopped> {
        let (done, applied) = oneshot::channel();
        self.control
            .send(Control::SetPredefined(predefined, done))
            .await
            .map_err(|_| Stopped)?;
        applied.await.map_err(|_| Stopped)
    }

    /// Replaces the device registry of the running engine (registry mode) and returns
    /// once it has it. Sessions stay connected; see [`Gateway::set_registry`] for what
    /// applies to them.
    pub async fn set_registry(&self, registry: Arc<Registry>) -> Result<(), Stopped> {
        let (done, applied) = oneshot::channel();
        self.control
            .send(Control::SetRegistry(registry, done))
            .await
            .map_err(|_| Stopped)?;
        applied.await.map_err(|_| Stopped)
    }

    /// Gives the DTLS listeners their certificates as read again (a SIGHUP reload, in
    /// configuration order): handshakes from now on use them, established sessions keep
    /// going. Returns the numbers (from 0) of the listeners whose certificates changed.
    pub async fn set_dtls_certificates(
        &self,
        certs: Vec<Option<Arc<DtlsCertificates>>>,
    ) -> Result<Vec<usize>, Stopped> {
        let (done, applied) = oneshot::channel();
        self.control
            .send(Control::DtlsCertificates(certs, done))
            .await
            .map_err(|_| Stopped)?;
        applied.await.map_err(|_| Stopped)
    }

    /// Waits until the gateway stops (it does not by itself).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

/// One DTLS listener: its socket and its sans-IO server.
struct DtlsLink {
    listener: UdpListener,
    server: DtlsServer,
}

/// The key source of the DTLS servers: the device registry in force.
fn psk_source(registry: Option<&Arc<Registry>>) -> Arc<dyn PskSource> {
    match registry {
        Some(r) => r.clone(),
        None => Arc::new(Registry::default()),
    }
}

/// Binds the listeners, starts the embedded broker if asked, and runs the engine.
pub async fn start(settings: Settings) -> anyhow::Result<Running> {
    let embedded_broker = match settings.embedded_broker {
        Some(addr) => Some(
            crate::embedded::start(addr)
                .await
                .context("starting the embedded broker")?,
        ),
        None => None,
    };
    let mut listeners = Vec::new();
    for (i, addr) in settings.udp.iter().enumerate() {
        let index = u16::try_from(i).context("too many UDP listeners")?;
        let l = UdpListener::bind(index, *addr)
            .await
            .with_context(|| format!("cannot bind UDP {addr}"))?;
        info!(addr = %l.local_addr()?, "listening for MQTT-SN on UDP");
        listeners.push(l);
    }
    let udp_addrs = listeners
        .iter()
        .map(UdpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()?;
    if let (Some(addr), Some(first)) = (settings.engine.udp_broadcast, listeners.first()) {
        // Multicast needs no option to send (nor any group joined); broadcast needs
        // SO_BROADCAST, which is harmless for a unicast address.
        if !addr.ip().is_multicast() {
            first
                .socket
                .set_broadcast(true)
                .context("cannot enable UDP broadcast")?;
        }
        info!(to = %addr, every = ?settings.engine.advertise_interval, "advertising on UDP");
    }
    let (in_tx, in_rx) = mpsc::channel::<Inbound>(4096);
    let probe = settings.metrics.udp_probe.clone().map(Arc::new);
    for l in &listeners {
        l.spawn_reader(in_tx.clone(), probe.clone());
    }
    // DTLS listeners read into their own channel: what arrives there is records, for
    // the DTLS servers, never for the engine directly.
    let (dtls_tx, dtls_rx) = mpsc::channel::<Inbound>(4096);
    let mut dtls = Vec::new();
    for (i, d) in settings.dtls.iter().enumerate() {
        let index = u16::try_from(i).context("too many DTLS listeners")?;
        let listener = UdpListener::bind(index, d.address)
            .await
            .with_context(|| format!("cannot bind DTLS {}", d.address))?;
        info!(addr = %listener.local_addr()?, "listening for MQTT-SN over DTLS");
        listener.spawn_reader(dtls_tx.clone(), None);
        let server = DtlsServer::new(d.limits, psk_source(settings.engine.auth.registry.as_ref()))?
            .with_certificates(d.certificates.clone())?;
        dtls.push(DtlsLink { listener, server });
    }
    drop(dtls_tx);
    let dtls_addrs = dtls
        .iter()
        .map(|d| d.listener.local_addr())
        .collect::<Result<Vec<_>, _>>()?;
    let (link_tx, link_rx) = mpsc::channel(256);
    let serial_ports = SerialPorts::spawn(&settings.serial, in_tx.clone(), link_tx).map_err(anyhow::Error::msg)?;
    let serial_stats = serial_ports.stats_reader();
    let (ev_tx, ev_rx) = mpsc::channel(4096);
    let mut broker = settings.broker.clone();
    if let (Some(asked), Some(actual)) = (settings.embedded_broker, embedded_broker) {
        // The broker settings point at the embedded broker's configured address; with
        // port 0 only the started broker knows its real port.
        if broker.port == asked.port() && broker.host == asked.ip().to_string() {
            broker.host = actual.ip().to_string();
            broker.port = actual.port();
        }
    }
    info!(broker = %broker.url(), "broker");
    let mode = broker.mode;
    broker.max_connections = match mode {
        LinkMode::Transparent => Some(connection_limit(&settings)),
        // No open file per device: only the process's own limit on clients applies.
        LinkMode::Aggregating => None,
    };
    info!(%mode, connections = broker.connections, "broker link");
    let probe = broker.clone();
    let mut gateway = Gateway::new(settings.engine.clone());
    let mut store = crate::store::StoreLink::open(&settings.state, &mut gateway)?;
    let links = match mode {
        LinkMode::Transparent => AnyLink::Transparent(MqttLinks::new(broker, ev_tx)),
        LinkMode::Aggregating => {
            // What only the gateway knows of its devices (subscriptions, held messages)
            // is stored by the shared connections and put back into them.
            let durable = store.as_mut().map(|s| crate::broker::shared::Durable {
                store: s.handle(),
                sessions: s.take_restored(),
                wills: s.take_wills(),
                broker_filters: s.take_broker_filters(),
            });
            AnyLink::Aggregating(SharedLinks::new(broker, ev_tx, durable))
        }
    };
    let stats = Arc::new(Mutex::new(Stats::default()));
    let broker_links = Arc::new(AtomicUsize::new(0));
    let stopping = Arc::new(AtomicBool::new(false));
    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    let (control_tx, control_rx) = mpsc::channel(4);
    let stop = StopSettings {
        timeout: settings.shutdown_timeout,
        publish_wills: settings.publish_wills_on_shutdown,
    };
    let metrics_listener = match settings.metrics.listen {
        Some(addr) => Some(
            crate::ops::bind(addr)
                .await
                .with_context(|| format!("cannot bind the metrics address {addr}"))?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let mut helpers = Vec::new();
    if let Some(listener) = metrics_listener {
        info!(addr = ?metrics_addr, "serving /metrics and /healthz over HTTP");
        let reachable = Arc::new(Mutex::new(None));
        let timeout = Duration::from_secs(probe.connect_timeout_secs).min(BROKER_PROBE_INTERVAL);
        helpers.push(tokio::spawn(crate::ops::probe_broker(
            probe,
            BROKER_PROBE_INTERVAL,
            timeout,
            reachable.clone(),
        )));
        helpers.push(tokio::spawn(crate::ops::serve(
            listener,
            crate::ops::Sources {
                stats: stats.clone(),
                broker_links: broker_links.clone(),
                broker_links_max: links.max_connections(),
                broker_reachable: reachable,
                serial: serial_stats.clone(),
                stopping: stopping.clone(),
            },
        )));
    }
    let engine = run(
        gateway,
        store,
        links,
        listeners,
        in_rx,
        ev_rx,
        Snapshot {
            stats: stats.clone(),
            broker_links: broker_links.clone(),
            stopping,
        },
        settings.stats_interval,
        shutdown_rx,
        control_rx,
        stop,
        SerialLinks {
            ports: serial_ports,
            events: link_rx,
        },
        DtlsLinks {
            links: dtls,
            inbound: dtls_rx,
        },
    );
    let task = tokio::spawn(async move {
        engine.await;
        for h in helpers {
            h.abort();
        }
    });
    Ok(Running {
        udp_addrs,
        dtls_addrs,
        embedded_broker,
        metrics_addr,
        stats,
        broker_links,
        serial_stats,
        control: control_tx,
        shutdown: Some(shutdown_tx),
        task,
    })
}

/// The engine's stats with what the DTLS servers and the broker link count beside it.
fn stats_of<L: BrokerLink>(gw: &Gateway, dtls: &DtlsLinks, links: &L) -> Stats {
    let mut s = gw.stats();
    for d in &dtls.links {
        s.dtls.add(&d.server.counters());
    }
    s.aggregate = links.aggregate_stats().unwrap_or_default();
    s.metrics.store_write_errors += s.aggregate.store_errors;
    s
}

#[allow(clippy::too_many_arguments)]
async fn run<L: BrokerLink>(
    mut gw: Gateway,
    mut store: Option<StoreLink>,
    mut links: L,
    listeners: Vec<UdpListener>,
    mut inbound: mpsc::Receiver<Inbound>,
    mut events: mpsc::Receiver<(ClientKey, BrokerEvent)>,
    snapshot: Snapshot,
    stats_interval: Option<Duration>,
    mut shutdown: oneshot::Receiver<()>,
    mut control: mpsc::Receiver<Control>,
    stop: StopSettings,
    mut serial: SerialLinks,
    mut dtls: DtlsLinks,
) {
    // Set once the stop has begun: when the sessions' patience runs out.
    let mut stop_deadline: Option<tokio::time::Instant> = None;
    let mut refresh = tokio::time::interval(Duration::from_millis(100));
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_log = Instant::now();
    gw.start(Instant::now());
    flush(
        &mut gw,
        &mut store,
        &mut links,
        &listeners,
        &serial.ports,
        &mut dtls.links,
    )
    .await;
    loop {
        if stop_deadline.is_some() && gw.is_shut_down() {
            break;
        }
        let next = dtls
            .links
            .iter()
            .filter_map(|d| d.server.poll_timeout())
            .chain(gw.poll_timeout())
            .min();
        let deadline = next
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            // Also when the `Running` is dropped without a shutdown call.
            _ = &mut shutdown, if stop_deadline.is_none() => {
                info!(timeout = ?stop.timeout, publish_wills = stop.publish_wills, "stopping gracefully");
                stop_deadline = Some(tokio::time::Instant::now() + stop.timeout);
                snapshot.stopping.store(true, Ordering::Relaxed);
                gw.shutdown(Instant::now(), stop.publish_wills);
            }
            _ = tokio::time::sleep_until(stop_deadline.unwrap_or_else(tokio::time::Instant::now)), if stop_deadline.is_some() => {
                gw.finish_shutdown(Instant::now());
            }
            // Before datagrams: what a device sends after the caller was told the change
            // is applied must meet the new table.
            Some(ctl) = control.recv() => match ctl {
                Control::SetPredefined(predefined, done) => {
                    gw.set_predefined(predefined);
                    let _ = done.send(());
                }
                Control::SetRegistry(registry, done) => {
                    for d in &mut dtls.links {
                        d.server.set_source(registry.clone());
                    }
                    gw.set_registry(registry);
                    let _ = done.send(());
                }
                Control::DtlsCertificates(certs, done) => {
                    let changed = dtls
                        .links
                        .iter_mut()
                        .zip(certs)
                        .enumerate()
                        .filter_map(|(i, (d, c))| c.filter(|c| d.server.set_certificates(c.clone())).map(|_| i))
                        .collect();
                    let _ = done.send(changed);
                }
            },
            Some(first) = inbound.recv() => {
                let now = Instant::now();
                gw.handle_datagram(now, first.0, &first.1);
                for _ in 1..BATCH {
                    match inbound.try_recv() {
                        Ok((from, data)) => gw.handle_datagram(now, from, &data),
                        Err(_) => break,
                    }
                }
            }
            Some((link, data)) = dtls.inbound.recv() => {
                let now = Instant::now();
                if let LinkAddr::Udp(index, from) = link {
                    if let Some(d) = dtls.links.get_mut(usize::from(index)) {
                        d.server.handle_datagram(now, std::time::SystemTime::now(), from, &data);
                    }
                }
            }
            Some((key, event)) = events.recv() => {
                let now = Instant::now();
                gw.handle_broker_event(now, key, event);
                for _ in 1..BATCH {
                    match events.try_recv() {
                        Ok((key, event)) => gw.handle_broker_event(now, key, event),
                        Err(_) => break,
                    }
                }
            }
            Some(event) = serial.events.recv() => {
                // What the port read before it went away is older than its going away:
                // it is queued already, so handle what is queued first.
                for _ in 0..inbound.len() {
                    match inbound.try_recv() {
                        Ok((from, data)) => gw.handle_datagram(Instant::now(), from, &data),
                        Err(_) => break,
                    }
                }
                match event {
                    LinkEvent::Up(link) => gw.link_up(Instant::now(), &link),
                    LinkEvent::Down(link) => gw.link_down(Instant::now(), &link),
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                for d in &mut dtls.links {
                    if d.server.poll_timeout().is_some_and(|t| t <= now) {
                        d.server.handle_timeout(now);
                    }
                }
                gw.handle_timeout(now);
            }
            _ = refresh.tick() => {
                let s = stats_of(&gw, &dtls, &links);
                if let Some(every) = stats_interval {
                    if last_log.elapsed() >= every {
                        last_log = Instant::now();
                        info!(
                            "stats: sessions={} active={} asleep={} held={} broker_links={} broker_tasks={} {}",
                            s.sessions, s.active, s.asleep, s.held_messages, links.active(), links.tasks(), s.metrics
                        );
                        for (i, p) in serial.ports.stats().iter().enumerate() {
                            info!(port = i, path = %p.path.display(), open = p.open, frames_in = p.frames_in,
                                  frames_out = p.frames_out, dropped = p.frames_dropped(), noise_bytes = p.noise_bytes,
                                  disconnects = p.disconnects, "serial stats");
                        }
                    }
                }
                snapshot.store(s, links.active());
            }
        }
        flush(
            &mut gw,
            &mut store,
            &mut links,
            &listeners,
            &serial.ports,
            &mut dtls.links,
        )
        .await;
    }
    // Every DTLS session is told the gateway is going (close_notify).
    for d in &mut dtls.links {
        d.server.close_all();
    }
    flush(
        &mut gw,
        &mut store,
        &mut links,
        &listeners,
        &serial.ports,
        &mut dtls.links,
    )
    .await;
    // Every session has closed its broker connection; close what is left (the QoS -1
    // connection, any other) and wait until each DISCONNECT is written, reading the
    // events meanwhile so that no connection task waits on a full channel.
    links.reap();
    links.close_all();
    let until = stop_deadline
        .unwrap_or_else(tokio::time::Instant::now)
        .max(tokio::time::Instant::now() + Duration::from_secs(1));
    let left = {
        let closing = links.wait_closed(until);
        tokio::pin!(closing);
        loop {
            tokio::select! {
                left = &mut closing => break left,
                Some(_) = events.recv() => {}
            }
        }
    };
    if left > 0 {
        warn!(connections = left, "broker connections not closed in time");
    }
    snapshot.store(stats_of(&gw, &dtls, &links), 0);
    info!("gateway stopped");
}

/// The broker connection limit in force: `broker.max_connections`, or the open-file
/// limit (raised to its hard value here) less a reserve. Logged, with a warning when it
/// is below `limits.max_clients`, since in transparent mode each device holds one.
fn connection_limit(settings: &Settings) -> usize {
    let files = crate::open_files::raise();
    let max = crate::open_files::max_connections(settings.broker.max_connections, files);
    match files {
        Some(f) => info!(
            soft = f.soft,
            hard = f.hard,
            was = f.was,
            broker_connections = max,
            "open-file limit"
        ),
        None => warn!("cannot read the open-file limit; broker connections are not bounded by it"),
    }
    let clients = settings.engine.max_clients;
    if max < clients {
        warn!(
            max_clients = clients,
            broker_connections = max,
            "transparent mode holds one broker connection (an open file) per device: this process serves at most \
             {max} devices, fewer than limits.max_clients; raise the open-file limit (LimitNOFILE) or spread the \
             devices over several gateways (docs/scaling.md)"
        );
    }
    max
}

/// Sends what the engine queued: datagrams to devices, commands to broker links (whose
/// immediate refusals go straight back into the engine).
async fn flush<L: BrokerLink>(
    gw: &mut Gateway,
    store: &mut Option<StoreLink>,
    links: &mut L,
    listeners: &[UdpListener],
    serial: &SerialPorts,
    dtls: &mut [DtlsLink],
) {
    // Connections whose task ended by itself (refused, unreachable, lost) are freed.
    links.reap();
    loop {
        let mut idle = true;
        // What the DTLS servers have: records to send, datagrams for the engine.
        for (index, d) in dtls.iter_mut().enumerate() {
            while let Some(o) = d.server.poll_output() {
                idle = false;
                match o {
                    DtlsOutput::Transmit { to, data } => d.listener.send(&data, to).await,
                    DtlsOutput::Receive { from, identity, data } => {
                        let index = u16::try_from(index).unwrap_or(u16::MAX);
                        gw.handle_datagram(Instant::now(), LinkAddr::Dtls(index, from, identity), &data);
                    }
                }
            }
        }
        while let Some((key, command)) = gw.poll_command() {
            idle = false;
            if let Some(event) = links.execute(key, command) {
                gw.handle_broker_event(Instant::now(), key, event);
            }
        }
        // The durability rule: what the engine stored is committed (one transaction for
        // all of it) before the datagrams that answer it go out.
        if let Some(store) = store {
            store.flush(gw);
        }
        while let Some(t) = gw.poll_transmit() {
            idle = false;
            match t.to {
                LinkAddr::Udp(index, addr) => {
                    if let Some(l) = listeners.get(usize::from(index)) {
                        l.send(&t.data, addr).await;
                    }
                }
                LinkAddr::Serial(index) => serial.send(index, t.data),
                LinkAddr::Dtls(index, addr, ref identity) => {
                    // A DISCONNECT to an address left without a session (the device
                    // disconnected, or was told to connect again) ends the DTLS session
                    // too, with close_notify; one answering a sleep keeps it.
                    let ends = t.data == DISCONNECT && !gw.has_session_at(&t.to);
                    if let Some(d) = dtls.get_mut(usize::from(index)) {
                        d.server.send(Instant::now(), addr, identity, &t.data);
                        if ends {
                            d.server.close(addr);
                        }
                    }
                }
            }
        }
        if idle {
            return;
        }
    }
}
