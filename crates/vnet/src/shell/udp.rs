//! UDP NAT, the I/O shell around [`UdpCore`]: the host sockets, the tasks
//! that read them, and the one idle timer.
//!
//! How this works: a guest datagram goes to the core, which names the flow
//! to send it on or asks for a new one; the shell opens a non-blocking UDP
//! socket bound to the wildcard address and connected to the target (so the
//! kernel delivers only that peer's replies to it), starts a task reading
//! it, and sends straight to the kernel. On Linux, datagrams that arrive
//! with more of the same link read behind them wait in an outbox until the
//! end of that read (the engine's `more_follow`; at most 64 frames or
//! 256 KiB, when the link reader yields); then each run for one flow goes out
//! with one `sendmmsg`, so a bulk UDP sender's datagrams cost one system
//! call per batch, not one each. A lone datagram (request/response, DNS)
//! goes at once, and elsewhere every datagram does. The outbox is emptied
//! before a new flow may evict an old one, so nothing in it waits for
//! another task or loses its socket. Each read is shown
//! to the core, which says where the guest gets it from; socket errors go
//! to the core too. A flow the core ends (evicted, idle, failed) loses its
//! socket and task here. One timer task sleeps until the core's next idle
//! deadline and then asks it which flows expired; it ends when there are
//! no flows and is started again by the next one. Every time given to the
//! core is read here, once per event.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::FastMap;
use crate::nat::udp::{FlowId, Route, UdpCore, UdpNatStats};
use crate::shell::Engine;

/// Datagrams one wake of a reply task reads before it yields.
pub(crate) const DRAIN_BUDGET: usize = 64;

/// How a drain of a flow's socket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drained {
    /// Nothing more waiting.
    Empty,
    /// [`DRAIN_BUDGET`] datagrams read and maybe more waiting: yield, then
    /// drain again (the socket stays readable, so the next wait returns at once).
    Budget,
    /// The socket failed for good.
    Failed,
}

/// Whether guest datagrams wait for the end of their link read to leave in
/// batches: only where `sendmmsg` makes a batch one system call; elsewhere
/// the outbox would only add a copy.
const BATCH_SENDS: bool = cfg!(target_os = "linux");

/// Size of the shared receive buffer: the largest UDP payload there is, so
/// an oversized reply is seen whole and counted rather than cut.
const SCRATCH: usize = 65536;
/// A socket whose reads fail this many times in a row ends its flow.
pub(crate) const MAX_ERRORS_IN_A_ROW: u32 = 8;

/// A NAT flow's host socket and the task reading its replies; the task is
/// aborted when the flow is dropped. Shared with the ICMP NAT, whose ping
/// sockets are datagram sockets too.
pub(crate) struct Flow {
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
    core: UdpCore,
    flows: FastMap<FlowId, Flow>,
    /// The idle timer's task, while there are flows.
    timer: Option<JoinHandle<()>>,
    /// One receive buffer shared by every flow's task (one thread).
    scratch: Vec<u8>,
    /// Guest datagrams waiting for the end of the link read they came in.
    outbox: Outbox,
}

/// Guest datagrams held until the end of a link read, in arrival order.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    /// Each datagram's flow and where its payload ends in `bytes`.
    datagrams: Vec<(FlowId, usize)>,
}

impl Outbox {
    fn push(&mut self, id: FlowId, payload: &[u8]) {
        self.bytes.extend_from_slice(payload);
        self.datagrams.push((id, self.bytes.len()));
    }

    fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }
}

impl UdpNat {
    /// `link_mtu`: the IP MTU of the guest links.
    pub fn new(max_flows: usize, idle: Duration, link_mtu: usize) -> Self {
        UdpNat {
            core: UdpCore::new(max_flows, idle, link_mtu),
            flows: FastMap::default(),
            timer: None,
            scratch: Vec::new(),
            outbox: Outbox::default(),
        }
    }

    /// Number of open flows.
    pub fn len(&self) -> usize {
        self.core.len()
    }

    pub fn is_empty(&self) -> bool {
        self.core.is_empty()
    }

    pub fn stats(&self) -> UdpNatStats {
        self.core.stats()
    }

    /// Forwards one guest datagram from `src` to `dst` (one family) through
    /// a host socket. False when the host has no socket for it (no route to
    /// the destination, say): the caller may tell the guest so.
    pub fn send(engine: &Rc<Engine>, src: SocketAddr, dst: SocketAddr, payload: &[u8], now: Instant) -> bool {
        let mut unreachable = Vec::new();
        let sent = Self::send_or_queue(engine, src, dst, payload, now, &mut unreachable);
        for packet in unreachable {
            port_unreachable(engine, &packet);
        }
        sent
    }

