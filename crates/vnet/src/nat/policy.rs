//! Which guest destinations the NAT may reach, and as what host address.
//!
//! The host alias (last address of the subnet) is the host's own loopback;
//! a configurable table maps further virtual IPs the same way. Destinations
//! that make no sense on the host side (broadcast, multicast, our own
//! subnet, unspecified) are refused, and so is link-local 169.254.0.0/16
//! (cloud metadata services live there) unless explicitly allowed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use crate::config::NetConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("link-local destinations are not allowed (see --allow-link-local)")]
    LinkLocal,
    #[error("broadcast, multicast or unspecified destination")]
    NotUnicast,
    #[error("destination inside the virtual subnet")]
    OwnSubnet,
}

#[derive(Debug, Clone)]
pub struct NatPolicy {
    map: HashMap<Ipv4Addr, IpAddr>,
    subnet: ipnet::Ipv4Net,
    pub allow_link_local: bool,
}

impl NatPolicy {
    pub fn new(cfg: &NetConfig, allow_link_local: bool) -> Self {
        let mut map = HashMap::new();
        map.insert(cfg.host_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        NatPolicy { map, subnet: cfg.subnet, allow_link_local }
    }

    /// Adds `virtual_ip → host_ip` to the table.
    pub fn map(&mut self, virtual_ip: Ipv4Addr, host_ip: IpAddr) {
        self.map.insert(virtual_ip, host_ip);
    }

    /// The host-side address for a guest's destination.
    pub fn translate(&self, dst: Ipv4Addr) -> Result<IpAddr, Refusal> {
        if let Some(mapped) = self.map.get(&dst) {
            return Ok(*mapped);
        }
        if dst.is_broadcast() || dst.is_multicast() || dst.is_unspecified() {
            return Err(Refusal::NotUnicast);
        }
        if self.subnet.contains(&dst) {
            return Err(Refusal::OwnSubnet);
        }
        if dst.is_link_local() && !self.allow_link_local {
            return Err(Refusal::LinkLocal);
        }
        Ok(IpAddr::V4(dst))
    }

    /// The virtual address a host address appears as to the guest (the
    /// reverse of the table), for replies.
    pub fn reverse(&self, host: IpAddr, asked: Ipv4Addr) -> Ipv4Addr {
        if self.map.get(&asked) == Some(&host) {
            return asked;
        }
        match host {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => asked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translation_rules() {
        let cfg = NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap();
        let mut p = NatPolicy::new(&cfg, false);
        assert_eq!(p.translate(Ipv4Addr::new(192, 168, 127, 254)), Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(p.translate(Ipv4Addr::new(127, 0, 0, 1)), Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(p.translate(Ipv4Addr::new(169, 254, 169, 254)), Err(Refusal::LinkLocal));
        assert_eq!(p.translate(Ipv4Addr::new(192, 168, 127, 5)), Err(Refusal::OwnSubnet));
        assert_eq!(p.translate(Ipv4Addr::new(255, 255, 255, 255)), Err(Refusal::NotUnicast));
        assert_eq!(p.translate(Ipv4Addr::new(224, 0, 0, 1)), Err(Refusal::NotUnicast));
        p.map(Ipv4Addr::new(192, 168, 127, 253), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(p.translate(Ipv4Addr::new(192, 168, 127, 253)), Ok(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))));
        p.allow_link_local = true;
        assert!(p.translate(Ipv4Addr::new(169, 254, 1, 1)).is_ok());
    }
}
