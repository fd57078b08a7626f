//! The report of a fleet run: what devices did, what reached the broker, and whether a
//! QoS 1/2 guarantee was broken. A table for people ([`Report::table`]) and JSON for
//! machines (serde).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use std::collections::HashMap;

use sn_codec::QoS;

use crate::gateway_metrics::GatewayMetrics;
pub use crate::latency::{LatencyHistogram, MAX_LATENCY_US};
use crate::verifier::Arrivals;

/// Counters of a group (or of the whole fleet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Devices.
    pub devices: u64,
    /// Devices that connected at least once.
    pub connected: u64,
    /// Successful CONNECTs (including reconnections and CONNECTs from sleep).
    pub connects: u64,
    /// Devices whose socket could not be opened.
    pub socket_errors: u64,
    /// Devices whose DTLS handshake with the gateway failed (over `--psk`).
    pub dtls_failed: u64,
    /// PUBLISH messages sent, all QoS.
    pub published: u64,
    /// Of which QoS -1.
    pub published_qos_m1: u64,
    /// Of which QoS 0.
    pub published_qos0: u64,
    /// Of which QoS 1.
    pub published_qos1: u64,
    /// Of which QoS 2.
    pub published_qos2: u64,
    /// QoS 1/2 publishes acknowledged by the gateway (PUBACK / PUBCOMP).
    pub acknowledged: u64,
    /// QoS 1/2 publishes neither acknowledged nor rejected (the device gave up or the
    /// connection was lost).
    pub unacknowledged: u64,
    /// Publishes the gateway rejected with a return code.
    pub rejected: u64,
    /// Of which "congestion".
    pub rejected_congestion: u64,
    /// Of which "invalid topic id".
    pub rejected_invalid_topic_id: u64,
    /// Of which "not supported" (or a reserved code).
    pub rejected_other: u64,
    /// Distinct messages seen at the broker.
    pub arrived: u64,
    /// Published messages never seen at the broker (all QoS).
    pub lost: u64,
    /// Of the lost, QoS 1/2 messages that the gateway had acknowledged: a broken guarantee.
    pub lost_acknowledged: u64,
    /// Of the lost, acknowledged QoS 1/2 messages that reached the broker while the
    /// verifier could not see them (the broker lost the verifier's session, or the
    /// verifier was disconnected at the end): not verifiable, not counted as broken.
    pub lost_unverified: u64,
    /// Extra copies seen at the broker (all QoS).
    pub duplicated: u64,
    /// Of those, copies of QoS 2 messages: a broken guarantee.
    pub duplicated_qos2: u64,
    /// Retransmissions by the devices (Tretry expiries).
    pub retries: u64,
    /// Times devices went to sleep (DISCONNECT with a duration accepted).
    pub sleeps: u64,
    /// Completed wake-ups (PINGREQ with the client id answered by PINGRESP).
    pub wakes: u64,
    /// Times devices lost the gateway (Nretry exhausted) while running.
    pub gateway_lost: u64,
    /// DISCONNECTs at the end of the run that the gateway never answered (Nretry
    /// exhausted while leaving).
    pub disconnect_unanswered: u64,
    /// Messages devices received on their extra `subscribe` filters.
    pub received_other: u64,
    /// Will messages the gateway published for devices of the group (lost devices).
    pub wills: u64,
    /// Downlink messages the broker side published to the devices.
    pub downlink_sent: u64,
    /// Distinct downlink messages that reached their device.
    pub downlink_received: u64,
    /// Downlink messages that never reached their device.
    pub downlink_lost: u64,
    /// Extra copies of downlink messages received by devices.
    pub downlink_duplicated: u64,
    /// Datagrams the radio model dropped (both directions).
    pub radio_dropped: u64,
    /// Datagrams the radio model duplicated (both directions).
    pub radio_duplicated: u64,
}

