//! The guest side of the virtual network (Linux): the tap device, netlink
//! configuration, network namespaces, and vm-switch's own DHCP client.
//!
//! The pure parts ([`dhcp_client`], [`dhcp_script`], [`link_rules`],
//! [`resolv`], [`trace`]) build on every platform and are unit-tested
//! without privileges; the rest is Linux-only. Frames are built and parsed
//! by `rdnet_wire::frame`, shared with the gateway.
//! `unsafe` code lives only in the `sys` module.
#![deny(unsafe_code)]

pub mod dhcp_client;
pub mod dhcp_script;
pub mod link_rules;
pub mod resolv;
pub mod trace;

#[cfg(target_os = "linux")]
pub mod configure;
#[cfg(target_os = "linux")]
pub mod netlink;
#[cfg(target_os = "linux")]
pub mod netns;
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod sys;
#[cfg(target_os = "linux")]
pub mod tap;

pub use dhcp_client::{ClientConfig, DhcpClient, Lease, Nak, Output, State};
pub use rdnet_wire::{Mac, parse_mac};
