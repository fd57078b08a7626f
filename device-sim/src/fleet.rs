//! The fleet: N simulated devices (one tokio task each, each its own UDP socket and radio),
//! the broker-side verifier, and the report.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sn_codec::client::{Client, Event, State};
use sn_codec::QoS;
use tokio::task::JoinSet;

use crate::behaviour::{default_client_id, downlink_topic, Behaviour, DeviceSpec, Next, Schedule};
use crate::device::{Device, Received, Step};
use crate::dtls::{Credentials, HANDSHAKE_TIMEOUT};
use crate::gateway_metrics::{self, Collector, MetricsUrl};
use crate::keys::{FleetKeys, NamePattern, MAX_CLIENT_ID};
use crate::payload::Stamp;
use crate::report::{self, DeviceRecord, LatencyHistogram, Report, ReportInputs, RunFacts};
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
    /// The devices' client ids (`%n`: the device number); `None`: `sim-<run>-<n>`,
    /// unique to the run.
    pub client_id: Option<NamePattern>,
    /// Every device talks to the gateway over DTLS 1.2 (a gateway `[[dtls]]` listener)
    /// with the pre-shared key these give it: one for all (a registry glob entry binds
    /// every device's client id to the one identity), derived per device, or read from
    /// the gateway's registry. The handshake is not subject to the radio model.
    pub dtls: Option<FleetKeys>,
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
    /// A worker process of a spread run failed.
    #[error("{0}")]
    Worker(String),
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
    client_id: Option<NamePattern>,
    dtls: Option<FleetKeys>,
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
        downlink_topic(&self.prefix, self.run, group, index)
    }

    fn client_id(&self, index: u32) -> String {
        client_id(self.client_id.as_ref(), self.run, index as usize)
    }
}

/// The client id of device `index` of run `run`.
fn client_id(pattern: Option<&NamePattern>, run: u32, index: usize) -> String {
    match pattern {
        Some(p) => p.name(index),
        None => default_client_id(run, u32::try_from(index).unwrap_or(u32::MAX)),
    }
}

