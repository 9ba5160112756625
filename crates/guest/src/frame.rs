//! Small, pure Ethernet/IPv4/UDP helpers for the guest side: building the
//! DHCP client's frames, parsing the server's replies, and telling cheaply
//! whether a frame from the link is a DHCP reply meant for us.
//!
//! Everything here works on byte slices, is built on `smoltcp::wire`'s
//! checked accessors, and returns `None` instead of panicking on any input.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    UdpPacket, UdpRepr,
};

/// A MAC address.
pub type Mac = [u8; 6];

pub const BROADCAST_MAC: Mac = [0xff; 6];
pub const DHCP_CLIENT_PORT: u16 = 68;
pub const DHCP_SERVER_PORT: u16 = 67;

const ETH_HEADER_LEN: usize = 14;
const IPV4_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
/// Largest UDP payload that still fits in a 65535-byte frame.
pub const MAX_UDP_PAYLOAD: usize = u16::MAX as usize - ETH_HEADER_LEN - IPV4_HEADER_LEN - UDP_HEADER_LEN;

/// Parses `5a:94:ef:e4:0c:ee` (also `-` separated, any case).
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(mac)
}

/// Displays a MAC as `5a:94:ef:e4:0c:ee`.
pub use rdnet_wire::MacDisplay;

/// A parsed Ethernet/IPv4/UDP datagram, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFrame<'a> {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: &'a [u8],
}

/// Builds an Ethernet II / IPv4 (TTL 64, no options) / UDP frame with both
/// checksums filled in. `None` if the payload cannot fit in one frame.
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
    let caps = ChecksumCapabilities::default();
    let udp_len = UDP_HEADER_LEN + payload.len();
    let mut buf = vec![0u8; ETH_HEADER_LEN + IPV4_HEADER_LEN + udp_len];

    let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
    EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);

    let ip_repr = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: 64,
    };
    let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip_repr.emit(&mut ip, &caps);

    let mut udp = UdpPacket::new_unchecked(ip.payload_mut());
    UdpRepr { src_port: src.port(), dst_port: dst.port() }.emit(
        &mut udp,
        &IpAddress::Ipv4(*src.ip()),
        &IpAddress::Ipv4(*dst.ip()),
        payload.len(),
        |p| p.copy_from_slice(payload),
        &caps,
    );
    Some(buf)
}

/// Parses an Ethernet/IPv4/UDP frame, verifying the IPv4 header checksum and
/// the UDP checksum (a zero UDP checksum means "none", as IPv4 allows).
/// Fragments, other protocols and malformed frames give `None`.
pub fn parse_udp_frame(frame: &[u8]) -> Option<UdpFrame<'_>> {
    let caps = ChecksumCapabilities::default();
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let (src_mac, dst_mac) = (eth.src_addr().0, eth.dst_addr().0);
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let ip_repr = Ipv4Repr::parse(&ip, &caps).ok()?;
    if ip_repr.next_header != IpProtocol::Udp {
        return None;
    }
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    let (src_ip, dst_ip) = (IpAddress::Ipv4(ip_repr.src_addr), IpAddress::Ipv4(ip_repr.dst_addr));
    let udp_repr = UdpRepr::parse(&udp, &src_ip, &dst_ip, &caps).ok()?;
    let payload = udp.payload();
    Some(UdpFrame {
        src_mac,
        dst_mac,
        src: SocketAddrV4::new(ip_repr.src_addr, udp_repr.src_port),
        dst: SocketAddrV4::new(ip_repr.dst_addr, udp_repr.dst_port),
        payload,
    })
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

    const MAC: Mac = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];

    #[test]
    fn mac_parse_and_display() {
        assert_eq!(parse_mac("5a:94:ef:e4:0c:ee"), Some(MAC));
        assert_eq!(parse_mac("5A-94-EF-E4-0C-EE"), Some(MAC));
        assert_eq!(MacDisplay(MAC).to_string(), "5a:94:ef:e4:0c:ee");
        for bad in ["", "5a:94:ef:e4:0c", "5a:94:ef:e4:0c:ee:00", "5a:94:ef:e4:0c:zz", "5a:94:ef:e4:0c:eee", "::::"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn build_then_parse_round_trip() {
        let src = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
        let dst = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
        let frame = build_udp_frame(MAC, BROADCAST_MAC, src, dst, b"hello").unwrap();
        assert_eq!(frame.len(), 14 + 20 + 8 + 5);
        let p = parse_udp_frame(&frame).unwrap();
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
        assert_eq!(parse_udp_frame(&frame).unwrap().payload, b"a");
    }

    #[test]
    fn corrupted_checksums_are_rejected() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 67);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 68);
        let frame = build_udp_frame(MAC, MAC, src, dst, b"payload").unwrap();
        let mut bad_ip = frame.clone();
        bad_ip[14 + 10] ^= 0xff;
        assert!(parse_udp_frame(&bad_ip).is_none());
        let mut bad_udp = frame.clone();
        *bad_udp.last_mut().unwrap() ^= 0xff;
        assert!(parse_udp_frame(&bad_udp).is_none());
        // A zero UDP checksum means "not computed".
        let mut no_sum = frame.clone();
        no_sum[14 + 20 + 6] = 0;
        no_sum[14 + 20 + 7] = 0;
        assert!(parse_udp_frame(&no_sum).is_some());
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
            let _ = parse_udp_frame(&good[..len]);
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
            let _ = parse_udp_frame(&f);
            let _ = is_dhcp_client_frame(&f, &MAC);
        }
    }
}
