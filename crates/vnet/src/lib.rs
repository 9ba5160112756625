//! The virtual network: switch, gateway services (ARP, ICMP, DHCP, DNS),
//! NAT flow tables, port forwarding and the API. The core is sans-I/O and
//! clock-free: frames in, frames out, `now` passed in.
#![deny(unsafe_code)]

pub mod api;
pub mod capture;
pub mod config;
pub mod dhcp_server;
pub mod dns;
pub mod engine;
pub mod flow_memory;
pub mod forward;
pub mod forwarder;
pub mod frame;
pub mod icmp_nat;
pub mod nat;
pub mod network;
pub mod ratelimit;
pub mod stats;
pub mod switch;
pub mod sys;
pub mod tcp;
pub mod udp_nat;

/// The maps on the packet path: SipHash showed in profiles; foldhash is
/// several times faster and still randomly seeded per map, so a guest
/// cannot aim collisions at it.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub use config::{ConfigError, NetConfig};
pub use engine::{Engine, EngineConfig};
pub use network::{FrameSink, Network, Upcall};
pub use switch::PortId;
