//! What a fleet device does, and when: a plain state machine over the firmware's client
//! engine ([`SimClient`]), fed with time and the engine's events, like the engine itself.
//!
//! The fleet's task ([`crate::fleet`]) owns the socket and the clock: it hands every engine
//! event to [`Behaviour::handle_event`], every received PUBLISH to
//! [`Behaviour::handle_message`], and asks [`Behaviour::poll`] what comes next (something
//! was queued for the gateway, wait until a time, or done). Nothing here sleeps, reads a
//! clock or touches a socket, so every rule (when to register, subscribe, publish, sleep,
//! wake, reconnect and leave) is unit-tested below in virtual time against a scripted
//! gateway.

use rand::rngs::SmallRng;
use rand::Rng;
use sn_codec::client::{Config, Event, State, Will};
use sn_codec::{QoS, ReturnCode, TopicFilter, TopicRef};

use crate::device::{Received, SimClient};
use crate::payload::Stamp;
use crate::report::{DeviceRecord, Sent};
use crate::scenario::Group;

/// How long a device waits before connecting again after losing the gateway or being
/// refused (plus up to as much again at random), and before retrying a refused REGISTER
/// or SUBSCRIBE.
pub const RECONNECT_BACKOFF_MS: u64 = 1_000;

/// Who a device is: its names, derived from the run, the group and its index.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// The run id (in every topic and payload).
    pub run: u32,
    /// Index of the device in the fleet.
    pub index: u32,
    /// Index of its group in the scenario.
    pub group: usize,
    /// MQTT-SN client id.
    pub client_id: String,
    /// The uplink topic (registered, then published to at QoS 0/1/2).
    pub topic: String,
    /// The group's short topic, for QoS -1.
    pub short: Option<[u8; 2]>,
    /// The will topic.
    pub will_topic: String,
    /// The will message (a stamp with sequence 0).
    pub will_message: Vec<u8>,
    /// The downlink topic the broker side sends to.
    pub down_topic: String,
    /// The group's extra filters, with the placeholders replaced.
    pub extra_filters: Vec<String>,
}

impl DeviceSpec {
    /// The names of device `index` of group `group` (`g`) in run `run` under `prefix`.
    pub fn new(run: u32, prefix: &str, g: &Group, group: usize, index: u32) -> Self {
        let mut will_message = Vec::new();
        Stamp {
            run,
            device: index,
            seq: 0,
            qos: QoS::AtLeastOnce,
            sent_us: 0,
        }
        .encode(0, &mut will_message);
        DeviceSpec {
            run,
            index,
            group,
            client_id: default_client_id(run, index),
            topic: format!("{prefix}/{run:08x}/{}/{index}", g.name),
            short: g
                .short_topic
                .as_deref()
                .and_then(|s| <[u8; 2]>::try_from(s.as_bytes()).ok()),
            will_topic: format!("{prefix}/{run:08x}-will/{}/{index}", g.name),
            will_message,
            down_topic: downlink_topic(prefix, run, &g.name, index),
            extra_filters: g
                .subscribe
                .iter()
                .map(|f| {
                    f.replace("{prefix}", prefix)
                        .replace("{run}", &format!("{run:08x}"))
                        .replace("{group}", &g.name)
                        .replace("{device}", &index.to_string())
                })
                .collect(),
        }
    }

    /// The client engine's configuration for this device of group `g`.
    pub fn client_config<'s>(&'s self, g: &Group) -> Config<'s> {
        Config {
            will: g.will.then_some(Will {
                topic: &self.will_topic,
                message: &self.will_message,
                qos: QoS::AtLeastOnce,
                retain: false,
            }),
            keep_alive: g.keep_alive,
            clean_session: g.clean_session,
            t_retry: u32::try_from(g.t_retry.ms()).unwrap_or(u32::MAX),
            n_retry: g.n_retry,
            n_adv: 0,
            ..Config::new(&self.client_id)
        }
    }
}

/// The client id of device `index` in run `run` when the fleet's client ids are not
/// given (`--client-id`): unique to the run.
pub fn default_client_id(run: u32, index: u32) -> String {
    format!("sim-{run:08x}-{index}")
}

