//! Aggregating mode's shell: `broker.connections` shared MQTT connections (rumqttc), the
//! devices spread over them by client id, each connection's [`Aggregator`] driven by its
//! own task.
//!
//! The link only routes commands to the task of the device's connection; everything a
//! broker would do per client is the aggregator's. Each connection is opened with clean
//! session: after a loss the gateway subscribes again what its away devices hold, and the
//! sessions that were on it are closed (as they would be in transparent mode).
//!
//! With a state store, each task commits its aggregator's writes (subscriptions, held
//! messages) in one transaction per batch of work, on a blocking thread, before it carries
//! out anything queued after them: acknowledgements to the broker wait for the commit.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, Publish, SubscribeReasonCode, Transport,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::aggregate::{AggregateStats, Aggregator, Output, Request, Tag};
use super::mqtt::{our_qos, rumqttc_qos, BrokerConfig};
use super::{BrokerEvent, BrokerLink, ClientKey, Command, RejectReason, GATEWAY_KEY};
use crate::store::{HeldMessage, StoreHandle, StoreOp, StoredSession};

/// What aggregating mode is given with a state store: the store, and what it held for
/// the shared connections at start.
#[derive(Debug)]
pub struct Durable {
    /// The store.
    pub store: StoreHandle,
    /// Subscriptions and held messages of the clean-session-false devices kept.
    pub sessions: Vec<StoredSession>,
    /// Wills of the devices connected when the gateway stopped.
    pub wills: Vec<(String, HeldMessage)>,
}

/// What a connection's task is told.
enum Input {
    Command(ClientKey, Command),
    /// Shut down: DISCONNECT after what is queued.
    Close,
}

/// Commands queued towards one connection's task that the bound applies to (publishes
/// and subscribes), and their octets.
#[derive(Default)]
struct Fill {
    requests: AtomicUsize,
    bytes: AtomicUsize,
}

struct Shard {
    tx: mpsc::UnboundedSender<Input>,
    fill: Arc<Fill>,
    stats: Arc<Mutex<AggregateStats>>,
    task: Option<JoinHandle<()>>,
}

/// The aggregating-mode broker link.
pub struct SharedLinks {
    cfg: Arc<BrokerConfig>,
    shards: Vec<Shard>,
    /// The connection of each session.
    route: HashMap<ClientKey, usize>,
    /// Sessions whose connection ended them (refused, lost): their routes go at reap.
    ended: mpsc::UnboundedReceiver<ClientKey>,
    store: Option<StoreHandle>,
}

/// Which of `n` connections a client id goes to: stable across restarts (FNV-1a), so
/// a device with clean session false finds its subscriptions where it left them.
fn shard_of(client_id: &str, n: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in client_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % n.max(1) as u64) as usize
}

impl SharedLinks {
    /// Opens `cfg.connections` connections (at least one), reporting to `events`. With
    /// `durable`, they write to that store and start with the devices read from it
    /// (each on the connection its client id goes to).
    pub fn new(cfg: BrokerConfig, events: mpsc::Sender<(ClientKey, BrokerEvent)>, durable: Option<Durable>) -> Self {
        let cfg = Arc::new(cfg);
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let n = cfg.connections.max(1);
        let (store, restored, wills) = match durable {
            Some(d) => (Some(d.store), d.sessions, d.wills),
            None => (None, Vec::new(), Vec::new()),
        };
        let mut sessions_of: Vec<Vec<StoredSession>> = (0..n).map(|_| Vec::new()).collect();
        let mut wills_of: Vec<Vec<(String, HeldMessage)>> = (0..n).map(|_| Vec::new()).collect();
        for s in restored {
            sessions_of[shard_of(&s.client_id, n)].push(s);
        }
        for w in wills {
            wills_of[shard_of(&w.0, n)].push(w);
        }
        let shards = sessions_of
            .into_iter()
            .zip(wills_of)
            .enumerate()
            .map(|(i, (restored, wills))| {
                let (tx, rx) = mpsc::unbounded_channel();
                let fill = Arc::new(Fill::default());
                let stats = Arc::new(Mutex::new(AggregateStats::default()));
                let mut agg = Aggregator::new(cfg.offline_queue, usize::from(cfg.inflight));
                if store.is_some() {
                    agg = agg.durable();
                }
                for s in restored {
                    agg.restore(&s.client_id, &s.subs, s.held);
                }
                for (client_id, will) in wills {
                    agg.restore_will(&client_id, will);
                }
                let task = tokio::spawn(run_connection(
                    i,
                    cfg.clone(),
                    agg,
                    rx,
                    fill.clone(),
                    stats.clone(),
                    events.clone(),
                    ended_tx.clone(),
                    store.clone(),
                ));
                Shard {
                    tx,
                    fill,
                    stats,
                    task: Some(task),
                }
            })
            .collect();
        SharedLinks {
            cfg,
            shards,
            route: HashMap::new(),
            ended,
            store,
        }
    }

