//! One readable line per Ethernet frame, for vm-switch's `-trace-packets`:
//! `74 bytes IPv4 TCP 192.168.127.2:41234 → 1.2.3.4:443 [SYN] seq 1 win 64240 len 0`.
//!
//! The frame is whatever crossed the link, so it is untrusted: every layer
//! is read through `smoltcp::wire`'s checked constructors, and a layer that
//! does not parse is named as such (`IPv4 (malformed)`) instead of being
//! guessed at. Checksums are not verified: with segmentation offload a TCP
//! checksum is legitimately incomplete. Formatting happens only when the
//! summary is displayed, so a disabled trace costs nothing.

use std::fmt;

use smoltcp::wire::{
    ArpHardware, ArpOperation, ArpPacket, EthernetFrame, EthernetProtocol, Icmpv4Message, Icmpv4Packet, Icmpv6Message,
    Icmpv6Packet, IpProtocol, Ipv4Packet, Ipv6ExtHeader, Ipv6Packet, TcpPacket, UdpPacket,
};

use dhcproto::v4::MessageType;

use rdnet_wire::{Mac, MacDisplay};

/// Extension headers followed before giving up on an IPv6 packet's payload.
const MAX_IPV6_EXTENSIONS: usize = 8;

/// Displays a summary of the Ethernet frame it wraps.
pub struct PacketSummary<'a>(pub &'a [u8]);

/// The summary as a string (what the trace logs after its direction).
pub fn describe(frame: &[u8]) -> String {
    PacketSummary(frame).to_string()
}

impl fmt::Display for PacketSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let frame = self.0;
        write!(f, "{} bytes ", frame.len())?;
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return f.write_str("(shorter than an Ethernet header)");
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => arp(f, eth.payload()),
            EthernetProtocol::Ipv4 => ipv4(f, eth.payload()),
            EthernetProtocol::Ipv6 => ipv6(f, eth.payload()),
            EthernetProtocol::Unknown(t) => {
                write!(f, "ethertype 0x{t:04x} {} → {}", MacDisplay(eth.src_addr().0), MacDisplay(eth.dst_addr().0))
            }
        }
    }
}

/// A MAC from an ARP address field (checked to be 6 bytes by the caller).
fn mac_of(b: &[u8]) -> Mac {
    let mut m = [0u8; 6];
    if b.len() == 6 {
        m.copy_from_slice(b);
    }
    m
}

fn ipv4_of(b: &[u8]) -> std::net::Ipv4Addr {
    match <[u8; 4]>::try_from(b) {
        Ok(o) => std::net::Ipv4Addr::from(o),
        Err(_) => std::net::Ipv4Addr::UNSPECIFIED,
    }
}

fn arp(f: &mut fmt::Formatter<'_>, payload: &[u8]) -> fmt::Result {
    let Ok(p) = ArpPacket::new_checked(payload) else { return f.write_str("ARP (malformed)") };
    if p.hardware_type() != ArpHardware::Ethernet
        || p.protocol_type() != EthernetProtocol::Ipv4
        || p.hardware_len() != 6
        || p.protocol_len() != 4
    {
        return f.write_str("ARP (not Ethernet/IPv4)");
    }
    let (sha, spa) = (mac_of(p.source_hardware_addr()), ipv4_of(p.source_protocol_addr()));
    let (tha, tpa) = (mac_of(p.target_hardware_addr()), ipv4_of(p.target_protocol_addr()));
    match p.operation() {
        ArpOperation::Request => write!(f, "ARP request who-has {tpa} tell {spa} ({})", MacDisplay(sha)),
        ArpOperation::Reply => {
            write!(f, "ARP reply {spa} is-at {} to {tpa} ({})", MacDisplay(sha), MacDisplay(tha))
        }
        ArpOperation::Unknown(op) => {
            write!(f, "ARP op {op} {spa} ({}) → {tpa} ({})", MacDisplay(sha), MacDisplay(tha))
        }
    }
}

/// The two ends of an IP packet, written as `a → b` or, with ports,
/// `a:p → b:q` (IPv6 in brackets).
#[derive(Clone, Copy)]
struct Ends {
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
}

impl Ends {
    fn plain(self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} → {}", self.src, self.dst)
    }

    fn ports(self, f: &mut fmt::Formatter<'_>, sport: u16, dport: u16) -> fmt::Result {
        let src = std::net::SocketAddr::new(self.src, sport);
        let dst = std::net::SocketAddr::new(self.dst, dport);
        write!(f, "{src} → {dst}")
    }
}

