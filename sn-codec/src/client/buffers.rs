//! Fixed-capacity storage of the engine: the transmit buffer and small rings.

use super::ClientError;
use crate::Packet;

/// Total length of the encoded message at the start of `buf`, from its length header.
fn frame_len(buf: &[u8]) -> Option<usize> {
    match *buf {
        [0x01, hi, lo, ..] => Some(u16::from_be_bytes([hi, lo]) as usize),
        [0x01, ..] | [] => None,
        [len, ..] => Some(len as usize),
    }
}

/// The `N`-byte transmit buffer.
///
/// `[0, req_len)` holds the encoded outstanding request (kept for retransmission),
/// `[req_len, req_len + fifo_len)` holds encoded fire-and-forget messages (PUBLISH QoS 0
/// and -1) waiting for `poll_transmit`, back to back: MQTT-SN messages are self-delimiting.
#[derive(Debug, Clone)]
pub(crate) struct TxBuf<const N: usize> {
    buf: [u8; N],
    req_len: u16,
    fifo_len: u16,
}

impl<const N: usize> TxBuf<N> {
    /// An empty buffer. `N` must not exceed `u16::MAX` (checked by the client).
    pub(crate) const fn new() -> Self {
        TxBuf {
            buf: [0; N],
            req_len: 0,
            fifo_len: 0,
        }
    }

    /// Checks that a message of `need` octets fits next to the queued messages once the
    /// current request (if any) is replaced.
    fn check_request_room(&self, need: usize) -> Result<(), ClientError> {
        if need > N {
            Err(ClientError::TooLong)
        } else if need > N - self.fifo_len as usize {
            Err(ClientError::QueueFull)
        } else {
            Ok(())
        }
    }

    /// The encoded outstanding request (empty when there is none).
    pub(crate) fn request(&self) -> &[u8] {
        self.buf.get(..self.req_len as usize).unwrap_or(&[])
    }

    /// Replaces the outstanding request with `pkt`. On error nothing changes.
    pub(crate) fn set_request(&mut self, pkt: &Packet<'_>) -> Result<(), ClientError> {
        self.check_request_room(pkt.encoded_len())?;
        // Encode behind the queue first, so that a failed encode leaves things untouched.
        let old_req = self.req_len as usize;
        let queued = self.fifo_len as usize;
        let tail = self.buf.get_mut(old_req + queued..).ok_or(ClientError::QueueFull)?;
        let n = match pkt.encode(tail) {
            Ok(n) => n,
            Err(crate::Error::BufferTooSmall) if old_req > 0 => {
                // Room only appears once the old request is gone: drop it, then retry.
                self.clear_request();
                let tail = self.buf.get_mut(queued..).ok_or(ClientError::QueueFull)?;
                let n = pkt.encode(tail).map_err(ClientError::from_encode)?;
                if let Some(s) = self.buf.get_mut(..queued + n) {
                    s.rotate_right(n);
                }
                self.req_len = n as u16;
                return Ok(());
            }
            Err(e) => return Err(ClientError::from_encode(e)),
        };
        // Layout now: [old request][queue][new request]; make it [new request][queue].
        if let Some(s) = self.buf.get_mut(old_req..old_req + queued + n) {
            s.rotate_right(n);
        }
        if let Some(s) = self.buf.get_mut(..old_req + n + queued) {
            s.copy_within(old_req.., 0);
        }
        self.req_len = n as u16;
        Ok(())
    }

    /// Forgets the outstanding request.
    pub(crate) fn clear_request(&mut self) {
        let r = self.req_len as usize;
        let q = self.fifo_len as usize;
        if r > 0 && r + q <= N {
            self.buf.copy_within(r..r + q, 0);
        }
        self.req_len = 0;
    }

    /// Sets the DUP flag of the stored request (PUBLISH and SUBSCRIBE only: their flags
    /// octet follows the message type).
    pub(crate) fn set_request_dup(&mut self) {
        let header = if self.buf.first() == Some(&0x01) { 3 } else { 1 };
        if header + 1 < self.req_len as usize {
            if let Some(flags) = self.buf.get_mut(header + 1) {
                *flags |= 0x80;
            }
        }
    }

    /// Appends `pkt` to the queue of fire-and-forget messages.
    pub(crate) fn push(&mut self, pkt: &Packet<'_>) -> Result<(), ClientError> {
        let need = pkt.encoded_len();
        let start = self.req_len as usize + self.fifo_len as usize;
        if need > N {
            return Err(ClientError::TooLong);
        }
        if need > N - start {
            return Err(ClientError::QueueFull);
        }
        let tail = self.buf.get_mut(start..).ok_or(ClientError::QueueFull)?;
        let n = pkt.encode(tail).map_err(ClientError::from_encode)?;
        self.fifo_len += n as u16;
        Ok(())
    }

    /// Whether queued messages wait.
    pub(crate) fn has_queued(&self) -> bool {
        self.fifo_len > 0
    }

