//! The virtual network's core: the switch plus the gateway's own services.
//!
//! How this works: [`Network::handle_frame`] takes one frame from a VM port.
//! The switch learns its source and forwards it (to one port, or floods a
//! broadcast to all others). Frames for the gateway's MAC, and broadcasts,
//! are also looked at by the gateway, which answers ARP (for itself and the
//! host alias), ICMP echo to itself and DHCP directly from the parsed frame.
//! Any other IPv4 packet for the gateway's MAC is handed back to the caller
//! as an [`Upcall`] for the NAT, DNS and API layers. Everything the gateway
//! sends goes through the same switch delivery. No I/O and no clock: frames
//! leave through a [`FrameSink`], and `now` is a parameter.
//!
//! Where each service lives: `arp.rs` (answers, probes, the neighbour
//! table), `icmp.rs` (pings of the gateway), `dhcp.rs` (the DHCP server),
//! `guard.rs` (which source addresses a guest may use), `dns/` (the DNS
//! server, reached through the upcall like the NAT). The switch itself is
//! `crate::switch`.

mod arp;
pub mod dhcp;
pub mod dns;
mod guard;
mod icmp;
pub mod ipv6;

pub use arp::MAX_NEIGHBORS;

use crate::FastMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
};

use crate::config::NetConfig;
use crate::ratelimit::LogLimiter;
use crate::stats::Stats;
use crate::switch::{Learn, PortId, Switch};
use dhcp::DhcpServer;
use rdnet_wire::frame::{self, ETH_HEADER};

/// Where the network's outgoing frames go (one VM connection each).
pub trait FrameSink {
    fn send(&mut self, port: PortId, frame: &[u8]);
}

impl FrameSink for Vec<(PortId, Vec<u8>)> {
    fn send(&mut self, port: PortId, frame: &[u8]) {
        self.push((port, frame.to_vec()));
    }
}

/// What the core could not finish by itself.
#[derive(Debug, PartialEq, Eq)]
pub enum Upcall<'a> {
    None,
    /// A valid IPv4 packet routed to the gateway that is not ARP, DHCP or a
    /// ping of the gateway: for NAT, DNS, the API.
    Ipv4 {
        src_mac: EthernetAddress,
        header: Ipv4Repr,
        packet: &'a [u8],
    },
    /// An IPv6 packet (header first) sent to the gateway's MAC that is not
    /// neighbour discovery, DHCPv6 or a ping of the gateway.
    Ipv6 {
        src_mac: EthernetAddress,
        header: Ipv6Repr,
        packet: &'a [u8],
    },
}

pub struct Network {
    pub cfg: NetConfig,
    pub switch: Switch,
    pub dhcp: DhcpServer,
    pub stats: Stats,
    neighbors: FastMap<Ipv4Addr, EthernetAddress>,
    arp_probes: crate::ratelimit::ProbeLimit<Ipv4Addr, MAX_NEIGHBORS>,
    pub ipv6: ipv6::Ipv6State,
    logs: LogLimiter,
    scratch: Vec<u8>,
}

impl Network {
    pub fn new(cfg: NetConfig) -> Self {
        let dhcp = DhcpServer::new(&cfg);
        Network {
            cfg,
            switch: Switch::new(),
            dhcp,
            stats: Stats::default(),
            neighbors: FastMap::default(),
            arp_probes: Default::default(),
            ipv6: ipv6::Ipv6State::default(),
            logs: LogLimiter::default(),
            scratch: Vec::with_capacity(2048),
        }
    }

    pub fn add_port(&mut self) -> PortId {
        self.switch.add_port()
    }

    pub fn remove_port(&mut self, port: PortId) {
        self.switch.remove_port(port);
    }

