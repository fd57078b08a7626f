//! MQTT-SN v1.2 wire format.
//!
//! `no_std`, no allocator. Decoding borrows from the datagram ([`Packet::decode`]);
//! encoding writes into a caller's buffer ([`Packet::encode`]).
//!
//! Modules:
//! - the packets themselves (re-exported at the crate root),
//! - [`framing`]: how packets travel over a byte stream such as a UART,
//! - `client` (feature `client`): the sans-IO device-side client engine.
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "std")]
extern crate std;

mod error;
pub mod framing;
mod packet;

#[cfg(feature = "client")]
pub mod client;

pub use error::{Error, Reason, Request};
pub use packet::*;
