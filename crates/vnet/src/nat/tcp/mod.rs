//! TCP: guest connections terminated with smoltcp and bridged to host sockets.
//!
//! How this works.
//!
//! *Finding a flow.* A flow is keyed by (guest address, remote address), the
//! guest's view of the 4-tuple. The table is a `HashMap` from that key to the
//! flow, and every flow owns its own smoltcp `SocketSet` holding exactly one
//! TCP socket; one shared smoltcp `Interface` (IP medium, AnyIP) is polled
//! with that flow's set only. A packet therefore costs a hash lookup and the
//! work of its own socket, O(1) in the number of flows, instead of smoltcp's
//! usual scan of every socket.
//!
//! *Connect first.* A guest SYN with no flow creates one in the connecting
//! state and starts a non-blocking host `connect()`; the SYN is kept. Guest
//! retransmissions of it are ignored meanwhile. On success the smoltcp socket
//! is put into listen state and fed the kept SYN, so the SYN-ACK only leaves
//! when the host side is really there; a refusal sends the guest a RST at
//! once; a timeout sends nothing, so the guest's own timers decide.
//!
//! *Timers.* Each flow runs one local task. It sleeps until the earliest of:
//! its host socket becoming readable or writable (only asked for when there
//! is room, or data, to move), a wake-up from the packet path, or smoltcp's
//! own next deadline (`poll_delay`: retransmission, keep-alive, close).
//! Tokio's timer wheel holds those deadlines, one per flow.
//!
//! *Back-pressure.* Nothing is dropped for lack of room. Host data is read
//! only into free space of the socket's send buffer, so a slow guest stops
//! the host socket from being read and the host's TCP pushes back. Guest data
//! sits in the socket's receive buffer until the host socket takes it, and
//! smoltcp advertises only the free part of that buffer as its window, so a
//! slow host shrinks the guest's window.
//!
//! *Memory.* A flow's buffers are reserved address space, committed only as
//! data reaches them and given back once both have been empty for
//! [`IDLE_RELEASE`] (`flow_memory`, `sys::LazyRegion`), so connections that
//! once moved data and now idle cost little. Before a guest segment goes to
//! smoltcp and before a host read fills the send buffer, the bytes they will
//! write are committed; where the system refuses, the flow is reset (a new
//! one refused with RST) and counted in `memory_refused`: the process never
//! aborts for want of memory.
//!
//! *Closing.* A guest FIN shuts down the host socket's write side once all
//! data is written; a host EOF closes the smoltcp socket, which sends FIN
//! after the data. A guest RST aborts the host socket with a RST (linger 0);
//! a host error aborts the smoltcp socket, which sends RST. A flow is freed
//! as soon as its socket is closed or reaches TIME-WAIT: TIME-WAIT holds no
//! host resources.
//!
//! *Timestamps.* Our SYN-ACKs carry TCP timestamps when the guest's SYN
//! does (RFC 7323), from one clock shared by every flow, so they only grow:
//! a guest kernel may then reuse a port of its own in TIME-WAIT for a new
//! connection at once (`tcp_tw_reuse` needs timestamps to tell the old
//! connection's segments from the new one's). Without them, a guest that
//! opens and closes connections fast runs out of ports and its connects
//! wait (issue 15: 2 500 conn/s falling to 230).
//!
//! *Bounds.* `admission` decides which new flows are taken: at most
//! `max_flows`, and per guest (switch port) a bounded number of half-open
//! ones; a SYN beyond either gets a RST. A half-open flow the guest does
//! not complete within [`HALF_OPEN_TIMEOUT`] is reset, so a SYN flood from
//! one guest holds bounded state and cannot starve another guest.

pub mod admission;
pub mod memory;
#[cfg(all(test, unix))]
mod tests;

use crate::FastMap;
use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::nat::tcp::admission::{Admission, Refused};
use crate::nat::tcp::memory::{FlowMemory, HostRead, PROBE};
use crate::shell::Engine;
use crate::switch::PortId;
use crate::sys::LazyRegion;
use rdnet_wire::frame::{ETH_HEADER, IPV4_HEADER};

/// How long a flow's buffers stay empty before their memory is given back
/// (a 2 MiB buffer each way, committed as traffic touches it: thousands of
/// connections that once moved data and now idle would otherwise keep it).
pub const IDLE_RELEASE: Duration = Duration::from_secs(1);
/// Host bytes a flow moves before it lets other tasks run.
const YIELD_AFTER: usize = 256 * 1024;
/// How long a host `connect()` may take before the flow is forgotten.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a guest may take to answer our SYN-ACK.
pub const HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// Socket buffer sizes (each direction). They live in a lazily committed
/// mapping (`sys::LazyRegion`): a quiet flow costs a page or two of each.
/// 2 MiB measured best: 512 KiB capped a flow at the window (8.8 Gbit/s at
/// MTU 65520), 4 MiB was slower again (cache), see bench/RESULTS.md.
pub const RX_BUFFER: usize = 2048 * 1024;
pub const TX_BUFFER: usize = 2048 * 1024;
// `flow_memory` maps sequence numbers onto the receive ring: a power of two.
const _: () = assert!(RX_BUFFER.is_power_of_two());
/// The IP MTU of the TCP stack: the largest packet a u16-framed link can
/// carry. Segments to a guest are further bounded by the MSS it announced,
/// which for a VM that negotiated offload is raised to [`LARGE_MSS`].
const IP_MTU: usize = rdnet_wire::offload::MAX_LARGE_FRAME - ETH_HEADER;
/// The MSS a large-frame guest's SYN is taken to announce.
const LARGE_MSS: u16 = (IP_MTU - IPV4_HEADER - 20) as u16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub guest: SocketAddrV4,
    pub remote: SocketAddrV4,
}