    /// Handles one frame received on `from`.
    pub fn handle_frame<'a>(
        &mut self,
        from: PortId,
        frame: &'a [u8],
        now: Instant,
        out: &mut impl FrameSink,
    ) -> Upcall<'a> {
        self.stats.frames_in += 1;
        self.stats.bytes_in += frame.len() as u64;
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            self.stats.drops.malformed += 1;
            return Upcall::None;
        };
        let (src, dst) = (eth.src_addr(), eth.dst_addr());
        if rdnet_wire::offload::is_offload_frame(frame) {
            // Between a VM's switch and us only: never forwarded.
            self.handle_offload_hello(from, frame, out);
            return Upcall::None;
        }
        match self.switch.learn(src, from) {
            Learn::Refused => {
                self.stats.drops.mac_table_full += 1;
                crate::limited_warn!(self.logs, now, "mac-table", port = from, mac = %rdnet_wire::MacDisplay(src.0), "port has too many MAC addresses; not learning more");
            }
            Learn::Conflict(owner) => {
                self.stats.drops.spoofed_source += 1;
                crate::limited_warn!(self.logs, now, "spoofed-mac", port = from, owner,
                    mac = %rdnet_wire::MacDisplay(src.0), "dropping a frame: its source MAC belongs to another connected port");
                return Upcall::None;
            }
            _ => {}
        }
        if let Some(why) = self.spoofed_source(src, frame, now) {
            self.stats.drops.spoofed_source += 1;
            crate::limited_warn!(self.logs, now, "spoofed-ip", port = from,
                mac = %rdnet_wire::MacDisplay(src.0), "dropping a frame: its source is {why}");
            return Upcall::None;
        }
        let for_gateway = if dst == self.cfg.gateway_mac {
            true
        } else if dst.is_broadcast() || dst.is_multicast() {
            self.flood(Some(from), frame, out);
            true
        } else {
            match self.switch.lookup(&dst) {
                Some(port) if port != from => self.emit(port, frame, out),
                Some(_) => {}
                None => self.stats.drops.unknown_unicast += 1,
            }
            false
        };
        if !for_gateway {
            return Upcall::None;
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                self.handle_arp(&frame[ETH_HEADER..], now, out);
                Upcall::None
            }
            EthernetProtocol::Ipv4 => {
                self.handle_ipv4(src, dst == self.cfg.gateway_mac, &frame[ETH_HEADER..], now, out)
            }
            EthernetProtocol::Ipv6 => {
                self.handle_ipv6(src, dst == self.cfg.gateway_mac, &frame[ETH_HEADER..], now, out)
            }
            _ => {
                if dst == self.cfg.gateway_mac {
                    self.stats.drops.unsupported_protocol += 1;
                }
                Upcall::None
            }
        }
    }

    /// A VM's switch offers to take large TCP frames: note it for the port
    /// and answer, which lets it turn on segmentation offload.
    fn handle_offload_hello(&mut self, from: PortId, frame: &[u8], out: &mut impl FrameSink) {
        use rdnet_wire::offload::{Hello, LARGE_TCP, Role, hello_frame, parse_hello};
        let Some(hello) = parse_hello(frame) else {
            self.stats.drops.malformed += 1;
            return;
        };
        if hello.role != Role::Vm || hello.flags & LARGE_TCP == 0 {
            return;
        }
        self.switch.set_large_frames(from);
        let src = EthernetFrame::new_unchecked(frame).src_addr();
        let reply = hello_frame(self.cfg.gateway_mac.0, src.0, Hello { role: Role::Gateway, flags: LARGE_TCP });
        self.emit(from, &reply, out);
    }

    /// The port and MAC a `frame_len`-byte unicast frame to the guest at
    /// `ip` goes to, if both are known and the port takes a frame that big.
    pub fn port_for_guest(&self, ip: IpAddr, frame_len: usize) -> Option<(PortId, EthernetAddress)> {
        let mac = match ip {
            IpAddr::V4(v4) => self.neighbor(v4)?,
            IpAddr::V6(v6) => self.ipv6.neighbor(&v6)?,
        };
        let port = self.switch.lookup(&mac)?;
        (frame_len <= self.cfg.max_frame() || self.switch.takes_large_frames(port)).then_some((port, mac))
    }

    /// Whether `port` takes frames above the MTU.
    pub fn takes_large_frames(&self, port: PortId) -> bool {
        self.switch.takes_large_frames(port)
    }

    fn handle_ipv4<'a>(
        &mut self,
        src_mac: EthernetAddress,
        unicast_to_gateway: bool,
        packet: &'a [u8],
        now: Instant,
        out: &mut impl FrameSink,
    ) -> Upcall<'a> {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            self.stats.drops.malformed += 1;
            return Upcall::None;
        };
        let Ok(header) = Ipv4Repr::parse(&ip, &ChecksumCapabilities::default()) else {
            self.stats.drops.malformed += 1;
            return Upcall::None;
        };
        if ip.more_frags() || ip.frag_offset() != 0 {
            self.stats.drops.unsupported_protocol += 1;
            crate::limited_warn!(self.logs, now, "ipv4-fragment", src = %header.src_addr, "dropping IPv4 fragment");
            return Upcall::None;
        }
        let hl = ip.header_len() as usize;
        let Some(packet) = packet.get(..hl + header.payload_len) else {
            self.stats.drops.malformed += 1;
            return Upcall::None;
        };
        self.remember(header.src_addr, src_mac);
        let to_gateway = header.dst_addr == self.cfg.gateway_ip;
        let broadcast = header.dst_addr == Ipv4Addr::BROADCAST || header.dst_addr == self.cfg.broadcast();
        if header.next_header == IpProtocol::Udp
            && (to_gateway || broadcast)
            && let Some((_, dst, data)) = frame::parse_udp_ip(packet)
            && dst.port() == dhcp::SERVER_PORT
        {
            self.handle_dhcp(data, now, out);
            return Upcall::None;
        }
        if !unicast_to_gateway || broadcast || header.dst_addr.is_multicast() {
            return Upcall::None;
        }
        if to_gateway && header.next_header == IpProtocol::Icmp {
            self.answer_ping(src_mac, &header, &packet[hl..], now, out);
            return Upcall::None;
        }
        Upcall::Ipv4 { src_mac, header, packet }
    }

    /// Sends a frame the gateway built: to its destination MAC's port, or to
    /// every port for a broadcast.
    pub fn deliver(&mut self, frame: &[u8], _now: Instant, out: &mut impl FrameSink) {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return;
        };
        let dst = eth.dst_addr();
        if dst.is_broadcast() || dst.is_multicast() {
            self.flood(None, frame, out);
        } else if let Some(port) = self.switch.lookup(&dst) {
            self.emit(port, frame, out);
        } else {
            self.stats.drops.unknown_unicast += 1;
        }
    }

    /// Sends a UDP datagram from `src` to a guest address.
    pub fn send_udp_to_guest(
        &mut self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &[u8],
        now: Instant,
        out: &mut impl FrameSink,
    ) -> bool {
        let Some(mac) = self.neighbor(*dst.ip()) else {
            self.stats.drops.unknown_unicast += 1;
            return false;
        };
        let mut buf = std::mem::take(&mut self.scratch);
        frame::udp(&mut buf, self.cfg.gateway_mac, mac, src, dst, payload);
        self.deliver(&buf, now, out);
        self.scratch = buf;
        true
    }

    /// Sends a complete IPv4 packet (built by a TCP stack, say) to the guest
    /// that owns its destination address.
    pub fn send_ipv4_to_guest(&mut self, packet: &[u8], now: Instant, out: &mut impl FrameSink) -> bool {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            return false;
        };
        let mac = self.neighbor(ip.dst_addr());
        self.send_packet_to(mac, EthernetProtocol::Ipv4, packet, now, out)
    }

    /// Frames a complete IP packet for the guest MAC `mac` (unknown: dropped
    /// and counted) and delivers it.
    fn send_packet_to(
        &mut self,
        mac: Option<EthernetAddress>,
        ethertype: EthernetProtocol,
        packet: &[u8],
        now: Instant,
        out: &mut impl FrameSink,
    ) -> bool {
        let Some(mac) = mac else {
            self.stats.drops.unknown_unicast += 1;
            return false;
        };
        let mut buf = std::mem::take(&mut self.scratch);
        frame::ethernet(&mut buf, self.cfg.gateway_mac, mac, ethertype, packet.len(), |b| b.copy_from_slice(packet));
        self.deliver(&buf, now, out);
        self.scratch = buf;
        true
    }

    /// Like [`send_ipv4_to_guest`](Self::send_ipv4_to_guest) for a packet
    /// already placed after 14 bytes of headroom in `frame`, which this
    /// fills with the Ethernet header: the TCP path builds in place, no copy.
    pub fn send_ipv4_frame_to_guest(&mut self, frame: &mut [u8], now: Instant, out: &mut impl FrameSink) -> bool {
        let Some(dst_ip) = frame.get(ETH_HEADER..).and_then(|p| Ipv4Packet::new_checked(p).ok()).map(|p| p.dst_addr())
        else {
            return false;
        };
        let Some(mac) = self.neighbor(dst_ip) else {
            self.stats.drops.unknown_unicast += 1;
            self.arp_probe(dst_ip, now, out);
            return false;
        };
        self.frame_and_deliver(frame, mac, EthernetProtocol::Ipv4, now, out);
        true
    }

    /// Sends an IP packet of either version placed after 14 bytes of
    /// headroom in `frame`.
    pub fn send_ip_frame_to_guest(&mut self, frame: &mut [u8], now: Instant, out: &mut impl FrameSink) -> bool {
        if frame.get(ETH_HEADER).map(|b| b >> 4) != Some(6) {
            return self.send_ipv4_frame_to_guest(frame, now, out);
        }
        let Some(dst_ip) = frame.get(ETH_HEADER..).and_then(|p| Ipv6Packet::new_checked(p).ok()).map(|p| p.dst_addr())
        else {
            return false;
        };
        let Some(mac) = self.ipv6.neighbor(&dst_ip) else {
            self.stats.drops.unknown_unicast += 1;
            self.neighbor_probe6(dst_ip, now, out);
            return false;
        };
        self.frame_and_deliver(frame, mac, EthernetProtocol::Ipv6, now, out);
        true
    }

    fn frame_and_deliver(
        &mut self,
        frame: &mut [u8],
        mac: EthernetAddress,
        ethertype: EthernetProtocol,
        now: Instant,
        out: &mut impl FrameSink,
    ) {
        let mut eth = EthernetFrame::new_unchecked(&mut *frame);
        eth.set_dst_addr(mac);
        eth.set_src_addr(self.cfg.gateway_mac);
        eth.set_ethertype(ethertype);
        self.deliver(frame, now, out);
    }

    fn flood(&mut self, except: Option<PortId>, frame: &[u8], out: &mut impl FrameSink) {
        // Ports are few; collecting avoids borrowing the switch while emitting.
        let ports: Vec<PortId> = self.switch.ports().filter(|p| Some(*p) != except).collect();
        for port in ports {
            self.emit(port, frame, out);
        }
    }

    fn emit(&mut self, port: PortId, frame: &[u8], out: &mut impl FrameSink) {
        if frame.len() > self.cfg.max_frame() && !self.switch.takes_large_frames(port) {
            self.stats.drops.too_big += 1;
            return;
        }
        self.stats.frames_out += 1;
        self.stats.bytes_out += frame.len() as u64;
        out.send(port, frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEVICE_MAC;
    use dhcproto::v4::{DhcpOption, MessageType};
    use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, Icmpv4Packet, Icmpv4Repr};

    const GUEST2: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x22]);

    fn net() -> Network {
        Network::new(NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap())
    }

    fn arp_request(src_mac: EthernetAddress, src_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let repr = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: src_mac,
            source_protocol_addr: src_ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        let mut buf = Vec::new();
        frame::ethernet(&mut buf, src_mac, EthernetAddress::BROADCAST, EthernetProtocol::Arp, repr.buffer_len(), |b| {
            repr.emit(&mut ArpPacket::new_unchecked(b))
        });
        buf
    }

    #[test]
    fn arp_for_gateway_and_host_alias_only() {
        let mut n = net();
        let p1 = n.add_port();
        let p2 = n.add_port();
        let now = Instant::now();
        for (target, answered) in [
            (Ipv4Addr::new(192, 168, 127, 1), true),
            (Ipv4Addr::new(192, 168, 127, 254), true),
            (Ipv4Addr::new(192, 168, 127, 9), false),
        ] {
            let mut out = Vec::new();
            n.handle_frame(p1, &arp_request(DEVICE_MAC, Ipv4Addr::new(192, 168, 127, 2), target), now, &mut out);
            // The broadcast request is flooded to the other port.
            assert!(out.iter().any(|(p, _)| *p == p2));
            let replies: Vec<_> = out.iter().filter(|(p, _)| *p == p1).collect();
            assert_eq!(replies.len(), answered as usize, "{target}");
            if answered {
                let eth = EthernetFrame::new_checked(&replies[0].1[..]).unwrap();
                assert_eq!(eth.dst_addr(), DEVICE_MAC);
                let ArpRepr::EthernetIpv4 { operation, source_hardware_addr, source_protocol_addr, .. } =
                    ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap()
                else {
                    panic!()
                };
                assert_eq!(operation, ArpOperation::Reply);
                assert_eq!(source_hardware_addr, n.cfg.gateway_mac);
                assert_eq!(source_protocol_addr, target);
            }
        }
    }

    #[test]
    fn ping_gateway_keeps_ident_and_seq() {
        let mut n = net();
        let p = n.add_port();
        let req = Icmpv4Repr::EchoRequest { ident: 0x1234, seq_no: 7, data: b"payload" };
        let ip = Ipv4Repr {
            src_addr: Ipv4Addr::new(192, 168, 127, 2),
            dst_addr: Ipv4Addr::new(192, 168, 127, 1),
            next_header: IpProtocol::Icmp,
            payload_len: req.buffer_len(),
            hop_limit: 64,
        };
        let mut f = Vec::new();
        frame::ipv4(&mut f, DEVICE_MAC, n.cfg.gateway_mac, &ip, |b| {
            req.emit(&mut Icmpv4Packet::new_unchecked(b), &ChecksumCapabilities::default())
        });
        let mut out = Vec::new();
        assert_eq!(n.handle_frame(p, &f, Instant::now(), &mut out), Upcall::None);
        assert_eq!(out.len(), 1);
        let eth = EthernetFrame::new_checked(&out[0].1[..]).unwrap();
        let ipp = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert_eq!(ipp.src_addr(), Ipv4Addr::new(192, 168, 127, 1));
        let icmp = Icmpv4Packet::new_checked(ipp.payload()).unwrap();
        assert_eq!(
            Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).unwrap(),
            Icmpv4Repr::EchoReply { ident: 0x1234, seq_no: 7, data: b"payload" }
        );
    }

    #[test]
    fn unicast_between_ports_and_unknown_dropped() {
        let mut n = net();
        let p1 = n.add_port();
        let p2 = n.add_port();
        let now = Instant::now();
        let mut out = Vec::new();
        n.handle_frame(
            p2,
            &arp_request(GUEST2, Ipv4Addr::new(192, 168, 127, 3), Ipv4Addr::new(192, 168, 127, 2)),
            now,
            &mut out,
        );
        out.clear();
        let mut f = Vec::new();
        frame::ethernet(&mut f, DEVICE_MAC, GUEST2, EthernetProtocol::Ipv4, 20, |_| {});
        n.handle_frame(p1, &f, now, &mut out);
        assert_eq!(out.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![p2]);
        out.clear();
        frame::ethernet(&mut f, DEVICE_MAC, EthernetAddress([2, 7, 7, 7, 7, 7]), EthernetProtocol::Ipv4, 20, |_| {});
        n.handle_frame(p1, &f, now, &mut out);
        assert!(out.is_empty());
        assert_eq!(n.stats.drops.unknown_unicast, 1);
        // After the port goes, its MACs are forgotten.
        n.remove_port(p2);
        frame::ethernet(&mut f, DEVICE_MAC, GUEST2, EthernetProtocol::Ipv4, 20, |_| {});
        n.handle_frame(p1, &f, now, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn dhcp_over_frames() {
        let mut n = net();
        let p = n.add_port();
        let msg =
            dhcp::client_message(GUEST2, MessageType::Discover, 9, vec![DhcpOption::ParameterRequestList(vec![])]);
        let mut f = Vec::new();
        frame::udp(
            &mut f,
            GUEST2,
            EthernetAddress::BROADCAST,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
            &msg,
        );
        let mut out = Vec::new();
        n.handle_frame(p, &f, Instant::now(), &mut out);
        assert_eq!(out.len(), 1);
        let reply = frame::parse_udp(&out[0].1).unwrap();
        assert_eq!(reply.src_mac, n.cfg.gateway_mac.0);
        let (src, dst) = (reply.src, reply.dst);
        assert_eq!(src, SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 1), 67));
        assert_eq!(dst, SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 3), 68));
        assert_eq!(n.stats.dhcp_replies, 1);
    }

    const GUEST3: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x33]);

    fn vm_hello(src: EthernetAddress) -> Vec<u8> {
        use rdnet_wire::offload::{Hello, LARGE_TCP, Role, hello_frame};
        hello_frame(src.0, [0xff; 6], Hello { role: Role::Vm, flags: LARGE_TCP })
    }

    /// A port that has spoken once from `mac` (so the switch knows it there).
    fn learn(n: &mut Network, port: PortId, mac: EthernetAddress, last_octet: u8) {
        let mut out = Vec::new();
        let arp = arp_request(mac, Ipv4Addr::new(192, 168, 127, last_octet), Ipv4Addr::new(192, 168, 127, 1));
        n.handle_frame(port, &arp, Instant::now(), &mut out);
        assert_eq!(n.switch.lookup(&mac), Some(port));
    }

    /// An IPv4 frame of `len` bytes in all from `src` to `dst`.
    fn sized_frame(src: EthernetAddress, dst: EthernetAddress, len: usize) -> Vec<u8> {
        let mut f = Vec::new();
        frame::ethernet(&mut f, src, dst, EthernetProtocol::Ipv4, len - ETH_HEADER, |b| b.fill(0x5a));
        assert_eq!(f.len(), len);
        f
    }

    fn ports_of(out: &[(PortId, Vec<u8>)]) -> Vec<PortId> {
        out.iter().map(|(p, _)| *p).collect()
    }

    /// A UDP frame from `mac`/`src` to the host alias, through the gateway.
    fn udp_from(mac: EthernetAddress, src: Ipv4Addr) -> Vec<u8> {
        let mut f = Vec::new();
        frame::udp(
            &mut f,
            mac,
            net().cfg.gateway_mac,
            SocketAddrV4::new(src, 40000),
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 254), 53),
            b"payload",
        );
        f
    }

    #[test]
    fn a_guest_cannot_use_another_guests_addresses() {
        let mut n = net();
        let (p1, p2) = (n.add_port(), n.add_port());
        learn(&mut n, p1, DEVICE_MAC, 2);
        learn(&mut n, p2, GUEST2, 3);
        let now = Instant::now();
        let mut out = Vec::new();
        // Its own address: up to the NAT.
        assert!(matches!(
            n.handle_frame(p2, &udp_from(GUEST2, Ipv4Addr::new(192, 168, 127, 3)), now, &mut out),
            Upcall::Ipv4 { .. }
        ));
        let spoofs = [
            udp_from(GUEST2, Ipv4Addr::new(192, 168, 127, 2)), // the other guest's
            udp_from(GUEST2, Ipv4Addr::new(10, 0, 0, 1)),      // outside the subnet
            udp_from(GUEST2, Ipv4Addr::new(192, 168, 127, 1)), // the gateway's
            udp_from(GUEST2, Ipv4Addr::new(192, 168, 127, 255)), // the broadcast
            udp_from(DEVICE_MAC, Ipv4Addr::new(192, 168, 127, 2)), // the other guest's MAC
            arp_request(GUEST2, Ipv4Addr::new(192, 168, 127, 2), Ipv4Addr::new(192, 168, 127, 1)),
        ];
        for (i, f) in spoofs.iter().enumerate() {
            out.clear();
            assert_eq!(n.handle_frame(p2, f, now, &mut out), Upcall::None, "case {i}");
            assert!(out.is_empty(), "case {i}: nothing answered or flooded");
            assert_eq!(n.stats.drops.spoofed_source, i as u64 + 1, "case {i}");
        }
        // Still the first guest's, and its MAC still on p1.
        assert_eq!(n.neighbor(Ipv4Addr::new(192, 168, 127, 2)), Some(DEVICE_MAC));
        assert_eq!(n.switch.lookup(&DEVICE_MAC), Some(p1));
        // DHCP from 0.0.0.0 is anyone's.
        out.clear();
        let discover = crate::gateway::dhcp::client_message(GUEST2, dhcproto::v4::MessageType::Discover, 7, vec![]);
        let mut f = Vec::new();
        frame::udp(
            &mut f,
            GUEST2,
            EthernetAddress::BROADCAST,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
            &discover,
        );
        n.handle_frame(p2, &f, now, &mut out);
        assert_eq!(n.stats.drops.spoofed_source, spoofs.len() as u64);
        assert!(!out.is_empty(), "a DHCP offer");
        // Once the first guest is gone, its address is free to take.
        n.remove_port(p1);
        assert!(matches!(n.handle_frame(p2, &spoofs[0], now, &mut out), Upcall::Ipv4 { .. }));
        assert_eq!(n.neighbor(Ipv4Addr::new(192, 168, 127, 2)), Some(GUEST2));
    }

    #[test]
    fn vm_hello_is_answered_on_its_port_only_and_never_flooded() {
        use rdnet_wire::offload::{Hello, LARGE_TCP, Role, is_offload_frame, parse_hello};
        let mut n = net();
        let (p1, p2, p3) = (n.add_port(), n.add_port(), n.add_port());
        learn(&mut n, p2, GUEST2, 3);
        learn(&mut n, p3, GUEST3, 4);
        let mut out = Vec::new();
        assert_eq!(n.handle_frame(p1, &vm_hello(DEVICE_MAC), Instant::now(), &mut out), Upcall::None);
        // One frame, back on the hello's port: the gateway's hello, unicast.
        assert_eq!(ports_of(&out), vec![p1], "the broadcast hello must not be flooded");
        let reply = &out[0].1;
        assert_eq!(parse_hello(reply), Some(Hello { role: Role::Gateway, flags: LARGE_TCP }));
        let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
        assert_eq!(eth.dst_addr(), DEVICE_MAC);
        assert_eq!(eth.src_addr(), n.cfg.gateway_mac);
        assert!(n.takes_large_frames(p1));
        assert!(!n.takes_large_frames(p2));
        assert!(!n.takes_large_frames(p3));

        // A second hello (a reconnecting session) is answered again, still
        // on its own port only; the other ports hear of neither.
        out.clear();
        n.handle_frame(p2, &vm_hello(GUEST2), Instant::now(), &mut out);
        assert_eq!(ports_of(&out), vec![p2]);
        assert!(n.takes_large_frames(p2));
        assert!(!n.takes_large_frames(p3));
        assert!(out.iter().all(|(p, f)| *p != p3 && (*p == p2 || !is_offload_frame(f))));
    }

    #[test]
    fn hellos_that_do_not_offer_large_frames_change_nothing() {
        use rdnet_wire::offload::{Hello, LARGE_TCP, Role, hello_frame};
        let mut n = net();
        let (p1, p2) = (n.add_port(), n.add_port());
        learn(&mut n, p2, GUEST2, 3);
        let stats_before = n.stats.drops.malformed;
        let well_formed = [
            // Another VM's answer pretending to be the gateway, or no flags.
            hello_frame(DEVICE_MAC.0, [0xff; 6], Hello { role: Role::Gateway, flags: LARGE_TCP }),
            hello_frame(DEVICE_MAC.0, [0xff; 6], Hello { role: Role::Vm, flags: 0 }),
            hello_frame(DEVICE_MAC.0, [0xff; 6], Hello { role: Role::Vm, flags: !LARGE_TCP }),
        ];
        for f in &well_formed {
            let mut out = Vec::new();
            n.handle_frame(p1, f, Instant::now(), &mut out);
            assert!(out.is_empty(), "{out:?}");
        }
        assert_eq!(n.stats.drops.malformed, stats_before);

        let good = vm_hello(DEVICE_MAC);
        let mut malformed = Vec::new();
        let mut bad_magic = good.clone();
        bad_magic[16] ^= 0x20;
        malformed.push(bad_magic);
        let mut bad_role = good.clone();
        bad_role[28] = 3;
        malformed.push(bad_role);
        // Cut after the magic, and an EtherType with nothing behind it.
        malformed.push(good[..30].to_vec());
        malformed.push(good[..14].to_vec());
        let mut unicast_junk = sized_frame(DEVICE_MAC, n.cfg.gateway_mac, 200);
        unicast_junk[12..14].copy_from_slice(&rdnet_wire::offload::ETHERTYPE.to_be_bytes());
        malformed.push(unicast_junk);
        let mut to_guest2 = good.clone();
        to_guest2[..6].copy_from_slice(&GUEST2.0);
        to_guest2[20] = 0;
        malformed.push(to_guest2);
        for (i, f) in malformed.iter().enumerate() {
            let mut out = Vec::new();
            n.handle_frame(p1, f, Instant::now(), &mut out);
            assert!(out.is_empty(), "case {i}: {out:?}");
            assert_eq!(n.stats.drops.malformed, stats_before + i as u64 + 1, "case {i}");
        }
        assert!(!n.takes_large_frames(p1));
        assert!(!n.takes_large_frames(p2));
        // A large frame for p1 is still refused, as before any hello.
        let mut out = Vec::new();
        learn(&mut n, p1, DEVICE_MAC, 2);
        n.handle_frame(p2, &sized_frame(GUEST2, DEVICE_MAC, 1515), Instant::now(), &mut out);
        assert!(out.is_empty());
        assert_eq!(n.stats.drops.too_big, 1);
    }

    #[test]
    fn frames_above_the_mtu_reach_only_ports_that_sent_a_hello() {
        let mut n = net();
        let (p1, p2, p3) = (n.add_port(), n.add_port(), n.add_port());
        learn(&mut n, p1, DEVICE_MAC, 2);
        learn(&mut n, p2, GUEST2, 3);
        learn(&mut n, p3, GUEST3, 4);
        let now = Instant::now();
        let mut out = Vec::new();
        n.handle_frame(p1, &vm_hello(DEVICE_MAC), now, &mut out);
        n.handle_frame(p3, &vm_hello(GUEST3), now, &mut out);
        assert_eq!(ports_of(&out), vec![p1, p3]);
        let max = n.cfg.max_frame();
        assert_eq!(max, 1514);

        // Unicast p1 → p2 (no hello): the MTU-sized frame passes, one byte
        // more does not.
        for (len, passes) in [(max, true), (max + 1, false), (9014, false), (65535, false)] {
            out.clear();
            let dropped = n.stats.drops.too_big;
            n.handle_frame(p1, &sized_frame(DEVICE_MAC, GUEST2, len), now, &mut out);
            assert_eq!(ports_of(&out), if passes { vec![p2] } else { vec![] }, "{len} bytes");
            assert_eq!(n.stats.drops.too_big, dropped + u64::from(!passes), "{len} bytes");
        }
        // Unicast to p3 (hello): every size passes, from either port.
        for (from, src) in [(p1, DEVICE_MAC), (p2, GUEST2)] {
            for len in [max + 1, 9014, 65535] {
                out.clear();
                n.handle_frame(from, &sized_frame(src, GUEST3, len), now, &mut out);
                assert_eq!(ports_of(&out), vec![p3], "{len} bytes");
                assert_eq!(out[0].1.len(), len);
            }
        }
        assert_eq!(n.stats.drops.too_big, 3);

        // A large broadcast from p1 reaches p3, not p2, and counts one drop.
        out.clear();
        n.handle_frame(p1, &sized_frame(DEVICE_MAC, EthernetAddress::BROADCAST, 4000), now, &mut out);
        assert_eq!(ports_of(&out), vec![p3]);
        assert_eq!(n.stats.drops.too_big, 4);

        // The gateway's own large frames (the TCP NAT's segments) too.
        for (ip, mac, port) in
            [(Ipv4Addr::new(192, 168, 127, 3), GUEST2, p2), (Ipv4Addr::new(192, 168, 127, 4), GUEST3, p3)]
        {
            assert_eq!(n.neighbor(ip), Some(mac));
            let mut f = Vec::new();
            let ip_repr = Ipv4Repr {
                src_addr: Ipv4Addr::new(192, 168, 127, 254),
                dst_addr: ip,
                next_header: IpProtocol::Tcp,
                payload_len: 30_000,
                hop_limit: 64,
            };
            frame::ipv4(&mut f, n.cfg.gateway_mac, EthernetAddress::BROADCAST, &ip_repr, |_| {});
            out.clear();
            assert!(n.send_ipv4_frame_to_guest(&mut f, now, &mut out));
            if port == p3 {
                assert_eq!(ports_of(&out), vec![p3]);
            } else {
                assert!(out.is_empty());
            }
        }
        assert_eq!(n.stats.drops.too_big, 5);

        // A port that goes and comes back (a new connection) starts without.
        n.remove_port(p3);
        let p4 = n.add_port();
        assert!(!n.takes_large_frames(p4));
        learn(&mut n, p4, GUEST3, 4);
        out.clear();
        n.handle_frame(p1, &sized_frame(DEVICE_MAC, GUEST3, max + 1), now, &mut out);
        assert!(out.is_empty());
        assert_eq!(n.stats.drops.too_big, 6);
    }

    #[test]
    fn noise_never_panics() {
        let mut n = net();
        let p = n.add_port();
        let now = Instant::now();
        let mut out = Vec::new();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut f = Vec::new();
        for i in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 200) as usize;
            f.clear();
            f.extend((0..len).map(|j| (x >> (j % 8 * 8)) as u8));
            // Steer some frames at the gateway with plausible ethertypes.
            if f.len() >= 14 && i % 2 == 0 {
                f[..6].copy_from_slice(&n.cfg.gateway_mac.0);
                f[12..14].copy_from_slice(if i % 4 == 0 { &[0x08, 0x00] } else { &[0x08, 0x06] });
            }
            let _ = n.handle_frame(p, &f, now, &mut out);
            out.clear();
        }
    }
}
