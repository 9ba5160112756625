//! The switch and the gateway (`Network::handle_frame`) fed arbitrary
//! frames from two VM ports: ARP, ICMP, DHCP, the IPv4 upcall for UDP/TCP,
//! and IPv6 (neighbour discovery, router solicitations, DHCPv6, echo, the
//! "no route" answer, the periodic advertisement). Input: one control byte,
//! then u16-LE framed frames. Control bit 0 asks for the IPv4 header and
//! ICMP/ICMPv6/UDP/TCP checksums to be made valid first, so the fuzzer gets
//! past checksum checks. The NAT behind the
//! upcall is not driven here: it would open host sockets to fuzzer-chosen
//! addresses (TESTING.md: traffic only to loopback).
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rdnet_link::codec::{Decoder, Framing};
use rdnet_vnet::{NetConfig, Network, PortId, Upcall};
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, Icmpv4Packet, Icmpv6Packet, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet,
    TcpPacket, UdpPacket,
};

fn fix_checksums(frame: &mut [u8]) {
    let Ok(mut eth) = EthernetFrame::new_checked(frame) else { return };
    if eth.ethertype() == EthernetProtocol::Ipv6 {
        fix_checksums6(eth.payload_mut());
        return;
    }
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else { return };
    ip.fill_checksum();
    let (src, dst, proto) = (ip.src_addr(), ip.dst_addr(), ip.next_header());
    let (src, dst) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
    let hl = usize::from(ip.header_len());
    let total = usize::from(ip.total_len());
    let buf = ip.into_inner();
    let Some(payload) = buf.get_mut(hl..total) else { return };
    match proto {
        IpProtocol::Icmp => {
            if let Ok(mut p) = Icmpv4Packet::new_checked(payload) {
                p.fill_checksum();
            }
        }
        IpProtocol::Udp => {
            if let Ok(mut p) = UdpPacket::new_checked(payload) {
                p.fill_checksum(&src, &dst);
            }
        }
        IpProtocol::Tcp => {
            if let Ok(mut p) = TcpPacket::new_checked(payload) {
                p.fill_checksum(&src, &dst);
            }
        }
        _ => {}
    }
}

fn fix_checksums6(packet: &mut [u8]) {
    let Ok(mut ip) = Ipv6Packet::new_checked(packet) else { return };
    let (src, dst, proto) = (ip.src_addr(), ip.dst_addr(), ip.next_header());
    let len = usize::from(ip.payload_len());
    let Some(payload) = ip.payload_mut().get_mut(..len) else { return };
    match proto {
        IpProtocol::Icmpv6 => {
            if let Ok(mut p) = Icmpv6Packet::new_checked(payload) {
                p.fill_checksum(&src, &dst);
            }
        }
        IpProtocol::Udp => {
            if let Ok(mut p) = UdpPacket::new_checked(payload) {
                p.fill_checksum(&IpAddress::Ipv6(src), &IpAddress::Ipv6(dst));
            }
        }
        _ => {}
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&ctl, mut data)) = input.split_first() else { return };
    let cfg = NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500)
        .unwrap()
        .with_ipv6(Some("fd5a:94ef:e40c::/64".parse().unwrap()))
        .unwrap();
    let mut net = Network::new(cfg);
    let ports: [PortId; 2] = [net.add_port(), net.add_port()];
    let decoder = Decoder::new(Framing::U16Le, 65535);
    let start = Instant::now();
    let mut out: Vec<(PortId, Vec<u8>)> = Vec::new();
    let mut i = 0u64;
    while let Ok(Some((frame, used))) = decoder.decode(data) {
        data = &data[used..];
        let mut frame = frame.to_vec();
        if ctl & 1 == 1 {
            fix_checksums(&mut frame);
        }
        let port = ports[usize::from(frame.len() % 2 == 1 && ctl & 2 == 2)];
        // Time moves on by a fuzzer-chosen step (DHCP leases, ARP probes).
        let now = start + Duration::from_secs(i * u64::from(ctl >> 2));
        i += 1;
        match net.handle_frame(port, &frame, now, &mut out) {
            Upcall::None => {}
            Upcall::Ipv4 { header, packet, .. } => {
                assert!(packet.len() >= header.payload_len);
            }
            Upcall::Ipv6 { header, packet, .. } => {
                assert_eq!(packet.len(), 40 + header.payload_len);
                // What the shell answers for IPv6 it cannot route.
                let (header, packet) = (header, packet.to_vec());
                net.unreachable6(&header, &packet, now, &mut out);
            }
        }
        net.poll_ipv6(now, &mut out);
        for (p, f) in out.drain(..) {
            assert!(ports.contains(&p));
            assert!(f.len() >= 14, "a frame shorter than an Ethernet header went out");
        }
    }
    if ctl & 0x80 != 0 {
        net.remove_port(ports[1]);
    }
});
