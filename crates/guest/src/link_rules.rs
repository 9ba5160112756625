//! vm-switch's rules for frames between the tap and the host link, as pure
//! functions (the binary only moves bytes and acts on the verdicts).
//!
//! How this works. Tap → link ([`from_tap`]): a frame the guest kernel hands
//! the tap is sent, with its checksum completed where the kernel left it
//! partial, unless it cannot go on the link: empty, larger than any link
//! frame (65535), above the MTU without being a GSO segment, a GSO segment
//! while no host agreed to take large frames, or an offload hello (that
//! negotiation is vm-switch's own). A large segment's checksum, and that of
//! TCP to a gateway that agreed to offload, is left as it is: whoever
//! delivers the segment computes it, and the gateway does not check TCP it
//! terminates (`rdnet_wire::offload`). Link → tap ([`from_link`]): DHCP
//! replies for us go to the built-in client when it runs; the gateway's
//! offload hello turns offload on (once, and only a gateway's with the
//! large-TCP flag); a frame within the MTU goes to the tap as it is; a
//! larger one only as a TCP GSO packet with its virtio-net header
//! ([`header_to_tap`]), anything else above the MTU is dropped.

use rdnet_wire::ndp_dns::{ROUTER_ADVERT, RaDns, parse_ra_dns};
use rdnet_wire::offload::{self, Role};

use rdnet_wire::Mac;
use rdnet_wire::frame::is_dhcp_client_frame;
use rdnet_wire::vnet_hdr::{GSO_NONE, VnetHdr, complete_from_tap, header_to_tap};

/// What to do with a frame read from the tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromTap {
    Send,
    Drop(&'static str),
}

/// Decides on (and, for a partial checksum, completes) a frame the tap gave
/// with header `hdr`. `max_frame` is MTU + 14; `offload_gateway` the
/// gateway's MAC while a host that answered the offload hello is connected.
pub fn from_tap(hdr: &VnetHdr, frame: &mut [u8], max_frame: usize, offload_gateway: Option<Mac>) -> FromTap {
    let len = frame.len();
    if len == 0 {
        FromTap::Drop("empty")
    } else if len > offload::MAX_LARGE_FRAME {
        FromTap::Drop("larger than a link frame")
    } else if hdr.gso_type == GSO_NONE && len > max_frame {
        FromTap::Drop("above the MTU")
    } else if hdr.gso_type != GSO_NONE && offload_gateway.is_none() {
        FromTap::Drop("segmentation offload is off")
    } else if offload::is_offload_frame(frame) {
        FromTap::Drop("offload negotiation is between vm-switch and the host")
    } else if len > max_frame || offload_gateway.is_some_and(|gw| is_tcp_to(frame, &gw)) {
        FromTap::Send
    } else if complete_from_tap(hdr, frame).is_err() {
        FromTap::Drop("malformed offload header")
    } else {
        FromTap::Send
    }
}

/// What to do with a frame from the host link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromLink {
    /// A DHCP reply for the built-in client.
    ToDhcpClient,
    /// The gateway's offload hello: turn TSO on; large TCP segments to and
    /// from this MAC may cross the link from now on.
    EnableOffload {
        gateway: Mac,
    },
    /// Another offload frame: not the tap's business.
    Ignore,
    /// Write it to the tap as it is.
    ToTap,
    /// Write it to the tap as a GSO packet behind this header.
    ToTapWithHeader(VnetHdr),
    Drop(&'static str),
}

/// Decides where a frame from the host goes. `dhcp` says the built-in client
/// runs; `tap_mtu` is the tap's MTU now (a lease may lower it), which sizes
/// the segments a large frame is cut into.
pub fn from_link(
    frame: &mut [u8],
    mac: &Mac,
    dhcp: bool,
    max_frame: usize,
    tap_mtu: usize,
    offload_gateway: Option<Mac>,
) -> FromLink {
    if dhcp && is_dhcp_client_frame(frame, mac) {
        return FromLink::ToDhcpClient;
    }
    if offload::is_offload_frame(frame) {
        return match (offload::parse_hello(frame), frame.get(6..12).and_then(|m| Mac::try_from(m).ok())) {
            (Some(h), Some(gateway))
                if h.role == Role::Gateway && h.flags & offload::LARGE_TCP != 0 && offload_gateway.is_none() =>
            {
                FromLink::EnableOffload { gateway }
            }
            _ => FromLink::Ignore,
        };
    }
    if frame.len() <= max_frame {
        return FromLink::ToTap;
    }
    match header_to_tap(frame, tap_mtu) {
        Some(hdr) => FromLink::ToTapWithHeader(hdr),
        None => FromLink::Drop("above the MTU and not TCP"),
    }
}