impl Counts {
    /// Adds another group's counts.
    pub fn add(&mut self, o: &Counts) {
        macro_rules! add {
            ($($f:ident),*) => { $( self.$f += o.$f; )* };
        }
        add!(
            devices,
            connected,
            connects,
            socket_errors,
            dtls_failed,
            published,
            published_qos_m1,
            published_qos0,
            published_qos1,
            published_qos2,
            acknowledged,
            unacknowledged,
            rejected,
            rejected_congestion,
            rejected_invalid_topic_id,
            rejected_other,
            arrived,
            lost,
            lost_acknowledged,
            lost_unverified,
            duplicated,
            duplicated_qos2,
            retries,
            sleeps,
            wakes,
            gateway_lost,
            disconnect_unanswered,
            wills,
            received_other,
            downlink_sent,
            downlink_received,
            downlink_lost,
            downlink_duplicated,
            radio_dropped,
            radio_duplicated
        );
    }

    /// QoS 1/2 guarantees broken.
    pub fn broken(&self) -> u64 {
        self.lost_acknowledged + self.duplicated_qos2
    }
}

/// Percentiles of the latency distribution curve ([`Latency::distribution`]): 0 %, then
/// 1 − 10^(−k/4) for k = 1..=20 (43.8 %, 68.4 %, 82.2 %, 90 %, ... 99.999 %): evenly spaced
/// on the "number of nines" axis where HDR histograms are plotted, and the tail is where
/// latency problems show.
pub fn distribution_quantiles() -> impl Iterator<Item = f64> {
    (0..=20).map(|k| 1.0 - 10f64.powf(-f64::from(k) / 4.0))
}

/// One point of a latency distribution curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentile {
    /// Percentile, 0 to 100.
    pub percentile: f64,
    /// Latency at that percentile, ms.
    pub ms: f64,
}

/// Latency percentiles in milliseconds (from a [`LatencyHistogram`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Samples.
    pub samples: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// The distribution curve, at [`distribution_quantiles`] (empty without samples).
    pub distribution: Vec<Percentile>,
}

impl Latency {
    /// The percentiles of a histogram.
    pub fn from_histogram(h: &LatencyHistogram) -> Latency {
        let distribution = if h.is_empty() {
            Vec::new()
        } else {
            distribution_quantiles()
                .map(|q| Percentile {
                    percentile: q * 100.0,
                    ms: h.quantile_ms(q),
                })
                .collect()
        };
        Latency {
            samples: h.len(),
            p50_ms: h.quantile_ms(0.50),
            p90_ms: h.quantile_ms(0.90),
            p99_ms: h.quantile_ms(0.99),
            max_ms: h.max_ms(),
            distribution,
        }
    }
}

/// One group's results.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GroupReport {
    /// Group name.
    pub name: String,
    /// Counters.
    pub counts: Counts,
    /// Uplink latency (publish to arrival at the broker's subscriber).
    pub uplink_latency: Latency,
    /// Downlink latency (publish at the broker to arrival at the device, time asleep
    /// included).
    pub downlink_latency: Latency,
}

/// The whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Run id (in topics and payloads).
    pub run_id: String,
    /// Seed of the random choices.
    pub seed: u64,
    /// Gateway address.
    pub gateway: String,
    /// Broker address.
    pub broker: String,
    /// Publishing time, seconds.
    pub duration_s: f64,
    /// Wall time of the whole run including ramp and drain, seconds.
    pub elapsed_s: f64,
    /// Per group.
    pub groups: Vec<GroupReport>,
    /// All groups.
    pub total: GroupReport,
    /// Messages on the verifier's topics that were not this run's.
    pub foreign_messages: u64,
    /// Whether a verifier on the broker checked arrivals (false with `--echo`).
    pub verified: bool,
    /// Datagrams the in-process echo gateway handled (`--echo`).
    pub echo_datagrams: u64,
    /// Times the verifier reconnected to the broker. With its session kept by the broker
    /// nothing is missed.
    pub verifier_reconnects: u32,
    /// Of those, times the broker had lost the verifier's session (a restart without
    /// persistence): acknowledged messages missing from around then are counted as
    /// unverified (`lost_unverified`), not as broken guarantees.
    pub verifier_sessions_lost: u32,
    /// The gateway's own counters and gauges over the run, scraped from its Prometheus
    /// endpoint (`--gateway-metrics`); absent when not asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_metrics: Option<GatewayMetrics>,
    /// QoS 1/2 guarantees broken (acknowledged but lost, QoS 2 duplicated).
    pub guarantees_broken: u64,
    /// The first broken guarantees, described.
    pub violations: Vec<String>,
}

