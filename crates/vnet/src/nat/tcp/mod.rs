//! TCP: guest connections terminated with smoltcp and bridged to host
//! sockets, as a core with no I/O and no clock of its own.
//!
//! How this works.
//!
//! *The core and its shell.* [`TcpCore`] is handed the time and one event
//! at a time: a guest packet ([`TcpCore::guest_packet`]), the result of a
//! host connect ([`TcpCore::connected`]), or "this flow may run"
//! ([`TcpCore::drive`]: its host stream became readable or writable, a
//! guest segment arrived, or the time it asked to be woken at came). It
//! answers with what to do: connect to this target and report back by
//! then, wake that flow, the flow is done (reset its host side or not),
//! run me again at T. Frames to the guest go out through a [`GuestLink`],
//! host bytes come and go through a [`HostStream`]: both are the shell's
//! (`shell::tcp`), which owns the sockets, tasks and timers; in tests they
//! are scripts ([`harness`]).
//!
//! *Finding a flow.* A flow is keyed by (guest address, remote address), the
//! guest's view of the 4-tuple, IPv4 or IPv6. Every flow owns its own
//! smoltcp `SocketSet` holding exactly one TCP socket; one shared smoltcp
//! `Interface` (IP medium, AnyIP) is polled with that flow's set only. A
//! packet therefore costs a hash lookup and the work of its own socket,
//! O(1) in the number of flows, instead of smoltcp's scan of every socket.
//!
//! *Connect first.* A guest SYN with no flow creates one in the connecting
//! state and asks the shell to connect to the host; the SYN is kept. Guest
//! retransmissions of it are ignored meanwhile. On success the smoltcp
//! socket is put into listen state and fed the kept SYN, so the SYN-ACK only
//! leaves when the host side is really there; a refusal (or no route, so
//! happy eyeballs falls back at once) sends the guest a RST; a timeout
//! ([`CONNECT_TIMEOUT`]) sends nothing, so the guest's own timers decide.
//!
//! *Back-pressure.* Nothing is dropped for lack of room. Host data is read
//! only into free space of the socket's send buffer, so a slow guest stops
//! the host socket from being read and the host's TCP pushes back. Guest data
//! sits in the socket's receive buffer until the host stream takes it, and
//! smoltcp advertises only the free part of that buffer as its window, so a
//! slow host shrinks the guest's window.
//!
//! *Memory.* A flow's buffers are reserved address space, committed only as
//! data reaches them and given back once both have been empty for
//! [`IDLE_RELEASE`] (`memory`, `sys::LazyRegion`). Before a guest segment
//! goes to smoltcp and before a host read fills the send buffer, the bytes
//! they will write are committed; where the system refuses, the flow is
//! reset (a new one refused with RST) and counted in `memory_refused`.
//! An ended flow's region goes to a small pool (`memory::RegionPool`) for
//! the next flow, so a short connection maps, unmaps and faults in nothing.
//!
//! *Closing.* A guest FIN shuts down the host stream's write side once all
//! data is written; a host EOF closes the smoltcp socket, which sends FIN
//! after the data. A guest RST ends the flow with [`End::Reset`] (the shell
//! aborts the host socket with a RST); a host error aborts the smoltcp
//! socket, which sends RST. A flow is freed as soon as its socket is closed
//! or reaches TIME-WAIT: TIME-WAIT holds no host resources.
//!
//! *Timestamps.* Our SYN-ACKs carry TCP timestamps when the guest's SYN
//! does (RFC 7323), from the core's clock, the same for every flow, so they
//! only grow: a guest kernel may then reuse a port of its own in TIME-WAIT
//! at once (`tcp_tw_reuse` needs timestamps to tell the connections apart).
//!
//! *Bounds.* `admission` decides which new flows are taken: at most
//! `max_flows`, and per guest (switch port) a bounded number of half-open
//! ones; a SYN beyond either gets a RST. A half-open flow the guest does
//! not complete within [`HALF_OPEN_TIMEOUT`] is reset.

pub mod admission;
#[cfg(test)]
mod harness;
pub mod memory;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::task::Poll;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, IpProtocol, IpRepr, Ipv4Packet, Ipv6Packet, TcpControl,
    TcpPacket, TcpRepr, TcpSeqNumber,
};

use crate::nat::NatPolicy;
use crate::nat::tcp::admission::{Admission, Refused};
use crate::nat::tcp::memory::{FlowMemory, HostRead, PROBE, RegionPool};
use crate::ratelimit::LogLimiter;
use crate::switch::PortId;
use crate::{FastMap, FastSet};
use rdnet_wire::frame::{ETH_HEADER, IPV4_HEADER, IPV6_HEADER};

/// How long a flow's buffers stay empty before their memory is given back
/// (a 2 MiB buffer each way, committed as traffic touches it: thousands of
/// connections that once moved data and now idle would otherwise keep it).
pub const IDLE_RELEASE: Duration = Duration::from_secs(1);
/// How long the ACK of a guest's FIN may wait for our own FIN (see
/// `guest_segment`): a server closes within a few hundred microseconds of
/// its client's shutdown here; the guest retransmits its FIN after 200 ms
/// at the soonest.
pub const FIN_ACK_DELAY: Duration = Duration::from_millis(5);
/// Host bytes a flow moves before it lets other tasks run.
const YIELD_AFTER: usize = 256 * 1024;
/// How long a host `connect()` may take before the flow is forgotten.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a guest may take to answer our SYN-ACK.
pub const HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a connection into the guest may take to be accepted.
pub const GUEST_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket buffer sizes (each direction). They live in a lazily committed
/// mapping (`sys::LazyRegion`): a quiet flow costs a page or two of each.
/// 2 MiB measured best: 512 KiB capped a flow at the window (8.8 Gbit/s at
/// MTU 65520), 4 MiB was slower again (cache), see bench/RESULTS.md.
pub const RX_BUFFER: usize = 2048 * 1024;
pub const TX_BUFFER: usize = 2048 * 1024;
// `memory` maps sequence numbers onto the receive ring: a power of two.
const _: () = assert!(RX_BUFFER.is_power_of_two());
/// The IP MTU of the TCP stack: the largest packet a u16-framed link can
/// carry. Segments to a guest are further bounded by the MSS it announced,
/// which for a VM that negotiated offload is raised to the largest this
/// MTU allows.
const IP_MTU: usize = rdnet_wire::offload::MAX_LARGE_FRAME - ETH_HEADER;
const TCP_HEADER: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub guest: SocketAddr,
    pub remote: SocketAddr,
}

impl std::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} → {}", self.guest, self.remote)
    }
}

/// Names a flow for the shell (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(u64);

