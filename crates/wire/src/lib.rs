//! Wire formats shared by both ends: safe decoding of untrusted messages,
//! and the small pure helpers every layer shares (frame builders and
//! parsers, checksums, MAC addresses, the offload hello, the vnet header,
//! the log rate limit).
#![deny(unsafe_code)]

pub mod checksum;
pub mod dhcp;
pub mod frame;
pub mod mac;
pub mod ndp_dns;
pub mod offload;
pub mod ratelimit;
#[cfg(test)]
mod test_packets;
pub mod vnet_hdr;

pub use mac::{Mac, MacDisplay, parse_mac};
