//! UDP NAT: guest datagrams to any address leave through host sockets.
//!
//! How this works: a flow is a guest (source, destination) pair. Its first
//! datagram opens a host UDP socket bound to the wildcard address and
//! connected to the destination as [`NatPolicy`](crate::nat::NatPolicy)
//! translates it (the host alias becomes 127.0.0.1), so the kernel delivers
//! only that peer's replies to it; refused destinations are dropped with a
//! rate-limited log. Later datagrams find the flow by a hash lookup on the
//! pair and are sent with one non-blocking `send`. One local task per flow
//! waits for replies and hands each to the guest as coming from the original
//! destination. ICMP errors the host receives for the flow surface as
//! ECONNREFUSED on the connected socket, and the guest gets an ICMP
//! port-unreachable built from the flow's addresses. Timers: every flow
//! remembers when it last carried a datagram either way; its task wakes at
//! `last + idle` (90 s by default) and ends the flow if nothing happened
//! since. Bounds: at most `max_flows` flows; a new one first reaps idle
//! flows, then evicts the least recently used. Ending a flow aborts its task
//! and closes its socket. The table itself ([`FlowTable`]) is sans-I/O with
//! `now` passed in.

use std::collections::BTreeMap;

use crate::FastMap;
use std::hash::Hash;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::ratelimit::LogLimiter;
use crate::shell::Engine;
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

type FlowKey = (SocketAddrV4, SocketAddrV4);

/// A NAT flow's host socket and the task reading its replies; the task is
/// aborted when the flow leaves its table. Shared with the ICMP NAT, whose
/// ping sockets are datagram sockets too.
pub(crate) struct Flow {
    /// Tells a reply task whether the table entry is still its own.
    pub(crate) id: u64,
    pub(crate) socket: Rc<UdpSocket>,
    pub(crate) task: Option<JoinHandle<()>>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub struct UdpNat {
    table: FlowTable<FlowKey, Flow>,
    next_id: u64,
    logs: LogLimiter,
    stats: UdpNatStats,
    /// One receive buffer shared by every flow's task (one thread).
    scratch: Vec<u8>,
}

/// Size of the shared receive buffer: the largest UDP payload there is, so
/// an oversized reply is seen whole and counted rather than cut.
const SCRATCH: usize = 65536;
/// A socket whose reads fail this many times in a row ends its flow.
const MAX_ERRORS_IN_A_ROW: u32 = 8;

impl UdpNat {
    pub fn new(max_flows: usize, idle: Duration) -> Self {
        UdpNat {
            table: FlowTable::new(max_flows, idle),
            next_id: 0,
            logs: LogLimiter::default(),
            stats: UdpNatStats::default(),
            scratch: Vec::new(),
        }
    }

    /// Number of open flows.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn stats(&self) -> UdpNatStats {
        self.stats
    }

    fn drop_flows(&mut self, gone: Vec<(FlowKey, Flow)>, expired: bool) {
        for ((src, dst), _flow) in gone {
            tracing::debug!(%src, %dst, expired, "UDP flow closed");
            if expired {
                self.stats.flows_expired += 1;
            } else {
                self.stats.flows_evicted += 1;
            }
        }
    }

