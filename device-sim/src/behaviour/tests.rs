//! The device behaviour in virtual time against a scripted gateway: no sockets, no clock.

use std::time::Duration;

use rand::SeedableRng;
use sn_codec::client::Client;
use sn_codec::{Packet, PubAck, QoS, RegAck, ReturnCode, SubAck, TopicRef};

use super::*;
use crate::payload::Stamp;
use crate::scenario::{Dur, QosMix, SleepSpec};

const RUN: u32 = 0x0bad_cafe;

/// One packet the device sent, at a virtual time.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Connect {
        clean: bool,
    },
    Register(String),
    Publish {
        qos: QoS,
        dup: bool,
        seq: u32,
        sent_us: u64,
    },
    Subscribe(String),
    PingReq(Option<String>),
    Disconnect(Option<u16>),
    Other(String),
}

/// A gateway in a few lines: answers what a device sends, as told.
#[derive(Default)]
struct Gateway {
    /// Ignore everything (a gateway that is gone).
    silent: bool,
    /// Answer the next REGISTERs with this code instead of accepting.
    refuse_register: Vec<ReturnCode>,
    /// Answer the next QoS 1 PUBLISHes with this code instead of accepting.
    refuse_publish: Vec<ReturnCode>,
    next_topic_id: u16,
    seen: Vec<(u64, Seen)>,
}

impl Gateway {
    fn handle(&mut self, now_ms: u64, datagram: &[u8]) -> Vec<Vec<u8>> {
        let Ok(p) = Packet::decode(datagram) else {
            self.seen.push((now_ms, Seen::Other("malformed".into())));
            return Vec::new();
        };
        let seen = match &p {
            Packet::Connect(c) => Seen::Connect { clean: c.clean_session },
            Packet::Register(r) => Seen::Register(r.topic_name.into()),
            Packet::Publish(p) => {
                let stamp = Stamp::decode(p.data);
                Seen::Publish {
                    qos: p.qos,
                    dup: p.dup,
                    seq: stamp.map_or(u32::MAX, |s| s.seq),
                    sent_us: stamp.map_or(0, |s| s.sent_us),
                }
            }
            Packet::Subscribe(s) => Seen::Subscribe(match s.topic {
                sn_codec::TopicFilter::Name(n) => n.into(),
                other => format!("{other:?}"),
            }),
            Packet::PingReq(id) => Seen::PingReq(id.map(String::from)),
            Packet::Disconnect(d) => Seen::Disconnect(*d),
            other => Seen::Other(format!("{:?}", other.msg_type())),
        };
        self.seen.push((now_ms, seen));
        if self.silent {
            return Vec::new();
        }
        let reply = match p {
            Packet::Connect(_) => Some(Packet::ConnAck(ReturnCode::Accepted)),
            Packet::Register(r) => {
                let code = if self.refuse_register.is_empty() {
                    ReturnCode::Accepted
                } else {
                    self.refuse_register.remove(0)
                };
                self.next_topic_id += 1;
                Some(Packet::RegAck(RegAck {
                    topic_id: self.next_topic_id,
                    msg_id: r.msg_id,
                    code,
                }))
            }
            Packet::Publish(p) if p.qos == QoS::AtLeastOnce => {
                let code = if self.refuse_publish.is_empty() {
                    ReturnCode::Accepted
                } else {
                    self.refuse_publish.remove(0)
                };
                let topic_id = match p.topic {
                    TopicRef::Normal(id) | TopicRef::Predefined(id) => id,
                    TopicRef::Short([a, b]) => u16::from_be_bytes([a, b]),
                };
                Some(Packet::PubAck(PubAck {
                    topic_id,
                    msg_id: p.msg_id,
                    code,
                }))
            }
            Packet::Publish(p) if p.qos == QoS::ExactlyOnce => Some(Packet::PubRec(p.msg_id)),
            Packet::PubRel(id) => Some(Packet::PubComp(id)),
            Packet::Subscribe(s) => Some(Packet::SubAck(SubAck {
                qos: s.qos,
                topic_id: 0,
                msg_id: s.msg_id,
                code: ReturnCode::Accepted,
            })),
            Packet::PingReq(_) => Some(Packet::PingResp),
            Packet::Disconnect(_) => Some(Packet::Disconnect(None)),
            _ => None,
        };
        reply
            .and_then(|r| {
                let mut buf = vec![0; 512];
                let n = r.encode(&mut buf).ok()?;
                buf.truncate(n);
                Some(buf)
            })
            .into_iter()
            .collect()
    }

