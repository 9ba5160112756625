//! ICMP echo NAT: guest pings to any address are answered through the
//! host's own ICMP sockets.
//!
//! How this works: a flow is a guest's (source, destination, identifier)
//! triple, found by a hash lookup. Its first echo request opens a host ICMP
//! socket connected to the translated destination (the host alias becomes
//! 127.0.0.1; refused destinations are dropped with a rate-limited log):
//! preferably an unprivileged ping socket (`SOCK_DGRAM`/`IPPROTO_ICMP`),
//! whose identifier the kernel chooses; where `net.ipv4.ping_group_range`
//! forbids those, a raw socket (root only), which keeps the guest's
//! identifier. Which kind works is learnt once. Each request goes out with
//! the guest's sequence number and payload. One local task per flow reads
//! echo replies (for a raw socket: only those with the flow's identifier)
//! and hands them to the guest from the original destination, with the
//! guest's identifier and sequence number restored. Timers and bounds: a
//! flow idle for [`IDLE`] ends, and at most [`MAX_FLOWS`] exist (least
//! recently used evicted first); ending a flow aborts its task and closes
//! its socket. Anything other than an echo request is dropped.
//!
//! On Windows neither socket kind is open to an ordinary user (raw sockets
//! need an administrator, and there are no ping sockets), so each request
//! goes to the system's ICMP API instead: `IcmpSendEcho2` (iphlpapi), a
//! blocking call made on tokio's blocking pool, never on the engine thread.
//! Its reply, when the host gets one within [`ECHO_TIMEOUT`], goes to the
//! guest with the guest's own identifier and sequence number and the
//! payload the host got back; when the host gets none, neither does the
//! guest. Requests waiting for the API are bounded per guest
//! ([`MAX_IN_FLIGHT_PER_GUEST`]) and in total ([`MAX_IN_FLIGHT`]): beyond
//! that a request is dropped and counted (`busy`), so a flood towards an
//! address that never answers holds a bounded number of threads.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{EthernetAddress, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::nat::udp::FlowTable;
use crate::ratelimit::LogLimiter;
use crate::shell::Engine;
use crate::shell::udp::{DRAIN_BUDGET, Drained, Flow};
use rdnet_wire::frame::IPV4_HEADER;

/// Most concurrent echo flows.
pub const MAX_FLOWS: usize = 1024;
/// A flow without requests or replies for this long ends.
pub const IDLE: Duration = Duration::from_secs(30);
/// A socket whose reads fail this many times in a row is given up.
const MAX_ERRORS_IN_A_ROW: u32 = 8;
/// Echo requests waiting for the system's ICMP API (Windows), in total and
/// per guest address.
pub const MAX_IN_FLIGHT: usize = 64;
pub const MAX_IN_FLIGHT_PER_GUEST: usize = 16;
/// How long the host waits for an echo reply through the ICMP API (what
/// Windows' own `ping` waits).
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(4);

/// The kind of host socket that carries pings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// Unprivileged ping socket: the kernel owns the identifier.
    Ping,
    /// Raw ICMP socket (root): replies arrive with their IP header and
    /// every process's ICMP; filtered by identifier.
    Raw,
    /// The system's ICMP API (Windows: `IcmpSendEcho2`): no socket; the
    /// system matches replies to requests.
    Api,
}

/// Counters for `/stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IcmpNatStats {
    pub requests: u64,
    pub replies: u64,
    pub flows_opened: u64,
    pub refused: u64,
    pub open_errors: u64,
    pub send_errors: u64,
    /// ICMP from guests that is not an echo request.
    pub ignored: u64,
    /// Requests the host got no reply to (timeout, unreachable): ICMP API only.
    pub no_reply: u64,
    /// Requests dropped because too many were waiting: ICMP API only.
    pub busy: u64,
}

/// Echo requests waiting for an answer, per guest and in total, within
/// [`MAX_IN_FLIGHT_PER_GUEST`] and [`MAX_IN_FLIGHT`] (so the map holds at
/// most [`MAX_IN_FLIGHT`] guests).
#[derive(Debug, Default)]
pub struct InFlight {
    per_guest: std::collections::HashMap<Ipv4Addr, usize>,
    total: usize,
}

