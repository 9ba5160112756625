//! ICMP echo NAT, the sans-I/O core: guest pings to any address are
//! answered through the host's own ICMP sockets, which the shell
//! (`shell::icmp`) owns.
//!
//! How this works: a flow is a guest's (source, destination, identifier)
//! triple, found by a hash lookup and numbered by a [`FlowId`] the shell
//! knows its socket by. The shell hands each event to the core with the
//! time it happened (`now`, the only clock). A guest echo request on a flow
//! is answered with the request to send on the flow's socket; with no flow,
//! the destination is checked against the [`NatPolicy`] (the host alias
//! becomes 127.0.0.1; refused destinations are counted and logged,
//! rate-limited) and the answer is "open a socket for flow N to T": the
//! shell opens preferably an unprivileged ping socket
//! (`SOCK_DGRAM`/`IPPROTO_ICMP`), whose identifier the kernel chooses, and
//! where `net.ipv4.ping_group_range` forbids those a raw socket (root only),
//! which keeps the guest's identifier; which kind works is learnt once, and
//! the shell reports what it got ([`IcmpCore::opened`]). Each request goes
//! out with the guest's sequence number and payload. What a flow's socket
//! reads is shown to the core, which keeps echo replies (for a raw socket:
//! only those with the flow's identifier) and returns the packet for the
//! guest, from the original destination, with the guest's identifier and
//! sequence number restored. Timers and bounds: a flow idle for [`IDLE`]
//! ends ([`IcmpCore::next_deadline`], [`IcmpCore::expire`]), and at most
//! [`MAX_FLOWS`] exist (least recently used evicted first). Anything other
//! than an echo request is dropped.
//!
//! On Windows neither socket kind is open to an ordinary user (raw sockets
//! need an administrator, and there are no ping sockets), so each request
//! goes to the system's ICMP API instead: `IcmpSendEcho2` (iphlpapi), a
//! blocking call the shell makes on tokio's blocking pool, never on the
//! engine thread. Its reply, when the host gets one within
//! [`ECHO_TIMEOUT`], goes to the guest with the guest's own identifier and
//! sequence number and the payload the host got back; when the host gets
//! none, neither does the guest. Requests waiting for the API are bounded
//! per guest ([`MAX_IN_FLIGHT_PER_GUEST`]) and in total ([`MAX_IN_FLIGHT`]):
//! beyond that a request is dropped and counted (`busy`), so a flood towards
//! an address that never answers holds a bounded number of threads.
//!
//! IPv6 works the same way with ICMPv6 echo (the IPv6 host alias is the
//! host's `::1`); a raw ICMPv6 socket delivers messages without their IP
//! header. Windows' API path is IPv4 only: there, guest pings to IPv6
//! addresses are refused (counted), never answered by us.
//!
//! No tokio, no sockets and no clock here.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use serde::Serialize;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
};

use crate::FastMap;
use crate::nat::NatPolicy;
use crate::nat::udp::FlowTable;
use crate::ratelimit::LogLimiter;
use rdnet_wire::frame::IPV4_HEADER;

/// Most concurrent echo flows.
pub const MAX_FLOWS: usize = 1024;
/// A flow without requests or replies for this long ends.
pub const IDLE: Duration = Duration::from_secs(30);
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

/// Guest source, destination as the guest sees it (one family), guest
/// identifier.
pub type FlowKey = (IpAddr, IpAddr, u16);
/// What the shell knows a flow's socket by. Never reused.
pub type FlowId = u64;

/// What to do with a guest's ICMP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Not an echo request, or refused, or too many waiting: nothing.
    Drop,
    /// Send `icmp` (an ICMP message) on flow `id`'s socket, then report
    /// with [`IcmpCore::sent`].
    Send { id: FlowId, icmp: Vec<u8> },
    /// Open a socket to `target` for the new flow `id`, preferring `known`
    /// (the kind that worked before), report with [`IcmpCore::opened`] or
    /// [`IcmpCore::open_failed`], then send `icmp` on it.
    Open { id: FlowId, target: IpAddr, known: Option<Mode>, icmp: Vec<u8> },
    /// Windows: ask the system's ICMP API to ping `target` with `data`, and
    /// report with [`IcmpCore::api_done`] (passing `echo` back).
    Api { target: Ipv4Addr, data: Vec<u8>, echo: ApiEcho },
}