/// Where frames to the guest go: the shell's switch, or a test's capture.
pub trait GuestLink {
    /// Hands `fill` a buffer for an IP packet of exactly `len` bytes to the
    /// guest at `dst`, and sends what it wrote. `fill` is always called
    /// (smoltcp needs its result); a packet that cannot be delivered is
    /// dropped after it was built.
    fn emit<R>(&mut self, dst: IpAddr, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R;

    /// Whether the way to the guest at `dst` holds enough already: a flow
    /// then stops sending until the shell drives it again once the queue
    /// drained, so a bulk transfer cannot stand a queue of milliseconds in
    /// front of another flow's segments (latency under load, issue 18).
    fn congested(&mut self, _dst: IpAddr) -> bool {
        false
    }
}

/// One flow's host side as the core sees it: a byte stream that is ready
/// or not (`Poll::Pending`: the shell wakes the flow when it becomes so).
pub trait HostStream {
    fn read(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    fn write(&mut self, buf: &[u8]) -> Poll<io::Result<usize>>;
    fn shutdown_write(&mut self) -> Poll<io::Result<()>>;
}

/// What a new guest flow connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A host socket address (after the NAT policy's translation).
    Host(SocketAddr),
    /// One of the gateway's own services, by port (DNS, the API).
    Service(u16),
}

/// "Connect flow `id` to `target`, and report by `give_up_at`."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect {
    pub id: FlowId,
    pub target: Target,
    pub give_up_at: Instant,
}

/// What the shell does after a guest packet.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GuestOutcome {
    /// Run this flow (it has new data or state, or was replaced).
    pub wake: Option<FlowId>,
    /// Start this host connect.
    pub connect: Option<Connect>,
    /// The packet was not a well-formed TCP segment (counted by the shell).
    pub malformed: bool,
}

/// How a host connect ended.
#[derive(Debug)]
pub enum ConnectResult {
    Connected,
    Failed(io::Error),
    TimedOut,
}

/// What the shell does once the core has a connect's result.
#[derive(Debug, PartialEq, Eq)]
pub enum Connected {
    /// The flow is open: drive it with the connected stream.
    Run,
    /// Drop the stream (the guest was told, or went away, or the flow was
    /// forgotten).
    Drop,
    /// The host has no route to this IPv6 destination: answer the guest's
    /// SYN (this IPv6 packet) with ICMPv6 "no route" from the gateway, as a
    /// router would, so the guest's connect fails with ENETUNREACH at once.
    /// (IPv4 gets a RST: Linux takes ICMPv4 unreachables during a connect
    /// as soft errors and would keep retrying.)
    NoRoute(Vec<u8>),
}

/// What a flow's shell does after [`TcpCore::drive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The flow is over and gone from the core.
    Done(End),
    /// Moved a lot: let others run, then drive again at once.
    Yield,
    /// Waiting on the host stream (already asked to wake the flow), the
    /// guest, or the time given, whichever comes first.
    Wait(Option<Instant>),
}

/// How a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions closed cleanly.
    Closed,
    /// The guest reset, or something failed: reset the host side too.
    Reset,
}

#[derive(Debug, thiserror::Error)]
pub enum GuestConnectError {
    #[error("too many TCP flows")]
    TooManyFlows,
    #[error("no free source port on the gateway")]
    NoPort,
    #[error("no memory for the connection's buffers")]
    NoMemory,
    #[error("cannot open a connection to {0}")]
    Unaddressable(SocketAddr),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// SYNs refused by the flow bounds.
    pub refused_syns: u64,
    /// Flows refused or reset because their buffer memory could not be
    /// reserved or committed.
    pub memory_refused: u64,
    /// Guest segments dropped for reaching past the receive buffer.
    pub beyond_window: u64,
}

enum Phase {
    /// Host connect in progress; the guest's SYN waits here.
    Connecting {
        syn: Vec<u8>,
    },
    Open {
        handle: SocketHandle,
    },
}

/// Where a flow's host side stands.
#[derive(Default)]
struct HostSide {
    /// The host sent EOF (and the smoltcp socket was told to close).
    eof: bool,
    /// The host stream's write side was shut down after the guest's FIN.
    write_shut: bool,
    /// The guest's handshake completed (FIN checks mean nothing before).
    established: bool,
    /// Since when both socket buffers have been empty.
    idle_since: Option<Instant>,
    /// The guest closed first: the ACK of its FIN waits for the host to
    /// close too (our FIN then carries it), until this time at most.
    fin_ack_until: Option<Instant>,
}

struct Flow {
    key: FlowKey,
    /// Its socket's buffers borrow `memory`'s region: see `Drop`.
    sockets: SocketSet<'static>,
    phase: Phase,
    memory: Option<FlowMemory>,
    /// Give up if the handshake is not complete by then.
    connect_deadline: Option<Instant>,
    /// Counted in the guest's half-open flows until established or gone.
    half_open: bool,
    /// The switch port the guest's SYN came in on (the half-open bound's key).
    port: PortId,
    host: HostSide,
}

impl Flow {
    /// Whether the flow has at most [`SMALL_SEND`] to send (or resend).
    fn sends_little(&self) -> bool {
        match self.phase {
            Phase::Open { handle } => self.sockets.get::<tcp::Socket>(handle).send_queue() <= SMALL_SEND,
            Phase::Connecting { .. } => true,
        }
    }

    /// Whether the ACK of the guest's FIN is held back now: the guest
    /// closed first, nothing of ours waits to be sent or acknowledged (so
    /// the ACK is all smoltcp would send), and the host has not closed yet
    /// (the socket would be past CLOSE-WAIT then, its FIN carrying the ACK).
    fn holds_fin_ack(&self) -> bool {
        let Phase::Open { handle } = self.phase else { return false };
        let socket = self.sockets.get::<tcp::Socket>(handle);
        self.host.fin_ack_until.is_some() && socket.state() == tcp::State::CloseWait && socket.send_queue() == 0
    }

    /// Ends the flow, keeping its buffer memory in `pool` for a next one.
    #[allow(unsafe_code)]
    fn end_into(mut self, pool: &mut RegionPool) {
        // The socket, whose buffers are the region's slices, goes first.
        self.sockets = SocketSet::new(Vec::new());
        if let Some(memory) = self.memory.take() {
            // SAFETY: the flow's only socket was in the set dropped above,
            // and nothing else was given the region's slices.
            unsafe { pool.give_back(memory) };
        }
    }
}

/// A flow with no more than this in its send buffer is never held back by
/// a congested guest queue (see [`Stack::run_with`]).
const SMALL_SEND: usize = 16 * 1024;