/// Checks, before any device starts, that the fleet's client ids are usable and that
/// every device has a DTLS key (with `--psk-registry`: an entry for its client id).
fn check_identities(opts: &FleetOptions, run: u32) -> Result<(), FleetError> {
    let devices = opts.scenario.devices();
    if let Some(p) = &opts.client_id {
        p.check(devices, MAX_CLIENT_ID, "--client-id")
            .map_err(FleetError::Invalid)?;
    }
    if let Some(keys) = &opts.dtls {
        keys.check(devices, |n| client_id(opts.client_id.as_ref(), run, n))
            .map_err(FleetError::Invalid)?;
    }
    Ok(())
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

/// Runs the fleet and returns its report and its time series: opens the verifier, starts
/// the monitors, spawns the devices on their ramp, lets them run and drain, waits for late
/// arrivals, and builds the report.
pub async fn run_recorded(opts: FleetOptions) -> Result<Recorded, FleetError> {
    opts.scenario
        .validate()
        .map_err(|e| FleetError::Invalid(e.to_string()))?;
    let started = Instant::now();
    let _ = crate::station::epoch();
    let run = run_id();
    check_identities(&opts, run)?;
    let verifier = if opts.echo {
        None
    } else {
        Some(Verifier::start(&opts.broker, run, &verifier_filters(&opts, run)).await?)
    };
    let elapsed = move || started.elapsed().as_secs_f64();
    // The gateway's counters before any device starts, so that the run's increase is
    // all the fleet's.
    let scraper = match &opts.gateway_metrics {
        Some(url) => Some(Scraper::start(url, elapsed).await),
        None => None,
    };

    let times = Times::new(&opts, elapsed());
    let shared = Arc::new(Shared {
        run,
        gateway: opts.gateway,
        prefix: opts.topic_prefix.clone(),
        groups: opts.scenario.groups.clone(),
        client_id: opts.client_id.clone(),
        dtls: opts.dtls.clone(),
        stop_ms: times.stop_ms(),
        end_ms: times.end_ms(),
        live: Live::default(),
        subscribed: (0..opts.scenario.devices()).map(|_| AtomicBool::new(false)).collect(),
        down_latency: opts
            .scenario
            .groups
            .iter()
            .map(|_| Mutex::new(LatencyHistogram::new()))
            .collect(),
    });
    let watch = verifier.as_ref().map(Verifier::watch);
    let mut monitors = Monitors::start(&shared, watch.clone(), opts.progress, elapsed);

    let (devices, echo) = spawn_devices(&opts, &shared, times.t0_ms, 0..opts.scenario.devices());
    let downlink = verifier
        .as_ref()
        .map(|v| tokio::spawn(downlink_task(shared.clone(), v.publisher())));
    let results = join_devices(devices).await;
    monitors.devices_done();
    if let Some(verifier) = &verifier {
        wait_for_late_arrivals(verifier).await;
    }
    let downlink_sent = match downlink {
        Some(d) => d.await.unwrap_or_default(),
        None => Vec::new(),
    };

    // The last sample: every device done, every late arrival in.
    let mut samples = monitors.stop();
    samples.push(shared.live.sample(elapsed(), watch.as_ref()));
    let timeseries = times.series(samples);
    let gateway_metrics = match scraper {
        Some(s) => Some(s.finish(elapsed).await),
        None => None,
    };
    let arrivals = match verifier {
        Some(v) => Some(v.finish().await),
        None => None,
    };
    // The echo task ends once every device (every sender) is gone.
    let echo_datagrams = match echo {
        Some(task) => task.await.unwrap_or(0),
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
            echo_datagrams,
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

/// This run's id, in every topic and payload. Not from the seed: two runs with the same
/// seed must not see each other's messages.
fn run_id() -> u32 {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(7))
        .unwrap_or(0);
    clock ^ std::process::id().rotate_left(16)
}

/// What the verifier subscribes to: the run's uplink topics, the short topics of QoS -1
/// publishers and, when devices have wills, the run's will topics.
fn verifier_filters(opts: &FleetOptions, run: u32) -> Vec<String> {
    let groups = &opts.scenario.groups;
    let mut filters = vec![format!("{}/{run:08x}/#", opts.topic_prefix)];
    let shorts: HashSet<String> = groups
        .iter()
        .filter(|g| g.qos.minus_one > 0.0)
        .filter_map(|g| g.short_topic.clone())
        .collect();
    filters.extend(shorts);
    if groups.iter().any(|g| g.will) {
        filters.push(format!("{}/{run:08x}-will/#", opts.topic_prefix));
    }
    filters
}

/// The phases of a run on the fleet's clock.
#[derive(Debug, Clone, Copy)]
struct Times {
    /// The first device starts (ms on the fleet's clock).
    t0_ms: u64,
    /// The same, in seconds since the run started (for the time series).
    t0_s: f64,
    /// The longest ramp of any group.
    ramp_ms: u64,
    duration_ms: u64,
    drain_ms: u64,
}

impl Times {
    fn new(opts: &FleetOptions, t0_s: f64) -> Self {
        Times {
            t0_ms: now_ms(),
            t0_s,
            ramp_ms: opts.scenario.groups.iter().map(|g| g.ramp.ms()).max().unwrap_or(0),
            duration_ms: u64::try_from(opts.duration.as_millis()).unwrap_or(u64::MAX),
            drain_ms: u64::try_from(opts.drain.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Publishing stops.
    fn stop_ms(&self) -> u64 {
        self.t0_ms.saturating_add(self.ramp_ms).saturating_add(self.duration_ms)
    }

    /// Devices give up on outstanding exchanges.
    fn end_ms(&self) -> u64 {
        self.stop_ms().saturating_add(self.drain_ms)
    }

    /// The time series of `samples`, with the phases marked.
    fn series(&self, samples: Vec<Sample>) -> TimeSeries {
        let ms = |ms: u64| ms as f64 / 1000.0;
        TimeSeries {
            samples,
            ramp_end_s: self.t0_s + ms(self.ramp_ms),
            publish_end_s: self.t0_s + ms(self.ramp_ms) + ms(self.duration_ms),
            drain_end_s: self.t0_s + ms(self.ramp_ms) + ms(self.duration_ms) + ms(self.drain_ms),
        }
    }
}

/// The gateway's Prometheus endpoint, scraped at the start, every
/// [`gateway_metrics::SCRAPE_INTERVAL`] and at the end.
struct Scraper {
    url: MetricsUrl,
    collector: Arc<Mutex<Collector>>,
    task: tokio::task::JoinHandle<()>,
}

impl Scraper {
    async fn start(url: &MetricsUrl, elapsed: impl Fn() -> f64 + Copy + Send + 'static) -> Self {
        let collector = Arc::new(Mutex::new(Collector::new(url)));
        gateway_metrics::scrape_into(url, &collector, elapsed).await;
        let task = {
            let (url, c) = (url.clone(), collector.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(gateway_metrics::SCRAPE_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    gateway_metrics::scrape_into(&url, &c, elapsed).await;
                }
            })
        };
        Scraper {
            url: url.clone(),
            collector,
            task,
        }
    }

    /// One last scrape, and what the gateway did over the run.
    async fn finish(self, elapsed: impl Fn() -> f64 + Copy) -> gateway_metrics::GatewayMetrics {
        self.task.abort();
        gateway_metrics::scrape_into(&self.url, &self.collector, elapsed).await;
        let m = lock(&self.collector).report();
        m
    }
}

/// What watches a run while it goes: the time-series sampler, the log's summary line and
/// the terminal's progress line.
struct Monitors {
    sampler: tokio::task::JoinHandle<()>,
    samples: Arc<Mutex<Vec<Sample>>>,
    summary: tokio::task::JoinHandle<()>,
    progress: Option<(indicatif::ProgressBar, tokio::task::JoinHandle<()>)>,
}

impl Monitors {
    fn start(
        shared: &Arc<Shared>,
        watch: Option<VerifierWatch>,
        progress: bool,
        elapsed: impl Fn() -> f64 + Send + 'static,
    ) -> Self {
        let total = shared.subscribed.len();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sampler = {
            let (shared, samples) = (shared.clone(), samples.clone());
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
        // The log's view of the run (the progress line is the terminal's): one line at
        // info every SUMMARY_INTERVAL, rather than one per device and event (those are at
        // debug).
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
        let progress = progress.then(|| {
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
        Monitors {
            sampler,
            samples,
            summary,
            progress,
        }
    }

    /// The devices are done: stops the summary and progress lines (the sampler goes on
    /// through the wait for late arrivals).
    fn devices_done(&mut self) {
        if let Some((bar, task)) = self.progress.take() {
            task.abort();
            // Off the terminal before the report prints (on stdout, often the same terminal).
            bar.finish_and_clear();
        }
        self.summary.abort();
    }

    /// Stops watching; returns the samples taken.
    fn stop(mut self) -> Vec<Sample> {
        self.devices_done();
        self.sampler.abort();
        let samples = std::mem::take(&mut *lock(&self.samples));
        samples
    }
}

/// Spawns every device at its place on its group's ramp, over UDP or, for an echo run,
/// over the in-memory network (whose gateway task is returned).
fn spawn_devices(
    opts: &FleetOptions,
    shared: &Arc<Shared>,
    t0: u64,
    slice: std::ops::Range<usize>,
) -> (JoinSet<DeviceRecord>, Option<tokio::task::JoinHandle<u64>>) {
    let total = opts.scenario.devices();
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
            // A worker runs its slice only; every index keeps the seed, ramp place and
            // source address one process would have given it.
            if !slice.contains(&index) {
                index += 1;
                continue;
            }
            let mut rng = SmallRng::seed_from_u64(device_seed(opts.seed, index as u64));
            let offset = if g.count > 1 {
                g.ramp.ms() * k as u64 / g.count as u64
            } else {
                0
            };
            let link = match ports.next() {
                Some(port) => DeviceLink::Memory(port),
                None => DeviceLink::Udp(local_addr(opts.gateway, index, total)),
            };
            let radio_rng = SmallRng::seed_from_u64(rng.gen());
            let task = DeviceTask {
                shared: shared.clone(),
                index: u32::try_from(index).unwrap_or(u32::MAX),
                group: gi,
                start: t0 + offset,
            };
            tasks.spawn(task.run(link, rng, radio_rng));
            index += 1;
        }
    }
    (tasks, echo)
}

/// Time a spread run gives its workers to start before the first device is due.
const WORKER_START: Duration = Duration::from_secs(1);

/// How often a worker writes its live counters.
const WORKER_LIVE_INTERVAL: Duration = Duration::from_millis(250);

impl Live {
    fn counts(&self) -> crate::workers::LiveCounts {
        [
            &self.connected,
            &self.active,
            &self.asleep,
            &self.published,
            &self.acknowledged,
            &self.finished,
            &self.socket_errors,
            &self.retries,
            &self.downlink_sent,
            &self.downlink_received,
        ]
        .map(|a| a.load(Ordering::Relaxed))
    }

    fn store(&self, c: &crate::workers::LiveCounts) {
        let fields = [
            &self.connected,
            &self.active,
            &self.asleep,
            &self.published,
            &self.acknowledged,
            &self.finished,
            &self.socket_errors,
            &self.retries,
            &self.downlink_sent,
            &self.downlink_received,
        ];
        for (a, v) in fields.into_iter().zip(c) {
            a.store(*v, Ordering::Relaxed);
        }
    }
}

/// The shared state of a run whose devices may be elsewhere.
fn shared_for(opts: &FleetOptions, run: u32, times: &Times) -> Arc<Shared> {
    Arc::new(Shared {
        run,
        gateway: opts.gateway,
        prefix: opts.topic_prefix.clone(),
        groups: opts.scenario.groups.clone(),
        client_id: opts.client_id.clone(),
        dtls: opts.dtls.clone(),
        stop_ms: times.stop_ms(),
        end_ms: times.end_ms(),
        live: Live::default(),
        subscribed: (0..opts.scenario.devices()).map(|_| AtomicBool::new(false)).collect(),
        down_latency: opts
            .scenario
            .groups
            .iter()
            .map(|_| Mutex::new(LatencyHistogram::new()))
            .collect(),
    })
}

/// Runs one worker's slice of a spread fleet (see [`run_spread`]): no verifier, no
/// scraper; its live counters and then every device's record go to stdout, one
/// [`crate::workers::Line`] a line, ending with [`crate::workers::Line::End`].
pub async fn run_worker(opts: FleetOptions, spec: crate::workers::WorkerSpec) -> Result<(), FleetError> {
    use crate::workers::Line;
    use std::io::Write as _;
    opts.scenario
        .validate()
        .map_err(|e| FleetError::Invalid(e.to_string()))?;
    if !crate::station::set_epoch_unix_us(spec.epoch_unix_us) {
        return Err(FleetError::Invalid(
            "the worker's clock was read before it was set".into(),
        ));
    }
    let mut times = Times::new(&opts, 0.0);
    times.t0_ms = spec.t0_ms;
    let shared = shared_for(&opts, spec.run, &times);
    let write = |line: &Line| -> std::io::Result<()> {
        let mut text = serde_json::to_string(line).map_err(std::io::Error::other)?;
        text.push('\n');
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()
    };
    let live = {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                // The parent gone (a broken pipe): nothing left to report to.
                if write(&Line::Live(shared.live.counts())).is_err() {
                    std::process::exit(3);
                }
                tokio::time::sleep(WORKER_LIVE_INTERVAL).await;
            }
        })
    };
    let (devices, _) = spawn_devices(&opts, &shared, times.t0_ms, spec.devices.clone());
    let results = join_devices(devices).await;
    live.abort();
    let io =
        |e: std::io::Error| FleetError::Invalid(format!("worker {}: cannot write to its parent: {e}", spec.number));
    write(&Line::Live(shared.live.counts())).map_err(io)?;
    let n = results.len();
    for r in results {
        write(&Line::Record(Box::new(r.into()))).map_err(io)?;
    }
    write(&Line::End(n)).map_err(io)?;
    Ok(())
}

/// One worker process of a spread run.
struct WorkerProc {
    number: usize,
    devices: std::ops::Range<usize>,
    child: tokio::process::Child,
}

impl WorkerProc {
    fn name(&self) -> String {
        let pid = self.child.id().map_or_else(String::new, |p| format!(", pid {p}"));
        format!(
            "worker {} (devices {}..{}{pid})",
            self.number, self.devices.start, self.devices.end
        )
    }

    /// Reads the worker's lines to the end: its live counters into `slot`, its records
    /// returned. A worker that exits without its last line, or with a failure, is an error
    /// naming it.
    async fn collect(
        mut self,
        slot: usize,
        live: Arc<Mutex<Vec<crate::workers::LiveCounts>>>,
        shared: Arc<Shared>,
    ) -> Result<Vec<DeviceRecord>, String> {
        use crate::workers::Line;
        use tokio::io::AsyncBufReadExt as _;
        let name = self.name();
        let Some(stdout) = self.child.stdout.take() else {
            return Err(format!("{name}: no pipe from its stdout"));
        };
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut records = Vec::with_capacity(self.devices.len());
        let mut ended = None;
        loop {
            let line = match lines.next_line().await {
                Ok(Some(l)) => l,
                Ok(None) => break,
                Err(e) => return Err(format!("{name}: cannot read its output: {e}")),
            };
            match serde_json::from_str::<Line>(&line) {
                Ok(Line::Live(c)) => {
                    let mut all = lock(&live);
                    if let Some(s) = all.get_mut(slot) {
                        *s = c;
                    }
                    let mut sum = [0u64; 10];
                    for w in all.iter() {
                        for (t, v) in sum.iter_mut().zip(w) {
                            *t += v;
                        }
                    }
                    shared.live.store(&sum);
                }
                Ok(Line::Record(r)) => records.push(DeviceRecord::from(*r)),
                Ok(Line::End(n)) => ended = Some(n),
                Err(e) => return Err(format!("{name}: unreadable line {line:?}: {e}")),
            }
        }
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| format!("{name}: cannot wait for it: {e}"))?;
        match ended {
            Some(n) if status.success() && n == records.len() => Ok(records),
            Some(n) if n != records.len() => Err(format!("{name}: announced {n} records, sent {}", records.len())),
            _ => Err(format!("{name} ended before reporting its devices ({status})")),
        }
    }
}

/// Runs the fleet over `workers` processes, each this program (`exe`) run with `args`
/// and a hidden `--worker` flag giving it its slice of the device indices (see
/// [`crate::workers`]). The verifier, the gateway scraper, the monitors and the report
/// stay here: every message is checked once, the report is [`report::build`]'s over the
/// merged device records, as for one process. A worker that fails ends the run with an
/// error naming it (the others are killed).
pub async fn run_spread(
    opts: FleetOptions,
    workers: usize,
    exe: &std::path::Path,
    args: &[std::ffi::OsString],
) -> Result<Recorded, FleetError> {
    opts.scenario
        .validate()
        .map_err(|e| FleetError::Invalid(e.to_string()))?;
    if opts.echo {
        return Err(FleetError::Invalid(
            "an echo run cannot be spread over workers (it opens no sockets)".into(),
        ));
    }
    if opts.scenario.groups.iter().any(|g| g.downlink_interval.ms() > 0) {
        // The broker side of the downlink needs each device's subscription state, which
        // lives in its worker.
        return Err(FleetError::Invalid(
            "downlink groups (downlink_interval) are not supported over several workers yet".into(),
        ));
    }
    let started = Instant::now();
    let _ = crate::station::epoch();
    let run = run_id();
    check_identities(&opts, run)?;
    let verifier = Verifier::start(&opts.broker, run, &verifier_filters(&opts, run)).await?;
    let elapsed = move || started.elapsed().as_secs_f64();
    let scraper = match &opts.gateway_metrics {
        Some(url) => Some(Scraper::start(url, elapsed).await),
        None => None,
    };
    let mut times = Times::new(&opts, elapsed());
    times.t0_ms += WORKER_START.as_millis() as u64;
    times.t0_s += WORKER_START.as_secs_f64();
    let shared = shared_for(&opts, run, &times);
    let watch = Some(verifier.watch());
    let mut monitors = Monitors::start(&shared, watch.clone(), opts.progress, elapsed);

    let total = opts.scenario.devices();
    let live = Arc::new(Mutex::new(vec![[0u64; 10]; workers]));
    let mut tasks = JoinSet::new();
    // Read once: every worker gets the very same epoch.
    let epoch_unix_us = crate::station::epoch_unix_us();
    for (number, devices) in crate::workers::slices(total, workers).into_iter().enumerate() {
        let spec = crate::workers::WorkerSpec {
            number,
            devices: devices.clone(),
            run,
            epoch_unix_us,
            t0_ms: times.t0_ms,
        };
        let child = tokio::process::Command::new(exe)
            .args(args)
            .arg("--worker")
            .arg(spec.to_arg())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| FleetError::Invalid(format!("cannot start worker {number} ({}): {e}", exe.display())))?;
        let proc = WorkerProc { number, devices, child };
        tracing::info!(worker = %proc.name(), "worker started");
        tasks.spawn(proc.collect(number, live.clone(), shared.clone()));
    }
    let mut results = Vec::with_capacity(total);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(records)) => results.extend(records),
            // Dropping the other tasks kills their workers (kill_on_drop).
            Ok(Err(e)) => return Err(FleetError::Worker(e)),
            Err(e) => return Err(FleetError::Worker(format!("a worker's reader failed: {e}"))),
        }
    }
    monitors.devices_done();
    wait_for_late_arrivals(&verifier).await;
    let mut samples = monitors.stop();
    samples.push(shared.live.sample(elapsed(), watch.as_ref()));
    let timeseries = times.series(samples);
    let gateway_metrics = match scraper {
        Some(s) => Some(s.finish(elapsed).await),
        None => None,
    };
    let arrivals = Some(verifier.finish().await);
    let report = report::build(ReportInputs {
        facts: RunFacts {
            run_id: format!("{run:08x}"),
            seed: opts.seed,
            gateway: opts.gateway.to_string(),
            broker: format!("{}:{}", opts.broker.host, opts.broker.port),
            duration_s: opts.duration.as_secs_f64(),
            elapsed_s: started.elapsed().as_secs_f64(),
            echo_datagrams: 0,
            gateway_metrics,
        },
        groups: opts.scenario.groups.iter().map(|g| g.name.clone()).collect(),
        devices: results,
        arrivals,
        downlink_sent: vec![0; total],
        downlink_latency: opts.scenario.groups.iter().map(|_| LatencyHistogram::new()).collect(),
    });
    Ok(Recorded { report, timeseries })
}