fn ipv4(f: &mut fmt::Formatter<'_>, payload: &[u8]) -> fmt::Result {
    let Ok(p) = Ipv4Packet::new_checked(payload) else { return f.write_str("IPv4 (malformed or truncated)") };
    if p.version() != 4 {
        return f.write_str("IPv4 (bad version)");
    }
    let ends = Ends { src: p.src_addr().into(), dst: p.dst_addr().into() };
    let proto = p.next_header();
    if p.frag_offset() != 0 {
        // Only the first fragment carries the transport header.
        write!(f, "IPv4 {proto} ")?;
        ends.plain(f)?;
        return write!(f, " fragment id {} offset {}", p.ident(), p.frag_offset());
    }
    let more = p.more_frags();
    transport(f, "IPv4", proto, ends, p.payload())?;
    if more { write!(f, " (first fragment, id {})", p.ident()) } else { Ok(()) }
}

fn ipv6(f: &mut fmt::Formatter<'_>, payload: &[u8]) -> fmt::Result {
    let Ok(p) = Ipv6Packet::new_checked(payload) else { return f.write_str("IPv6 (malformed or truncated)") };
    if p.version() != 6 {
        return f.write_str("IPv6 (bad version)");
    }
    let ends = Ends { src: p.src_addr().into(), dst: p.dst_addr().into() };
    let mut proto = p.next_header();
    let mut rest = p.payload();
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match proto {
            IpProtocol::HopByHop | IpProtocol::Ipv6Route | IpProtocol::Ipv6Opts => {
                let Ok(h) = Ipv6ExtHeader::new_checked(rest) else {
                    write!(f, "IPv6 {proto} ")?;
                    ends.plain(f)?;
                    return f.write_str(" (malformed extension header)");
                };
                proto = h.next_header();
                // The header is 8 bytes per length unit plus the first 8.
                let skip = (usize::from(h.header_len()) + 1) * 8;
                rest = rest.get(skip..).unwrap_or_default();
            }
            IpProtocol::Ipv6Frag => {
                write!(f, "IPv6 fragment ")?;
                return ends.plain(f);
            }
            _ => return transport(f, "IPv6", proto, ends, rest),
        }
    }
    write!(f, "IPv6 ")?;
    ends.plain(f)?;
    f.write_str(" (too many extension headers)")
}

fn transport(f: &mut fmt::Formatter<'_>, ip: &str, proto: IpProtocol, ends: Ends, payload: &[u8]) -> fmt::Result {
    match proto {
        IpProtocol::Tcp => {
            let Ok(t) = TcpPacket::new_checked(payload) else {
                write!(f, "{ip} TCP ")?;
                ends.plain(f)?;
                return f.write_str(" (malformed or truncated)");
            };
            write!(f, "{ip} TCP ")?;
            ends.ports(f, t.src_port(), t.dst_port())?;
            f.write_str(" [")?;
            let flags = [
                (t.syn(), "SYN"),
                (t.fin(), "FIN"),
                (t.rst(), "RST"),
                (t.psh(), "PSH"),
                (t.ack(), "ACK"),
                (t.urg(), "URG"),
                (t.ece(), "ECE"),
                (t.cwr(), "CWR"),
            ];
            let mut first = true;
            for (_, name) in flags.iter().filter(|(on, _)| *on) {
                if !first {
                    f.write_str(", ")?;
                }
                f.write_str(name)?;
                first = false;
            }
            write!(f, "] seq {}", t.seq_number().0 as u32)?;
            if t.ack() {
                write!(f, " ack {}", t.ack_number().0 as u32)?;
            }
            let data = payload.len().saturating_sub(usize::from(t.header_len()));
            write!(f, " win {} len {data}", t.window_len())
        }
        IpProtocol::Udp => {
            let Ok(u) = UdpPacket::new_checked(payload) else {
                write!(f, "{ip} UDP ")?;
                ends.plain(f)?;
                return f.write_str(" (malformed or truncated)");
            };
            write!(f, "{ip} UDP ")?;
            ends.ports(f, u.src_port(), u.dst_port())?;
            write!(f, " len {}", usize::from(u.len()).saturating_sub(8))?;
            match well_known_udp(u.src_port(), u.dst_port()) {
                Some("DHCP") => match dhcp_kind(u.payload()) {
                    Some(kind) => write!(f, " (DHCP {kind})"),
                    None => f.write_str(" (DHCP)"),
                },
                Some(name) => write!(f, " ({name})"),
                None => Ok(()),
            }
        }
        IpProtocol::Icmp => {
            write!(f, "{ip} ICMP ")?;
            ends.plain(f)?;
            let Ok(i) = Icmpv4Packet::new_checked(payload) else { return f.write_str(" (malformed)") };
            match i.msg_type() {
                m @ (Icmpv4Message::EchoRequest | Icmpv4Message::EchoReply) => {
                    write!(f, " {m} id {} seq {}", i.echo_ident(), i.echo_seq_no())
                }
                Icmpv4Message::Unknown(t) => write!(f, " type {t} code {}", i.msg_code()),
                m => write!(f, " {m} (code {})", i.msg_code()),
            }
        }
        IpProtocol::Icmpv6 => {
            write!(f, "{ip} ICMPv6 ")?;
            ends.plain(f)?;
            let Ok(i) = Icmpv6Packet::new_checked(payload) else { return f.write_str(" (malformed)") };
            match i.msg_type() {
                m @ (Icmpv6Message::EchoRequest | Icmpv6Message::EchoReply) => {
                    write!(f, " {m} id {} seq {}", i.echo_ident(), i.echo_seq_no())
                }
                // check_len covered the target field for these two.
                m @ (Icmpv6Message::NeighborSolicit | Icmpv6Message::NeighborAdvert) => {
                    write!(f, " {m} for {}", i.target_addr())
                }
                Icmpv6Message::Unknown(t) => write!(f, " type {t} code {}", i.msg_code()),
                m => write!(f, " {m}"),
            }
        }
        other => {
            write!(f, "{ip} protocol {} ", u8::from(other))?;
            ends.plain(f)?;
            write!(f, " len {}", payload.len())
        }
    }
}

