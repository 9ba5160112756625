//! Packets for this crate's tests, built by smoltcp (the reference the
//! code under test is checked against).

use smoltcp::wire::{IpAddress, TcpControl, TcpRepr, TcpSeqNumber};

/// An IP packet (the family of `src` and `dst`) holding a TCP segment
/// with `payload`, every checksum complete.
pub fn tcp_packet(src: IpAddress, dst: IpAddress, payload: &[u8]) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: 5201,
        dst_port: 40000,
        control: TcpControl::Psh,
        seq_number: TcpSeqNumber(7),
        ack_number: Some(TcpSeqNumber(9)),
        window_len: 512,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    crate::frame::ip_tcp_packet(src, dst, &tcp)
}

/// The same behind an Ethernet header of the right EtherType.
pub fn tcp_frame(src: IpAddress, dst: IpAddress, payload: &[u8]) -> Vec<u8> {
    let packet = tcp_packet(src, dst, payload);
    let mut frame = vec![0u8; 14];
    frame[12..14].copy_from_slice(match src {
        IpAddress::Ipv4(_) => &[0x08, 0x00],
        IpAddress::Ipv6(_) => &[0x86, 0xdd],
    });
    frame.extend_from_slice(&packet);
    frame
}
