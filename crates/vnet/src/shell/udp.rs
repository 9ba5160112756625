//! UDP NAT, the I/O shell around [`UdpCore`]: the host sockets, the tasks
//! that read them, and the one idle timer.
//!
//! How this works: a guest datagram goes to the core, which names the flow
//! to send it on or asks for a new one; the shell opens a non-blocking UDP
//! socket bound to the wildcard address and connected to the target (so the
//! kernel delivers only that peer's replies to it), starts a task reading
//! it, and sends with one `send` straight to the kernel. Each read is shown
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
}

impl UdpNat {
    /// `link_mtu`: the IP MTU of the guest links.
    pub fn new(max_flows: usize, idle: Duration, link_mtu: usize) -> Self {
        UdpNat {
            core: UdpCore::new(max_flows, idle, link_mtu),
            flows: FastMap::default(),
            timer: None,
            scratch: Vec::new(),
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
        let mut guard = engine.udp.borrow_mut();
        let nat = &mut *guard;
        let id = match nat.core.route_guest(now, &engine.nat, src, dst) {
            Route::Refused => return true,
            Route::Flow(id) => id,
            Route::Open { id, target } => match connect_udp(target) {
                Ok(socket) => {
                    let socket = Rc::new(socket);
                    let task = tokio::task::spawn_local(reply_task(engine.clone(), id, socket.clone()));
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
        // Straight to the kernel: tokio's `try_send` would refuse until the
        // reactor has seen the new socket writable, losing first datagrams.
        let result = socket2::SockRef::from(&*flow.socket).send(payload).map(drop);
        let unreachable = nat.core.sent(now, id, payload.len(), result);
        drop(guard);
        if let Some(packet) = unreachable {
            port_unreachable(engine, &packet);
        }
        true
    }

    /// Drops the sockets and tasks of flows the core ended.
    fn close(&mut self, ids: impl IntoIterator<Item = FlowId>) {
        for id in ids {
            self.flows.remove(&id);
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
}
