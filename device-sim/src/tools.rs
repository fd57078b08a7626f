//! One-shot tools in the spirit of `mosquitto_pub` and `mosquitto_sub`, for MQTT-SN over
//! UDP: `mqtt-sn-sim pub` and `mqtt-sn-sim sub`.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use sn_codec::client::{Client, Config, Event};
use sn_codec::{QoS, ReturnCode, TopicFilter, TopicRef};

use crate::device::{Device, Received, MAX_PAYLOAD};
use crate::radio::LinkModel;
use crate::station::{now_ms, Station};

/// Why a tool failed. The binary prints it and exits with a non-zero status.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The socket could not be opened.
    #[error("cannot open a UDP socket: {0}")]
    Io(#[from] std::io::Error),
    /// The gateway did not answer in time.
    #[error("no answer from the gateway at {gateway} to {what} (timed out)")]
    Timeout {
        /// The gateway address.
        gateway: SocketAddr,
        /// What was asked.
        what: &'static str,
    },
    /// The gateway stopped answering after retransmissions.
    #[error("the gateway at {gateway} stopped answering ({what}: retransmissions exhausted)")]
    GatewayLost {
        /// The gateway address.
        gateway: SocketAddr,
        /// What was asked.
        what: &'static str,
    },
    /// The gateway refused something.
    #[error("the gateway rejected {what}: {code:?}")]
    Rejected {
        /// What was asked.
        what: &'static str,
        /// Its return code.
        code: ReturnCode,
    },
    /// The gateway ended the connection.
    #[error("the gateway disconnected the client during {what}")]
    Disconnected {
        /// What was asked.
        what: &'static str,
    },
    /// The engine refused the request before sending anything.
    #[error("cannot {what}: {error}")]
    Client {
        /// What was asked.
        what: &'static str,
        /// The engine's reason.
        error: sn_codec::client::ClientError,
    },
    /// `sub -C COUNT -W DURATION`: fewer messages than COUNT arrived in time.
    #[error("only {got} of {want} messages arrived in time")]
    TooFew {
        /// Messages received.
        got: u64,
        /// Messages expected.
        want: u64,
    },
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
}

/// How a tool names its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicArg {
    /// A topic name (registered with REGISTER for pub; may hold wildcards for sub).
    Name(String),
    /// A predefined topic id.
    Predefined(u16),
    /// A two-character short topic name.
    Short([u8; 2]),
}

impl TopicArg {
    /// From the `-t`, `-p` and `--short` options (exactly one must be given).
    pub fn from_options(
        name: Option<String>,
        predefined: Option<u16>,
        short: Option<String>,
    ) -> Result<Self, ToolError> {
        match (name, predefined, short) {
            (Some(n), None, None) if !n.is_empty() => Ok(TopicArg::Name(n)),
            (None, Some(id), None) if id != 0 && id != 0xFFFF => Ok(TopicArg::Predefined(id)),
            (None, None, Some(s)) => match *s.as_bytes() {
                [a, b] => Ok(TopicArg::Short([a, b])),
                _ => Err(ToolError::Usage(format!(
                    "--short {s:?}: a short topic name has exactly two characters"
                ))),
            },
            (None, None, None) => Err(ToolError::Usage("give a topic: -t NAME, -p ID or --short XY".into())),
            _ => Err(ToolError::Usage(
                "give exactly one topic: -t NAME, -p ID or --short XY (predefined ids 1..65534)".into(),
            )),
        }
    }
}

/// Settings shared by the tools.
#[derive(Debug, Clone)]
pub struct Common {
    /// The gateway's UDP address.
    pub gateway: SocketAddr,
    /// Client id.
    pub client_id: String,
    /// Keep-alive in seconds.
    pub keep_alive: u16,
    /// How long to wait for each answer from the gateway in total.
    pub timeout: Duration,
    /// Tretry in ms.
    pub t_retry_ms: u32,
    /// Nretry.
    pub n_retry: u8,
    /// Talk to the gateway over DTLS 1.2 (a `--dtls` listener) with this pre-shared key
    /// or certificate.
    pub dtls: Option<crate::dtls::Credentials>,
}

impl Common {
    pub(crate) fn config<'a>(&'a self, predefined: &'a [(u16, &'a str)]) -> Config<'a> {
        Config {
            keep_alive: self.keep_alive,
            t_retry: self.t_retry_ms,
            n_retry: self.n_retry,
            n_adv: 0,
            predefined,
            ..Config::new(&self.client_id)
        }
    }

    pub(crate) async fn device<'a>(&'a self, predefined: &'a [(u16, &'a str)]) -> Result<Device<'a>, ToolError> {
        let local = match self.gateway {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let rng = SmallRng::seed_from_u64(0);
        let station = match &self.dtls {
            Some(c) => Station::bind_dtls(local, self.gateway, c, self.timeout, LinkModel::PERFECT, rng).await?,
            None => Station::bind(local, self.gateway, LinkModel::PERFECT, rng).await?,
        };
        Ok(Device::new(Client::new(self.config(predefined)), station))
    }

    fn deadline(&self) -> u64 {
        now_ms().saturating_add(u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX))
    }
}