impl Report {
    /// Whether every QoS 1/2 guarantee held.
    pub fn ok(&self) -> bool {
        self.guarantees_broken == 0
    }

    /// The summary table, as [`Report::table`] prints it and the HTML page shows it: one
    /// column per group (and a total when there are several groups), one row per counter.
    pub fn summary(&self) -> Summary {
        let mut cols: Vec<&GroupReport> = self.groups.iter().collect();
        if self.groups.len() > 1 {
            cols.push(&self.total);
        }
        let c = |f: fn(&Counts) -> u64| -> Vec<String> { cols.iter().map(|g| f(&g.counts).to_string()).collect() };
        let l = |f: fn(&Latency) -> f64| -> Vec<String> {
            cols.iter().map(|g| format!("{:.1}", f(&g.uplink_latency))).collect()
        };
        let dl = |f: fn(&Latency) -> f64| -> Vec<String> {
            cols.iter().map(|g| format!("{:.1}", f(&g.downlink_latency))).collect()
        };
        let rows: Vec<(&'static str, Vec<String>)> = vec![
            ("devices", c(|c| c.devices)),
            ("connected", c(|c| c.connected)),
            ("connects", c(|c| c.connects)),
            ("published", c(|c| c.published)),
            (
                "  qos -1/0/1/2",
                cols.iter()
                    .map(|g| {
                        let c = &g.counts;
                        format!(
                            "{}/{}/{}/{}",
                            c.published_qos_m1, c.published_qos0, c.published_qos1, c.published_qos2
                        )
                    })
                    .collect(),
            ),
            ("acknowledged (qos 1/2)", c(|c| c.acknowledged)),
            ("unacknowledged (qos 1/2)", c(|c| c.unacknowledged)),
            ("rejected", c(|c| c.rejected)),
            (
                "  congestion/invalid id/other",
                cols.iter()
                    .map(|g| {
                        let c = &g.counts;
                        format!(
                            "{}/{}/{}",
                            c.rejected_congestion, c.rejected_invalid_topic_id, c.rejected_other
                        )
                    })
                    .collect(),
            ),
            ("arrived at broker", c(|c| c.arrived)),
            ("lost", c(|c| c.lost)),
            ("  acknowledged but lost", c(|c| c.lost_acknowledged)),
            ("  acknowledged, unverifiable", c(|c| c.lost_unverified)),
            ("duplicated", c(|c| c.duplicated)),
            ("  qos 2 duplicated", c(|c| c.duplicated_qos2)),
            ("retries", c(|c| c.retries)),
            ("sleeps", c(|c| c.sleeps)),
            ("wakes", c(|c| c.wakes)),
            ("gateway lost", c(|c| c.gateway_lost)),
            ("DISCONNECT unanswered at end", c(|c| c.disconnect_unanswered)),
            ("wills published", c(|c| c.wills)),
            ("received on subscriptions", c(|c| c.received_other)),
            ("radio dropped", c(|c| c.radio_dropped)),
            ("radio duplicated", c(|c| c.radio_duplicated)),
            ("uplink latency p50 ms", l(|l| l.p50_ms)),
            ("uplink latency p90 ms", l(|l| l.p90_ms)),
            ("uplink latency p99 ms", l(|l| l.p99_ms)),
            ("uplink latency max ms", l(|l| l.max_ms)),
        ];
        let mut rows = rows;
        if self.total.counts.downlink_sent > 0 {
            rows.extend([
                ("downlink sent", c(|c| c.downlink_sent)),
                ("downlink received", c(|c| c.downlink_received)),
                ("downlink lost", c(|c| c.downlink_lost)),
                ("downlink duplicated", c(|c| c.downlink_duplicated)),
                ("downlink latency p50 ms", dl(|l| l.p50_ms)),
                ("downlink latency p90 ms", dl(|l| l.p90_ms)),
                ("downlink latency p99 ms", dl(|l| l.p99_ms)),
                ("downlink latency max ms", dl(|l| l.max_ms)),
            ]);
        }
        Summary {
            columns: cols.iter().map(|g| g.name.clone()).collect(),
            rows: rows
                .into_iter()
                .map(|(label, values)| Row {
                    label: label.to_string(),
                    guarantee: GUARANTEE_ROWS.contains(&label),
                    values,
                })
                .collect(),
        }
    }