/// The downlink topic of device `index` of group `group`.
pub fn downlink_topic(prefix: &str, run: u32, group: &str, index: u32) -> String {
    format!("{prefix}/{run:08x}-down/{group}/{index}")
}

/// The times of a run that a device obeys (ms on the fleet's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// The device starts (connects first).
    pub start: u64,
    /// Publishing stops; the device leaves once nothing is outstanding.
    pub stop: u64,
    /// The device gives up on whatever is still outstanding.
    pub end: u64,
}

/// What [`Behaviour::poll`] asks of the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The engine has something queued: send it, then hand over the events and poll again.
    Transmit,
    /// Nothing to do before this time (ms), unless a datagram or an engine timer comes first.
    Wait(u64),
    /// The device is finished: leave with [`Behaviour::leave`].
    Done,
}

/// The next thing an active, idle device does, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chore {
    /// Publishing is over and nothing is outstanding: DISCONNECT.
    Leave,
    /// The uplink topic has no id yet: REGISTER it.
    Register,
    /// SUBSCRIBE to the downlink topic.
    SubscribeDownlink,
    /// SUBSCRIBE to the extra filter of this index.
    SubscribeExtra(usize),
    /// A publish is due.
    Publish,
    /// The awake time of the sleep cycle is over: DISCONNECT with a duration.
    Sleep,
    /// Nothing before this time.
    Idle(u64),
}

/// One device's behaviour and what it recorded.
pub struct Behaviour<'s> {
    spec: &'s DeviceSpec,
    group: &'s Group,
    schedule: Schedule,
    rng: SmallRng,
    record: DeviceRecord,
    payload: Vec<u8>,
    next_publish: u64,
    next_connect: u64,
    /// A refused REGISTER or SUBSCRIBE is retried from this time.
    next_register: u64,
    awake_until: u64,
    seq: u32,
    /// The outstanding QoS 1/2 publish: its message id and index in the record's `sent`.
    pending: Option<(u16, usize)>,
    /// A wake-up (PINGREQ) is under way.
    waking: bool,
    done: bool,
    /// Subscribed to the downlink topic in the current session.
    subscribed: bool,
    /// The broker side may send downlink messages (the subscription is in force).
    broker_may_send: bool,
    /// The CONNECT under way starts a new session (from disconnected).
    fresh_connect: bool,
    /// Extra subscriptions made (or skipped) in the current session.
    subs_done: usize,
}

impl<'s> Behaviour<'s> {
    /// A device that starts at `schedule.start`; `rng` draws its jitter, QoS picks and
    /// reconnect backoff.
    pub fn new(spec: &'s DeviceSpec, group: &'s Group, schedule: Schedule, mut rng: SmallRng) -> Self {
        let interval = group.publish_interval.ms();
        let next_publish = if interval > 0 {
            schedule.start + rng.gen_range(0..=interval.min(1000))
        } else {
            u64::MAX
        };
        Behaviour {
            spec,
            group,
            schedule,
            rng,
            record: DeviceRecord::new(spec.index, spec.group),
            payload: Vec::with_capacity(group.payload_size.max(48)),
            next_publish,
            next_connect: schedule.start,
            next_register: 0,
            awake_until: u64::MAX,
            seq: 0,
            pending: None,
            waking: false,
            done: false,
            subscribed: false,
            broker_may_send: false,
            fresh_connect: false,
            subs_done: 0,
        }
    }

    /// What the device recorded so far.
    pub fn record(&self) -> &DeviceRecord {
        &self.record
    }

    /// Whether the broker side may send this device downlink messages now.
    pub fn broker_may_send(&self) -> bool {
        self.broker_may_send
    }

