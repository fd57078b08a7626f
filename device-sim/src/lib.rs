//! MQTT-SN device simulator.
//!
//! Every simulated device runs the same sans-IO client engine a firmware links,
//! [`sn_codec::client::Client`], behind a thin tokio shell ([`station::Station`]: a UDP
//! socket, the lossy [`radio`] model and the clock). On top of it:
//!
//! - [`tools`]: `mqtt-sn-sim pub` / `sub`, one-shot tools like `mosquitto_pub` / `mosquitto_sub`,
//! - [`fleet`]: `mqtt-sn-sim run`, thousands of (sleepy) devices described by a
//!   [`scenario`], checked by a broker-side [`verifier`] and summed up in a [`report`],
//! - [`conformance`]: `mqtt-sn-sim conformance`, named protocol checks against any gateway.

pub mod conformance;
pub mod device;
pub mod echo;
pub mod fleet;
pub mod payload;
pub mod radio;
pub mod report;
pub mod scenario;
pub mod station;
pub mod tools;
pub mod verifier;
