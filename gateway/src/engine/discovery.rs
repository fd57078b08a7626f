//! Gateway advertisement and discovery (spec 6.1), and links coming and going.
//!
//! - ADVERTISE every Tadv ([`EngineConfig::advertise_interval`]) to the UDP broadcast
//!   address ([`EngineConfig::udp_broadcast`]) and on every serial port that is up,
//!   with the time until the next one as its duration; also once on a port as soon as
//!   it comes up, so that devices on a freshly plugged line learn of the gateway.
//! - SEARCHGW is answered at once with GWINFO (a gateway does not wait a random
//!   TGWINFO as an answering client does), broadcast where the link allows it: on a
//!   serial line every device hears the answer; over UDP it goes to the asker and to
//!   the broadcast address; through a forwarder it is encapsulated with the SEARCHGW's
//!   radius in the Ctrl octet, for the forwarder to broadcast.
//! - A link that goes away (a serial port unplugged) loses every client on it.

use std::time::{Duration, Instant};

use sn_codec::{Advertise, GwInfo, Packet};
use tracing::{debug, info};

use super::{ClientKey, Gateway, LinkAddr, Peer};

/// The duration field of an ADVERTISE: whole seconds, rounded up, at most 65535.
fn duration_field(d: Duration) -> u16 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    u16::try_from(secs).unwrap_or(u16::MAX)
}

impl Gateway {
    /// Starts the duties that need no input: the first ADVERTISE goes out now and the
    /// next ones every Tadv. Call once, when the gateway starts serving.
    pub fn start(&mut self, now: Instant) {
        if self.advertise_period().is_some() {
            self.next_advertise = Some(now);
            self.advertise_if_due(now);
        }
    }

    /// A broadcast link (a serial port) is up: ADVERTISE goes there from now on, and
    /// once right away when the gateway advertises at all.
    pub fn link_up(&mut self, now: Instant, link: &LinkAddr) {
        self.up_links.insert(link.clone());
        if let (Some(_), Some(next)) = (self.advertise_period(), self.next_advertise) {
            let duration = duration_field(next.saturating_duration_since(now));
            self.send_advertise(&Peer::direct(link.clone()), duration);
        }
    }

    /// A link went away (a serial port was unplugged or failed): every session whose
    /// client is reached through it is lost, as if its keep-alive had expired (its
    /// will is published); a session still in its connect handshake just ends.
    pub fn link_down(&mut self, now: Instant, link: &LinkAddr) {
        self.up_links.remove(link);
        self.metrics.links_down += 1;
        let mut keys: Vec<ClientKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.peer().link == *link)
            .map(|(key, _)| *key)
            .collect();
        keys.sort_unstable();
        info!(%link, sessions = keys.len(), "link down; its clients are lost");
        for key in keys {
            self.with_session(now, key, |s, ctx| s.lose_now(ctx, "its link went down"));
        }
    }

    /// Tadv, unless advertising is off.
    fn advertise_period(&self) -> Option<Duration> {
        self.cfg.advertise_interval.filter(|d| !d.is_zero())
    }

    /// Sends the periodic ADVERTISE if it is due at `now`, and schedules the next.
    pub(super) fn advertise_if_due(&mut self, now: Instant) {
        let Some(at) = self.next_advertise else {
            return;
        };
        if at > now {
            return;
        }
        let Some(every) = self.advertise_period() else {
            self.next_advertise = None;
            return;
        };
        // Keep the rhythm, unless the process was stalled for more than a period.
        let next = Some(at + every).filter(|n| *n > now).unwrap_or(now + every);
        self.next_advertise = Some(next);
        let duration = duration_field(next - now);
        let mut to: Vec<Peer> = self.up_links.iter().cloned().map(Peer::direct).collect();
        if let Some(addr) = self.cfg.udp_broadcast {
            to.insert(0, Peer::direct(LinkAddr::Udp(0, addr)));
        }
        debug!(links = to.len(), duration, "ADVERTISE");
        for peer in &to {
            self.send_advertise(peer, duration);
        }
    }

    fn send_advertise(&mut self, to: &Peer, duration: u16) {
        let advertise = Packet::Advertise(Advertise {
            gw_id: self.cfg.gateway_id,
            duration,
        });
        if self.out.send(to, &advertise) {
            self.metrics.advertisements += 1;
        }
    }

    /// SEARCHGW: GWINFO with only the gateway id, broadcast where the link allows it.
    pub(super) fn answer_searchgw(&mut self, peer: &Peer, radius: u8) {
        self.metrics.searchgw += 1;
        debug!(%peer, radius, "SEARCHGW answered");
        let info = Packet::GwInfo(GwInfo {
            gw_id: self.cfg.gateway_id,
            gw_addr: &[],
        });
        match (&peer.node, &peer.link) {
            // Through a forwarder: the Ctrl octet asks it to broadcast with the radius
            // of the search (two bits; larger radii are capped).
            (Some(_), _) => {
                self.out.send_with_radius(peer, radius.min(3), &info);
            }
            // Every device on the line hears it.
            // A DTLS session reaches one device only.
            (None, LinkAddr::Serial(_) | LinkAddr::Dtls(..)) => {
                self.out.send(peer, &info);
            }
            (None, LinkAddr::Udp(_, from)) => {
                self.out.send(peer, &info);
                if let Some(addr) = self.cfg.udp_broadcast.filter(|a| a != from) {
                    self.out.send(&Peer::direct(LinkAddr::Udp(0, addr)), &info);
                }
            }
        }
    }
}