/// Every device's record, as the devices finish.
async fn join_devices(mut tasks: JoinSet<DeviceRecord>) -> Vec<DeviceRecord> {
    let mut results = Vec::with_capacity(tasks.len());
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(r) => results.push(r),
            Err(e) => tracing::error!(error = %e, "a device task failed"),
        }
    }
    results
}

/// Late arrivals: waits until nothing new arrives for a second (at most 5 s). A
/// disconnected verifier gets the rest of the grace time to come back for what the broker
/// kept in its session.
async fn wait_for_late_arrivals(verifier: &Verifier) {
    let mut last = verifier.distinct();
    let mut quiet_since = Instant::now();
    let grace_end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < grace_end && (quiet_since.elapsed() < Duration::from_secs(1) || !verifier.connected()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = verifier.distinct();
        if n != last {
            last = n;
            quiet_since = Instant::now();
        }
    }
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

/// What of one device the live counters have been told so far: the shell adds the
/// difference between a device's record and this to the fleet's [`Live`] counters.
#[derive(Debug, Default)]
struct Told {
    connected: u64,
    published: u64,
    acknowledged: u64,
    retries: u64,
    broker_may_send: bool,
    gauge: Gauge,
}

impl Told {
    fn update(&mut self, shared: &Shared, index: u32, b: &Behaviour<'_>, dev: &Device<'_>) {
        let live = &shared.live;
        let c = &b.record().counts;
        let add = |told: &mut u64, now: u64, n: &AtomicU64| {
            if now > *told {
                n.fetch_add(now - *told, Ordering::Relaxed);
                *told = now;
            }
        };
        add(&mut self.connected, c.connected, &live.connected);
        add(&mut self.published, c.published, &live.published);
        add(&mut self.acknowledged, c.acknowledged, &live.acknowledged);
        add(&mut self.retries, dev.counters.retries, &live.retries);
        if b.broker_may_send() != self.broker_may_send {
            self.broker_may_send = b.broker_may_send();
            if let Some(f) = shared.subscribed.get(index as usize) {
                f.store(self.broker_may_send, Ordering::Relaxed);
            }
        }
        self.gauge.set(live, dev.client.state());
    }
}

/// Why a device could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenFailure {
    /// Its socket could not be opened.
    Socket,
    /// Its DTLS handshake with the gateway failed.
    Dtls,
}