impl InFlight {
    /// Takes a slot for a request from `guest`, if the bounds allow.
    pub fn try_start(&mut self, guest: Ipv4Addr) -> bool {
        if self.total >= MAX_IN_FLIGHT {
            return false;
        }
        let n = self.per_guest.entry(guest).or_default();
        if *n >= MAX_IN_FLIGHT_PER_GUEST {
            return false;
        }
        *n += 1;
        self.total += 1;
        true
    }

    /// Gives back a slot taken by [`InFlight::try_start`].
    pub fn finish(&mut self, guest: Ipv4Addr) {
        if let Some(n) = self.per_guest.get_mut(&guest) {
            *n -= 1;
            if *n == 0 {
                self.per_guest.remove(&guest);
            }
            self.total -= 1;
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

/// Guest source, destination as the guest sees it, guest identifier.
type FlowKey = (Ipv4Addr, Ipv4Addr, u16);

pub struct IcmpNat {
    table: FlowTable<FlowKey, Flow>,
    next_id: u64,
    /// Learnt on first use: which socket kind the host allows.
    mode: Option<Mode>,
    logs: LogLimiter,
    stats: IcmpNatStats,
    scratch: Vec<u8>,
    /// Requests waiting for the ICMP API (Windows).
    #[cfg_attr(not(windows), allow(dead_code))]
    in_flight: InFlight,
}

impl Default for IcmpNat {
    fn default() -> Self {
        Self::new()
    }
}

impl IcmpNat {
    pub fn new() -> Self {
        IcmpNat {
            table: FlowTable::new(MAX_FLOWS, IDLE),
            next_id: 0,
            mode: None,
            logs: LogLimiter::default(),
            stats: IcmpNatStats::default(),
            scratch: Vec::new(),
            in_flight: InFlight::default(),
        }
    }

    /// Echo flows (sockets), or on Windows requests waiting for the API.
    pub fn len(&self) -> usize {
        self.table.len() + self.in_flight.total()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> IcmpNatStats {
        self.stats
    }

    /// The socket kind in use, once a ping has gone out.
    pub fn mode(&self) -> Option<Mode> {
        self.mode
    }

    /// Handles an ICMP packet from a guest to a non-gateway address.
    pub fn handle(engine: &Rc<Engine>, _src_mac: EthernetAddress, header: &Ipv4Repr, packet: &[u8], now: Instant) {
        let mut nat = engine.icmp.borrow_mut();
        let Some((ident, seq_no, data)) = parse_echo_request(packet) else {
            nat.stats.ignored += 1;
            return;
        };
        nat.stats.requests += 1;
        if cfg!(windows) {
            nat.echo_through_api(engine, header, ident, seq_no, data, now);
            return;
        }
        let key = (header.src_addr, header.dst_addr, ident);
        let socket = match nat.table.get(&key, now) {
            Some(flow) => flow.socket.clone(),
            None => match nat.open(engine, key, now) {
                Some(s) => s,
                None => return,
            },
        };
        // A ping socket rewrites the identifier and checksum; a raw one
        // sends exactly this.
        let request = Icmpv4Repr::EchoRequest { ident, seq_no, data };
        let mut buf = vec![0u8; request.buffer_len()];
        request.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[..]), &ChecksumCapabilities::default());
        // Straight to the kernel (tokio's `try_send` waits for the reactor
        // to see a new socket writable first).
        if let Err(e) = socket2::SockRef::from(&*socket).send(&buf) {
            nat.stats.send_errors += 1;
            crate::limited_warn!(nat.logs, now, "icmp-send", src = %header.src_addr, dst = %header.dst_addr, error = %e, "dropping ping: host send failed");
        }
    }

    /// Windows: the request goes to `IcmpSendEcho2` on a worker thread; its
    /// reply, if any, comes back to the guest.
    #[cfg(windows)]
    fn echo_through_api(
        &mut self,
        engine: &Rc<Engine>,
        header: &Ipv4Repr,
        ident: u16,
        seq_no: u16,
        data: &[u8],
        now: Instant,
    ) {
        use crate::sys::EchoOutcome;
        let (guest, dst) = (header.src_addr, header.dst_addr);
        let target = match engine.nat.translate(dst) {
            Ok(IpAddr::V4(ip)) => ip,
            Ok(IpAddr::V6(_)) => {
                self.stats.refused += 1;
                return;
            }
            Err(why) => {
                self.stats.refused += 1;
                crate::limited_warn!(self.logs, now, "icmp-refused", src = %guest, %dst, reason = %why, "dropping ping");
                return;
            }
        };
        if !self.in_flight.try_start(guest) {
            self.stats.busy += 1;
            crate::limited_warn!(self.logs, now, "icmp-busy", src = %guest, %dst,
                "dropping ping: too many waiting for the host's ICMP API");
            return;
        }
        if self.mode != Some(Mode::Api) {
            tracing::info!("ICMP echo NAT uses the system's ICMP API (IcmpSendEcho2)");
            self.mode = Some(Mode::Api);
        }
        let payload = data.to_vec();
        let engine = engine.clone();
        tokio::task::spawn_local(async move {
            let outcome =
                tokio::task::spawn_blocking(move || crate::sys::icmp_echo(target, &payload, ECHO_TIMEOUT)).await;
            let mut nat = engine.icmp.borrow_mut();
            nat.in_flight.finish(guest);
            match outcome {
                Ok(Ok(EchoOutcome::Reply { data, .. })) => {
                    nat.stats.replies += 1;
                    drop(nat);
                    engine.send_ipv4_to_guest(&echo_reply_packet(dst, guest, ident, seq_no, &data));
                }
                Ok(Ok(EchoOutcome::NoReply(status))) => {
                    nat.stats.no_reply += 1;
                    tracing::debug!(src = %guest, %dst, %target, status, "no echo reply");
                }
                Ok(Err(e)) => {
                    nat.stats.send_errors += 1;
                    crate::limited_warn!(nat.logs, Instant::now(), "icmp-send", src = %guest, %dst, error = %e,
                        "dropping ping: IcmpSendEcho2 failed");
                }
                Err(e) => {
                    nat.stats.send_errors += 1;
                    tracing::warn!(error = %e, "ICMP echo worker failed");
                }
            }
        });
    }

    #[cfg(not(windows))]
    fn echo_through_api(&mut self, _: &Rc<Engine>, _: &Ipv4Repr, _: u16, _: u16, _: &[u8], _: Instant) {}

    fn open(&mut self, engine: &Rc<Engine>, key: FlowKey, now: Instant) -> Option<Rc<UdpSocket>> {
        let (src, dst, ident) = key;
        let target = match engine.nat.translate(dst) {
            Ok(ip) => ip,
            Err(why) => {
                self.stats.refused += 1;
                crate::limited_warn!(self.logs, now, "icmp-refused", %src, %dst, reason = %why, "dropping ping");
                return None;
            }
        };
        let (socket, mode) = match open_icmp(target, self.mode) {
            Ok(found) => found,
            Err(e) => {
                self.stats.open_errors += 1;
                crate::limited_warn!(self.logs, now, "icmp-open", %src, %dst, %target, error = %e, "cannot open a host ICMP socket (ping_group_range, or not root)");
                return None;
            }
        };
        if self.mode != Some(mode) {
            tracing::info!("ICMP echo NAT uses {} sockets", if mode == Mode::Ping { "ping" } else { "raw" });
            self.mode = Some(mode);
        }
        let socket = Rc::new(socket);
        self.next_id += 1;
        let id = self.next_id;
        let task = tokio::task::spawn_local(reply_task(engine.clone(), key, id, socket.clone(), mode));
        // Flows that had to make room end here (dropping aborts their tasks).
        drop(self.table.insert(key, Flow { id, socket: socket.clone(), task: Some(task) }, now));
        self.stats.flows_opened += 1;
        tracing::debug!(%src, %dst, %target, ident, "ICMP echo flow opened");
        Some(socket)
    }

    fn close_if(&mut self, key: &FlowKey, id: u64) {
        if self.table.peek(key).is_some_and(|f| f.id == id)
            && let Some(mut flow) = self.table.remove(key)
        {
            flow.task = None;
        }
    }
}

/// The identifier, sequence number and payload of an ICMP echo request in
/// an IPv4 packet; `None` for anything else or anything malformed.
pub fn parse_echo_request(packet: &[u8]) -> Option<(u16, u16, &[u8])> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    if ip.next_header() != IpProtocol::Icmp {
        return None;
    }
    let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
    match Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).ok()? {
        Icmpv4Repr::EchoRequest { ident, seq_no, data } => Some((ident, seq_no, data)),
        _ => None,
    }
}

