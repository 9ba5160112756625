//! ICMP echo NAT, the I/O shell around [`IcmpCore`]: the host ICMP sockets,
//! the tasks that read them, the one idle timer, and (Windows) the calls to
//! the system's ICMP API on tokio's blocking pool.
//!
//! How this works: a guest echo request goes to the core, which names the
//! flow's socket to send it on or asks for a new one; the shell opens it (a
//! ping socket, or a raw one where those are not permitted), starts a task
//! reading it, and sends with one `send` straight to the kernel. Each read
//! is shown to the core, which returns the reply packet for the guest. A
//! flow the core ends (evicted, idle, failed) loses its socket and task
//! here. One timer task sleeps until the core's next idle deadline; it ends
//! when there are no flows. On Windows the core asks for an API call
//! instead, made on a blocking thread, whose outcome goes back to the core.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Instant;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::FastMap;
use crate::nat::icmp::{FlowId, IcmpCore, IcmpNatStats, Mode, Request};
use crate::shell::Engine;
use crate::shell::udp::{Drained, Flow, drain_socket, watch_replies};

#[derive(Default)]
pub struct IcmpNat {
    core: IcmpCore,
    flows: FastMap<FlowId, Flow>,
    /// The idle timer's task, while there are flows.
    timer: Option<JoinHandle<()>>,
    scratch: Vec<u8>,
}

impl IcmpNat {
    pub fn new() -> Self {
        Self::default()
    }

    /// Echo flows (sockets), or on Windows requests waiting for the API.
    pub fn len(&self) -> usize {
        self.core.len()
    }

    pub fn is_empty(&self) -> bool {
        self.core.is_empty()
    }

    pub fn stats(&self) -> IcmpNatStats {
        self.core.stats()
    }

    /// The socket kind in use, once a ping has gone out.
    pub fn mode(&self) -> Option<Mode> {
        self.core.mode()
    }

    /// Handles an ICMP (or ICMPv6) packet from a guest, from `src` to `dst`
    /// (a non-gateway address). False when the host has no socket for it
    /// (no route to the destination, say): the caller may tell the guest.
    pub fn handle(engine: &Rc<Engine>, (src, dst): (IpAddr, IpAddr), packet: &[u8], now: Instant) -> bool {
        let mut guard = engine.icmp.borrow_mut();
        let nat = &mut *guard;
        let (id, icmp) = match nat.core.guest_packet(now, &engine.nat, (src, dst), packet, cfg!(windows)) {
            Request::Drop => return true,
            Request::Send { id, icmp } => (id, icmp),
            Request::Open { id, target, known, icmp } => {
                let key = (src, dst, parse_ident(&icmp));
                match open_icmp(target, known) {
                    Ok((socket, mode)) => {
                        let socket = Rc::new(socket);
                        let task = tokio::task::spawn_local(reply_task(engine.clone(), id, socket.clone()));
                        // Flows that had to make room end here (dropping
                        // aborts their tasks).
                        for old in nat.core.opened(now, key, id, mode) {
                            nat.flows.remove(&old);
                        }
                        nat.flows.insert(id, Flow { socket, task: Some(task), segment: false });
                        if nat.timer.as_ref().is_none_or(JoinHandle::is_finished) {
                            nat.timer = Some(tokio::task::spawn_local(idle_timer(engine.clone())));
                        }
                        (id, icmp)
                    }
                    Err(e) => {
                        nat.core.open_failed(now, key, target, &e);
                        return false;
                    }
                }
            }
            Request::Api { target, data, echo } => {
                drop(guard);
                through_api(engine, target, data, echo);
                return true;
            }
        };
        let Some(flow) = nat.flows.get(&id) else { return true };
        // Straight to the kernel (tokio's `try_send` waits for the reactor
        // to see a new socket writable first).
        let result = socket2::SockRef::from(&*flow.socket).send(&icmp).map(drop);
        nat.core.sent(now, id, result);
        true
    }
}

/// The identifier of an ICMP echo message the core built.
fn parse_ident(icmp: &[u8]) -> u16 {
    icmp.get(4..6).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
}

