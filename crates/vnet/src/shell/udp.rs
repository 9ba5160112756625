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
//! call per batch, not one each, and datagrams of one size in it go as one
//! segmented message (`UDP_SEGMENT`: the host's stack handles them as one
//! packet until it cuts them apart, on loopback at the receiving socket; a
//! flow whose path refuses that sends one datagram per message from then
//! on). A lone datagram (request/response, DNS)
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
/// Receive buffer asked for each flow's host socket: the default (~90
/// full-size datagrams) overflows whenever this thread is busy for half a
/// millisecond while a host peer streams (2 Gbit/s host→guest lost 15–30 %
/// there, bench/RESULTS.md); memory is only taken while datagrams wait.
const REPLY_BUFFER: usize = 1024 * 1024;
/// A socket whose reads fail this many times in a row ends its flow.
pub(crate) const MAX_ERRORS_IN_A_ROW: u32 = 8;

/// A NAT flow's host socket and the task reading its replies; the task is
/// aborted when the flow is dropped. Shared with the ICMP NAT, whose ping
/// sockets are datagram sockets too.
pub(crate) struct Flow {
    pub(crate) socket: Rc<UdpSocket>,
    pub(crate) task: Option<JoinHandle<()>>,
    /// UDP: whether batches still go with segmentation offload (see
    /// [`send_batch`]); off once the host's stack refused it for this flow.
    pub(crate) segment: bool,
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
        let mut nat = engine.udp.borrow_mut();
        // Called at the end of every link read: most hold no UDP.
        if nat.outbox.is_empty() {
            return;
        }
        let mut unreachable = Vec::new();
        nat.send_outbox(Instant::now(), &mut unreachable);
        drop(nat);
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
                    nat.flows.insert(id, Flow { socket, task: Some(task), segment: true });
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
            let Some(flow) = self.flows.get_mut(&id) else { continue };
            results.clear();
            send_batch(&flow.socket, &payloads, &mut flow.segment, &mut results);
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

/// Most datagrams one segmented send carries (the kernel's
/// `UDP_MAX_SEGMENTS`, 64 before Linux 6.9 and 128 since).
#[cfg(target_os = "linux")]
const SEGMENTS_PER_SEND: usize = 64;
/// Most payload bytes one segmented send carries: an IPv4 datagram's
/// limit, which the kernel checks before it segments.
#[cfg(target_os = "linux")]
const BYTES_PER_SEND: usize = 65_507;

/// How `payloads` split into sends with UDP segmentation offload: runs of
/// datagrams of one size, the last of a run possibly shorter (what
/// `UDP_SEGMENT` cuts a buffer into), each as (first index, count).
#[cfg(target_os = "linux")]
fn segment_runs(payloads: &[&[u8]], runs: &mut Vec<(usize, usize)>) {
    let mut first = 0;
    while first < payloads.len() {
        let size = payloads[first].len();
        let (mut count, mut bytes) = (1, size);
        // An empty datagram has nothing to segment, so goes alone.
        if size > 0 {
            while let Some(next) = payloads.get(first + count)
                && count < SEGMENTS_PER_SEND
                && bytes + next.len() <= BYTES_PER_SEND
                && (1..=size).contains(&next.len())
            {
                count += 1;
                bytes += next.len();
                if next.len() < size {
                    break;
                }
            }
        }
        runs.push((first, count));
        first += count;
    }
}

/// Sends each of `payloads` on `socket` (connected), pushing one result per
/// payload to `results`, in order. With `segment` each run of same-sized
/// datagrams is one message the kernel cuts up (`UDP_SEGMENT`), so it goes
/// through the host's stack once; a socket or route that cannot do that (no
/// checksum offload on the way out, a path MTU below the datagrams) turns
/// `segment` off and the datagrams go one per message. A failed send is
/// its first datagram's error, as if each had gone alone (the kernel
/// reports one error per send: a refusal the host got earlier, a full
/// buffer), and the ones after it are tried again.
#[cfg(target_os = "linux")]
fn send_batch(socket: &UdpSocket, payloads: &[&[u8]], segment: &mut bool, results: &mut Vec<io::Result<()>>) {
    let mut start = 0;
    while start < payloads.len() {
        let Err(failed) = send_messages(socket, &payloads[start..], *segment, results) else { return };
        start += failed.first;
        if failed.datagrams > 1 && cannot_segment(&failed.error) {
            *segment = false;
            continue;
        }
        results.push(Err(failed.error));
        start += 1;
    }
}

/// A message `sendmmsg` did not take: where its datagrams start in the
/// payloads given, how many it held, and why.
#[cfg(target_os = "linux")]
struct FailedSend {
    first: usize,
    datagrams: usize,
    error: io::Error,
}

/// One pass of [`send_batch`]: `sendmmsg` until every message went (one
/// `Ok` per datagram pushed) or one failed (the `Ok`s of those before it
/// pushed, none for it or after).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn send_messages(
    socket: &UdpSocket,
    payloads: &[&[u8]],
    segment: bool,
    results: &mut Vec<io::Result<()>>,
) -> Result<(), FailedSend> {
    use std::os::fd::AsRawFd;
    /// One control message holding a `u16`, 8-byte aligned as `cmsghdr` wants.
    type Control = [u64; 3];
    // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
    let (space, len) = unsafe { (libc::CMSG_SPACE(2) as usize, libc::CMSG_LEN(2) as usize) };
    debug_assert!(space <= std::mem::size_of::<Control>());

    let mut runs = Vec::new();
    if segment {
        segment_runs(payloads, &mut runs);
    } else {
        runs.extend((0..payloads.len()).map(|i| (i, 1)));
    }
    let mut iovecs: Vec<libc::iovec> =
        payloads.iter().map(|p| libc::iovec { iov_base: p.as_ptr().cast_mut().cast(), iov_len: p.len() }).collect();
    // One pointer for all messages: each takes its run of iovecs from it.
    let iovec_base = iovecs.as_mut_ptr();
    let mut controls: Vec<Control> = vec![[0; 3]; runs.iter().filter(|(_, count)| *count > 1).count()];
    let mut messages: Vec<libc::mmsghdr> = Vec::with_capacity(runs.len());
    let mut next_control = controls.iter_mut();
    for &(first, count) in &runs {
        // SAFETY: an all-zero mmsghdr is a valid value (no name, no
        // control data, null pointers with zero lengths).
        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
        // SAFETY: the run's iovecs lie within the vector (`first + count <=
        // payloads.len()`), which outlives the messages.
        m.msg_hdr.msg_iov = unsafe { iovec_base.add(first) };
        m.msg_hdr.msg_iovlen = count as _;
        if count > 1
            && let Some(control) = next_control.next()
        {
            m.msg_hdr.msg_control = control.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = space as _;
            // SAFETY: the control buffer is `space` bytes, aligned, and
            // holds exactly one header with a u16 after it.
            unsafe {
                let header = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                (*header).cmsg_level = libc::SOL_UDP;
                (*header).cmsg_type = libc::UDP_SEGMENT;
                (*header).cmsg_len = len as _;
                let size = u16::try_from(payloads[first].len()).unwrap_or(u16::MAX);
                std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<u16>(), size);
            }
        }
        messages.push(m);
    }
    let mut done = 0;
    while done < messages.len() {
        let rest = &mut messages[done..];
        let count = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        // SAFETY: `rest` holds `count` initialised headers whose iovecs
        // point at payloads borrowed for this whole call and whose control
        // buffers live in `controls` until it returns; the kernel only reads
        // them (and writes each header's msg_len).
        let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), rest.as_mut_ptr(), count, 0) };
        let error = match usize::try_from(n) {
            // Not what the kernel does for a non-empty batch; never loop on it.
            Ok(0) => io::ErrorKind::WriteZero.into(),
            Ok(n) => {
                let sent: usize = runs[done..done + n].iter().map(|&(_, datagrams)| datagrams).sum();
                results.extend((0..sent).map(|_| Ok(())));
                done += n;
                continue;
            }
            Err(_) => io::Error::last_os_error(),
        };
        if error.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        let (first, datagrams) = runs[done];
        return Err(FailedSend { first, datagrams, error });
    }
    Ok(())
}