/// A request waiting for the system's ICMP API: whom to answer, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiEcho {
    pub guest: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ident: u16,
    pub seq_no: u16,
}

/// What became of a request given to the system's ICMP API.
#[derive(Debug)]
pub enum ApiOutcome {
    /// The host got a reply carrying `data`.
    Reply(Vec<u8>),
    /// No reply (timed out, unreachable): the system's status code.
    NoReply(u32),
    /// The API call failed.
    Failed(io::Error),
}

pub struct IcmpCore {
    table: FlowTable<FlowKey, FlowId>,
    /// Every flow's key and socket kind, by id.
    flows: FastMap<FlowId, (FlowKey, Mode)>,
    next_id: FlowId,
    /// Learnt on first use: which socket kind the host allows.
    mode: Option<Mode>,
    logs: LogLimiter,
    stats: IcmpNatStats,
    /// Requests waiting for the ICMP API (Windows).
    in_flight: InFlight,
}

impl Default for IcmpCore {
    fn default() -> Self {
        Self::new()
    }
}

impl IcmpCore {
    pub fn new() -> Self {
        IcmpCore {
            table: FlowTable::new(MAX_FLOWS, IDLE),
            flows: FastMap::default(),
            next_id: 0,
            mode: None,
            logs: LogLimiter::default(),
            stats: IcmpNatStats::default(),
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

    /// An ICMP or ICMPv6 packet (from `src` to `dst` as its header says)
    /// from a guest to a non-gateway address at `now`. `use_api`: pings go
    /// to the system's ICMP API (Windows), not to sockets.
    pub fn guest_packet(
        &mut self,
        now: Instant,
        policy: &NatPolicy,
        (src, dst): (IpAddr, IpAddr),
        packet: &[u8],
        use_api: bool,
    ) -> Request {
        let Some((ident, seq_no, data)) = parse_echo_request(packet) else {
            self.stats.ignored += 1;
            return Request::Drop;
        };
        self.stats.requests += 1;
        if use_api {
            let (IpAddr::V4(guest), IpAddr::V4(dst)) = (src, dst) else {
                self.stats.refused += 1;
                crate::limited_warn!(self.logs, now, "icmp-refused", %src, %dst, "dropping ping: no ICMPv6 API here");
                return Request::Drop;
            };
            return self.through_api(now, policy, ApiEcho { guest, dst, ident, seq_no }, data);
        }
        // A ping socket rewrites the identifier and checksum; a raw one
        // sends exactly this (the kernel fills an ICMPv6 checksum itself).
        let icmp = match (src, dst) {
            (IpAddr::V4(_), IpAddr::V4(_)) => {
                let request = Icmpv4Repr::EchoRequest { ident, seq_no, data };
                let mut icmp = vec![0u8; request.buffer_len()];
                request.emit(&mut Icmpv4Packet::new_unchecked(&mut icmp[..]), &ChecksumCapabilities::default());
                icmp
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let request = Icmpv6Repr::EchoRequest { ident, seq_no, data };
                let mut icmp = vec![0u8; request.buffer_len()];
                request.emit(&s, &d, &mut Icmpv6Packet::new_unchecked(&mut icmp[..]), &ChecksumCapabilities::default());
                icmp
            }
            _ => {
                self.stats.ignored += 1;
                return Request::Drop;
            }
        };
        let key = (src, dst, ident);
        if let Some(&mut id) = self.table.get(&key, now) {
            return Request::Send { id, icmp };
        }
        match policy.translate_ip(dst) {
            Ok(target) => {
                self.next_id += 1;
                Request::Open { id: self.next_id, target, known: self.mode, icmp }
            }
            Err(why) => {
                self.stats.refused += 1;
                crate::limited_warn!(self.logs, now, "icmp-refused", %src, %dst, reason = %why, "dropping ping");
                Request::Drop
            }
        }
    }

    fn through_api(&mut self, now: Instant, policy: &NatPolicy, echo: ApiEcho, data: &[u8]) -> Request {
        let ApiEcho { guest, dst, .. } = echo;
        let target = match policy.translate(dst) {
            Ok(IpAddr::V4(ip)) => ip,
            Ok(IpAddr::V6(_)) => {
                self.stats.refused += 1;
                return Request::Drop;
            }
            Err(why) => {
                self.stats.refused += 1;
                crate::limited_warn!(self.logs, now, "icmp-refused", src = %guest, %dst, reason = %why, "dropping ping");
                return Request::Drop;
            }
        };
        if !self.in_flight.try_start(guest) {
            self.stats.busy += 1;
            crate::limited_warn!(self.logs, now, "icmp-busy", src = %guest, %dst,
                "dropping ping: too many waiting for the host's ICMP API");
            return Request::Drop;
        }
        if self.mode != Some(Mode::Api) {
            tracing::info!("ICMP echo NAT uses the system's ICMP API (IcmpSendEcho2)");
            self.mode = Some(Mode::Api);
        }
        Request::Api { target, data: data.to_vec(), echo }
    }

    /// The system's ICMP API answered a [`Request::Api`]: the echo reply
    /// packet for the guest, if the host got one.
    pub fn api_done(&mut self, now: Instant, echo: ApiEcho, outcome: ApiOutcome) -> Option<Vec<u8>> {
        let ApiEcho { guest, dst, ident, seq_no } = echo;
        self.in_flight.finish(guest);
        match outcome {
            ApiOutcome::Reply(data) => {
                self.stats.replies += 1;
                Some(echo_reply_packet(dst, guest, ident, seq_no, &data))
            }
            ApiOutcome::NoReply(status) => {
                self.stats.no_reply += 1;
                tracing::debug!(src = %guest, %dst, status, "no echo reply");
                None
            }
            ApiOutcome::Failed(e) => {
                self.stats.send_errors += 1;
                crate::limited_warn!(self.logs, now, "icmp-send", src = %guest, %dst, error = %e,
                    "dropping ping: IcmpSendEcho2 failed");
                None
            }
        }
    }

    /// The shell opened a socket of kind `mode` for flow `id` (`key` is the
    /// guest's source, destination and identifier). Returns the flows that
    /// had to go to make room (close them).
    pub fn opened(&mut self, now: Instant, key: FlowKey, id: FlowId, mode: Mode) -> Vec<FlowId> {
        if self.mode != Some(mode) {
            tracing::info!("ICMP echo NAT uses {} sockets", if mode == Mode::Ping { "ping" } else { "raw" });
            self.mode = Some(mode);
        }
        let gone: Vec<FlowId> = self.table.insert(key, id, now).into_iter().map(|(_, old)| old).collect();
        for old in &gone {
            self.flows.remove(old);
        }
        self.flows.insert(id, (key, mode));
        self.stats.flows_opened += 1;
        let (src, dst, ident) = key;
        tracing::debug!(%src, %dst, ident, "ICMP echo flow opened");
        gone
    }

    /// The shell could not open a socket for `key`.
    pub fn open_failed(&mut self, now: Instant, key: FlowKey, target: IpAddr, error: &io::Error) {
        let (src, dst, _) = key;
        self.stats.open_errors += 1;
        crate::limited_warn!(self.logs, now, "icmp-open", %src, %dst, %target, error = %error, "cannot open a host ICMP socket (ping_group_range, or not root)");
    }

    /// How sending a request on flow `id` went.
    pub fn sent(&mut self, now: Instant, id: FlowId, result: io::Result<()>) {
        if let Err(e) = result {
            self.stats.send_errors += 1;
            if let Some(&((src, dst, _), _)) = self.flows.get(&id) {
                crate::limited_warn!(self.logs, now, "icmp-send", %src, %dst, error = %e, "dropping ping: host send failed");
            }
        }
    }

    /// What flow `id`'s socket read at `now`: the echo reply packet for the
    /// guest, or `None` (not a reply of this flow's, or the flow is gone).
    pub fn host_datagram(&mut self, now: Instant, id: FlowId, bytes: &[u8]) -> Option<Vec<u8>> {
        let &(key, mode) = self.flows.get(&id)?;
        let (guest, dst, ident) = key;
        let (seq_no, data) = match (guest, dst) {
            (IpAddr::V4(_), IpAddr::V4(_)) => parse_host_reply(mode, bytes, ident)?,
            (IpAddr::V6(_), IpAddr::V6(_)) => parse_host_reply6(mode, bytes, ident)?,
            _ => return None,
        };
        self.table.touch(&key, now);
        self.stats.replies += 1;
        Some(match (dst, guest) {
            (IpAddr::V6(from), IpAddr::V6(to)) => echo_reply_packet6(from, to, ident, seq_no, data),
            (IpAddr::V4(from), IpAddr::V4(to)) => echo_reply_packet(from, to, ident, seq_no, data),
            _ => return None,
        })
    }

    /// Flow `id`'s socket failed for good: the flow ends (the shell closes
    /// the socket). False if there was no such flow.
    pub fn host_failed(&mut self, id: FlowId) -> bool {
        let Some((key, _)) = self.flows.remove(&id) else { return false };
        self.table.remove(&key);
        true
    }

    /// When the next flow goes idle, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.table.next_deadline()
    }

    /// The flows idle at `now`: they end (the shell closes their sockets).
    pub fn expire(&mut self, now: Instant) -> Vec<FlowId> {
        let gone: Vec<FlowId> = self.table.expire(now).into_iter().map(|(_, id)| id).collect();
        for id in &gone {
            self.flows.remove(id);
        }
        gone
    }
}

/// The identifier, sequence number and payload of an ICMP echo request in
/// an IPv4 packet, or an ICMPv6 one in an IPv6 packet; `None` for anything
/// else or anything malformed.
pub fn parse_echo_request(packet: &[u8]) -> Option<(u16, u16, &[u8])> {
    if packet.first()? >> 4 == 6 {
        let ip = Ipv6Packet::new_checked(packet).ok()?;
        if ip.next_header() != IpProtocol::Icmpv6 {
            return None;
        }
        let body = ip.payload().get(..usize::from(ip.payload_len()))?;
        let icmp = Icmpv6Packet::new_checked(body).ok()?;
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        return match Icmpv6Repr::parse(&src, &dst, &icmp, &ChecksumCapabilities::default()).ok()? {
            Icmpv6Repr::EchoRequest { ident, seq_no, data } => Some((ident, seq_no, data)),
            _ => None,
        };
    }
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

/// The sequence number and payload of an ICMPv6 echo reply as a host
/// socket delivers it (without IP header, for both kinds; a raw socket's
/// carry every process's messages, so only those with `ident` are ours).
pub fn parse_host_reply6(mode: Mode, bytes: &[u8], ident: u16) -> Option<(u16, &[u8])> {
    let icmp = Icmpv6Packet::new_checked(bytes).ok()?;
    if icmp.msg_type() != smoltcp::wire::Icmpv6Message::EchoReply {
        return None;
    }
    // The kernel checked the checksum; the addresses it covers are the
    // host's, which the socket does not say, so smoltcp's parse (which
    // needs them) is not used.
    let got = icmp.echo_ident();
    (mode == Mode::Ping || got == ident).then(|| (icmp.echo_seq_no(), icmp.payload()))
}

/// The IPv6 echo reply a guest gets: from `from` to `to`, with the guest's
/// identifier.
pub fn echo_reply_packet6(from: Ipv6Addr, to: Ipv6Addr, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
    let reply = Icmpv6Repr::EchoReply { ident, seq_no, data };
    let ip = Ipv6Repr {
        src_addr: from,
        dst_addr: to,
        next_header: IpProtocol::Icmpv6,
        payload_len: reply.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; 40 + reply.buffer_len()];
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut buf[..]));
    reply.emit(&from, &to, &mut Icmpv6Packet::new_unchecked(&mut buf[40..]), &ChecksumCapabilities::default());
    buf
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetConfig;