impl Drop for Flow {
    /// The socket set goes first, whatever the order of the fields: its
    /// socket's buffers are slices of `memory`'s region, which is unmapped
    /// when `memory` drops (`LazyRegion::split`'s contract).
    fn drop(&mut self) {
        self.sockets = SocketSet::new(Vec::new());
    }
}

/// The gateway's addresses, where its own services answer.
#[derive(Debug, Clone, Copy)]
pub struct Gateways {
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
}

impl Gateways {
    fn is_gateway(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => v4 == self.ipv4,
            IpAddr::V6(v6) => Some(v6) == self.ipv6,
        }
    }

    fn for_family(&self, guest: IpAddr) -> Option<IpAddr> {
        match guest {
            IpAddr::V4(_) => Some(IpAddr::V4(self.ipv4)),
            IpAddr::V6(_) => self.ipv6.map(IpAddr::V6),
        }
    }
}

pub struct TcpCore {
    smol: Smol,
    /// Time zero of smoltcp's clock (and of the TCP timestamps).
    epoch: Instant,
    by_key: FastMap<FlowKey, FlowId>,
    flows: FastMap<FlowId, Flow>,
    next_id: u64,
    /// The bounds on new flows (`--max-flows`, half-open per guest).
    pub admission: Admission,
    gateways: Gateways,
    services: FastSet<u16>,
    reports: Reports,
    /// Ended flows' buffer regions, for the next flows.
    regions: RegionPool,
}

/// Where flows report: the counters and the log limiter.
#[derive(Default)]
struct Reports {
    stats: TcpStats,
    logs: LogLimiter,
}

impl Reports {
    /// Counts and logs a guest segment dropped for reaching past the
    /// receive buffer (see `FlowMemory::room_for`).
    fn beyond_window(&mut self, now: Instant, key: &FlowKey) {
        self.stats.beyond_window += 1;
        crate::limited_warn!(self.logs, now, "tcp-beyond-window", flow = %key, "dropping guest data past the window it was given");
    }

    /// Counts and logs a flow refused because its memory could not be had.
    fn memory_refused(&mut self, now: Instant, key: &FlowKey) {
        self.stats.memory_refused += 1;
        crate::limited_warn!(self.logs, now, "tcp-memory", flow = %key, "no memory for the connection's buffers; resetting it");
    }
}

/// How a guest packet came in.
#[derive(Debug, Clone, Copy, Default)]
pub struct Arrival {
    /// The guest's port takes segments above its MTU, so its SYN's MSS is
    /// raised to the most a link frame carries before smoltcp sees it; any
    /// other guest's is capped at what its MTU allows.
    pub large_frames: bool,
    /// More frames from the same read of the link follow this one: an
    /// in-order data segment is then acknowledged when its flow is next
    /// driven (after the batch), together with the rest of the batch.
    pub more_follow: bool,
}

/// The one-packet device a flow is polled with.
struct FlowDevice<'a, L> {
    rx: Option<&'a [u8]>,
    guest: IpAddr,
    link: &'a mut L,
    mtu: usize,
    link_mtu: usize,
}

struct FlowRx<'a>(&'a [u8]);
struct FlowTx<'a, L> {
    guest: IpAddr,
    link: &'a mut L,
    link_mtu: usize,
}

impl RxToken for FlowRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl<L: GuestLink> TxToken for FlowTx<'_, L> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let link_mtu = self.link_mtu;
        self.link.emit(self.guest, len, move |packet: &mut [u8]| {
            let r = f(packet);
            // smoltcp leaves the TCP checksum to us (see `flow_caps`). A
            // segment above the link's MTU goes only to a VM that negotiated
            // offload, where its checksum field means nothing
            // (rdnet_wire::offload).
            if len <= link_mtu && is_tcp(packet) {
                rdnet_wire::checksum::fill_ip_transport(packet, 16);
            }
            r
        })
    }
}

/// Whether an IP packet smoltcp built carries TCP (no extension headers).
fn is_tcp(packet: &[u8]) -> bool {
    let tcp = u8::from(IpProtocol::Tcp);
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(9) == Some(&tcp),
        Some(6) => packet.get(6) == Some(&tcp),
        _ => false,
    }
}

impl<L: GuestLink> FlowDevice<'_, L> {
    fn tx(&mut self) -> FlowTx<'_, L> {
        FlowTx { guest: self.guest, link: self.link, link_mtu: self.link_mtu }
    }
}

impl<L: GuestLink> Device for FlowDevice<'_, L> {
    type RxToken<'b>
        = FlowRx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = FlowTx<'b, L>
    where
        Self: 'b;

    fn receive(&mut self, _: SmolInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let rx = self.rx.take()?;
        Some((FlowRx(rx), self.tx()))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<Self::TxToken<'_>> {
        Some(self.tx())
    }

    fn capabilities(&self) -> DeviceCapabilities {
        flow_caps(self.mtu)
    }
}

/// The device capabilities of every flow. smoltcp reads them once, from
/// the device the interface is created with, so both devices share this.
fn flow_caps(mtu: usize) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ip;
    caps.max_transmission_unit = mtu;
    // The link is memory, not a wire: the guest kernel checksums what it
    // sends and a guest that lies only hurts itself, so skip verifying.
    let mut cs = ChecksumCapabilities::default();
    cs.ipv4 = Checksum::Tx;
    // TCP checksums are filled in by `FlowTx` (faster, and not at all for
    // large segments).
    cs.tcp = Checksum::None;
    caps.checksum = cs;
    caps
}

struct NullDevice {
    mtu: usize,
}

impl Device for NullDevice {
    type RxToken<'b>
        = FlowRx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = FlowRx<'b>
    where
        Self: 'b;
    fn receive(&mut self, _: SmolInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        None
    }
    fn transmit(&mut self, _: SmolInstant) -> Option<Self::TxToken<'_>> {
        None
    }
    fn capabilities(&self) -> DeviceCapabilities {
        flow_caps(self.mtu)
    }
}

impl TxToken for FlowRx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        f(&mut vec![0; len])
    }
}