    /// When the device sent each packet that `f` picks (ms).
    fn times(&self, f: impl Fn(&Seen) -> bool) -> Vec<u64> {
        self.seen.iter().filter(|(_, s)| f(s)).map(|(t, _)| *t).collect()
    }

    fn kinds(&self) -> Vec<&Seen> {
        self.seen.iter().map(|(_, s)| s).collect()
    }
}

/// A run's times (ms).
fn times(start: u64, stop: u64, end: u64) -> Schedule {
    Schedule { start, stop, end }
}

fn group() -> Group {
    Group {
        name: "g".into(),
        publish_interval: Dur(Duration::from_secs(1)),
        jitter: Dur(Duration::ZERO),
        qos: QosMix {
            minus_one: 0.0,
            q0: 0.0,
            q1: 1.0,
            q2: 0.0,
        },
        t_retry: Dur(Duration::from_millis(500)),
        n_retry: 2,
        ..Group::default()
    }
}

/// Drives a device and the scripted gateway in virtual time.
struct Rig<'s> {
    client: SimClient<'s>,
    b: Behaviour<'s>,
    gw: Gateway,
    /// Virtual time, µs.
    now: u64,
    /// Downlink latencies the behaviour reported.
    latencies: Vec<u64>,
    done: bool,
}

impl<'s> Rig<'s> {
    fn new(spec: &'s DeviceSpec, g: &'s Group, schedule: Schedule, gw: Gateway) -> Self {
        Rig {
            client: Client::new(spec.client_config(g)),
            b: Behaviour::new(spec, g, schedule, SmallRng::seed_from_u64(7)),
            gw,
            now: schedule.start * 1000,
            latencies: Vec::new(),
            done: false,
        }
    }

    fn ms(&self) -> u64 {
        self.now / 1000
    }

    /// Sends what the engine queued to the gateway and its answers back.
    fn exchange(&mut self) {
        let mut out = vec![0u8; 2048];
        while let Some(n) = self.client.poll_transmit(&mut out) {
            let replies = self.gw.handle(self.ms(), out.get(..n).unwrap_or(&[]));
            for r in replies {
                self.deliver(&r);
            }
        }
    }

    /// A datagram from the gateway.
    fn deliver(&mut self, datagram: &[u8]) {
        let ms = self.ms();
        if let Ok(Some(m)) = self.client.handle_datagram(ms, datagram) {
            let topic = self.client.topic_name(&m.topic);
            if let Some(l) = self.b.handle_message(Received { topic, message: &m }, self.now) {
                self.latencies.push(l);
            }
        }
    }

    fn events(&mut self) {
        while let Some(e) = self.client.poll_event() {
            self.b.handle_event(&mut self.client, e, self.now);
        }
    }

    /// Runs until virtual time `until_ms` or until the behaviour is done.
    fn run_until(&mut self, until_ms: u64) {
        while !self.done && self.ms() < until_ms {
            self.events();
            match self.b.poll(&mut self.client, self.now) {
                Next::Done => self.done = true,
                Next::Transmit => self.exchange(),
                Next::Wait(t) => {
                    let timer = self.client.poll_timeout().unwrap_or(u64::MAX);
                    let next = t.min(timer).min(until_ms).max(self.ms() + 1);
                    self.now = next * 1000;
                    if timer <= next {
                        self.client.handle_timeout(next);
                        self.exchange();
                    }
                }
            }
        }
        self.events();
    }
}