    /// Sends whatever the outbox holds (the end of a link read).
    pub fn flush(engine: &Rc<Engine>) {
        let mut unreachable = Vec::new();
        engine.udp.borrow_mut().send_outbox(Instant::now(), &mut unreachable);
        for packet in unreachable {
            port_unreachable(engine, &packet);
        }
    }

    fn send_or_queue(
        engine: &Rc<Engine>,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
        now: Instant,
        unreachable: &mut Vec<Vec<u8>>,
    ) -> bool {
        let mut guard = engine.udp.borrow_mut();
        let nat = &mut *guard;
        let id = match nat.core.route_guest(now, &engine.nat, src, dst) {
            Route::Refused => return true,
            Route::Flow(id) => id,
            Route::Open { id, target } => match connect_udp(target) {
                Ok(socket) => {
                    let socket = Rc::new(socket);
                    let task = tokio::task::spawn_local(reply_task(engine.clone(), id, socket.clone()));
                    // The new flow may evict one with datagrams waiting.
                    nat.send_outbox(now, unreachable);
                    for old in nat.core.opened(now, (src, dst), id) {
                        nat.flows.remove(&old);
                    }
                    nat.flows.insert(id, Flow { socket, task: Some(task) });
                    if nat.timer.as_ref().is_none_or(JoinHandle::is_finished) {
                        nat.timer = Some(tokio::task::spawn_local(idle_timer(engine.clone())));
                    }
                    id
                }
                Err(e) => {
                    nat.core.open_failed(now, (src, dst), target, &e);
                    return false;
                }
            },
        };
        let Some(flow) = nat.flows.get(&id) else { return true };
        let more_follow = engine.more_follow.get();
        if !(BATCH_SENDS && (more_follow || !nat.outbox.is_empty())) {
            // Straight to the kernel: tokio's `try_send` would refuse until
            // the reactor has seen the new socket writable, losing first
            // datagrams.
            let result = socket2::SockRef::from(&*flow.socket).send(payload).map(drop);
            unreachable.extend(nat.core.sent(now, id, payload.len(), result));
            return true;
        }
        nat.outbox.push(id, payload);
        if !more_follow {
            nat.send_outbox(now, unreachable);
        }
        true
    }

    /// Sends the outbox, one batch per run of datagrams for the same flow;
    /// ICMP port-unreachable packets for the guest go to `unreachable`.
    fn send_outbox(&mut self, now: Instant, unreachable: &mut Vec<Vec<u8>>) {
        if self.outbox.is_empty() {
            return;
        }
        let mut outbox = std::mem::take(&mut self.outbox);
        let mut results = Vec::new();
        let mut payloads: Vec<&[u8]> = Vec::new();
        let (mut first, mut start) = (0, 0);
        while first < outbox.datagrams.len() {
            let id = outbox.datagrams[first].0;
            let run = outbox.datagrams[first..].iter().take_while(|(flow, _)| *flow == id).count();
            payloads.clear();
            for &(_, end) in &outbox.datagrams[first..first + run] {
                payloads.push(&outbox.bytes[start..end]);
                start = end;
            }
            first += run;
            // A flow ended meanwhile (its socket closed with it): its
            // datagrams go nowhere, as they would have had they come later.
            let Some(flow) = self.flows.get(&id) else { continue };
            results.clear();
            send_batch(&flow.socket, &payloads, &mut results);
            for (payload, result) in payloads.iter().zip(results.drain(..)) {
                unreachable.extend(self.core.sent(now, id, payload.len(), result));
            }
        }
        // Keep the buffers for the next batch.
        outbox.bytes.clear();
        outbox.datagrams.clear();
        self.outbox = outbox;
    }

    /// Drops the sockets and tasks of flows the core ended.
    fn close(&mut self, ids: impl IntoIterator<Item = FlowId>) {
        for id in ids {
            self.flows.remove(&id);
        }
    }
}

