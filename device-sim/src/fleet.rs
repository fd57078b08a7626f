//! The fleet: N simulated devices (one tokio task each, each its own UDP socket and radio),
//! the broker-side verifier, and the report.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sn_codec::client::{Client, Config, Event, State, Will};
use sn_codec::{QoS, ReturnCode, TopicFilter, TopicRef};
use tokio::task::JoinSet;

use crate::device::{Device, Received, Step};
use crate::gateway_metrics::{self, Collector, MetricsUrl};
use crate::payload::Stamp;
use crate::report::{
    self, Counts, DeviceRecord as DeviceResult, LatencyHistogram, Report, ReportInputs, RunFacts, Sent,
};
use crate::scenario::{Group, Scenario};
use crate::station::{now_ms, now_us, Station};
use crate::timeseries::{Sample, TimeSeries};
use crate::verifier::{BrokerUrl, Verifier, VerifierWatch};

/// Time between two samples of the time series ([`TimeSeries`]).
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// How often the fleet's summary line is logged (at info).
const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Devices per source address before the fleet spreads over 127.0.0.1..=127.0.0.254.
pub const DEVICES_PER_ADDRESS: usize = 10_000;

/// How long a device waits before connecting again after losing the gateway or being
/// refused (plus up to as much again at random).
const RECONNECT_BACKOFF_MS: u64 = 1_000;

/// How a fleet runs.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// The gateway's UDP address.
    pub gateway: SocketAddr,
    /// The broker the gateway publishes to, where the verifier subscribes.
    pub broker: BrokerUrl,
    /// The device groups.
    pub scenario: Scenario,
    /// How long devices publish.
    pub duration: Duration,
    /// Seed of every random choice (radio, jitter, QoS picks).
    pub seed: u64,
    /// Time after publishing stops for outstanding exchanges and late arrivals.
    pub drain: Duration,
    /// First topic level.
    pub topic_prefix: String,
    /// Print a progress line on stderr every second.
    pub progress: bool,
    /// No gateway and no broker: devices talk to the in-process [`crate::echo`] gateway
    /// over an in-memory network (measures the simulator alone; nothing is verified).
    pub echo: bool,
    /// The gateway's Prometheus endpoint: scraped at the start, every second and at the
    /// end, for the report's [`crate::gateway_metrics::GatewayMetrics`].
    pub gateway_metrics: Option<MetricsUrl>,
}

/// What a fleet run produced: the report and the run over time.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The report.
    pub report: Report,
    /// One sample per second.
    pub timeseries: TimeSeries,
}

/// How a device reaches its gateway.
enum DeviceLink {
    Udp(SocketAddr),
    Memory(crate::station::MemoryPort),
}

/// The fleet could not run.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The verifier could not subscribe.
    #[error(transparent)]
    Verifier(#[from] crate::verifier::VerifierError),
    /// Invalid options.
    #[error("{0}")]
    Invalid(String),
}

/// Live counters for the progress line.
#[derive(Debug, Default)]
struct Live {
    connected: AtomicU64,
    /// Devices in the active state right now.
    active: AtomicU64,
    /// Devices asleep right now.
    asleep: AtomicU64,
    published: AtomicU64,
    acknowledged: AtomicU64,
    finished: AtomicU64,
    socket_errors: AtomicU64,
    /// Device retransmissions so far.
    retries: AtomicU64,
    /// Downlink messages published so far.
    downlink_sent: AtomicU64,
    /// Distinct downlink messages received by devices so far.
    downlink_received: AtomicU64,
}

impl Live {
    /// The fleet now, for the time series.
    fn sample(&self, elapsed_s: f64, verifier: Option<&VerifierWatch>) -> Sample {
        let published = self.published.load(Ordering::Relaxed);
        let arrived = verifier.map(|v| v.distinct() as u64);
        let recent = verifier
            .map(VerifierWatch::take_recent_latency)
            .filter(|h| !h.is_empty());
        let q = |q: f64| recent.as_ref().map(|h| h.quantile_ms(q));
        Sample {
            elapsed_s,
            connected: self.active.load(Ordering::Relaxed),
            asleep: self.asleep.load(Ordering::Relaxed),
            published,
            acknowledged: self.acknowledged.load(Ordering::Relaxed),
            arrived,
            lost: arrived.map(|a| published.saturating_sub(a)),
            retries: self.retries.load(Ordering::Relaxed),
            downlink_sent: self.downlink_sent.load(Ordering::Relaxed),
            downlink_received: self.downlink_received.load(Ordering::Relaxed),
            uplink_p50_ms: q(0.50),
            uplink_p90_ms: q(0.90),
            uplink_p99_ms: q(0.99),
        }
    }
}

