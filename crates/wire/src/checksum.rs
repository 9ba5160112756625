//! The Internet checksum (RFC 1071), fast enough for 64 KiB segments.
//!
//! smoltcp's and etherparse's routines add 16- or 64-bit words one at a
//! time through a carry chain; on the offload path (a checksum per 64 KiB
//! segment) that was a fifth of vm-switch's time. Summing 32-bit words into
//! a 64-bit accumulator needs no carry handling until the end (a 64 KiB
//! buffer adds at most 2^14 words below 2^32) and the compiler vectorizes
//! it. Sums are in native byte order, as RFC 1071 allows: store results
//! with `to_ne_bytes`.

/// The ones' complement sum of `data` (padded with a zero byte if odd),
/// folded to 16 bits, not complemented, in native byte order.
pub fn sum(data: &[u8]) -> u16 {
    let (words, rest) = data.as_chunks::<4>();
    let mut acc: u64 = words.iter().map(|w| u64::from(u32::from_ne_bytes(*w))).sum();
    let (pairs, odd) = rest.as_chunks::<2>();
    for p in pairs {
        acc += u64::from(u16::from_ne_bytes(*p));
    }
    if let Some(&b) = odd.first() {
        acc += u64::from(u16::from_ne_bytes([b, 0]));
    }
    fold(acc)
}

/// Folds a wide ones' complement sum to 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Ones' complement addition of two folded sums.
pub fn add(a: u16, b: u16) -> u16 {
    fold(u64::from(a) + u64::from(b))
}

/// The sum of the IPv4 pseudo header for a transport segment of `len`
/// bytes (native byte order, not complemented).
pub fn pseudo_header_v4(src: [u8; 4], dst: [u8; 4], protocol: u8, len: u16) -> u16 {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&src);
    h[4..8].copy_from_slice(&dst);
    h[9] = protocol;
    h[10..12].copy_from_slice(&len.to_be_bytes());
    sum(&h)
}

/// Fills in the TCP or UDP checksum of the IPv4 packet `packet` (whose
/// transport checksum field is at `offset` within the transport header).
/// Returns false, changing nothing, if the packet is too short for it.
pub fn fill_ipv4_transport(packet: &mut [u8], offset: usize) -> bool {
    let Some(&vihl) = packet.first() else { return false };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if packet.len() < ihl + offset + 2 || ihl < 20 {
        return false;
    }
    let (ip, seg) = packet.split_at_mut(ihl);
    let Ok(len) = u16::try_from(seg.len()) else { return false };
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    seg[offset..offset + 2].fill(0);
    let total = add(pseudo_header_v4(src, dst, ip[9], len), sum(seg));
    seg[offset..offset + 2].copy_from_slice(&(!total).to_ne_bytes());
    true
}

/// The sum of the IPv6 pseudo header (RFC 8200 §8.1) for a transport
/// segment of `len` bytes (native byte order, not complemented).
pub fn pseudo_header_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, len: u32) -> u16 {
    let mut h = [0u8; 40];
    h[..16].copy_from_slice(&src);
    h[16..32].copy_from_slice(&dst);
    h[32..36].copy_from_slice(&len.to_be_bytes());
    h[39] = next_header;
    sum(&h)
}

/// Fills in the TCP or UDP checksum of the IPv6 packet `packet` (no
/// extension headers: the transport header follows the fixed 40 bytes).
/// Returns false, changing nothing, if the packet is too short for it.
pub fn fill_ipv6_transport(packet: &mut [u8], offset: usize) -> bool {
    if packet.len() < 40 + offset + 2 {
        return false;
    }
    let (ip, seg) = packet.split_at_mut(40);
    let Ok(len) = u32::try_from(seg.len()) else { return false };
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    dst.copy_from_slice(&ip[24..40]);
    seg[offset..offset + 2].fill(0);
    let total = add(pseudo_header_v6(src, dst, ip[6], len), sum(seg));
    seg[offset..offset + 2].copy_from_slice(&(!total).to_ne_bytes());
    true
}

/// Fills in the transport checksum of an IP packet of either version.
pub fn fill_ip_transport(packet: &mut [u8], offset: usize) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => fill_ipv4_transport(packet, offset),
        Some(6) => fill_ipv6_transport(packet, offset),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_packets::tcp_packet;
    use smoltcp::wire::{IpAddress, Ipv4Address, TcpPacket};

    /// The textbook definition, 16 bits at a time, for comparison.
    fn reference(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for c in data.chunks(2) {
            acc += u32::from(u16::from_ne_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn matches_the_reference_for_every_length_and_alignment() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for len in (0..300).chain([1499, 1500, 65535, 65536, 69_997]) {
            for start in 0..3 {
                let d = &data[start..start + len];
                assert_eq!(sum(d), reference(d), "len {len} start {start}");
            }
        }
        assert_eq!(sum(&[0xff; 65535]), reference(&[0xff; 65535]));
        // RFC 1071's example: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2 (big-endian words).
        assert_eq!(u16::from_be_bytes(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]).to_ne_bytes()), 0xddf2);
    }

    #[test]
    fn tcp_checksum_agrees_with_smoltcp() {
        let (src, dst) = (Ipv4Address::new(192, 168, 127, 254), Ipv4Address::new(192, 168, 127, 2));
        for n in [0usize, 1, 2, 3, 1460, 30_001] {
            let payload: Vec<u8> = (0..n).map(|i| (i * 31) as u8).collect();
            let mut buf = tcp_packet(src.into(), dst.into(), &payload);
            let want = buf.clone();
            buf[36] ^= 0x5a;
            assert!(fill_ipv4_transport(&mut buf, 16));
            assert!(buf == want, "payload {n}");
        }
        assert!(!fill_ipv4_transport(&mut [0x45; 30], 16), "too short");
        assert!(!fill_ipv4_transport(&mut [], 16));
        assert!(!fill_ipv4_transport(&mut [0x41; 60], 16), "IHL below 5");
    }

    #[test]
    fn ipv6_transport_checksums_verify_with_smoltcp() {
        use smoltcp::wire::{Ipv6Address, Ipv6Packet};
        let (src, dst) = (Ipv6Address::new(0xfd5a, 0, 0, 0, 0, 0, 0, 1), Ipv6Address::new(0xfd5a, 0, 0, 0, 0, 0, 0, 2));
        for payload in [&b""[..], b"a", b"odd length!", &[0xffu8; 3001][..]] {
            let mut p = tcp_packet(src.into(), dst.into(), payload);
            p[40 + 16] ^= 0x5a;
            assert!(fill_ip_transport(&mut p, 16));
            let pkt = Ipv6Packet::new_checked(&p[..]).unwrap();
            assert!(
                TcpPacket::new_checked(pkt.payload())
                    .unwrap()
                    .verify_checksum(&IpAddress::Ipv6(src), &IpAddress::Ipv6(dst))
            );
        }
        assert!(!fill_ipv6_transport(&mut [0x60; 41], 16));
        assert!(!fill_ip_transport(&mut [0x10; 80], 16));
    }
}
