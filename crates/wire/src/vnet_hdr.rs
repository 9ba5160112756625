//! The `virtio_net_hdr` that prefixes every frame on a tap opened with
//! `IFF_VNET_HDR`, and the two conversions vm-switch needs.
//!
//! With TSO and checksum offload on, the guest kernel hands the tap TCP
//! segments of up to 64 KiB and leaves their checksum partial (the pseudo
//! header's sum, with `NEEDS_CSUM` saying where the rest goes). Frames on
//! the link always carry complete checksums, so [`complete_from_tap`]
//! finishes them. The other way, a large TCP segment from the host gets a
//! header asking the kernel to treat it as a GSO packet of MTU-sized
//! segments ([`header_to_tap`]); its checksum field is replaced by the
//! pseudo header's sum (`NEEDS_CSUM`), so the guest kernel neither verifies
//! nor recomputes what host-switch already got right. The layout is the
//! legacy 10-byte header in native byte order, which is what tun uses
//! unless told otherwise.

use crate::checksum;

pub const VNET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
const ETH: usize = 14;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        VnetHdr { flags: b[0], gso_type: b[1], hdr_len: u(2), gso_size: u(4), csum_start: u(6), csum_offset: u(8) }
    }

    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [(2, self.hdr_len), (4, self.gso_size), (6, self.csum_start), (8, self.csum_offset)] {
            b[i..i + 2].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }
}

/// Why a frame from the tap cannot go on the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapFrameError {
    /// The partial checksum's position lies outside the frame.
    BadChecksumOffsets,
    /// A GSO type other than TCP (never enabled, so never expected).
    UnsupportedGso(u8),
}

/// Makes a frame read from the tap fit for the link: completes a partial
/// checksum in place. The caller decides separately whether a large (GSO)
/// frame may be sent at all.
pub fn complete_from_tap(hdr: &VnetHdr, frame: &mut [u8]) -> Result<(), TapFrameError> {
    if ![GSO_NONE, GSO_TCPV4, GSO_TCPV6].contains(&hdr.gso_type) {
        return Err(TapFrameError::UnsupportedGso(hdr.gso_type));
    }
    if hdr.flags & F_NEEDS_CSUM != 0 {
        let start = usize::from(hdr.csum_start);
        let at = start + usize::from(hdr.csum_offset);
        if at + 2 > frame.len() {
            return Err(TapFrameError::BadChecksumOffsets);
        }
        // The field holds the pseudo header's sum; summing it with the
        // rest and complementing gives the final checksum (RFC 1071).
        // Summed in native byte order, so stored that way too.
        let sum = !checksum::sum(&frame[start..]);
        frame[at..at + 2].copy_from_slice(&sum.to_ne_bytes());
    }
    Ok(())
}