#[test]
fn connects_registers_publishes_on_schedule_and_leaves() {
    let g = group();
    let spec = DeviceSpec::new(RUN, "sim", &g, 0, 3);
    let schedule = times(1_000, 6_000, 8_000);
    let mut rig = Rig::new(&spec, &g, schedule, Gateway::default());
    rig.run_until(20_000);
    assert!(rig.done, "the behaviour ends by the end of the run");
    let kinds = rig.gw.kinds();
    assert_eq!(kinds.first(), Some(&&Seen::Connect { clean: true }));
    assert_eq!(kinds.get(1), Some(&&Seen::Register(spec.topic.clone())));
    assert_eq!(kinds.last(), Some(&&Seen::Disconnect(None)));
    let publishes: Vec<(u64, u32)> = rig
        .gw
        .seen
        .iter()
        .filter_map(|(t, s)| match s {
            Seen::Publish {
                qos: QoS::AtLeastOnce,
                seq,
                ..
            } => Some((*t, *seq)),
            _ => None,
        })
        .collect();
    // The first publish within a second of the start, then one a second until the stop.
    assert!((5..=6).contains(&publishes.len()), "{publishes:?}");
    for (i, (t, seq)) in publishes.iter().enumerate() {
        assert_eq!(*seq as usize, i);
        assert!(*t >= 1_000 && *t < 6_000, "published at {t}");
    }
    for w in publishes.windows(2) {
        assert_eq!(w[1].0 - w[0].0, 1_000, "one publish per interval: {publishes:?}");
    }
    let record = rig.b.finish();
    assert_eq!(record.counts.published as usize, publishes.len());
    assert_eq!(record.counts.acknowledged, record.counts.published);
    assert_eq!(record.counts.unacknowledged, 0);
    assert!(record.sent.iter().all(|s| s.acked && s.acked_us >= s.sent_us));
}

#[test]
fn a_silent_gateway_is_lost_and_the_device_reconnects_after_its_backoff() {
    let g = group();
    let spec = DeviceSpec::new(RUN, "sim", &g, 0, 0);
    let schedule = times(0, 10_000, 11_000);
    let gw = Gateway {
        silent: true,
        ..Gateway::default()
    };
    let mut rig = Rig::new(&spec, &g, schedule, gw);
    rig.run_until(4_000);
    let connects: Vec<u64> = rig.gw.times(|s| matches!(s, Seen::Connect { .. }));
    // CONNECT, Nretry (2) retransmissions Tretry (500 ms) apart, then lost at 1,500 ms:
    // the next CONNECT waits 1 to 2 s.
    assert_eq!(connects.get(..3), Some(&[0, 500, 1_000][..]), "{connects:?}");
    let again = connects.get(3).copied().unwrap_or(u64::MAX);
    assert!((2_500..=3_500).contains(&again), "reconnected at {again}: {connects:?}");
    assert!(rig.b.record().counts.gateway_lost >= 1);
    assert_eq!(rig.b.record().counts.connected, 0);
}

#[test]
fn a_refused_register_is_retried_after_the_backoff_not_at_once() {
    let g = group();
    let spec = DeviceSpec::new(RUN, "sim", &g, 0, 0);
    let schedule = times(0, 5_000, 6_000);
    let gw = Gateway {
        refuse_register: vec![ReturnCode::Congestion],
        ..Gateway::default()
    };
    let mut rig = Rig::new(&spec, &g, schedule, gw);
    rig.run_until(3_000);
    let registers: Vec<u64> = rig.gw.times(|s| matches!(s, Seen::Register(_)));
    assert_eq!(registers, vec![0, RECONNECT_BACKOFF_MS], "{:?}", rig.gw.seen);
}