impl std::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} → {}", self.guest, self.remote)
    }
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

struct FlowState {
    /// Its socket's buffers borrow `memory`'s region: see `Drop`.
    sockets: SocketSet<'static>,
    /// The guest's address: where every segment the socket sends goes.
    guest: Ipv4Addr,
    phase: Phase,
    waker: Option<Waker>,
    memory: Option<FlowMemory>,
}

impl Drop for FlowState {
    /// The socket set goes first, whatever the order of the fields: its
    /// socket's buffers are slices of `memory`'s region, which is unmapped
    /// when `memory` drops (`LazyRegion::split`'s contract).
    fn drop(&mut self) {
        self.sockets = SocketSet::new(Vec::new());
    }
}

pub struct Flow {
    key: FlowKey,
    state: RefCell<FlowState>,
    /// Give up if the handshake is not complete by then (connections into
    /// the guest: 10 s; guest connections: [`HALF_OPEN_TIMEOUT`] after the
    /// SYN-ACK).
    connect_deadline: std::cell::Cell<Option<tokio::time::Instant>>,
    /// Counted in the guest's half-open flows until established or gone.
    half_open: std::cell::Cell<bool>,
    /// The switch port the guest's SYN came in on (the half-open bound's key).
    port: PortId,
}

/// A gateway service reachable over TCP inside the virtual network (DNS on
/// :53, the API on :80): gets one end of an in-memory stream per connection.
pub type GatewayService = Rc<dyn Fn(tokio::io::DuplexStream, SocketAddrV4)>;

/// What polling a flow needs besides the flow: smoltcp's interface and a
/// frame buffer. Taken out of [`TcpNat`] for the poll (see `poll_flow`).
struct Stack {
    iface: Interface,
    tx_frame: Vec<u8>,
}

pub struct TcpNat {
    /// `None` only while a flow is being polled.
    stack: Option<Box<Stack>>,
    epoch: std::time::Instant,
    flows: FastMap<FlowKey, Rc<Flow>>,
    /// The bounds on new flows (`--max-flows`, half-open per guest).
    pub admission: Admission,
    mtu: usize,
    /// The configured MTU of the VM links.
    link_mtu: usize,
    services: FastMap<u16, GatewayService>,
    pub refused_syns: u64,
    /// Flows refused or reset because their buffer memory could not be
    /// reserved or committed.
    pub memory_refused: u64,
}

/// The one-packet device a flow is polled with.
struct FlowDevice<'a> {
    rx: Option<&'a [u8]>,
    guest: Ipv4Addr,
    engine: &'a Engine,
    tx_frame: &'a mut Vec<u8>,
    mtu: usize,
    link_mtu: usize,
}

struct FlowRx<'a>(&'a [u8]);
struct FlowTx<'a> {
    guest: Ipv4Addr,
    engine: &'a Engine,
    tx_frame: &'a mut Vec<u8>,
    link_mtu: usize,
}

impl RxToken for FlowRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl TxToken for FlowTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let link_mtu = self.link_mtu;
        let emit = move |packet: &mut [u8]| {
            let r = f(packet);
            // smoltcp leaves the TCP checksum to us (see `flow_caps`). A
            // segment above the link's MTU goes only to a VM that negotiated
            // offload, where its checksum field means nothing
            // (rdnet_wire::offload).
            if len <= link_mtu && packet.get(9) == Some(&(IpProtocol::Tcp.into())) {
                rdnet_wire::checksum::fill_ipv4_transport(packet, 16);
            }
            r
        };
        // Usually straight into the guest port's queue, without a copy.
        let emit = match self.engine.build_frame_to_guest(self.guest, len, emit) {
            Ok(r) => return r,
            Err(emit) => emit,
        };
        // The buffer keeps its size: zeroing 64 KiB per segment showed in
        // profiles, and smoltcp writes every byte of the `len` it asks for.
        if self.tx_frame.len() < ETH_HEADER + len {
            self.tx_frame.resize(ETH_HEADER + len, 0);
        }
        let frame = &mut self.tx_frame[..ETH_HEADER + len];
        let r = emit(&mut frame[ETH_HEADER..]);
        self.engine.send_ipv4_frame_to_guest(frame);
        r
    }
}

impl FlowDevice<'_> {
    fn tx(&mut self) -> FlowTx<'_> {
        FlowTx { guest: self.guest, engine: self.engine, tx_frame: self.tx_frame, link_mtu: self.link_mtu }
    }
}

