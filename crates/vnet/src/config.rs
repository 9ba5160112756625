//! Addresses and settings of one virtual network, derived from its subnet
//! (COMPAT §2): first usable address = gateway, second = the VM's device,
//! last usable = the host alias; the DHCP pool is what lies between.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use smoltcp::wire::EthernetAddress;

pub const GATEWAY_MAC: EthernetAddress = EthernetAddress([0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd]);
pub const DEVICE_MAC: EthernetAddress = EthernetAddress([0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]);
pub const DEFAULT_SUBNET: &str = "192.168.127.0/24";
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
        })
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
}
