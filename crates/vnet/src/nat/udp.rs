//! UDP NAT, the sans-I/O core: guest datagrams to any address leave
//! through host sockets the shell (`shell::udp`) owns.
//!
//! How this works: a flow is a guest (source, destination) pair, numbered
//! by a [`FlowId`] the shell knows its host socket by. The shell hands the
//! core each event with the time it happened (`now`, the only clock) and
//! does what the core answers: a guest datagram with no flow is checked
//! against the [`NatPolicy`] (the host alias becomes 127.0.0.1; refused
//! destinations are counted and logged, rate-limited) and answered with
//! "open a socket for flow N connected to T"; the shell reports whether it
//! could ([`UdpCore::opened`], [`UdpCore::open_failed`]) and the result of
//! each send ([`UdpCore::sent`]). A datagram the host socket received is
//! answered with the addresses to hand it to the guest from and to (the
//! original destination, not the host's address), or with nothing when it
//! does not fit the link. ECONNREFUSED on a flow's socket (the host got an
//! ICMP error for it) is answered with an ICMP port-unreachable packet for
//! the guest, built from the flow's addresses.
//!
//! Timers: every flow remembers when it last carried a datagram either way;
//! [`UdpCore::next_deadline`] says when the next one goes idle (90 s by
//! default) and [`UdpCore::expire`] returns the flows to close then. A new
//! flow's deadline is never earlier than the earliest one already there, so
//! one timer in the shell suffices. Bounds: at most `max_flows` flows; a new
//! one first reaps idle flows, then evicts the least recently used. No
//! tokio, no sockets and no clock here: [`FlowTable`] and [`UdpCore`] are
//! driven entirely by their arguments and unit-tested that way.

use std::collections::BTreeMap;

use crate::FastMap;
use std::hash::Hash;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr, IpProtocol,
    Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
};

use crate::nat::NatPolicy;
use crate::ratelimit::LogLimiter;
use rdnet_wire::frame::{IPV4_HEADER, UDP_HEADER};

/// A bounded table of flows with least-recently-used eviction and idle
/// expiry. Sans-I/O: every operation takes `now`.
#[derive(Debug)]
pub struct FlowTable<K, V> {
    map: FastMap<K, Slot<V>>,
    /// Flows by last use (oldest first); the `u64` breaks ties.
    order: BTreeMap<(Instant, u64), K>,
    next_seq: u64,
    max: usize,
    idle: Duration,
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    last: Instant,
    seq: u64,
}

impl<K: Hash + Eq + Clone, V> FlowTable<K, V> {
    pub fn new(max: usize, idle: Duration) -> Self {
        FlowTable { map: FastMap::default(), order: BTreeMap::new(), next_seq: 0, max: max.max(1), idle }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle
    }