    /// What the connections hold, summed.
    pub fn stats(&self) -> AggregateStats {
        let mut sum = AggregateStats::default();
        for s in &self.shards {
            let st = *s.stats.lock().unwrap_or_else(|e| e.into_inner());
            sum.filters += st.filters;
            sum.devices += st.devices;
            sum.away += st.away;
            sum.queued += st.queued;
            sum.queue_dropped += st.queue_dropped;
            sum.unacked += st.unacked;
            sum.taken_over += st.taken_over;
        }
        sum.store_errors = self.store.as_ref().map_or(0, StoreHandle::link_errors);
        sum
    }
}

/// The octets a command holds while queued (topic and payload, or the filter).
fn command_bytes(c: &Command) -> Option<usize> {
    match c {
        Command::Publish { topic, payload, .. } => Some(topic.len() + payload.len()),
        Command::Subscribe { filter, .. } => Some(filter.len()),
        _ => None,
    }
}

impl BrokerLink for SharedLinks {
    fn execute(&mut self, key: ClientKey, command: Command) -> Option<BrokerEvent> {
        let index = match &command {
            Command::Connect(p) => {
                let i = shard_of(&p.client_id, self.shards.len());
                self.route.insert(key, i);
                i
            }
            Command::Expire { client_id } => shard_of(client_id, self.shards.len()),
            _ if key == GATEWAY_KEY => 0,
            _ => match self.route.get(&key) {
                Some(i) => *i,
                None => {
                    return match command {
                        Command::Publish { token, .. }
                        | Command::Subscribe { token, .. }
                        | Command::Unsubscribe { token, .. } => Some(BrokerEvent::Rejected {
                            token,
                            reason: RejectReason::Closed,
                        }),
                        _ => None,
                    }
                }
            },
        };
        if matches!(command, Command::Disconnect { .. }) {
            self.route.remove(&key);
        }
        let shard = self.shards.get(index)?;
        if let Some(size) = command_bytes(&command) {
            let held = shard.fill.requests.load(Ordering::Acquire);
            let bytes = shard.fill.bytes.load(Ordering::Acquire);
            if held >= self.cfg.backlog_capacity || bytes + size > self.cfg.backlog_bytes {
                let token = match &command {
                    Command::Publish { token, .. } | Command::Subscribe { token, .. } => *token,
                    _ => 0,
                };
                return Some(BrokerEvent::Rejected {
                    token,
                    reason: RejectReason::Full,
                });
            }
            shard.fill.requests.fetch_add(1, Ordering::AcqRel);
            shard.fill.bytes.fetch_add(size, Ordering::AcqRel);
        }
        let size = command_bytes(&command);
        if shard.tx.send(Input::Command(key, command)).is_err() {
            if let Some(size) = size {
                shard.fill.requests.fetch_sub(1, Ordering::AcqRel);
                shard.fill.bytes.fetch_sub(size, Ordering::AcqRel);
            }
            self.route.remove(&key);
            return Some(BrokerEvent::Closed {
                reason: "the shared broker connection has stopped".into(),
            });
        }
        None
    }

    fn active(&self) -> usize {
        self.route.len()
    }