pub(crate) fn ignore(_: Received<'_>) {}

/// Waits for the outcome of a request: `ok` picks the success, rejections and losses
/// become errors.
pub(crate) async fn outcome<T>(
    dev: &mut Device<'_>,
    common: &Common,
    what: &'static str,
    mut ok: impl FnMut(Event) -> Option<T>,
    on_message: &mut (dyn FnMut(Received<'_>) + Send),
) -> Result<T, ToolError> {
    let gateway = common.gateway;
    let r = dev
        .until(
            common.deadline(),
            |e| {
                if let Some(v) = ok(e) {
                    return Some(Ok(v));
                }
                match e {
                    Event::ConnectRejected(code)
                    | Event::RegisterRejected { code, .. }
                    | Event::PublishRejected { code, .. }
                    | Event::SubscribeRejected { code, .. } => Some(Err(ToolError::Rejected { what, code })),
                    Event::GatewayLost => Some(Err(ToolError::GatewayLost { gateway, what })),
                    Event::Disconnected => Some(Err(ToolError::Disconnected { what })),
                    _ => None,
                }
            },
            on_message,
        )
        .await;
    r.unwrap_or(Err(ToolError::Timeout { gateway, what }))
}

pub(crate) async fn connect(dev: &mut Device<'_>, common: &Common) -> Result<(), ToolError> {
    dev.client
        .connect(now_ms())
        .map_err(|error| ToolError::Client { what: "connect", error })?;
    outcome(
        dev,
        common,
        "CONNECT",
        |e| (e == Event::Connected).then_some(()),
        &mut ignore,
    )
    .await
}

pub(crate) async fn disconnect(dev: &mut Device<'_>, common: &Common) {
    if dev.client.disconnect(now_ms()).is_ok() {
        let short = Common {
            timeout: common.timeout.min(Duration::from_secs(2)),
            ..common.clone()
        };
        // The session is over either way; a lost DISCONNECT only delays the will-less end.
        let _ = outcome(&mut *dev, &short, "DISCONNECT", |_| None::<()>, &mut ignore).await;
    }
    dev.station.close().await;
}

/// `mqtt-sn-sim pub`: what to publish.
#[derive(Debug, Clone)]
pub struct PubArgs {
    /// Shared settings.
    pub common: Common,
    /// The topic.
    pub topic: TopicArg,
    /// The payload.
    pub message: Vec<u8>,
    /// QoS -1, 0, 1 or 2.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
}

/// Publishes one message: connects (unless QoS -1), registers a topic name, publishes,
/// waits for the acknowledgement (QoS 1/2) and disconnects.
pub async fn publish(args: &PubArgs) -> Result<(), ToolError> {
    if args.message.len() > MAX_PAYLOAD {
        return Err(ToolError::Usage(format!(
            "the message has {} bytes; at most {MAX_PAYLOAD} fit",
            args.message.len()
        )));
    }
    let common = &args.common;
    let mut dev = common.device(&[]).await?;
    if args.qos == QoS::MinusOne {
        let topic = match args.topic {
            TopicArg::Predefined(id) => TopicRef::Predefined(id),
            TopicArg::Short(s) => TopicRef::Short(s),
            TopicArg::Name(_) => {
                return Err(ToolError::Usage(
                    "QoS -1 needs a predefined (-p ID) or short (--short XY) topic".into(),
                ))
            }
        };
        dev.client
            .publish(now_ms(), topic, &args.message, QoS::MinusOne, args.retain)
            .map_err(|error| ToolError::Client { what: "publish", error })?;
        dev.flush().await;
        return Ok(());
    }
    connect(&mut dev, common).await?;
    let topic = match &args.topic {
        TopicArg::Predefined(id) => TopicRef::Predefined(*id),
        TopicArg::Short(s) => TopicRef::Short(*s),
        TopicArg::Name(name) => {
            let msg_id = dev.client.register(now_ms(), name).map_err(|error| ToolError::Client {
                what: "register",
                error,
            })?;
            let topic_id = outcome(
                &mut dev,
                common,
                "REGISTER",
                |e| match e {
                    Event::Registered { msg_id: m, topic_id } if m == msg_id => Some(topic_id),
                    _ => None,
                },
                &mut ignore,
            )
            .await?;
            TopicRef::Normal(topic_id)
        }
    };
    let msg_id = dev
        .client
        .publish(now_ms(), topic, &args.message, args.qos, args.retain)
        .map_err(|error| ToolError::Client { what: "publish", error })?;
    if matches!(args.qos, QoS::AtLeastOnce | QoS::ExactlyOnce) {
        outcome(
            &mut dev,
            common,
            "PUBLISH",
            |e| matches!(e, Event::Published { msg_id: m } if m == msg_id).then_some(()),
            &mut ignore,
        )
        .await?;
    } else {
        dev.flush().await;
    }
    disconnect(&mut dev, common).await;
    Ok(())
}

/// `mqtt-sn-sim sub`: what to subscribe to.
#[derive(Debug, Clone)]
pub struct SubArgs {
    /// Shared settings.
    pub common: Common,
    /// The topic filter.
    pub topic: TopicArg,
    /// Requested QoS (0, 1, 2).
    pub qos: QoS,
    /// Stop after this many messages (`None`: run until interrupted or `wait` elapses).
    pub count: Option<u64>,
    /// Stop after this long without reaching `count` (`None`: no limit). With a count, not
    /// reaching it in time is an error.
    pub wait: Option<Duration>,
    /// Print `topic payload` instead of `payload`.
    pub verbose: bool,
}

/// Subscribes and prints received messages to `out`, one per line. Returns how many.
pub async fn subscribe(args: &SubArgs, out: &mut (dyn Write + Send)) -> Result<u64, ToolError> {
    subscribe_then(args, out, || {}).await
}

/// Like [`subscribe`], calling `subscribed` once the gateway has acknowledged the
/// subscription (e.g. to start publishers in a test).
pub async fn subscribe_then(
    args: &SubArgs,
    out: &mut (dyn Write + Send),
    subscribed: impl FnOnce(),
) -> Result<u64, ToolError> {
    let common = &args.common;
    let mut dev = common.device(&[]).await?;
    connect(&mut dev, common).await?;
    let filter = match &args.topic {
        TopicArg::Name(n) => TopicFilter::Name(n),
        TopicArg::Predefined(id) => TopicFilter::Predefined(*id),
        TopicArg::Short(s) => TopicFilter::Short(*s),
    };
    let msg_id = dev
        .client
        .subscribe(now_ms(), filter, args.qos)
        .map_err(|error| ToolError::Client {
            what: "subscribe",
            error,
        })?;
    let mut received = 0u64;
    let verbose = args.verbose;
    let print = |r: Received<'_>, out: &mut (dyn Write + Send)| {
        let payload = String::from_utf8_lossy(r.message.payload);
        let line = if verbose {
            let topic = match (r.topic, r.message.topic) {
                (Some(t), _) => t.to_string(),
                (None, TopicRef::Normal(id)) => format!("<topic id {id}>"),
                (None, TopicRef::Predefined(id)) => format!("<predefined {id}>"),
                (None, TopicRef::Short(s)) => String::from_utf8_lossy(&s).into_owned(),
            };
            format!("{topic} {payload}")
        } else {
            payload.into_owned()
        };
        // A closed stdout (e.g. `| head`) ends nothing here; the count still stops us.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    // Messages can arrive before the SUBACK (retained ones, right after it is sent).
    {
        let mut on_message = |r: Received<'_>| {
            received += 1;
            print(r, out);
        };
        outcome(
            &mut dev,
            common,
            "SUBSCRIBE",
            |e| matches!(e, Event::Subscribed { msg_id: m, .. } if m == msg_id).then_some(()),
            &mut on_message,
        )
        .await?;
    }
    subscribed();
    let end = args
        .wait
        .map(|w| now_ms().saturating_add(u64::try_from(w.as_millis()).unwrap_or(u64::MAX)));
    let gateway = common.gateway;
    while !matches!(args.count, Some(c) if received >= c) {
        let mut on_message = |r: Received<'_>| {
            received += 1;
            print(r, out);
        };
        if dev.step(end, &mut on_message).await == crate::device::Step::Deadline {
            if args.count.is_some() {
                disconnect(&mut dev, common).await;
                return Err(ToolError::TooFew {
                    got: received,
                    want: args.count.unwrap_or(0),
                });
            }
            break;
        }
        while let Some(e) = dev.poll_event() {
            match e {
                Event::GatewayLost => {
                    return Err(ToolError::GatewayLost {
                        gateway,
                        what: "subscription",
                    })
                }
                Event::Disconnected => return Err(ToolError::Disconnected { what: "subscription" }),
                _ => {}
            }
        }
    }
    disconnect(&mut dev, common).await;
    Ok(received)
}
