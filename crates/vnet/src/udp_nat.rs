//! UDP NAT (placeholder: being implemented).

use std::net::SocketAddrV4;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::engine::Engine;

pub struct UdpNat {
    _max_flows: usize,
    _idle: Duration,
}

impl UdpNat {
    pub fn new(max_flows: usize, idle: Duration) -> Self {
        UdpNat { _max_flows: max_flows, _idle: idle }
    }

    /// Forwards one guest datagram from `src` to `dst` through a host socket.
    pub fn send(engine: &Rc<Engine>, _src: SocketAddrV4, _dst: SocketAddrV4, _payload: &[u8], _now: Instant) {
        engine.net.borrow_mut().stats.drops.not_for_us += 1;
    }
}
