//! TCP NAT, the I/O shell around [`TcpCore`]: host connects, one task per
//! open flow, and the gateway's own TCP services.
//!
//! How this works: a guest segment goes to the core, which may ask for a
//! host connect (a task here connects with the core's deadline and reports
//! the result) or name a flow to wake. An open flow's task drives the core
//! with its host stream: the core reads and writes through it (a
//! `Poll::Pending` registers this task's waker with the stream) and says
//! whether to yield, to wait (the task keeps its waker here for guest
//! segments and sleeps until the time the core gave), or that the flow is
//! over (the host socket is then closed, with a RST if the core says so).
//! Frames for the guest are built straight into its switch port's queue; a
//! flow that finds that queue holding [`PORT_BACKLOG`] stops sending and is
//! kept in `throttled` until the port's writer takes the queue
//! ([`wake_throttled`]), when the throttled flows are woken in turn
//! ([`ThrottleQueue`]). Every time given to the core is read here, from
//! tokio's clock.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::nat::tcp::{
    Arrival, ConnectResult, Connected, End, FlowId, GuestConnectError, GuestLink, HostStream, Step, Target, TcpCore,
    TcpStats,
};
use crate::shell::Engine;
use crate::switch::PortId;
use crate::{FastMap, FastSet};
use rdnet_wire::frame::ETH_HEADER;

/// A gateway service reachable over TCP inside the virtual network (DNS on
/// :53, the API on :80): gets one end of an in-memory stream per connection.
pub type GatewayService = Rc<dyn Fn(tokio::io::DuplexStream, SocketAddr)>;

/// How many bytes a guest's port queue may hold before TCP flows stop
/// sending to it until it drains: a few ms of the link at most, so a bulk
/// transfer leaves room for other flows' segments (latency under load).
pub const PORT_BACKLOG: usize = 256 * 1024;

pub struct TcpNat {
    core: TcpCore,
    /// The tasks of open flows that wait, to wake on a guest segment.
    wakers: FastMap<FlowId, Waker>,
    /// Flows that stopped sending because their guest's queue was full.
    throttled: ThrottleQueue<FlowId>,
    services: FastMap<u16, GatewayService>,
    /// Where a frame is built when it cannot go straight into its port's
    /// queue (see [`EngineLink`]).
    scratch: Vec<u8>,
}

/// The shell's clock: tokio's, so its timers and the core agree.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl TcpNat {
    pub fn new(core: TcpCore) -> Self {
        TcpNat {
            core,
            wakers: FastMap::default(),
            throttled: ThrottleQueue::default(),
            services: FastMap::default(),
            scratch: Vec::new(),
        }
    }

    pub fn register_service(&mut self, port: u16, service: GatewayService) {
        self.core.add_service(port);
        self.services.insert(port, service);
    }

    pub fn len(&self) -> usize {
        self.core.len()
    }

    pub fn is_empty(&self) -> bool {
        self.core.is_empty()
    }

    pub fn connecting(&self) -> usize {
        self.core.connecting()
    }

    pub fn stats(&self) -> TcpStats {
        self.core.stats()
    }

    #[cfg(all(test, unix))]
    pub(crate) fn committed(&self) -> usize {
        self.core.committed()
    }
}

/// Flows that stopped sending because their guest's queue was full, in the
/// order they get their turn when a queue drains.
///
/// How this works: when a queue drains, every throttled flow is woken, and
/// the tasks run in the order woken: the first fills the queue again and
/// the others find it full and stop once more. Woken in a fixed order (a
/// hash set's, before), the same flow won every round and the others
/// starved (four host→guest streams with a 416 KiB link buffer: 12.2
/// Gbit/s for one, 0.57 for another). So a flow that found the queue full
/// before it sent anything keeps its place ahead of the flows that did
/// send: round-robin, a turn being about [`PORT_BACKLOG`]. Ended flows are
/// dropped from the order lazily.
struct ThrottleQueue<T> {
    members: FastSet<T>,
    /// Stopped before sending anything: first in the next round.
    waited: VecDeque<T>,
    /// Sent, then stopped: after those.
    served: VecDeque<T>,
}

impl<T> Default for ThrottleQueue<T> {
    fn default() -> Self {
        ThrottleQueue { members: FastSet::default(), waited: VecDeque::new(), served: VecDeque::new() }
    }
}

