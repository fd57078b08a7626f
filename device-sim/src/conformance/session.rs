//! Checks of the session: connection, registration, wills, takeover, sleeping deadlines,
//! hostile input and gateway discovery.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use sn_codec::{Connect, Packet, QoS, TopicRef, WillTopic};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::wire::{local_for, Wire};
use super::{CheckError, CheckResult, Ctx};

pub(super) async fn connect(ctx: &mut Ctx) -> CheckResult {
    let (mut w, _) = ctx.connected(30).await?;
    w.disconnect().await?;
    Ok(String::new())
}

pub(super) async fn register(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("register");
    let (mut w, _) = ctx.connected(30).await?;
    let id = w.register(&topic).await?;
    w.leave().await;
    Ok(format!("topic id {id}"))
}

/// CONNECT with the will handshake (spec 6.3): WILLTOPICREQ, WILLTOPIC, WILLMSGREQ,
/// WILLMSG, then an accepted CONNACK. The will is QoS 1, not retained.
async fn connect_with_will(
    ctx: &mut Ctx,
    keep_alive: u16,
    will_topic: &str,
    will_msg: &[u8],
) -> Result<(Wire, String), CheckError> {
    let id = ctx.client_id();
    let mut w = ctx.wire().await?;
    w.send(&Packet::Connect(Connect {
        will: true,
        clean_session: true,
        duration: keep_alive,
        client_id: &id,
    }))
    .await?;
    w.expect("CONNECT with the will flag (WILLTOPICREQ)", |p| {
        matches!(p, Packet::WillTopicReq).then_some(())
    })
    .await?;
    w.send(&Packet::WillTopic(Some(WillTopic {
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: will_topic,
    })))
    .await?;
    w.expect("WILLTOPIC (WILLMSGREQ)", |p| {
        matches!(p, Packet::WillMsgReq).then_some(())
    })
    .await?;
    w.send(&Packet::WillMsg(will_msg)).await?;
    w.connack().await?;
    Ok((w, id))
}

/// Waits for the will at the broker: its payload and QoS 1.
async fn will_seen(ctx: &mut Ctx, topic: &str, msg: &[u8], within: Duration, why: &str) -> CheckResult {
    match ctx.observer()?.expect(topic, within).await {
        Some(m) if m.payload != msg => Err(CheckError::Wrong("the will message changed on its way".into())),
        Some(m) if m.qos != 1 => Err(CheckError::Wrong(format!(
            "the will was published at QoS {} instead of 1",
            m.qos
        ))),
        Some(_) => Ok(String::new()),
        None => Err(CheckError::Wrong(format!("no will published within {within:?} {why}"))),
    }
}

pub(super) async fn will_keep_alive(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("will");
    let msg = ctx.payload("gone");
    ctx.observer()?.subscribe(&topic).await?;
    let (w, _) = connect_with_will(ctx, 1, &topic, &msg).await?;
    // Silent from now on: no PINGREQ, no DISCONNECT.
    drop(w);
    let within = Duration::from_millis(1_500) + ctx.timeout();
    will_seen(ctx, &topic, &msg, within, "of the client going silent (keep-alive 1 s)").await
}

pub(super) async fn no_will_after_disconnect(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("no-will");
    let msg = ctx.payload("must not be published");
    ctx.observer()?.subscribe(&topic).await?;
    let (mut w, _) = connect_with_will(ctx, 1, &topic, &msg).await?;
    w.disconnect().await?;
    // Past 1.5 x the keep-alive: a gateway that kept the session would lose it by now.
    let within = Duration::from_millis(1_500) + ctx.timeout();
    match ctx.observer()?.expect(&topic, within).await {
        Some(_) => Err(CheckError::Wrong(
            "the will was published although the client sent DISCONNECT".into(),
        )),
        None => Ok(format!("no will within {within:?}")),
    }
}

