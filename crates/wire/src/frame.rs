//! Ethernet/IPv4/UDP frames and the TCP header fields the gateway touches,
//! for both ends of the link (the gateway in `rdnet-vnet`, the DHCP client
//! and tracer in `rdnet-guest`): one copy of each helper.
//!
//! Builders write into a caller's buffer (so a hot path reuses one
//! allocation); parsers take untrusted bytes, check lengths and checksums
//! with `smoltcp::wire`'s checked accessors and return `None`, never panic.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, IpRepr, Ipv4Packet,
    Ipv4Repr, TcpPacket, TcpRepr, UdpPacket, UdpRepr,
};

pub use crate::mac::Mac;

pub const ETH_HEADER: usize = 14;
pub const IPV4_HEADER: usize = 20;
pub const IPV6_HEADER: usize = 40;
pub const UDP_HEADER: usize = 8;
/// Largest UDP payload that still fits in a 65535-byte frame.
pub const MAX_UDP_PAYLOAD: usize = u16::MAX as usize - ETH_HEADER - IPV4_HEADER - UDP_HEADER;

pub const BROADCAST_MAC: Mac = [0xff; 6];
pub const DHCP_CLIENT_PORT: u16 = 68;
pub const DHCP_SERVER_PORT: u16 = 67;

/// Writes an Ethernet header and `payload_len` bytes filled by `fill`.
pub fn ethernet(
    out: &mut Vec<u8>,
    src: EthernetAddress,
    dst: EthernetAddress,
    ethertype: EthernetProtocol,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) {
    out.clear();
    out.resize(ETH_HEADER + payload_len, 0);
    let mut frame = EthernetFrame::new_unchecked(&mut out[..]);
    EthernetRepr { src_addr: src, dst_addr: dst, ethertype }.emit(&mut frame);
    fill(frame.payload_mut());
}

/// Ethernet + IPv4 around an IP payload of `payload_len` bytes.
pub fn ipv4(
    out: &mut Vec<u8>,
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    ip: &Ipv4Repr,
    fill: impl FnOnce(&mut [u8]),
) {
    ethernet(out, src_mac, dst_mac, EthernetProtocol::Ipv4, IPV4_HEADER + ip.payload_len, |buf| {
        let mut pkt = Ipv4Packet::new_unchecked(buf);
        ip.emit(&mut pkt, &ChecksumCapabilities::default());
        fill(pkt.payload_mut());
    });
}

/// An IP packet (of the family of `src` and `dst`) holding `tcp`, every
/// checksum complete: the segments the tests and fuzz targets play a
/// guest's TCP with.
pub fn ip_tcp_packet(src: IpAddress, dst: IpAddress, tcp: &TcpRepr) -> Vec<u8> {
    let ip = IpRepr::new(src, dst, IpProtocol::Tcp, tcp.buffer_len(), 64);
    let header = ip.header_len();
    let mut packet = vec![0u8; header + tcp.buffer_len()];
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut packet[..], &caps);
    tcp.emit(&mut TcpPacket::new_unchecked(&mut packet[header..]), &src, &dst, &caps);
    packet
}

/// A complete Ethernet/IPv4/UDP frame.
pub fn udp(
    out: &mut Vec<u8>,
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) {
    let ip = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Udp,
        payload_len: UDP_HEADER + payload.len(),
        hop_limit: 64,
    };
    ipv4(out, src_mac, dst_mac, &ip, |buf| {
        let mut pkt = UdpPacket::new_unchecked(buf);
        UdpRepr { src_port: src.port(), dst_port: dst.port() }.emit(
            &mut pkt,
            &IpAddress::Ipv4(*src.ip()),
            &IpAddress::Ipv4(*dst.ip()),
            payload.len(),
            |p| p.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        );
    });
}