impl Device for FlowDevice<'_> {
    type RxToken<'b>
        = FlowRx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = FlowTx<'b>
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

impl TcpNat {
    pub fn new(gateway: Ipv4Addr, prefix: u8, mtu: usize, max_flows: usize) -> Self {
        let epoch = std::time::Instant::now();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = epoch.elapsed().as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
        let link_mtu = mtu;
        let mtu = mtu.max(IP_MTU);
        let mut tx_frame = Vec::new();
        let mut dummy = NullDevice { mtu };
        let mut iface = Interface::new(config, &mut dummy, SmolInstant::from_micros(0));
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(gateway), prefix));
        });
        tx_frame.resize(ETH_HEADER + mtu, 0);
        TcpNat {
            stack: Some(Box::new(Stack { iface, tx_frame })),
            epoch,
            flows: FastMap::default(),
            admission: Admission::new(max_flows),
            mtu,
            link_mtu,
            services: FastMap::default(),
            refused_syns: 0,
            memory_refused: 0,
        }
    }

    pub fn register_service(&mut self, port: u16, service: GatewayService) {
        self.services.insert(port, service);
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Flows whose handshake with the guest is not complete yet.
    pub fn connecting(&self) -> usize {
        self.admission.half_open()
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
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
    /// The TCP timestamp clock (milliseconds of the NAT's clock), set before
    /// each poll: smoltcp asks for timestamps through a plain `fn()`, which
    /// can hold no state of its own, and a flow is only ever polled on the
    /// thread that owns the NAT.
    static TSVAL_MS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// smoltcp's timestamp source: the NAT's clock in milliseconds (wrapping,
/// as RFC 7323 allows), the same for every flow, so never going back.
fn tsval() -> u32 {
    TSVAL_MS.with(std::cell::Cell::get)
}

/// Polls the shared interface with one flow's sockets, optionally feeding
/// it one packet from the guest.
///
/// The stack is taken out of the table for the poll, so no borrow of the
/// table is held while smoltcp's sends call back into the engine (which may
/// reach the table again: a `RefCell` would panic). A poll entered from
/// inside another (nothing does so today) finds no stack and does nothing;
/// the flow's own task polls it again.
fn poll_flow(engine: &Engine, state: &mut FlowState, rx: Option<&[u8]>) {
    let (mut stack, now, mtu, link_mtu) = {
        let mut nat = engine.tcp.borrow_mut();
        let Some(stack) = nat.stack.take() else {
            tracing::debug!("TCP poll re-entered; left to the flow's task");
            return;
        };
        (stack, nat.now(), nat.mtu, nat.link_mtu)
    };
    // Truncation is the wrap RFC 7323 expects of a 32-bit timestamp clock.
    TSVAL_MS.with(|t| t.set(now.total_millis() as u32));
    let Stack { iface, tx_frame } = &mut *stack;
    let mut dev = FlowDevice { rx, guest: state.guest, engine, tx_frame, mtu, link_mtu };
    if rx.is_some() {
        iface.poll(now, &mut dev, &mut state.sockets);
    } else {
        // One call sends at most one segment per socket: keep going until
        // the window, the congestion window or the data runs out (a single
        // call left most of a 2 MiB buffer waiting for the next ACK).
        while iface.poll_egress(now, &mut dev, &mut state.sockets) != smoltcp::iface::PollResult::None {}
    }
    engine.tcp.borrow_mut().stack = Some(stack);
}

/// Entry point for a TCP segment from the guest (an IPv4 packet).
/// `large_frames`: the guest's port takes segments above its MTU, so its
/// SYN's MSS is raised to [`LARGE_MSS`] before smoltcp sees it; any other
/// guest's is capped at what its MTU allows.
pub fn handle_guest_packet(engine: &Rc<Engine>, port: PortId, header: &Ipv4Repr, packet: &[u8], large_frames: bool) {
    let rewritten;
    let packet = if rdnet_wire::frame::is_tcp_syn(packet) {
        let mut p = packet.to_vec();
        if large_frames {
            rdnet_wire::frame::set_tcp_mss(&mut p, LARGE_MSS);
        } else {
            // smoltcp's MTU is the largest a link carries, so the MSS is
            // all that keeps its segments within this guest's MTU.
            let link_mtu = engine.tcp.borrow().link_mtu;
            rdnet_wire::frame::clamp_tcp_mss(&mut p, u16::try_from(link_mtu - IPV4_HEADER - 20).unwrap_or(u16::MAX));
        }
        rewritten = p;
        &rewritten[..]
    } else {
        packet
    };
    let Ok(ip) = Ipv4Packet::new_checked(packet) else { return };
    let hl = ip.header_len() as usize;
    let Some(Ok(seg)) = packet.get(hl..).map(TcpPacket::new_checked) else {
        engine.net.borrow_mut().stats.drops.malformed += 1;
        return;
    };
    let key = FlowKey {
        guest: SocketAddrV4::new(header.src_addr, seg.src_port()),
        remote: SocketAddrV4::new(header.dst_addr, seg.dst_port()),
    };
    let existing = engine.tcp.borrow().flows.get(&key).cloned();
    if let Some(flow) = existing {
        let mut state = flow.state.borrow_mut();
        match state.phase {
            Phase::Connecting { .. } => {
                if seg.rst() {
                    // The guest gave up; the connect task notices the flow is gone.
                    drop(state);
                    remove_flow(engine, &flow);
                }
            }
            Phase::Open { handle }
                if seg.syn()
                    && !seg.ack()
                    && matches!(
                        state.sockets.get::<tcp::Socket>(handle).state(),
                        tcp::State::Closed | tcp::State::TimeWait
                    ) =>
            {
                // The connection is over but its task has not run since: a
                // guest reusing the 4-tuple at once (its port from
                // TIME-WAIT, `tcp_tw_reuse`) gets a new flow, not a RST from
                // the old socket. The old task sees it was replaced and ends.
                let waker = state.waker.take();
                drop(state);
                remove_flow(engine, &flow);
                if let Some(w) = waker {
                    w.wake();
                }
                open_flow(engine, port, key, &seg, packet);
            }
            Phase::Open { handle } => {
                poll_guest_segment(engine, &flow, &mut state, handle, &seg, packet);
                let waker = state.waker.take();
                drop(state);
                if let Some(w) = waker {
                    w.wake();
                }
            }
        }
        return;
    }
    if seg.rst() {
        return;
    }
    if !seg.syn() || seg.ack() {
        // Not ours (a host-switch restart, or a long-gone flow): say so.
        send_rst(engine, &key, &seg);
        return;
    }
    open_flow(engine, port, key, &seg, packet);
}

fn open_flow(engine: &Rc<Engine>, port: PortId, key: FlowKey, seg: &TcpPacket<&[u8]>, packet: &[u8]) {
    let gateway = engine.net.borrow().cfg.gateway_ip;
    let target: Target = if *key.remote.ip() == gateway {
        match engine.tcp.borrow().services.get(&key.remote.port()) {
            Some(svc) => Target::Service(svc.clone()),
            None => {
                send_rst(engine, &key, seg);
                return;
            }
        }
    } else {
        match engine.nat.translate(*key.remote.ip()) {
            Ok(ip) => Target::Host(SocketAddr::new(ip, key.remote.port())),
            Err(why) => {
                crate::limited_warn!(engine.logs.borrow_mut(), std::time::Instant::now(), "tcp-refused",
                    dst = %key.remote, reason = %why, "refusing TCP connection");
                send_rst(engine, &key, seg);
                return;
            }
        }
    };
    {
        let mut nat = engine.tcp.borrow_mut();
        let flows = nat.flows.len();
        if nat.admission.admit_guest(port, flows).is_err() {
            nat.refused_syns += 1;
            drop(nat);
            crate::limited_warn!(engine.logs.borrow_mut(), std::time::Instant::now(), "tcp-limit",
                dst = %key.remote, "TCP flow limit reached; resetting new connection");
            send_rst(engine, &key, seg);
            return;
        }
        let flow = Rc::new(Flow {
            key,
            state: RefCell::new(FlowState {
                sockets: SocketSet::new(Vec::with_capacity(1)),
                guest: *key.guest.ip(),
                phase: Phase::Connecting { syn: packet.to_vec() },
                waker: None,
                memory: None,
            }),
            connect_deadline: std::cell::Cell::new(None),
            half_open: std::cell::Cell::new(true),
            port,
        });
        nat.flows.insert(key, flow.clone());
        tokio::task::spawn_local(connect_and_run(engine.clone(), flow, target));
    }
}

enum Target {
    Host(SocketAddr),
    Service(GatewayService),
}

/// How long a connection into the guest may take to be accepted.
pub const GUEST_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum GuestConnectError {
    #[error("too many TCP flows")]
    TooManyFlows,
    #[error("no free source port on the gateway")]
    NoPort,
    #[error("no memory for the connection's buffers")]
    NoMemory,
    #[error("cannot open a connection to {0}")]
    Unaddressable(SocketAddrV4),
}

/// Opens a connection from the gateway into the guest at `guest` and
/// bridges it to `stream` (a host connection accepted by a port forward).
/// If the guest refuses, or does not answer within
/// [`GUEST_CONNECT_TIMEOUT`], the host stream is closed.
pub fn connect_to_guest<S>(engine: &Rc<Engine>, guest: SocketAddrV4, stream: S) -> Result<(), GuestConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let gateway = engine.net.borrow().cfg.gateway_ip;
    let mut nat = engine.tcp.borrow_mut();
    let flows = nat.flows.len();
    let TcpNat { admission, flows: table, .. } = &mut *nat;
    let in_use = |p| table.contains_key(&FlowKey { guest, remote: SocketAddrV4::new(gateway, p) });
    let port = admission.admit_to_guest(flows, in_use).map_err(|r| match r {
        Refused::NoPort => GuestConnectError::NoPort,
        Refused::TooManyFlows | Refused::TooManyHalfOpen => GuestConnectError::TooManyFlows,
    })?;
    let key = FlowKey { guest, remote: SocketAddrV4::new(gateway, port) };
    let Some((mut socket, memory)) = new_socket() else {
        nat.memory_refused += 1;
        return Err(GuestConnectError::NoMemory);
    };
    let local = IpListenEndpoint { addr: Some(IpAddress::Ipv4(gateway)), port: key.remote.port() };
    let Some(stack) = nat.stack.as_mut() else { return Err(GuestConnectError::Unaddressable(guest)) };
    socket
        .connect(stack.iface.context(), (IpAddress::Ipv4(*guest.ip()), guest.port()), local)
        .map_err(|_| GuestConnectError::Unaddressable(guest))?;
    let mut sockets = SocketSet::new(Vec::with_capacity(1));
    let handle = sockets.add(socket);
    let flow = Rc::new(Flow {
        key,
        state: RefCell::new(FlowState {
            sockets,
            guest: *guest.ip(),
            phase: Phase::Open { handle },
            waker: None,
            memory: Some(memory),
        }),
        connect_deadline: std::cell::Cell::new(Some(tokio::time::Instant::now() + GUEST_CONNECT_TIMEOUT)),
        half_open: std::cell::Cell::new(false),
        // Never counted as half-open: the port plays no part.
        port: PortId::MAX,
    });
    nat.flows.insert(key, flow.clone());
    drop(nat);
    tokio::task::spawn_local(run_flow(engine.clone(), flow, stream, |_| {}));
    Ok(())
}

/// A tuned socket whose buffers live in a lazily committed region; `None`
/// when the address space cannot be had. The memory must outlive the
/// socket: both go into one `FlowState` (see its `Drop`).
#[allow(unsafe_code)]
fn new_socket() -> Option<(tcp::Socket<'static>, FlowMemory)> {
    let mut region = LazyRegion::new(RX_BUFFER + TX_BUFFER)?;
    // SAFETY: the slices go only into the socket returned with the region's
    // owner; every caller puts the socket into a `FlowState`'s socket set
    // and the memory into the same `FlowState`, whose `Drop` drops the
    // socket set first, and nothing takes either out again.
    let (rx, tx) = unsafe { region.split(RX_BUFFER) }?;
    let memory = FlowMemory::new(region, RX_BUFFER)?;
    let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(None);
    socket.set_congestion_control(tcp::CongestionControl::Cubic);
    // Dropped again by smoltcp if the guest's SYN has no timestamp option.
    socket.set_tsval_generator(Some(tsval));
    Some((socket, memory))
}

async fn connect_and_run(engine: Rc<Engine>, flow: Rc<Flow>, target: Target) {
    match target {
        Target::Host(addr) => {
            let result = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await;
            if !still_registered(&engine, &flow) {
                return;
            }
            match result {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    let keepalive = socket2::TcpKeepalive::new()
                        .with_time(Duration::from_secs(60))
                        .with_interval(Duration::from_secs(10));
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                    if accept_guest(&engine, &flow) {
                        run_flow(engine, flow, stream, |s: &TcpStream| {
                            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
                        })
                        .await;
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(flow = %flow.key, error = %e, "host connect failed; resetting guest");
                    reset_connecting(&engine, &flow);
                }
                Err(_) => {
                    tracing::debug!(flow = %flow.key, "host connect timed out");
                    remove_flow(&engine, &flow);
                }
            }
        }
        Target::Service(service) => {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            if accept_guest(&engine, &flow) {
                service(theirs, flow.key.guest);
                run_flow(engine, flow, ours, |_| {}).await;
            }
        }
    }
}

fn still_registered(engine: &Engine, flow: &Rc<Flow>) -> bool {
    engine.tcp.borrow().flows.get(&flow.key).is_some_and(|f| Rc::ptr_eq(f, flow))
}

/// Turns a connecting flow into an open one: a listening socket fed the
/// guest's SYN, which answers with SYN-ACK.
fn accept_guest(engine: &Engine, flow: &Rc<Flow>) -> bool {
    let mut state = flow.state.borrow_mut();
    let Phase::Connecting { syn } = std::mem::replace(&mut state.phase, Phase::Connecting { syn: Vec::new() }) else {
        return false;
    };
    let Some((mut socket, memory)) = new_socket() else {
        drop(state);
        refuse_for_memory(engine, &flow.key);
        remove_flow(engine, flow);
        rst_for_packet(engine, &flow.key, &syn);
        return false;
    };
    let local = IpListenEndpoint { addr: Some(IpAddress::Ipv4(*flow.key.remote.ip())), port: flow.key.remote.port() };
    if socket.listen(local).is_err() {
        return false;
    }
    let handle = state.sockets.add(socket);
    state.memory = Some(memory);
    state.phase = Phase::Open { handle };
    flow.connect_deadline.set(Some(tokio::time::Instant::now() + HALF_OPEN_TIMEOUT));
    let Ok(ip) = Ipv4Packet::new_checked(&syn[..]) else { return false };
    let Some(Ok(seg)) = syn.get(ip.header_len() as usize..).map(TcpPacket::new_checked) else { return false };
    poll_guest_segment(engine, flow, &mut state, handle, &seg, &syn);
    true
}

/// Counts and logs a flow refused because its memory could not be had.
fn refuse_for_memory(engine: &Engine, key: &FlowKey) {
    engine.tcp.borrow_mut().memory_refused += 1;
    crate::limited_warn!(engine.logs.borrow_mut(), std::time::Instant::now(), "tcp-memory",
        flow = %key, "no memory for the connection's buffers; resetting it");
}

/// Hands one guest segment to an open flow's socket: first commits the
/// buffer bytes its payload may land in (where that fails the connection
/// is reset instead), and learns where the guest's data starts once smoltcp
/// accepted its SYN.
fn poll_guest_segment(
    engine: &Engine,
    flow: &Flow,
    state: &mut FlowState,
    handle: SocketHandle,
    seg: &TcpPacket<&[u8]>,
    packet: &[u8],
) {
    let queued = state.sockets.get::<tcp::Socket>(handle).recv_queue();
    if let Some(memory) = &mut state.memory
        && let Err(e) = memory.before_guest_segment(seg, queued)
    {
        tracing::debug!(flow = %flow.key, error = %e, "cannot commit receive buffer memory");
        refuse_for_memory(engine, &flow.key);
        state.sockets.get_mut::<tcp::Socket>(handle).abort();
        poll_flow(engine, state, None);
        return;
    }
    poll_flow(engine, state, Some(packet));
    if seg.syn()
        && let Some(memory) = &mut state.memory
        && !memory.has_origin()
        && !matches!(
            state.sockets.get::<tcp::Socket>(handle).state(),
            tcp::State::Listen | tcp::State::SynSent | tcp::State::Closed
        )
    {
        memory.set_origin(seg.seq_number());
    }
}

fn reset_connecting(engine: &Engine, flow: &Rc<Flow>) {
    let syn = match &flow.state.borrow().phase {
        Phase::Connecting { syn } => syn.clone(),
        Phase::Open { .. } => Vec::new(),
    };
    remove_flow(engine, flow);
    rst_for_packet(engine, &flow.key, &syn);
}

/// Answers a guest's TCP packet (an IPv4 packet) with a RST.
fn rst_for_packet(engine: &Engine, key: &FlowKey, packet: &[u8]) {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else { return };
    let hl = ip.header_len() as usize;
    if let Some(Ok(seg)) = packet.get(hl..).map(TcpPacket::new_checked) {
        send_rst(engine, key, &seg);
    }
}

/// The flow left the half-open state (established, or gone).
fn settle_half_open(nat: &mut TcpNat, flow: &Flow) {
    if flow.half_open.replace(false) {
        nat.admission.settle(flow.port);
    }
}

fn remove_flow(engine: &Engine, flow: &Rc<Flow>) {
    let mut nat = engine.tcp.borrow_mut();
    settle_half_open(&mut nat, flow);
    if nat.flows.get(&flow.key).is_some_and(|f| Rc::ptr_eq(f, flow)) {
        nat.flows.remove(&flow.key);
    }
}

/// Answers `seg` with a RST, as a closed port would (RFC 793 reset generation).
fn send_rst(engine: &Engine, key: &FlowKey, seg: &TcpPacket<&[u8]>) {
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
    let ip = Ipv4Repr {
        src_addr: *key.remote.ip(),
        dst_addr: *key.guest.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: repr.buffer_len(),
        hop_limit: 64,
    };
    let mut frame = vec![0u8; ETH_HEADER + IPV4_HEADER + repr.buffer_len()];
    let mut pkt = Ipv4Packet::new_unchecked(&mut frame[ETH_HEADER..]);
    ip.emit(&mut pkt, &ChecksumCapabilities::default());
    repr.emit(
        &mut TcpPacket::new_unchecked(pkt.payload_mut()),
        &IpAddress::Ipv4(*key.remote.ip()),
        &IpAddress::Ipv4(*key.guest.ip()),
        &ChecksumCapabilities::default(),
    );
    engine.send_ipv4_frame_to_guest(&mut frame);
}

/// What ended a flow's bridge.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Both directions closed cleanly.
    Closed,
    /// The guest reset or the socket died: reset the host side too.
    Reset,
}