impl<T: Copy + Eq + std::hash::Hash> ThrottleQueue<T> {
    fn insert(&mut self, id: T, sent: bool) {
        if self.members.insert(id) {
            if sent { self.served.push_back(id) } else { self.waited.push_back(id) }
        }
    }

    fn remove(&mut self, id: T) {
        self.members.remove(&id);
        if self.members.is_empty() {
            self.waited.clear();
            self.served.clear();
        }
    }

    fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member, in turn order; the queue is empty afterwards.
    fn take_all(&mut self) -> Vec<T> {
        let ThrottleQueue { members, waited, served } = self;
        let turns = waited.drain(..).chain(served.drain(..)).filter(|id| members.remove(id)).collect();
        members.clear();
        turns
    }
}

/// Frames from the core to the guests, through the engine's switch.
struct EngineLink<'a> {
    engine: &'a Engine,
    scratch: &'a mut Vec<u8>,
    /// A flow found its guest's queue full in this call.
    throttled: bool,
    /// A frame went out in this call.
    sent: bool,
    /// What the port of the guest last sent to had queued right after that
    /// frame: the congestion check of the next segment needs no lookup.
    backlog: Option<(IpAddr, usize)>,
}

impl<'a> EngineLink<'a> {
    fn new(engine: &'a Engine, scratch: &'a mut Vec<u8>) -> Self {
        EngineLink { engine, scratch, throttled: false, sent: false, backlog: None }
    }
}

impl GuestLink for EngineLink<'_> {
    fn emit<R>(&mut self, dst: IpAddr, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        self.sent = true;
        // Usually straight into the guest port's queue, without a copy.
        let fill = match self.engine.build_frame_to_guest(dst, len, fill) {
            Ok((r, backlog)) => {
                self.backlog = Some((dst, backlog));
                return r;
            }
            Err(fill) => fill,
        };
        self.backlog = None;
        // The buffer keeps its size: zeroing 64 KiB per segment showed in
        // profiles, and the core writes every byte of the `len` it asks for.
        if self.scratch.len() < ETH_HEADER + len {
            self.scratch.resize(ETH_HEADER + len, 0);
        }
        let frame = &mut self.scratch[..ETH_HEADER + len];
        let r = fill(&mut frame[ETH_HEADER..]);
        self.engine.send_ip_frame_to_guest(frame);
        r
    }

    fn congested(&mut self, dst: IpAddr) -> bool {
        let backlog = match self.backlog {
            Some((to, backlog)) if to == dst => backlog,
            _ => self.engine.port_backlog(dst),
        };
        let full = backlog > PORT_BACKLOG;
        self.throttled |= full;
        full
    }
}

/// The guest's port queue drained (or the port is gone): its throttled
/// flows run again.
pub fn wake_throttled(engine: &Engine) {
    let wakers: Vec<Waker> = {
        let mut tcp = engine.tcp.borrow_mut();
        if tcp.throttled.is_empty() {
            return;
        }
        let TcpNat { throttled, wakers, .. } = &mut *tcp;
        throttled.take_all().into_iter().filter_map(|id| wakers.remove(&id)).collect()
    };
    for w in wakers {
        w.wake();
    }
}

/// A flow's host stream as the core reads and writes it, within one poll
/// of its task (the core reads and writes in turn, never at once, so one
/// `&mut` serves both ways).
struct PolledStream<'a, 'c, S> {
    cx: &'a mut Context<'c>,
    stream: &'a mut S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> HostStream for PolledStream<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        let mut rb = ReadBuf::new(buf);
        Pin::new(&mut *self.stream).poll_read(self.cx, &mut rb).map_ok(|()| rb.filled().len())
    }

    fn write(&mut self, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.stream).poll_write(self.cx, buf)
    }

    fn shutdown_write(&mut self) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.stream).poll_shutdown(self.cx)
    }
}

/// What a flow's task does to its host stream besides moving bytes.
struct HostCare<S> {
    /// Once the flow has lived [`LONG_LIVED`]: most connections are over
    /// sooner, and spare these system calls.
    long_lived: fn(&S),
    /// When the core ends the flow with a reset.
    abort: fn(&S),
}

impl<S> HostCare<S> {
    fn none() -> Self {
        HostCare { long_lived: |_| {}, abort: |_| {} }
    }
}

/// When a flow's host socket gets its keepalive (see [`HostCare`]).
const LONG_LIVED: Duration = Duration::from_secs(1);

