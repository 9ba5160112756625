//! Addresses and settings of one virtual network, derived from its subnet
//! (COMPAT §2): first usable address = gateway, second = the VM's device,
//! last usable = the host alias; the DHCP pool is what lies between. An
//! IPv6 /64 beside it (optional) gives the gateway `::1`, the host alias
//! `::fe` and a link-local address from its MAC; guests take their own
//! addresses by SLAAC from the gateway's router advertisements.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use smoltcp::wire::EthernetAddress;

pub const GATEWAY_MAC: EthernetAddress = EthernetAddress([0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd]);
pub const DEVICE_MAC: EthernetAddress = EthernetAddress([0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]);
pub const DEFAULT_SUBNET: &str = "192.168.127.0/24";
/// A unique local prefix (RFC 4193) whose global ID is taken from the
/// gateway's MAC (5a:94:ef:e4:0c), so it reads as this project's and is as
/// unlikely to meet a real network as a random one.
pub const DEFAULT_SUBNET6: &str = "fd5a:94ef:e40c::/64";
pub const DEFAULT_MTU: u16 = 1500;
/// The largest MTU whose frames (MTU + 14-byte Ethernet header) still fit a
/// u16 length prefix.
pub const MAX_MTU: u16 = 65521;
pub const MIN_MTU: u16 = 576;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("subnet {0} is too small: it needs room for a gateway, a device and a host address (at most /29)")]
    SubnetTooSmall(Ipv4Net),
    #[error("MTU {0} is out of range ({MIN_MTU}..={MAX_MTU})")]
    BadMtu(u32),
    #[error("IPv6 subnet {0} must be a /64 of unicast addresses (SLAAC needs 64 bits of interface ID)")]
    BadSubnet6(Ipv6Net),
}

/// The gateway's IPv6 side, when the network has a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Config {
    pub prefix: Ipv6Net,
    /// `prefix::1`: the router, DNS server and DHCPv6 server's address.
    pub gateway: Ipv6Addr,
    /// `prefix::fe`, the twin of the IPv4 host alias.
    pub host: Ipv6Addr,
    /// The gateway's link-local address (EUI-64 of its MAC): routers
    /// advertise from link-local, and guests route through it.
    pub link_local: Ipv6Addr,
}

impl Ipv6Config {
    pub fn new(prefix: Ipv6Net, gateway_mac: EthernetAddress) -> Result<Self, ConfigError> {
        let prefix = prefix.trunc();
        let net = prefix.network();
        if prefix.prefix_len() != 64 || net.is_multicast() || net.is_unicast_link_local() || net.is_loopback() {
            return Err(ConfigError::BadSubnet6(prefix));
        }
        let base = u128::from(net);
        Ok(Ipv6Config {
            prefix,
            gateway: Ipv6Addr::from(base | 1),
            host: Ipv6Addr::from(base | 0xfe),
            link_local: Ipv6Addr::from((0xfe80u128 << 112) | u128::from(interface_id(gateway_mac))),
        })
    }

    /// The addresses the gateway answers for (neighbour discovery, echo).
    pub fn owns(&self, ip: &Ipv6Addr) -> bool {
        *ip == self.gateway || *ip == self.host || *ip == self.link_local
    }
}

/// The address SLAAC gives `mac` in `prefix` (modified EUI-64, RFC 4291
/// appendix A): what a Linux guest with `addr_gen_mode=0` picks.
pub fn eui64(prefix: &Ipv6Net, mac: EthernetAddress) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix.network()) | u128::from(interface_id(mac)))
}

fn interface_id(mac: EthernetAddress) -> u64 {
    let m = mac.0;
    u64::from_be_bytes([m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]])
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub subnet: Ipv4Net,
    pub gateway_ip: Ipv4Addr,
    pub gateway_mac: EthernetAddress,
    pub device_ip: Ipv4Addr,
    pub device_mac: EthernetAddress,
    /// Answered on ARP by the gateway and NATed to the host's 127.0.0.1.
    pub host_ip: Ipv4Addr,
    pub mtu: u16,
    /// DHCP option 119; usually the host resolver's search list.
    pub search_domains: Vec<String>,
    pub lease_secs: u32,
    /// IPv6 beside IPv4; `None` keeps the gateway IPv4-only.
    pub ipv6: Option<Ipv6Config>,
}

impl NetConfig {
    pub fn new(subnet: Ipv4Net, mtu: u32) -> Result<Self, ConfigError> {
        let subnet = subnet.trunc();
        if subnet.prefix_len() > 29 {
            return Err(ConfigError::SubnetTooSmall(subnet));
        }
        let mtu16 =
            u16::try_from(mtu).ok().filter(|m| (MIN_MTU..=MAX_MTU).contains(m)).ok_or(ConfigError::BadMtu(mtu))?;
        let net = u32::from(subnet.network());
        let bcast = u32::from(subnet.broadcast());
        Ok(NetConfig {
            subnet,
            gateway_ip: Ipv4Addr::from(net + 1),
            gateway_mac: GATEWAY_MAC,
            device_ip: Ipv4Addr::from(net + 2),
            device_mac: DEVICE_MAC,
            host_ip: Ipv4Addr::from(bcast - 1),
            mtu: mtu16,
            search_domains: Vec::new(),
            lease_secs: 3600,
            ipv6: None,
        })
    }