/// What every device task shares.
struct Shared {
    run: u32,
    gateway: SocketAddr,
    prefix: String,
    groups: Vec<Group>,
    /// Publishing stops (ms).
    stop_ms: u64,
    /// Devices give up on outstanding exchanges (ms).
    end_ms: u64,
    live: Live,
    /// Per device: subscribed to its downlink topic (the broker side sends only then).
    subscribed: Vec<AtomicBool>,
    /// Per group: latency of the first copy of each downlink message.
    down_latency: Vec<Mutex<LatencyHistogram>>,
}

impl Shared {
    fn downlink_topic(&self, group: &str, index: u32) -> String {
        format!("{}/{:08x}-down/{group}/{index}", self.prefix, self.run)
    }
}

fn local_addr(gateway: SocketAddr, index: usize, total: usize) -> SocketAddr {
    match gateway {
        SocketAddr::V4(g) if g.ip().is_loopback() => {
            if total > DEVICES_PER_ADDRESS {
                let last = u8::try_from(1 + index % 254).unwrap_or(1);
                SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), 0))
            } else {
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
            }
        }
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// A per-device seed derived from the run seed (splitmix64), so that devices draw
/// independent, reproducible streams.
fn device_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs the fleet and returns its report.
pub async fn run(opts: FleetOptions) -> Result<Report, FleetError> {
    Ok(run_recorded(opts).await?.report)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the fleet and returns its report and its time series.
pub async fn run_recorded(opts: FleetOptions) -> Result<Recorded, FleetError> {
    opts.scenario
        .validate()
        .map_err(|e| FleetError::Invalid(e.to_string()))?;
    let started = Instant::now();
    let _ = crate::station::epoch();
    // Not from the seed: two runs with the same seed must not see each other's messages.
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(7))
        .unwrap_or(0);
    let run = clock ^ std::process::id().rotate_left(16);

    let mut filters = vec![format!("{}/{run:08x}/#", opts.topic_prefix)];
    let shorts: HashSet<String> = opts
        .scenario
        .groups
        .iter()
        .filter(|g| g.qos.minus_one > 0.0)
        .filter_map(|g| g.short_topic.clone())
        .collect();
    filters.extend(shorts);
    if opts.scenario.groups.iter().any(|g| g.will) {
        filters.push(format!("{}/{run:08x}-will/#", opts.topic_prefix));
    }
    let verifier = if opts.echo {
        None
    } else {
        Some(Verifier::start(&opts.broker, run, &filters).await?)
    };
    let elapsed = move || started.elapsed().as_secs_f64();

    // The gateway's counters before any device starts, so that the run's increase is
    // all the fleet's.
    let collector = opts
        .gateway_metrics
        .as_ref()
        .map(|url| (url.clone(), Arc::new(Mutex::new(Collector::new(url)))));
    if let Some((url, c)) = &collector {
        gateway_metrics::scrape_into(url, c, elapsed).await;
    }
    let scraper = collector.clone().map(|(url, c)| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(gateway_metrics::SCRAPE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                gateway_metrics::scrape_into(&url, &c, elapsed).await;
            }
        })
    });

    let total = opts.scenario.devices();
    let t0_s = elapsed();
    let t0 = now_ms();
    let max_ramp = opts.scenario.groups.iter().map(|g| g.ramp.ms()).max().unwrap_or(0);
    let duration_ms = u64::try_from(opts.duration.as_millis()).unwrap_or(u64::MAX);
    let drain_ms = u64::try_from(opts.drain.as_millis()).unwrap_or(u64::MAX);
    let shared = Arc::new(Shared {
        run,
        gateway: opts.gateway,
        prefix: opts.topic_prefix.clone(),
        groups: opts.scenario.groups.clone(),
        stop_ms: t0.saturating_add(max_ramp).saturating_add(duration_ms),
        end_ms: t0
            .saturating_add(max_ramp)
            .saturating_add(duration_ms)
            .saturating_add(drain_ms),
        live: Live::default(),
        subscribed: (0..total).map(|_| AtomicBool::new(false)).collect(),
        down_latency: opts
            .scenario
            .groups
            .iter()
            .map(|_| Mutex::new(LatencyHistogram::new()))
            .collect(),
    });
    let watch = verifier.as_ref().map(Verifier::watch);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (shared, watch, samples) = (shared.clone(), watch.clone(), samples.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let s = shared.live.sample(elapsed(), watch.as_ref());
                lock(&samples).push(s);
            }
        })
    };

    // The log's view of the run (the progress line is the terminal's): one line at info
    // every SUMMARY_INTERVAL, rather than one per device and event (those are at debug).
    let summary = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let l = &shared.live;
                tracing::info!(
                    elapsed_s = started.elapsed().as_secs(),
                    devices = total,
                    active = l.active.load(Ordering::Relaxed),
                    asleep = l.asleep.load(Ordering::Relaxed),
                    connected_once = l.connected.load(Ordering::Relaxed),
                    published = l.published.load(Ordering::Relaxed),
                    acknowledged = l.acknowledged.load(Ordering::Relaxed),
                    finished = l.finished.load(Ordering::Relaxed),
                    "fleet"
                );
            }
        })
    };

    let progress = opts.progress.then(|| {
        let shared = shared.clone();
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        let task_bar = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                let l = &shared.live;
                task_bar.set_message(format!(
                    "connected {}  published {}  acknowledged {}  finished {}/{total}",
                    l.connected.load(Ordering::Relaxed),
                    l.published.load(Ordering::Relaxed),
                    l.acknowledged.load(Ordering::Relaxed),
                    l.finished.load(Ordering::Relaxed),
                ));
                task_bar.tick();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        (bar, task)
    });

    let (mut ports, echo) = if opts.echo {
        let (ports, task) = crate::echo::spawn(total);
        (ports.into_iter(), Some(task))
    } else {
        (Vec::new().into_iter(), None)
    };
    let mut tasks = JoinSet::new();
    let mut index = 0usize;
    for (gi, g) in opts.scenario.groups.iter().enumerate() {
        for k in 0..g.count {
            let mut rng = SmallRng::seed_from_u64(device_seed(opts.seed, index as u64));
            let offset = if g.count > 1 {
                g.ramp.ms() * k as u64 / g.count as u64
            } else {
                0
            };
            let start = t0 + offset;
            let link = match ports.next() {
                Some(port) => DeviceLink::Memory(port),
                None => DeviceLink::Udp(local_addr(opts.gateway, index, total)),
            };
            let radio_rng = SmallRng::seed_from_u64(rng.gen());
            let idx = u32::try_from(index).unwrap_or(u32::MAX);
            tasks.spawn(device_task(shared.clone(), idx, gi, link, start, rng, radio_rng));
            index += 1;
        }
    }
    let downlink = verifier
        .as_ref()
        .map(|v| tokio::spawn(downlink_task(shared.clone(), v.publisher())));
    let mut results = Vec::with_capacity(total);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(r) => results.push(r),
            Err(e) => tracing::error!(error = %e, "a device task failed"),
        }
    }
    if let Some((bar, task)) = progress {
        task.abort();
        // Off the terminal before the report prints (on stdout, often the same terminal).
        bar.finish_and_clear();
    }
    summary.abort();

    if let Some(verifier) = &verifier {
        // Late arrivals: wait until nothing new arrives for a second (at most 5 s).
        let mut last = verifier.distinct();
        let mut quiet_since = Instant::now();
        let grace_end = Instant::now() + Duration::from_secs(5);
        // A disconnected verifier gets the rest of the grace time to come back for what
        // the broker kept in its session.
        while Instant::now() < grace_end && (quiet_since.elapsed() < Duration::from_secs(1) || !verifier.connected()) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let n = verifier.distinct();
            if n != last {
                last = n;
                quiet_since = Instant::now();
            }
        }
    }
    let downlink_sent = match downlink {
        Some(d) => d.await.unwrap_or_default(),
        None => Vec::new(),
    };
    // The last sample: every device done, every late arrival in.
    sampler.abort();
    let last = shared.live.sample(elapsed(), watch.as_ref());
    let timeseries = {
        let mut samples = std::mem::take(&mut *lock(&samples));
        samples.push(last);
        TimeSeries {
            samples,
            ramp_end_s: t0_s + max_ramp as f64 / 1000.0,
            publish_end_s: t0_s + (max_ramp as f64 + duration_ms as f64) / 1000.0,
            drain_end_s: t0_s + (max_ramp as f64 + duration_ms as f64 + drain_ms as f64) / 1000.0,
        }
    };
    let gateway_metrics = match (collector, scraper) {
        (Some((url, c)), Some(scraper)) => {
            scraper.abort();
            gateway_metrics::scrape_into(&url, &c, elapsed).await;
            let m = lock(&c).report();
            Some(m)
        }
        _ => None,
    };
    let arrivals = match verifier {
        Some(v) => Some(v.finish().await),
        None => None,
    };
    let echo_handled = match echo {
        Some(task) => {
            // The echo task ends once every device (every sender) is gone.
            task.await.unwrap_or(0)
        }
        None => 0,
    };
    let downlink_latency = shared.down_latency.iter().map(|h| lock(h).clone()).collect();
    let report = report::build(ReportInputs {
        facts: RunFacts {
            run_id: format!("{run:08x}"),
            seed: opts.seed,
            gateway: if opts.echo {
                "in-process echo".into()
            } else {
                opts.gateway.to_string()
            },
            broker: if opts.echo {
                "none".into()
            } else {
                format!("{}:{}", opts.broker.host, opts.broker.port)
            },
            duration_s: opts.duration.as_secs_f64(),
            elapsed_s: started.elapsed().as_secs_f64(),
            echo_datagrams: echo_handled,
            gateway_metrics,
        },
        groups: opts.scenario.groups.iter().map(|g| g.name.clone()).collect(),
        devices: results,
        arrivals,
        downlink_sent,
        downlink_latency,
    });
    Ok(Recorded { report, timeseries })
}

