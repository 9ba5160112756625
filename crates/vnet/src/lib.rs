//! The virtual network: switch, gateway services (ARP, ICMP, DHCP, DNS),
//! NAT flow tables, port forwarding and the API. The core is sans-I/O and
//! clock-free: frames in, frames out, `now` passed in.
#![deny(unsafe_code)]

pub mod api;
pub mod config;
pub mod forward;
pub mod gateway;
pub mod nat;
pub mod ratelimit;
pub mod shell;
pub mod stats;
pub mod switch;
pub mod sys;

/// The maps on the packet path: SipHash showed in profiles; foldhash is
/// several times faster and still randomly seeded per map, so a guest
/// cannot aim collisions at it.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

pub use config::{ConfigError, NetConfig};
pub use gateway::{FrameSink, Network, Upcall};
pub use shell::{Engine, EngineConfig};
pub use switch::PortId;
