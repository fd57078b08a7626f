//! MQTT-SN device simulator.
//!
//! Every simulated device runs the same sans-IO client engine a firmware links,
//! [`sn_codec::client::Client`], behind a thin tokio shell ([`station::Station`]: a UDP
//! socket, the lossy [`radio`] model and the clock). On top of it:
//!
//! - [`tools`]: `mqtt-sn-sim pub` / `sub`, one-shot tools like `mosquitto_pub` / `mosquitto_sub`,
//! - [`fleet`]: `mqtt-sn-sim run`, thousands of (sleepy) devices described by a
//!   [`scenario`], checked by a broker-side [`verifier`] and summed up in a [`report`],
//!   with the run over time ([`timeseries`]), an HTML page of charts ([`html`]) and the
//!   gateway's own metrics ([`gateway_metrics`], parsed by [`prometheus`]); what each
//!   device does and when is the sans-IO state machine in [`behaviour`],
//! - [`keys`]: each fleet device's client id and DTLS key (one key, derived keys, or the
//!   gateway's registry), and the registry `mqtt-sn-sim registry` writes,
//! - [`conformance`]: `mqtt-sn-sim conformance`, named protocol checks against any gateway.

pub mod behaviour;
pub mod conformance;
pub mod device;
pub mod dtls;
pub mod echo;
pub mod fleet;
pub mod gateway_metrics;
pub mod html;
pub mod keys;
pub mod latency;
pub mod payload;
pub mod prometheus;
pub mod radio;
pub mod report;
pub mod scenario;
pub mod station;
pub mod timeseries;
pub mod tools;
pub mod verifier;
pub mod workers;