/// A host peer that vanishes without a word is noticed after ~2 min.
fn host_keepalive(stream: &TcpStream) {
    let keepalive =
        socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10));
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot turn on TCP keepalive for a host connection");
    }
}

fn host_abort(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Entry point for a TCP segment from the guest on `port` (an IP packet of
/// either version); `large_frames`: the port takes segments above its MTU.
pub fn handle_guest_packet(engine: &Rc<Engine>, port: PortId, packet: &[u8], large_frames: bool) {
    let outcome = {
        let mut tcp = engine.tcp.borrow_mut();
        let TcpNat { core, scratch, .. } = &mut *tcp;
        let arrival = Arrival { large_frames, more_follow: engine.more_follow.get() };
        core.guest_packet(now(), port, &engine.nat, packet, arrival, &mut EngineLink::new(engine, scratch))
    };
    if outcome.malformed {
        engine.net.borrow_mut().stats.drops.malformed += 1;
    }
    if let Some(id) = outcome.wake {
        wake(engine, id);
    }
    if let Some(connect) = outcome.connect {
        tokio::task::spawn_local(connect_and_run(engine.clone(), connect.id, connect.target, connect.give_up_at));
    }
}

fn wake(engine: &Engine, id: FlowId) {
    let waker = engine.tcp.borrow_mut().wakers.remove(&id);
    if let Some(w) = waker {
        w.wake();
    }
}

/// Reports a connect's result to the core: true when the flow is open.
fn report(engine: &Engine, id: FlowId, result: ConnectResult) -> bool {
    let connected = {
        let mut tcp = engine.tcp.borrow_mut();
        let TcpNat { core, scratch, .. } = &mut *tcp;
        core.connected(now(), id, result, &mut EngineLink::new(engine, scratch))
    };
    match connected {
        Connected::Run => true,
        Connected::Drop => false,
        Connected::NoRoute(syn) => {
            engine.no_route6(&syn);
            false
        }
    }
}

async fn connect_and_run(engine: Rc<Engine>, id: FlowId, target: Target, give_up_at: Instant) {
    match target {
        Target::Host(addr) => {
            let deadline = tokio::time::Instant::from_std(give_up_at);
            let (result, stream) = match tokio::time::timeout_at(deadline, connect(addr)).await {
                Ok(Ok(stream)) => (ConnectResult::Connected, Some(stream)),
                Ok(Err(e)) => (ConnectResult::Failed(e), None),
                Err(_) => (ConnectResult::TimedOut, None),
            };
            if report(&engine, id, result)
                && let Some(stream) = stream
            {
                run_flow(engine, id, stream, HostCare { long_lived: host_keepalive, abort: host_abort }).await;
            }
        }
        Target::Service(port) => {
            let service = engine.tcp.borrow().services.get(&port).cloned();
            let guest = engine.tcp.borrow().core.guest_of(id);
            let (Some(service), Some(guest)) = (service, guest) else {
                report(&engine, id, ConnectResult::Failed(std::io::ErrorKind::ConnectionRefused.into()));
                return;
            };
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            if report(&engine, id, ConnectResult::Connected) {
                service(theirs, guest);
                run_flow(engine, id, ours, HostCare::none()).await;
            }
        }
    }
}

/// Connects to `addr` without blocking. Over loopback the kernel completes
/// the handshake (or refuses it) inside `connect()` itself: then the result
/// is known at once and the guest's SYN-ACK (or RST) leaves in this same
/// turn of the event loop, not the next (issue 18: the connection rate).
/// Otherwise it waits for the socket to become writable, as tokio's own
/// connect does.
async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    // Every system call counts at thousands of connections a second.
    #[cfg(target_os = "linux")]
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    #[cfg(not(target_os = "linux"))]
    let socket = {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket
    };
    socket.set_tcp_nodelay(true)?;
    let in_progress = match socket.connect(&addr.into()) {
        Ok(()) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(EINPROGRESS) => true,
        Err(e) => return Err(e),
    };
    let done = |socket: &Socket| -> std::io::Result<bool> {
        // A socket with a peer is connected; one without is still
        // connecting (ENOTCONN), unless the connect failed.
        if socket.peer_addr().is_ok() {
            return Ok(true);
        }
        match socket.take_error()? {
            Some(e) => Err(e),
            None => Ok(false),
        }
    };
    if in_progress && !done(&socket)? {
        let stream = TcpStream::from_std(socket.into())?;
        stream.writable().await?;
        let socket = socket2::SockRef::from(&stream);
        if !done(&socket)? {
            return Err(std::io::ErrorKind::NotConnected.into());
        }
        return Ok(stream);
    }
    TcpStream::from_std(socket.into())
}

#[cfg(unix)]
const EINPROGRESS: i32 = libc::EINPROGRESS;
#[cfg(windows)]
const EINPROGRESS: i32 = windows_sys::Win32::Networking::WinSock::WSAEINPROGRESS;

/// Opens a connection from the gateway into the guest at `guest` and
/// bridges it to `stream` (a host connection accepted by a port forward).
/// If the guest refuses, or does not answer in time, the host stream is
/// closed.
pub fn connect_to_guest<S>(engine: &Rc<Engine>, guest: SocketAddr, stream: S) -> Result<(), GuestConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let id = engine.tcp.borrow_mut().core.open_to_guest(now(), guest)?;
    tokio::task::spawn_local(run_flow(engine.clone(), id, stream, HostCare::none()));
    Ok(())
}