    /// Moves the oldest queued message into `out` and returns its length. A message that
    /// does not fit into `out` is dropped (the caller's buffer is documented to be at least
    /// `N` octets).
    pub(crate) fn pop(&mut self, out: &mut [u8]) -> Option<usize> {
        loop {
            let start = self.req_len as usize;
            let queued = self.fifo_len as usize;
            if queued == 0 {
                return None;
            }
            let q = self.buf.get(start..start + queued)?;
            let len = match frame_len(q) {
                Some(len) if len > 0 && len <= queued => len,
                _ => {
                    // Cannot happen (we encoded these), but never loop forever on it.
                    self.fifo_len = 0;
                    return None;
                }
            };
            let copied = match (out.get_mut(..len), q.get(..len)) {
                (Some(dst), Some(src)) => {
                    dst.copy_from_slice(src);
                    true
                }
                _ => false,
            };
            self.buf.copy_within(start + len..start + queued, start);
            self.fifo_len -= len as u16;
            if copied {
                return Some(len);
            }
        }
    }
}

/// A first-in first-out ring of at most `N` (<= 255) small `Copy` values.
#[derive(Debug, Clone)]
pub(crate) struct Ring<T: Copy, const N: usize> {
    items: [Option<T>; N],
    head: u8,
    len: u8,
}

impl<T: Copy, const N: usize> Ring<T, N> {
    /// An empty ring.
    pub(crate) const fn new() -> Self {
        Ring {
            items: [None; N],
            head: 0,
            len: 0,
        }
    }

    /// Appends `item`; returns `false` (and drops it) when the ring is full.
    pub(crate) fn push(&mut self, item: T) -> bool {
        let len = self.len as usize;
        if len >= N {
            return false;
        }
        let at = (self.head as usize + len) % N;
        if let Some(slot) = self.items.get_mut(at) {
            *slot = Some(item);
            self.len += 1;
            true
        } else {
            false
        }
    }

    /// Appends `item`, dropping the oldest one when the ring is full.
    pub(crate) fn push_overwrite(&mut self, item: T) {
        if self.len as usize >= N {
            let _ = self.pop();
        }
        let _ = self.push(item);
    }

    /// Takes the oldest item.
    pub(crate) fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let item = self.items.get_mut(self.head as usize)?.take();
        self.head = ((self.head as usize + 1) % N) as u8;
        self.len -= 1;
        item
    }

    /// Number of items held.
    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }

    /// Drops everything.
    pub(crate) fn clear(&mut self) {
        while self.pop().is_some() {}
        self.head = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_wraps_and_overwrites() {
        let mut r = Ring::<u8, 3>::new();
        assert!(r.push(1));
        assert!(r.push(2));
        assert!(r.push(3));
        assert!(!r.push(4));
        assert_eq!(r.pop(), Some(1));
        assert!(r.push(4));
        r.push_overwrite(5);
        assert_eq!(r.pop(), Some(3));
        assert_eq!(r.pop(), Some(4));
        assert_eq!(r.pop(), Some(5));
        assert_eq!(r.pop(), None);
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn request_replaced_next_to_a_full_queue() {
        use crate::{Publish, QoS, TopicRef};
        let publish = |qos, msg_id, data| {
            Packet::Publish(Publish {
                dup: false,
                qos,
                retain: false,
                topic: TopicRef::Normal(5),
                msg_id,
                data,
            })
        };
        let mut tx = TxBuf::<16>::new();
        tx.set_request(&publish(QoS::ExactlyOnce, 3, b"hi")).unwrap();
        tx.push(&publish(QoS::AtMostOnce, 0, b"")).unwrap();
        assert_eq!(tx.push(&Packet::PingReq(None)), Err(ClientError::QueueFull));
        assert_eq!(
            tx.set_request(&publish(QoS::ExactlyOnce, 3, b"xyz")),
            Err(ClientError::QueueFull)
        );
        assert_eq!(
            tx.set_request(&publish(QoS::ExactlyOnce, 3, &[0; 10])),
            Err(ClientError::TooLong)
        );
        // No room behind the queue: the old request goes first, then the new one fits.
        tx.set_request(&Packet::PubRel(3)).unwrap();
        assert_eq!(tx.request(), [0x04, 0x10, 0x00, 0x03]);
        let mut out = [0u8; 16];
        assert_eq!(tx.pop(&mut out), Some(7));
        assert_eq!(out[..7], [0x07, 0x0c, 0x00, 0x00, 0x05, 0x00, 0x00]);
        assert_eq!(tx.pop(&mut out), None);
        tx.clear_request();
        assert!(tx.request().is_empty());
        // A queued message that does not fit the caller's buffer is dropped, not stuck.
        tx.push(&publish(QoS::AtMostOnce, 0, b"abc")).unwrap();
        tx.push(&Packet::PingReq(None)).unwrap();
        assert_eq!(tx.pop(&mut out[..4]), Some(2));
        assert!(!tx.has_queued());
    }

    #[test]
    fn frame_len_forms() {
        assert_eq!(frame_len(&[0x02, 0x16]), Some(2));
        assert_eq!(frame_len(&[0x01, 0x01, 0x00]), Some(256));
        assert_eq!(frame_len(&[0x01, 0x01]), None);
        assert_eq!(frame_len(&[]), None);
    }
}