/// The header for writing `frame` (from the link) to the tap. A frame
/// above `mtu` + Ethernet header must be TCP over IPv4 or IPv6 (no
/// extension headers): it becomes a GSO packet of `mtu`-sized segments,
/// with its checksum field turned into the pseudo header's sum. `None`
/// means the frame cannot be delivered.
pub fn header_to_tap(frame: &mut [u8], mtu: usize) -> Option<VnetHdr> {
    if frame.len() <= ETH + mtu {
        return Some(VnetHdr::default());
    }
    let ip = frame.get(ETH..)?;
    let (ihl, tcp_len, gso_type, pseudo) = match frame.get(12..14)? {
        [0x08, 0x00] => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            if ip.first()? >> 4 != 4 || ihl < 20 || *ip.get(9)? != 6 || total > ip.len() || total < ihl + 20 {
                return None;
            }
            let len = u16::try_from(total - ihl).ok()?;
            let pseudo = checksum::pseudo_header_v4(ip[12..16].try_into().ok()?, ip[16..20].try_into().ok()?, 6, len);
            (ihl, total - ihl, GSO_TCPV4, pseudo)
        }
        [0x86, 0xdd] => {
            let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            if ip.first()? >> 4 != 6 || *ip.get(6)? != 6 || 40 + payload > ip.len() || payload < 20 {
                return None;
            }
            let pseudo =
                checksum::pseudo_header_v6(ip[8..24].try_into().ok()?, ip[24..40].try_into().ok()?, 6, payload as u32);
            (40, payload, GSO_TCPV6, pseudo)
        }
        _ => return None,
    };
    let tcp_hl = usize::from(ip.get(ihl + 12)? >> 4) * 4;
    if tcp_hl < 20 || tcp_hl > tcp_len {
        return None;
    }
    let gso_size = mtu.checked_sub(ihl + tcp_hl).filter(|s| *s > 0)?;
    // The pseudo header's sum, not complemented: what the kernel leaves in
    // the field of a packet whose checksum it will finish itself.
    let csum_start = ETH + ihl;
    frame[csum_start + 16..csum_start + 18].copy_from_slice(&pseudo.to_ne_bytes());
    Some(VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: u16::try_from(csum_start + tcp_hl).ok()?,
        gso_size: u16::try_from(gso_size).ok()?,
        csum_start: u16::try_from(csum_start).ok()?,
        csum_offset: 16,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{IpAddress, Ipv4Address, Ipv4Packet, TcpPacket};

    /// An Ethernet frame holding IPv4 TCP with `payload`, checksums complete.
    fn tcp_frame(payload: &[u8]) -> Vec<u8> {
        let (src, dst) = (Ipv4Address::new(192, 168, 127, 254), Ipv4Address::new(192, 168, 127, 2));
        crate::test_packets::tcp_frame(src.into(), dst.into(), payload)
    }

    fn tcp_checksum_ok(f: &[u8]) -> bool {
        let p = Ipv4Packet::new_checked(&f[ETH..]).unwrap();
        TcpPacket::new_checked(p.payload())
            .unwrap()
            .verify_checksum(&IpAddress::Ipv4(p.src_addr()), &IpAddress::Ipv4(p.dst_addr()))
    }

    #[test]
    fn header_bytes_round_trip() {
        let h = VnetHdr { flags: 1, gso_type: 1, hdr_len: 66, gso_size: 1448, csum_start: 34, csum_offset: 16 };
        assert_eq!(VnetHdr::parse(&h.to_bytes()), h);
    }

    #[test]
    fn large_segment_to_tap_then_back_restores_the_checksum() {
        let payload: Vec<u8> = (0..60_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let original = tcp_frame(&payload);
        assert!(tcp_checksum_ok(&original));
        let mut f = original.clone();
        let h = header_to_tap(&mut f, 1500).expect("a GSO header");
        assert_eq!((h.flags, h.gso_type, h.csum_start, h.csum_offset), (F_NEEDS_CSUM, GSO_TCPV4, 34, 16));
        assert_eq!((h.hdr_len, h.gso_size), (54, 1460));
        assert!(!tcp_checksum_ok(&f), "field now holds the pseudo header's sum");
        // What the kernel would hand back for such a packet: completing it
        // gives exactly the checksum host-switch computed.
        complete_from_tap(&h, &mut f).unwrap();
        assert!(f == original, "frame differs after the round trip");
    }

    #[test]
    fn small_frames_pass_untouched_and_odd_lengths_checksum_right() {
        let mut f = tcp_frame(b"hello");
        let before = f.clone();
        assert_eq!(header_to_tap(&mut f, 1500), Some(VnetHdr::default()));
        assert!(f == before);
        // A partial checksum with an odd payload length, completed.
        let mut g = tcp_frame(b"abc");
        let mut h = header_to_tap(&mut g.clone(), 41).unwrap();
        assert_eq!(h.gso_type, GSO_TCPV4);
        header_to_tap(&mut g, 41);
        h.gso_type = GSO_NONE;
        complete_from_tap(&h, &mut g).unwrap();
        assert!(tcp_checksum_ok(&g));
    }

    #[test]
    fn undeliverable_and_hostile_frames_are_refused() {
        // Large but not TCP (UDP).
        let mut f = tcp_frame(&[0; 3000]);
        f[ETH + 9] = 17;
        assert_eq!(header_to_tap(&mut f, 1500), None);
        // Large, not IPv4.
        let mut f = tcp_frame(&[0; 3000]);
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(header_to_tap(&mut f, 1500), None);
        // IP total length beyond the frame, TCP header length beyond the packet.
        let mut f = tcp_frame(&[0; 3000]);
        f[ETH + 2..ETH + 4].copy_from_slice(&60000u16.to_be_bytes());
        assert_eq!(header_to_tap(&mut f, 1500), None);
        let mut f = tcp_frame(&[]);
        f.resize(3000, 0);
        f[ETH + 2..ETH + 4].copy_from_slice(&40u16.to_be_bytes());
        f[ETH + 20 + 12] = 0xf0;
        assert_eq!(header_to_tap(&mut f, 1500), None);
        // Truncated junk never panics.
        for n in 0..80 {
            let mut junk = vec![0x45u8; n];
            let _ = header_to_tap(&mut junk, 10);
        }
        // Checksum offsets outside the frame.
        let mut f = tcp_frame(b"x");
        let h = VnetHdr { flags: F_NEEDS_CSUM, csum_start: 60, csum_offset: 16, ..Default::default() };
        assert_eq!(complete_from_tap(&h, &mut f), Err(TapFrameError::BadChecksumOffsets));
        let h = VnetHdr { gso_type: 3, ..Default::default() };
        assert_eq!(complete_from_tap(&h, &mut f), Err(TapFrameError::UnsupportedGso(3)));
    }

    #[test]
    fn large_ipv6_segment_to_tap_then_back_restores_the_checksum() {
        use smoltcp::wire::Ipv6Address;
        let (src, dst) =
            (Ipv6Address::new(0xfd5a, 0, 0, 0, 0, 0, 0, 0xfe), Ipv6Address::new(0xfd5a, 0, 0, 0, 0, 0, 0, 2));
        let payload: Vec<u8> = (0..60_000u32).map(|i| (i * 13 + i / 253) as u8).collect();
        let original = crate::test_packets::tcp_frame(src.into(), dst.into(), &payload);
        let mut f = original.clone();
        let h = header_to_tap(&mut f, 1500).expect("a GSO header");
        assert_eq!((h.flags, h.gso_type, h.csum_start, h.csum_offset), (F_NEEDS_CSUM, GSO_TCPV6, 54, 16));
        assert_eq!((h.hdr_len, h.gso_size), (74, 1440));
        complete_from_tap(&h, &mut f).unwrap();
        assert!(f == original, "frame differs after the round trip");
        // Not TCP, or a payload length beyond the frame: refused.
        let mut udp = original.clone();
        udp[ETH + 6] = 17;
        assert_eq!(header_to_tap(&mut udp, 1500), None);
        let mut long = original.clone();
        long[ETH + 4..ETH + 6].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(header_to_tap(&mut long, 1500), None);
    }
}