    /// The lines printed under the table: verification notes, warnings, the guarantees
    /// verdict and the first violations, then the gateway's metrics when scraped.
    pub fn notes(&self) -> Vec<String> {
        let mut out = String::new();
        if !self.verified {
            let _ = writeln!(
                out,
                "no broker verification (in-process echo gateway handled {} datagrams): arrivals and losses not measured",
                self.echo_datagrams
            );
        }
        if self.verifier_reconnects > self.verifier_sessions_lost {
            let _ = writeln!(
                out,
                "note: the verifier reconnected to the broker {} times; the broker kept its session (and its messages)",
                self.verifier_reconnects - self.verifier_sessions_lost
            );
        }
        if self.verifier_sessions_lost > 0 {
            let _ = writeln!(
                out,
                "WARNING: the broker lost the verifier's session {} times (restarted without persistence?): \
                 messages it received then are unknowable, not counted as broken",
                self.verifier_sessions_lost
            );
        }
        if self.total.counts.lost_unverified > 0 {
            let _ = writeln!(
                out,
                "WARNING: {} acknowledged messages could not be verified (the verifier could not see the broker then)",
                self.total.counts.lost_unverified
            );
        }
        if self.ok() {
            let _ = writeln!(out, "QoS 1/2 guarantees: all held");
        } else {
            let _ = writeln!(out, "QoS 1/2 guarantees: {} BROKEN", self.guarantees_broken);
            for v in &self.violations {
                let _ = writeln!(out, "  {v}");
            }
        }
        if let Some(m) = &self.gateway_metrics {
            for line in m.lines() {
                let _ = writeln!(out, "{line}");
            }
        }
        out.lines().map(str::to_string).collect()
    }

