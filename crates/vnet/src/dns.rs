//! DNS server on the gateway (placeholder: being implemented).

use std::net::{SocketAddr, SocketAddrV4};
use std::rc::Rc;

use crate::config::NetConfig;
use crate::engine::Engine;

pub const DNS_PORT: u16 = 53;

pub struct DnsServer {
    _upstreams: Vec<SocketAddr>,
}

impl DnsServer {
    pub fn new(_cfg: &NetConfig, upstreams: Vec<SocketAddr>) -> Self {
        DnsServer { _upstreams: upstreams }
    }

    /// Answers one query that arrived over UDP at `server` from `client`.
    pub fn serve_udp(self: Rc<Self>, engine: &Rc<Engine>, _client: SocketAddrV4, _server: SocketAddrV4, _query: &[u8]) {
        engine.net.borrow_mut().stats.drops.not_for_us += 1;
    }
}
