//! Guests speak only for themselves: which source addresses a frame from a
//! guest's MAC may carry (the anti-spoofing rule of `Network::handle_frame`,
//! counted as `drops.spoofed_source`).

use std::net::Ipv4Addr;
use std::time::Instant;

use smoltcp::wire::{ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol, Ipv4Packet};

use super::Network;

impl Network {
    /// Why the source address of an IPv4 or ARP frame from `src_mac` is
    /// not that guest's to use, if it is not: an address a guest has is
    /// the one leased to its MAC, or (for addresses set by hand) the one it
    /// was first seen using, for as long as that MAC stays connected.
    /// `0.0.0.0` (DHCP, ARP probes for duplicate addresses) is anyone's.
    pub(super) fn spoofed_source(&self, src_mac: EthernetAddress, frame: &[u8], now: Instant) -> Option<&'static str> {
        let eth = EthernetFrame::new_unchecked(frame);
        let claimed = match eth.ethertype() {
            EthernetProtocol::Ipv4 => {
                // Not an IPv4 header at all: the malformed-frame path counts it.
                let ip = Ipv4Packet::new_checked(eth.payload()).ok().filter(|ip| ip.version() == 4)?;
                ip.src_addr()
            }
            EthernetProtocol::Arp => {
                let arp = ArpPacket::new_checked(eth.payload()).ok()?;
                if arp.source_hardware_addr() != src_mac.as_bytes() {
                    return Some("an ARP sender MAC that is not the frame's");
                }
                Ipv4Addr::from(<[u8; 4]>::try_from(arp.source_protocol_addr()).ok()?)
            }
            EthernetProtocol::Ipv6 => return self.spoofed_source6(src_mac, frame),
            _ => return None,
        };
        if claimed.is_unspecified() {
            return None;
        }
        if !self.cfg.subnet.contains(&claimed)
            || claimed == self.cfg.subnet.network()
            || claimed == self.cfg.broadcast()
        {
            return Some("outside the subnet");
        }
        if self.cfg.is_gateway_owned(claimed) {
            return Some("the gateway's address");
        }
        let attached = |mac: &EthernetAddress| self.switch.lookup(mac).is_some();
        let owner = self.dhcp.mac_of(claimed, now).filter(attached).or_else(|| self.neighbor(claimed).filter(attached));
        match owner {
            Some(mac) if mac != src_mac => Some("another guest's address"),
            _ => None,
        }
    }
}