thread_local! {
    /// The TCP timestamp clock (milliseconds of the core's clock), set
    /// before each poll: smoltcp asks for timestamps through a plain
    /// `fn()`, which can hold no state of its own, and a flow is only ever
    /// polled on the thread that owns the core.
    static TSVAL_MS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// smoltcp's timestamp source: the core's clock in milliseconds (wrapping,
/// as RFC 7323 allows), the same for every flow, so never going back.
fn tsval() -> u32 {
    TSVAL_MS.with(std::cell::Cell::get)
}

impl TcpCore {
    /// `prefix6`: the IPv6 gateway address and prefix length, if IPv6 is on.
    pub fn new(
        now: Instant,
        gateway: Ipv4Addr,
        prefix: u8,
        gateway6: Option<(Ipv6Addr, u8)>,
        mtu: usize,
        max_flows: usize,
    ) -> Self {
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed();
        let link_mtu = mtu;
        let mtu = mtu.max(IP_MTU);
        let mut dummy = NullDevice { mtu };
        let mut iface = Interface::new(config, &mut dummy, SmolInstant::from_micros(0));
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(gateway), prefix));
            if let Some((ip, len)) = gateway6 {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(ip), len));
            }
        });
        TcpCore {
            smol: Smol { iface, mtu, link_mtu },
            epoch: now,
            by_key: FastMap::default(),
            flows: FastMap::default(),
            next_id: 0,
            admission: Admission::new(max_flows),
            gateways: Gateways { ipv4: gateway, ipv6: gateway6.map(|(ip, _)| ip) },
            services: FastSet::default(),
            reports: Reports::default(),
            regions: RegionPool::default(),
        }
    }

    /// Makes the gateway answer TCP on `port` (the shell serves it).
    pub fn add_service(&mut self, port: u16) {
        self.services.insert(port);
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn stats(&self) -> TcpStats {
        self.reports.stats
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Flows whose handshake with the guest is not complete yet.
    pub fn connecting(&self) -> usize {
        self.admission.half_open()
    }

    /// Buffer memory committed by this core's flows (tests: the
    /// process-wide figure mixes in other tests' flows).
    #[cfg(test)]
    pub(crate) fn committed(&self) -> usize {
        self.flows.values().map(|f| f.memory.as_ref().map_or(0, FlowMemory::committed)).sum()
    }

    /// Ended flows' regions kept for the next ones (tests).
    #[cfg(test)]
    pub(crate) fn pooled_regions(&self) -> usize {
        self.regions.len()
    }

    /// The guest address of flow `id`, while it exists.
    pub fn guest_of(&self, id: FlowId) -> Option<SocketAddr> {
        self.flows.get(&id).map(|f| f.key.guest)
    }

    fn smol_now(&self, now: Instant) -> SmolInstant {
        SmolInstant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }

    fn is_registered(&self, id: FlowId) -> bool {
        self.flows.get(&id).is_some_and(|f| self.by_key.get(&f.key) == Some(&id))
    }

    fn new_id(&mut self) -> FlowId {
        self.next_id += 1;
        FlowId(self.next_id)
    }

    /// Forgets flow `id` (settling its half-open count).
    fn remove(&mut self, id: FlowId) {
        if let Some(mut flow) = self.flows.remove(&id) {
            settle_half_open(&mut self.admission, &mut flow);
            if self.by_key.get(&flow.key) == Some(&id) {
                self.by_key.remove(&flow.key);
            }
            flow.end_into(&mut self.regions);
        }
    }

    /// A TCP segment from the guest on switch port `port` (an IP packet of
    /// either version), arriving as `arrival` says.
    pub fn guest_packet(
        &mut self,
        now: Instant,
        port: PortId,
        policy: &NatPolicy,
        packet: &[u8],
        arrival: Arrival,
        link: &mut impl GuestLink,
    ) -> GuestOutcome {
        let malformed = GuestOutcome { malformed: true, ..GuestOutcome::default() };
        let Some((src, dst, ip_header)) = ip_addresses(packet) else { return malformed };
        let rewritten;
        let packet = if rdnet_wire::frame::is_tcp_syn(packet) {
            let mut p = packet.to_vec();
            let mss = |mtu: usize| u16::try_from(mtu.saturating_sub(ip_header + TCP_HEADER)).unwrap_or(u16::MAX);
            if arrival.large_frames {
                rdnet_wire::frame::set_tcp_mss(&mut p, mss(IP_MTU));
            } else {
                // smoltcp's MTU is the largest a link carries, so the MSS is
                // all that keeps its segments within this guest's MTU.
                rdnet_wire::frame::clamp_tcp_mss(&mut p, mss(self.smol.link_mtu));
            }
            rewritten = p;
            &rewritten[..]
        } else {
            packet
        };
        let Some(Ok(seg)) = packet.get(ip_header..).map(TcpPacket::new_checked) else { return malformed };
        let key = FlowKey { guest: SocketAddr::new(src, seg.src_port()), remote: SocketAddr::new(dst, seg.dst_port()) };
        let mut outcome = GuestOutcome::default();
        if let Some(&id) = self.by_key.get(&key) {
            let smol_now = self.smol_now(now);
            let TcpCore { flows, smol, admission, by_key, reports, .. } = self;
            let Some(flow) = flows.get_mut(&id) else {
                by_key.remove(&key);
                return outcome;
            };
            match flow.phase {
                Phase::Connecting { .. } => {
                    if seg.rst() {
                        // The guest gave up; the connect's report finds no flow.
                        self.remove(id);
                    }
                    return outcome;
                }
                Phase::Open { handle }
                    if seg.syn()
                        && !seg.ack()
                        && matches!(
                            flow.sockets.get::<tcp::Socket>(handle).state(),
                            tcp::State::Closed | tcp::State::TimeWait
                        ) =>
                {
                    // The connection is over but its shell has not run it
                    // since: a guest reusing the 4-tuple at once (its port
                    // from TIME-WAIT, `tcp_tw_reuse`) gets a new flow, not a
                    // RST from the old socket. The old flow, woken, sees it
                    // was replaced and ends.
                    settle_half_open(admission, flow);
                    by_key.remove(&key);
                    outcome.wake = Some(id);
                }
                Phase::Open { handle } => {
                    let mut poll = smol.stack(smol_now, link);
                    guest_segment(&mut poll, flow, handle, &seg, packet, arrival.more_follow, reports, now);
                    outcome.wake = Some(id);
                    return outcome;
                }
            }
        }
        if seg.rst() {
            return outcome;
        }
        if !seg.syn() || seg.ack() {
            // Not ours (a host-switch restart, or a long-gone flow): say so.
            send_rst(link, &key, &seg);
            return outcome;
        }
        outcome.connect = self.open(now, port, policy, key, &seg, packet, link);
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        now: Instant,
        port: PortId,
        policy: &NatPolicy,
        key: FlowKey,
        seg: &TcpPacket<&[u8]>,
        packet: &[u8],
        link: &mut impl GuestLink,
    ) -> Option<Connect> {
        let target = if self.gateways.is_gateway(key.remote.ip()) {
            if !self.services.contains(&key.remote.port()) {
                send_rst(link, &key, seg);
                return None;
            }
            Target::Service(key.remote.port())
        } else {
            match policy.translate_ip(key.remote.ip()) {
                Ok(ip) => Target::Host(SocketAddr::new(ip, key.remote.port())),
                Err(why) => {
                    crate::limited_warn!(self.reports.logs, now, "tcp-refused",
                        dst = %key.remote, reason = %why, "refusing TCP connection");
                    send_rst(link, &key, seg);
                    return None;
                }
            }
        };
        if self.admission.admit_guest(port, self.by_key.len()).is_err() {
            self.reports.stats.refused_syns += 1;
            crate::limited_warn!(self.reports.logs, now, "tcp-limit",
                dst = %key.remote, "TCP flow limit reached; resetting new connection");
            send_rst(link, &key, seg);
            return None;
        }
        let id = self.new_id();
        self.flows.insert(
            id,
            Flow {
                key,
                sockets: SocketSet::new(Vec::with_capacity(1)),
                phase: Phase::Connecting { syn: packet.to_vec() },
                memory: None,
                connect_deadline: None,
                half_open: true,
                port,
                host: HostSide::default(),
            },
        );
        self.by_key.insert(key, id);
        Some(Connect { id, target, give_up_at: now + CONNECT_TIMEOUT })
    }

    /// The host connect of flow `id` ended.
    pub fn connected(
        &mut self,
        now: Instant,
        id: FlowId,
        result: ConnectResult,
        link: &mut impl GuestLink,
    ) -> Connected {
        if !self.is_registered(id) {
            return Connected::Drop;
        }
        let smol_now = self.smol_now(now);
        let TcpCore { flows, smol, reports, regions, .. } = self;
        let Some(flow) = flows.get_mut(&id) else { return Connected::Drop };
        let Phase::Connecting { syn } = std::mem::replace(&mut flow.phase, Phase::Connecting { syn: Vec::new() })
        else {
            return Connected::Run;
        };
        match result {
            ConnectResult::Connected => {}
            ConnectResult::Failed(e) => {
                tracing::debug!(flow = %flow.key, error = %e, "host connect failed; telling the guest");
                let key = flow.key;
                self.remove(id);
                let no_route = matches!(e.kind(), io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable);
                if no_route && key.guest.is_ipv6() {
                    return Connected::NoRoute(syn);
                }
                rst_for_packet(link, &key, &syn);
                return Connected::Drop;
            }
            ConnectResult::TimedOut => {
                tracing::debug!(flow = %flow.key, "host connect timed out");
                self.remove(id);
                return Connected::Drop;
            }
        }
        let Some((mut socket, memory)) = new_socket(regions) else {
            let key = flow.key;
            reports.memory_refused(now, &key);
            self.remove(id);
            rst_for_packet(link, &key, &syn);
            return Connected::Drop;
        };
        let local = IpListenEndpoint { addr: Some(flow.key.remote.ip().into()), port: flow.key.remote.port() };
        if socket.listen(local).is_err() {
            self.remove(id);
            return Connected::Drop;
        }
        let handle = flow.sockets.add(socket);
        flow.memory = Some(memory);
        flow.phase = Phase::Open { handle };
        flow.connect_deadline = Some(now + HALF_OPEN_TIMEOUT);
        // The SYN was parsed when it came: these cannot fail.
        let Some((_, _, hl)) = ip_addresses(&syn) else { return Connected::Drop };
        let Some(Ok(seg)) = syn.get(hl..).map(TcpPacket::new_checked) else { return Connected::Drop };
        let mut poll = smol.stack(smol_now, link);
        guest_segment(&mut poll, flow, handle, &seg, &syn, false, reports, now);
        Connected::Run
    }

    /// Opens a connection from the gateway into the guest at `guest` (for a
    /// port forward); its shell then drives it with the host stream. The
    /// SYN leaves on the first drive; a guest that does not accept within
    /// [`GUEST_CONNECT_TIMEOUT`] ends it with a reset.
    pub fn open_to_guest(&mut self, now: Instant, guest: SocketAddr) -> Result<FlowId, GuestConnectError> {
        let gateway = self.gateways.for_family(guest.ip()).ok_or(GuestConnectError::Unaddressable(guest))?;
        let flows = self.by_key.len();
        let TcpCore { admission, by_key, .. } = &mut *self;
        let in_use = |p| by_key.contains_key(&FlowKey { guest, remote: SocketAddr::new(gateway, p) });
        let port = admission.admit_to_guest(flows, in_use).map_err(|r| match r {
            Refused::NoPort => GuestConnectError::NoPort,
            Refused::TooManyFlows | Refused::TooManyHalfOpen => GuestConnectError::TooManyFlows,
        })?;
        let key = FlowKey { guest, remote: SocketAddr::new(gateway, port) };
        let Some((mut socket, memory)) = new_socket(&mut self.regions) else {
            self.reports.stats.memory_refused += 1;
            return Err(GuestConnectError::NoMemory);
        };
        let local = IpListenEndpoint { addr: Some(gateway.into()), port };
        socket
            .connect(self.smol.iface.context(), (IpAddress::from(guest.ip()), guest.port()), local)
            .map_err(|_| GuestConnectError::Unaddressable(guest))?;
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(socket);
        let id = self.new_id();
        self.flows.insert(
            id,
            Flow {
                key,
                sockets,
                phase: Phase::Open { handle },
                memory: Some(memory),
                connect_deadline: Some(now + GUEST_CONNECT_TIMEOUT),
                // Never counted as half-open: the port plays no part.
                half_open: false,
                port: PortId::MAX,
                host: HostSide::default(),
            },
        );
        self.by_key.insert(key, id);
        Ok(id)
    }

    /// Runs flow `id`: moves what its host stream and socket buffers allow
    /// both ways, runs smoltcp's timers and its own (half-open deadline,
    /// idle memory release), and says what next. A flow that is over is
    /// removed before [`Step::Done`] is returned; an unknown id is done.
    pub fn drive(&mut self, now: Instant, id: FlowId, host: &mut impl HostStream, link: &mut impl GuestLink) -> Step {
        let registered = self.is_registered(id);
        let smol_now = self.smol_now(now);
        let TcpCore { flows, smol, admission, reports, .. } = self;
        let Some(flow) = flows.get_mut(&id) else { return Step::Done(End::Reset) };
        let mut poll = smol.stack(smol_now, link);
        let step = drive_flow(&mut poll, flow, registered, admission, reports, now, host);
        if let Step::Done(_) = step {
            self.remove(id);
        }
        step
    }
}

/// smoltcp draws initial sequence numbers and ports from it: anything that
/// differs between runs will do (the standard library's per-process hash
/// keys), and no clock is read for it.
fn seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::process::id())
}