pub(super) async fn will_sleep_deadline(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("will-sleep");
    let msg = ctx.payload("overslept");
    ctx.observer()?.subscribe(&topic).await?;
    let (mut w, _) = connect_with_will(ctx, 30, &topic, &msg).await?;
    w.send(&Packet::Disconnect(Some(1))).await?;
    w.expect("DISCONNECT with a sleep duration", |p| {
        matches!(p, Packet::Disconnect(_)).then_some(())
    })
    .await?;
    // Never wakes: after its 1 s sleep (and the gateway's tolerance) it is lost.
    drop(w);
    let within = Duration::from_secs(2) + ctx.timeout();
    will_seen(ctx, &topic, &msg, within, "of a 1 s sleep that was never ended").await
}

pub(super) async fn takeover(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("takeover");
    let id = ctx.client_id();
    let mut old = ctx.wire().await?;
    old.connect(&id, 30).await?;
    old.subscribe(sn_codec::TopicFilter::Name(&topic), QoS::AtLeastOnce)
        .await?;
    // The same client id from another address (another socket, so another port).
    let mut new = ctx.wire().await?;
    new.connect(&id, 30).await?;
    new.subscribe(sn_codec::TopicFilter::Name(&topic), QoS::AtLeastOnce)
        .await?;
    let payload = ctx.payload("taken over");
    ctx.observer()?
        .publish(&topic, &payload, QoS::AtLeastOnce, false)
        .await?;
    let mut names = Vec::new();
    let end = Instant::now() + ctx.timeout();
    let got = loop {
        let left = end.saturating_duration_since(Instant::now());
        match new.delivery(left, &mut names).await? {
            Some(d) if d.data == payload => {
                new.ack(&d).await?;
                break true;
            }
            Some(d) => new.ack(&d).await?,
            None => break false,
        }
    };
    // The old address must not get it (a DISCONNECT there is fine).
    let mut to_old = false;
    while let Some(d) = old.next_raw(Duration::from_millis(300)).await? {
        if let Ok(Packet::Publish(p)) = Packet::decode(&d) {
            to_old |= p.data == payload.as_slice();
        }
    }
    new.leave().await;
    if !got {
        return Err(CheckError::Wrong(format!(
            "after the takeover the new address got nothing within {:?}",
            ctx.timeout()
        )));
    }
    if to_old {
        return Err(CheckError::Wrong(
            "the message went to the old address too, after the takeover".into(),
        ));
    }
    Ok(String::new())
}

/// Datagrams no gateway may act on: truncated, lying about their length, of reserved
/// types, empty.
const GARBAGE: &[&[u8]] = &[
    // PUBLISH, QoS 1, topic id 0x0001, MsgId and data missing (5 of at least 7 octets).
    &[0x05, 0x0C, 0x20, 0x00, 0x01],
    &[],
    &[0x00],
    // Three-octet Length form, cut inside the length.
    &[0x01],
    &[0x01, 0x00],
    // Length 2: a PUBLISH with no flags at all.
    &[0x02, 0x0C],
    // Three-octet Length 65535 on a 5-octet datagram.
    &[0x01, 0xFF, 0xFF, 0x0C, 0x00],
    // Length 7 on 6 octets.
    &[0x07, 0x0C, 0x20, 0x00, 0x01, 0x00],
    // Reserved message type 0xEE.
    &[0x03, 0xEE, 0x00],
    // REGISTER cut after its TopicId.
    &[0x04, 0x0A, 0x00, 0x00],
    // PUBACK cut before its return code.
    &[0x06, 0x0D, 0x00, 0x01, 0x00],
    // CONNECT with protocol id 0xFF.
    &[0x08, 0x04, 0x04, 0xFF, 0x00, 0x1E, b'x', b'y'],
];

pub(super) async fn hostile_input(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("hostile-input");
    if ctx.observer.is_some() {
        ctx.observer()?.subscribe(&topic).await?;
    }
    let (mut w, _) = ctx.connected(30).await?;
    let topic_id = w.register(&topic).await?;
    let stranger = ctx.wire().await?;
    let long = vec![0xFFu8; 300];
    for g in GARBAGE.iter().copied().chain([long.as_slice()]) {
        w.send_raw(g).await?;
        stranger.send_raw(g).await?;
    }
    // Answers to the garbage are allowed (and read over); what matters is what follows.
    while w.next_raw(Duration::from_millis(300)).await?.is_some() {}
    let after = async {
        w.ping().await?;
        let payload = ctx.payload("after garbage");
        w.publish_qos1(TopicRef::Normal(topic_id), &payload, false).await?;
        if let Some(o) = ctx.observer.as_mut() {
            if o.expect_payload(&topic, &payload, ctx.opts.timeout).await.is_none() {
                return Err(CheckError::Wrong(
                    "after the garbage, an acknowledged PUBLISH did not reach the broker".into(),
                ));
            }
        }
        Ok::<_, CheckError>(())
    }
    .await;
    w.leave().await;
    after.map_err(|e| {
        CheckError::Wrong(format!(
            "after {} malformed datagrams the session broke: {e}",
            GARBAGE.len() + 1
        ))
    })?;
    Ok(String::new())
}

