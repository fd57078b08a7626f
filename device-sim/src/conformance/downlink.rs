//! Checks of what the gateway delivers: subscriptions at each QoS, wildcards, retained
//! messages, retransmission, and messages held for a sleeping device.

use std::time::Duration;

use sn_codec::{Packet, QoS, TopicFilter, TopicRef};
use tokio::time::Instant;

use super::wire::{Delivered, Wire};
use super::{CheckError, CheckResult, Ctx};

/// The QoS as a number, for details.
fn q(qos: QoS) -> i8 {
    match qos {
        QoS::MinusOne => -1,
        other => other.bits() as i8,
    }
}

/// Waits for one delivery on `topic_id` with `payload` (others are acknowledged and
/// passed over).
async fn delivered(
    w: &mut Wire,
    payload: &[u8],
    what: &'static str,
) -> Result<(Delivered, Vec<(u16, String)>), CheckError> {
    let end = Instant::now() + w.timeout;
    let mut names = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match w.delivery(left, &mut names).await? {
            Some(d) if d.data == payload => return Ok((d, names)),
            Some(other) => w.ack(&other).await?,
            None => {
                return Err(CheckError::NoAnswer {
                    what,
                    waited: w.timeout,
                })
            }
        }
    }
}

async fn subscribe_at(ctx: &mut Ctx, qos: QoS) -> CheckResult {
    let topic = ctx.topic(&format!("subscribe-qos{}", qos.bits()));
    let (mut w, _) = ctx.connected(30).await?;
    let (granted, topic_id) = w.subscribe(TopicFilter::Name(&topic), qos).await?;
    if granted != qos {
        return Err(CheckError::Wrong(format!(
            "SUBACK granted QoS {} for QoS {}",
            q(granted),
            q(qos)
        )));
    }
    let payload = ctx.payload(&format!("down qos {}", qos.bits()));
    ctx.observer()?.publish(&topic, &payload, qos, false).await?;
    let (d, names) = delivered(&mut w, &payload, "a broker message (nothing delivered)").await?;
    if d.qos != qos {
        return Err(CheckError::Wrong(format!(
            "delivered at QoS {} instead of {}",
            q(d.qos),
            q(qos)
        )));
    }
    let known = |id: u16| id == topic_id || names.iter().any(|(i, n)| *i == id && n == &topic);
    if !matches!(d.topic, TopicRef::Normal(id) if known(id)) {
        return Err(CheckError::Wrong(format!(
            "delivered on {:?}, not the topic id of the SUBACK ({topic_id:#06x}) nor a REGISTER of the topic",
            d.topic
        )));
    }
    w.ack(&d).await?;
    if qos == QoS::ExactlyOnce {
        w.complete_qos2(d.msg_id).await?;
        let mut names = Vec::new();
        let end = Instant::now() + Duration::from_millis(500);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match w.delivery(left, &mut names).await? {
                Some(again) if again.data == payload => {
                    w.leave().await;
                    return Err(CheckError::Wrong("the QoS 2 message was delivered twice".into()));
                }
                Some(_) => {}
                None => break,
            }
        }
    }
    w.leave().await;
    Ok(String::new())
}

pub(super) async fn subscribe_qos0(ctx: &mut Ctx) -> CheckResult {
    subscribe_at(ctx, QoS::AtMostOnce).await
}

pub(super) async fn subscribe_qos1(ctx: &mut Ctx) -> CheckResult {
    subscribe_at(ctx, QoS::AtLeastOnce).await
}

pub(super) async fn subscribe_qos2(ctx: &mut Ctx) -> CheckResult {
    subscribe_at(ctx, QoS::ExactlyOnce).await
}

pub(super) async fn wildcard(ctx: &mut Ctx) -> CheckResult {
    let base = ctx.topic("wildcard");
    let filter = format!("{base}/+");
    let topic = format!("{base}/a");
    let (mut w, _) = ctx.connected(30).await?;
    w.subscribe(TopicFilter::Name(&filter), QoS::AtLeastOnce).await?;
    let payload = ctx.payload("wild");
    ctx.observer()?
        .publish(&topic, &payload, QoS::AtLeastOnce, false)
        .await?;
    let (d, names) = delivered(
        &mut w,
        &payload,
        "a broker message on a wildcard subscription (nothing delivered)",
    )
    .await?;
    w.ack(&d).await?;
    w.leave().await;
    let registered = names.iter().find(|(_, n)| n == &topic).map(|(i, _)| *i);
    match (registered, d.topic) {
        (Some(id), TopicRef::Normal(got)) if id == got => Ok(String::new()),
        (Some(id), got) => Err(CheckError::Wrong(format!(
            "REGISTERed {topic:?} as {id:#06x} but delivered on {got:?}"
        ))),
        (None, got) => Err(CheckError::Wrong(format!(
            "delivered on {got:?} without a REGISTER of {topic:?} first"
        ))),
    }
}

pub(super) async fn retained(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("retained");
    let payload = ctx.payload("kept");
    ctx.observer()?
        .publish(&topic, &payload, QoS::AtLeastOnce, true)
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut w, _) = ctx.connected(30).await?;
    let r = async {
        w.subscribe(TopicFilter::Name(&topic), QoS::AtLeastOnce).await?;
        let (d, _) = delivered(
            &mut w,
            &payload,
            "a SUBSCRIBE to a topic with a retained message (nothing delivered)",
        )
        .await?;
        w.ack(&d).await?;
        if d.retain {
            Ok(String::new())
        } else {
            Err(CheckError::Wrong(
                "the retained message was delivered without the RETAIN flag".into(),
            ))
        }
    }
    .await;
    w.leave().await;
    // Clear the retained message.
    if let Ok(o) = ctx.observer() {
        let _ = o.publish(&topic, b"", QoS::AtLeastOnce, true).await;
    }
    r
}