/// The source and destination of an IP packet carrying TCP, and where its
/// TCP header starts. IPv6 with extension headers is not taken.
fn ip_addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr, usize)> {
    match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            (ip.next_header() == IpProtocol::Tcp)
                .then(|| (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()), usize::from(ip.header_len())))
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            (ip.next_header() == IpProtocol::Tcp)
                .then(|| (IpAddr::V6(ip.src_addr()), IpAddr::V6(ip.dst_addr()), IPV6_HEADER))
        }
        _ => None,
    }
}

/// The smoltcp interface all flows are polled through, and its MTUs.
struct Smol {
    iface: Interface,
    /// The largest IP packet smoltcp may build (at least [`IP_MTU`]).
    mtu: usize,
    /// The configured MTU of the VM links.
    link_mtu: usize,
}

impl Smol {
    fn stack<'a, L>(&'a mut self, now: SmolInstant, link: &'a mut L) -> Stack<'a, L> {
        Stack { smol: self, now, link }
    }
}

/// What polling a flow needs besides the flow.
struct Stack<'a, L> {
    smol: &'a mut Smol,
    now: SmolInstant,
    link: &'a mut L,
}

impl<L: GuestLink> Stack<'_, L> {
    /// Polls the shared interface with one flow's socket, optionally
    /// feeding it one packet from the guest. True when it stopped sending
    /// because the way to the guest is congested.
    fn run(&mut self, flow: &mut Flow, rx: Option<&[u8]>) -> bool {
        self.run_with(flow, rx, true)
    }

    /// [`Stack::run`], and with `egress` false only the packet in.
    fn run_with(&mut self, flow: &mut Flow, rx: Option<&[u8]>, egress: bool) -> bool {
        TSVAL_MS.with(|t| t.set(self.now.total_millis() as u32));
        let guest = flow.key.guest.ip();
        let Smol { iface, mtu, link_mtu } = &mut *self.smol;
        let mut dev = FlowDevice { rx, guest, link: self.link, mtu: *mtu, link_mtu: *link_mtu };
        if rx.is_some() {
            iface.poll_ingress_single(self.now, &mut dev, &mut flow.sockets);
        }
        if !egress || flow.holds_fin_ack() {
            return false;
        }
        // One call sends at most one segment per socket: keep going until
        // the window, the congestion window or the data runs out (a single
        // call left most of a 2 MiB buffer waiting for the next ACK), or
        // the guest's queue holds enough. Only a flow with much to send
        // stops for a full queue: a response or an ACK stuck behind a bulk
        // transfer's backlog would wait until it won the race for the
        // queue against the bulk flows woken with it, each time the queue
        // drained (tens of ms with a small link buffer, issue 18), and
        // what it adds to the queue is small.
        let may_stop = !flow.sends_little();
        loop {
            if may_stop && dev.link.congested(guest) {
                return true;
            }
            if iface.poll_egress(self.now, &mut dev, &mut flow.sockets) == smoltcp::iface::PollResult::None {
                return false;
            }
        }
    }
}