    /// Takes one engine event at `now_us` (µs on the fleet's clock).
    pub fn handle_event(&mut self, client: &mut SimClient<'_>, event: Event, now_us: u64) {
        let now = now_us / 1000;
        let g = self.group;
        let has_downlink = self.has_downlink();
        let c = &mut self.record.counts;
        match event {
            Event::Connected => {
                c.connected = 1;
                c.connects += 1;
                tracing::debug!(device = self.spec.index, "connected");
                self.waking = false;
                if self.fresh_connect && g.clean_session {
                    self.subscribed = false;
                    self.broker_may_send = false;
                    self.subs_done = 0;
                }
                if let Some(s) = g.sleep {
                    self.awake_until = now + s.awake.ms();
                }
            }
            Event::ConnectRejected(_) | Event::Disconnected | Event::GatewayLost => {
                if g.clean_session {
                    // The session, and with it the subscription, is over: the broker side
                    // stops sending until the device has subscribed again.
                    self.broker_may_send = false;
                }
                if event == Event::GatewayLost {
                    if now >= self.schedule.stop {
                        c.disconnect_unanswered += 1;
                    } else {
                        c.gateway_lost += 1;
                    }
                }
                if self.pending.take().is_some() {
                    c.unacknowledged += 1;
                }
                self.waking = false;
                self.next_connect = now + RECONNECT_BACKOFF_MS + self.rng.gen_range(0..=RECONNECT_BACKOFF_MS);
            }
            Event::Published { msg_id } => {
                if let Some((id, i)) = self.pending {
                    if id == msg_id {
                        self.pending = None;
                        if let Some(s) = self.record.sent.get_mut(i) {
                            s.acked = true;
                            s.acked_us = now_us;
                        }
                        c.acknowledged += 1;
                    }
                }
            }
            Event::PublishRejected { msg_id, topic_id, code } => {
                tracing::debug!(device = self.spec.index, msg_id, topic_id, ?code, state = ?client.state(), "PUBLISH rejected");
                c.rejected += 1;
                match code {
                    ReturnCode::Congestion => c.rejected_congestion += 1,
                    ReturnCode::InvalidTopicId => c.rejected_invalid_topic_id += 1,
                    _ => c.rejected_other += 1,
                }
                if matches!(self.pending, Some((id, _)) if id == msg_id) {
                    self.pending = None;
                }
                if code == ReturnCode::InvalidTopicId {
                    client.forget_topic(topic_id);
                }
            }
            Event::Subscribed { .. } => {
                // One request at a time: the downlink topic is subscribed first.
                if has_downlink && !self.subscribed {
                    self.subscribed = true;
                    self.broker_may_send = true;
                } else {
                    self.subs_done += 1;
                }
            }
            Event::SubscribeRejected { code, .. } if !has_downlink || self.subscribed => {
                // An extra filter the gateway refuses: skip it.
                tracing::debug!(device = self.spec.index, ?code, "subscription refused; skipped");
                self.subs_done += 1;
            }
            Event::RegisterRejected { .. } | Event::SubscribeRejected { .. } => {
                // Try again a little later rather than hammering a congested gateway.
                self.next_register = now + RECONNECT_BACKOFF_MS;
            }
            Event::Asleep => {
                if self.waking {
                    tracing::debug!(device = self.spec.index, "woke, fetched its messages, asleep again");
                    c.wakes += 1;
                    self.waking = false;
                } else {
                    tracing::debug!(device = self.spec.index, "asleep");
                    c.sleeps += 1;
                }
            }
            Event::WakeUpDue => self.waking = now < self.schedule.stop && client.wake(now).is_ok(),
            _ => {}
        }
    }

    /// Takes a received PUBLISH at `now_us`. Returns the one-way latency (µs) of the
    /// first copy of one of this device's downlink messages, for the group's histogram.
    pub fn handle_message(&mut self, r: Received<'_>, now_us: u64) -> Option<u64> {
        if r.topic != Some(self.spec.down_topic.as_str()) {
            self.record.counts.received_other += 1;
            return None;
        }
        let stamp = Stamp::decode(r.message.payload)?;
        if stamp.run != self.spec.run || stamp.device != self.spec.index {
            return None;
        }
        let n = self.record.downlink.entry(stamp.seq).or_insert(0);
        *n += 1;
        (*n == 1).then(|| now_us.saturating_sub(stamp.sent_us))
    }

