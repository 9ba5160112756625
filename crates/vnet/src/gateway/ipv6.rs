//! IPv6 on the gateway: neighbour discovery, router advertisements,
//! stateless DHCPv6 and echo, for the /64 of [`Ipv6Config`].
//!
//! How this works: [`Network::handle_ipv6`] sees every IPv6 frame the
//! gateway sees (unicast to its MAC, and multicast, which the switch also
//! floods to the other ports). It learns each guest source address's MAC in
//! a neighbour table bounded per MAC and in total, then answers by itself:
//! Neighbor Solicitations for its own three addresses (never for a guest's,
//! so guests' duplicate address detection is theirs), Router Solicitations
//! with a Router Advertisement (prefix for SLAAC, MTU, RDNSS/DNSSL naming
//! its DNS server and the search list), DHCPv6 Information-Requests with
//! the same DNS data, and echo requests to its own addresses. Anything else
//! sent to its MAC goes up as [`Upcall::Ipv6`] to the shell (DNS, and what
//! cannot be routed). [`Network::poll_ipv6`] sends the periodic RA. No I/O
//! and no clock, like the rest of the gateway.

use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::{Duration, Instant};

use dhcproto::v6::{DhcpOption, Message as Dhcp6Message, MessageType as Dhcp6Type};
use dhcproto::{Encodable, Name};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr, IpProtocol,
    Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscPrefixInfoFlags, NdiscPrefixInformation, NdiscRepr,
    NdiscRouterFlags, RawHardwareAddress, UdpPacket, UdpRepr,
};

use super::{FrameSink, Network, Upcall};
use crate::FastMap;
use crate::config::Ipv6Config;
use rdnet_wire::frame;

/// Guest addresses remembered in all (IPv6 address → MAC).
pub const MAX_NEIGHBORS6: usize = 4096;
/// Addresses one MAC may hold at once (link-local, SLAAC, temporary ones);
/// a newer one replaces its oldest, so a guest cycling through random
/// sources only churns its own entries.
pub const MAX_ADDRESSES_PER_MAC: usize = 16;
/// Between unsolicited router advertisements (RFC 4861's default
/// MaxRtrAdvInterval is 600 s; lifetimes below are a few times this).
pub const RA_INTERVAL: Duration = Duration::from_secs(200);
const ROUTER_LIFETIME_SECS: u64 = 1800;
/// RFC 8106: at least 3 × the advertisement interval.
const DNS_LIFETIME_SECS: u32 = 1800;
const PREFIX_VALID_SECS: u64 = 86_400;
const PREFIX_PREFERRED_SECS: u64 = 14_400;
/// ICMPv6 errors the gateway sends per second at most (RFC 4443 §2.4 f).
const ERRORS_PER_SECOND: u32 = 100;
/// An ICMPv6 error quotes the packet it is about up to the minimum MTU.
const MIN_MTU6: usize = 1280;
pub const DHCP6_SERVER_PORT: u16 = 547;
pub const DHCP6_CLIENT_PORT: u16 = 546;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_DHCP_AGENTS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);
const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;

/// The IPv6 state of the gateway: neighbours, the advertisement timer and
/// the error budget.
#[derive(Debug, Default)]
pub struct Ipv6State {
    owner: FastMap<Ipv6Addr, EthernetAddress>,
    by_mac: FastMap<EthernetAddress, Vec<(Ipv6Addr, Instant)>>,
    /// Guest addresses solicited in the last second.
    probes: crate::ratelimit::ProbeLimit<Ipv6Addr, MAX_NEIGHBORS6>,
    next_ra: Option<Instant>,
    errors: (Option<Instant>, u32),
}

impl Ipv6State {
    /// The MAC that uses `ip`, if seen.
    pub fn neighbor(&self, ip: &Ipv6Addr) -> Option<EthernetAddress> {
        self.owner.get(ip).copied()
    }

    /// Every known guest address with its MAC (for the leases endpoint).
    pub fn neighbors(&self) -> impl Iterator<Item = (Ipv6Addr, EthernetAddress)> + '_ {
        self.owner.iter().map(|(ip, mac)| (*ip, *mac))
    }

    pub fn len(&self) -> usize {
        self.owner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }

    fn remember(&mut self, ip: Ipv6Addr, mac: EthernetAddress, now: Instant) {
        if let Some(old) = self.owner.get(&ip).copied() {
            if old == mac {
                if let Some(e) = self.by_mac.get_mut(&mac).and_then(|v| v.iter_mut().find(|(a, _)| *a == ip)) {
                    e.1 = now;
                }
                return;
            }
            // Moved to another MAC (the guard let it: the old one is gone).
            self.forget(ip, old);
        }
        let full = self.owner.len() >= MAX_NEIGHBORS6;
        let held = self.by_mac.get(&mac).map_or(0, Vec::len);
        // A full table takes no new MAC (and keeps no empty entry for it).
        if full && held == 0 {
            return;
        }
        let addrs = self.by_mac.entry(mac).or_default();
        if (held >= MAX_ADDRESSES_PER_MAC || full)
            && let Some(i) = addrs.iter().enumerate().min_by_key(|(_, (_, seen))| *seen).map(|(i, _)| i)
        {
            let (gone, _) = addrs.swap_remove(i);
            self.owner.remove(&gone);
        }
        addrs.push((ip, now));
        self.owner.insert(ip, mac);
    }

    fn forget(&mut self, ip: Ipv6Addr, mac: EthernetAddress) {
        self.owner.remove(&ip);
        if let Some(v) = self.by_mac.get_mut(&mac) {
            v.retain(|(a, _)| *a != ip);
            if v.is_empty() {
                self.by_mac.remove(&mac);
            }
        }
    }

    /// Whether one more ICMPv6 error fits this second's budget.
    fn error_allowed(&mut self, now: Instant) -> bool {
        let (start, count) = &mut self.errors;
        if start.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1)) {
            *start = Some(now);
            *count = 0;
        }
        *count += 1;
        *count <= ERRORS_PER_SECOND
    }
}