/// Sends each of `payloads` on `socket` (connected), pushing one result per
/// payload to `results`, in order: one `sendmmsg` for all of them, again
/// from the first one it did not take (whose error is that datagram's).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn send_batch(socket: &UdpSocket, payloads: &[&[u8]], results: &mut Vec<io::Result<()>>) {
    use std::os::fd::AsRawFd;
    let mut iovecs: Vec<libc::iovec> =
        payloads.iter().map(|p| libc::iovec { iov_base: p.as_ptr().cast_mut().cast(), iov_len: p.len() }).collect();
    let mut messages: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero mmsghdr is a valid value (no name, no
            // control data, null pointers with zero lengths).
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut done = 0;
    while done < messages.len() {
        let rest = &mut messages[done..];
        let count = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        // SAFETY: `rest` holds `count` initialised headers whose single iovec
        // each points at a payload borrowed for this whole call; the kernel
        // only reads them (and writes each header's msg_len).
        let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), rest.as_mut_ptr(), count, 0) };
        if n == 0 {
            // Not what the kernel does for a non-empty batch; never loop on it.
            results.push(Err(io::ErrorKind::WriteZero.into()));
            done += 1;
            continue;
        }
        if n > 0 {
            let n = n as usize;
            results.extend((0..n).map(|_| Ok(())));
            done += n;
            continue;
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        results.push(Err(e));
        done += 1;
    }
}

#[cfg(not(target_os = "linux"))]
fn send_batch(socket: &UdpSocket, payloads: &[&[u8]], results: &mut Vec<io::Result<()>>) {
    let socket = socket2::SockRef::from(socket);
    results.extend(payloads.iter().map(|p| socket.send(p).map(drop)));
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

/// Sleeps until the core's next idle deadline and closes what expired;
/// ends when no flow is left.
async fn idle_timer(engine: Rc<Engine>) {
    loop {
        let Some(at) = engine.udp.borrow().core.next_deadline() else {
            engine.udp.borrow_mut().timer = None;
            return;
        };
        tokio::time::sleep_until(at.into()).await;
        let mut nat = engine.udp.borrow_mut();
        let gone = nat.core.expire(Instant::now());
        nat.close(gone);
    }
}

/// Waits for replies on one flow's socket and hands them to the core and
/// on to the guest, until the socket fails for good (or the flow ends and
/// this task is aborted).
async fn reply_task(engine: Rc<Engine>, id: FlowId, socket: Rc<UdpSocket>) {
    watch_replies(
        &socket,
        || drain(&engine, id, &socket),
        // An error the drain did not consume (SO_ERROR).
        |e| {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                refused(&engine, id);
            }
        },
    )
    .await;
    let mut nat = engine.udp.borrow_mut();
    if nat.core.host_failed(id)
        && let Some(mut flow) = nat.flows.remove(&id)
    {
        // This task ends by itself; aborting it from inside is pointless.
        flow.task = None;
    }
}

/// The loop of a datagram flow's reply task (UDP here, ICMP's too): waits
/// until the socket is readable or has an error, `drain`s it, yields after
/// a full budget (a host that sends faster than the guest link takes would
/// otherwise keep the engine thread here), and hands a pending socket error
/// to `on_error`, clearing tokio's error readiness so the loop does not
/// spin. Returns once the socket failed for good.
pub(crate) async fn watch_replies(
    socket: &UdpSocket,
    mut drain: impl FnMut() -> Drained,
    mut on_error: impl FnMut(io::Error),
) {
    loop {
        let Ok(ready) = socket.ready(Interest::READABLE | Interest::ERROR).await else { return };
        match drain() {
            Drained::Empty => {}
            Drained::Budget => tokio::task::yield_now().await,
            Drained::Failed => return,
        }
        if ready.is_error() {
            if let Ok(Some(e)) = socket.take_error() {
                on_error(e);
            }
            let _ = socket.try_io(Interest::ERROR, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
        }
    }
}

/// Reads the datagrams waiting on a flow's socket, at most [`DRAIN_BUDGET`],
/// and sends each to the guest as the core says.
fn drain(engine: &Rc<Engine>, id: FlowId, socket: &UdpSocket) -> Drained {
    let mut buf = std::mem::take(&mut engine.udp.borrow_mut().scratch);
    buf.resize(SCRATCH, 0);
    let drained = drain_socket(
        socket,
        &mut buf,
        |datagram| {
            let route = engine.udp.borrow_mut().core.host_datagram(Instant::now(), id, datagram.len());
            if let Some((from, to)) = route {
                engine.send_udp_reply(from, to, datagram);
            }
        },
        |e| {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                refused(engine, id);
                return false;
            }
            // Reading consumes the error (host or network unreachable, say).
            engine.udp.borrow_mut().core.host_error(Instant::now(), id, &e);
            true
        },
    );
    engine.udp.borrow_mut().scratch = buf;
    drained
}