/// Parses an IPv4/UDP packet (no Ethernet header) into its endpoints and
/// payload, checking lengths and checksums.
pub fn parse_udp_ip(ip_bytes: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, &[u8])> {
    let ip = Ipv4Packet::new_checked(ip_bytes).ok()?;
    let repr = Ipv4Repr::parse(&ip, &ChecksumCapabilities::default()).ok()?;
    if repr.next_header != IpProtocol::Udp {
        return None;
    }
    let hl = ip.header_len() as usize;
    let payload = ip_bytes.get(hl..hl + repr.payload_len)?;
    let udp = UdpPacket::new_checked(payload).ok()?;
    UdpRepr::parse(
        &udp,
        &IpAddress::Ipv4(repr.src_addr),
        &IpAddress::Ipv4(repr.dst_addr),
        &ChecksumCapabilities::default(),
    )
    .ok()?;
    let data = payload.get(UDP_HEADER..udp.len() as usize)?;
    Some((SocketAddrV4::new(repr.src_addr, udp.src_port()), SocketAddrV4::new(repr.dst_addr, udp.dst_port()), data))
}

/// Whether an IP packet (either version) is a TCP segment with SYN set
/// (unchecked: any malformed packet is simply not one).
pub fn is_tcp_syn(packet: &[u8]) -> bool {
    tcp_offset(packet).and_then(|hl| packet.get(hl + 13)).is_some_and(|flags| flags & 0x02 != 0)
}

/// Where the TCP header of an IP packet starts, if the packet says it is
/// IPv4 carrying TCP with a header length no shorter than the minimum, or
/// IPv6 whose fixed header is followed by TCP.
fn tcp_offset(packet: &[u8]) -> Option<usize> {
    let first = *packet.first()?;
    match first >> 4 {
        4 => {
            let hl = usize::from(first & 0x0f) * 4;
            (hl >= IPV4_HEADER && packet.get(9) == Some(&6)).then_some(hl)
        }
        6 => (packet.get(6) == Some(&6)).then_some(IPV6_HEADER),
        _ => None,
    }
}

/// Sets the MSS option of the TCP segment in an IP packet to `mss`, if
/// it has one. The checksum is left alone: smoltcp does not verify it.
pub fn set_tcp_mss(packet: &mut [u8], mss: u16) {
    rewrite_tcp_mss(packet, |_| mss);
}

/// Lowers the MSS option of the TCP segment in an IP packet to `max` if
/// it is above (a peer announcing more than its link carries).
pub fn clamp_tcp_mss(packet: &mut [u8], max: u16) {
    rewrite_tcp_mss(packet, |mss| mss.min(max));
}

/// Replaces the value of the MSS option, if there is one, with `f(value)`.
fn rewrite_tcp_mss(packet: &mut [u8], f: impl FnOnce(u16) -> u16) {
    let Some(ip_hl) = tcp_offset(packet) else { return };
    let Some(tcp_hl) = packet.get(ip_hl + 12).map(|b| usize::from(b >> 4) * 4) else { return };
    let Some(options) = packet.get_mut(ip_hl + 20..ip_hl + tcp_hl) else { return };
    let mut i = 0;
    while i < options.len() {
        match options[i] {
            0 => return,
            1 => i += 1,
            kind => {
                let Some(&len) = options.get(i + 1) else { return };
                let len = usize::from(len);
                if len < 2 || i + len > options.len() {
                    return;
                }
                if kind == 2 && len == 4 {
                    let mss = f(u16::from_be_bytes([options[i + 2], options[i + 3]]));
                    options[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
                    return;
                }
                i += len;
            }
        }
    }
}

/// Builds an Ethernet II / IPv4 (TTL 64, no options) / UDP frame with both
/// checksums filled in, in a new buffer. `None` if the payload cannot fit in
/// one frame.
pub fn build_udp_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Option<Vec<u8>> {
    if payload.len() > MAX_UDP_PAYLOAD {
        return None;
    }
    let mut buf = Vec::with_capacity(ETH_HEADER + IPV4_HEADER + UDP_HEADER + payload.len());
    udp(&mut buf, EthernetAddress(src_mac), EthernetAddress(dst_mac), src, dst, payload);
    Some(buf)
}

/// A parsed Ethernet/IPv4/UDP datagram, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFrame<'a> {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: &'a [u8],
}

/// Parses an Ethernet/IPv4/UDP frame, verifying the IPv4 header checksum and
/// the UDP checksum (a zero UDP checksum means "none", as IPv4 allows).
/// Other protocols and malformed frames give `None`; Ethernet padding is
/// ignored.
pub fn parse_udp(frame: &[u8]) -> Option<UdpFrame<'_>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let (src, dst, payload) = parse_udp_ip(frame.get(ETH_HEADER..)?)?;
    Some(UdpFrame { src_mac: eth.src_addr().0, dst_mac: eth.dst_addr().0, src, dst, payload })
}

