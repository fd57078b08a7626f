//! Spreading a fleet over worker processes: a process may hold only so many open files
//! (one UDP socket per device), so a larger fleet runs as several copies of the simulator,
//! each with a disjoint slice of the device indices, reporting back to the parent over its
//! stdout (one JSON object a line). This module holds what parent and workers agree on:
//! the slices, the worker's instructions and the lines; the processes are in
//! [`crate::fleet`].

use std::ops::Range;

use serde::{Deserialize, Serialize};
use sn_codec::QoS;

use crate::report::{Counts, DeviceRecord, Sent};

/// Open files a process keeps for other things than device sockets: the verifier's and
/// the scraper's connections, the runtime, stdio, output files, a worker's pipes.
pub const RESERVED_FILES: u64 = 100;

/// How many processes a fleet of `devices` needs when each may open `limit` files.
pub fn workers_needed(devices: usize, limit: u64) -> usize {
    let per_process = limit.saturating_sub(RESERVED_FILES).max(1);
    let devices = devices as u64;
    if devices + RESERVED_FILES <= limit {
        1
    } else {
        usize::try_from(devices.div_ceil(per_process))
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

/// This process's open-file limit, after raising the soft limit to the hard one (which
/// is all an unprivileged process may do).
pub fn open_file_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft),
    }
}

/// Device indices `0..total` cut into `n` contiguous slices whose sizes differ by at most
/// one (empty slices when `n > total`): disjoint, in order, covering the fleet.
pub fn slices(total: usize, n: usize) -> Vec<Range<usize>> {
    let n = n.max(1);
    let (base, extra) = (total / n, total % n);
    let mut first = 0;
    (0..n)
        .map(|k| {
            let len = base + usize::from(k < extra);
            let r = first..first + len;
            first += len;
            r
        })
        .collect()
}

/// What a worker is told by its parent (the hidden `--worker` flag): its slice and the
/// parent's run id and clock, so that its devices are exactly those one process would run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSpec {
    /// Which worker (0-based), for messages.
    pub number: usize,
    /// Its device indices.
    pub devices: Range<usize>,
    /// The run's id (in topics and payloads).
    pub run: u32,
    /// The parent's clock epoch, µs of Unix time.
    pub epoch_unix_us: u64,
    /// The first device starts (ms on that clock).
    pub t0_ms: u64,
}

impl WorkerSpec {
    /// The flag's value: `NUMBER:FIRST:END:RUN:EPOCH_US:T0_MS`.
    pub fn to_arg(&self) -> String {
        format!(
            "{}:{}:{}:{:08x}:{}:{}",
            self.number, self.devices.start, self.devices.end, self.run, self.epoch_unix_us, self.t0_ms
        )
    }

    /// Parses [`WorkerSpec::to_arg`]'s form.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("bad --worker value {s:?} (it is set by the parent process)");
        let parts: Vec<&str> = s.split(':').collect();
        let [number, first, end, run, epoch, t0] = parts.as_slice() else {
            return Err(bad());
        };
        let n = |v: &str| v.parse::<u64>().map_err(|_| bad());
        let (first, end) = (n(first)? as usize, n(end)? as usize);
        if first > end {
            return Err(bad());
        }
        Ok(WorkerSpec {
            number: n(number)? as usize,
            devices: first..end,
            run: u32::from_str_radix(run, 16).map_err(|_| bad())?,
            epoch_unix_us: n(epoch)?,
            t0_ms: n(t0)?,
        })
    }
}

/// The live counters of a worker (cumulative; the parent sums the workers' latest).
pub type LiveCounts = [u64; 10];

/// One line a worker writes on its stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    /// Its live counters now (several times a second).
    Live(LiveCounts),
    /// One device's record, once the device is done.
    Record(Box<WireRecord>),
    /// Every record was written: the number of records.
    End(usize),
}

/// A [`DeviceRecord`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireRecord {
    index: u32,
    group: usize,
    counts: Counts,
    /// (seq, QoS bits, acked, sent µs, acked µs).
    sent: Vec<(u32, u8, bool, u64, u64)>,
    /// (downlink seq, copies).
    downlink: Vec<(u32, u32)>,
}

impl From<DeviceRecord> for WireRecord {
    fn from(r: DeviceRecord) -> Self {
        WireRecord {
            index: r.index,
            group: r.group,
            counts: r.counts,
            sent: r
                .sent
                .iter()
                .map(|s| (s.seq, s.qos.bits(), s.acked, s.sent_us, s.acked_us))
                .collect(),
            downlink: r.downlink.into_iter().collect(),
        }
    }
}

impl From<WireRecord> for DeviceRecord {
    fn from(w: WireRecord) -> Self {
        DeviceRecord {
            index: w.index,
            group: w.group,
            counts: w.counts,
            sent: w
                .sent
                .into_iter()
                .map(|(seq, qos, acked, sent_us, acked_us)| Sent {
                    seq,
                    qos: QoS::from_bits(qos),
                    acked,
                    sent_us,
                    acked_us,
                })
                .collect(),
            downlink: w.downlink.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_disjoint_and_cover_the_fleet() {
        for total in [0usize, 1, 7, 60, 100, 19_999, 100_000] {
            for n in [1usize, 2, 3, 7, 64] {
                let s = slices(total, n);
                assert_eq!(s.len(), n);
                let mut next = 0;
                for r in &s {
                    assert_eq!(r.start, next, "{total} over {n}: gap or overlap");
                    next = r.end;
                }
                assert_eq!(next, total, "{total} over {n}: not covered");
                let (min, max) = (s.iter().map(|r| r.len()).min(), s.iter().map(|r| r.len()).max());
                assert!(max.unwrap_or(0) - min.unwrap_or(0) <= 1);
            }
        }
    }

    #[test]
    fn a_fleet_spreads_only_beyond_the_limit() {
        assert_eq!(workers_needed(19_000, 20_000), 1);
        assert_eq!(workers_needed(100_000, 20_000), 6);
        assert_eq!(workers_needed(60, 100), 60);
        assert_eq!(workers_needed(60, 130), 2);
        assert_eq!(workers_needed(30, 130), 1);
    }

    #[test]
    fn a_spec_and_a_record_survive_the_wire() {
        let spec = WorkerSpec {
            number: 2,
            devices: 40..60,
            run: 0xdead_beef,
            epoch_unix_us: 1_700_000_000_000_000,
            t0_ms: 1234,
        };
        assert_eq!(WorkerSpec::parse(&spec.to_arg()), Ok(spec));
        assert!(WorkerSpec::parse("1:5:2:0:0:0").is_err());
        let mut r = DeviceRecord::new(41, 1);
        r.counts.published = 2;
        r.sent.push(Sent {
            seq: 0,
            qos: QoS::ExactlyOnce,
            acked: true,
            sent_us: 5,
            acked_us: 9,
        });
        r.downlink.insert(3, 2);
        let line = serde_json::to_string(&Line::Record(Box::new(r.clone().into()))).unwrap();
        let Line::Record(back) = serde_json::from_str(&line).unwrap() else {
            panic!("not a record")
        };
        let back = DeviceRecord::from(*back);
        assert_eq!(
            (back.index, back.group, back.counts, back.sent, back.downlink),
            (r.index, r.group, r.counts, r.sent, r.downlink)
        );
    }
}