    /// What the device does at `now_us`, given the engine's state.
    pub fn poll(&mut self, client: &mut SimClient<'_>, now_us: u64) -> Next {
        let now = now_us / 1000;
        if self.done || now >= self.schedule.end {
            return Next::Done;
        }
        let stopping = now >= self.schedule.stop;
        let acted = match client.state() {
            State::Disconnected if stopping => {
                self.done = true;
                return Next::Done;
            }
            State::Disconnected if now >= self.next_connect => {
                self.fresh_connect = true;
                client.connect(now).is_ok()
            }
            State::Disconnected => return self.wait(self.next_connect),
            State::Active if !client.is_busy() => match self.chore(client, now) {
                Chore::Idle(t) => return self.wait(t),
                chore => self.do_chore(client, chore, now_us),
            },
            State::Asleep if stopping => client.disconnect(now).is_ok(),
            State::Asleep if now >= self.next_publish => {
                if self.group.qos.minus_one > 0.0 && self.group.qos.pick(self.rng.gen()) == QoS::MinusOne {
                    // A sleeping device may publish at QoS -1 without waking the session.
                    self.publish_minus_one(client, now_us);
                    self.next_publish = now + self.next_interval();
                    true
                } else {
                    self.fresh_connect = false;
                    client.connect(now).is_ok()
                }
            }
            State::Asleep => return self.wait(self.next_publish),
            // Connecting, waking, disconnecting or a request outstanding: the engine's own
            // timers and the gateway's answers move it on.
            _ => return self.wait(u64::MAX),
        };
        if acted {
            Next::Transmit
        } else {
            // The engine refused the operation; look again a little later rather than spin.
            self.wait(now + RECONNECT_BACKOFF_MS.min(self.schedule.end.saturating_sub(now)).max(1))
        }
    }

    /// Starts leaving at `now_us` if still connected: true when a DISCONNECT was queued
    /// (the shell sends it and waits, bounded, for the answer).
    pub fn leave(&mut self, client: &mut SimClient<'_>, now_us: u64) -> bool {
        client.state() != State::Disconnected && client.disconnect(now_us / 1000).is_ok()
    }

    /// The gateway did not answer the final DISCONNECT.
    pub fn leave_unanswered(&mut self) {
        self.record.counts.disconnect_unanswered += 1;
    }

    /// The device's record, with what is still outstanding counted as unacknowledged.
    pub fn finish(self) -> DeviceRecord {
        let mut record = self.record;
        if self.pending.is_some() {
            record.counts.unacknowledged += 1;
        }
        record
    }

    fn wait(&self, t: u64) -> Next {
        Next::Wait(t.min(self.schedule.end))
    }

    fn has_downlink(&self) -> bool {
        self.group.downlink_interval.ms() > 0
    }

    fn next_interval(&mut self) -> u64 {
        let jitter = self.group.jitter.ms();
        self.group.publish_interval.ms() + if jitter > 0 { self.rng.gen_range(0..=jitter) } else { 0 }
    }

    /// The next thing an active device with nothing outstanding does at `now`.
    fn chore(&self, client: &SimClient<'_>, now: u64) -> Chore {
        let stopping = now >= self.schedule.stop;
        if stopping {
            return if self.pending.is_none() {
                Chore::Leave
            } else {
                Chore::Idle(u64::MAX)
            };
        }
        let retry_ready = now >= self.next_register;
        let registered = matches!(client.topic(&self.spec.topic), Some(TopicRef::Normal(_)));
        let wants_downlink = self.has_downlink() && !self.subscribed;
        let wants_extra = self.subs_done < self.spec.extra_filters.len();
        if !registered {
            return if retry_ready {
                Chore::Register
            } else {
                Chore::Idle(self.next_register)
            };
        }
        if wants_downlink && retry_ready {
            return Chore::SubscribeDownlink;
        }
        if !wants_downlink && wants_extra && retry_ready {
            return Chore::SubscribeExtra(self.subs_done);
        }
        if now >= self.next_publish {
            return Chore::Publish;
        }
        if self.group.sleep.is_some() && now >= self.awake_until {
            return Chore::Sleep;
        }
        let mut next = self.next_publish.min(self.awake_until);
        if wants_downlink || wants_extra {
            next = next.min(self.next_register);
        }
        Chore::Idle(next)
    }