/// Reads what waits on a datagram socket into `buf`, at most
/// [`DRAIN_BUDGET`] reads: each datagram to `on_datagram`, each error to
/// `on_error`, which says whether it counts towards giving the socket up
/// (after [`MAX_ERRORS_IN_A_ROW`] of them in one drain).
pub(crate) fn drain_socket(
    socket: &UdpSocket,
    buf: &mut [u8],
    mut on_datagram: impl FnMut(&[u8]),
    mut on_error: impl FnMut(io::Error) -> bool,
) -> Drained {
    let mut errors = 0;
    for _ in 0..DRAIN_BUDGET {
        match socket.try_recv(buf) {
            Ok(n) => on_datagram(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Empty,
            Err(e) => {
                if on_error(e) {
                    errors += 1;
                    if errors > MAX_ERRORS_IN_A_ROW {
                        return Drained::Failed;
                    }
                }
            }
        }
    }
    Drained::Budget
}

/// The host refused flow `id`'s datagrams: tell the guest.
fn refused(engine: &Rc<Engine>, id: FlowId) {
    let packet = engine.udp.borrow().core.host_refused(id);
    if let Some(packet) = packet {
        port_unreachable(engine, &packet);
    }
}

fn port_unreachable(engine: &Rc<Engine>, packet: &[u8]) {
    if engine.send_ip_to_guest(packet) {
        engine.udp.borrow_mut().core.port_unreachable_sent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let alias = SocketAddr::from((Ipv4Addr::new(192, 168, 127, 254), port));
            let guest = |p| SocketAddr::from((Ipv4Addr::new(192, 168, 127, 2), p));
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
            assert!(engine.udp.borrow().core.flow(&(guest(1001), alias)).is_none());
            assert_eq!(engine.udp.borrow().stats().flows_evicted, 1);
            // Refused destinations open nothing.
            UdpNat::send(&engine, guest(1003), SocketAddr::from((Ipv4Addr::BROADCAST, 9)), b"b", Instant::now());
            assert_eq!(engine.udp.borrow().stats().refused, 1);
            // Idle flows end by themselves.
            tokio::time::sleep(idle * 3).await;
            assert_eq!(engine.udp.borrow().len(), 0);
            assert_eq!(engine.udp.borrow().stats().flows_expired, 2);
        });
    }

    /// Datagrams with more of their link read behind them wait for its
    /// end and then leave in order, each flow's as one batch; a read that
    /// ends in a frame that is not UDP sends them too.
    #[cfg(target_os = "linux")]
    #[test]
    fn datagrams_of_one_link_read_leave_together_and_in_order() {
        use crate::shell::EngineConfig;
        use crate::{NetConfig, Network};

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let cfg = NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap();
            let engine = Engine::new(Network::new(cfg), EngineConfig::default());
            let receiver = || {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                let alias = SocketAddr::from((Ipv4Addr::new(192, 168, 127, 254), s.local_addr().unwrap().port()));
                (s, alias)
            };
            let ((a, to_a), (b, to_b)) = (receiver(), receiver());
            let received = |s: &std::net::UdpSocket| {
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                while let Ok(n) = s.recv(&mut buf) {
                    got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
                got
            };
            let guest = |p| SocketAddr::from((Ipv4Addr::new(192, 168, 127, 2), p));
            let send = |from, to, what: &str| UdpNat::send(&engine, guest(from), to, what.as_bytes(), Instant::now());

            // Lone datagrams open the two flows (a new flow sends what
            // waits first: it may evict a flow with datagrams waiting).
            assert!(send(1000, to_a, "a0") && send(1001, to_b, "b0"));
            assert_eq!((received(&a), received(&b)), (vec!["a0".to_string()], vec!["b0".to_string()]));
            engine.more_follow.set(true);
            for (from, to, what) in [(1000, to_a, "a1"), (1000, to_a, "a2"), (1001, to_b, "b1"), (1000, to_a, "a3")] {
                assert!(send(from, to, what));
            }
            // Loopback delivers within the send: nothing was sent yet.
            assert!(received(&a).is_empty() && received(&b).is_empty());
            assert_eq!(engine.udp.borrow().stats().datagrams_out, 2);
            // The read's last frame sends everything.
            engine.more_follow.set(false);
            assert!(send(1001, to_b, "b2"));
            assert_eq!(received(&a), ["a1", "a2", "a3"]);
            assert_eq!(received(&b), ["b1", "b2"]);
            assert_eq!(engine.udp.borrow().stats().datagrams_out, 7);

            // A read whose last frame was not UDP: the reader flushes.
            engine.more_follow.set(true);
            assert!(send(1000, to_a, "a4"));
            engine.more_follow.set(false);
            assert!(received(&a).is_empty());
            UdpNat::flush(&engine);
            assert_eq!(received(&a), ["a4"]);
            // A lone datagram goes at once.
            assert!(send(1001, to_b, "b3"));
            assert_eq!(received(&b), ["b3"]);
            assert_eq!(engine.udp.borrow().stats().datagrams_out, 9);
        });
    }
}
