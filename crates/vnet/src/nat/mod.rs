//! The NAT: guest TCP, UDP and ICMP echo flows carried by the host's own
//! sockets.

pub mod icmp;
pub mod policy;
pub mod tcp;
pub mod udp;

pub use policy::{NatPolicy, Refusal};