    /// The report as a table for people.
    pub fn table(&self) -> String {
        let Summary { columns, rows } = self.summary();
        let w0 = rows.iter().map(|r| r.label.len()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns.len())
            .map(|i| {
                rows.iter()
                    .filter_map(|r| r.values.get(i).map(String::len))
                    .chain(columns.get(i).map(String::len))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.headline());
        let _ = write!(out, "{:w0$}", "");
        for (n, w) in columns.iter().zip(&widths) {
            let _ = write!(out, "  {n:>w$}");
        }
        out.push('\n');
        for Row { label, values, .. } in &rows {
            let _ = write!(out, "{label:w0$}");
            for (v, w) in values.iter().zip(&widths) {
                let _ = write!(out, "  {v:>w$}");
            }
            out.push('\n');
        }
        for line in self.notes() {
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// The first line of the table: run id, seed, addresses, times.
    pub fn headline(&self) -> String {
        format!(
            "run {} (seed {}): gateway {}, broker {}, {:.0} s publishing, {:.1} s in all",
            self.run_id, self.seed, self.gateway, self.broker, self.duration_s, self.elapsed_s
        )
    }
}

/// The summary table of a [`Report`] ([`Report::summary`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Column headings: group names, then `total` when there are several groups.
    pub columns: Vec<String>,
    /// The rows, in order.
    pub rows: Vec<Row>,
}

/// One row of the [`Summary`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// What it counts; a sub-row of the one above starts with two spaces.
    pub label: String,
    /// One cell per column.
    pub values: Vec<String>,
    /// A QoS 1/2 guarantee: anything but 0 is a broken one (shown highlighted).
    pub guarantee: bool,
}

/// The rows that count broken guarantees.
const GUARANTEE_ROWS: [&str; 2] = ["  acknowledged but lost", "  qos 2 duplicated"];

/// One message a device published, as the device saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Its sequence number (per device).
    pub seq: u32,
    /// QoS it was published with.
    pub qos: QoS,
    /// Acknowledged by the gateway (PUBACK / PUBCOMP).
    pub acked: bool,
    /// Sent (µs, the stamp's clock).
    pub sent_us: u64,
    /// Acknowledged by the gateway (µs); the broker had it by then.
    pub acked_us: u64,
}

/// What one device did in a run, as the device saw it.
#[derive(Debug, Clone, Default)]
pub struct DeviceRecord {
    /// The device's index in the fleet.
    pub index: u32,
    /// Its group's index in the scenario.
    pub group: usize,
    /// What it counted itself (publishes, acknowledgements, retries, sleeps...).
    pub counts: Counts,
    /// Every message it published.
    pub sent: Vec<Sent>,
    /// Downlink sequence number -> copies received.
    pub downlink: HashMap<u32, u32>,
}

impl DeviceRecord {
    /// The record of device `index` of group `group` before it did anything.
    pub fn new(index: u32, group: usize) -> Self {
        DeviceRecord {
            index,
            group,
            counts: Counts {
                devices: 1,
                ..Counts::default()
            },
            sent: Vec::new(),
            downlink: HashMap::new(),
        }
    }
}

/// What identifies a run, for the report's header.
#[derive(Debug, Clone, Default)]
pub struct RunFacts {
    /// Run id (in topics and payloads).
    pub run_id: String,
    /// Seed of the random choices.
    pub seed: u64,
    /// Gateway, as shown.
    pub gateway: String,
    /// Broker, as shown.
    pub broker: String,
    /// Publishing time, seconds.
    pub duration_s: f64,
    /// Wall time of the whole run, seconds.
    pub elapsed_s: f64,
    /// Datagrams the in-process echo gateway handled.
    pub echo_datagrams: u64,
    /// The gateway's metrics over the run, when scraped.
    pub gateway_metrics: Option<GatewayMetrics>,
}

/// Everything a report is built from: what the devices saw, what the broker side saw.
#[derive(Debug, Default)]
pub struct ReportInputs {
    /// The run's header.
    pub facts: RunFacts,
    /// Group names, by group index.
    pub groups: Vec<String>,
    /// Every device's record.
    pub devices: Vec<DeviceRecord>,
    /// What the verifier saw at the broker; `None`: no verification (echo run).
    pub arrivals: Option<Arrivals>,
    /// Downlink messages the broker side published, by device index.
    pub downlink_sent: Vec<u32>,
    /// Downlink latency by group (measured by the devices as messages arrived).
    pub downlink_latency: Vec<LatencyHistogram>,
}

/// At most this many broken guarantees are described in [`Report::violations`].
pub const MAX_VIOLATIONS: usize = 50;