    /// Forwards one guest datagram from `src` to `dst` through a host socket.
    pub fn send(engine: &Rc<Engine>, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], now: Instant) {
        let key = (src, dst);
        let mut nat = engine.udp.borrow_mut();
        let socket = match nat.table.get(&key, now) {
            Some(flow) => flow.socket.clone(),
            None => match nat.open(engine, key, now) {
                Some(s) => s,
                None => return,
            },
        };
        // Straight to the kernel: tokio's `try_send` would refuse until the
        // reactor has seen the new socket writable, losing first datagrams.
        match socket2::SockRef::from(&*socket).send(payload) {
            Ok(_) => nat.stats.datagrams_out += 1,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                drop(nat);
                port_unreachable(engine, src, dst, payload.len());
            }
            Err(e) => {
                nat.stats.send_errors += 1;
                crate::limited_warn!(nat.logs, now, "udp-send", %src, %dst, error = %e, "dropping UDP datagram: host send failed");
            }
        }
    }

    /// Opens the host side of a new flow and starts its reply task.
    fn open(&mut self, engine: &Rc<Engine>, key: FlowKey, now: Instant) -> Option<Rc<UdpSocket>> {
        let (src, dst) = key;
        let target = match engine.nat.translate(*dst.ip()) {
            Ok(ip) => SocketAddr::new(ip, dst.port()),
            Err(why) => {
                self.stats.refused += 1;
                crate::limited_warn!(self.logs, now, "udp-refused", %src, %dst, reason = %why, "dropping UDP datagram");
                return None;
            }
        };
        let socket = match connect_udp(target) {
            Ok(s) => Rc::new(s),
            Err(e) => {
                self.stats.open_errors += 1;
                crate::limited_warn!(self.logs, now, "udp-open", %src, %dst, %target, error = %e, "cannot open host UDP socket");
                return None;
            }
        };
        self.next_id += 1;
        let id = self.next_id;
        let task = tokio::task::spawn_local(reply_task(engine.clone(), key, id, socket.clone()));
        let gone = self.table.insert(key, Flow { id, socket: socket.clone(), task: Some(task) }, now);
        self.drop_flows(gone, false);
        self.stats.flows_opened += 1;
        tracing::debug!(%src, %dst, %target, flows = self.table.len(), "UDP flow opened");
        Some(socket)
    }

    /// Ends flow `key` if it is still the one numbered `id`.
    fn close_if(&mut self, key: &FlowKey, id: u64, expired: bool) {
        if self.table.peek(key).is_some_and(|f| f.id == id)
            && let Some(mut flow) = self.table.remove(key)
        {
            // The task calling this ends by itself; aborting it from inside
            // is harmless but pointless.
            flow.task = None;
            self.drop_flows(vec![(*key, flow)], expired);
        }
    }
}