#[test]
fn invalid_topic_id_makes_the_device_register_again() {
    let g = group();
    let spec = DeviceSpec::new(RUN, "sim", &g, 0, 0);
    let schedule = times(0, 5_000, 6_000);
    let gw = Gateway {
        refuse_publish: vec![ReturnCode::InvalidTopicId],
        ..Gateway::default()
    };
    let mut rig = Rig::new(&spec, &g, schedule, gw);
    rig.run_until(5_000);
    let registers = rig.gw.kinds().iter().filter(|s| matches!(s, Seen::Register(_))).count();
    assert_eq!(registers, 2, "{:?}", rig.gw.seen);
    let c = &rig.b.record().counts;
    assert_eq!(c.rejected_invalid_topic_id, 1);
    assert!(c.acknowledged >= 1, "later publishes go through on the new id");
}

#[test]
fn a_sleepy_device_sleeps_wakes_with_its_client_id_and_counts_both() {
    let g = Group {
        publish_interval: Dur(Duration::ZERO),
        sleep: Some(SleepSpec {
            duration: Dur(Duration::from_secs(3)),
            awake: Dur(Duration::from_secs(1)),
        }),
        ..group()
    };
    let spec = DeviceSpec::new(RUN, "sim", &g, 0, 0);
    let schedule = times(0, 12_000, 13_000);
    let mut rig = Rig::new(&spec, &g, schedule, Gateway::default());
    rig.run_until(12_000);
    let sleeps: Vec<u64> = rig.gw.times(|s| *s == Seen::Disconnect(Some(3)));
    assert_eq!(
        sleeps.first(),
        Some(&1_000),
        "asleep after its awake time: {:?}",
        rig.gw.seen
    );
    let wakes = rig
        .gw
        .kinds()
        .iter()
        .filter(|s| ***s == Seen::PingReq(Some(spec.client_id.clone())))
        .count();
    assert!(
        wakes >= 2,
        "wakes with PINGREQ carrying its client id: {:?}",
        rig.gw.seen
    );
    let c = &rig.b.record().counts;
    assert_eq!(c.sleeps, 1);
    assert_eq!(c.wakes as usize, wakes);
    // Leaving from asleep: DISCONNECT without a duration.
    rig.run_until(20_000);
    assert_eq!(rig.gw.kinds().last(), Some(&&Seen::Disconnect(None)));
}

#[test]
fn downlink_first_then_extra_filters_and_each_message_counted_once() {
    let g = Group {
        publish_interval: Dur(Duration::ZERO),
        downlink_interval: Dur(Duration::from_secs(1)),
        downlink_qos: 1,
        subscribe: vec!["{prefix}/{run}/+/{device}".into()],
        ..group()
    };
    let spec = DeviceSpec::new(RUN, "sim", &g, 0, 5);
    let schedule = times(0, 5_000, 6_000);
    let mut rig = Rig::new(&spec, &g, schedule, Gateway::default());
    assert!(!rig.b.broker_may_send());
    rig.run_until(100);
    let subs: Vec<&Seen> = rig
        .gw
        .kinds()
        .into_iter()
        .filter(|s| matches!(s, Seen::Subscribe(_)))
        .collect();
    assert_eq!(
        subs,
        vec![
            &Seen::Subscribe(spec.down_topic.clone()),
            &Seen::Subscribe(format!("sim/{RUN:08x}/+/5")),
        ]
    );
    assert!(rig.b.broker_may_send(), "subscribed: the broker side may send");

    // The gateway registers the downlink topic, then delivers one message twice (DUP).
    let mut buf = vec![0u8; 256];
    let reg = Packet::Register(sn_codec::Register {
        topic_id: 77,
        msg_id: 1,
        topic_name: &spec.down_topic,
    });
    let n = reg.encode(&mut buf).unwrap_or(0);
    rig.deliver(&buf[..n]);
    let mut payload = Vec::new();
    Stamp {
        run: RUN,
        device: 5,
        seq: 0,
        qos: QoS::AtLeastOnce,
        sent_us: rig.now - 2_000,
    }
    .encode(32, &mut payload);
    for (msg_id, dup) in [(9, false), (9, true)] {
        let p = Packet::Publish(sn_codec::Publish {
            dup,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TopicRef::Normal(77),
            msg_id,
            data: &payload,
        });
        let n = p.encode(&mut buf).unwrap_or(0);
        rig.deliver(&buf[..n]);
    }
    assert_eq!(rig.latencies, vec![2_000], "the first copy's latency, once");
    assert_eq!(rig.b.record().downlink.get(&0), Some(&2));

    // Another device's message on this topic is ignored; one on another topic is
    // counted apart.
    let mut other = Vec::new();
    Stamp {
        run: RUN,
        device: 6,
        seq: 1,
        qos: QoS::AtMostOnce,
        sent_us: 0,
    }
    .encode(32, &mut other);
    let p = Packet::Publish(sn_codec::Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: TopicRef::Normal(77),
        msg_id: 0,
        data: &other,
    });
    let n = p.encode(&mut buf).unwrap_or(0);
    rig.deliver(&buf[..n]);
    let p = Packet::Publish(sn_codec::Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: TopicRef::Short(*b"zz"),
        msg_id: 0,
        data: &payload,
    });
    let n = p.encode(&mut buf).unwrap_or(0);
    rig.deliver(&buf[..n]);
    assert_eq!(rig.b.record().downlink.len(), 1);
    assert_eq!(rig.b.record().counts.received_other, 1);
    assert_eq!(rig.latencies.len(), 1);
}

