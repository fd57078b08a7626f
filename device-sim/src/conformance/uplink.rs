//! Checks of what devices send: PUBLISH at each QoS, topic kinds, length forms, sizes.
//! Each one verifies at the broker that the message arrived, intact, at the right QoS.

use std::time::Duration;

use sn_codec::{Packet, Publish, QoS, TopicRef};

use super::wire::Wire;
use super::{CheckError, CheckResult, Ctx};

/// Waits at the broker for `payload` on `topic` and checks its QoS.
async fn arrived(ctx: &mut Ctx, topic: &str, payload: &[u8], qos: u8) -> CheckResult {
    let timeout = ctx.timeout();
    let seen = ctx
        .observer()?
        .expect_payload(topic, payload, timeout)
        .await
        .ok_or_else(|| CheckError::Wrong(format!("nothing reached the broker on {topic:?} within {timeout:?}")))?;
    if seen.qos != qos {
        return Err(CheckError::Wrong(format!(
            "reached the broker at QoS {} instead of {qos}",
            seen.qos
        )));
    }
    Ok(String::new())
}

/// A connected client with `name` registered; the observer subscribed to `name`.
async fn registered(ctx: &mut Ctx, name: &str) -> Result<(Wire, u16), CheckError> {
    ctx.observer()?.subscribe(name).await?;
    let (mut w, _) = ctx.connected(30).await?;
    let id = w.register(name).await?;
    Ok((w, id))
}

pub(super) async fn publish_qos0(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("publish-qos0");
    let (mut w, id) = registered(ctx, &topic).await?;
    let payload = ctx.payload("qos 0");
    w.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: TopicRef::Normal(id),
        msg_id: 0,
        data: &payload,
    }))
    .await?;
    let r = arrived(ctx, &topic, &payload, 0).await;
    w.leave().await;
    r
}

pub(super) async fn publish_qos1(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("publish-qos1");
    let (mut w, id) = registered(ctx, &topic).await?;
    let payload = ctx.payload("qos 1");
    w.publish_qos1(TopicRef::Normal(id), &payload, false).await?;
    let r = arrived(ctx, &topic, &payload, 1).await;
    w.leave().await;
    r
}

pub(super) async fn publish_qos2(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("publish-qos2");
    let (mut w, id) = registered(ctx, &topic).await?;
    let payload = ctx.payload("qos 2");
    let msg_id = w.msg_id();
    w.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: TopicRef::Normal(id),
        msg_id,
        data: &payload,
    }))
    .await?;
    let rec = w
        .expect("PUBLISH at QoS 2", |p| match p {
            Packet::PubRec(m) => Some(*m),
            _ => None,
        })
        .await?;
    if rec != msg_id {
        return Err(CheckError::Wrong(format!(
            "PUBREC carries message id {rec:#06x}, the PUBLISH had {msg_id:#06x}"
        )));
    }
    w.send(&Packet::PubRel(msg_id)).await?;
    let comp = w
        .expect("PUBREL", |p| match p {
            Packet::PubComp(m) => Some(*m),
            _ => None,
        })
        .await?;
    if comp != msg_id {
        return Err(CheckError::Wrong(format!(
            "PUBCOMP carries message id {comp:#06x}, the PUBLISH had {msg_id:#06x}"
        )));
    }
    arrived(ctx, &topic, &payload, 2).await?;
    // Exactly once: no second copy shortly after.
    let again = ctx
        .observer()?
        .expect_payload(&topic, &payload, Duration::from_millis(500))
        .await;
    w.leave().await;
    match again {
        Some(_) => Err(CheckError::Wrong("the QoS 2 message reached the broker twice".into())),
        None => Ok(String::new()),
    }
}

/// A QoS -1 PUBLISH from a fresh socket that never connected.
async fn minus_one(ctx: &mut Ctx, topic: TopicRef, name: &str) -> CheckResult {
    ctx.observer()?.subscribe(name).await?;
    let w = ctx.wire().await?;
    let payload = ctx.payload("qos -1");
    w.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::MinusOne,
        retain: false,
        topic,
        msg_id: 0,
        data: &payload,
    }))
    .await?;
    // A broker sees QoS -1 as QoS 0 (the gateway has no acknowledgement to wait for).
    arrived(ctx, name, &payload, 0).await
}

pub(super) async fn minus_one_short(ctx: &mut Ctx) -> CheckResult {
    let short = ctx.short_name(1);
    let name = String::from_utf8_lossy(&short).into_owned();
    minus_one(ctx, TopicRef::Short(short), &name).await
}