/// The sequence number and payload of an echo reply as a host socket of
/// `mode` delivers it (a raw socket includes the IP header, and only
/// replies carrying `ident` are ours; a ping socket's are all ours).
pub fn parse_host_reply(mode: Mode, bytes: &[u8], ident: u16) -> Option<(u16, &[u8])> {
    let icmp_bytes = match mode {
        Mode::Ping | Mode::Api => bytes,
        Mode::Raw => {
            let ip = Ipv4Packet::new_checked(bytes).ok()?;
            if ip.next_header() != IpProtocol::Icmp {
                return None;
            }
            bytes.get(ip.header_len() as usize..ip.total_len() as usize)?
        }
    };
    let icmp = Icmpv4Packet::new_checked(icmp_bytes).ok()?;
    // The kernel checked the checksum of what it delivered (and a ping
    // socket's identifier differs from the guest's anyway).
    match Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::ignored()).ok()? {
        Icmpv4Repr::EchoReply { ident: got, seq_no, data } if mode == Mode::Ping || got == ident => {
            Some((seq_no, data))
        }
        _ => None,
    }
}

/// The IPv4 echo reply a guest gets: from `from` to `to`, with the guest's
/// identifier.
pub fn echo_reply_packet(from: Ipv4Addr, to: Ipv4Addr, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
    let reply = Icmpv4Repr::EchoReply { ident, seq_no, data };
    let ip = Ipv4Repr {
        src_addr: from,
        dst_addr: to,
        next_header: IpProtocol::Icmp,
        payload_len: reply.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; IPV4_HEADER + reply.buffer_len()];
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
    reply.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[IPV4_HEADER..]), &caps);
    buf
}

