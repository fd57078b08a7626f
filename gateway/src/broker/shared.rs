//! Aggregating mode's shell: `broker.connections` shared MQTT connections (each a
//! [`super::conn`] task), the devices spread over them by client id, each connection's
//! [`Aggregator`] driven by its own task.
//!
//! The link only routes commands to the task of the device's connection; everything a
//! broker would do per client is the aggregator's. Each connection is opened with clean
//! session: after a loss the gateway subscribes again what its away devices hold, and the
//! sessions that were on it are closed (as they would be in transparent mode).
//!
//! With a state store, each task commits its aggregator's writes (subscriptions, held
//! messages) in one transaction per batch of work, on a blocking thread, before it carries
//! out anything queued after them: acknowledgements to the broker wait for the commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::aggregate::{AggregateStats, Aggregator, Output, Request, Tag};
use super::conn::{self, ConnEvent, ConnOptions, ConnRequest};
use super::mqtt::BrokerConfig;
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
    /// The filters the broker held for each connection's persistent session.
    pub broker_filters: Vec<(u16, String)>,
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
        let (store, restored, wills, broker_filters) = match durable {
            Some(d) => (Some(d.store), d.sessions, d.wills, d.broker_filters),
            None => (None, Vec::new(), Vec::new(), Vec::new()),
        };
        let mut filters_of: Vec<Vec<String>> = (0..n).map(|_| Vec::new()).collect();
        let mut orphaned = std::collections::BTreeSet::new();
        for (connection, filter) in broker_filters {
            match filters_of.get_mut(usize::from(connection)) {
                Some(f) => f.push(filter),
                None => {
                    orphaned.insert(connection);
                }
            }
        }
        for connection in orphaned {
            warn!(
                connection,
                client_id = %format!("{}{}-{}", cfg.client_id_prefix, cfg.aggregate_client_id, connection),
                "an earlier run had more shared connections: the broker may keep this one's session (and queue messages for it) until it expires it"
            );
        }
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
                let mut agg = Aggregator::new(cfg.offline_queue, usize::from(cfg.inflight))
                    .numbered(u16::try_from(i).unwrap_or(u16::MAX));
                if store.is_some() {
                    agg = agg.durable();
                }
                for filter in std::mem::take(&mut filters_of[i]) {
                    agg.restore_broker_filter(&filter);
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

/// How often a connection's task refreshes the stats the metrics read.
const STATS_EVERY: Duration = Duration::from_millis(100);

/// Filters in one SUBSCRIBE packet, at most.
const SUBSCRIBE_BATCH: usize = 64;

/// The largest packet taken from the broker (its remaining length).
const MAX_PACKET: usize = 256 * 1024;

/// How shared connection `index` is opened. Its own QoS 1/2 publishes in flight are
/// bounded by `broker.inflight` (beyond, they wait in order): a broker may silently drop
/// what exceeds its own window (Mosquitto's `max_inflight_messages`), so this must stay
/// within it. The connection task owns its packet ids, so no id of an exchange still
/// open is handed out again.
///
/// With a state store (`persistent`), the session is clean-session false: the broker
/// keeps the gateway's subscriptions and queues the messages published while the gateway
/// is down or the connection lost, and hands them over when the session is resumed.
fn options(cfg: &BrokerConfig, index: usize, persistent: bool) -> ConnOptions {
    let sources = &cfg.source_addresses;
    ConnOptions {
        host: cfg.host.clone(),
        port: cfg.port,
        tls: cfg.tls.as_ref().map(|tls| tls.config()),
        // The shared connections spread over the source addresses like devices' do.
        source: sources.get(index % sources.len().max(1)).copied(),
        client_id: format!("{}{}-{}", cfg.client_id_prefix, cfg.aggregate_client_id, index),
        clean_session: !persistent,
        keep_alive: Duration::from_secs(60),
        credentials: cfg
            .username
            .as_ref()
            .map(|u| (u.clone(), cfg.password.clone().unwrap_or_default())),
        will: None,
        connect_timeout: Duration::from_secs(cfg.connect_timeout_secs.max(1)),
        inflight: cfg.inflight.max(1),
        max_packet_size: MAX_PACKET,
    }
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
        requests: None,
        subscribes: Vec::new(),
        batches: HashMap::new(),
        next_tag: 0,
    };
    let mut refresh = tokio::time::interval(STATS_EVERY);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        agg.connecting();
        shell.batches.clear();
        // The link bounds what is queued towards this task (`Fill`); what the aggregator
        // hands on is bounded by the devices' own windows.
        let (requests, queue) = conn::queue(usize::MAX, usize::MAX);
        shell.requests = Some(requests);
        let (polled_tx, mut polled) = mpsc::unbounded_channel();
        let poller = conn::spawn(options(&cfg, index, shell.store.is_some()), queue, polled_tx);
        let mut was_up = false;
        let closing = loop {
            tokio::select! {
                biased;
                _ = refresh.tick() => shell.refresh(&agg),
                p = polled.recv() => match p {
                    Some(ConnEvent::Connected { session_present }) => {
                        info!(connection = index, broker = %cfg.url(), session_present, "shared broker connection up");
                        was_up = true;
                        agg.connected_to_session(session_present);
                    }
                    Some(ConnEvent::Message { topic, payload, qos, retain, pkid, .. }) => {
                        agg.message(topic, payload, qos, retain, pkid);
                    }
                    Some(ConnEvent::Published { tag }) => agg.published(tag),
                    Some(ConnEvent::SubAck { tag, granted }) => {
                        if let Some(answers) = shell.subscribed(tag, &granted) {
                            agg.subscribed(&answers);
                        }
                    }
                    Some(ConnEvent::UnsubAck { .. }) => {}
                    Some(ConnEvent::ConnectFailed { reason, refused }) => {
                        warn!(connection = index, %reason, "shared broker connection lost; its sessions are closed");
                        agg.lost(&reason, refused);
                        break false;
                    }
                    Some(ConnEvent::Closed { reason }) => {
                        warn!(connection = index, %reason, "shared broker connection lost; its sessions are closed");
                        agg.lost(&reason, false);
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
            if !shell.flush(&mut agg).await {
                return; // The gateway is stopping.
            }
        };
        if closing {
            let _ = shell.flush(&mut agg).await;
            if let Some(requests) = shell.requests.take() {
                // After what is queued, and once the publishes in flight are complete.
                let _ = requests.send_anyway(ConnRequest::Disconnect);
            }
            // The task's own bounds: the drain (connect timeout) and the close wait (1 s).
            let wait = Duration::from_secs(cfg.connect_timeout_secs.max(1)) * 2 + Duration::from_secs(1);
            if tokio::time::timeout(wait, poller).await.is_err() {
                debug!(connection = index, "shared broker connection did not close in time");
            }
            return;
        }
        poller.abort();
        // What is handed on until the next attempt goes nowhere (the aggregator has closed
        // the sessions; its subscriptions are made again once up).
        shell.requests = None;
        if !shell.flush(&mut agg).await {
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
                        if !shell.flush(&mut agg).await {
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
    /// The connection task's request queue (`None` while down).
    requests: Option<conn::Requests>,
    /// Subscriptions the aggregator asked for in this batch of work: they go in as few
    /// SUBSCRIBE packets as fit (the connection task numbers each with an id of its own,
    /// so any number may be in flight).
    subscribes: Vec<(Tag, Arc<str>, super::MqttQos)>,
    /// The filters' tags of each SUBSCRIBE in flight, by the connection's tag of it.
    batches: HashMap<u64, Vec<Tag>>,
    /// The connection's tag of the next SUBSCRIBE or UNSUBSCRIBE.
    next_tag: u64,
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
    async fn flush(&mut self, agg: &mut Aggregator) -> bool {
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
                Output::Broker(Request::Subscribe { tag, filter, qos }) => self.subscribes.push((tag, filter, qos)),
                Output::Broker(r) => self.send(r),
            }
        }
        while !self.subscribes.is_empty() {
            let n = self.subscribes.len().min(SUBSCRIBE_BATCH);
            let batch: Vec<_> = self.subscribes.drain(..n).collect();
            let tag = self.tag();
            self.batches.insert(tag, batch.iter().map(|(t, _, _)| *t).collect());
            let filters = batch.into_iter().map(|(_, f, q)| (f, q)).collect();
            self.request(ConnRequest::Subscribe { tag, filters });
        }
        true
    }

    fn tag(&mut self) -> u64 {
        self.next_tag = self.next_tag.wrapping_add(1);
        self.next_tag
    }

    /// Hands one of the aggregator's requests to the connection task.
    fn send(&mut self, r: Request) {
        let request = match r {
            Request::Publish {
                tag,
                topic,
                payload,
                qos,
                retain,
            } => ConnRequest::Publish {
                tag,
                topic,
                payload,
                qos,
                retain,
            },
            Request::Subscribe { tag, filter, qos } => {
                self.subscribes.push((tag, filter, qos));
                return;
            }
            Request::Unsubscribe { filter } => ConnRequest::Unsubscribe {
                tag: self.tag(),
                filters: vec![filter],
            },
            Request::Ack { pkid, qos } => ConnRequest::Ack { pkid, qos },
        };
        self.request(request);
    }

    /// Queues `request` on the connection. Refused means the connection's task is gone:
    /// its end is reported as an event, and the aggregator closes the sessions.
    fn request(&self, request: ConnRequest) {
        let queued = self.requests.as_ref().is_some_and(|r| r.send_anyway(request).is_ok());
        if !queued {
            debug!("request not handed to the shared connection: it is down");
        }
    }

    /// A SUBACK for the connection's tag `tag`: each filter's tag with what was granted (a
    /// missing return code, in a short SUBACK, counts as a refusal).
    fn subscribed(
        &mut self,
        tag: u64,
        granted: &[Option<super::MqttQos>],
    ) -> Option<Vec<(Tag, Option<super::MqttQos>)>> {
        let tags = self.batches.remove(&tag)?;
        Some(
            tags.into_iter()
                .enumerate()
                .map(|(i, t)| (t, granted.get(i).copied().flatten()))
                .collect(),
        )
    }

    /// Refreshes the stats the metrics read. Counting walks every device, so this runs
    /// every STATS_EVERY (the runtime's snapshot period), not once per message.
    fn refresh(&self, agg: &Aggregator) {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = agg.stats();
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
