//! Wire formats shared by both ends: safe decoding of untrusted messages.
#![deny(unsafe_code)]

pub mod checksum;
pub mod dhcp;
pub mod mac;

pub use mac::MacDisplay;
