//! Building the frames the gateway sends. Pure functions into a caller's
//! buffer (so the hot path reuses one allocation), on `smoltcp::wire`.

use std::net::SocketAddrV4;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    UdpPacket, UdpRepr,
};

pub const ETH_HEADER: usize = 14;
pub const IPV4_HEADER: usize = 20;
pub const UDP_HEADER: usize = 8;

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

/// Parses an Ethernet/IPv4/UDP frame; `None` for anything else or anything
/// malformed (bad lengths, bad checksums).
pub fn parse_udp(frame: &[u8]) -> Option<(EthernetAddress, SocketAddrV4, SocketAddrV4, &[u8])> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let (src, dst, data) = parse_udp_ip(frame.get(ETH_HEADER..)?)?;
    Some((eth.src_addr(), src, dst, data))
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

/// Whether an IPv4 packet is a TCP segment with SYN set (unchecked: any
/// malformed packet is simply not one).
pub fn is_tcp_syn(packet: &[u8]) -> bool {
    let hl = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
    packet.get(hl + 13).is_some_and(|flags| flags & 0x02 != 0)
}

/// Sets the MSS option of the TCP segment in an IPv4 packet to `mss`, if
/// it has one. The checksum is left alone: smoltcp does not verify it.
pub fn set_tcp_mss(packet: &mut [u8], mss: u16) {
    let ip_hl = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
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
                    options[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
                    return;
                }
                i += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn udp_round_trip() {
        let mut buf = Vec::new();
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 53);
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 4000);
        let m1 = EthernetAddress([2, 0, 0, 0, 0, 1]);
        udp(&mut buf, m1, EthernetAddress::BROADCAST, a, b, b"hello");
        let (mac, src, dst, data) = parse_udp(&buf).unwrap();
        assert_eq!((mac, src, dst, data), (m1, a, b, &b"hello"[..]));
        // A flipped payload bit breaks the UDP checksum.
        let last = buf.len() - 1;
        buf[last] ^= 1;
        assert!(parse_udp(&buf).is_none());
        for cut in 0..buf.len() {
            let _ = parse_udp(&buf[..cut]);
        }
    }
}