    /// The shared connections (devices are bounded by `limits.max_clients`, not by them).
    fn max_connections(&self) -> usize {
        self.shards.len()
    }

    fn reap(&mut self) {
        while let Ok(key) = self.ended.try_recv() {
            self.route.remove(&key);
        }
    }

    fn tasks(&self) -> usize {
        self.shards
            .iter()
            .filter(|s| s.task.as_ref().is_some_and(|t| !t.is_finished()))
            .count()
    }

    fn close_all(&mut self) {
        for s in &self.shards {
            let _ = s.tx.send(Input::Close);
        }
    }

    fn wait_closed(&mut self, deadline: tokio::time::Instant) -> impl std::future::Future<Output = usize> + Send {
        let tasks: Vec<JoinHandle<()>> = self.shards.iter_mut().filter_map(|s| s.task.take()).collect();
        async move {
            let mut left = 0;
            for t in tasks {
                if tokio::time::timeout_at(deadline, t).await.is_err() {
                    left += 1;
                }
            }
            left
        }
    }
}

/// Tags of requests handed to rumqttc, in the order rumqttc reports them sent (one
/// queue per kind, as rumqttc keeps each kind in order), and the packet ids since chosen.
#[derive(Default)]
struct Tags {
    publishes: VecDeque<Option<Tag>>,
    /// The filters' tags of each SUBSCRIBE packet.
    subscribes: VecDeque<Vec<Tag>>,
}

/// How often a connection's task refreshes the stats the metrics read.
const STATS_EVERY: Duration = Duration::from_millis(100);

/// Filters in one SUBSCRIBE packet, at most.
const SUBSCRIBE_BATCH: usize = 64;

/// What a connection's poll task reports.
enum Polled {
    Up,
    Message(Publish),
    Published(Tag),
    /// A SUBACK: each filter's tag with what was granted.
    Subscribed(Vec<(Tag, Option<super::MqttQos>)>),
    /// A PUBCOMP: the QoS 2 publish in flight is complete.
    Completed,
    Down(String, bool),
}

fn options(cfg: &BrokerConfig, index: usize) -> MqttOptions {
    let id = format!("{}{}-{}", cfg.client_id_prefix, cfg.aggregate_client_id, index);
    let mut o = MqttOptions::new(id, cfg.host.clone(), cfg.port);
    o.set_clean_session(true)
        .set_keep_alive(Duration::from_secs(60))
        .set_manual_acks(true)
        // rumqttc numbers packets from a counter cycling through 1..=inflight and may hand
        // out an id whose exchange is not over (a QoS 2 publish awaiting its PUBCOMP, a
        // SUBSCRIBE awaiting its SUBACK); the broker then takes the new packet for a
        // duplicate. With the whole id space an id comes back only after 65,535 others,
        // long after its exchange ended. (Costs rumqttc's per-id tables, a few MB per
        // shared connection.) The bound on what devices have in flight is theirs.
        .set_inflight(u16::MAX)
        .set_max_packet_size(256 * 1024, 256 * 1024);
    if let Some(tls) = &cfg.tls {
        o.set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            tls.config(),
        )));
    }
    match (&cfg.username, &cfg.password) {
        (Some(u), Some(p)) => {
            o.set_credentials(u.clone(), p.clone());
        }
        (Some(u), None) => {
            o.set_credentials(u.clone(), String::new());
        }
        _ => {}
    }
    o
}