/// Opens an ICMP socket connected to `target`: a ping socket, or where
/// those are not permitted a raw one. `known`: the kind that worked before.
fn open_icmp(target: IpAddr, known: Option<Mode>) -> io::Result<(UdpSocket, Mode)> {
    let IpAddr::V4(_) = target else {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "ICMPv6 echo is not translated"));
    };
    let (socket, mode) = match known {
        Some(Mode::Raw) => (Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?, Mode::Raw),
        _ => match Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4)) {
            Ok(s) => (s, Mode::Ping),
            // Not permitted (any more): raw sockets, if we are root.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                (Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?, Mode::Raw)
            }
            Err(e) => return Err(e),
        },
    };
    socket.connect(&SocketAddr::new(target, 0).into())?;
    socket.set_nonblocking(true)?;
    // Both kinds are datagram-like: tokio's UDP socket type does the polling.
    let std_socket: std::net::UdpSocket = socket.into();
    Ok((UdpSocket::from_std(std_socket)?, mode))
}

async fn reply_task(engine: Rc<Engine>, key: FlowKey, id: u64, socket: Rc<UdpSocket>, mode: Mode) {
    let (guest, dst, ident) = key;
    loop {
        let deadline = {
            let nat = engine.icmp.borrow();
            match nat.table.deadline(&key) {
                Some(d) if nat.table.peek(&key).is_some_and(|f| f.id == id) => d,
                _ => return,
            }
        };
        tokio::select! {
            ready = socket.ready(Interest::READABLE | Interest::ERROR) => {
                let Ok(ready) = ready else { break };
                let mut buf = std::mem::take(&mut engine.icmp.borrow_mut().scratch);
                buf.resize(65536, 0);
                let mut errors = 0;
                let mut budget = DRAIN_BUDGET;
                let drained = loop {
                    if budget == 0 {
                        break Drained::Budget;
                    }
                    budget -= 1;
                    match socket.try_recv(&mut buf) {
                        Ok(n) => {
                            let Some((seq_no, data)) = parse_host_reply(mode, &buf[..n], ident) else { continue };
                            let packet = echo_reply_packet(dst, guest, ident, seq_no, data);
                            {
                                let mut nat = engine.icmp.borrow_mut();
                                nat.table.touch(&key, Instant::now());
                                nat.stats.replies += 1;
                            }
                            engine.send_ipv4_to_guest(&packet);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Drained::Empty,
                        // Reading consumes an error (an ICMP error for our
                        // request: the guest's ping times out, as it would);
                        // only a socket that keeps failing is given up.
                        Err(e) => {
                            errors += 1;
                            tracing::debug!(%guest, %dst, error = %e, "ping error");
                            if errors > MAX_ERRORS_IN_A_ROW {
                                break Drained::Failed;
                            }
                        }
                    }
                };
                engine.icmp.borrow_mut().scratch = buf;
                match drained {
                    Drained::Empty => {}
                    // Replies flooding in (a raw socket sees every echo
                    // reply to this host): let the engine's other tasks run.
                    Drained::Budget => tokio::task::yield_now().await,
                    Drained::Failed => break,
                }
                if ready.is_error() {
                    let _ = socket.take_error();
                    let _ = socket.try_io(Interest::ERROR, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                let mut nat = engine.icmp.borrow_mut();
                if nat.table.deadline(&key).is_some_and(|d| d <= Instant::now()) {
                    nat.close_if(&key, id);
                    return;
                }
            }
        }
    }
    engine.icmp.borrow_mut().close_if(&key, id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_requests_are_bounded_per_guest_and_in_total() {
        let mut f = InFlight::default();
        let guest = |i: u32| Ipv4Addr::from(0x0a00_0000 + i);
        for _ in 0..MAX_IN_FLIGHT_PER_GUEST {
            assert!(f.try_start(guest(1)));
        }
        assert!(!f.try_start(guest(1)), "one guest's bound");
        // Other guests fill the rest, then nobody gets a slot.
        let mut i = 2;
        while f.total() < MAX_IN_FLIGHT {
            assert!(f.try_start(guest(100 + i / 2)));
            i += 1;
        }
        assert!(!f.try_start(guest(1000)), "the total bound");
        f.finish(guest(1));
        assert!(f.try_start(guest(1000)));
        // Finishing what never started changes nothing; the map empties.
        f.finish(guest(5000));
        assert_eq!(f.total(), MAX_IN_FLIGHT);
        for g in 0..2000 {
            while f.per_guest.contains_key(&guest(g)) {
                f.finish(guest(g));
            }
        }
        assert_eq!(f.total(), 0);
        assert!(f.per_guest.is_empty());
    }

    #[test]
    fn echo_request_parse_and_reply_build() {
        let guest = Ipv4Addr::new(192, 168, 127, 2);
        let host = Ipv4Addr::new(192, 168, 127, 254);
        // A request is a reply with the type flipped: build one by hand.
        let req = Icmpv4Repr::EchoRequest { ident: 7, seq_no: 3, data: b"abcdefgh" };
        let ip = Ipv4Repr {
            src_addr: guest,
            dst_addr: host,
            next_header: IpProtocol::Icmp,
            payload_len: req.buffer_len(),
            hop_limit: 64,
        };
        let mut pkt = vec![0u8; IPV4_HEADER + req.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut pkt[..]), &caps);
        req.emit(&mut Icmpv4Packet::new_unchecked(&mut pkt[IPV4_HEADER..]), &caps);
        assert_eq!(parse_echo_request(&pkt), Some((7, 3, &b"abcdefgh"[..])));
        for cut in 0..pkt.len() {
            assert!(parse_echo_request(&pkt[..cut]).is_none());
        }
        // A raw socket sees the IP header; only our identifier counts.
        let reply = echo_reply_packet(host, guest, 7, 3, b"abcdefgh");
        assert_eq!(parse_host_reply(Mode::Raw, &reply, 7), Some((3, &b"abcdefgh"[..])));
        assert_eq!(parse_host_reply(Mode::Raw, &reply, 8), None);
        // Our own request, looped back to a raw socket, is not a reply.
        assert_eq!(parse_host_reply(Mode::Raw, &pkt, 7), None);
        // A ping socket sees ICMP only, with the kernel's identifier.
        assert_eq!(parse_host_reply(Mode::Ping, &reply[IPV4_HEADER..], 1), Some((3, &b"abcdefgh"[..])));
        for cut in 0..reply.len() {
            let _ = parse_host_reply(Mode::Raw, &reply[..cut], 7);
            let _ = parse_host_reply(Mode::Ping, &reply[..cut], 7);
        }
    }
}
