//! MQTT-SN v1.2 gateway: devices speaking MQTT-SN over UDP and serial links
//! become MQTT 3.1.1 clients of an ordinary broker.
//!
//! - [`engine`]: the sans-IO protocol engine (sessions, topic ids, sleep, retries).
//! - [`broker`]: the broker link behind a trait; [`broker::mqtt`] is transparent mode.
//! - [`transport`]: sockets that move datagrams between devices and the engine.
//! - [`runtime`]: the tokio shell that wires them together.
//! - [`auth`]: device registry, topic access control, address policy, mountpoint.
//! - [`config`]: the configuration file and command line.
//! - [`ops`]: Prometheus metrics, health checks and their HTTP endpoint.

pub mod auth;
pub mod broker;
pub mod config;
pub mod embedded;
pub mod engine;
pub mod link;
pub mod open_files;
pub mod ops;
pub mod runtime;
pub mod store;
pub mod topics;
pub mod transport;