/// One shared connection: opened, served until lost, opened again after a pause, until
/// the gateway shuts down.
#[allow(clippy::too_many_arguments)]
async fn run_connection(
    index: usize,
    cfg: Arc<BrokerConfig>,
    mut agg: Aggregator,
    mut rx: mpsc::UnboundedReceiver<Input>,
    fill: Arc<Fill>,
    stats: Arc<Mutex<AggregateStats>>,
    events: mpsc::Sender<(ClientKey, BrokerEvent)>,
    ended: mpsc::UnboundedSender<ClientKey>,
    store: Option<StoreHandle>,
) {
    let mut pause = Duration::from_millis(250);
    let mut shell = Shell {
        fill,
        stats,
        events,
        ended,
        store,
        subscribes: VecDeque::new(),
        subscribing: false,
        qos2: VecDeque::new(),
        qos2_busy: false,
    };
    let mut refresh = tokio::time::interval(STATS_EVERY);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        agg.connecting();
        shell.subscribes.clear();
        shell.subscribing = false;
        shell.qos2.clear();
        shell.qos2_busy = false;
        let (client, mut eventloop) = AsyncClient::new(options(&cfg, index), cfg.request_capacity.max(1));
        eventloop
            .network_options
            .set_connection_timeout(cfg.connect_timeout_secs.max(1));
        let tags = Arc::new(Mutex::new(Tags::default()));
        let (polled_tx, mut polled) = mpsc::unbounded_channel();
        let poller = tokio::spawn(poll(eventloop, tags.clone(), polled_tx, cfg.clone()));
        let mut was_up = false;
        let closing = loop {
            tokio::select! {
                biased;
                _ = refresh.tick() => shell.refresh(&agg),
                p = polled.recv() => match p {
                    Some(Polled::Up) => {
                        info!(connection = index, broker = %cfg.url(), "shared broker connection up");
                        was_up = true;
                        agg.connected();
                    }
                    Some(Polled::Message(p)) => agg.message(p.topic.into(), p.payload, our_qos(p.qos), p.retain, p.pkid),
                    Some(Polled::Published(tag)) => agg.published(tag),
                    Some(Polled::Completed) => shell.qos2_busy = false,
                    Some(Polled::Subscribed(answers)) => {
                        shell.subscribing = false;
                        agg.subscribed(&answers);
                    }
                    Some(Polled::Down(reason, refused)) => {
                        warn!(connection = index, %reason, "shared broker connection lost; its sessions are closed");
                        agg.lost(&reason, refused);
                        break false;
                    }
                    None => {
                        agg.lost("the broker connection ended", false);
                        break false;
                    }
                },
                input = rx.recv() => match input {
                    Some(Input::Command(key, c)) => {
                        shell.taken(&c);
                        agg.command(key, c);
                    }
                    Some(Input::Close) | None => break true,
                },
            }
            if !shell.flush(&mut agg, &client, &tags).await {
                return; // The gateway is stopping.
            }
        };
        if closing {
            let _ = shell.flush(&mut agg, &client, &tags).await;
            let _ = client.disconnect().await;
            let wait = Duration::from_secs(cfg.connect_timeout_secs.max(1));
            if tokio::time::timeout(wait, poller).await.is_err() {
                debug!(connection = index, "shared broker connection did not close in time");
            }
            return;
        }
        poller.abort();
        if !shell.flush(&mut agg, &client, &tags).await {
            return;
        }
        if was_up {
            pause = Duration::from_millis(250);
        }
        // Down: CONNECTs are answered at once (congestion) until the next attempt.
        let until = tokio::time::Instant::now() + pause;
        pause = (pause * 2).min(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                _ = refresh.tick() => shell.refresh(&agg),
                input = rx.recv() => match input {
                    Some(Input::Command(key, c)) => {
                        shell.taken(&c);
                        agg.command(key, c);
                        if !shell.flush(&mut agg, &client, &tags).await {
                            return;
                        }
                    }
                    Some(Input::Close) | None => return,
                },
            }
        }
    }
}

/// What the connection task moves: its queue bound, its stats, the sessions' events.
struct Shell {
    fill: Arc<Fill>,
    stats: Arc<Mutex<AggregateStats>>,
    events: mpsc::Sender<(ClientKey, BrokerEvent)>,
    /// Told the sessions this connection ended, for the link's routes.
    ended: mpsc::UnboundedSender<ClientKey>,
    /// Where the aggregator's writes go (with a state store).
    store: Option<StoreHandle>,
    /// SUBSCRIBEs waiting for the one in flight to be answered. rumqttc numbers
    /// SUBSCRIBE packets without checking which ids are still unanswered (they cycle
    /// through `inflight`), so one at a time keeps SUBACKs unambiguous; what queues
    /// meanwhile goes in the next packet, many filters at once.
    subscribes: VecDeque<(Tag, Arc<str>, super::MqttQos)>,
    subscribing: bool,
    /// QoS 2 publishes waiting for the one in flight to complete (PUBCOMP). rumqttc
    /// hands out the packet id of a QoS 2 publish again as soon as its PUBREC is in,
    /// while the broker still waits for its PUBREL: a second QoS 2 publish with that id is
    /// taken for a duplicate and lost. One at a time, none can be; until the connection
    /// task owns its packet ids (issue 10), that is what a shared connection pays.
    qos2: VecDeque<Request>,
    qos2_busy: bool,
}