#[test]
fn clean_session_loss_stops_the_broker_side_and_resubscribes_after_reconnect() {
    let g = Group {
        publish_interval: Dur(Duration::ZERO),
        downlink_interval: Dur(Duration::from_secs(1)),
        ..group()
    };
    let spec = DeviceSpec::new(RUN, "sim", &g, 0, 1);
    let schedule = times(0, 70_000, 75_000);
    let mut rig = Rig::new(&spec, &g, schedule, Gateway::default());
    rig.run_until(100);
    assert!(rig.b.broker_may_send());
    // The gateway goes quiet: the keep-alive PINGREQ (every 60 s) goes unanswered and the
    // gateway is lost.
    rig.gw.silent = true;
    rig.run_until(63_000);
    assert_eq!(rig.b.record().counts.gateway_lost, 1, "{:?}", rig.gw.seen);
    assert!(!rig.b.broker_may_send(), "a lost clean session holds no subscription");
    rig.gw.silent = false;
    rig.run_until(66_000);
    let subs = rig
        .gw
        .kinds()
        .iter()
        .filter(|s| ***s == Seen::Subscribe(spec.down_topic.clone()))
        .count();
    assert_eq!(subs, 2, "subscribed again in the new session: {:?}", rig.gw.seen);
    assert!(rig.b.broker_may_send());
}

#[test]
fn qos_minus_one_while_asleep_does_not_wake_the_session() {
    let g = Group {
        publish_interval: Dur(Duration::from_secs(1)),
        qos: QosMix {
            minus_one: 1.0,
            q0: 0.0,
            q1: 0.0,
            q2: 0.0,
        },
        short_topic: Some("ab".into()),
        sleep: Some(SleepSpec {
            duration: Dur(Duration::from_secs(30)),
            awake: Dur(Duration::from_millis(100)),
        }),
        ..group()
    };
    let spec = DeviceSpec::new(RUN, "sim", &g, 0, 0);
    let schedule = times(0, 6_000, 7_000);
    let mut rig = Rig::new(&spec, &g, schedule, Gateway::default());
    rig.run_until(5_900);
    let kinds = rig.gw.kinds();
    let connects = kinds.iter().filter(|s| matches!(s, Seen::Connect { .. })).count();
    let m1 = kinds
        .iter()
        .filter(|s| matches!(s, Seen::Publish { qos: QoS::MinusOne, .. }))
        .count();
    assert_eq!(connects, 1, "{kinds:?}");
    assert!(m1 >= 4, "{kinds:?}");
    assert_eq!(rig.b.record().counts.published_qos_m1 as usize, m1);
}