pub(super) async fn retransmission(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("retransmission");
    let (mut w, _) = ctx.connected(60).await?;
    w.subscribe(TopicFilter::Name(&topic), QoS::AtLeastOnce).await?;
    let payload = ctx.payload("unacknowledged");
    ctx.observer()?
        .publish(&topic, &payload, QoS::AtLeastOnce, false)
        .await?;
    let (first, _) = delivered(&mut w, &payload, "a broker message at QoS 1 (nothing delivered)").await?;
    if first.dup {
        return Err(CheckError::Wrong("the first transmission has DUP set".into()));
    }
    // Not acknowledged: the gateway must send it again after its Tretry.
    let wait = ctx.opts.gateway_retry + ctx.timeout();
    let mut names = Vec::new();
    let again = w.delivery(wait, &mut names).await?;
    let r = match again {
        None => Err(CheckError::Wrong(format!(
            "not sent again within {wait:?} although not acknowledged (Tretry given as {:?})",
            ctx.opts.gateway_retry
        ))),
        Some(d) if d.msg_id != first.msg_id || d.data != first.data => Err(CheckError::Wrong(format!(
            "the retransmission is another message (message id {:#06x}, first {:#06x})",
            d.msg_id, first.msg_id
        ))),
        Some(d) if !d.dup => Err(CheckError::Wrong("the retransmission does not have DUP set".into())),
        Some(d) => {
            w.ack(&d).await?;
            Ok(String::new())
        }
    };
    w.leave().await;
    r
}

pub(super) async fn sleep_and_wake(ctx: &mut Ctx) -> CheckResult {
    let topic = ctx.topic("sleep-and-wake");
    let (mut w, id) = ctx.connected(30).await?;
    // Subscribed at QoS 2, each message comes at the QoS it was published with.
    w.subscribe(TopicFilter::Name(&topic), QoS::ExactlyOnce).await?;
    w.send(&Packet::Disconnect(Some(30))).await?;
    w.expect("DISCONNECT with a sleep duration", |p| {
        matches!(p, Packet::Disconnect(_)).then_some(())
    })
    .await?;
    let held: Vec<(QoS, Vec<u8>)> = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .map(|qos| (qos, ctx.payload(&format!("held qos {}", qos.bits()))))
        .collect();
    for (qos, payload) in &held {
        ctx.observer()?.publish(&topic, payload, *qos, false).await?;
    }
    // Asleep: nothing may be delivered until the device wakes. The wait also lets the
    // messages reach the gateway through the broker (half the answer timeout: generous
    // on a loaded machine, where a PINGREQ before them would find nothing to deliver).
    let asleep = (ctx.timeout() / 2).max(Duration::from_millis(700));
    let woken = Instant::now() + asleep;
    while let Some(d) = w.next_raw(woken.saturating_duration_since(Instant::now())).await? {
        if matches!(Packet::decode(&d), Ok(Packet::Publish(_))) {
            return Err(CheckError::Wrong(
                "a PUBLISH was sent to the device while it was asleep".into(),
            ));
        }
    }
    // One PINGREQ, never repeated: the gateway must answer this one.
    w.send(&Packet::PingReq(Some(&id))).await?;
    let mut got: Vec<(QoS, Vec<u8>)> = Vec::new();
    let end = Instant::now() + ctx.timeout();
    let pingresp = loop {
        let left = end.saturating_duration_since(Instant::now());
        let Some(d) = w.next_raw(left).await? else { break false };
        match Packet::decode(&d) {
            Ok(Packet::Publish(p)) => {
                let m = Delivered {
                    dup: p.dup,
                    qos: p.qos,
                    retain: p.retain,
                    topic: p.topic,
                    msg_id: p.msg_id,
                    data: p.data.to_vec(),
                };
                w.ack(&m).await?;
                if !got.iter().any(|(_, data)| data == &m.data) {
                    got.push((m.qos, m.data));
                }
            }
            Ok(Packet::PubRel(m)) => w.send(&Packet::PubComp(m)).await?,
            Ok(Packet::PingResp) => break true,
            _ => {}
        }
    };
    w.leave().await;
    let missing: Vec<i8> = held
        .iter()
        .filter(|(_, p)| !got.iter().any(|(_, g)| g == p))
        .map(|(qos, _)| q(*qos))
        .collect();
    if !pingresp {
        return Err(CheckError::Wrong(format!(
            "no PINGRESP to the waking PINGREQ (sent once) within {:?}; {} of {} held messages delivered",
            ctx.timeout(),
            got.len(),
            held.len()
        )));
    }
    if !missing.is_empty() {
        return Err(CheckError::Wrong(format!(
            "PINGRESP came before the held messages of QoS {missing:?} were delivered"
        )));
    }
    for (qos, payload) in &held {
        if let Some((got_qos, _)) = got.iter().find(|(_, g)| g == payload) {
            if got_qos != qos {
                return Err(CheckError::Wrong(format!(
                    "a held QoS {} message was delivered at QoS {}",
                    q(*qos),
                    q(*got_qos)
                )));
            }
        }
    }
    Ok(format!("{} held messages, then PINGRESP", got.len()))
}