/// Sends SEARCHGW (radius 1) from `sock` to `to` and waits for a GWINFO on `sock` or
/// `listen`, from any address.
async fn search(
    sock: &UdpSocket,
    listen: Option<&UdpSocket>,
    to: SocketAddr,
    timeout: Duration,
) -> Result<(u8, &'static str), CheckError> {
    let mut out = [0u8; 8];
    let n = Packet::SearchGw { radius: 1 }
        .encode(&mut out)
        .map_err(CheckError::Encode)?;
    sock.send_to(out.get(..n).unwrap_or(&[]), to)
        .await
        .map_err(CheckError::Io)?;
    let end = Instant::now() + timeout;
    let mut a = vec![0u8; 1024];
    let mut b = vec![0u8; 1024];
    loop {
        let (data, how) = tokio::select! {
            r = tokio::time::timeout_at(end, sock.recv_from(&mut a)) => match r {
                Err(_) => break,
                Ok(r) => (r.map(|(n, _)| a.get(..n).unwrap_or(&[])).map_err(CheckError::Io)?, "unicast"),
            },
            r = async {
                match listen {
                    Some(l) => l.recv_from(&mut b).await,
                    None => std::future::pending().await,
                }
            } => (r.map(|(n, _)| b.get(..n).unwrap_or(&[])).map_err(CheckError::Io)?, "on the discovery address"),
        };
        if let Ok(Packet::GwInfo(g)) = Packet::decode(data) {
            return Ok((g.gw_id, how));
        }
    }
    Err(CheckError::NoAnswer {
        what: "SEARCHGW (GWINFO)",
        waited: timeout,
    })
}

pub(super) async fn searchgw(ctx: &mut Ctx) -> CheckResult {
    let sock = UdpSocket::bind(local_for(ctx.opts.gateway))
        .await
        .map_err(CheckError::Io)?;
    let (id, _) = search(&sock, None, ctx.opts.gateway, ctx.timeout()).await?;
    Ok(format!("gateway id {id}"))
}

/// A socket that hears what is sent to `addr` (broadcast or multicast): bound to it
/// with SO_REUSEADDR, so that other listeners on the host keep hearing it too.
fn listener(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    let bind = match addr.ip() {
        IpAddr::V4(v4) if v4.is_multicast() => SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())),
        _ => addr,
    };
    s.bind(&bind.into())?;
    let sock = UdpSocket::from_std(s.into())?;
    if let IpAddr::V4(group) = addr.ip() {
        if group.is_multicast() {
            sock.join_multicast_v4(group, Ipv4Addr::UNSPECIFIED)?;
        }
    }
    Ok(sock)
}

pub(super) async fn discovery(ctx: &mut Ctx) -> CheckResult {
    let to = ctx.opts.discovery.ok_or(CheckError::Needs("--discovery-addr"))?;
    let sock = UdpSocket::bind(local_for(to)).await.map_err(CheckError::Io)?;
    sock.set_broadcast(true).map_err(CheckError::Io)?;
    // Listening on the discovery address is best effort: a gateway on this host may
    // hold the port without SO_REUSEADDR; its unicast answers still count.
    let (listen, note) = match listener(to) {
        Ok(l) => (Some(l), String::new()),
        Err(e) => (None, format!(" (cannot listen on {to}: {e}; unicast answers only)")),
    };
    let (id, how) = search(&sock, listen.as_ref(), to, ctx.timeout()).await?;
    Ok(format!("gateway id {id}, answered {how}{note}"))
}