/// Errors a segmented send gets where one datagram per send would work.
#[cfg(target_os = "linux")]
fn cannot_segment(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EIO | libc::EMSGSIZE | libc::EOPNOTSUPP | libc::ENOPROTOOPT))
}

#[cfg(not(target_os = "linux"))]
fn send_batch(socket: &UdpSocket, payloads: &[&[u8]], _segment: &mut bool, results: &mut Vec<io::Result<()>>) {
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
    // Best effort: the system's limit may cap it, and a flow works without.
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(REPLY_BUFFER);
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
                receive_all(s).into_iter().map(|d| String::from_utf8_lossy(&d).into_owned()).collect::<Vec<_>>()
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

    /// A flow's host socket holds more than the system's default buffer,
    /// as far as the system's limit lets it.
    #[cfg(target_os = "linux")]
    #[test]
    fn flow_sockets_get_a_larger_receive_buffer() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let read = |name| {
                std::fs::read_to_string(format!("/proc/sys/net/core/{name}")).unwrap().trim().parse::<usize>().unwrap()
            };
            let socket = connect_udp("127.0.0.1:9".parse().unwrap()).unwrap();
            let got = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
            // The kernel doubles what it is given (for its own overhead).
            assert_eq!(got, 2 * REPLY_BUFFER.min(read("rmem_max")), "default {}", read("rmem_default"));
        });
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn segment_runs_are_what_udp_segment_cuts_a_buffer_into() {
        let sizes = |payloads: &[Vec<u8>]| {
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let mut runs = Vec::new();
            segment_runs(&slices, &mut runs);
            runs
        };
        let of = |lens: &[usize]| lens.iter().map(|&n| vec![0u8; n]).collect::<Vec<_>>();
        // Same sizes, a shorter one ends a run; a longer one starts the next.
        assert_eq!(sizes(&of(&[100, 100, 100, 40, 100, 200, 200])), [(0, 4), (4, 1), (5, 2)]);
        // Empty datagrams go alone, and end nothing else's run early.
        assert_eq!(sizes(&of(&[0, 0, 10, 10, 0])), [(0, 1), (1, 1), (2, 2), (4, 1)]);
        // At most 64 datagrams and 65 507 bytes a send.
        let runs = sizes(&of(&[10; 130]));
        assert_eq!(runs, [(0, 64), (64, 64), (128, 2)]);
        let runs = sizes(&of(&[30_000, 30_000, 30_000, 5_000]));
        assert_eq!(runs, [(0, 2), (2, 2)]);
        assert_eq!(sizes(&of(&[65_507, 65_507])), [(0, 1), (1, 1)]);
        assert!(sizes(&[]).is_empty());
    }

    /// Payloads of the lengths given, each filled with its own index.
    #[cfg(target_os = "linux")]
    fn numbered(lens: &[usize]) -> Vec<Vec<u8>> {
        lens.iter().enumerate().map(|(i, &n)| vec![i as u8; n]).collect()
    }

    /// Every datagram waiting on `s` (non-blocking), in order.
    #[cfg(target_os = "linux")]
    fn receive_all(s: &std::net::UdpSocket) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = s.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    /// A batch of same-sized datagrams leaves as one segmented send, and
    /// the receiver still gets each datagram as it was, in order.
    #[cfg(target_os = "linux")]
    #[test]
    fn segmented_batches_arrive_as_the_datagrams_they_were() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let lens = [1400, 1400, 1400, 700, 0, 9000, 9000, 3, 1400];
            let payloads = numbered(&lens);
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            // IPv6 where the machine has ::1 (some containers do not).
            for local in ["127.0.0.1:0", "[::1]:0"] {
                let Ok(plain) = std::net::UdpSocket::bind(local) else {
                    assert!(local.starts_with('['), "no {local}");
                    continue;
                };
                plain.set_nonblocking(true).unwrap();
                // A receiver that takes segmented sends whole (UDP_GRO) shows
                // the kernel got one send for several datagrams.
                let whole = std::net::UdpSocket::bind(local).unwrap();
                whole.set_nonblocking(true).unwrap();
                set_udp_gro(&whole);
                for (receiver, expect_whole) in [(&plain, false), (&whole, true)] {
                    let sender = connect_udp(receiver.local_addr().unwrap()).unwrap();
                    let (mut segment, mut results) = (true, Vec::new());
                    send_batch(&sender, &slices, &mut segment, &mut results);
                    assert!(segment && results.len() == lens.len() && results.iter().all(Result::is_ok), "{results:?}");
                    let got = receive_all(receiver);
                    if expect_whole {
                        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [4900, 0, 18003, 1400], "{local}");
                        assert_eq!(got.concat(), payloads.concat());
                    } else {
                        assert_eq!(got, payloads, "{local}");
                    }
                }
            }
        });
    }

    /// A refusal the host reported (ICMP port unreachable for an earlier
    /// send) is one datagram's error, as when each datagram goes alone, and
    /// the datagrams after it still go.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_refusal_is_one_datagrams_error_in_a_segmented_batch() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = closed.local_addr().unwrap();
            drop(closed);
            let sender = connect_udp(to).unwrap();
            let payloads = numbered(&[500; 5]);
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let (mut segment, mut results) = (true, Vec::new());
            // Loopback answers with the ICMP error within this send.
            send_batch(&sender, &slices, &mut segment, &mut results);
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            results.clear();
            send_batch(&sender, &slices, &mut segment, &mut results);
            let kinds: Vec<_> = results.iter().map(|r| r.as_ref().map_err(io::Error::kind)).collect();
            assert_eq!(kinds, [Err(io::ErrorKind::ConnectionRefused), Ok(&()), Ok(&()), Ok(&()), Ok(&())]);
            assert!(segment);
        });
    }

    /// Where the path cannot take segmented sends (here a loopback MTU
    /// below the datagrams' size, in a network namespace of this test's
    /// own thread), the datagrams go one by one and the flow stops trying.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_path_that_refuses_segmented_sends_gets_the_datagrams_one_by_one() {
        if !is_root() {
            eprintln!("skipped: needs root for a network namespace");
            return;
        }
        std::thread::spawn(|| {
            loopback_in_own_namespace(1500);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                receiver.set_nonblocking(true).unwrap();
                let sender = connect_udp(receiver.local_addr().unwrap()).unwrap();
                // 1600-byte segments do not fit a 1500-byte MTU; whole
                // datagrams of that size still go (fragmented).
                let payloads = numbered(&[1600, 1600, 1600, 1000, 1000]);
                let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
                let (mut segment, mut results) = (true, Vec::new());
                send_batch(&sender, &slices, &mut segment, &mut results);
                assert!(results.len() == 5 && results.iter().all(Result::is_ok), "{results:?}");
                assert!(!segment, "the flow should have stopped segmenting");
                assert_eq!(receive_all(&receiver), payloads);
                // Later batches go one by one from the start.
                results.clear();
                send_batch(&sender, &slices, &mut segment, &mut results);
                assert!(results.iter().all(Result::is_ok) && results.len() == 5);
                assert_eq!(receive_all(&receiver), payloads);
            });
        })
        .join()
        .unwrap();
    }

    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn set_udp_gro(socket: &std::net::UdpSocket) {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: an int option read from a local that outlives the call.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_GRO,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
    }

    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Moves this thread into a new network namespace and brings its
    /// loopback up with `mtu`.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn loopback_in_own_namespace(mtu: i32) {
        // SAFETY: plain system calls on a socket this function owns, with an
        // ifreq that names "lo" and lives across each call.
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_NEWNET), 0, "{}", io::Error::last_os_error());
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(fd >= 0);
            let mut req: libc::ifreq = std::mem::zeroed();
            for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
                *dst = *src as libc::c_char;
            }
            req.ifr_ifru.ifru_mtu = mtu;
            assert_eq!(libc::ioctl(fd, libc::SIOCSIFMTU, &req), 0, "{}", io::Error::last_os_error());
            req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &req), 0, "{}", io::Error::last_os_error());
            libc::close(fd);
        }
    }
}
