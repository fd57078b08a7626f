//! The lossy radio model: what happens to each datagram between a device and the gateway.
//!
//! A [`LinkModel`] is a group's radio settings; [`LinkModel::fate`] decides, with the
//! caller's random number generator, whether one datagram is lost, delayed (delay plus
//! uniform jitter, so that datagrams can overtake each other) or duplicated. The simulator
//! applies it to both directions inside each device ([`crate::station::Station`]), so the
//! gateway sees an ordinary (if unreliable) network.

use std::collections::VecDeque;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Radio settings of a group of devices (both directions).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkModel {
    /// Probability (0..=1) that a datagram is lost.
    pub loss: f64,
    /// Fixed one-way delay in milliseconds.
    pub delay_ms: u64,
    /// Extra delay, uniform in `0..=jitter_ms` milliseconds, drawn for each datagram.
    pub jitter_ms: u64,
    /// Probability (0..=1) that a datagram that is not lost arrives twice (each copy with
    /// its own delay).
    pub duplicate: f64,
    /// Probability (0..=1) that a datagram is held back by an extra `reorder_delay_ms`, so
    /// that the datagrams sent after it overtake it.
    pub reorder: f64,
    /// The extra delay of a reordered datagram, milliseconds.
    pub reorder_delay_ms: u64,
    /// Link rate in bits per second (0: unlimited). Each datagram occupies the link for
    /// its length at this rate; datagrams queue behind each other, per direction.
    pub bandwidth_bps: u64,
}

impl Default for LinkModel {
    fn default() -> Self {
        LinkModel::PERFECT
    }
}

/// What happens to one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It is lost.
    Lost,
    /// It arrives once, after this many milliseconds.
    Deliver(u64),
    /// It arrives twice, after these delays.
    Duplicate(u64, u64),
}

/// Why a [`LinkModel`] is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkModelError {
    /// A probability outside 0..=1.
    #[error("{0} must be a probability between 0 and 1, not {1}")]
    Probability(&'static str, f64),
}

impl LinkModel {
    /// A link that loses, delays and duplicates nothing.
    pub const PERFECT: LinkModel = LinkModel {
        loss: 0.0,
        delay_ms: 0,
        jitter_ms: 0,
        duplicate: 0.0,
        reorder: 0.0,
        reorder_delay_ms: 100,
        bandwidth_bps: 0,
    };

    /// Whether the model changes anything at all (then it can be skipped).
    pub fn is_perfect(&self) -> bool {
        self.loss <= 0.0
            && self.delay_ms == 0
            && self.jitter_ms == 0
            && self.duplicate <= 0.0
            && self.reorder <= 0.0
            && self.bandwidth_bps == 0
    }

    /// How long a datagram of `len` octets occupies the link, milliseconds (rounded up).
    pub fn airtime_ms(&self, len: usize) -> u64 {
        if self.bandwidth_bps == 0 {
            return 0;
        }
        let bits = (len as u64).saturating_mul(8).saturating_mul(1000);
        bits.div_ceil(self.bandwidth_bps)
    }

    /// Checks the probabilities.
    pub fn validate(&self) -> Result<(), LinkModelError> {
        for (name, p) in [
            ("loss", self.loss),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(LinkModelError::Probability(name, p));
            }
        }
        Ok(())
    }

    fn one_delay(&self, rng: &mut impl Rng) -> u64 {
        let jitter = if self.jitter_ms > 0 {
            rng.gen_range(0..=self.jitter_ms)
        } else {
            0
        };
        let held = if self.reorder > 0.0 && rng.gen::<f64>() < self.reorder {
            self.reorder_delay_ms
        } else {
            0
        };
        self.delay_ms.saturating_add(jitter).saturating_add(held)
    }

    /// Decides the fate of one datagram.
    pub fn fate(&self, rng: &mut impl Rng) -> Fate {
        if self.loss > 0.0 && rng.gen::<f64>() < self.loss {
            return Fate::Lost;
        }
        let first = self.one_delay(rng);
        if self.duplicate > 0.0 && rng.gen::<f64>() < self.duplicate {
            return Fate::Duplicate(first, self.one_delay(rng));
        }
        Fate::Deliver(first)
    }
}

/// Datagrams waiting for their delivery time, earliest first.
#[derive(Debug, Default)]
pub struct DelayQueue {
    queue: VecDeque<(u64, Vec<u8>)>,
}