/// A non-blocking UDP socket bound to the wildcard address of `target`'s
/// family and connected to it.
fn connect_udp(target: SocketAddr) -> io::Result<UdpSocket> {
    let bind: SocketAddr = match target.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = std::net::UdpSocket::bind(bind)?;
    s.connect(target)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// Waits for replies on one flow's socket and hands them to the guest;
/// ends the flow when it has been idle for the idle timeout.
async fn reply_task(engine: Rc<Engine>, key: FlowKey, id: u64, socket: Rc<UdpSocket>) {
    let (src, dst) = key;
    let link_max = (engine.net.borrow().cfg.mtu as usize).saturating_sub(IPV4_HEADER + UDP_HEADER);
    loop {
        let deadline = match engine.udp.borrow().table.deadline(&key) {
            Some(d) if engine.udp.borrow().table.peek(&key).is_some_and(|f| f.id == id) => d,
            _ => return,
        };
        tokio::select! {
            ready = socket.ready(Interest::READABLE | Interest::ERROR) => {
                let ready = match ready {
                    Ok(r) => r,
                    Err(_) => break,
                };
                if !drain(&engine, &key, &socket, link_max) {
                    break;
                }
                if ready.is_error() {
                    // An error the drain did not consume (SO_ERROR), then
                    // clear tokio's error readiness so we do not spin.
                    if let Ok(Some(e)) = socket.take_error()
                        && e.kind() == io::ErrorKind::ConnectionRefused
                    {
                        port_unreachable(&engine, src, dst, 0);
                    }
                    let _ = socket.try_io(Interest::ERROR, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                let now = Instant::now();
                let mut nat = engine.udp.borrow_mut();
                if nat.table.deadline(&key).is_some_and(|d| d <= now) {
                    nat.close_if(&key, id, true);
                    return;
                }
            }
        }
    }
    engine.udp.borrow_mut().close_if(&key, id, false);
}

/// Reads every datagram waiting on a flow's socket and sends each to the
/// guest. False when the socket failed for good.
fn drain(engine: &Rc<Engine>, key: &FlowKey, socket: &UdpSocket, link_max: usize) -> bool {
    let (src, dst) = *key;
    let mut buf = std::mem::take(&mut engine.udp.borrow_mut().scratch);
    buf.resize(SCRATCH, 0);
    let mut errors = 0;
    let alive = loop {
        match socket.try_recv(&mut buf) {
            Ok(n) => {
                let now = Instant::now();
                let mut nat = engine.udp.borrow_mut();
                nat.table.touch(key, now);
                if n > link_max {
                    nat.stats.oversize_replies += 1;
                    crate::limited_warn!(nat.logs, now, "udp-oversize", %src, %dst, len = n, max = link_max, "dropping UDP reply larger than the link allows");
                    continue;
                }
                nat.stats.datagrams_in += 1;
                drop(nat);
                // From the address the guest sent to, not the host's.
                engine.send_udp_to_guest(dst, src, &buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => port_unreachable(engine, src, dst, 0),
            // Reading consumes the error (host or network unreachable, say);
            // only a socket that keeps failing ends its flow.
            Err(e) => {
                errors += 1;
                let mut nat = engine.udp.borrow_mut();
                crate::limited_warn!(nat.logs, Instant::now(), "udp-recv", %src, %dst, error = %e, "UDP reply error");
                if errors > MAX_ERRORS_IN_A_ROW {
                    break false;
                }
            }
        }
    };
    engine.udp.borrow_mut().scratch = buf;
    alive
}

/// Tells the guest that `dst` refused its datagrams from `src`.
fn port_unreachable(engine: &Rc<Engine>, src: SocketAddrV4, dst: SocketAddrV4, payload_len: usize) {
    let packet = port_unreachable_packet(src, dst, payload_len);
    if engine.send_ipv4_to_guest(&packet) {
        engine.udp.borrow_mut().stats.port_unreachable_sent += 1;
    }
}

/// An ICMP port-unreachable from `dst` to `src` quoting a datagram from `src`
/// to `dst`: its IPv4 header and the 8-byte UDP header (checksum 0, "none",
/// since the payload is not kept; the guest matches on addresses and ports).
pub fn port_unreachable_packet(src: SocketAddrV4, dst: SocketAddrV4, payload_len: usize) -> Vec<u8> {
    let udp_len = (UDP_HEADER + payload_len).min(u16::MAX as usize - IPV4_HEADER);
    let mut udp = [0u8; UDP_HEADER];
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let quoted = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: 64,
    };
    let icmp = Icmpv4Repr::DstUnreachable { reason: Icmpv4DstUnreachable::PortUnreachable, header: quoted, data: &udp };
    let ip = Ipv4Repr {
        src_addr: *dst.ip(),
        dst_addr: *src.ip(),
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; IPV4_HEADER + icmp.buffer_len()];
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
    icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[IPV4_HEADER..]), &caps);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The I/O shell on loopback: flows open, replies come back, the table
    /// stays bounded, idle flows end.
    #[test]
    fn flows_open_reply_evict_and_expire() {
        use crate::shell::EngineConfig;
        use crate::{NetConfig, Network};

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let cfg = NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap();
            let idle = Duration::from_millis(300);
            let config = EngineConfig { max_udp_flows: 2, udp_idle_timeout: idle, ..EngineConfig::default() };
            let engine = Engine::new(Network::new(cfg), config);
            // An echo server on this namespace's loopback, reached through
            // the host alias.
            let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = echo.local_addr().unwrap().port();
            tokio::task::spawn_local(async move {
                let mut buf = [0u8; 2048];
                while let Ok((n, peer)) = echo.recv_from(&mut buf).await {
                    let _ = echo.send_to(&buf[..n], peer).await;
                }
            });
            let alias = SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 254), port);
            let guest = |p| SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 2), p);
            UdpNat::send(&engine, guest(1000), alias, b"one", Instant::now());
            UdpNat::send(&engine, guest(1000), alias, b"two", Instant::now());
            assert_eq!(engine.udp.borrow().len(), 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
            let stats = engine.udp.borrow().stats();
            assert_eq!((stats.flows_opened, stats.datagrams_out, stats.datagrams_in), (1, 2, 2));
            // A third flow evicts the least recently used one.
            UdpNat::send(&engine, guest(1001), alias, b"x", Instant::now());
            UdpNat::send(&engine, guest(1000), alias, b"y", Instant::now());
            UdpNat::send(&engine, guest(1002), alias, b"z", Instant::now());
            assert_eq!(engine.udp.borrow().len(), 2);
            assert!(engine.udp.borrow().table.peek(&(guest(1001), alias)).is_none());
            assert_eq!(engine.udp.borrow().stats().flows_evicted, 1);
            // Refused destinations open nothing.
            UdpNat::send(&engine, guest(1003), SocketAddrV4::new(Ipv4Addr::BROADCAST, 9), b"b", Instant::now());
            assert_eq!(engine.udp.borrow().stats().refused, 1);
            // Idle flows end by themselves.
            tokio::time::sleep(idle * 3).await;
            assert_eq!(engine.udp.borrow().len(), 0);
            assert_eq!(engine.udp.borrow().stats().flows_expired, 2);
        });
    }

    #[test]
    fn port_unreachable_quotes_the_datagram() {
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 2), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 254), 9);
        let pkt = port_unreachable_packet(src, dst, 100);
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
}