/// The flow left the half-open state (established, or gone).
fn settle_half_open(admission: &mut Admission, flow: &mut Flow) {
    if std::mem::replace(&mut flow.half_open, false) {
        admission.settle(flow.port);
    }
}

/// Hands one guest segment to an open flow's socket: first commits the
/// buffer bytes its payload may land in (where that fails the connection
/// is reset instead), and learns where the guest's data starts once smoltcp
/// accepted its SYN.
#[allow(clippy::too_many_arguments)]
fn guest_segment<L: GuestLink>(
    poll: &mut Stack<'_, L>,
    flow: &mut Flow,
    handle: SocketHandle,
    seg: &TcpPacket<&[u8]>,
    packet: &[u8],
    more_follow: bool,
    reports: &mut Reports,
    now: Instant,
) {
    let queued = flow.sockets.get::<tcp::Socket>(handle).recv_queue();
    let cut;
    let (seg, packet) = match flow.memory.as_ref().and_then(|m| m.room_for(seg, queued)) {
        None => (seg.clone(), packet),
        Some(keep) => {
            reports.beyond_window(now, &flow.key);
            cut = truncate_payload(packet, seg, keep);
            let ip_header = cut.len() - usize::from(seg.header_len()) - keep;
            match cut.get(ip_header..).map(TcpPacket::new_checked) {
                Some(Ok(seg)) if keep > 0 => (seg, &cut[..]),
                _ => return,
            }
        }
    };
    let seg = &seg;
    if let Some(memory) = &mut flow.memory
        && let Err(e) = memory.before_guest_segment(seg, queued)
    {
        tracing::debug!(flow = %flow.key, error = %e, "cannot commit receive buffer memory");
        reports.memory_refused(now, &flow.key);
        flow.sockets.get_mut::<tcp::Socket>(handle).abort();
        poll.run(flow, None);
        return;
    }
    // In-order data with more of the link's batch behind it is
    // acknowledged when the flow's task next drives it (after the batch,
    // once the data went on to the host, with the window that opened): one
    // ACK per batch instead of one per segment and then window updates,
    // each a tap write and a guest TCP input in vm-switch. The last frame
    // of a read is answered at once, as is anything else: out-of-order
    // data gets its duplicate ACK, SYN and FIN theirs.
    let socket = flow.sockets.get::<tcp::Socket>(handle);
    let data = seg.payload().len();
    let defer = more_follow && data > 0 && !seg.syn() && !seg.fin() && !seg.rst() && handshake_done(socket.state());
    // The guest closes first (a client done with its request): the ACK of
    // its FIN waits for our own FIN, which follows once the host, told by a
    // shutdown, closes too, as most servers do at once: one frame instead
    // of two. For [`FIN_ACK_DELAY`] at most; host data carries it sooner.
    // (smoltcp acknowledges a segment without payload at once: its delayed
    // ACK starts only for data.)
    let bare_fin = seg.fin() && data == 0 && !seg.syn() && !seg.rst() && socket.state() == tcp::State::Established;
    poll.run_with(flow, Some(packet), !defer && !bare_fin);
    if bare_fin {
        if flow.sockets.get::<tcp::Socket>(handle).state() == tcp::State::CloseWait {
            flow.host.fin_ack_until = Some(now + FIN_ACK_DELAY);
        }
        poll.run(flow, None);
    }
    if defer && flow.sockets.get::<tcp::Socket>(handle).recv_queue() != queued + data {
        poll.run(flow, None);
    }
    if seg.syn()
        && let Some(memory) = &mut flow.memory
        && !memory.has_origin()
        && !matches!(
            flow.sockets.get::<tcp::Socket>(handle).state(),
            tcp::State::Listen | tcp::State::SynSent | tcp::State::Closed
        )
    {
        memory.set_origin(seg.seq_number());
    }
}