    /// The flow for `key`, marked as used at `now`.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<&mut V> {
        self.touch(key, now);
        self.map.get_mut(key).map(|s| &mut s.value)
    }

    /// The flow for `key` without marking it used.
    pub fn peek(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|s| &s.value)
    }

    /// When the flow was last used.
    pub fn last_used(&self, key: &K) -> Option<Instant> {
        self.map.get(key).map(|s| s.last)
    }

    /// Marks the flow used at `now` (time never goes backwards here).
    pub fn touch(&mut self, key: &K, now: Instant) {
        let Some(slot) = self.map.get_mut(key) else { return };
        if now <= slot.last {
            return;
        }
        self.order.remove(&(slot.last, slot.seq));
        slot.last = now;
        slot.seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert((slot.last, slot.seq), key.clone());
    }

    /// Inserts a new flow (replacing one with the same key). Returns the
    /// flows that had to go: idle ones first, then the least recently used
    /// while the table is full.
    pub fn insert(&mut self, key: K, value: V, now: Instant) -> Vec<(K, V)> {
        let mut gone = Vec::new();
        if let Some(old) = self.remove(&key) {
            gone.push((key.clone(), old));
        }
        gone.extend(self.expire(now));
        while self.map.len() >= self.max {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some(slot) = self.map.remove(&oldest) {
                gone.push((oldest, slot.value));
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert((now, seq), key.clone());
        self.map.insert(key, Slot { value, last: now, seq });
        gone
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let slot = self.map.remove(key)?;
        self.order.remove(&(slot.last, slot.seq));
        Some(slot.value)
    }

    /// Removes and returns every flow idle for at least the idle timeout.
    pub fn expire(&mut self, now: Instant) -> Vec<(K, V)> {
        let mut gone = Vec::new();
        while let Some(entry) = self.order.first_entry() {
            let (last, _) = *entry.key();
            if now.saturating_duration_since(last) < self.idle {
                break;
            }
            let key = entry.remove();
            if let Some(slot) = self.map.remove(&key) {
                gone.push((key, slot.value));
            }
        }
        gone
    }

    /// When the flow becomes idle, if nothing uses it before.
    pub fn deadline(&self, key: &K) -> Option<Instant> {
        self.last_used(key).map(|t| t + self.idle)
    }

    /// When the least recently used flow becomes idle, if there is one.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.order.first_key_value().map(|((last, _), _)| *last + self.idle)
    }
}

/// Counters for `/stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UdpNatStats {
    pub flows_opened: u64,
    pub flows_evicted: u64,
    pub flows_expired: u64,
    pub datagrams_out: u64,
    pub datagrams_in: u64,
    /// Destinations the NAT policy refuses.
    pub refused: u64,
    /// Datagrams the host would not take (socket errors, full buffers).
    pub send_errors: u64,
    /// Host sockets that could not be opened.
    pub open_errors: u64,
    /// Replies larger than one datagram on the virtual link.
    pub oversize_replies: u64,
    pub port_unreachable_sent: u64,
}

/// A flow's guest-side addresses: (guest source, destination it sent to),
/// both of one family.
pub type FlowKey = (SocketAddr, SocketAddr);
/// What the shell knows a flow's host socket by. Never reused.
pub type FlowId = u64;

/// Where a guest datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Send it on this flow's socket, then report with [`UdpCore::sent`].
    Flow(FlowId),
    /// Open a socket connected to `target` for a new flow `id`, report with
    /// [`UdpCore::opened`] or [`UdpCore::open_failed`], then send.
    Open { id: FlowId, target: SocketAddr },
    /// Refused by the NAT policy: drop it.
    Refused,
}

/// The UDP NAT's state: flows, counters, and the log limiter for what a
/// guest can make it say.
pub struct UdpCore {
    table: FlowTable<FlowKey, FlowId>,
    keys: FastMap<FlowId, FlowKey>,
    next_id: FlowId,
    /// Largest reply payload one frame on the guest link carries (over
    /// IPv4; IPv6's header takes 20 bytes more).
    link_max: usize,
    logs: LogLimiter,
    stats: UdpNatStats,
}