impl Shell {
    /// A queued command was taken off the channel.
    fn taken(&self, c: &Command) {
        if let Some(size) = command_bytes(c) {
            self.fill.requests.fetch_sub(1, Ordering::AcqRel);
            self.fill.bytes.fetch_sub(size, Ordering::AcqRel);
        }
    }

    /// Carries out what the aggregator queued; `false` once the gateway has stopped
    /// listening for events.
    async fn flush(&mut self, agg: &mut Aggregator, client: &AsyncClient, tags: &Mutex<Tags>) -> bool {
        let mut ops: Vec<StoreOp> = Vec::new();
        let mut outputs: Vec<Output> = Vec::new();
        while let Some(o) = agg.poll_output() {
            match o {
                Output::Store(op) => ops.push(op),
                o => outputs.push(o),
            }
        }
        // The durability rule: what the aggregator stored is committed (one transaction
        // for the whole batch) before anything it queued is carried out, so the broker
        // is acknowledged only for what is on disk.
        if let (false, Some(store)) = (ops.is_empty(), self.store.clone()) {
            // An fsync: off the runtime's threads.
            if tokio::task::spawn_blocking(move || store.commit_for_link(&ops))
                .await
                .is_err()
            {
                warn!("state store commit task failed");
            }
        }
        for o in outputs {
            match o {
                Output::Store(_) => {}
                Output::Session(key, e) => {
                    if matches!(e, BrokerEvent::Closed { .. } | BrokerEvent::ConnectFailed { .. }) {
                        let _ = self.ended.send(key);
                    }
                    if self.events.send((key, e)).await.is_err() {
                        return false;
                    }
                }
                Output::Broker(r) => {
                    if let Request::Publish {
                        qos: super::MqttQos::ExactlyOnce,
                        ..
                    } = r
                    {
                        self.qos2.push_back(r);
                        continue;
                    }
                    if let Request::Subscribe { tag, filter, qos } = r {
                        self.subscribes.push_back((tag, filter, qos));
                        continue;
                    }
                    send(client, tags, r).await;
                }
            }
        }
        if !self.qos2_busy {
            if let Some(r) = self.qos2.pop_front() {
                self.qos2_busy = true;
                send(client, tags, r).await;
            }
        }
        if !self.subscribing && !self.subscribes.is_empty() {
            let n = self.subscribes.len().min(SUBSCRIBE_BATCH);
            let batch: Vec<_> = self.subscribes.drain(..n).collect();
            let filters = batch
                .iter()
                .map(|(_, f, q)| rumqttc::SubscribeFilter::new(f.to_string(), rumqttc_qos(*q)));
            let filters: Vec<_> = filters.collect();
            let batch_tags = batch.iter().map(|(t, _, _)| *t).collect();
            tags.lock()
                .unwrap_or_else(|e| e.into_inner())
                .subscribes
                .push_back(batch_tags);
            self.subscribing = true;
            if let Err(e) = client.subscribe_many(filters).await {
                debug!(error = %e, "SUBSCRIBE not handed to the shared connection");
            }
        }
        true
    }

    /// Refreshes the stats the metrics read. Counting walks every device, so this runs
    /// every STATS_EVERY (the runtime's snapshot period), not once per message.
    fn refresh(&self, agg: &Aggregator) {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = agg.stats();
    }
}