/// The Ethernet multicast address of an IPv6 multicast group (RFC 2464).
fn multicast_mac(ip: &Ipv6Addr) -> EthernetAddress {
    let o = ip.octets();
    EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

fn is_link_local(ip: &Ipv6Addr) -> bool {
    ip.is_unicast_link_local()
}

impl Network {
    pub(super) fn handle_ipv6<'a>(
        &mut self,
        src_mac: EthernetAddress,
        unicast_to_gateway: bool,
        packet: &'a [u8],
        now: Instant,
        out: &mut impl FrameSink,
    ) -> Upcall<'a> {
        let Some(v6) = self.cfg.ipv6.clone() else {
            if unicast_to_gateway {
                self.stats.drops.unsupported_protocol += 1;
            }
            return Upcall::None;
        };
        let Ok(ip) = Ipv6Packet::new_checked(packet) else {
            self.stats.drops.malformed += 1;
            return Upcall::None;
        };
        let Ok(header) = Ipv6Repr::parse(&ip) else {
            self.stats.drops.malformed += 1;
            return Upcall::None;
        };
        let Some(packet) = packet.get(..ip.header_len() + header.payload_len) else {
            self.stats.drops.malformed += 1;
            return Upcall::None;
        };
        let payload = &packet[ip.header_len()..];
        let src = header.src_addr;
        if !src.is_unspecified() && !src.is_multicast() && (is_link_local(&src) || v6.prefix.contains(&src)) {
            self.ipv6.remember(src, src_mac, now);
        }
        let dst = header.dst_addr;
        let ours = v6.owns(&dst);
        match header.next_header {
            // The host alias's pings are the host's ::1 to answer, through
            // the shell, never the gateway's to fake.
            IpProtocol::Icmpv6 if (ours && dst != v6.host) || dst.is_multicast() => {
                self.handle_icmpv6(&v6, src_mac, &header, payload, now, out);
                return Upcall::None;
            }
            IpProtocol::Udp if dst == ALL_DHCP_AGENTS || (ours && dst != v6.host) => {
                if let Some((sport, dport, data)) = parse_udp6(&header, payload)
                    && dport == DHCP6_SERVER_PORT
                {
                    self.answer_dhcp6(&v6, src_mac, &header, sport, data, now, out);
                    return Upcall::None;
                }
            }
            _ => {}
        }
        if !unicast_to_gateway || dst.is_multicast() {
            return Upcall::None;
        }
        Upcall::Ipv6 { src_mac, header, packet }
    }

    fn handle_icmpv6(
        &mut self,
        v6: &Ipv6Config,
        src_mac: EthernetAddress,
        header: &Ipv6Repr,
        payload: &[u8],
        now: Instant,
        out: &mut impl FrameSink,
    ) {
        let Ok(pkt) = Icmpv6Packet::new_checked(payload) else {
            self.stats.drops.malformed += 1;
            return;
        };
        let Ok(repr) = Icmpv6Repr::parse(&header.src_addr, &header.dst_addr, &pkt, &ChecksumCapabilities::default())
        else {
            self.stats.drops.malformed += 1;
            return;
        };
        match repr {
            // RFC 4861 §6.1/7.1: neighbour discovery only from on-link
            // senders, which hop limit 255 proves.
            Icmpv6Repr::Ndisc(_) if header.hop_limit != 255 => self.stats.drops.malformed += 1,
            Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { .. }) => {
                // To the solicitor if it has an address, else to all nodes.
                let (dst, dst_mac) = if header.src_addr.is_unspecified() {
                    (ALL_NODES, multicast_mac(&ALL_NODES))
                } else {
                    (header.src_addr, src_mac)
                };
                self.send_router_advert(v6, dst, dst_mac, now, out);
            }
            Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr, .. }) if v6.owns(&target_addr) => {
                let router = target_addr != v6.host;
                let (dst, dst_mac, solicited) = if header.src_addr.is_unspecified() {
                    // A guest probing for one of our addresses (DAD): defend it.
                    (ALL_NODES, multicast_mac(&ALL_NODES), false)
                } else {
                    (header.src_addr, src_mac, true)
                };
                let mut flags = NdiscNeighborFlags::OVERRIDE;
                if router {
                    flags |= NdiscNeighborFlags::ROUTER;
                }
                if solicited {
                    flags |= NdiscNeighborFlags::SOLICITED;
                }
                let advert = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                    flags,
                    target_addr,
                    lladdr: Some(RawHardwareAddress::from(self.cfg.gateway_mac)),
                });
                self.stats.ndp_replies += 1;
                self.send_icmpv6(target_addr, dst, dst_mac, 255, &advert, &[], now, out);
            }
            Icmpv6Repr::EchoRequest { ident, seq_no, data } if v6.owns(&header.dst_addr) => {
                let reply = Icmpv6Repr::EchoReply { ident, seq_no, data };
                self.stats.icmp_replies += 1;
                self.send_icmpv6(header.dst_addr, header.src_addr, src_mac, 64, &reply, &[], now, out);
            }
            _ => {}
        }
    }

    /// A Router Advertisement: this router for 30 min, the prefix for
    /// SLAAC, the MTU, and the DNS server and search list (RFC 8106).
    fn send_router_advert(
        &mut self,
        v6: &Ipv6Config,
        dst: Ipv6Addr,
        dst_mac: EthernetAddress,
        now: Instant,
        out: &mut impl FrameSink,
    ) {
        let advert = Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
            hop_limit: 64,
            // "Other configuration": DHCPv6 Information-Request answers too.
            flags: NdiscRouterFlags::OTHER,
            router_lifetime: smoltcp::time::Duration::from_secs(ROUTER_LIFETIME_SECS),
            reachable_time: smoltcp::time::Duration::from_secs(0),
            retrans_time: smoltcp::time::Duration::from_secs(0),
            lladdr: Some(RawHardwareAddress::from(self.cfg.gateway_mac)),
            mtu: Some(u32::from(self.cfg.mtu)),
            prefix_info: Some(NdiscPrefixInformation {
                prefix_len: 64,
                flags: NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF,
                valid_lifetime: smoltcp::time::Duration::from_secs(PREFIX_VALID_SECS),
                preferred_lifetime: smoltcp::time::Duration::from_secs(PREFIX_PREFERRED_SECS),
                prefix: v6.prefix.network(),
            }),
        });
        let mut options = rdnet_wire::ndp_dns::rdnss_option(DNS_LIFETIME_SECS, &[v6.gateway]).unwrap_or_default();
        if let Some(dnssl) = rdnet_wire::ndp_dns::dnssl_option(DNS_LIFETIME_SECS, &self.dhcp.current_search()) {
            options.extend_from_slice(&dnssl);
        }
        self.stats.router_adverts += 1;
        self.send_icmpv6(v6.link_local, dst, dst_mac, 255, &advert, &options, now, out);
    }

    /// Sends the periodic router advertisement when it is due; returns when
    /// to call again.
    pub fn poll_ipv6(&mut self, now: Instant, out: &mut impl FrameSink) -> Option<Instant> {
        let v6 = self.cfg.ipv6.clone()?;
        let due = *self.ipv6.next_ra.get_or_insert(now);
        if now >= due {
            if self.switch.ports().next().is_some() {
                self.send_router_advert(&v6, ALL_NODES, multicast_mac(&ALL_NODES), now, out);
            }
            self.ipv6.next_ra = Some(now + RA_INTERVAL);
        }
        self.ipv6.next_ra
    }

    /// DHCPv6 for what SLAAC does not carry (RFC 8415 §18.2.6, stateless):
    /// an Information-Request gets the DNS server and search list. Address
    /// requests (Solicit) go unanswered: addresses come from SLAAC.
    #[allow(clippy::too_many_arguments)]
    fn answer_dhcp6(
        &mut self,
        v6: &Ipv6Config,
        src_mac: EthernetAddress,
        header: &Ipv6Repr,
        client_port: u16,
        data: &[u8],
        now: Instant,
        out: &mut impl FrameSink,
    ) {
        // Only the client's DUID (at most 130 bytes, RFC 8415 §11.1) is read.
        let Some(msg) = rdnet_wire::dhcp::decode6_filtered(data, |code, len| code == 1 && (1..=130).contains(&len))
        else {
            self.stats.drops.dhcp_invalid += 1;
            return;
        };
        if msg.msg_type() != Dhcp6Type::InformationRequest || header.src_addr.is_unspecified() {
            return;
        }
        let mut reply = Dhcp6Message::new_with_id(Dhcp6Type::Reply, msg.xid());
        let opts = reply.opts_mut();
        // DUID-LL (type 3, hardware type 1) of the gateway's MAC.
        let mut duid = vec![0, 3, 0, 1];
        duid.extend_from_slice(&self.cfg.gateway_mac.0);
        opts.insert(DhcpOption::ServerId(duid));
        if let Some(DhcpOption::ClientId(id)) = msg.opts().get(dhcproto::v6::OptionCode::ClientId) {
            opts.insert(DhcpOption::ClientId(id.clone()));
        }
        opts.insert(DhcpOption::DomainNameServers(vec![v6.gateway]));
        let names: Vec<Name> = self.dhcp.current_search().iter().filter_map(|d| Name::from_utf8(d).ok()).collect();
        if !names.is_empty() {
            opts.insert(DhcpOption::DomainSearchList(names));
        }
        opts.insert(DhcpOption::InformationRefreshTime(DNS_LIFETIME_SECS));
        let Ok(bytes) = reply.to_vec() else { return };
        let src = if is_link_local(&header.src_addr) { v6.link_local } else { v6.gateway };
        self.stats.dhcp_replies += 1;
        self.send_udp6(
            SocketAddrV6::new(src, DHCP6_SERVER_PORT, 0, 0),
            SocketAddrV6::new(header.src_addr, client_port, 0, 0),
            src_mac,
            &bytes,
            now,
            out,
        );
    }

    /// Tells the sender of `packet` (a whole IPv6 packet, header first) that
    /// the gateway has no route for it (ICMPv6 destination unreachable,
    /// code 0), so a connect fails at once and happy eyeballs moves to
    /// IPv4. Rate limited.
    pub fn unreachable6(&mut self, header: &Ipv6Repr, packet: &[u8], now: Instant, out: &mut impl FrameSink) {
        let Some(v6) = self.cfg.ipv6.clone() else { return };
        let src = header.src_addr;
        if src.is_unspecified() || src.is_multicast() || !self.ipv6.error_allowed(now) {
            return;
        }
        let Some(mac) = self.ipv6.neighbor(&src) else {
            self.stats.drops.unknown_unicast += 1;
            return;
        };
        // Quote as much of the offending packet as keeps the error within
        // the minimum MTU (smoltcp writes the quoted header itself).
        let room = MIN_MTU6 - 40 - 8 - 40;
        let quoted = packet.get(40..).unwrap_or(&[]);
        let data = &quoted[..quoted.len().min(room)];
        let error = Icmpv6Repr::DstUnreachable { reason: Icmpv6DstUnreachable::NoRoute, header: *header, data };
        let from = if is_link_local(&src) { v6.link_local } else { v6.gateway };
        self.stats.icmp_unreachable += 1;
        self.send_icmpv6(from, src, mac, 64, &error, &[], now, out);
    }

    /// Asks who uses the guest address `ip` (a Neighbor Solicitation to its
    /// solicited-node group), as ARP does for IPv4: something is to be sent
    /// to a guest that has not spoken from that address yet (a port
    /// forward into it). Its answer teaches the neighbour table.
    pub fn neighbor_probe6(&mut self, ip: Ipv6Addr, now: Instant, out: &mut impl FrameSink) {
        let Some(v6) = self.cfg.ipv6.clone() else { return };
        let link_local = is_link_local(&ip);
        if !(link_local || v6.prefix.contains(&ip)) || v6.owns(&ip) || !self.ipv6.probes.allow(ip, now) {
            return;
        }
        let o = ip.octets();
        let group = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(o[13]), u16::from_be_bytes([o[14], o[15]]));
        let solicit = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr: ip,
            lladdr: Some(RawHardwareAddress::from(self.cfg.gateway_mac)),
        });
        let src = if link_local { v6.link_local } else { v6.gateway };
        self.send_icmpv6(src, group, multicast_mac(&group), 255, &solicit, &[], now, out);
    }

    /// Sends an ICMPv6 message (plus raw NDP options after it) from the
    /// gateway, with the checksum over both.
    #[allow(clippy::too_many_arguments)]
    fn send_icmpv6(
        &mut self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        dst_mac: EthernetAddress,
        hop_limit: u8,
        repr: &Icmpv6Repr,
        options: &[u8],
        now: Instant,
        out: &mut impl FrameSink,
    ) {
        let len = repr.buffer_len() + options.len();
        let ip =
            Ipv6Repr { src_addr: src, dst_addr: dst, next_header: IpProtocol::Icmpv6, payload_len: len, hop_limit };
        let mut buf = std::mem::take(&mut self.scratch);
        frame::ethernet(&mut buf, self.cfg.gateway_mac, dst_mac, EthernetProtocol::Ipv6, 40 + len, |b| {
            let mut ipp = Ipv6Packet::new_unchecked(&mut *b);
            ip.emit(&mut ipp);
            let body = &mut b[40..];
            let (head, tail) = body.split_at_mut(repr.buffer_len());
            tail.copy_from_slice(options);
            repr.emit(&src, &dst, &mut Icmpv6Packet::new_unchecked(head), &ChecksumCapabilities::ignored());
            let mut pkt = Icmpv6Packet::new_unchecked(body);
            pkt.fill_checksum(&src, &dst);
        });
        self.deliver(&buf, now, out);
        self.scratch = buf;
    }

    fn send_udp6(
        &mut self,
        src: SocketAddrV6,
        dst: SocketAddrV6,
        dst_mac: EthernetAddress,
        payload: &[u8],
        now: Instant,
        out: &mut impl FrameSink,
    ) {
        let udp = UdpRepr { src_port: src.port(), dst_port: dst.port() };
        let len = 8 + payload.len();
        let ip = Ipv6Repr {
            src_addr: *src.ip(),
            dst_addr: *dst.ip(),
            next_header: IpProtocol::Udp,
            payload_len: len,
            hop_limit: 64,
        };
        let mut buf = std::mem::take(&mut self.scratch);
        frame::ethernet(&mut buf, self.cfg.gateway_mac, dst_mac, EthernetProtocol::Ipv6, 40 + len, |b| {
            ip.emit(&mut Ipv6Packet::new_unchecked(&mut *b));
            udp.emit(
                &mut UdpPacket::new_unchecked(&mut b[40..]),
                &(*src.ip()).into(),
                &(*dst.ip()).into(),
                payload.len(),
                |p| p.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            );
        });
        self.deliver(&buf, now, out);
        self.scratch = buf;
    }

    /// Sends a UDP datagram from the gateway's `src` to a guest's IPv6
    /// address (DNS answers), if the guest's MAC is known.
    pub fn send_udp6_to_guest(
        &mut self,
        src: SocketAddrV6,
        dst: SocketAddrV6,
        payload: &[u8],
        now: Instant,
        out: &mut impl FrameSink,
    ) -> bool {
        let Some(mac) = self.ipv6.neighbor(dst.ip()) else {
            self.stats.drops.unknown_unicast += 1;
            self.neighbor_probe6(*dst.ip(), now, out);
            return false;
        };
        self.send_udp6(src, dst, mac, payload, now, out);
        true
    }

    /// Sends a complete IPv6 packet (the NAT's) to the guest that uses its
    /// destination address, if known.
    pub fn send_ipv6_to_guest(&mut self, packet: &[u8], now: Instant, out: &mut impl FrameSink) -> bool {
        let Ok(ip) = Ipv6Packet::new_checked(packet) else { return false };
        let mac = self.ipv6.neighbor(&ip.dst_addr());
        if mac.is_none() {
            self.neighbor_probe6(ip.dst_addr(), now, out);
        }
        self.send_packet_to(mac, EthernetProtocol::Ipv6, packet, now, out)
    }

    /// Why the IPv6 source of a frame from `src_mac` is not that guest's to
    /// use, if it is not (the IPv6 half of `spoofed_source`): a guest uses
    /// `::` (duplicate address detection), link-local addresses and
    /// addresses in the prefix, none of them the gateway's or one another
    /// connected guest is using; a Neighbor Advertisement may only speak
    /// for its sender's own addresses.
    pub(super) fn spoofed_source6(&self, src_mac: EthernetAddress, frame: &[u8]) -> Option<&'static str> {
        let v6 = self.cfg.ipv6.as_ref()?;
        let eth = EthernetFrame::new_unchecked(frame);
        let ip = Ipv6Packet::new_checked(eth.payload()).ok().filter(|ip| ip.version() == 6)?;
        let src = ip.src_addr();
        if src.is_unspecified() {
            return None;
        }
        if !is_link_local(&src) && !v6.prefix.contains(&src) {
            return Some("outside the IPv6 prefix");
        }
        if v6.owns(&src) {
            return Some("the gateway's address");
        }
        let taken_by_other = |ip: &Ipv6Addr| {
            self.ipv6.neighbor(ip).is_some_and(|mac| mac != src_mac && self.switch.lookup(&mac).is_some())
        };
        if taken_by_other(&src) {
            return Some("another guest's address");
        }
        if ip.next_header() == IpProtocol::Icmpv6
            && let Some(icmp) = ip.payload().get(..24)
            && icmp[0] == ICMPV6_NEIGHBOR_ADVERT
        {
            let target = Ipv6Addr::from(<[u8; 16]>::try_from(&icmp[8..24]).ok()?);
            if v6.owns(&target) {
                return Some("an advertisement for the gateway's address");
            }
            if taken_by_other(&target) {
                return Some("an advertisement for another guest's address");
            }
        }
        None
    }
}

