//! The one table of checks: name, specification section, needs, and code.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use super::{downlink, session, uplink, CheckResult, Ctx};

/// What a check needs besides the gateway's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// The broker (`--broker`): the check verifies there.
    pub broker: bool,
    /// A predefined topic of the gateway (`--predefined`).
    pub predefined: bool,
    /// A discovery address (`--discovery-addr`).
    pub discovery: bool,
}

const NONE: Needs = Needs {
    broker: false,
    predefined: false,
    discovery: false,
};
const BROKER: Needs = Needs { broker: true, ..NONE };
const PREDEFINED: Needs = Needs {
    broker: true,
    predefined: true,
    discovery: false,
};
const DISCOVERY: Needs = Needs {
    discovery: true,
    ..NONE
};

impl fmt::Display for Needs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.broker {
            parts.push("broker");
        }
        if self.predefined {
            parts.push("predefined");
        }
        if self.discovery {
            parts.push("discovery-addr");
        }
        if parts.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

type CheckFuture<'a> = Pin<Box<dyn Future<Output = CheckResult> + Send + 'a>>;
type CheckFn = for<'a> fn(&'a mut Ctx) -> CheckFuture<'a>;

/// One check of the suite.
pub struct Check {
    /// Its name (`--only`, `--skip`, `--expect-unsupported` take it).
    pub name: &'static str,
    /// The section of the MQTT-SN v1.2 specification (or MQTT 3.1.1, marked so) it tests.
    pub section: &'static str,
    /// What it proves when it passes.
    pub description: &'static str,
    /// What it needs to run.
    pub needs: Needs,
    pub(super) run: CheckFn,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("name", &self.name)
            .field("section", &self.section)
            .field("needs", &self.needs)
            .finish_non_exhaustive()
    }
}

macro_rules! check {
    ($name:literal, $section:literal, $needs:expr, $f:path, $description:literal) => {
        Check {
            name: $name,
            section: $section,
            needs: $needs,
            run: |ctx| Box::pin($f(ctx)),
            description: $description,
        }
    };
}

/// Every check, in the order they run.
pub static CHECKS: &[Check] = &[
    check!("connect", "6.2", NONE, session::connect,
        "CONNECT is answered by an accepted CONNACK; DISCONNECT by DISCONNECT"),
    check!("register", "6.5", NONE, session::register,
        "REGISTER is answered by an accepted REGACK echoing the message id, with a usable topic id"),
    check!("publish-qos0", "6.6", BROKER, uplink::publish_qos0,
        "a QoS 0 PUBLISH to a registered topic reaches the broker, payload intact"),
    check!("publish-qos1", "6.6", BROKER, uplink::publish_qos1,
        "a QoS 1 PUBLISH gets a PUBACK echoing topic id and message id, and reaches the broker at QoS 1"),
    check!("publish-qos2", "6.6", BROKER, uplink::publish_qos2,
        "a QoS 2 PUBLISH completes PUBREC/PUBREL/PUBCOMP (ids echoed) and reaches the broker once, at QoS 2"),
    check!("publish-qos-minus-one", "6.8", BROKER, uplink::minus_one_short,
        "a QoS -1 PUBLISH to a short topic, from a client that never connected, reaches the broker"),
    check!("publish-qos-minus-one-predefined", "6.8", PREDEFINED, uplink::minus_one_predefined,
        "a QoS -1 PUBLISH to the predefined topic, without connecting, reaches the broker under its name"),
    check!("short-topic", "6.7", BROKER, uplink::short_topic,
        "a QoS 1 PUBLISH to a two-character short topic is acknowledged (ids echoed) and reaches the broker under that name"),
    check!("predefined-topic", "6.7", PREDEFINED, uplink::predefined_topic,
        "a QoS 1 PUBLISH to the predefined topic id is acknowledged (ids echoed) and reaches the broker under its name"),
    check!("length-three-octet", "5.2.1", BROKER, uplink::length_three_octet,
        "a short PUBLISH written with the 3-octet length form (0x01, length) is accepted and reaches the broker"),
    check!("long-topic", "5.4.10", BROKER, uplink::long_topic,
        "a 300-character topic name registers (a REGISTER longer than 255 octets) and a PUBLISH on it reaches the broker"),
    check!("large-payload", "5.2.1", BROKER, uplink::large_payload,
        "a PUBLISH of exactly --max-datagram octets is acknowledged and reaches the broker intact"),
    check!("subscribe-qos0", "6.9", BROKER, downlink::subscribe_qos0,
        "a broker message at QoS 0 reaches a device subscribed by name, at QoS 0"),
    check!("subscribe-qos1", "6.9", BROKER, downlink::subscribe_qos1,
        "a broker message at QoS 1 reaches a device subscribed by name, at QoS 1"),
    check!("subscribe-qos2", "6.9", BROKER, downlink::subscribe_qos2,
        "a broker message at QoS 2 reaches a device subscribed by name, at QoS 2, once (PUBREC/PUBREL/PUBCOMP)"),
    check!("wildcard", "6.10", BROKER, downlink::wildcard,
        "a '+' subscription: the gateway REGISTERs the concrete topic, then delivers on that topic id"),
    check!("retained", "6.9", BROKER, downlink::retained,
        "a retained message reaches a device that subscribes afterwards, with RETAIN set"),
    check!("retransmission", "6.13", BROKER, downlink::retransmission,
        "a QoS 1 delivery the device does not acknowledge is sent again with DUP set, the same message id and payload"),
    check!("sleep-and-wake", "6.14", BROKER, downlink::sleep_and_wake,
        "messages of QoS 0, 1 and 2 for a sleeping device are held, then all delivered on one PINGREQ, then PINGRESP"),
    check!("will", "6.3", BROKER, session::will_keep_alive,
        "the will handshake on CONNECT; a client silent past 1.5 x keep-alive gets its will published at the broker"),
    check!("no-will-after-disconnect", "6.12", BROKER, session::no_will_after_disconnect,
        "a client with a will that sends DISCONNECT does not get its will published"),
    check!("will-sleep-deadline", "6.14", BROKER, session::will_sleep_deadline,
        "a sleeping client that misses its sleep deadline is lost: its will is published"),
    check!("takeover", "MQTT 3.1.4", BROKER, session::takeover,
        "a CONNECT with a client id in use, from another address, takes the session over: the new address gets the messages"),
    check!("hostile-input", "5.2", NONE, session::hostile_input,
        "malformed and truncated datagrams (e.g. 05 0c 20 00 01) from a connected client and from strangers leave its session working"),
    check!("searchgw", "6.1", NONE, session::searchgw,
        "SEARCHGW sent to the gateway's address is answered by GWINFO"),
    check!("discovery", "6.1", DISCOVERY, session::discovery,
        "SEARCHGW sent to --discovery-addr is answered by GWINFO, unicast or broadcast on that address"),
];