/// A cheap classification (no checksums): is this an IPv4/UDP frame to port
/// 68 addressed to `mac` or to the Ethernet broadcast address? That is what
/// vm-switch hands to its DHCP client instead of the tap.
pub fn is_dhcp_client_frame(frame: &[u8], mac: &Mac) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    let dst = eth.dst_addr().0;
    if eth.ethertype() != EthernetProtocol::Ipv4 || (dst != *mac && dst != BROADCAST_MAC) {
        return false;
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return false;
    };
    if ip.version() != 4 || ip.next_header() != IpProtocol::Udp || ip.frag_offset() != 0 {
        return false;
    }
    UdpPacket::new_checked(ip.payload()).is_ok_and(|udp| udp.dst_port() == DHCP_CLIENT_PORT)
}

/// The source MAC of an Ethernet frame, if it has a header.
pub fn src_mac(frame: &[u8]) -> Option<Mac> {
    EthernetFrame::new_checked(frame).ok().map(|f| f.src_addr().0)
}

/// Returns whether `addr` can be a unicast host address.
pub fn is_unicast(addr: Ipv4Addr) -> bool {
    !(addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_round_trip() {
        let mut buf = Vec::new();
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 53);
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 4000);
        let m1 = EthernetAddress([2, 0, 0, 0, 0, 1]);
        udp(&mut buf, m1, EthernetAddress::BROADCAST, a, b, b"hello");
        let p = parse_udp(&buf).unwrap();
        assert_eq!((p.src_mac, p.dst_mac, p.src, p.dst, p.payload), (m1.0, BROADCAST_MAC, a, b, &b"hello"[..]));
        // A flipped payload bit breaks the UDP checksum.
        let last = buf.len() - 1;
        buf[last] ^= 1;
        assert!(parse_udp(&buf).is_none());
        for cut in 0..buf.len() {
            let _ = parse_udp(&buf[..cut]);
        }
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const RST: u8 = 0x04;

    /// An IPv4/TCP packet (20-byte IP header, protocol 6) with `flags`,
    /// `options` (a multiple of 4 bytes) and `payload`.
    fn tcp_packet(flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0);
        let total = IPV4_HEADER + 20 + options.len() + payload.len();
        let mut p = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend_from_slice(&[192, 168, 127, 2, 192, 168, 127, 254]);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&80u16.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
        p.push((((20 + options.len()) / 4) as u8) << 4);
        p.push(flags);
        p.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
        p.extend_from_slice(options);
        p.extend_from_slice(payload);
        assert_eq!(p.len(), total);
        p
    }

    /// Where the TCP options of a [`tcp_packet`] lie.
    fn options_range(packet: &[u8]) -> std::ops::Range<usize> {
        IPV4_HEADER + 20..IPV4_HEADER + usize::from(packet[IPV4_HEADER + 12] >> 4) * 4
    }

    /// The indices at which `a` and `b` (of one length) differ.
    fn changed(a: &[u8], b: &[u8]) -> Vec<usize> {
        assert_eq!(a.len(), b.len());
        (0..a.len()).filter(|&i| a[i] != b[i]).collect()
    }

    #[test]
    fn is_tcp_syn_sees_syn_only() {
        assert!(is_tcp_syn(&tcp_packet(SYN, &[], &[])));
        assert!(is_tcp_syn(&tcp_packet(SYN | ACK, &[], &[])));
        assert!(is_tcp_syn(&tcp_packet(SYN, &[2, 4, 5, 0xb4], b"data")));
        for flags in [0, ACK, RST, RST | ACK, 0x01 /* FIN */, 0x18 /* PSH|ACK */, !SYN] {
            assert!(!is_tcp_syn(&tcp_packet(flags, &[], &[])), "flags {flags:#x}");
        }
        // An IP header with options: the flags are found behind it.
        let mut with_ip_options = tcp_packet(ACK, &[], &[]);
        with_ip_options[0] = 0x46;
        with_ip_options.splice(IPV4_HEADER..IPV4_HEADER, [1, 1, 1, 0]);
        assert!(!is_tcp_syn(&with_ip_options));
        with_ip_options[24 + 13] = SYN;
        assert!(is_tcp_syn(&with_ip_options));
    }

    #[test]
    fn is_tcp_syn_refuses_what_is_not_a_tcp_segment() {
        let syn = tcp_packet(SYN, &[], &[]);
        // The same bytes in a UDP or ICMP packet are not a SYN.
        for proto in [17u8, 1] {
            let mut p = syn.clone();
            p[9] = proto;
            assert!(!is_tcp_syn(&p), "protocol {proto}");
        }
        // Not IPv4, or a header length below the minimum.
        let mut v6 = syn.clone();
        v6[0] = 0x65;
        assert!(!is_tcp_syn(&v6));
        for ihl in 0..5u8 {
            let mut p = syn.clone();
            p[0] = 0x40 | ihl;
            p[ihl as usize * 4 + 13] = SYN;
            assert!(!is_tcp_syn(&p), "ihl {ihl}");
        }
        // Cut anywhere before the flags byte: not a SYN, and no panic.
        for cut in 0..=IPV4_HEADER + 13 {
            assert!(!is_tcp_syn(&syn[..cut]), "cut at {cut}");
        }
        assert!(is_tcp_syn(&syn[..IPV4_HEADER + 14]));
    }

    #[test]
    fn set_tcp_mss_rewrites_the_mss_option_wherever_it_is() {
        let ts = [8, 10, 1, 2, 3, 4, 5, 6, 7, 8];
        // Linux's order: MSS first, then SACK-permitted, timestamps, NOP, window scale.
        let mut linux = vec![2, 4, 0x05, 0xb4, 4, 2];
        linux.extend_from_slice(&ts);
        linux.extend_from_slice(&[1, 3, 3, 7]);
        // MSS after NOPs and timestamps.
        let mut late = vec![1, 1];
        late.extend_from_slice(&ts);
        late.extend_from_slice(&[2, 4, 0x05, 0xb4]);
        // After a window scale, SACK-permitted and padding NOPs.
        let late2 = [3, 3, 7, 1, 4, 2, 1, 1, 2, 4, 0x05, 0xb4];
        for (options, at) in [(&linux[..], 0), (&late[..], 12), (&late2[..], 8)] {
            for flags in [SYN, SYN | ACK] {
                let before = tcp_packet(flags, options, b"payload");
                let mut p = before.clone();
                set_tcp_mss(&mut p, 65_443);
                let mss_at = IPV4_HEADER + 20 + at + 2;
                assert_eq!(&p[mss_at..mss_at + 2], &65_443u16.to_be_bytes(), "{options:?}");
                // Nothing else moved, not even the checksum.
                assert!(changed(&before, &p).iter().all(|&i| i == mss_at || i == mss_at + 1), "{options:?}");
            }
        }
    }

    #[test]
    fn set_tcp_mss_without_an_mss_option_changes_nothing() {
        let cases: [(&[u8], &[u8]); 7] = [
            (&[], &[]),
            // No options, but a payload that looks like an MSS option.
            (&[], &[2, 4, 0x05, 0xb4]),
            (&[1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8], &[2, 4, 0, 0]),
            // An MSS option after the end-of-options marker does not count.
            (&[0, 0, 0, 0, 2, 4, 0x05, 0xb4], &[]),
            (&[1, 0, 2, 4, 0x05, 0xb4, 0, 0], &[]),
            // Kind 2 with a length other than 4 is not an MSS option.
            (&[2, 3, 0x05, 1, 1, 1, 1, 1], &[]),
            (&[2, 6, 0x05, 0xb4, 0, 0, 1, 1], &[]),
        ];
        for (options, payload) in cases {
            let before = tcp_packet(SYN, options, payload);
            let mut p = before.clone();
            set_tcp_mss(&mut p, 9000);
            assert_eq!(p, before, "options {options:?} payload {payload:?}");
        }
    }

    #[test]
    fn set_tcp_mss_survives_hostile_options() {
        // Lengths that run past the end, are 0 or 1, or an option cut after
        // its kind: nothing is written and nothing panics.
        let cases: [&[u8]; 8] = [
            &[2, 0, 0, 0],
            &[3, 1, 2, 4, 0x05, 0xb4, 0, 0],
            &[1, 1, 1, 2],
            &[1, 1, 2, 4],
            &[1, 1, 8, 10],
            &[8, 255, 2, 4, 0x05, 0xb4, 1, 1],
            &[1, 1, 1, 1, 1, 1, 1, 8],
            &[1, 1, 1, 1, 1, 1, 2, 4],
        ];
        for options in cases {
            // The payload holds an MSS-looking option right after the header.
            let before = tcp_packet(SYN, options, &[0x05, 0xb4, 2, 4, 0x05, 0xb4]);
            let mut p = before.clone();
            set_tcp_mss(&mut p, 9000);
            assert_eq!(p, before, "{options:?}");
        }
        // A data offset that points past the packet, or below the header.
        let mut p = tcp_packet(SYN, &[2, 4, 0x05, 0xb4], &[]);
        let original = p.clone();
        for offset in (0..6).chain(7..16) {
            p[IPV4_HEADER + 12] = offset << 4;
            let before = p.clone();
            set_tcp_mss(&mut p, 9000);
            assert_eq!(p, before, "data offset {offset}");
        }
        // An IP header length that is too small or lies past the packet.
        for ihl in (0..5).chain(6..16) {
            let mut q = original.clone();
            q[0] = 0x40 | ihl;
            let before = q.clone();
            set_tcp_mss(&mut q, 9000);
            assert!(changed(&before, &q).is_empty(), "ihl {ihl}");
        }
        // Every truncation of a SYN with options: no panic, and whatever is
        // written lies in the two MSS bytes.
        let mut options = vec![1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8, 2, 4, 0x05, 0xb4];
        options.extend_from_slice(&[4, 2, 1, 1]);
        let full = tcp_packet(SYN, &options, b"payload");
        let mss_at = IPV4_HEADER + 20 + 14;
        for cut in 0..full.len() {
            let mut p = full[..cut].to_vec();
            set_tcp_mss(&mut p, 9000);
            assert!(changed(&full[..cut], &p).iter().all(|&i| i == mss_at || i == mss_at + 1), "cut at {cut}");
        }
    }

    #[test]
    fn set_tcp_mss_writes_only_inside_the_options_of_random_segments() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..50_000 {
            let words = (next() % 11) as usize;
            let mut options: Vec<u8> = (0..words * 4).map(|_| next() as u8).collect();
            // Small kinds and lengths more often than uniform noise would.
            for b in options.iter_mut() {
                if next() % 2 == 0 {
                    *b %= 6;
                }
            }
            let payload: Vec<u8> = (0..next() % 8).map(|_| next() as u8).collect();
            let mut p = tcp_packet(SYN, &options, &payload);
            if next() % 4 == 0 {
                // A lying data offset: the options are what it says.
                p[IPV4_HEADER + 12] = (next() as u8) & 0xf0;
            }
            let range = options_range(&p);
            let cut = if next() % 4 == 0 { (next() as usize) % (p.len() + 1) } else { p.len() };
            p.truncate(cut);
            let truncated = p.clone();
            set_tcp_mss(&mut p, 0xabcd);
            let diff = changed(&truncated, &p);
            assert!(diff.len() <= 2, "{diff:?} in {truncated:?}");
            assert!(diff.iter().all(|i| range.contains(i)), "{diff:?} outside {range:?} in {truncated:?}");
        }
    }

    #[test]
    fn clamp_lowers_an_mss_above_the_cap_only() {
        // IPv4 (IHL 5) + TCP with data offset 6: one MSS option.
        let packet = |mss: u16| {
            let mut p = vec![0u8; 44];
            p[0] = 0x45;
            p[9] = 6;
            p[20 + 12] = 6 << 4;
            p[20 + 13] = 0x02;
            p[40..44].copy_from_slice(&[2, 4, (mss >> 8) as u8, mss as u8]);
            p
        };
        let mut high = packet(60_000);
        clamp_tcp_mss(&mut high, 1460);
        assert_eq!(high, packet(1460));
        let mut low = packet(536);
        clamp_tcp_mss(&mut low, 1460);
        assert_eq!(low, packet(536));
    }

    #[test]
    fn ipv6_syns_are_found_and_their_mss_clamped() {
        // IPv6 (next header TCP) + TCP with data offset 6: one MSS option.
        let packet = |next_header: u8, mss: u16| {
            let mut p = vec![0u8; 64];
            p[0] = 0x60;
            p[6] = next_header;
            p[40 + 12] = 6 << 4;
            p[40 + 13] = 0x02;
            p[60..64].copy_from_slice(&[2, 4, (mss >> 8) as u8, mss as u8]);
            p
        };
        assert!(is_tcp_syn(&packet(6, 1440)));
        // An extension header before TCP: not taken for a segment.
        assert!(!is_tcp_syn(&packet(0, 1440)));
        let mut high = packet(6, 60_000);
        clamp_tcp_mss(&mut high, 1440);
        assert_eq!(high, packet(6, 1440));
        let mut other = packet(17, 60_000);
        clamp_tcp_mss(&mut other, 1440);
        assert_eq!(other, packet(17, 60_000));
        for cut in 0..=IPV6_HEADER + 13 {
            assert!(!is_tcp_syn(&packet(6, 1)[..cut]), "cut at {cut}");
        }
    }

    const MAC: Mac = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];

    #[test]
    fn build_then_parse_round_trip() {
        let src = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
        let dst = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
        let frame = build_udp_frame(MAC, BROADCAST_MAC, src, dst, b"hello").unwrap();
        assert_eq!(frame.len(), 14 + 20 + 8 + 5);
        let p = parse_udp(&frame).unwrap();
        assert_eq!((p.src_mac, p.dst_mac, p.src, p.dst, p.payload), (MAC, BROADCAST_MAC, src, dst, &b"hello"[..]));
        assert!(!is_dhcp_client_frame(&frame, &MAC), "to port 67, not 68");

        let from = SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 1), 67);
        let to = SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 2), 68);
        let reply = build_udp_frame([2, 0, 0, 0, 0, 1], MAC, from, to, b"x").unwrap();
        assert!(is_dhcp_client_frame(&reply, &MAC));
        assert!(!is_dhcp_client_frame(&reply, &[2, 0, 0, 0, 0, 9]));
        assert_eq!(src_mac(&reply), Some([2, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn ethernet_padding_is_ignored() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 67);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 68);
        let mut frame = build_udp_frame(MAC, MAC, src, dst, b"a").unwrap();
        frame.resize(60, 0);
        assert_eq!(parse_udp(&frame).unwrap().payload, b"a");
    }

    #[test]
    fn corrupted_checksums_are_rejected() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 67);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 68);
        let frame = build_udp_frame(MAC, MAC, src, dst, b"payload").unwrap();
        let mut bad_ip = frame.clone();
        bad_ip[14 + 10] ^= 0xff;
        assert!(parse_udp(&bad_ip).is_none());
        let mut bad_udp = frame.clone();
        *bad_udp.last_mut().unwrap() ^= 0xff;
        assert!(parse_udp(&bad_udp).is_none());
        // A zero UDP checksum means "not computed".
        let mut no_sum = frame.clone();
        no_sum[14 + 20 + 6] = 0;
        no_sum[14 + 20 + 7] = 0;
        assert!(parse_udp(&no_sum).is_some());
    }

    #[test]
    fn oversized_payload_is_refused() {
        let a = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1);
        assert!(build_udp_frame(MAC, MAC, a, a, &vec![0; MAX_UDP_PAYLOAD]).is_some());
        assert!(build_udp_frame(MAC, MAC, a, a, &vec![0; MAX_UDP_PAYLOAD + 1]).is_none());
    }

    #[test]
    fn garbage_never_panics() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 67);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 68);
        let good = build_udp_frame(MAC, MAC, src, dst, &[7; 40]).unwrap();
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for len in 0..good.len() {
            let _ = parse_udp(&good[..len]);
            let _ = is_dhcp_client_frame(&good[..len], &MAC);
            let _ = src_mac(&good[..len]);
        }
        for _ in 0..20_000 {
            let mut f = good.clone();
            for _ in 0..(next() % 6) {
                let i = (next() as usize) % f.len();
                f[i] = next() as u8;
            }
            f.truncate((next() as usize) % (good.len() + 1));
            let _ = parse_udp(&f);
            let _ = is_dhcp_client_frame(&f, &MAC);
        }
    }
}