/// Hands one request to rumqttc (its tag first, so the poll task pairs it with the
/// packet id rumqttc reports). A failure means the connection's event loop is gone: its
/// poll task reports that, and the aggregator closes the sessions.
async fn send(client: &AsyncClient, tags: &Mutex<Tags>, r: Request) {
    let sent = match r {
        Request::Publish {
            tag,
            topic,
            payload,
            qos,
            retain,
        } => {
            tags.lock().unwrap_or_else(|e| e.into_inner()).publishes.push_back(tag);
            client.publish_bytes(&*topic, rumqttc_qos(qos), retain, payload).await
        }
        Request::Subscribe { tag, filter, qos } => {
            tags.lock()
                .unwrap_or_else(|e| e.into_inner())
                .subscribes
                .push_back(vec![tag]);
            client.subscribe(&*filter, rumqttc_qos(qos)).await
        }
        Request::Unsubscribe { filter } => client.unsubscribe(&*filter).await,
        Request::Ack { pkid, qos } => {
            let mut p = Publish::new("", rumqttc_qos(qos), Vec::new());
            p.pkid = pkid;
            client.ack(&p).await
        }
    };
    if let Err(e) = sent {
        debug!(error = %e, "request not handed to the shared connection");
    }
}

/// Polls one connection's event loop until it fails or closes, pairing rumqttc's packet
/// ids with the aggregator's tags.
async fn poll(
    mut eventloop: EventLoop,
    tags: Arc<Mutex<Tags>>,
    out: mpsc::UnboundedSender<Polled>,
    cfg: Arc<BrokerConfig>,
) {
    let mut publishes: HashMap<u16, Tag> = HashMap::new();
    let mut subscribes: HashMap<u16, Vec<Tag>> = HashMap::new();
    loop {
        let polled = match eventloop.poll().await {
            Ok(Event::Incoming(i)) => match i {
                Incoming::ConnAck(_) => Some(Polled::Up),
                Incoming::Publish(p) => Some(Polled::Message(p)),
                Incoming::PubAck(a) => publishes.remove(&a.pkid).map(Polled::Published),
                Incoming::PubRec(a) => publishes.remove(&a.pkid).map(Polled::Published),
                Incoming::PubComp(_) => Some(Polled::Completed),
                Incoming::SubAck(a) => subscribes.remove(&a.pkid).map(|tags| {
                    // A missing return code (a short SUBACK) counts as a refusal.
                    let answers = tags.iter().enumerate().map(|(i, tag)| {
                        let granted = match a.return_codes.get(i) {
                            Some(SubscribeReasonCode::Success(q)) => Some(our_qos(*q)),
                            _ => None,
                        };
                        (*tag, granted)
                    });
                    Polled::Subscribed(answers.collect())
                }),
                _ => None,
            },
            Ok(Event::Outgoing(o)) => {
                let mut t = tags.lock().unwrap_or_else(|e| e.into_inner());
                match o {
                    Outgoing::Publish(pkid) => {
                        if let Some(Some(tag)) = t.publishes.pop_front() {
                            publishes.insert(pkid, tag);
                        }
                    }
                    Outgoing::Subscribe(pkid) => {
                        if let Some(tags) = t.subscribes.pop_front() {
                            subscribes.insert(pkid, tags);
                        }
                    }
                    Outgoing::Disconnect => {
                        drop(t);
                        super::mqtt::wait_for_close(&mut eventloop).await;
                        return;
                    }
                    _ => {}
                }
                None
            }
            Err(e) => {
                let (reason, refused) = super::mqtt::failure(&cfg, &e);
                let _ = out.send(Polled::Down(reason, refused));
                return;
            }
        };
        if let Some(p) = polled {
            if out.send(p).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::shard_of;

    #[test]
    fn a_client_id_always_goes_to_the_same_connection() {
        for n in 1..5 {
            for id in ["a", "sensor-17", ""] {
                let s = shard_of(id, n);
                assert!(s < n);
                assert_eq!(s, shard_of(id, n));
            }
        }
        let spread: std::collections::HashSet<usize> = (0..100).map(|i| shard_of(&format!("d{i}"), 4)).collect();
        assert_eq!(spread.len(), 4, "devices are spread over every connection");
    }
}