impl UdpCore {
    /// `link_mtu`: the IP MTU of the guest links.
    pub fn new(max_flows: usize, idle: Duration, link_mtu: usize) -> Self {
        UdpCore {
            table: FlowTable::new(max_flows, idle),
            keys: FastMap::default(),
            next_id: 0,
            link_max: link_mtu.saturating_sub(IPV4_HEADER + UDP_HEADER),
            logs: LogLimiter::default(),
            stats: UdpNatStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn stats(&self) -> UdpNatStats {
        self.stats
    }

    /// The flow carrying `key`, if there is one.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowId> {
        self.table.peek(key).copied()
    }

    /// A guest datagram from `src` to `dst` at `now`: which flow carries it.
    pub fn route_guest(&mut self, now: Instant, policy: &NatPolicy, src: SocketAddr, dst: SocketAddr) -> Route {
        if let Some(&mut id) = self.table.get(&(src, dst), now) {
            return Route::Flow(id);
        }
        match policy.translate_ip(dst.ip()) {
            Ok(ip) => {
                self.next_id += 1;
                Route::Open { id: self.next_id, target: SocketAddr::new(ip, dst.port()) }
            }
            Err(why) => {
                self.stats.refused += 1;
                crate::limited_warn!(self.logs, now, "udp-refused", %src, %dst, reason = %why, "dropping UDP datagram");
                Route::Refused
            }
        }
    }

    /// The shell opened flow `id`'s socket for `key`: the flow exists from
    /// now on. Returns the flows that had to go to make room (close them).
    pub fn opened(&mut self, now: Instant, key: FlowKey, id: FlowId) -> Vec<FlowId> {
        let (src, dst) = key;
        let mut gone = Vec::new();
        // Idle flows reaped here count as evicted too: room was wanted.
        for (k, old) in self.table.insert(key, id, now) {
            self.forget(k, old, false);
            gone.push(old);
        }
        self.keys.insert(id, key);
        self.stats.flows_opened += 1;
        tracing::debug!(%src, %dst, flows = self.table.len(), "UDP flow opened");
        gone
    }

    /// The shell could not open a socket for `key`.
    pub fn open_failed(&mut self, now: Instant, key: FlowKey, target: SocketAddr, error: &io::Error) {
        let (src, dst) = key;
        self.stats.open_errors += 1;
        crate::limited_warn!(self.logs, now, "udp-open", %src, %dst, %target, error = %error, "cannot open host UDP socket");
    }

    /// How a send of `payload_len` bytes on flow `id` went. Returns an
    /// ICMP port-unreachable packet for the guest when the host refused.
    pub fn sent(&mut self, now: Instant, id: FlowId, payload_len: usize, result: io::Result<()>) -> Option<Vec<u8>> {
        let &(src, dst) = self.keys.get(&id)?;
        match result {
            Ok(()) => {
                self.stats.datagrams_out += 1;
                None
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => port_unreachable_packet(src, dst, payload_len),
            Err(e) => {
                self.stats.send_errors += 1;
                crate::limited_warn!(self.logs, now, "udp-send", %src, %dst, error = %e, "dropping UDP datagram: host send failed");
                None
            }
        }
    }

    /// A datagram of `len` bytes read from flow `id`'s socket at `now`:
    /// the (source, destination) to hand it to the guest with, or `None`
    /// (the flow is gone, or the datagram is larger than the link carries).
    pub fn host_datagram(&mut self, now: Instant, id: FlowId, len: usize) -> Option<(SocketAddr, SocketAddr)> {
        let &key = self.keys.get(&id)?;
        let (src, dst) = key;
        self.table.touch(&key, now);
        let link_max = if src.is_ipv6() { self.link_max.saturating_sub(20) } else { self.link_max };
        if len > link_max {
            self.stats.oversize_replies += 1;
            crate::limited_warn!(self.logs, now, "udp-oversize", %src, %dst, len, max = link_max, "dropping UDP reply larger than the link allows");
            return None;
        }
        self.stats.datagrams_in += 1;
        // From the address the guest sent to, not the host's.
        Some((dst, src))
    }

    /// Flow `id`'s socket said ECONNREFUSED (the host got an ICMP error for
    /// it): the port-unreachable packet for the guest.
    pub fn host_refused(&self, id: FlowId) -> Option<Vec<u8>> {
        let &(src, dst) = self.keys.get(&id)?;
        port_unreachable_packet(src, dst, 0)
    }

    /// A port-unreachable the core built reached the guest.
    pub fn port_unreachable_sent(&mut self) {
        self.stats.port_unreachable_sent += 1;
    }

    /// A read from flow `id`'s socket failed (other than ECONNREFUSED).
    pub fn host_error(&mut self, now: Instant, id: FlowId, error: &io::Error) {
        if let Some(&(src, dst)) = self.keys.get(&id) {
            crate::limited_warn!(self.logs, now, "udp-recv", %src, %dst, error = %error, "UDP reply error");
        }
    }

    /// Flow `id`'s socket failed for good: the flow ends (the shell closes
    /// the socket). False if there was no such flow.
    pub fn host_failed(&mut self, id: FlowId) -> bool {
        let Some(key) = self.keys.get(&id).copied() else { return false };
        self.table.remove(&key);
        self.forget(key, id, false);
        true
    }

    /// When the next flow goes idle, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.table.next_deadline()
    }

    /// The flows idle at `now`: they end (the shell closes their sockets).
    pub fn expire(&mut self, now: Instant) -> Vec<FlowId> {
        let gone = self.table.expire(now);
        gone.into_iter()
            .map(|(key, id)| {
                self.forget(key, id, true);
                id
            })
            .collect()
    }

    fn forget(&mut self, (src, dst): FlowKey, id: FlowId, expired: bool) {
        self.keys.remove(&id);
        tracing::debug!(%src, %dst, expired, "UDP flow closed");
        if expired {
            self.stats.flows_expired += 1;
        } else {
            self.stats.flows_evicted += 1;
        }
    }
}

/// An ICMP port-unreachable from `dst` to `src` quoting a datagram from `src`
/// to `dst`: its IP header and the 8-byte UDP header (checksum 0, "none",
/// since the payload is not kept; the guest matches on addresses and ports).
/// ICMPv6 for IPv6 flows; `None` for a key of mixed families.
pub fn port_unreachable_packet(src: SocketAddr, dst: SocketAddr, payload_len: usize) -> Option<Vec<u8>> {
    let udp_len = (UDP_HEADER + payload_len).min(u16::MAX as usize - IPV4_HEADER);
    let mut udp = [0u8; UDP_HEADER];
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let caps = ChecksumCapabilities::default();
    match (src, dst) {
        (SocketAddr::V4(src), SocketAddr::V4(dst)) => {
            let quoted = Ipv4Repr {
                src_addr: *src.ip(),
                dst_addr: *dst.ip(),
                next_header: IpProtocol::Udp,
                payload_len: udp_len,
                hop_limit: 64,
            };
            let icmp = Icmpv4Repr::DstUnreachable {
                reason: Icmpv4DstUnreachable::PortUnreachable,
                header: quoted,
                data: &udp,
            };
            let ip = Ipv4Repr {
                src_addr: *dst.ip(),
                dst_addr: *src.ip(),
                next_header: IpProtocol::Icmp,
                payload_len: icmp.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; IPV4_HEADER + icmp.buffer_len()];
            ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
            icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[IPV4_HEADER..]), &caps);
            Some(buf)
        }
        (SocketAddr::V6(src), SocketAddr::V6(dst)) => {
            let quoted = Ipv6Repr {
                src_addr: *src.ip(),
                dst_addr: *dst.ip(),
                next_header: IpProtocol::Udp,
                payload_len: udp_len,
                hop_limit: 64,
            };
            let icmp = Icmpv6Repr::DstUnreachable {
                reason: Icmpv6DstUnreachable::PortUnreachable,
                header: quoted,
                data: &udp,
            };
            let ip = Ipv6Repr {
                src_addr: *dst.ip(),
                dst_addr: *src.ip(),
                next_header: IpProtocol::Icmpv6,
                payload_len: icmp.buffer_len(),
                hop_limit: 64,
            };
            let mut buf = vec![0u8; 40 + icmp.buffer_len()];
            ip.emit(&mut Ipv6Packet::new_unchecked(&mut buf[..]));
            icmp.emit(dst.ip(), src.ip(), &mut Icmpv6Packet::new_unchecked(&mut buf[40..]), &caps);
            Some(buf)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetConfig;
    use std::net::{IpAddr, Ipv4Addr};

    fn policy() -> NatPolicy {
        NatPolicy::new(&NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap(), false)
    }

    fn guest(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(192, 168, 127, 2), port))
    }

    const ALIAS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 127, 254)), 5353);

    /// Opens a flow the way the shell does; returns its id.
    fn open(core: &mut UdpCore, now: Instant, src: SocketAddr, dst: SocketAddr) -> (FlowId, Vec<FlowId>) {
        match core.route_guest(now, &policy(), src, dst) {
            Route::Open { id, target } => {
                assert_eq!(target.port(), dst.port());
                let gone = core.opened(now, (src, dst), id);
                (id, gone)
            }
            other => panic!("expected a new flow, got {other:?}"),
        }
    }

    #[test]
    fn core_opens_once_then_routes_to_the_flow_and_back() {
        let t = t0();
        let mut core = UdpCore::new(8, Duration::from_secs(90), 1500);
        let (id, gone) = open(&mut core, t, guest(1000), ALIAS);
        assert!(gone.is_empty());
        // The host alias is the host's loopback.
        let Route::Open { target, .. } =
            UdpCore::new(8, Duration::from_secs(90), 1500).route_guest(t, &policy(), guest(1), ALIAS)
        else {
            panic!()
        };
        assert_eq!(target.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(core.route_guest(t, &policy(), guest(1000), ALIAS), Route::Flow(id));
        assert_eq!(core.sent(t, id, 3, Ok(())), None);
        // Replies come from the address the guest sent to.
        assert_eq!(core.host_datagram(t, id, 100), Some((ALIAS, guest(1000))));
        // Larger than the link: dropped and counted.
        assert_eq!(core.host_datagram(t, id, 1500 - 28 + 1), None);
        assert_eq!(core.host_datagram(t, id, 1500 - 28), Some((ALIAS, guest(1000))));
        let s = core.stats();
        assert_eq!((s.flows_opened, s.datagrams_out, s.datagrams_in, s.oversize_replies), (1, 1, 2, 1));
        // An unknown flow (closed meanwhile) gets nothing.
        assert_eq!(core.host_datagram(t, id + 1, 10), None);
        assert_eq!(core.sent(t, id + 1, 10, Ok(())), None);
    }

    #[test]
    fn core_refuses_by_policy_and_counts_failures() {
        let t = t0();
        let mut core = UdpCore::new(8, Duration::from_secs(90), 1500);
        for dst in
            [SocketAddr::from((Ipv4Addr::BROADCAST, 9)), SocketAddr::from((Ipv4Addr::new(169, 254, 169, 254), 80))]
        {
            assert_eq!(core.route_guest(t, &policy(), guest(1), dst), Route::Refused);
        }
        assert_eq!(core.stats().refused, 2);
        assert!(core.is_empty());
        let Route::Open { id, target } = core.route_guest(t, &policy(), guest(1), ALIAS) else { panic!() };
        core.open_failed(t, (guest(1), ALIAS), target, &io::Error::other("no"));
        assert_eq!((core.stats().open_errors, core.len(), core.flow(&(guest(1), ALIAS))), (1, 0, None));
        let (id2, _) = open(&mut core, t, guest(1), ALIAS);
        assert_ne!(id, id2, "ids are never reused");
        assert_eq!(core.sent(t, id2, 5, Err(io::ErrorKind::WouldBlock.into())), None);
        assert_eq!(core.stats().send_errors, 1);
        // Refused by the host: an ICMP port-unreachable quoting the datagram.
        let icmp = core.sent(t, id2, 5, Err(io::ErrorKind::ConnectionRefused.into())).unwrap();
        assert_eq!(Some(icmp), port_unreachable_packet(guest(1), ALIAS, 5));
        assert_eq!(core.host_refused(id2), port_unreachable_packet(guest(1), ALIAS, 0));
        // A socket that fails for good ends its flow, once.
        assert!(core.host_failed(id2));
        assert!(!core.host_failed(id2));
        assert!(core.is_empty());
        assert_eq!(core.host_refused(id2), None);
    }

    #[test]
    fn core_evicts_the_least_recently_used_and_expires_idle_flows() {
        let t = t0();
        let idle = Duration::from_secs(90);
        let mut core = UdpCore::new(2, idle, 1500);
        let (a, _) = open(&mut core, t, guest(1), ALIAS);
        let (b, _) = open(&mut core, t + Duration::from_secs(1), guest(2), ALIAS);
        // A reply keeps `a` in use: `b` is the one to go.
        assert!(core.host_datagram(t + Duration::from_secs(2), a, 10).is_some());
        let (c, gone) = open(&mut core, t + Duration::from_secs(3), guest(3), ALIAS);
        assert_eq!(gone, vec![b]);
        assert_eq!(core.stats().flows_evicted, 1);
        assert_eq!(core.host_datagram(t + Duration::from_secs(3), b, 10), None);
        // One timer: the next deadline is the least recently used flow's.
        assert_eq!(core.next_deadline(), Some(t + Duration::from_secs(2) + idle));
        assert!(core.expire(t + Duration::from_secs(2) + idle - Duration::from_millis(1)).is_empty());
        assert_eq!(core.expire(t + Duration::from_secs(2) + idle), vec![a]);
        assert_eq!(core.next_deadline(), Some(t + Duration::from_secs(3) + idle));
        assert_eq!(core.expire(t + Duration::from_secs(3600)), vec![c]);
        assert_eq!((core.stats().flows_expired, core.len(), core.next_deadline()), (2, 0, None));
    }

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn lru_eviction() {
        let now = t0();
        let mut t: FlowTable<u32, &str> = FlowTable::new(3, Duration::from_secs(90));
        assert!(t.insert(1, "a", now).is_empty());
        assert!(t.insert(2, "b", now + Duration::from_secs(1)).is_empty());
        assert!(t.insert(3, "c", now + Duration::from_secs(2)).is_empty());
        // Using 1 makes 2 the least recently used.
        assert_eq!(t.get(&1, now + Duration::from_secs(3)), Some(&mut "a"));
        let gone = t.insert(4, "d", now + Duration::from_secs(4));
        assert_eq!(gone, vec![(2, "b")]);
        assert_eq!(t.len(), 3);
        assert!(t.peek(&2).is_none());
        let gone = t.insert(5, "e", now + Duration::from_secs(5));
        assert_eq!(gone, vec![(3, "c")]);
    }

    #[test]
    fn idle_expiry_and_deadlines() {
        let now = t0();
        let idle = Duration::from_secs(90);
        let mut t: FlowTable<u32, u32> = FlowTable::new(10, idle);
        t.insert(1, 10, now);
        t.insert(2, 20, now + Duration::from_secs(30));
        assert_eq!(t.deadline(&1), Some(now + idle));
        assert!(t.expire(now + Duration::from_secs(89)).is_empty());
        t.touch(&1, now + Duration::from_secs(60));
        assert_eq!(t.deadline(&1), Some(now + Duration::from_secs(150)));
        // Time going backwards changes nothing.
        t.touch(&1, now);
        assert_eq!(t.last_used(&1), Some(now + Duration::from_secs(60)));
        assert_eq!(t.expire(now + Duration::from_secs(120)), vec![(2, 20)]);
        assert_eq!(t.expire(now + Duration::from_secs(150)), vec![(1, 10)]);
        assert!(t.is_empty());
        // Insertion reaps idle flows before evicting live ones.
        let mut t: FlowTable<u32, u32> = FlowTable::new(2, idle);
        t.insert(1, 1, now);
        t.insert(2, 2, now + Duration::from_secs(80));
        let gone = t.insert(3, 3, now + Duration::from_secs(100));
        assert_eq!(gone, vec![(1, 1)]);
        assert_eq!(t.len(), 2);
        // Replacing a key returns the old value.
        let gone = t.insert(3, 33, now + Duration::from_secs(101));
        assert_eq!(gone, vec![(3, 3)]);
        assert_eq!(t.peek(&3), Some(&33));
        assert_eq!(t.remove(&3), Some(33));
        assert_eq!(t.remove(&3), None);
    }

    #[test]
    fn many_flows_stay_bounded() {
        let now = t0();
        let mut t: FlowTable<u32, ()> = FlowTable::new(100, Duration::from_secs(90));
        for i in 0..10_000u32 {
            let _ = t.insert(i, (), now + Duration::from_millis(u64::from(i)));
            if i % 7 == 0 {
                t.touch(&(i / 2), now + Duration::from_millis(u64::from(i)));
            }
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.order.len(), 100);
    }

    #[test]
    fn port_unreachable_quotes_the_datagram() {
        let src = std::net::SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 2), 40000);
        let dst = std::net::SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 254), 9);
        let pkt = port_unreachable_packet(src.into(), dst.into(), 100).unwrap();
        let ip = Ipv4Packet::new_checked(&pkt[..]).unwrap();
        let caps = ChecksumCapabilities::default();
        let repr = Ipv4Repr::parse(&ip, &caps).unwrap();
        assert_eq!((repr.src_addr, repr.dst_addr, repr.next_header), (*dst.ip(), *src.ip(), IpProtocol::Icmp));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!((icmp.msg_type(), icmp.msg_code()), (smoltcp::wire::Icmpv4Message::DstUnreachable, 3));
        // smoltcp's own parser wants the whole quoted datagram; read the
        // quoted header by hand: 4 unused bytes, IPv4 header, UDP header.
        let quoted = &ip.payload()[8..];
        let inner = Ipv4Packet::new_unchecked(quoted);
        assert!(inner.verify_checksum());
        assert_eq!((inner.src_addr(), inner.dst_addr(), inner.total_len()), (*src.ip(), *dst.ip(), 128));
        let udp = &quoted[IPV4_HEADER..];
        assert_eq!(udp.len(), 8);
        assert_eq!(&udp[..6], &[0x9c, 0x40, 0, 9, 0, 108]);
    }

    #[test]
    fn ipv6_flows_go_to_ipv6_hosts_and_errors_are_icmpv6() {
        let v6 = |a: SocketAddr| match a.ip() {
            IpAddr::V6(ip) => ip,
            IpAddr::V4(_) => unreachable!(),
        };
        let t = t0();
        let cfg = NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500)
            .unwrap()
            .with_ipv6(Some("fd5a:94ef:e40c::/64".parse().unwrap()))
            .unwrap();
        let policy = NatPolicy::new(&cfg, false);
        let mut core = UdpCore::new(8, Duration::from_secs(90), 1500);
        let guest6: SocketAddr = "[fd5a:94ef:e40c:0:5894:efff:fee4:cee]:4000".parse().unwrap();
        let alias6: SocketAddr = "[fd5a:94ef:e40c::fe]:53".parse().unwrap();
        let Route::Open { id, target } = core.route_guest(t, &policy, guest6, alias6) else { panic!() };
        assert_eq!(target, "[::1]:53".parse::<SocketAddr>().unwrap());
        core.opened(t, (guest6, alias6), id);
        // Replies come from the address the guest sent to; IPv6's longer
        // header leaves 20 bytes less room.
        assert_eq!(core.host_datagram(t, id, 1452), Some((alias6, guest6)));
        assert_eq!(core.host_datagram(t, id, 1453), None);
        let packet = core.sent(t, id, 5, Err(io::ErrorKind::ConnectionRefused.into())).unwrap();
        let ip = Ipv6Packet::new_checked(&packet[..]).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (v6(alias6), v6(guest6)));
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
        assert_eq!((icmp.msg_type(), icmp.msg_code()), (smoltcp::wire::Icmpv6Message::DstUnreachable, 4));
        // IPv4-mapped destinations are refused.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:53".parse().unwrap();
        assert_eq!(core.route_guest(t, &policy, guest6, mapped), Route::Refused);
    }
}