fn parse_udp6<'a>(header: &Ipv6Repr, payload: &'a [u8]) -> Option<(u16, u16, &'a [u8])> {
    let udp = UdpPacket::new_checked(payload).ok()?;
    let repr = UdpRepr::parse(&udp, &header.src_addr.into(), &header.dst_addr.into(), &ChecksumCapabilities::default())
        .ok()?;
    let data = udp.payload();
    Some((repr.src_port, repr.dst_port, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_SUBNET6, DEVICE_MAC, NetConfig};
    use crate::switch::PortId;
    use dhcproto::Decodable;

    const GUEST2: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x22]);

    fn net() -> Network {
        let cfg = NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500)
            .unwrap()
            .with_ipv6(Some(DEFAULT_SUBNET6.parse().unwrap()))
            .unwrap();
        let mut n = Network::new(cfg);
        n.dhcp.set_search_for_tests(vec!["corp.example".into()]);
        n
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn guest_addr() -> Ipv6Addr {
        v6("fd5a:94ef:e40c:0:5894:efff:fee4:cee")
    }

    fn icmp_frame(
        src_mac: EthernetAddress,
        dst_mac: EthernetAddress,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hop: u8,
        r: &Icmpv6Repr,
    ) -> Vec<u8> {
        let ip = Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Icmpv6,
            payload_len: r.buffer_len(),
            hop_limit: hop,
        };
        let mut f = Vec::new();
        frame::ethernet(&mut f, src_mac, dst_mac, EthernetProtocol::Ipv6, 40 + r.buffer_len(), |b| {
            ip.emit(&mut Ipv6Packet::new_unchecked(&mut *b));
            r.emit(&src, &dst, &mut Icmpv6Packet::new_unchecked(&mut b[40..]), &ChecksumCapabilities::default());
        });
        f
    }

    fn udp_frame(
        src_mac: EthernetAddress,
        dst_mac: EthernetAddress,
        src: SocketAddrV6,
        dst: SocketAddrV6,
        data: &[u8],
    ) -> Vec<u8> {
        let mut f = Vec::new();
        let udp = UdpRepr { src_port: src.port(), dst_port: dst.port() };
        let ip = Ipv6Repr {
            src_addr: *src.ip(),
            dst_addr: *dst.ip(),
            next_header: IpProtocol::Udp,
            payload_len: 8 + data.len(),
            hop_limit: 64,
        };
        frame::ethernet(&mut f, src_mac, dst_mac, EthernetProtocol::Ipv6, 48 + data.len(), |b| {
            ip.emit(&mut Ipv6Packet::new_unchecked(&mut *b));
            udp.emit(
                &mut UdpPacket::new_unchecked(&mut b[40..]),
                &(*src.ip()).into(),
                &(*dst.ip()).into(),
                data.len(),
                |p| p.copy_from_slice(data),
                &ChecksumCapabilities::default(),
            );
        });
        f
    }

    /// The ICMPv6 messages sent to `port`, with their IPv6 headers.
    fn icmp_out(out: &[(PortId, Vec<u8>)], port: PortId) -> Vec<(EthernetAddress, Ipv6Repr, Vec<u8>)> {
        out.iter()
            .filter(|(p, _)| *p == port)
            .filter_map(|(_, f)| {
                let eth = EthernetFrame::new_checked(&f[..]).ok()?;
                let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
                let repr = Ipv6Repr::parse(&ip).ok()?;
                (repr.next_header == IpProtocol::Icmpv6).then(|| (eth.dst_addr(), repr, ip.payload().to_vec()))
            })
            .collect()
    }

    fn parse<'a>(h: &Ipv6Repr, body: &'a [u8]) -> Icmpv6Repr<'a> {
        Icmpv6Repr::parse(
            &h.src_addr,
            &h.dst_addr,
            &Icmpv6Packet::new_checked(body).unwrap(),
            &ChecksumCapabilities::default(),
        )
        .expect("a valid ICMPv6 message with a correct checksum")
    }

    #[test]
    fn router_solicitation_gets_an_advert_with_prefix_mtu_and_dns() {
        let mut n = net();
        let p = n.add_port();
        let rs = Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr: Some(DEVICE_MAC.into()) });
        let ll = v6("fe80::5894:efff:fee4:cee");
        let f = icmp_frame(DEVICE_MAC, multicast_mac(&v6("ff02::2")), ll, v6("ff02::2"), 255, &rs);
        let mut out = Vec::new();
        assert_eq!(n.handle_frame(p, &f, Instant::now(), &mut out), Upcall::None);
        let msgs = icmp_out(&out, p);
        assert_eq!(msgs.len(), 1, "{out:?}");
        let (mac, h, body) = &msgs[0];
        assert_eq!((*mac, h.src_addr, h.dst_addr, h.hop_limit), (DEVICE_MAC, v6("fe80::5894:efff:fee4:cdd"), ll, 255));
        let Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
            router_lifetime, mtu, prefix_info: Some(prefix), lladdr, ..
        }) = parse(h, body)
        else {
            panic!("not an RA");
        };
        assert_eq!(router_lifetime.secs(), 1800);
        assert_eq!(mtu, Some(1500));
        assert_eq!(lladdr, Some(n.cfg.gateway_mac.into()));
        assert_eq!((prefix.prefix, prefix.prefix_len), (v6("fd5a:94ef:e40c::"), 64));
        assert!(prefix.flags.contains(NdiscPrefixInfoFlags::ADDRCONF | NdiscPrefixInfoFlags::ON_LINK));
        let dns = rdnet_wire::ndp_dns::parse_ra_dns(body).unwrap();
        assert_eq!(dns.servers, vec![v6("fd5a:94ef:e40c::1")]);
        assert_eq!(dns.search, vec!["corp.example".to_string()]);
        // A solicitation that does not come from on-link (hop limit) is ignored.
        let f = icmp_frame(DEVICE_MAC, multicast_mac(&v6("ff02::2")), ll, v6("ff02::2"), 64, &rs);
        out.clear();
        n.handle_frame(p, &f, Instant::now(), &mut out);
        assert!(icmp_out(&out, p).is_empty());
    }

    #[test]
    fn periodic_adverts_go_to_all_nodes() {
        let mut n = net();
        let mut out = Vec::new();
        let t0 = Instant::now();
        // No port, nothing sent, but the timer runs.
        assert_eq!(n.poll_ipv6(t0, &mut out), Some(t0 + RA_INTERVAL));
        let p = n.add_port();
        assert_eq!(n.poll_ipv6(t0 + Duration::from_secs(1), &mut out), Some(t0 + RA_INTERVAL));
        assert!(out.is_empty());
        assert_eq!(n.poll_ipv6(t0 + RA_INTERVAL, &mut out), Some(t0 + RA_INTERVAL * 2));
        let msgs = icmp_out(&out, p);
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].0, msgs[0].1.dst_addr), (multicast_mac(&ALL_NODES), ALL_NODES));
        // IPv4-only: no timer at all.
        let mut n4 = Network::new(NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap());
        assert_eq!(n4.poll_ipv6(t0, &mut out), None);
    }

    #[test]
    fn neighbor_solicitations_for_the_gateways_addresses_only() {
        let mut n = net();
        let p = n.add_port();
        let p2 = n.add_port();
        let src = guest_addr();
        for (target, answered) in [
            (v6("fd5a:94ef:e40c::1"), true),
            (v6("fd5a:94ef:e40c::fe"), true),
            (v6("fe80::5894:efff:fee4:cdd"), true),
            (v6("fd5a:94ef:e40c::2"), false),
            (v6("fd5a:94ef:e40c:0:1:2:3:4"), false),
        ] {
            let ns =
                Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr: target, lladdr: Some(DEVICE_MAC.into()) });
            let group = Ipv6Addr::from(u128::from(v6("ff02::1:ff00:0")) | (u128::from(target) & 0xff_ffff));
            let f = icmp_frame(DEVICE_MAC, multicast_mac(&group), src, group, 255, &ns);
            let mut out = Vec::new();
            n.handle_frame(p, &f, Instant::now(), &mut out);
            // Multicast: the other guest hears it too (its own DAD, its own answer).
            assert!(out.iter().any(|(q, _)| *q == p2), "{target}");
            let msgs = icmp_out(&out, p);
            assert_eq!(msgs.len(), answered as usize, "{target}");
            if answered {
                let (mac, h, body) = &msgs[0];
                assert_eq!((*mac, h.dst_addr, h.src_addr, h.hop_limit), (DEVICE_MAC, src, target, 255));
                let Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert { flags, target_addr, lladdr }) = parse(h, body) else {
                    panic!()
                };
                assert_eq!(target_addr, target);
                assert_eq!(lladdr, Some(n.cfg.gateway_mac.into()));
                assert!(flags.contains(NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE));
                assert_eq!(flags.contains(NdiscNeighborFlags::ROUTER), target != v6("fd5a:94ef:e40c::fe"));
            }
        }
        // Duplicate address detection of the gateway's address: defended to all nodes.
        let target = v6("fd5a:94ef:e40c::1");
        let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr: target, lladdr: None });
        let f = icmp_frame(
            GUEST2,
            multicast_mac(&v6("ff02::1:ff00:1")),
            Ipv6Addr::UNSPECIFIED,
            v6("ff02::1:ff00:1"),
            255,
            &ns,
        );
        let mut out = Vec::new();
        n.handle_frame(p2, &f, Instant::now(), &mut out);
        let msgs = icmp_out(&out, p2);
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].0, msgs[0].1.dst_addr), (multicast_mac(&ALL_NODES), ALL_NODES));
    }

    #[test]
    fn an_unknown_guest_address_is_solicited_once_a_second() {
        let mut n = net();
        let p = n.add_port();
        let target = v6("fd5a:94ef:e40c:0:5894:efff:fee4:cee");
        let t0 = Instant::now();
        let mut out = Vec::new();
        let udp = |n: &mut Network, t, out: &mut Vec<_>| {
            let src = SocketAddrV6::new(v6("fd5a:94ef:e40c::1"), 53, 0, 0);
            n.send_udp6_to_guest(src, SocketAddrV6::new(target, 4000, 0, 0), b"x", t, out)
        };
        assert!(!udp(&mut n, t0, &mut out), "no MAC yet: nothing sent");
        let msgs = icmp_out(&out, p);
        assert_eq!(msgs.len(), 1);
        let group = v6("ff02::1:ffe4:cee");
        let (mac, h, body) = &msgs[0];
        assert_eq!(
            (*mac, h.src_addr, h.dst_addr, h.hop_limit),
            (multicast_mac(&group), v6("fd5a:94ef:e40c::1"), group, 255)
        );
        let Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr, lladdr }) = parse(h, body) else { panic!() };
        assert_eq!((target_addr, lladdr), (target, Some(n.cfg.gateway_mac.into())));
        // Not again within the second; again after it; never for what is
        // not a guest's (outside the prefix, the gateway's own).
        out.clear();
        udp(&mut n, t0 + Duration::from_millis(500), &mut out);
        assert!(icmp_out(&out, p).is_empty());
        udp(&mut n, t0 + Duration::from_secs(1), &mut out);
        assert_eq!(icmp_out(&out, p).len(), 1);
        out.clear();
        n.neighbor_probe6(v6("2001:db8::1"), t0, &mut out);
        n.neighbor_probe6(v6("fd5a:94ef:e40c::1"), t0, &mut out);
        assert!(out.is_empty());
        // The guest's answer teaches the table: then the datagram goes.
        let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags: NdiscNeighborFlags::SOLICITED,
            target_addr: target,
            lladdr: Some(DEVICE_MAC.into()),
        });
        let f = icmp_frame(DEVICE_MAC, n.cfg.gateway_mac, target, v6("fd5a:94ef:e40c::1"), 255, &na);
        n.handle_frame(p, &f, t0, &mut out);
        assert!(udp(&mut n, t0 + Duration::from_secs(2), &mut out));
    }

    #[test]
    fn echo_to_the_gateway_and_upcalls_for_the_rest() {
        let mut n = net();
        let p = n.add_port();
        let src = guest_addr();
        let ping = Icmpv6Repr::EchoRequest { ident: 7, seq_no: 3, data: b"hello" };
        let f = icmp_frame(DEVICE_MAC, n.cfg.gateway_mac, src, v6("fd5a:94ef:e40c::1"), 64, &ping);
        let mut out = Vec::new();
        assert_eq!(n.handle_frame(p, &f, Instant::now(), &mut out), Upcall::None);
        let msgs = icmp_out(&out, p);
        assert_eq!(msgs.len(), 1);
        assert_eq!(parse(&msgs[0].1, &msgs[0].2), Icmpv6Repr::EchoReply { ident: 7, seq_no: 3, data: b"hello" });
        // The host alias's pings and anything routed go up, never answered here.
        for dst in [v6("fd5a:94ef:e40c::fe"), v6("2001:db8::1")] {
            let f = icmp_frame(DEVICE_MAC, n.cfg.gateway_mac, src, dst, 64, &ping);
            out.clear();
            assert!(matches!(n.handle_frame(p, &f, Instant::now(), &mut out), Upcall::Ipv6 { .. }), "{dst}");
            assert!(out.is_empty());
        }
        // The shell's answer for what it cannot route: "no route", from the gateway.
        let f = icmp_frame(DEVICE_MAC, n.cfg.gateway_mac, src, v6("2001:db8::1"), 64, &ping);
        let Upcall::Ipv6 { header, packet, .. } = n.handle_frame(p, &f, Instant::now(), &mut out) else { panic!() };
        let (header, packet) = (header, packet.to_vec());
        n.unreachable6(&header, &packet, Instant::now(), &mut out);
        let msgs = icmp_out(&out, p);
        assert_eq!(msgs.len(), 1);
        let Icmpv6Repr::DstUnreachable { reason, header: quoted, .. } = parse(&msgs[0].1, &msgs[0].2) else { panic!() };
        assert_eq!(
            (reason, quoted.dst_addr, msgs[0].1.src_addr),
            (Icmpv6DstUnreachable::NoRoute, v6("2001:db8::1"), v6("fd5a:94ef:e40c::1"))
        );
    }

    #[test]
    fn unreachable_errors_are_rate_limited() {
        let mut n = net();
        let p = n.add_port();
        let ping = Icmpv6Repr::EchoRequest { ident: 1, seq_no: 1, data: b"x" };
        let f = icmp_frame(DEVICE_MAC, n.cfg.gateway_mac, guest_addr(), v6("2001:db8::1"), 64, &ping);
        let t = Instant::now();
        let mut out = Vec::new();
        for _ in 0..1000 {
            if let Upcall::Ipv6 { header, packet, .. } = n.handle_frame(p, &f, t, &mut Vec::new()) {
                let packet = packet.to_vec();
                n.unreachable6(&header, &packet, t, &mut out);
            }
        }
        assert_eq!(icmp_out(&out, p).len(), ERRORS_PER_SECOND as usize);
    }

    #[test]
    fn dhcpv6_information_request_gets_dns() {
        let mut n = net();
        let p = n.add_port();
        let mut req = Dhcp6Message::new_with_id(Dhcp6Type::InformationRequest, [1, 2, 3]);
        req.opts_mut().insert(DhcpOption::ClientId(vec![0, 3, 0, 1, 5, 6, 7, 8, 9, 10]));
        let ll = v6("fe80::5894:efff:fee4:cee");
        let f = udp_frame(
            DEVICE_MAC,
            multicast_mac(&ALL_DHCP_AGENTS),
            SocketAddrV6::new(ll, DHCP6_CLIENT_PORT, 0, 0),
            SocketAddrV6::new(ALL_DHCP_AGENTS, DHCP6_SERVER_PORT, 0, 0),
            &req.to_vec().unwrap(),
        );
        let mut out = Vec::new();
        assert_eq!(n.handle_frame(p, &f, Instant::now(), &mut out), Upcall::None);
        let replies: Vec<_> = out.iter().filter(|(q, _)| *q == p).collect();
        assert_eq!(replies.len(), 1);
        let eth = EthernetFrame::new_checked(&replies[0].1[..]).unwrap();
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        let h = Ipv6Repr::parse(&ip).unwrap();
        let (sport, dport, data) = parse_udp6(&h, ip.payload()).unwrap();
        assert_eq!((h.src_addr, h.dst_addr, sport, dport), (v6("fe80::5894:efff:fee4:cdd"), ll, 547, 546));
        let reply = Dhcp6Message::from_bytes(data).unwrap();
        assert_eq!((reply.msg_type(), reply.xid()), (Dhcp6Type::Reply, [1, 2, 3]));
        let get = |code| reply.opts().get(code).cloned();
        use dhcproto::v6::OptionCode;
        assert_eq!(
            get(OptionCode::DomainNameServers),
            Some(DhcpOption::DomainNameServers(vec![v6("fd5a:94ef:e40c::1")]))
        );
        assert_eq!(get(OptionCode::ClientId), Some(DhcpOption::ClientId(vec![0, 3, 0, 1, 5, 6, 7, 8, 9, 10])));
        assert!(matches!(get(OptionCode::DomainSearchList), Some(DhcpOption::DomainSearchList(l)) if l.len() == 1));
        // Garbage is counted, not answered.
        let f = udp_frame(
            DEVICE_MAC,
            multicast_mac(&ALL_DHCP_AGENTS),
            SocketAddrV6::new(ll, 546, 0, 0),
            SocketAddrV6::new(ALL_DHCP_AGENTS, 547, 0, 0),
            &[1],
        );
        out.clear();
        n.handle_frame(p, &f, Instant::now(), &mut out);
        assert!(out.iter().all(|(q, _)| *q != p));
    }

    #[test]
    fn guests_speak_only_for_their_own_ipv6_addresses() {
        let mut n = net();
        let p1 = n.add_port();
        let p2 = n.add_port();
        let now = Instant::now();
        let ping = Icmpv6Repr::EchoRequest { ident: 1, seq_no: 1, data: b"x" };
        let gw = v6("fd5a:94ef:e40c::1");
        let mut out = Vec::new();
        // Guest 1 uses its address first.
        n.handle_frame(p1, &icmp_frame(DEVICE_MAC, n.cfg.gateway_mac, guest_addr(), gw, 64, &ping), now, &mut out);
        assert_eq!(n.ipv6.neighbor(&guest_addr()), Some(DEVICE_MAC));
        let before = n.stats.drops.spoofed_source;
        for (src, what) in
            [(guest_addr(), "another guest's"), (gw, "the gateway's"), (v6("2001:db8::5"), "outside the prefix")]
        {
            out.clear();
            n.handle_frame(p2, &icmp_frame(GUEST2, n.cfg.gateway_mac, src, gw, 64, &ping), now, &mut out);
            assert!(out.is_empty(), "{what}");
        }
        // Nor may it advertise guest 1's address as its own.
        let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags: NdiscNeighborFlags::OVERRIDE,
            target_addr: guest_addr(),
            lladdr: Some(GUEST2.into()),
        });
        out.clear();
        n.handle_frame(
            p2,
            &icmp_frame(GUEST2, multicast_mac(&ALL_NODES), v6("fe80::2"), ALL_NODES, 255, &na),
            now,
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(n.stats.drops.spoofed_source, before + 4);
        // Its own addresses are fine, and DAD probes (from ::) too.
        out.clear();
        n.handle_frame(
            p2,
            &icmp_frame(GUEST2, n.cfg.gateway_mac, v6("fd5a:94ef:e40c::22"), gw, 64, &ping),
            now,
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(n.stats.drops.spoofed_source, before + 4);
    }

    #[test]
    fn the_neighbour_table_is_bounded_per_mac_and_in_total() {
        let mut n = net();
        let p = n.add_port();
        let ping = Icmpv6Repr::EchoRequest { ident: 1, seq_no: 1, data: b"x" };
        let gw = v6("fd5a:94ef:e40c::1");
        let t0 = Instant::now();
        // One guest cycling through random sources only churns its own entries.
        for i in 0..1000u32 {
            let src = Ipv6Addr::from(u128::from(v6("fd5a:94ef:e40c::")) | u128::from(i + 0x1000));
            n.handle_frame(
                p,
                &icmp_frame(DEVICE_MAC, n.cfg.gateway_mac, src, gw, 64, &ping),
                t0 + Duration::from_millis(i.into()),
                &mut Vec::new(),
            );
        }
        assert_eq!(n.ipv6.len(), MAX_ADDRESSES_PER_MAC);
        // The newest stay.
        let newest = Ipv6Addr::from(u128::from(v6("fd5a:94ef:e40c::")) | u128::from(999u32 + 0x1000));
        assert_eq!(n.ipv6.neighbor(&newest), Some(DEVICE_MAC));
        // Another guest still gets its address learned.
        let q = n.add_port();
        n.handle_frame(
            q,
            &icmp_frame(GUEST2, n.cfg.gateway_mac, v6("fd5a:94ef:e40c::22"), gw, 64, &ping),
            t0,
            &mut Vec::new(),
        );
        assert_eq!(n.ipv6.neighbor(&v6("fd5a:94ef:e40c::22")), Some(GUEST2));
        // The total bound holds however many MACs there are.
        let mut s = Ipv6State::default();
        for i in 0..(MAX_NEIGHBORS6 as u32 + 100) {
            let mac = EthernetAddress([2, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8, 1]);
            s.remember(Ipv6Addr::from(u128::from(i) + 1), mac, t0);
        }
        assert_eq!(s.len(), MAX_NEIGHBORS6);
        // MACs the full table turned away leave nothing behind.
        assert_eq!(s.by_mac.len(), MAX_NEIGHBORS6);
    }

    #[test]
    fn ipv4_only_networks_leave_ipv6_alone() {
        let mut n = Network::new(NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap());
        let p = n.add_port();
        let rs = Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr: None });
        let f = icmp_frame(DEVICE_MAC, multicast_mac(&v6("ff02::2")), v6("fe80::1"), v6("ff02::2"), 255, &rs);
        let mut out = Vec::new();
        assert_eq!(n.handle_frame(p, &f, Instant::now(), &mut out), Upcall::None);
        assert!(out.is_empty());
    }
}