/// The report of a run, from its inputs alone (no clock, no I/O): each device's messages
/// matched with the broker's arrivals (lost, duplicated, broken guarantees, uplink
/// latency), its downlink counted, summed by group and in total.
pub fn build(inputs: ReportInputs) -> Report {
    let ReportInputs {
        facts,
        groups: names,
        mut devices,
        arrivals,
        downlink_sent,
        downlink_latency,
    } = inputs;
    let verified = arrivals.is_some();
    let arrivals = arrivals.unwrap_or_default();
    let mut groups: Vec<GroupReport> = names
        .into_iter()
        .map(|name| GroupReport {
            name,
            ..GroupReport::default()
        })
        .collect();
    let mut latencies: Vec<LatencyHistogram> = groups.iter().map(|_| LatencyHistogram::new()).collect();
    let mut violations = Vec::new();
    devices.sort_by_key(|r| r.index);
    for r in &devices {
        let Some(g) = groups.get_mut(r.group) else { continue };
        let mut c = r.counts.clone();
        for s in r.sent.iter().filter(|_| verified) {
            match arrivals.messages.get(&(r.index, s.seq)) {
                Some(a) => {
                    c.arrived += 1;
                    let extra = u64::from(a.count.saturating_sub(1));
                    c.duplicated += extra;
                    if s.qos == QoS::ExactlyOnce && extra > 0 {
                        c.duplicated_qos2 += extra;
                        if violations.len() < MAX_VIOLATIONS {
                            violations.push(format!(
                                "device {} seq {}: QoS 2 message arrived {} times at the broker",
                                r.index, s.seq, a.count
                            ));
                        }
                    }
                    if let Some(l) = latencies.get_mut(r.group) {
                        l.record(a.latency_us);
                    }
                }
                None => {
                    c.lost += 1;
                    if s.acked && arrivals.blind_during(s.sent_us, s.acked_us) {
                        // At the broker while the verifier could not see it (the broker
                        // lost the verifier's session): unknowable, not the gateway's.
                        c.lost_unverified += 1;
                    } else if s.acked {
                        c.lost_acknowledged += 1;
                        if violations.len() < MAX_VIOLATIONS {
                            violations.push(format!(
                                "device {} seq {}: QoS {} message acknowledged by the gateway but never seen at the broker",
                                r.index,
                                s.seq,
                                s.qos.bits()
                            ));
                        }
                    }
                }
            }
        }
        c.wills += u64::from(arrivals.wills.get(&r.index).copied().unwrap_or(0));
        let sent_down = downlink_sent.get(r.index as usize).copied().unwrap_or(0);
        c.downlink_sent += u64::from(sent_down);
        for seq in 0..sent_down {
            match r.downlink.get(&seq) {
                Some(n) => {
                    c.downlink_received += 1;
                    c.downlink_duplicated += u64::from(n.saturating_sub(1));
                }
                None => c.downlink_lost += 1,
            }
        }
        g.counts.add(&c);
    }
    let mut all_up = LatencyHistogram::new();
    let mut all_down = LatencyHistogram::new();
    let no_samples = LatencyHistogram::new();
    for (i, (g, up)) in groups.iter_mut().zip(&latencies).enumerate() {
        let down = downlink_latency.get(i).unwrap_or(&no_samples);
        all_up.add(up);
        all_down.add(down);
        g.uplink_latency = Latency::from_histogram(up);
        g.downlink_latency = Latency::from_histogram(down);
    }
    let mut total = GroupReport {
        name: "total".into(),
        counts: Counts::default(),
        uplink_latency: Latency::from_histogram(&all_up),
        downlink_latency: Latency::from_histogram(&all_down),
    };
    for g in &groups {
        total.counts.add(&g.counts);
    }
    Report {
        run_id: facts.run_id,
        seed: facts.seed,
        gateway: facts.gateway,
        broker: facts.broker,
        duration_s: facts.duration_s,
        elapsed_s: facts.elapsed_s,
        guarantees_broken: total.counts.broken(),
        groups,
        total,
        foreign_messages: arrivals.foreign,
        verified,
        echo_datagrams: facts.echo_datagrams,
        verifier_reconnects: arrivals.reconnects,
        verifier_sessions_lost: arrivals.sessions_lost,
        gateway_metrics: facts.gateway_metrics,
        violations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verifier::Arrival;

    fn sent(seq: u32, qos: QoS, acked: bool) -> Sent {
        Sent {
            seq,
            qos,
            acked,
            sent_us: 1_000 * u64::from(seq),
            acked_us: 1_000 * u64::from(seq) + 500,
        }
    }

    /// Two groups, three devices, every way a message can end: arrived once, arrived twice
    /// (QoS 1: a duplicate; QoS 2: a broken guarantee), lost unacknowledged, lost after
    /// the gateway acknowledged it (broken), lost while the verifier was blind
    /// (unverifiable); wills and downlink counted per device.
    #[test]
    fn the_report_is_built_from_the_records_and_the_arrivals() {
        let a = DeviceRecord {
            index: 0,
            group: 0,
            counts: Counts {
                devices: 1,
                published: 4,
                ..Counts::default()
            },
            sent: vec![
                sent(0, QoS::AtLeastOnce, true),
                sent(1, QoS::AtLeastOnce, true),
                sent(2, QoS::ExactlyOnce, true),
                sent(3, QoS::AtMostOnce, false),
            ],
            downlink: HashMap::from([(0, 1), (1, 2)]),
        };
        let b = DeviceRecord {
            index: 2,
            group: 1,
            counts: Counts {
                devices: 1,
                published: 2,
                ..Counts::default()
            },
            sent: vec![sent(0, QoS::AtLeastOnce, true), sent(1, QoS::AtLeastOnce, true)],
            downlink: HashMap::new(),
        };
        let c = DeviceRecord {
            index: 1,
            group: 1,
            counts: Counts {
                devices: 1,
                ..Counts::default()
            },
            ..DeviceRecord::default()
        };
        let arrival = |count, latency_us| Arrival { count, latency_us };
        let arrivals = Arrivals {
            messages: HashMap::from([
                ((0, 0), arrival(1, 2_000)),
                ((0, 1), arrival(2, 4_000)),
                ((0, 2), arrival(2, 6_000)),
            ]),
            wills: HashMap::from([(1, 1)]),
            // Device 2's seq 1 (sent at 1,000 µs, acknowledged at 1,500) falls in it.
            blind: vec![(1_200, 1_300)],
            foreign: 7,
            ..Arrivals::default()
        };
        let report = build(ReportInputs {
            facts: RunFacts {
                run_id: "r".into(),
                ..RunFacts::default()
            },
            groups: vec!["g0".into(), "g1".into()],
            // Out of order: the report sorts by index.
            devices: vec![b, a, c],
            arrivals: Some(arrivals),
            downlink_sent: vec![3, 0, 0],
            downlink_latency: vec![LatencyHistogram::new(), LatencyHistogram::new()],
        });
        let g0 = &report.groups[0].counts;
        assert_eq!((g0.arrived, g0.lost, g0.duplicated, g0.duplicated_qos2), (3, 1, 2, 1));
        assert_eq!((g0.lost_acknowledged, g0.lost_unverified), (0, 0));
        assert_eq!(
            (
                g0.downlink_sent,
                g0.downlink_received,
                g0.downlink_lost,
                g0.downlink_duplicated
            ),
            (3, 2, 1, 1)
        );
        let g1 = &report.groups[1].counts;
        assert_eq!(
            (g1.arrived, g1.lost, g1.lost_acknowledged, g1.lost_unverified),
            (0, 2, 1, 1)
        );
        assert_eq!(g1.wills, 1);
        assert_eq!(report.total.counts.devices, 3);
        assert_eq!(report.guarantees_broken, 2);
        assert_eq!(
            report.violations,
            [
                "device 0 seq 2: QoS 2 message arrived 2 times at the broker",
                "device 2 seq 0: QoS 1 message acknowledged by the gateway but never seen at the broker",
            ]
        );
        assert_eq!(report.groups[0].uplink_latency.samples, 3);
        assert_eq!(report.groups[1].uplink_latency.samples, 0);
        assert_eq!(report.total.uplink_latency.samples, 3);
        assert!((report.groups[0].uplink_latency.max_ms - 6.0).abs() < 0.01);
        assert!(report.verified && report.foreign_messages == 7 && !report.ok());
        let summary = report.summary();
        assert_eq!(summary.columns, ["g0", "g1", "total"]);
        let flagged: Vec<(&str, &[String])> = summary
            .rows
            .iter()
            .filter(|r| r.guarantee)
            .map(|r| (r.label.trim(), r.values.as_slice()))
            .collect();
        assert_eq!(
            flagged,
            [
                ("acknowledged but lost", &["0".to_string(), "1".into(), "1".into()][..]),
                ("qos 2 duplicated", &["1".to_string(), "0".into(), "1".into()][..]),
            ]
        );
    }

    /// Without verification (an echo run) nothing is counted as arrived or lost.
    #[test]
    fn an_unverified_run_counts_no_losses() {
        let report = build(ReportInputs {
            groups: vec!["g".into()],
            devices: vec![DeviceRecord {
                sent: vec![sent(0, QoS::AtLeastOnce, true)],
                ..DeviceRecord::default()
            }],
            ..ReportInputs::default()
        });
        let c = &report.groups[0].counts;
        assert_eq!((c.arrived, c.lost, c.lost_acknowledged), (0, 0, 0));
        assert!(!report.verified && report.ok());
    }

    #[test]
    fn percentiles_from_the_histogram() {
        let mut h = LatencyHistogram::new();
        // 1..=100 ms, in an order that a sorted vector would have had to sort.
        for i in (1..=100u64).rev() {
            h.record(i * 1000);
        }
        let l = Latency::from_histogram(&h);
        assert_eq!(l.samples, 100);
        // Within the histogram's 0.1 % precision.
        assert!((l.p50_ms - 50.0).abs() < 0.06, "{l:?}");
        assert!((l.p90_ms - 90.0).abs() < 0.1, "{l:?}");
        assert!((l.p99_ms - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.max_ms - 100.0).abs() < 0.1, "{l:?}");
        assert_eq!(l.distribution.len(), 21);
        assert!(l
            .distribution
            .windows(2)
            .all(|w| w[0].percentile < w[1].percentile && w[0].ms <= w[1].ms));
        assert_eq!(l.distribution.first().map(|p| p.percentile), Some(0.0));
        let empty = Latency::from_histogram(&LatencyHistogram::new());
        assert_eq!((empty.samples, empty.p99_ms, empty.distribution.len()), (0, 0.0, 0));
    }

    #[test]
    fn histograms_add_and_saturate() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        a.record(1_000);
        b.record(3_000);
        // Beyond an hour: recorded as an hour, never an error.
        b.record(u64::MAX);
        a.add(&b);
        assert_eq!(a.len(), 3);
        assert!((a.max_ms() - MAX_LATENCY_US as f64 / 1000.0).abs() / (MAX_LATENCY_US as f64 / 1000.0) < 0.001);
        a.reset();
        assert!(a.is_empty());
    }

    #[test]
    fn table_and_json() {
        let g = GroupReport {
            name: "g".into(),
            counts: Counts {
                devices: 3,
                lost_acknowledged: 1,
                ..Counts::default()
            },
            uplink_latency: Latency::default(),
            downlink_latency: Latency::default(),
        };
        let r = Report {
            groups: vec![g.clone()],
            total: g,
            guarantees_broken: 1,
            violations: vec!["device 1 seq 2".into()],
            ..Report::default()
        };
        let t = r.table();
        assert!(t.contains("BROKEN"), "{t}");
        let json = serde_json::to_string(&r).expect("serializes");
        assert!(json.contains("\"guarantees_broken\":1"));
    }
}