/// Moves data between one open flow and its host stream until both are done.
async fn run_flow<S>(engine: Rc<Engine>, flow: Rc<Flow>, stream: S, abort_host: impl FnOnce(&S))
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut io = HostIo::default();
    let mut sleep = Box::pin(tokio::time::sleep(Duration::from_secs(3600)));
    let end = poll_fn(|cx| bridge(cx, &engine, &flow, &mut rd, &mut wr, &mut io, sleep.as_mut())).await;
    remove_flow(&engine, &flow);
    let stream = rd.unsplit(wr);
    if end == End::Reset {
        abort_host(&stream);
    }
    tracing::trace!(flow = %flow.key, "flow done ({end:?})");
}

#[derive(Default)]
struct HostIo {
    /// The host sent EOF (and the smoltcp socket was told to close).
    host_eof: bool,
    /// The host socket's write side was shut down after the guest's FIN.
    host_write_shut: bool,
    /// The guest's handshake completed (FIN checks mean nothing before).
    established: bool,
    /// Since when both socket buffers have been empty.
    idle_since: Option<tokio::time::Instant>,
}

fn bridge<R, W>(
    cx: &mut Context<'_>,
    engine: &Engine,
    flow: &Flow,
    rd: &mut R,
    wr: &mut W,
    io: &mut HostIo,
    mut sleep: Pin<&mut tokio::time::Sleep>,
) -> Poll<End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Bytes read from the host in this poll.
    let mut moved = 0usize;
    loop {
        let mut state = flow.state.borrow_mut();
        let Phase::Open { handle } = state.phase else { return Poll::Ready(End::Closed) };
        if !still_registered_flow(engine, flow) {
            // Replaced by a new connection on the same 4-tuple after this
            // one was over (then it ends as it would have), or dropped.
            let socket = state.sockets.get::<tcp::Socket>(handle);
            let over = match socket.state() {
                tcp::State::Closed => io.host_eof && io.host_write_shut && socket.recv_queue() == 0,
                tcp::State::TimeWait => socket.recv_queue() == 0,
                _ => false,
            };
            return Poll::Ready(if over { End::Closed } else { End::Reset });
        }
        let mut progressed = false;
        let mut reset = false;
        {
            let FlowState { sockets, memory, .. } = &mut *state;
            let socket = sockets.get_mut::<tcp::Socket>(handle);

            // Host → guest, into free space of the send buffer only (its
            // memory committed first: a refusal resets the connection).
            while !io.host_eof && socket.may_send() && socket.send_queue() < socket.send_capacity() {
                let r = socket.send(|buf| {
                    let plan = match memory.as_mut() {
                        Some(m) => m.before_host_read(buf),
                        None => Ok(HostRead::Direct(buf.len())),
                    };
                    match plan {
                        Ok(HostRead::Direct(room)) => {
                            let mut rb = ReadBuf::new(&mut buf[..room]);
                            match Pin::new(&mut *rd).poll_read(cx, &mut rb) {
                                Poll::Ready(Ok(())) => (rb.filled().len(), Poll::Ready(Ok(rb.filled().len()))),
                                Poll::Ready(Err(e)) => (0, Poll::Ready(Err(e))),
                                Poll::Pending => (0, Poll::Pending),
                            }
                        }
                        // Nothing committed where the data would go: read
                        // what is there first, then commit for it.
                        Ok(HostRead::Probe) => {
                            let mut scratch = [0u8; PROBE];
                            let want = PROBE.min(buf.len());
                            let mut rb = ReadBuf::new(&mut scratch[..want]);
                            match Pin::new(&mut *rd).poll_read(cx, &mut rb) {
                                Poll::Ready(Ok(())) => {
                                    let n = rb.filled().len();
                                    let committed = memory.as_mut().map_or(Ok(()), |m| m.commit_probe(buf, n));
                                    match committed {
                                        Ok(()) => {
                                            buf[..n].copy_from_slice(&scratch[..n]);
                                            (n, Poll::Ready(Ok(n)))
                                        }
                                        Err(e) => (0, Poll::Ready(Err(io::Error::other(e)))),
                                    }
                                }
                                Poll::Ready(Err(e)) => (0, Poll::Ready(Err(e))),
                                Poll::Pending => (0, Poll::Pending),
                            }
                        }
                        Err(e) => (0, Poll::Ready(Err(io::Error::other(e)))),
                    }
                });
                match r {
                    Ok(Poll::Ready(Ok(0))) => {
                        io.host_eof = true;
                        socket.close();
                        progressed = true;
                    }
                    Ok(Poll::Ready(Ok(n))) => {
                        progressed = true;
                        moved += n;
                    }
                    Ok(Poll::Ready(Err(e))) => {
                        if e.get_ref().is_some_and(|inner| inner.is::<crate::sys::CommitError>()) {
                            refuse_for_memory(engine, &flow.key);
                        }
                        tracing::debug!(flow = %flow.key, error = %e, "host read failed; resetting guest");
                        socket.abort();
                        reset = true;
                        break;
                    }
                    Ok(Poll::Pending) | Err(_) => break,
                }
            }

            // Guest → host, as much as the host socket takes.
            while !reset && socket.recv_queue() > 0 {
                let r = socket.recv(|buf| match Pin::new(&mut *wr).poll_write(cx, buf) {
                    Poll::Ready(Ok(n)) => (n, Poll::Ready(Ok(n))),
                    Poll::Ready(Err(e)) => (0, Poll::Ready(Err::<usize, io::Error>(e))),
                    Poll::Pending => (0, Poll::Pending),
                });
                match r {
                    Ok(Poll::Ready(Ok(n))) if n > 0 => {
                        if let Some(m) = memory.as_mut() {
                            m.taken(n);
                        }
                        progressed = true;
                    }
                    Ok(Poll::Ready(Err(e))) => {
                        tracing::debug!(flow = %flow.key, error = %e, "host write failed; resetting guest");
                        socket.abort();
                        reset = true;
                    }
                    _ => break,
                }
            }

            // The handshake is complete once the socket is past SYN-RECEIVED,
            // not only in ESTABLISHED: a guest ACK and FIN handled in one
            // go, or a host EOF read in this same poll, move it on to
            // CLOSE-WAIT or FIN-WAIT before this check sees it (and the flow
            // would stay counted as half-open, then be reset at its deadline).
            if !io.established && handshake_done(socket.state()) {
                io.established = true;
                settle_half_open(&mut engine.tcp.borrow_mut(), flow);
            }
            if !io.established && flow.connect_deadline.get().is_some_and(|d| tokio::time::Instant::now() >= d) {
                tracing::debug!(flow = %flow.key, "guest did not accept in time");
                socket.abort();
                reset = true;
            }
            // Guest FIN and everything written: half-close the host side.
            if !reset
                && io.established
                && !io.host_write_shut
                && !socket.may_recv()
                && socket.recv_queue() == 0
                && Pin::new(&mut *wr).poll_shutdown(cx).is_ready()
            {
                io.host_write_shut = true;
                progressed = true;
            }
        }

        // Let smoltcp send what was queued (and window updates).
        poll_flow(engine, &mut state, None);

        let socket = state.sockets.get::<tcp::Socket>(handle);
        match socket.state() {
            // The guest is done, but data it sent still waits for a slow
            // host reader: deliver it before letting the flow go.
            tcp::State::Closed | tcp::State::TimeWait if !reset && socket.recv_queue() > 0 => {}
            tcp::State::Closed => {
                let clean = io.host_eof && io.host_write_shut;
                return Poll::Ready(if clean && !reset { End::Closed } else { End::Reset });
            }
            tcp::State::TimeWait => return Poll::Ready(End::Closed),
            _ => {}
        }
        if reset {
            return Poll::Ready(End::Reset);
        }
        if progressed && moved >= YIELD_AFTER {
            // Let the link writer send what this poll queued before taking
            // more: otherwise a fast host fills the whole send buffer while
            // the VM side waits, and the two take turns instead of overlapping.
            drop(state);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if progressed {
            io.idle_since = None;
            continue;
        }

        // Idle with nothing buffered for a while: give the memory back.
        let release_at = {
            let FlowState { sockets, memory, .. } = &mut *state;
            let socket = sockets.get::<tcp::Socket>(handle);
            if let Some(memory) = memory.as_mut().filter(|m| m.releasable(socket.recv_queue(), socket.send_queue())) {
                let at = *io.idle_since.get_or_insert_with(tokio::time::Instant::now) + IDLE_RELEASE;
                if tokio::time::Instant::now() >= at {
                    memory.release();
                    io.idle_since = None;
                    None
                } else {
                    Some(at)
                }
            } else {
                io.idle_since = None;
                None
            }
        };

        // Nothing to do now: sleep until smoltcp's next deadline or a wake.
        let delay = {
            let mut nat = engine.tcp.borrow_mut();
            let now = nat.now();
            // No stack (inside another poll, which nothing does): check
            // again soon rather than never.
            match nat.stack.as_mut() {
                Some(stack) => stack.iface.poll_delay(now, &state.sockets),
                None => Some(smoltcp::time::Duration::from_millis(1)),
            }
        };
        state.waker = Some(cx.waker().clone());
        drop(state);
        let delay = match (delay, flow.connect_deadline.get().filter(|_| !io.established)) {
            (Some(d), Some(cd)) => Some(d.min(smoltcp::time::Duration::from_micros(
                cd.saturating_duration_since(tokio::time::Instant::now()).as_micros() as u64,
            ))),
            (None, Some(cd)) => Some(smoltcp::time::Duration::from_micros(
                cd.saturating_duration_since(tokio::time::Instant::now()).as_micros() as u64,
            )),
            (d, None) => d,
        };
        let delay = match (delay, release_at) {
            (d, None) => d,
            (d, Some(at)) => {
                let until = smoltcp::time::Duration::from_micros(
                    at.saturating_duration_since(tokio::time::Instant::now()).as_micros() as u64,
                );
                Some(d.map_or(until, |d| d.min(until)))
            }
        };
        match delay {
            Some(d) => {
                let deadline = tokio::time::Instant::now() + Duration::from_micros(d.total_micros());
                sleep.as_mut().reset(deadline);
                if sleep.as_mut().poll(cx).is_ready() {
                    // A timer is due now: run smoltcp's timers and go again.
                    let mut state = flow.state.borrow_mut();
                    state.waker = None;
                    poll_flow(engine, &mut state, None);
                    continue;
                }
            }
            None => {
                sleep.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(3600));
            }
        }
        return Poll::Pending;
    }
}

/// Whether a socket in `state` has completed its handshake with the guest.
fn handshake_done(state: tcp::State) -> bool {
    !matches!(state, tcp::State::Closed | tcp::State::Listen | tcp::State::SynSent | tcp::State::SynReceived)
}

fn still_registered_flow(engine: &Engine, flow: &Flow) -> bool {
    engine.tcp.borrow().flows.get(&flow.key).is_some_and(|f| std::ptr::eq(&**f, flow))
}

impl Flow {
    pub fn key(&self) -> FlowKey {
        self.key
    }
}