    /// The same network with IPv6 on `prefix` (a /64), or without IPv6.
    pub fn with_ipv6(mut self, prefix: Option<Ipv6Net>) -> Result<Self, ConfigError> {
        self.ipv6 = prefix.map(|p| Ipv6Config::new(p, self.gateway_mac)).transpose()?;
        Ok(self)
    }

    pub fn netmask(&self) -> Ipv4Addr {
        self.subnet.netmask()
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        self.subnet.broadcast()
    }

    /// Largest Ethernet frame on the link.
    pub fn max_frame(&self) -> usize {
        self.mtu as usize + 14
    }

    /// Addresses the gateway answers ARP for.
    pub fn is_gateway_owned(&self, ip: Ipv4Addr) -> bool {
        ip == self.gateway_ip || ip == self.host_ip
    }

    /// Addresses DHCP may hand out dynamically: everything usable except
    /// the gateway, the host alias and (reserved for its MAC) the device.
    pub fn dynamic_pool(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let first = u32::from(self.device_ip) + 1;
        let last = u32::from(self.host_ip); // exclusive
        (first..last).map(Ipv4Addr::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> Result<NetConfig, ConfigError> {
        NetConfig::new(s.parse().unwrap(), 1500)
    }

    #[test]
    fn default_subnet() {
        let c = cfg(DEFAULT_SUBNET).unwrap();
        assert_eq!(c.gateway_ip, Ipv4Addr::new(192, 168, 127, 1));
        assert_eq!(c.device_ip, Ipv4Addr::new(192, 168, 127, 2));
        assert_eq!(c.host_ip, Ipv4Addr::new(192, 168, 127, 254));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.dynamic_pool().next(), Some(Ipv4Addr::new(192, 168, 127, 3)));
        assert_eq!(c.dynamic_pool().last(), Some(Ipv4Addr::new(192, 168, 127, 253)));
    }

    #[test]
    fn other_prefixes() {
        let c = cfg("10.1.0.0/16").unwrap();
        assert_eq!(c.gateway_ip, Ipv4Addr::new(10, 1, 0, 1));
        assert_eq!(c.host_ip, Ipv4Addr::new(10, 1, 255, 254));
        // Host bits are ignored, as in a CIDR written loosely.
        let c = cfg("172.16.5.77/29").unwrap();
        assert_eq!(c.gateway_ip, Ipv4Addr::new(172, 16, 5, 73));
        assert_eq!(c.device_ip, Ipv4Addr::new(172, 16, 5, 74));
        assert_eq!(c.host_ip, Ipv4Addr::new(172, 16, 5, 78));
        assert_eq!(c.dynamic_pool().count(), 3);
    }

    #[test]
    fn too_small_or_bad_mtu() {
        for s in ["10.0.0.0/30", "10.0.0.0/31", "10.0.0.1/32"] {
            assert!(matches!(cfg(s), Err(ConfigError::SubnetTooSmall(_))), "{s}");
        }
        assert!(NetConfig::new("10.0.0.0/24".parse().unwrap(), 65522).is_err());
        assert!(NetConfig::new("10.0.0.0/24".parse().unwrap(), 100).is_err());
        assert!(NetConfig::new("10.0.0.0/24".parse().unwrap(), 65521).is_ok());
    }

    #[test]
    fn ipv6_addresses_derive_from_the_prefix() {
        let c = cfg(DEFAULT_SUBNET).unwrap().with_ipv6(Some(DEFAULT_SUBNET6.parse().unwrap())).unwrap();
        let v6 = c.ipv6.unwrap();
        assert_eq!(v6.gateway, "fd5a:94ef:e40c::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v6.host, "fd5a:94ef:e40c::fe".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v6.link_local, "fe80::5894:efff:fee4:cdd".parse::<Ipv6Addr>().unwrap());
        // What the Linux kernel gives the default device MAC by SLAAC.
        assert_eq!(eui64(&v6.prefix, DEVICE_MAC), "fd5a:94ef:e40c:0:5894:efff:fee4:cee".parse::<Ipv6Addr>().unwrap());
        for bad in ["fd00::/48", "fd00::/80", "fe80::/64", "ff02::/64", "::1/128"] {
            assert!(cfg(DEFAULT_SUBNET).unwrap().with_ipv6(Some(bad.parse().unwrap())).is_err(), "{bad}");
        }
        assert_eq!(cfg(DEFAULT_SUBNET).unwrap().with_ipv6(None).unwrap().ipv6, None);
    }
}
