//! ARP: the gateway answers for its own addresses (itself and the host
//! alias), learns every guest's IP → MAC from ARP and IPv4 traffic (the
//! neighbour table, bounded by [`MAX_NEIGHBORS`]), and asks the guests by
//! ARP for an address it must send to but has not seen yet (at most once a
//! second per address).

use std::net::Ipv4Addr;
use std::time::Instant;

use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetProtocol};

use super::{FrameSink, Network};
use rdnet_wire::frame;

/// Remembered guest addresses (IP → MAC), bounded.
pub const MAX_NEIGHBORS: usize = 4096;

impl Network {
    pub(super) fn handle_arp(&mut self, payload: &[u8], now: Instant, out: &mut impl FrameSink) {
        let Ok(pkt) = ArpPacket::new_checked(payload) else {
            self.stats.drops.malformed += 1;
            return;
        };
        let Ok(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = ArpRepr::parse(&pkt)
        else {
            self.stats.drops.malformed += 1;
            return;
        };
        self.remember(source_protocol_addr, source_hardware_addr);
        if operation != ArpOperation::Request || !self.cfg.is_gateway_owned(target_protocol_addr) {
            return;
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: self.cfg.gateway_mac,
            source_protocol_addr: target_protocol_addr,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        let mut buf = std::mem::take(&mut self.scratch);
        frame::ethernet(
            &mut buf,
            self.cfg.gateway_mac,
            source_hardware_addr,
            EthernetProtocol::Arp,
            reply.buffer_len(),
            |b| reply.emit(&mut ArpPacket::new_unchecked(b)),
        );
        self.stats.arp_replies += 1;
        self.deliver(&buf, now, out);
        self.scratch = buf;
    }

    /// Asks the guests who has `ip` (at most once a second per address), so
    /// a connection the host opens to a guest that never spoke first finds
    /// its MAC by the time its SYN is retransmitted.
    pub fn arp_probe(&mut self, ip: Ipv4Addr, now: Instant, out: &mut impl FrameSink) {
        if !self.cfg.subnet.contains(&ip) || self.cfg.is_gateway_owned(ip) {
            return;
        }
        if !self.arp_probes.allow(ip, now) {
            return;
        }
        let req = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: self.cfg.gateway_mac,
            source_protocol_addr: self.cfg.gateway_ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: ip,
        };
        let mut buf = std::mem::take(&mut self.scratch);
        frame::ethernet(
            &mut buf,
            self.cfg.gateway_mac,
            EthernetAddress::BROADCAST,
            EthernetProtocol::Arp,
            req.buffer_len(),
            |b| req.emit(&mut ArpPacket::new_unchecked(b)),
        );
        self.deliver(&buf, now, out);
        self.scratch = buf;
    }

    pub(super) fn remember(&mut self, ip: Ipv4Addr, mac: EthernetAddress) {
        if !mac.is_unicast() || !self.cfg.subnet.contains(&ip) || self.cfg.is_gateway_owned(ip) {
            return;
        }
        if self.neighbors.len() >= MAX_NEIGHBORS && !self.neighbors.contains_key(&ip) {
            return;
        }
        self.neighbors.insert(ip, mac);
    }

    /// The guest MAC for an address in the subnet, if known.
    pub fn neighbor(&self, ip: Ipv4Addr) -> Option<EthernetAddress> {
        self.neighbors.get(&ip).copied()
    }
}
