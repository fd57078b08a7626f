//! Latency samples in constant memory, shared by the verifier (uplink) and the fleet
//! (downlink), summed up in the [`crate::report`].

/// Latency samples (µs) in an HDR histogram: constant memory however many messages a run
/// has, percentiles within 0.1 % of the recorded values (3 significant figures), from 1 µs to
/// an hour (longer latencies are recorded as an hour).
#[derive(Debug, Clone)]
pub struct LatencyHistogram(hdrhistogram::Histogram<u64>);

/// The largest latency a [`LatencyHistogram`] tells apart, µs (an hour).
pub const MAX_LATENCY_US: u64 = 3_600_000_000;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        // Constant, valid bounds (1 <= low, high >= 2 * low, sigfig <= 5): cannot fail.
        #[allow(clippy::expect_used)]
        let h = hdrhistogram::Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid constant bounds");
        LatencyHistogram(h)
    }

    /// Records one latency in µs (beyond [`MAX_LATENCY_US`]: recorded as that).
    pub fn record(&mut self, us: u64) {
        self.0.saturating_record(us.min(MAX_LATENCY_US));
    }

    /// Adds every sample of `other`.
    pub fn add(&mut self, other: &LatencyHistogram) {
        // Same bounds on both sides: cannot fail; were it to, the samples would be
        // missing from a total, not a crash.
        let _ = self.0.add(&other.0);
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Forgets every sample (keeps the memory).
    pub fn reset(&mut self) {
        self.0.reset();
    }

    /// The latency at quantile `q` (0..=1) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    /// The largest sample in milliseconds; 0 when empty.
    pub fn max_ms(&self) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.max() as f64 / 1000.0
    }
}