/// The DHCP message type of a BOOTP payload, read through the same
/// filtering decoder as the client's (only option 53 is kept).
fn dhcp_kind(payload: &[u8]) -> Option<&'static str> {
    let msg = rdnet_wire::dhcp::decode_filtered(payload, |code, len| code == 53 && len == 1)?;
    Some(match msg.opts().msg_type()? {
        MessageType::Discover => "DISCOVER",
        MessageType::Offer => "OFFER",
        MessageType::Request => "REQUEST",
        MessageType::Decline => "DECLINE",
        MessageType::Ack => "ACK",
        MessageType::Nak => "NAK",
        MessageType::Release => "RELEASE",
        MessageType::Inform => "INFORM",
        _ => "message",
    })
}

/// A name for the well-known UDP services of the virtual network.
fn well_known_udp(sport: u16, dport: u16) -> Option<&'static str> {
    let either = |p| sport == p || dport == p;
    if either(67) || either(68) {
        Some("DHCP")
    } else if either(53) {
        Some("DNS")
    } else if either(546) || either(547) {
        Some("DHCPv6")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdnet_wire::frame::build_udp_frame;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        ArpRepr, EthernetAddress, EthernetRepr, Icmpv4Repr, Icmpv6Repr, IpAddress, Ipv4Repr, Ipv6Repr, TcpControl,
        TcpRepr, TcpSeqNumber,
    };
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

    const VM: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];
    const GW: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd];
    const VM_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 2);
    const GW_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 1);

    fn eth(ethertype: EthernetProtocol, payload_len: usize, fill: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let repr = EthernetRepr { src_addr: EthernetAddress(VM), dst_addr: EthernetAddress(GW), ethertype };
        let mut buf = vec![0u8; repr.buffer_len() + payload_len];
        let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
        repr.emit(&mut frame);
        fill(frame.payload_mut());
        buf
    }

    fn ipv4_frame(proto: IpProtocol, l4_len: usize, fill: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let ip = Ipv4Repr { src_addr: VM_IP, dst_addr: GW_IP, next_header: proto, payload_len: l4_len, hop_limit: 64 };
        eth(EthernetProtocol::Ipv4, ip.buffer_len() + l4_len, |b| {
            let mut p = Ipv4Packet::new_unchecked(b);
            ip.emit(&mut p, &ChecksumCapabilities::default());
            fill(p.payload_mut());
        })
    }

    fn tcp_frame(control: TcpControl, ack: Option<u32>, data: &[u8]) -> Vec<u8> {
        let repr = TcpRepr {
            src_port: 41234,
            dst_port: 443,
            control,
            seq_number: TcpSeqNumber(1000),
            ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: 64240,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: data,
        };
        ipv4_frame(IpProtocol::Tcp, repr.buffer_len(), |b| {
            let mut t = TcpPacket::new_unchecked(b);
            repr.emit(&mut t, &IpAddress::Ipv4(VM_IP), &IpAddress::Ipv4(GW_IP), &ChecksumCapabilities::default());
        })
    }

    #[test]
    fn tcp() {
        let syn = tcp_frame(TcpControl::Syn, None, &[]);
        assert_eq!(
            describe(&syn),
            format!(
                "{} bytes IPv4 TCP 192.168.127.2:41234 → 192.168.127.1:443 [SYN] seq 1000 win 64240 len 0",
                syn.len()
            )
        );
        let data = tcp_frame(TcpControl::Psh, Some(77), b"hello");
        assert!(describe(&data).ends_with("[PSH, ACK] seq 1000 ack 77 win 64240 len 5"), "{}", describe(&data));
        let fin = tcp_frame(TcpControl::Fin, Some(5), &[]);
        assert!(describe(&fin).contains("[FIN, ACK]"), "{}", describe(&fin));
        let rst = tcp_frame(TcpControl::Rst, None, &[]);
        assert!(describe(&rst).contains("[RST]"), "{}", describe(&rst));
    }

    #[test]
    fn udp_and_services() {
        let f = build_udp_frame(
            VM,
            [0xff; 6],
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
            &[0u8; 300],
        )
        .unwrap();
        assert_eq!(describe(&f), format!("{} bytes IPv4 UDP 0.0.0.0:68 → 255.255.255.255:67 len 300 (DHCP)", f.len()));
        let mut discover = dhcproto::v4::Message::default();
        discover.opts_mut().insert(dhcproto::v4::DhcpOption::MessageType(MessageType::Discover));
        let payload = dhcproto::Encodable::to_vec(&discover).unwrap();
        let f = build_udp_frame(
            VM,
            [0xff; 6],
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
            &payload,
        )
        .unwrap();
        assert!(describe(&f).ends_with(" (DHCP DISCOVER)"), "{}", describe(&f));
        let dns = build_udp_frame(VM, GW, SocketAddrV4::new(VM_IP, 5353), SocketAddrV4::new(GW_IP, 53), b"q").unwrap();
        assert!(describe(&dns).ends_with("192.168.127.2:5353 → 192.168.127.1:53 len 1 (DNS)"), "{}", describe(&dns));
    }

    #[test]
    fn icmp_echo() {
        let repr = Icmpv4Repr::EchoRequest { ident: 7, seq_no: 2, data: &[0u8; 56] };
        let f = ipv4_frame(IpProtocol::Icmp, repr.buffer_len(), |b| {
            repr.emit(&mut Icmpv4Packet::new_unchecked(b), &ChecksumCapabilities::default())
        });
        assert_eq!(
            describe(&f),
            "98 bytes IPv4 ICMP 192.168.127.2 → 192.168.127.1 echo request id 7 seq 2".to_string()
        );
        let reply = Icmpv4Repr::EchoReply { ident: 7, seq_no: 2, data: &[] };
        let f = ipv4_frame(IpProtocol::Icmp, reply.buffer_len(), |b| {
            reply.emit(&mut Icmpv4Packet::new_unchecked(b), &ChecksumCapabilities::default())
        });
        assert!(describe(&f).ends_with("echo reply id 7 seq 2"), "{}", describe(&f));
    }

    #[test]
    fn arp_request_and_reply() {
        let req = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(GW),
            source_protocol_addr: GW_IP,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: VM_IP,
        };
        let f = eth(EthernetProtocol::Arp, req.buffer_len(), |b| req.emit(&mut ArpPacket::new_unchecked(b)));
        assert_eq!(describe(&f), "42 bytes ARP request who-has 192.168.127.2 tell 192.168.127.1 (5a:94:ef:e4:0c:dd)");
        let rep = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(VM),
            source_protocol_addr: VM_IP,
            target_hardware_addr: EthernetAddress(GW),
            target_protocol_addr: GW_IP,
        };
        let f = eth(EthernetProtocol::Arp, rep.buffer_len(), |b| rep.emit(&mut ArpPacket::new_unchecked(b)));
        assert_eq!(
            describe(&f),
            "42 bytes ARP reply 192.168.127.2 is-at 5a:94:ef:e4:0c:ee to 192.168.127.1 (5a:94:ef:e4:0c:dd)"
        );
    }

    #[test]
    fn ipv6_icmp_through_hop_by_hop() {
        let src = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        let icmp = Icmpv6Repr::EchoRequest { ident: 1, seq_no: 9, data: b"x" };
        // Hop-by-Hop (8 bytes: next header ICMPv6, length 0, PadN) then ICMPv6.
        let l4 = 8 + icmp.buffer_len();
        let ip =
            Ipv6Repr { src_addr: src, dst_addr: dst, next_header: IpProtocol::HopByHop, payload_len: l4, hop_limit: 1 };
        let f = eth(EthernetProtocol::Ipv6, ip.buffer_len() + l4, |b| {
            let mut p = Ipv6Packet::new_unchecked(b);
            ip.emit(&mut p);
            let pl = p.payload_mut();
            pl[..8].copy_from_slice(&[58, 0, 1, 4, 0, 0, 0, 0]);
            icmp.emit(&src, &dst, &mut Icmpv6Packet::new_unchecked(&mut pl[8..]), &ChecksumCapabilities::default());
        });
        assert!(describe(&f).ends_with("IPv6 ICMPv6 fe80::1 → ff02::1 echo request id 1 seq 9"), "{}", describe(&f));
    }

    #[test]
    fn ipv6_udp_in_brackets() {
        let src = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
        let dst = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
        let ip = Ipv6Repr { src_addr: src, dst_addr: dst, next_header: IpProtocol::Udp, payload_len: 8, hop_limit: 64 };
        let f = eth(EthernetProtocol::Ipv6, ip.buffer_len() + 8, |b| {
            let mut p = Ipv6Packet::new_unchecked(b);
            ip.emit(&mut p);
            p.payload_mut().copy_from_slice(&[0x13, 0x88, 0, 53, 0, 8, 0, 0]);
        });
        assert!(describe(&f).ends_with("IPv6 UDP [fd00::2]:5000 → [fd00::1]:53 len 0 (DNS)"), "{}", describe(&f));
    }

    #[test]
    fn other_ethertypes_and_protocols() {
        let f = eth(EthernetProtocol::Unknown(0x88b5), 4, |_| {});
        assert_eq!(describe(&f), "18 bytes ethertype 0x88b5 5a:94:ef:e4:0c:ee → 5a:94:ef:e4:0c:dd");
        let gre = ipv4_frame(IpProtocol::Unknown(47), 4, |_| {});
        assert!(describe(&gre).ends_with("IPv4 protocol 47 192.168.127.2 → 192.168.127.1 len 4"), "{}", describe(&gre));
    }

    #[test]
    fn fragments() {
        let mut f = ipv4_frame(IpProtocol::Udp, 16, |b| b[..8].copy_from_slice(&[0, 1, 0, 2, 0, 100, 0, 0]));
        // A later fragment: offset 185 * 8 bytes.
        let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
        p.set_frag_offset(1480);
        assert!(
            describe(&f).ends_with("IPv4 UDP 192.168.127.2 → 192.168.127.1 fragment id 0 offset 1480"),
            "{}",
            describe(&f)
        );
    }

    #[test]
    fn malformed_and_truncated_frames_never_panic() {
        assert_eq!(describe(&[]), "0 bytes (shorter than an Ethernet header)");
        assert_eq!(describe(&[0u8; 13]), "13 bytes (shorter than an Ethernet header)");
        let good = [
            tcp_frame(TcpControl::Syn, None, b"abc"),
            build_udp_frame(VM, GW, SocketAddrV4::new(VM_IP, 1), SocketAddrV4::new(GW_IP, 2), b"xy").unwrap(),
        ];
        // Every truncation of a valid frame.
        for g in &good {
            for len in 0..g.len() {
                let _ = describe(&g[..len]);
            }
        }
        let ip = describe(&good[0][..30]);
        assert!(ip.ends_with("IPv4 (malformed or truncated)"), "{ip}");
        // Random bit flips and garbage, including huge header-length fields.
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..50_000 {
            let mut f = good[i % 2].clone();
            for _ in 0..(1 + next() % 6) {
                let at = (next() as usize) % f.len();
                f[at] = next() as u8;
            }
            if i % 4 == 0 {
                f.truncate((next() as usize) % (f.len() + 1));
            }
            // Steer some at IPv6, ARP and the IPv6 extension walk.
            match i % 7 {
                1 if f.len() > 14 => f[12..14].copy_from_slice(&[0x86, 0xdd]),
                2 if f.len() > 14 => f[12..14].copy_from_slice(&[0x08, 0x06]),
                3 if f.len() > 20 => {
                    f[12..14].copy_from_slice(&[0x86, 0xdd]);
                    f[14] = 0x60;
                    f[20] = 0;
                }
                _ => {}
            }
            let s = describe(&f);
            assert!(s.starts_with(&format!("{} bytes ", f.len())));
            assert!(!s.contains('{') && !s.contains("Packet"), "no debug output: {s}");
        }
    }
}