/// IP packet `packet`, which holds TCP segment `seg`, with the segment's
/// payload cut to its first `keep` bytes (and no FIN, which came after).
fn truncate_payload(packet: &[u8], seg: &TcpPacket<&[u8]>, keep: usize) -> Vec<u8> {
    let tcp_header = usize::from(seg.header_len());
    let ip_header = packet.len() - seg.as_ref().len();
    let mut p = packet[..ip_header + tcp_header + keep].to_vec();
    let len = p.len();
    match p[0] >> 4 {
        4 => {
            let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
            ip.set_total_len(len as u16);
            ip.fill_checksum();
        }
        _ => Ipv6Packet::new_unchecked(&mut p[..]).set_payload_len((len - IPV6_HEADER) as u16),
    }
    TcpPacket::new_unchecked(&mut p[ip_header..]).set_fin(false);
    p
}

/// Whether a socket in `state` has completed its handshake with the guest.
fn handshake_done(state: tcp::State) -> bool {
    !matches!(state, tcp::State::Closed | tcp::State::Listen | tcp::State::SynSent | tcp::State::SynReceived)
}

/// Moves host bytes into the socket's send buffer, into free space only
/// (its memory committed first). Returns the bytes moved, or `Err` when
/// the flow must be reset.
fn host_to_socket(
    socket: &mut tcp::Socket<'static>,
    memory: &mut Option<FlowMemory>,
    host: &mut impl HostStream,
    side: &mut HostSide,
    reports: &mut Reports,
    now: Instant,
    key: &FlowKey,
) -> Result<usize, ()> {
    let mut moved = 0;
    while !side.eof && socket.may_send() && socket.send_queue() < socket.send_capacity() {
        let r = socket.send(|buf| {
            let plan = match memory.as_mut() {
                Some(m) => m.before_host_read(buf),
                None => Ok(HostRead::Direct(buf.len())),
            };
            match plan {
                Ok(HostRead::Direct(room)) => match host.read(&mut buf[..room]) {
                    Poll::Ready(Ok(n)) => {
                        if let Some(m) = memory.as_mut() {
                            m.read_from_host(&buf[..n]);
                        }
                        (n, Poll::Ready(Ok(n)))
                    }
                    other => (0, other),
                },
                // Nothing committed where the data would go: read what is
                // there first, then commit for it.
                Ok(HostRead::Probe) => {
                    let mut scratch = [0u8; PROBE];
                    let want = PROBE.min(buf.len());
                    match host.read(&mut scratch[..want]) {
                        Poll::Ready(Ok(n)) => match memory.as_mut().map_or(Ok(()), |m| m.commit_probe(buf, n)) {
                            Ok(()) => {
                                buf[..n].copy_from_slice(&scratch[..n]);
                                (n, Poll::Ready(Ok(n)))
                            }
                            Err(e) => (0, Poll::Ready(Err(io::Error::other(e)))),
                        },
                        other => (0, other),
                    }
                }
                Err(e) => (0, Poll::Ready(Err(io::Error::other(e)))),
            }
        });
        match r {
            Ok(Poll::Ready(Ok(0))) => {
                side.eof = true;
                socket.close();
                return Ok(moved.max(1));
            }
            Ok(Poll::Ready(Ok(n))) => moved += n,
            Ok(Poll::Ready(Err(e))) => {
                if e.get_ref().is_some_and(|inner| inner.is::<crate::sys::CommitError>()) {
                    reports.memory_refused(now, key);
                }
                tracing::debug!(flow = %key, error = %e, "host read failed; resetting guest");
                socket.abort();
                return Err(());
            }
            Ok(Poll::Pending) | Err(_) => break,
        }
    }
    Ok(moved)
}

/// Moves guest bytes from the socket's receive buffer to the host, as much
/// as the host takes. Returns whether any moved, or `Err` when the flow
/// must be reset.
fn socket_to_host(
    socket: &mut tcp::Socket<'static>,
    memory: &mut Option<FlowMemory>,
    host: &mut impl HostStream,
    key: &FlowKey,
) -> Result<bool, ()> {
    let mut progressed = false;
    while socket.recv_queue() > 0 {
        let r = socket.recv(|buf| match host.write(buf) {
            Poll::Ready(Ok(n)) => (n, Poll::Ready(Ok(n))),
            other => (0, other),
        });
        match r {
            Ok(Poll::Ready(Ok(n))) if n > 0 => {
                if let Some(m) = memory.as_mut() {
                    m.taken(n);
                }
                progressed = true;
            }
            Ok(Poll::Ready(Err(e))) => {
                tracing::debug!(flow = %key, error = %e, "host write failed; resetting guest");
                socket.abort();
                return Err(());
            }
            _ => break,
        }
    }
    Ok(progressed)
}