    /// Does `chore`; true when something was queued for the gateway.
    fn do_chore(&mut self, client: &mut SimClient<'_>, chore: Chore, now_us: u64) -> bool {
        let now = now_us / 1000;
        match chore {
            Chore::Leave => client.disconnect(now).is_ok(),
            Chore::Register => client.register(now, &self.spec.topic).is_ok(),
            Chore::SubscribeDownlink => {
                let qos = QoS::from_bits(self.group.downlink_qos);
                let ok = client
                    .subscribe(now, TopicFilter::Name(&self.spec.down_topic), qos)
                    .is_ok();
                if !ok {
                    self.next_register = now + RECONNECT_BACKOFF_MS;
                }
                ok
            }
            Chore::SubscribeExtra(i) => {
                let Some(f) = self.spec.extra_filters.get(i) else {
                    self.subs_done += 1;
                    return false;
                };
                match client.subscribe(now, TopicFilter::Name(f), QoS::AtLeastOnce) {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(device = self.spec.index, filter = %f, error = %e, "cannot subscribe; skipped");
                        self.subs_done += 1;
                        false
                    }
                }
            }
            Chore::Publish => {
                self.publish(client, now_us);
                self.next_publish = now + self.next_interval();
                true
            }
            Chore::Sleep => {
                self.awake_until = u64::MAX;
                let secs = self
                    .group
                    .sleep
                    .map_or(0, |s| u16::try_from(s.duration.0.as_secs()).unwrap_or(u16::MAX));
                client.sleep(now, secs).is_ok()
            }
            Chore::Idle(_) => false,
        }
    }

    /// Publishes the next message at a QoS drawn from the group's mix.
    fn publish(&mut self, client: &mut SimClient<'_>, now_us: u64) {
        let qos = self.group.qos.pick(self.rng.gen());
        if qos == QoS::MinusOne {
            self.publish_minus_one(client, now_us);
            return;
        }
        let Some(topic) = client.topic(&self.spec.topic) else {
            return;
        };
        self.stamp(qos, now_us);
        match client.publish(now_us / 1000, topic, &self.payload, qos, false) {
            Ok(msg_id) => {
                let i = self.note_sent(qos, now_us);
                if qos != QoS::AtMostOnce {
                    self.pending = Some((msg_id, i));
                }
            }
            Err(e) => tracing::debug!(device = self.spec.index, error = %e, "publish refused by the engine"),
        }
    }

    /// Publishes the next message at QoS -1 to the group's short topic.
    fn publish_minus_one(&mut self, client: &mut SimClient<'_>, now_us: u64) {
        let Some(s) = self.spec.short else { return };
        self.stamp(QoS::MinusOne, now_us);
        if client
            .publish(now_us / 1000, TopicRef::Short(s), &self.payload, QoS::MinusOne, false)
            .is_ok()
        {
            self.note_sent(QoS::MinusOne, now_us);
        }
    }

    /// Writes the next message's payload.
    fn stamp(&mut self, qos: QoS, now_us: u64) {
        Stamp {
            run: self.spec.run,
            device: self.spec.index,
            seq: self.seq,
            qos,
            sent_us: now_us,
        }
        .encode(self.group.payload_size, &mut self.payload);
    }

    /// Records a message handed to the engine; returns its index in `sent`.
    fn note_sent(&mut self, qos: QoS, now_us: u64) -> usize {
        let i = self.record.sent.len();
        self.record.sent.push(Sent {
            seq: self.seq,
            qos,
            acked: false,
            sent_us: now_us,
            acked_us: 0,
        });
        self.seq += 1;
        let c = &mut self.record.counts;
        c.published += 1;
        match qos {
            QoS::MinusOne => c.published_qos_m1 += 1,
            QoS::AtMostOnce => c.published_qos0 += 1,
            QoS::AtLeastOnce => c.published_qos1 += 1,
            QoS::ExactlyOnce => c.published_qos2 += 1,
        }
        i
    }
}

#[cfg(test)]
mod tests;
