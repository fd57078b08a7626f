//! Device-side transports: they move datagrams between the OS and the engine and do
//! nothing else.

pub mod dtls;
pub mod dtls_cert;
pub mod serial;
pub mod udp;