/// One device of the fleet: the thin shell that moves datagrams and time between its
/// station and its [`Behaviour`].
struct DeviceTask {
    shared: Arc<Shared>,
    index: u32,
    group: usize,
    /// Its place on the ramp (ms on the fleet's clock).
    start: u64,
}

impl DeviceTask {
    async fn run(self, link: DeviceLink, rng: SmallRng, radio_rng: SmallRng) -> DeviceRecord {
        let shared = &self.shared;
        let mut record = DeviceRecord::new(self.index, self.group);
        let Some(g) = shared.groups.get(self.group) else {
            return record;
        };
        let station = match self.open(link, g, radio_rng).await {
            Ok(s) => s,
            Err(failure) => {
                match failure {
                    OpenFailure::Socket => record.counts.socket_errors = 1,
                    OpenFailure::Dtls => record.counts.dtls_failed = 1,
                }
                shared.live.finished.fetch_add(1, Ordering::Relaxed);
                return record;
            }
        };
        let mut spec = DeviceSpec::new(shared.run, &shared.prefix, g, self.group, self.index);
        spec.client_id = shared.client_id(self.index);
        let mut dev = Device::new(Client::new(spec.client_config(g)), station);
        let schedule = Schedule {
            start: self.start,
            stop: shared.stop_ms,
            end: shared.end_ms,
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            crate::station::epoch() + Duration::from_millis(self.start),
        ))
        .await;
        let mut b = Behaviour::new(&spec, g, schedule, rng);
        let mut told = Told::default();
        loop {
            let now = now_us();
            while let Some(e) = dev.poll_event() {
                b.handle_event(&mut dev.client, e, now);
            }
            told.update(shared, self.index, &b, &dev);
            match b.poll(&mut dev.client, now) {
                Next::Done => break,
                // Send at once and look at the events the operation produced.
                Next::Transmit => dev.flush().await,
                Next::Wait(deadline) => {
                    let mut on_message = |r: Received<'_>| {
                        if let Some(latency) = b.handle_message(r, now_us()) {
                            if let Some(h) = shared.down_latency.get(self.group) {
                                lock(h).record(latency);
                            }
                            shared.live.downlink_received.fetch_add(1, Ordering::Relaxed);
                        }
                    };
                    let _: Step = dev.step(Some(deadline), &mut on_message).await;
                }
            }
        }
        // Leave cleanly if still connected (bounded: the gateway may be gone). A gateway
        // that answers the DISCONNECT ends the DTLS session itself (close_notify); in
        // every other case (never connected, the gateway lost) the device ends it, so
        // that the gateway does not hold the session until its idle timeout.
        let mut gateway_closes = false;
        if b.leave(&mut dev.client, now_us()) {
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
                b.leave_unanswered();
            }
            gateway_closes = end == Some(Event::Disconnected);
        }
        if !gateway_closes {
            dev.station.close().await;
        }
        told.update(shared, self.index, &b, &dev);
        told.gauge.set(&shared.live, State::Disconnected);
        let mut record = b.finish();
        record.counts.retries = dev.counters.retries;
        record.counts.radio_dropped = dev.station.counters.dropped;
        record.counts.radio_duplicated = dev.station.counters.duplicated;
        shared.live.finished.fetch_add(1, Ordering::Relaxed);
        record
    }

    /// The device's station (socket and radio, and its DTLS session with its key); an
    /// error (logged, counted) when its socket cannot be opened or its handshake fails.
    async fn open(&self, link: DeviceLink, g: &Group, radio_rng: SmallRng) -> Result<Station, OpenFailure> {
        let shared = &self.shared;
        let (local, e, failure) = match link {
            DeviceLink::Memory(port) => return Ok(Station::memory(port, g.radio, radio_rng)),
            DeviceLink::Udp(local) => {
                let bound = match &shared.dtls {
                    Some(keys) => {
                        let index = self.index as usize;
                        // Checked before the run (check_identities): every device has one.
                        let Some(psk) = keys.psk_for(index, &shared.client_id(self.index)) else {
                            return Err(OpenFailure::Dtls);
                        };
                        let credentials = Credentials::Psk(psk);
                        Station::bind_dtls(
                            local,
                            shared.gateway,
                            &credentials,
                            HANDSHAKE_TIMEOUT,
                            g.radio,
                            radio_rng,
                        )
                        .await
                    }
                    None => Station::bind(local, shared.gateway, g.radio, radio_rng).await,
                };
                match bound {
                    Ok(s) => return Ok(s),
                    // Binding a socket fails with the OS's own errors; the handshake's are ours.
                    Err(e) if shared.dtls.is_some() && e.raw_os_error().is_none() => (local, e, OpenFailure::Dtls),
                    Err(e) => (local, e, OpenFailure::Socket),
                }
            }
        };
        // One warning for the fleet (the rest are in the report's socket_errors).
        if shared.live.socket_errors.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(device = self.index, local = %local, error = %e, "cannot start a device: its socket or its DTLS handshake failed (further failures are counted in the report)");
        } else {
            tracing::debug!(device = self.index, local = %local, error = %e, "cannot start the device");
        }
        Err(failure)
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