/// Windows: the request goes to `IcmpSendEcho2` on a worker thread; its
/// outcome goes back to the core, and a reply on to the guest.
#[cfg(windows)]
fn through_api(engine: &Rc<Engine>, target: std::net::Ipv4Addr, data: Vec<u8>, echo: crate::nat::icmp::ApiEcho) {
    use crate::nat::icmp::{ApiOutcome, ECHO_TIMEOUT};
    use crate::sys::EchoOutcome;
    let engine = engine.clone();
    tokio::task::spawn_local(async move {
        let outcome = tokio::task::spawn_blocking(move || crate::sys::icmp_echo(target, &data, ECHO_TIMEOUT)).await;
        let outcome = match outcome {
            Ok(Ok(EchoOutcome::Reply { data, .. })) => ApiOutcome::Reply(data),
            Ok(Ok(EchoOutcome::NoReply(status))) => ApiOutcome::NoReply(status),
            Ok(Err(e)) => ApiOutcome::Failed(e),
            Err(e) => ApiOutcome::Failed(io::Error::other(e)),
        };
        let reply = engine.icmp.borrow_mut().core.api_done(Instant::now(), echo, outcome);
        if let Some(packet) = reply {
            engine.send_ipv4_to_guest(&packet);
        }
    });
}

#[cfg(not(windows))]
fn through_api(_: &Rc<Engine>, _: std::net::Ipv4Addr, _: Vec<u8>, _: crate::nat::icmp::ApiEcho) {}

/// Sleeps until the core's next idle deadline and closes what expired;
/// ends when no flow is left.
async fn idle_timer(engine: Rc<Engine>) {
    loop {
        let Some(at) = engine.icmp.borrow().core.next_deadline() else {
            engine.icmp.borrow_mut().timer = None;
            return;
        };
        tokio::time::sleep_until(at.into()).await;
        let mut nat = engine.icmp.borrow_mut();
        for id in nat.core.expire(Instant::now()) {
            nat.flows.remove(&id);
        }
    }
}

/// Reads one flow's socket and hands what arrives to the core and the
/// replies on to the guest, until the socket fails for good (or the flow
/// ends and this task is aborted). A raw socket sees every echo reply to
/// this host: the loop yields when they flood in.
async fn reply_task(engine: Rc<Engine>, id: FlowId, socket: Rc<UdpSocket>) {
    watch_replies(&socket, || drain(&engine, id, &socket), |_| {}).await;
    let mut nat = engine.icmp.borrow_mut();
    if nat.core.host_failed(id)
        && let Some(mut flow) = nat.flows.remove(&id)
    {
        // This task ends by itself; aborting it from inside is pointless.
        flow.task = None;
    }
}

/// Reads what waits on a flow's socket, at most
/// [`DRAIN_BUDGET`](crate::shell::udp::DRAIN_BUDGET) messages.
fn drain(engine: &Rc<Engine>, id: FlowId, socket: &UdpSocket) -> Drained {
    let mut buf = std::mem::take(&mut engine.icmp.borrow_mut().scratch);
    buf.resize(65536, 0);
    let drained = drain_socket(
        socket,
        &mut buf,
        |message| {
            let reply = engine.icmp.borrow_mut().core.host_datagram(Instant::now(), id, message);
            if let Some(packet) = reply {
                engine.send_ip_to_guest(&packet);
            }
        },
        // Reading consumes an error (an ICMP error for our request: the
        // guest's ping times out, as it would); only a socket that keeps
        // failing is given up.
        |e| {
            tracing::debug!(flow = id, error = %e, "ping error");
            true
        },
    );
    engine.icmp.borrow_mut().scratch = buf;
    drained
}

/// Opens an ICMP socket connected to `target`: a ping socket, or where
/// those are not permitted a raw one. `known`: the kind that worked before.
fn open_icmp(target: IpAddr, known: Option<Mode>) -> io::Result<(UdpSocket, Mode)> {
    let (domain, protocol) = match target {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let (socket, mode) = match known {
        Some(Mode::Raw) => (Socket::new(domain, Type::RAW, Some(protocol))?, Mode::Raw),
        _ => match Socket::new(domain, Type::DGRAM, Some(protocol)) {
            Ok(s) => (s, Mode::Ping),
            // Not permitted (any more): raw sockets, if we are root.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                (Socket::new(domain, Type::RAW, Some(protocol))?, Mode::Raw)
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
