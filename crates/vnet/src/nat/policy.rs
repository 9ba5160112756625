//! Which guest destinations the NAT may reach, and as what host address.
//!
//! The host alias (last address of the subnet) is the host's own loopback;
//! a configurable table maps further virtual IPs the same way. Destinations
//! that make no sense on the host side (broadcast, multicast, our own
//! subnet, unspecified) are refused, and so is link-local 169.254.0.0/16
//! (cloud metadata services live there) unless explicitly allowed. IPv6
//! follows the same rules: the IPv6 host alias is the host's `::1`; the
//! network's own prefix, multicast and the unspecified address are refused,
//! link-local (fe80::/10) only with `--allow-link-local`, and addresses
//! that stand for IPv4 ones (IPv4-mapped, IPv4-compatible, NAT64's
//! 64:ff9b::/96) are refused: a guest reaches IPv4 over IPv4.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::NetConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("link-local destinations are not allowed (see --allow-link-local)")]
    LinkLocal,
    #[error("broadcast, multicast or unspecified destination")]
    NotUnicast,
    #[error("destination inside the virtual subnet")]
    OwnSubnet,
    #[error("an IPv6 address standing for an IPv4 one (IPv4-mapped, -compatible or NAT64)")]
    Ipv4InIpv6,
    #[error("the network has no IPv6")]
    NoIpv6,
}

#[derive(Debug, Clone)]
pub struct NatPolicy {
    map: HashMap<Ipv4Addr, IpAddr>,
    subnet: ipnet::Ipv4Net,
    /// The IPv6 prefix and host alias, when the network has IPv6.
    ipv6: Option<(ipnet::Ipv6Net, Ipv6Addr)>,
    pub allow_link_local: bool,
}

impl NatPolicy {
    pub fn new(cfg: &NetConfig, allow_link_local: bool) -> Self {
        let mut map = HashMap::new();
        map.insert(cfg.host_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let ipv6 = cfg.ipv6.as_ref().map(|v6| (v6.prefix, v6.host));
        NatPolicy { map, subnet: cfg.subnet, ipv6, allow_link_local }
    }

    /// The host-side address for a guest's destination of either family.
    pub fn translate_ip(&self, dst: IpAddr) -> Result<IpAddr, Refusal> {
        match dst {
            IpAddr::V4(v4) => self.translate(v4),
            IpAddr::V6(v6) => self.translate6(v6),
        }
    }

    /// The host-side address for a guest's IPv6 destination.
    pub fn translate6(&self, dst: Ipv6Addr) -> Result<IpAddr, Refusal> {
        let Some((prefix, host)) = self.ipv6 else { return Err(Refusal::NoIpv6) };
        if dst == host {
            return Ok(IpAddr::V6(Ipv6Addr::LOCALHOST));
        }
        if dst.is_multicast() || dst.is_unspecified() {
            return Err(Refusal::NotUnicast);
        }
        if prefix.contains(&dst) {
            return Err(Refusal::OwnSubnet);
        }
        let seg = dst.segments();
        let v4_compatible = seg[..6] == [0; 6] && !dst.is_loopback();
        let nat64 = seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
        if dst.to_ipv4_mapped().is_some() || v4_compatible || nat64 {
            return Err(Refusal::Ipv4InIpv6);
        }
        if dst.is_unicast_link_local() && !self.allow_link_local {
            return Err(Refusal::LinkLocal);
        }
        Ok(IpAddr::V6(dst))
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

    #[test]
    fn ipv6_translation_rules() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let cfg = NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap();
        assert_eq!(NatPolicy::new(&cfg, false).translate6(v6("2001:db8::1")), Err(Refusal::NoIpv6));
        let cfg = cfg.with_ipv6(Some("fd5a:94ef:e40c::/64".parse().unwrap())).unwrap();
        let mut p = NatPolicy::new(&cfg, false);
        assert_eq!(p.translate6(v6("fd5a:94ef:e40c::fe")), Ok(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(p.translate6(v6("::1")), Ok(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(p.translate6(v6("2001:db8::1")), Ok(IpAddr::V6(v6("2001:db8::1"))));
        assert_eq!(p.translate6(v6("fd5a:94ef:e40c::5")), Err(Refusal::OwnSubnet));
        assert_eq!(p.translate6(v6("ff02::1")), Err(Refusal::NotUnicast));
        assert_eq!(p.translate6(v6("::")), Err(Refusal::NotUnicast));
        for special in ["::ffff:127.0.0.1", "::10.0.0.1", "64:ff9b::a00:1"] {
            assert_eq!(p.translate6(v6(special)), Err(Refusal::Ipv4InIpv6), "{special}");
        }
        assert_eq!(p.translate6(v6("fe80::1")), Err(Refusal::LinkLocal));
        p.allow_link_local = true;
        assert!(p.translate6(v6("fe80::1")).is_ok());
        assert_eq!(p.translate_ip(IpAddr::V4(Ipv4Addr::new(192, 168, 127, 254))), Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}