pub(super) async fn minus_one_predefined(ctx: &mut Ctx) -> CheckResult {
    let (id, name) = ctx.predefined()?;
    minus_one(ctx, TopicRef::Predefined(id), &name).await
}

pub(super) async fn short_topic(ctx: &mut Ctx) -> CheckResult {
    let short = ctx.short_name(2);
    let name = String::from_utf8_lossy(&short).into_owned();
    ctx.observer()?.subscribe(&name).await?;
    let (mut w, _) = ctx.connected(30).await?;
    let payload = ctx.payload("short");
    w.publish_qos1(TopicRef::Short(short), &payload, false).await?;
    let r = arrived(ctx, &name, &payload, 1).await;
    w.leave().await;
    r
}

pub(super) async fn predefined_topic(ctx: &mut Ctx) -> CheckResult {
    let (id, name) = ctx.predefined()?;
    ctx.observer()?.subscribe(&name).await?;
    let (mut w, _) = ctx.connected(30).await?;
    let payload = ctx.payload("predefined");
    w.publish_qos1(TopicRef::Predefined(id), &payload, false).await?;
    let r = arrived(ctx, &name, &payload, 1).await;
    w.leave().await;
    r
}

pub(super) async fn length_three_octet(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("length-three-octet");
    let (mut w, id) = registered(ctx, &topic).await?;
    let payload = ctx.payload("three-octet length");
    let msg_id = w.msg_id();
    // Spec 5.2.1: Length 0x01 then the total length in two octets; the rest as in a
    // PUBLISH with a one-octet Length (5.4.12): MsgType, Flags (QoS 1, normal topic id),
    // TopicId, MsgId, Data.
    let total = 3 + 1 + 1 + 2 + 2 + payload.len();
    let mut d = vec![0x01];
    d.extend_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
    d.push(0x0C);
    d.push(QoS::AtLeastOnce.bits() << 5);
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(&msg_id.to_be_bytes());
    d.extend_from_slice(&payload);
    w.send_raw(&d).await?;
    w.puback(TopicRef::Normal(id), msg_id).await?;
    let r = arrived(ctx, &topic, &payload, 1).await;
    w.leave().await;
    r.map(|_| format!("{total} octets"))
}

pub(super) async fn long_topic(ctx: &mut Ctx) -> CheckResult {
    let mut topic = ctx.topic("long-topic/");
    while topic.len() < 300 {
        topic.push('x');
    }
    let (mut w, id) = registered(ctx, &topic).await?;
    let payload = ctx.payload("long topic");
    w.publish_qos1(TopicRef::Normal(id), &payload, false).await?;
    let r = arrived(ctx, &topic, &payload, 1).await;
    w.leave().await;
    r.map(|_| format!("topic of {} characters", topic.len()))
}

pub(super) async fn large_payload(ctx: &mut Ctx) -> CheckResult {
    let max = ctx.opts.max_datagram;
    let topic = ctx.topic("large-payload");
    let (mut w, id) = registered(ctx, &topic).await?;
    let msg_id = w.msg_id();
    // Written by hand so that the datagram is exactly `max` octets whatever the size
    // (the codec picks the one-octet Length whenever it fits): spec 5.2.1 and 5.4.12,
    // Length (1 or 3 octets), MsgType, Flags (QoS 1, normal topic id), TopicId, MsgId, Data.
    let mut d = Vec::with_capacity(max);
    if max <= 0xFF {
        d.push(u8::try_from(max).unwrap_or(0xFF));
    } else {
        d.push(0x01);
        d.extend_from_slice(&u16::try_from(max).unwrap_or(u16::MAX).to_be_bytes());
    }
    d.push(0x0C);
    d.push(QoS::AtLeastOnce.bits() << 5);
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(&msg_id.to_be_bytes());
    let start = d.len();
    d.extend_from_slice(&ctx.payload("large"));
    let mut i = 0u8;
    while d.len() < max {
        d.push(b'a' + i % 26);
        i = i.wrapping_add(1);
    }
    d.truncate(max);
    let payload = d.get(start..).unwrap_or(&[]).to_vec();
    w.send_raw(&d).await?;
    w.puback(TopicRef::Normal(id), msg_id).await?;
    let r = arrived(ctx, &topic, &payload, 1).await;
    w.leave().await;
    r.map(|_| format!("datagram of {} octets", d.len()))
}