    const GUEST: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 2);
    const ALIAS: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 254);

    fn policy() -> NatPolicy {
        NatPolicy::new(&NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap(), false)
    }

    /// An IPv4 echo request from `src` to `dst`.
    fn request(src: Ipv4Addr, dst: Ipv4Addr, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
        let req = Icmpv4Repr::EchoRequest { ident, seq_no, data };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Icmp,
            payload_len: req.buffer_len(),
            hop_limit: 64,
        };
        let mut pkt = vec![0u8; IPV4_HEADER + req.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut pkt[..]), &caps);
        req.emit(&mut Icmpv4Packet::new_unchecked(&mut pkt[IPV4_HEADER..]), &caps);
        pkt
    }

    /// `core` handles an echo request from the guest to the host alias.
    fn from_guest(core: &mut IcmpCore, t: Instant, req: &[u8], api: bool) -> Request {
        core.guest_packet(t, &policy(), (GUEST.into(), ALIAS.into()), req, api)
    }

    /// The echo reply a ping socket would read: ICMP only, the kernel's identifier.
    fn ping_socket_reply(seq_no: u16, data: &[u8]) -> Vec<u8> {
        echo_reply_packet(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 999, seq_no, data)[IPV4_HEADER..].to_vec()
    }

    #[test]
    fn core_opens_a_flow_sends_on_it_and_restores_the_guests_identifier() {
        let t = Instant::now();
        let mut core = IcmpCore::new();
        let req = request(GUEST, ALIAS, 7, 1, b"ping");
        let Request::Open { id, target, known, icmp } = from_guest(&mut core, t, &req, false) else {
            panic!("expected a new flow")
        };
        assert_eq!((target, known), (IpAddr::V4(Ipv4Addr::LOCALHOST), None));
        assert_eq!(&icmp[..], &req[IPV4_HEADER..], "the request as the guest sent it");
        assert!(core.opened(t, (GUEST.into(), ALIAS.into(), 7), id, Mode::Ping).is_empty());
        core.sent(t, id, Ok(()));
        // The next request of the same ping goes on the same flow.
        let req2 = request(GUEST, ALIAS, 7, 2, b"ping");
        assert_eq!(from_guest(&mut core, t, &req2, false), Request::Send { id, icmp: req2[IPV4_HEADER..].to_vec() });
        // A reply comes back from the address pinged, with the guest's identifier.
        let reply = core.host_datagram(t, id, &ping_socket_reply(2, b"ping")).unwrap();
        assert_eq!(reply, echo_reply_packet(ALIAS, GUEST, 7, 2, b"ping"));
        // Anything else the socket reads is not passed on.
        assert_eq!(core.host_datagram(t, id, b"junk"), None);
        assert_eq!(core.host_datagram(t, id + 1, &ping_socket_reply(2, b"x")), None);
        let s = core.stats();
        assert_eq!((s.requests, s.replies, s.flows_opened), (2, 1, 1));
        // A new request learns the kind that worked.
        let Request::Open { known, .. } = from_guest(&mut core, t, &request(GUEST, ALIAS, 8, 1, b""), false) else {
            panic!()
        };
        assert_eq!(known, Some(Mode::Ping));
    }

    #[test]
    fn core_drops_what_it_must_and_bounds_its_flows() {
        let t = Instant::now();
        let mut core = IcmpCore::new();
        // Not an echo request; a refused destination.
        let mut not_echo = request(GUEST, ALIAS, 1, 1, b"");
        not_echo[IPV4_HEADER] = 13;
        assert_eq!(from_guest(&mut core, t, &not_echo, false), Request::Drop);
        let bcast = Ipv4Addr::BROADCAST;
        assert_eq!(
            core.guest_packet(t, &policy(), (GUEST.into(), bcast.into()), &request(GUEST, bcast, 1, 1, b""), false),
            Request::Drop
        );
        assert_eq!((core.stats().ignored, core.stats().refused), (1, 1));
        // At most MAX_FLOWS: the least recently used goes.
        let mut ids = Vec::new();
        for ident in 0..=MAX_FLOWS as u16 {
            let at = t + Duration::from_millis(u64::from(ident));
            let req = request(GUEST, ALIAS, ident, 1, b"");
            let Request::Open { id, .. } = from_guest(&mut core, at, &req, false) else { panic!() };
            let gone = core.opened(at, (GUEST.into(), ALIAS.into(), ident), id, Mode::Raw);
            if usize::from(ident) < MAX_FLOWS {
                assert!(gone.is_empty());
            } else {
                assert_eq!(gone, vec![ids[0]]);
            }
            ids.push(id);
        }
        assert_eq!(core.len(), MAX_FLOWS);
        // A raw socket sees every reply: only this flow's identifier counts.
        let raw = echo_reply_packet(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 5, 1, b"");
        assert!(core.host_datagram(t, ids[5], &raw).is_some());
        assert!(core.host_datagram(t, ids[6], &raw).is_none());
        // Idle flows end when the timer says; a failed socket ends its flow.
        assert!(core.host_failed(ids[7]));
        assert!(!core.host_failed(ids[7]));
        let last = t + Duration::from_millis(MAX_FLOWS as u64);
        assert_eq!(core.next_deadline(), Some(t + Duration::from_millis(1) + IDLE));
        assert_eq!(core.expire(last + IDLE).len(), MAX_FLOWS - 1);
        assert!(core.is_empty() && core.next_deadline().is_none());
    }

    #[test]
    fn core_bounds_requests_waiting_for_the_icmp_api() {
        let t = Instant::now();
        let mut core = IcmpCore::new();
        let mut waiting = Vec::new();
        for seq in 0..MAX_IN_FLIGHT_PER_GUEST as u16 {
            let req = request(GUEST, ALIAS, 1, seq, b"x");
            let Request::Api { target, data, echo } = from_guest(&mut core, t, &req, true) else { panic!() };
            assert_eq!((target, &data[..]), (Ipv4Addr::LOCALHOST, &b"x"[..]));
            waiting.push(echo);
        }
        let one_more = request(GUEST, ALIAS, 1, 99, b"x");
        assert_eq!(from_guest(&mut core, t, &one_more, true), Request::Drop);
        assert_eq!((core.stats().busy, core.len(), core.mode()), (1, MAX_IN_FLIGHT_PER_GUEST, Some(Mode::Api)));
        let reply = core.api_done(t, waiting[3], ApiOutcome::Reply(b"x".to_vec()));
        assert_eq!(reply, Some(echo_reply_packet(ALIAS, GUEST, 1, 3, b"x")));
        assert_eq!(core.api_done(t, waiting[4], ApiOutcome::NoReply(11010)), None);
        assert!(core.api_done(t, waiting[5], ApiOutcome::Failed(io::Error::other("x"))).is_none());
        let s = core.stats();
        assert_eq!((s.replies, s.no_reply, s.send_errors, core.len()), (1, 1, 1, MAX_IN_FLIGHT_PER_GUEST - 3));
        assert!(matches!(from_guest(&mut core, t, &one_more, true), Request::Api { .. }));
    }

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
        let (guest, host) = (GUEST, ALIAS);
        let pkt = request(guest, host, 7, 3, b"abcdefgh");
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

    #[test]
    fn ipv6_pings_go_to_icmpv6_sockets_and_come_back_with_the_guests_identifier() {
        let t = Instant::now();
        let cfg = NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500)
            .unwrap()
            .with_ipv6(Some("fd5a:94ef:e40c::/64".parse().unwrap()))
            .unwrap();
        let policy = NatPolicy::new(&cfg, false);
        let guest: Ipv6Addr = "fd5a:94ef:e40c:0:5894:efff:fee4:cee".parse().unwrap();
        let alias: Ipv6Addr = "fd5a:94ef:e40c::fe".parse().unwrap();
        let req = {
            let r = Icmpv6Repr::EchoRequest { ident: 9, seq_no: 4, data: b"six" };
            let ip = Ipv6Repr {
                src_addr: guest,
                dst_addr: alias,
                next_header: IpProtocol::Icmpv6,
                payload_len: r.buffer_len(),
                hop_limit: 64,
            };
            let mut pkt = vec![0u8; 40 + r.buffer_len()];
            ip.emit(&mut Ipv6Packet::new_unchecked(&mut pkt[..]));
            r.emit(&guest, &alias, &mut Icmpv6Packet::new_unchecked(&mut pkt[40..]), &ChecksumCapabilities::default());
            pkt
        };
        let mut core = IcmpCore::new();
        let Request::Open { id, target, icmp, .. } =
            core.guest_packet(t, &policy, (guest.into(), alias.into()), &req, false)
        else {
            panic!("expected a new flow");
        };
        assert_eq!(target, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(icmp[0], 128, "an ICMPv6 echo request");
        core.opened(t, (guest.into(), alias.into(), 9), id, Mode::Raw);
        // What a raw ICMPv6 socket reads: the message alone; another
        // process's identifier is not ours.
        let host_reply =
            |ident| echo_reply_packet6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, ident, 4, b"six")[40..].to_vec();
        assert_eq!(core.host_datagram(t, id, &host_reply(77)), None);
        let packet = core.host_datagram(t, id, &host_reply(9)).unwrap();
        assert_eq!(packet, echo_reply_packet6(alias, guest, 9, 4, b"six"));
        let ip = Ipv6Packet::new_checked(&packet[..]).unwrap();
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&alias, &guest));
        // Windows' API path has no ICMPv6: refused, counted, never faked.
        let before = core.stats().refused;
        assert_eq!(core.guest_packet(t, &policy, (guest.into(), alias.into()), &req, true), Request::Drop);
        assert_eq!(core.stats().refused, before + 1);
    }
}