/// Whether `frame` looks like an IPv6 router advertisement (a cheap test
/// for the packet path; [`router_advert_dns`] reads it).
pub fn is_router_advert(frame: &[u8]) -> bool {
    frame.len() > 54 && frame[12..14] == [0x86, 0xdd] && frame[20] == 58 && frame[54] == ROUTER_ADVERT
}

/// The DNS settings of an IPv6 router advertisement from the link, if
/// `frame` is one (RFC 4861's hop limit 255, so it came from the link
/// itself). The guest kernel takes the prefix, route and MTU from the same
/// frame on the tap; the DNS options (RFC 8106) are vm-switch's to write.
pub fn router_advert_dns(frame: &[u8]) -> Option<RaDns> {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv6Packet};
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv6 {
        return None;
    }
    let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Icmpv6 || ip.hop_limit() != 255 {
        return None;
    }
    parse_ra_dns(ip.payload())
}

/// Whether `frame` is IPv4 TCP addressed to the MAC `to`.
fn is_tcp_to(frame: &[u8], to: &Mac) -> bool {
    frame.len() > 34 && frame[..6] == to[..] && frame[12..14] == [0x08, 0x00] && frame[23] == 6
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdnet_wire::offload::{Hello, hello_frame};
    use rdnet_wire::vnet_hdr::{F_NEEDS_CSUM, GSO_TCPV4};

    const MAC: Mac = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];
    const GW: Mac = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd];
    const MAX: usize = 1514;

    /// An Ethernet + IPv4 + TCP frame of `len` bytes from us to `dst`.
    fn tcp_frame(dst: Mac, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&MAC);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
        f[22] = 64;
        f[23] = 6;
        f[26..30].copy_from_slice(&[192, 168, 127, 2]);
        f[30..34].copy_from_slice(&[1, 2, 3, 4]);
        f[46] = 0x50; // data offset 5
        f
    }

    fn plain() -> VnetHdr {
        VnetHdr::default()
    }

    /// The header the kernel gives a TCP GSO segment.
    fn gso() -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        }
    }

    #[test]
    fn tap_frames_that_cannot_cross_the_link_are_dropped_with_a_reason() {
        assert_eq!(from_tap(&plain(), &mut [], MAX, None), FromTap::Drop("empty"));
        let mut huge = tcp_frame(GW, offload::MAX_LARGE_FRAME + 1);
        assert_eq!(from_tap(&gso(), &mut huge, MAX, Some(GW)), FromTap::Drop("larger than a link frame"));
        let mut big = tcp_frame(GW, MAX + 1);
        assert_eq!(from_tap(&plain(), &mut big, MAX, Some(GW)), FromTap::Drop("above the MTU"));
        let mut seg = tcp_frame(GW, 9000);
        assert_eq!(from_tap(&gso(), &mut seg, MAX, None), FromTap::Drop("segmentation offload is off"));
        let mut hello = hello_frame(MAC, [0xff; 6], Hello { role: Role::Vm, flags: offload::LARGE_TCP });
        assert_eq!(
            from_tap(&plain(), &mut hello, MAX, None),
            FromTap::Drop("offload negotiation is between vm-switch and the host")
        );
    }

    #[test]
    fn tap_frames_that_may_cross_are_sent() {
        // A large segment once a gateway agreed: sent, checksum untouched.
        let mut seg = tcp_frame(GW, 9000);
        let before = seg.clone();
        assert_eq!(from_tap(&gso(), &mut seg, MAX, Some(GW)), FromTap::Send);
        assert_eq!(seg, before);
        // A small one with a partial checksum, no offload: completed.
        let mut small = tcp_frame(GW, 100);
        let hdr = VnetHdr { flags: F_NEEDS_CSUM, csum_start: 34, csum_offset: 16, ..VnetHdr::default() };
        assert_eq!(from_tap(&hdr, &mut small, MAX, None), FromTap::Send);
        assert_ne!(small[50..52], [0, 0], "the checksum was filled in");
        // The same to the offload gateway: left partial.
        let mut small = tcp_frame(GW, 100);
        assert_eq!(from_tap(&hdr, &mut small, MAX, Some(GW)), FromTap::Send);
        assert_eq!(small[50..52], [0, 0]);
        // A header whose checksum offset points past the frame.
        let mut small = tcp_frame([0xff; 6], 100);
        let bad = VnetHdr { flags: F_NEEDS_CSUM, csum_start: 90, csum_offset: 16, ..VnetHdr::default() };
        assert_eq!(from_tap(&bad, &mut small, MAX, None), FromTap::Drop("malformed offload header"));
    }

    #[test]
    fn link_frames_go_to_the_client_the_tap_or_nowhere() {
        // The gateway's hello (from its MAC) turns offload on, once.
        let mut hello = hello_frame(GW, MAC, Hello { role: Role::Gateway, flags: offload::LARGE_TCP });
        assert_eq!(from_link(&mut hello, &MAC, true, MAX, 1500, None), FromLink::EnableOffload { gateway: GW });
        assert_eq!(from_link(&mut hello, &MAC, true, MAX, 1500, Some(GW)), FromLink::Ignore);
        // Another VM's hello, or a gateway's without the flag: ignored.
        let mut vm = hello_frame([2, 0, 0, 0, 0, 9], MAC, Hello { role: Role::Vm, flags: offload::LARGE_TCP });
        assert_eq!(from_link(&mut vm, &MAC, true, MAX, 1500, None), FromLink::Ignore);
        let mut noflag = hello_frame(GW, MAC, Hello { role: Role::Gateway, flags: 0 });
        assert_eq!(from_link(&mut noflag, &MAC, true, MAX, 1500, None), FromLink::Ignore);
        // Ordinary frames.
        let mut small = tcp_frame(MAC, 100);
        assert_eq!(from_link(&mut small, &MAC, true, MAX, 1500, Some(GW)), FromLink::ToTap);
        let mut seg = tcp_frame(MAC, 9000);
        assert!(matches!(from_link(&mut seg, &MAC, true, MAX, 1500, Some(GW)), FromLink::ToTapWithHeader(_)));
        let mut not_tcp = tcp_frame(MAC, 9000);
        not_tcp[23] = 17;
        assert_eq!(
            from_link(&mut not_tcp, &MAC, true, MAX, 1500, Some(GW)),
            FromLink::Drop("above the MTU and not TCP")
        );
    }

    /// An RA from the gateway's link-local address with `options`.
    fn ra_frame(hop_limit: u8, options: &[u8]) -> Vec<u8> {
        let mut icmp = vec![134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(options);
        let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
        f.extend_from_slice(&GW);
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[58, hop_limit]);
        f.extend_from_slice(&"fe80::5894:efff:fee4:cdd".parse::<std::net::Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&"ff02::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&icmp);
        f
    }

    #[test]
    fn router_advertisements_give_their_dns_options() {
        let server: std::net::Ipv6Addr = "fd5a:94ef:e40c::1".parse().unwrap();
        let mut opts = rdnet_wire::ndp_dns::rdnss_option(1800, &[server]).unwrap();
        opts.extend(rdnet_wire::ndp_dns::dnssl_option(1800, &["corp.example".into()]).unwrap());
        assert!(is_router_advert(&ra_frame(255, &opts)));
        let dns = router_advert_dns(&ra_frame(255, &opts)).expect("an RA");
        assert_eq!(dns.servers, [server]);
        assert_eq!(dns.search, ["corp.example"]);
        // Not from the link itself (routed: hop limit below 255), or not an RA.
        assert_eq!(router_advert_dns(&ra_frame(64, &opts)), None);
        assert_eq!(router_advert_dns(&tcp_frame(MAC, 100)), None);
        let mut rs = ra_frame(255, &opts);
        rs[54] = 133;
        assert_eq!(router_advert_dns(&rs), None);
    }

    #[test]
    fn dhcp_replies_go_to_the_client_only_when_it_runs() {
        let mut reply = rdnet_wire::frame::build_udp_frame(
            GW,
            MAC,
            "192.168.127.1:67".parse().unwrap(),
            "192.168.127.2:68".parse().unwrap(),
            &[0u8; 300],
        )
        .expect("a frame");
        assert_eq!(from_link(&mut reply, &MAC, true, MAX, 1500, None), FromLink::ToDhcpClient);
        assert_eq!(from_link(&mut reply, &MAC, false, MAX, 1500, None), FromLink::ToTap);
    }
}