fn drive_flow<L: GuestLink>(
    poll: &mut Stack<'_, L>,
    flow: &mut Flow,
    registered: bool,
    admission: &mut Admission,
    reports: &mut Reports,
    now: Instant,
    host: &mut impl HostStream,
) -> Step {
    // Host bytes read in this drive.
    let mut moved = 0usize;
    loop {
        let Phase::Open { handle } = flow.phase else { return Step::Done(End::Closed) };
        if !registered {
            // Replaced by a new connection on the same 4-tuple after this
            // one was over (then it ends as it would have).
            let socket = flow.sockets.get::<tcp::Socket>(handle);
            let over = match socket.state() {
                tcp::State::Closed => flow.host.eof && flow.host.write_shut && socket.recv_queue() == 0,
                tcp::State::TimeWait => socket.recv_queue() == 0,
                _ => false,
            };
            return Step::Done(if over { End::Closed } else { End::Reset });
        }
        let key = flow.key;
        let Flow { sockets, memory, host: side, .. } = &mut *flow;
        let socket = sockets.get_mut::<tcp::Socket>(handle);
        let mut progressed = false;
        let mut reset = false;
        match host_to_socket(socket, memory, host, side, reports, now, &key) {
            Ok(n) => {
                moved += n;
                progressed |= n > 0;
            }
            Err(()) => reset = true,
        }
        if !reset {
            match socket_to_host(socket, memory, host, &key) {
                Ok(p) => progressed |= p,
                Err(()) => reset = true,
            }
        }
        // The handshake is complete once the socket is past SYN-RECEIVED,
        // not only in ESTABLISHED: a guest ACK and FIN handled in one go, or
        // a host EOF read in this same drive, move it on to CLOSE-WAIT or
        // FIN-WAIT before this check sees it (and the flow would stay
        // counted as half-open, then be reset at its deadline).
        let state = socket.state();
        if !side.established && handshake_done(state) {
            side.established = true;
            settle_half_open(admission, flow);
        }
        let Flow { sockets, host: side, connect_deadline, .. } = &mut *flow;
        let socket = sockets.get_mut::<tcp::Socket>(handle);
        if !side.established && connect_deadline.is_some_and(|d| now >= d) {
            tracing::debug!(flow = %key, "guest did not accept in time");
            socket.abort();
            reset = true;
        }
        // Guest FIN and everything written: half-close the host side.
        if !reset
            && side.established
            && !side.write_shut
            && !socket.may_recv()
            && socket.recv_queue() == 0
            && host.shutdown_write().is_ready()
        {
            side.write_shut = true;
            progressed = true;
        }

        if flow.host.fin_ack_until.is_some_and(|until| now >= until) {
            flow.host.fin_ack_until = None;
        }
        // Let smoltcp send what was queued (and window updates).
        let throttled = poll.run(flow, None);

        let socket = flow.sockets.get::<tcp::Socket>(handle);
        match socket.state() {
            // The guest is done, but data it sent still waits for a slow
            // host reader: deliver it before letting the flow go.
            tcp::State::Closed | tcp::State::TimeWait if !reset && socket.recv_queue() > 0 => {}
            tcp::State::Closed => {
                let clean = flow.host.eof && flow.host.write_shut;
                return Step::Done(if clean && !reset { End::Closed } else { End::Reset });
            }
            tcp::State::TimeWait => return Step::Done(End::Closed),
            _ => {}
        }
        if reset {
            return Step::Done(End::Reset);
        }
        let handshake = flow.connect_deadline.filter(|_| !flow.host.established);
        if throttled {
            // smoltcp would ask to run again at once (it has data to send):
            // the shell drives the flow again when the queue drained.
            return Step::Wait(handshake);
        }
        if progressed && moved >= YIELD_AFTER {
            // Let the link writer send what this drive queued before taking
            // more: otherwise a fast host fills the whole send buffer while
            // the VM side waits, and the two take turns instead of overlapping.
            return Step::Yield;
        }
        if progressed {
            flow.host.idle_since = None;
            continue;
        }

        // Idle with nothing buffered for a while: give the memory back.
        let (recv_queue, send_queue) = (socket.recv_queue(), socket.send_queue());
        let release_at = match flow.memory.as_mut().filter(|m| m.releasable(recv_queue, send_queue)) {
            Some(memory) => {
                let at = *flow.host.idle_since.get_or_insert(now) + IDLE_RELEASE;
                if now >= at {
                    memory.release();
                    flow.host.idle_since = None;
                    None
                } else {
                    Some(at)
                }
            }
            None => {
                flow.host.idle_since = None;
                None
            }
        };

        // Nothing to do now: wait for smoltcp's next deadline or our own.
        // (While the FIN's ACK is held smoltcp would ask to send it now.)
        let smol = if flow.holds_fin_ack() {
            flow.host.fin_ack_until
        } else {
            poll.smol.iface.poll_delay(poll.now, &flow.sockets).map(|d| now + Duration::from_micros(d.total_micros()))
        };
        let wake_at = [smol, handshake, release_at].into_iter().flatten().min();
        return Step::Wait(wake_at);
    }
}

/// Answers `seg` with a RST, as a closed port would (RFC 793 reset generation).
fn send_rst(link: &mut impl GuestLink, key: &FlowKey, seg: &TcpPacket<&[u8]>) {
    let seg_len = seg.payload().len() + usize::from(seg.syn()) + usize::from(seg.fin());
    let (seq, ack) =
        if seg.ack() { (seg.ack_number(), None) } else { (TcpSeqNumber(0), Some(seg.seq_number() + seg_len)) };
    let repr = TcpRepr {
        src_port: key.remote.port(),
        dst_port: key.guest.port(),
        control: TcpControl::Rst,
        seq_number: seq,
        ack_number: ack,
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (src, dst) = (IpAddress::from(key.remote.ip()), IpAddress::from(key.guest.ip()));
    if src.version() != dst.version() {
        return;
    }
    let ip = IpRepr::new(src, dst, IpProtocol::Tcp, repr.buffer_len(), 64);
    let header = match ip {
        IpRepr::Ipv4(_) => IPV4_HEADER,
        IpRepr::Ipv6(_) => IPV6_HEADER,
    };
    link.emit(key.guest.ip(), header + repr.buffer_len(), |packet| {
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut *packet, &caps);
        repr.emit(&mut TcpPacket::new_unchecked(&mut packet[header..]), &src, &dst, &caps);
    });
}

/// Answers a guest's TCP packet (an IP packet) with a RST.
fn rst_for_packet(link: &mut impl GuestLink, key: &FlowKey, packet: &[u8]) {
    let Some((_, _, hl)) = ip_addresses(packet) else { return };
    if let Some(Ok(seg)) = packet.get(hl..).map(TcpPacket::new_checked) {
        send_rst(link, key, &seg);
    }
}

/// No delayed ACKs: a guest's data is acknowledged once per link read
/// (see `guest_segment`); smoltcp's own delay (1 ms tried) cost
/// request/response a fifth and saved nothing (bench/RESULTS.md). For
/// experiments, `RDNET_ACK_DELAY_US` sets one, read once per process.
fn ack_delay() -> Option<smoltcp::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<smoltcp::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("RDNET_ACK_DELAY_US").ok().and_then(|v| v.parse().ok()).map(smoltcp::time::Duration::from_micros)
    })
}

/// A tuned socket whose buffers live in a lazily committed region; `None`
/// when the address space cannot be had. The memory must outlive the
/// socket: both go into one `Flow` (see its `Drop`).
#[allow(unsafe_code)]
fn new_socket(regions: &mut RegionPool) -> Option<(tcp::Socket<'static>, FlowMemory)> {
    let mut region = regions.take(RX_BUFFER + TX_BUFFER)?;
    // SAFETY: the slices go only into the socket returned with the region's
    // owner; every caller puts the socket into a `Flow`'s socket set and
    // the memory into the same `Flow`, whose `Drop` drops the socket set
    // first, and nothing takes either out again.
    let (rx, tx) = unsafe { region.split(RX_BUFFER) }?;
    let memory = FlowMemory::new(region, RX_BUFFER)?;
    let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(ack_delay());
    socket.set_congestion_control(tcp::CongestionControl::Cubic);
    // Dropped again by smoltcp if the guest's SYN has no timestamp option.
    socket.set_tsval_generator(Some(tsval));
    Some((socket, memory))
}
