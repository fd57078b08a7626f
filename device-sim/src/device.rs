//! A simulated device: the firmware's sans-IO client engine ([`sn_codec::client::Client`])
//! joined to a [`Station`] (socket, radio, clock). The one-shot tools and every device of a
//! fleet run through this.

use sn_codec::client::{Client, Event, Message};

use crate::station::{now_ms, Station, Wake};

/// Registrations a simulated device remembers.
pub const TOPICS: usize = 8;
/// Bytes of topic names a simulated device remembers.
pub const NAMES: usize = 512;
/// Transmit buffer of a simulated device: the longest message it sends.
pub const TX: usize = 1280;
/// The longest payload a simulated device can publish (PUBLISH header of 7 octets).
pub const MAX_PAYLOAD: usize = TX - 7;

/// The client engine as the simulator runs it.
pub type SimClient<'a> = Client<'a, TOPICS, NAMES, TX>;

/// A received PUBLISH, resolved to its topic name when the engine knows it.
#[derive(Debug, Clone, Copy)]
pub struct Received<'m> {
    /// Topic name (registered, predefined or short), if known.
    pub topic: Option<&'m str>,
    /// The message.
    pub message: &'m Message<'m>,
}

/// What [`Device::step`] observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Something was handled (a datagram or a timer); look at the events.
    Progress,
    /// The caller's deadline passed.
    Deadline,
}

/// Counts of what the engine did that the simulator reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Retransmissions of outstanding requests (Tretry expiries).
    pub retries: u64,
    /// Datagrams the engine could not decode.
    pub malformed: u64,
}

/// One device: engine + station + transmit buffer.
pub struct Device<'a> {
    /// The client engine.
    pub client: SimClient<'a>,
    /// Socket, radio and clock.
    pub station: Station,
    /// Counters.
    pub counters: EngineCounters,
    out: Box<[u8]>,
}

impl<'a> Device<'a> {
    /// Joins an engine and a station.
    pub fn new(client: SimClient<'a>, station: Station) -> Self {
        Device {
            client,
            station,
            counters: EngineCounters::default(),
            out: vec![0; TX + 512].into_boxed_slice(),
        }
    }

    /// Sends everything the engine queued.
    pub async fn flush(&mut self) {
        while let Some(n) = self.client.poll_transmit(&mut self.out) {
            let data = self.out.get(..n).unwrap_or(&[]);
            self.station.send(data).await;
        }
    }

    /// Runs the engine's timers if they are due.
    pub fn run_timers(&mut self, now: u64) {
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            let busy = self.client.is_busy();
            self.client.handle_timeout(now);
            if busy && self.client.is_busy() && self.client.has_transmit() {
                self.counters.retries += 1;
            }
        }
    }

    /// Sends what is queued, then waits for one datagram, an engine timer, or `deadline`
    /// (ms, `None`: none), and feeds what happened to the engine. A received PUBLISH is
    /// handed to `on_message`. Events are left for [`Device::poll_event`].
    pub async fn step(&mut self, deadline: Option<u64>, on_message: &mut (dyn FnMut(Received<'_>) + Send)) -> Step {
        self.flush().await;
        let timer = self.client.poll_timeout();
        let wait_until = match (timer, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let step = match self.station.wait(wait_until).await {
            Wake::Datagram(len) => {
                let now = now_ms();
                match self.client.handle_datagram(now, self.station.datagram(len)) {
                    Ok(Some(message)) => {
                        let topic = self.client.topic_name(&message.topic);
                        on_message(Received {
                            topic,
                            message: &message,
                        });
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.counters.malformed += 1;
                        tracing::debug!(error = ?e, "malformed datagram from the gateway");
                    }
                }
                self.run_timers(now);
                Step::Progress
            }
            Wake::Deadline => {
                let now = now_ms();
                if timer.is_some_and(|t| t <= now) {
                    self.run_timers(now);
                    Step::Progress
                } else {
                    Step::Deadline
                }
            }
        };
        self.flush().await;
        step
    }

    /// The next engine event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.client.poll_event()
    }

    /// Steps until `f` accepts an event (returning its value) or `deadline` passes
    /// (`None`). Messages go to `on_message`; events `f` declines are dropped.
    pub async fn until<T>(
        &mut self,
        deadline: u64,
        mut f: impl FnMut(Event) -> Option<T>,
        on_message: &mut (dyn FnMut(Received<'_>) + Send),
    ) -> Option<T> {
        loop {
            while let Some(e) = self.client.poll_event() {
                if let Some(v) = f(e) {
                    return Some(v);
                }
            }
            if self.step(Some(deadline), on_message).await == Step::Deadline {
                return None;
            }
        }
    }
}