impl DelayQueue {
    /// Queues `data` for delivery at `due` (ms). Datagrams due at the same time keep their
    /// order.
    pub fn push(&mut self, due: u64, data: Vec<u8>) {
        let at = self.queue.partition_point(|(d, _)| *d <= due);
        self.queue.insert(at, (due, data));
    }

    /// When the earliest datagram is due.
    pub fn next_due(&self) -> Option<u64> {
        self.queue.front().map(|(d, _)| *d)
    }

    /// The earliest datagram if it is due at `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<Vec<u8>> {
        if self.next_due()? <= now {
            self.queue.pop_front().map(|(_, d)| d)
        } else {
            None
        }
    }

    /// Number of datagrams waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn statistics_match_settings() {
        let model = LinkModel {
            loss: 0.10,
            delay_ms: 20,
            jitter_ms: 10,
            duplicate: 0.05,
            ..LinkModel::PERFECT
        };
        model.validate().expect("valid");
        let mut rng = SmallRng::seed_from_u64(42);
        let n = 100_000u32;
        let (mut lost, mut dup, mut delivered) = (0u32, 0u32, 0u32);
        let (mut sum, mut min, mut max) = (0u64, u64::MAX, 0u64);
        for _ in 0..n {
            match model.fate(&mut rng) {
                Fate::Lost => lost += 1,
                Fate::Deliver(d) => {
                    delivered += 1;
                    sum += d;
                    min = min.min(d);
                    max = max.max(d);
                }
                Fate::Duplicate(a, b) => {
                    dup += 1;
                    delivered += 1;
                    sum += a;
                    min = min.min(a).min(b);
                    max = max.max(a).max(b);
                }
            }
        }
        let loss = f64::from(lost) / f64::from(n);
        // Binomial standard deviation at 100k draws is about 0.001: allow 5 of them.
        assert!((loss - 0.10).abs() < 0.005, "loss {loss}");
        let dup_rate = f64::from(dup) / f64::from(delivered);
        assert!((dup_rate - 0.05).abs() < 0.004, "duplication {dup_rate}");
        let mean = sum as f64 / f64::from(delivered);
        assert!((mean - 25.0).abs() < 0.1, "mean delay {mean}");
        assert_eq!((min, max), (20, 30));
    }

    #[test]
    fn seeded_runs_repeat() {
        let model = LinkModel {
            loss: 0.3,
            delay_ms: 5,
            jitter_ms: 50,
            duplicate: 0.2,
            reorder: 0.1,
            ..LinkModel::PERFECT
        };
        let draw = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..1000).map(|_| model.fate(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn reordering_and_airtime_match_settings() {
        let model = LinkModel {
            delay_ms: 10,
            reorder: 0.2,
            reorder_delay_ms: 100,
            ..LinkModel::PERFECT
        };
        let mut rng = SmallRng::seed_from_u64(9);
        let n = 100_000u32;
        let held = (0..n)
            .filter(|_| matches!(model.fate(&mut rng), Fate::Deliver(110)))
            .count();
        let rate = held as f64 / f64::from(n);
        assert!((rate - 0.2).abs() < 0.006, "reordered {rate}");
        let slow = LinkModel {
            bandwidth_bps: 8_000,
            ..LinkModel::PERFECT
        };
        assert_eq!(slow.airtime_ms(100), 100);
        assert_eq!(slow.airtime_ms(1), 1);
        assert_eq!(LinkModel::PERFECT.airtime_ms(1000), 0);
        assert!(!slow.is_perfect());
    }

    #[test]
    fn perfect_link_delivers_everything_now() {
        let mut rng = SmallRng::seed_from_u64(1);
        assert!(LinkModel::PERFECT.is_perfect());
        for _ in 0..1000 {
            assert_eq!(LinkModel::PERFECT.fate(&mut rng), Fate::Deliver(0));
        }
    }

    #[test]
    fn bad_probabilities_are_refused() {
        let m = LinkModel {
            loss: 1.5,
            ..LinkModel::PERFECT
        };
        assert!(m.validate().is_err());
    }

    #[test]
    fn delay_queue_orders_by_due_time() {
        let mut q = DelayQueue::default();
        q.push(30, vec![3]);
        q.push(10, vec![1]);
        q.push(10, vec![2]);
        assert_eq!(q.next_due(), Some(10));
        assert_eq!(q.pop_due(9), None);
        assert_eq!(q.pop_due(10), Some(vec![1]));
        assert_eq!(q.pop_due(10), Some(vec![2]));
        assert_eq!(q.pop_due(29), None);
        assert_eq!(q.pop_due(31), Some(vec![3]));
        assert!(q.is_empty());
    }
}
