//! ICMP echo through host ping sockets (placeholder: being implemented).

use std::rc::Rc;
use std::time::Instant;

use smoltcp::wire::{EthernetAddress, Ipv4Repr};

use crate::engine::Engine;

#[derive(Default)]
pub struct IcmpNat {}

impl IcmpNat {
    pub fn new() -> Self {
        IcmpNat {}
    }

    /// Handles an ICMP packet from a guest to a non-gateway address.
    pub fn handle(engine: &Rc<Engine>, _src_mac: EthernetAddress, _header: &Ipv4Repr, _packet: &[u8], _now: Instant) {
        engine.net.borrow_mut().stats.drops.not_for_us += 1;
    }
}