/// A device's contribution to the live active/asleep counts.
#[derive(Debug, Default)]
struct Gauge {
    active: bool,
    asleep: bool,
}

impl Gauge {
    fn set(&mut self, live: &Live, state: State) {
        let update = |was: &mut bool, is: bool, n: &AtomicU64| {
            if *was != is {
                if is {
                    n.fetch_add(1, Ordering::Relaxed);
                } else {
                    n.fetch_sub(1, Ordering::Relaxed);
                }
                *was = is;
            }
        };
        update(&mut self.active, state == State::Active, &live.active);
        update(&mut self.asleep, state == State::Asleep, &live.asleep);
    }
}

/// What a device does next.
struct Plan {
    next_publish: u64,
    next_connect: u64,
    awake_until: u64,
    seq: u32,
    /// The outstanding QoS 1/2 publish: its message id and index in `sent`.
    pending: Option<(u16, usize)>,
    next_register: u64,
    waking: bool,
    done: bool,
    /// Subscribed to the downlink topic in the current session.
    subscribed: bool,
    /// The CONNECT under way starts a new session (from disconnected).
    fresh_connect: bool,
    /// Extra subscriptions made in the current session.
    subs_done: usize,
}

async fn device_task(
    shared: Arc<Shared>,
    index: u32,
    group: usize,
    link: DeviceLink,
    start: u64,
    mut rng: SmallRng,
    radio_rng: SmallRng,
) -> DeviceResult {
    let mut result = DeviceResult {
        index,
        group,
        counts: Counts {
            devices: 1,
            ..Counts::default()
        },
        sent: Vec::new(),
        downlink: HashMap::new(),
    };
    let Some(g) = shared.groups.get(group) else {
        return result;
    };
    let bound = match link {
        DeviceLink::Memory(port) => Ok(Station::memory(port, g.radio, radio_rng)),
        DeviceLink::Udp(local) => Station::bind(local, shared.gateway, g.radio, radio_rng)
            .await
            .map_err(|e| (local, e)),
    };
    let station = match bound {
        Ok(s) => s,
        Err((local, e)) => {
            // One warning for the fleet (the rest are in the report's socket_errors).
            if shared.live.socket_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(device = index, local = %local, error = %e, "cannot open a device's socket (further failures are counted in the report)");
            } else {
                tracing::debug!(device = index, local = %local, error = %e, "cannot open the device's socket");
            }
            result.counts.socket_errors = 1;
            shared.live.finished.fetch_add(1, Ordering::Relaxed);
            return result;
        }
    };
    let client_id = format!("sim-{:08x}-{index}", shared.run);
    let topic = format!("{}/{:08x}/{}/{index}", shared.prefix, shared.run, g.name);
    let short = g
        .short_topic
        .as_deref()
        .and_then(|s| <[u8; 2]>::try_from(s.as_bytes()).ok());
    let will_topic = format!("{}/{:08x}-will/{}/{index}", shared.prefix, shared.run, g.name);
    let mut will_message = Vec::new();
    Stamp {
        run: shared.run,
        device: index,
        seq: 0,
        qos: QoS::AtLeastOnce,
        sent_us: 0,
    }
    .encode(0, &mut will_message);
    let config = Config {
        will: g.will.then_some(Will {
            topic: &will_topic,
            message: &will_message,
            qos: QoS::AtLeastOnce,
            retain: false,
        }),
        keep_alive: g.keep_alive,
        clean_session: g.clean_session,
        t_retry: u32::try_from(g.t_retry.ms()).unwrap_or(u32::MAX),
        n_retry: g.n_retry,
        n_adv: 0,
        ..Config::new(&client_id)
    };
    let mut dev = Device::new(Client::new(config), station);
    let interval = g.publish_interval.ms();
    let jitter = g.jitter.ms();
    let next_interval = |rng: &mut SmallRng| interval + if jitter > 0 { rng.gen_range(0..=jitter) } else { 0 };

    tokio::time::sleep_until(tokio::time::Instant::from_std(
        crate::station::epoch() + Duration::from_millis(start),
    ))
    .await;
    let first = if interval > 0 {
        rng.gen_range(0..=interval.min(1000))
    } else {
        0
    };
    let mut plan = Plan {
        next_publish: if interval > 0 { start + first } else { u64::MAX },
        next_connect: start,
        awake_until: u64::MAX,
        seq: 0,
        pending: None,
        next_register: 0,
        waking: false,
        done: false,
        subscribed: false,
        fresh_connect: false,
        subs_done: 0,
    };
    let extra_filters: Vec<String> = g
        .subscribe
        .iter()
        .map(|f| {
            f.replace("{prefix}", &shared.prefix)
                .replace("{run}", &format!("{:08x}", shared.run))
                .replace("{group}", &g.name)
                .replace("{device}", &index.to_string())
        })
        .collect();
    let down_topic = shared.downlink_topic(&g.name, index);
    let has_downlink = g.downlink_interval.ms() > 0;
    let down_qos = QoS::from_bits(g.downlink_qos);
    let flag = shared.subscribed.get(index as usize);
    let mut payload = Vec::with_capacity(g.payload_size.max(48));
    let mut gauge = Gauge::default();
    let mut retries_told = 0u64;

    loop {
        let now = now_ms();
        if dev.counters.retries > retries_told {
            shared
                .live
                .retries
                .fetch_add(dev.counters.retries - retries_told, Ordering::Relaxed);
            retries_told = dev.counters.retries;
        }
        while let Some(e) = dev.poll_event() {
            match e {
                Event::Connected => {
                    if result.counts.connected == 0 {
                        shared.live.connected.fetch_add(1, Ordering::Relaxed);
                    }
                    result.counts.connected = 1;
                    result.counts.connects += 1;
                    tracing::debug!(device = index, "connected");
                    plan.waking = false;
                    if plan.fresh_connect && g.clean_session {
                        plan.subscribed = false;
                        plan.subs_done = 0;
                        if let Some(f) = flag {
                            f.store(false, Ordering::Relaxed);
                        }
                    }
                    if let Some(s) = g.sleep {
                        plan.awake_until = now + s.awake.ms();
                    }
                }
                Event::ConnectRejected(_) | Event::Disconnected | Event::GatewayLost => {
                    if g.clean_session {
                        // The session, and with it the subscription, is over: the broker
                        // side stops sending until the device has subscribed again.
                        if let Some(f) = flag {
                            f.store(false, Ordering::Relaxed);
                        }
                    }
                    if e == Event::GatewayLost {
                        if now >= shared.stop_ms {
                            result.counts.disconnect_unanswered += 1;
                        } else {
                            result.counts.gateway_lost += 1;
                        }
                    }
                    if plan.pending.take().is_some() {
                        result.counts.unacknowledged += 1;
                    }
                    plan.waking = false;
                    plan.next_connect = now + RECONNECT_BACKOFF_MS + rng.gen_range(0..=RECONNECT_BACKOFF_MS);
                }
                Event::Published { msg_id } => {
                    if let Some((id, i)) = plan.pending {
                        if id == msg_id {
                            plan.pending = None;
                            if let Some(s) = result.sent.get_mut(i) {
                                s.acked = true;
                                s.acked_us = now_us();
                            }
                            result.counts.acknowledged += 1;
                            shared.live.acknowledged.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Event::PublishRejected { msg_id, topic_id, code } => {
                    tracing::debug!(device = index, msg_id, topic_id, ?code, state = ?dev.client.state(), "PUBLISH rejected");
                    result.counts.rejected += 1;
                    match code {
                        ReturnCode::Congestion => result.counts.rejected_congestion += 1,
                        ReturnCode::InvalidTopicId => result.counts.rejected_invalid_topic_id += 1,
                        _ => result.counts.rejected_other += 1,
                    }
                    if matches!(plan.pending, Some((id, _)) if id == msg_id) {
                        plan.pending = None;
                    }
                    if code == ReturnCode::InvalidTopicId {
                        dev.client.forget_topic(topic_id);
                    }
                }
                Event::Subscribed { .. } => {
                    // One request at a time: the downlink topic is subscribed first.
                    if has_downlink && !plan.subscribed {
                        plan.subscribed = true;
                        if let Some(f) = flag {
                            f.store(true, Ordering::Relaxed);
                        }
                    } else {
                        plan.subs_done += 1;
                    }
                }
                Event::SubscribeRejected { code, .. } if !has_downlink || plan.subscribed => {
                    // An extra filter the gateway refuses: skip it.
                    tracing::debug!(device = index, ?code, "subscription refused; skipped");
                    plan.subs_done += 1;
                }
                Event::RegisterRejected { .. } | Event::SubscribeRejected { .. } => {
                    // Try again a little later rather than hammering a congested gateway.
                    plan.next_register = now + RECONNECT_BACKOFF_MS;
                }
                Event::Asleep => {
                    if plan.waking {
                        tracing::debug!(device = index, "woke, fetched its messages, asleep again");
                        result.counts.wakes += 1;
                        plan.waking = false;
                    } else {
                        tracing::debug!(device = index, "asleep");
                        result.counts.sleeps += 1;
                    }
                }
                Event::WakeUpDue => plan.waking = now < shared.stop_ms && dev.client.wake(now).is_ok(),
                _ => {}
            }
        }
        gauge.set(&shared.live, dev.client.state());
        if plan.done || now >= shared.end_ms {
            break;
        }
        let stopping = now >= shared.stop_ms;
        let mut acted = false;
        let mut next_action = u64::MAX;

        // QoS -1 needs no connection.
        let wants_publish = !stopping && now >= plan.next_publish;
        match dev.client.state() {
            State::Disconnected => {
                if stopping {
                    plan.done = true;
                    acted = true;
                } else if now >= plan.next_connect {
                    acted = dev.client.connect(now).is_ok();
                    plan.fresh_connect = true;
                } else {
                    next_action = plan.next_connect;
                }
            }
            State::Active if !dev.client.is_busy() => {
                let registered = matches!(dev.client.topic(&topic), Some(TopicRef::Normal(_)));
                if stopping && plan.pending.is_none() {
                    acted = dev.client.disconnect(now).is_ok();
                } else if !registered && !stopping {
                    if now < plan.next_register {
                        next_action = plan.next_register;
                    } else {
                        acted = dev.client.register(now, &topic).is_ok();
                    }
                } else if has_downlink && !plan.subscribed && !stopping && now >= plan.next_register {
                    acted = dev
                        .client
                        .subscribe(now, TopicFilter::Name(&down_topic), down_qos)
                        .is_ok();
                    if !acted {
                        plan.next_register = now + RECONNECT_BACKOFF_MS;
                    }
                } else if plan.subs_done < extra_filters.len() && !stopping && now >= plan.next_register {
                    if let Some(f) = extra_filters.get(plan.subs_done) {
                        match dev.client.subscribe(now, TopicFilter::Name(f), QoS::AtLeastOnce) {
                            Ok(_) => acted = true,
                            Err(e) => {
                                tracing::warn!(device = index, filter = %f, error = %e, "cannot subscribe; skipped");
                                plan.subs_done += 1;
                            }
                        }
                    }
                } else if wants_publish {
                    acted = true;
                    publish_one(
                        &mut dev,
                        &mut plan,
                        &mut result,
                        g,
                        short,
                        &topic,
                        &shared,
                        &mut rng,
                        &mut payload,
                        now,
                    );
                    plan.next_publish = now + next_interval(&mut rng);
                } else if g.sleep.is_some() && now >= plan.awake_until {
                    if let Some(s) = g.sleep {
                        let secs = u16::try_from(s.duration.0.as_secs()).unwrap_or(u16::MAX);
                        acted = dev.client.sleep(now, secs).is_ok();
                        plan.awake_until = u64::MAX;
                    }
                } else {
                    next_action = plan.next_publish.min(plan.awake_until);
                    let subscribing = (has_downlink && !plan.subscribed) || plan.subs_done < extra_filters.len();
                    if subscribing && !stopping {
                        next_action = next_action.min(plan.next_register);
                    }
                }
            }
            State::Asleep => {
                if stopping {
                    acted = dev.client.disconnect(now).is_ok();
                } else if wants_publish {
                    if g.qos.minus_one > 0.0 && g.qos.pick(rng.gen()) == QoS::MinusOne {
                        // A sleeping device may publish at QoS -1 without waking the session.
                        publish_minus_one(&mut dev, &mut plan, &mut result, g, short, &shared, &mut payload, now);
                        plan.next_publish = now + next_interval(&mut rng);
                        acted = true;
                    } else {
                        acted = dev.client.connect(now).is_ok();
                        plan.fresh_connect = false;
                    }
                } else {
                    next_action = plan.next_publish;
                }
            }
            _ => {}
        }
        if acted {
            // Send at once and look at the events the operation produced.
            dev.flush().await;
            continue;
        }
        let deadline = next_action.min(shared.end_ms);
        let mut on_message = |r: Received<'_>| {
            if r.topic != Some(down_topic.as_str()) {
                result.counts.received_other += 1;
                return;
            }
            let Some(stamp) = Stamp::decode(r.message.payload) else {
                return;
            };
            if stamp.run != shared.run || stamp.device != index {
                return;
            }
            let n = result.downlink.entry(stamp.seq).or_insert(0);
            if *n == 0 {
                if let Some(h) = shared.down_latency.get(group) {
                    lock(h).record(now_us().saturating_sub(stamp.sent_us));
                }
                shared.live.downlink_received.fetch_add(1, Ordering::Relaxed);
            }
            *n += 1;
        };
        let _: Step = dev.step(Some(deadline), &mut on_message).await;
    }

    // Leave cleanly if still connected (bounded: the gateway may be gone).
    if dev.client.state() != State::Disconnected && dev.client.disconnect(now_ms()).is_ok() {
        let limit = now_ms() + 1_500;
        let mut ignore = |_: Received<'_>| {};
        let end = dev
            .until(
                limit,
                |e| matches!(e, Event::Disconnected | Event::GatewayLost).then_some(e),
                &mut ignore,
            )
            .await;
        if end == Some(Event::GatewayLost) {
            result.counts.disconnect_unanswered += 1;
        }
    }
    if plan.pending.is_some() {
        result.counts.unacknowledged += 1;
    }
    gauge.set(&shared.live, State::Disconnected);
    shared
        .live
        .retries
        .fetch_add(dev.counters.retries.saturating_sub(retries_told), Ordering::Relaxed);
    result.counts.retries = dev.counters.retries;
    result.counts.radio_dropped = dev.station.counters.dropped;
    result.counts.radio_duplicated = dev.station.counters.duplicated;
    shared.live.finished.fetch_add(1, Ordering::Relaxed);
    result
}

#[allow(clippy::too_many_arguments)]
fn publish_minus_one(
    dev: &mut Device<'_>,
    plan: &mut Plan,
    result: &mut DeviceResult,
    g: &Group,
    short: Option<[u8; 2]>,
    shared: &Shared,
    payload: &mut Vec<u8>,
    now: u64,
) {
    let Some(s) = short else { return };
    let stamp = Stamp {
        run: shared.run,
        device: result.index,
        seq: plan.seq,
        qos: QoS::MinusOne,
        sent_us: now_us(),
    };
    stamp.encode(g.payload_size, payload);
    if dev
        .client
        .publish(now, TopicRef::Short(s), payload, QoS::MinusOne, false)
        .is_ok()
    {
        record(plan, result, shared, QoS::MinusOne);
    }
}

fn record(plan: &mut Plan, result: &mut DeviceResult, shared: &Shared, qos: QoS) -> usize {
    let i = result.sent.len();
    result.sent.push(Sent {
        seq: plan.seq,
        qos,
        acked: false,
        sent_us: now_us(),
        acked_us: 0,
    });
    plan.seq += 1;
    let c = &mut result.counts;
    c.published += 1;
    match qos {
        QoS::MinusOne => c.published_qos_m1 += 1,
        QoS::AtMostOnce => c.published_qos0 += 1,
        QoS::AtLeastOnce => c.published_qos1 += 1,
        QoS::ExactlyOnce => c.published_qos2 += 1,
    }
    shared.live.published.fetch_add(1, Ordering::Relaxed);
    i
}

#[allow(clippy::too_many_arguments)]
fn publish_one(
    dev: &mut Device<'_>,
    plan: &mut Plan,
    result: &mut DeviceResult,
    g: &Group,
    short: Option<[u8; 2]>,
    topic: &str,
    shared: &Shared,
    rng: &mut SmallRng,
    payload: &mut Vec<u8>,
    now: u64,
) {
    let qos = g.qos.pick(rng.gen());
    if qos == QoS::MinusOne {
        publish_minus_one(dev, plan, result, g, short, shared, payload, now);
        return;
    }
    let Some(topic_ref) = dev.client.topic(topic) else {
        return;
    };
    let stamp = Stamp {
        run: shared.run,
        device: result.index,
        seq: plan.seq,
        qos,
        sent_us: now_us(),
    };
    stamp.encode(g.payload_size, payload);
    match dev.client.publish(now, topic_ref, payload, qos, false) {
        Ok(msg_id) => {
            let i = record(plan, result, shared, qos);
            if qos != QoS::AtMostOnce {
                plan.pending = Some((msg_id, i));
            }
        }
        Err(e) => tracing::debug!(device = result.index, error = %e, "publish refused by the engine"),
    }
}

/// The broker side of the downlink: every group's `downlink_interval`, one message to each
/// device of the group that is subscribed. Stops early enough that sleeping devices wake
/// (and fetch what the gateway holds for them) before the run ends. Returns how many
/// messages went to each device.
async fn downlink_task(shared: Arc<Shared>, client: rumqttc::AsyncClient) -> Vec<u32> {
    let total = shared.subscribed.len();
    let mut sent = vec![0u32; total];
    let mut ranges = Vec::new();
    let mut first = 0usize;
    for (gi, g) in shared.groups.iter().enumerate() {
        let interval = g.downlink_interval.ms();
        if interval > 0 {
            let slack = g.sleep.map_or(0, |s| s.duration.ms() + s.awake.ms()) + 1_000;
            let cutoff = shared.stop_ms.saturating_sub(slack);
            ranges.push((gi, first, g.count, interval, now_ms() + interval, cutoff));
        }
        first += g.count;
    }
    let mut payload = Vec::new();
    loop {
        let Some(next) = ranges.iter().filter(|r| r.4 < r.5).map(|r| r.4).min() else {
            return sent;
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            crate::station::epoch() + Duration::from_millis(next),
        ))
        .await;
        for (gi, first, count, interval, due, cutoff) in ranges.iter_mut() {
            if *due > next || *due >= *cutoff {
                continue;
            }
            *due += *interval;
            let Some(g) = shared.groups.get(*gi) else { continue };
            let qos = match g.downlink_qos {
                0 => rumqttc::QoS::AtMostOnce,
                1 => rumqttc::QoS::AtLeastOnce,
                _ => rumqttc::QoS::ExactlyOnce,
            };
            for i in *first..*first + *count {
                let subscribed = shared.subscribed.get(i).is_some_and(|f| f.load(Ordering::Relaxed));
                let (Some(n), true) = (sent.get_mut(i), subscribed) else {
                    continue;
                };
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                let stamp = Stamp {
                    run: shared.run,
                    device: index,
                    seq: *n,
                    qos: QoS::from_bits(g.downlink_qos),
                    sent_us: now_us(),
                };
                stamp.encode(g.payload_size, &mut payload);
                let topic = shared.downlink_topic(&g.name, index);
                if client.publish(topic, qos, false, payload.clone()).await.is_err() {
                    return sent;
                }
                *n += 1;
                shared.live.downlink_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