/// Drives one open flow with its host stream until the core says it is over.
async fn run_flow<S>(engine: Rc<Engine>, id: FlowId, mut stream: S, care: HostCare<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut sleep = Box::pin(tokio::time::sleep(Duration::from_secs(3600)));
    let mut long_lived_at = Some(now() + LONG_LIVED);
    let end = poll_fn(|cx| {
        let t = now();
        if long_lived_at.is_some_and(|at| t >= at) {
            long_lived_at = None;
            (care.long_lived)(&stream);
        }
        let step = {
            let mut tcp = engine.tcp.borrow_mut();
            let TcpNat { core, scratch, wakers, throttled, .. } = &mut *tcp;
            let mut host = PolledStream { cx: &mut *cx, stream: &mut stream };
            let mut link = EngineLink::new(&engine, scratch);
            let step = core.drive(t, id, &mut host, &mut link);
            match step {
                Step::Wait(_) => {
                    wakers.insert(id, cx.waker().clone());
                    if link.throttled {
                        throttled.insert(id, link.sent);
                    }
                }
                Step::Done(_) => {
                    wakers.remove(&id);
                    throttled.remove(id);
                }
                Step::Yield => {}
            }
            step
        };
        match step {
            Step::Done(end) => Poll::Ready(end),
            Step::Yield => {
                // Let the link writer send what this drive queued first.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Step::Wait(at) => {
                let at = match (at, long_lived_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let at = at.map_or_else(
                    || tokio::time::Instant::now() + Duration::from_secs(3600),
                    tokio::time::Instant::from_std,
                );
                sleep.as_mut().reset(at);
                if sleep.as_mut().poll(cx).is_ready() {
                    // Due already: drive again after others had a turn.
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    })
    .await;
    if end == End::Reset {
        (care.abort)(&stream);
    }
    tracing::trace!(flow = ?id, "flow done ({end:?})");
}

#[cfg(test)]
mod throttle_tests {
    use super::ThrottleQueue;

    /// Rounds of a drained queue: the flows run in turn order, the first
    /// fills the queue (sends, then stops), the others find it full.
    #[test]
    fn throttled_flows_take_turns() {
        let mut q = ThrottleQueue::default();
        for flow in [1u64, 2, 3, 4] {
            q.insert(flow, false);
        }
        let mut first = Vec::new();
        for _ in 0..8 {
            let order = q.take_all();
            assert_eq!(order.len(), 4, "{order:?}");
            first.push(order[0]);
            q.insert(order[0], true);
            for &flow in &order[1..] {
                q.insert(flow, false);
            }
        }
        assert_eq!(first, [1, 2, 3, 4, 1, 2, 3, 4]);
    }

    #[test]
    fn ended_flows_leave_and_nobody_comes_twice() {
        let mut q = ThrottleQueue::default();
        q.insert(1u64, false);
        q.insert(2, true);
        q.insert(3, false);
        q.insert(1, true);
        q.remove(3);
        assert_eq!(q.take_all(), [1, 2]);
        assert!(q.is_empty());
        q.insert(4, false);
        q.remove(4);
        q.insert(4, true);
        assert_eq!(q.take_all(), [4]);
    }
}
