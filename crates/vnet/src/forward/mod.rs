//! Port forwards from the host into the guest (gvproxy's `PortsForwarder`).
//!
//! How this works.
//!
//! *The table.* A forward ("proxy", as gvproxy calls it) is keyed by its
//! protocol and its `local` string exactly as given; a second expose of the
//! same pair is refused with gvproxy's `proxy already running`, and `/all`
//! lists the table sorted by local address, then protocol. At most
//! [`MAX_FORWARDS`] exist at once. A forward is only entered in the table
//! once its host socket is bound, so a failed expose leaves nothing behind.
//!
//! *TCP and unix.* A forward owns a host listener (TCP on `local`, or a unix
//! socket at the path `local`, replacing a stale socket file). Each accepted
//! connection becomes one TCP connection from the gateway (its address of
//! `remote`'s family) into the guest at `remote`, opened by the user-space
//! stack as a client
//! ([`crate::shell::tcp::connect_to_guest`]): a refusal, or no answer within 10 s, closes
//! the host connection; otherwise data flows both ways with half-close and
//! the NAT's back-pressure (no reading from one side while the other's
//! buffer is full). The listener sits in a `RefCell<Option<…>>` polled by
//! the accept task, so unexposing closes the socket at once (the port
//! refuses from then on) while connections already open carry on.
//!
//! *UDP.* A forward binds `local`; every host client address gets its own
//! flow, keyed by that address, with its own source port on the gateway
//! (from [`UDP_PORTS`], unique across all forwards). Datagrams from the
//! client go to `remote` from `gateway:port` (the gateway's IPv6 address
//! for an IPv6 `remote`; with no IPv6 on the network they are dropped); a
//! datagram from the guest to `gateway:port`, either family, is looked up
//! by that port (the engine routes gateway UDP other than DNS here) and, if
//! it comes from `remote`, sent back to the client from the forward's
//! socket. A flow idle for [`UDP_IDLE`] (90 s) is reaped by a sweep every
//! few seconds; each forward holds at most [`MAX_UDP_FLOWS_PER_FORWARD`]
//! flows and evicts the least recently used. Those decisions (ports, flows,
//! whose reply is whose) live in [`udp::UdpForwards`], which does no I/O;
//! this module owns the sockets and tasks around it. If the guest's MAC is
//! not known yet the datagram is retried a few times within about 1.5 s
//! (at most [`MAX_PENDING_RETRIES`] such datagrams wait at once): for IPv4
//! the gateway asks by ARP meanwhile; for IPv6 it learns the MAC only from
//! the guest's own traffic from that address.
//!
//! *Guest addresses* are gvproxy's `IPv4:port`, or `[IPv6]:port` as Go
//! writes an IPv6 host and port (gvproxy itself takes IPv4 only).
//!
//! *Errors* carry gvproxy's texts (`proxy not found`, `invalid remote addr`,
//! `listen tcp 127.0.0.1:80: bind: address already in use`, …), since the
//! API returns them verbatim.

#[cfg(all(test, unix))]
mod shell_tests;
pub mod spec;
pub mod udp;

pub use spec::{Protocol, StaticForward};

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
#[cfg(unix)]
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use serde::Serialize;
use smoltcp::wire::EthernetAddress;
use tokio::io::ReadBuf;
use tokio::task::JoinHandle;

use crate::shell::Engine;
use udp::{CloseReason, ForwardId, FromGuest, Refused, UdpForwards};

/// A UDP flow with no datagram either way for this long is forgotten.
pub const UDP_IDLE: Duration = Duration::from_secs(90);
/// Host clients one UDP forward serves at once (least recently used evicted).
pub const MAX_UDP_FLOWS_PER_FORWARD: usize = 1024;
/// Forwards that may exist at once.
pub const MAX_FORWARDS: usize = 1024;
/// Gateway source ports for UDP forward flows.
pub const UDP_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
/// Datagrams waiting for the guest's MAC at once.
pub const MAX_PENDING_RETRIES: usize = 64;
/// How often idle UDP flows are looked for.
const UDP_SWEEP: Duration = Duration::from_secs(5);

/// One forward as `/services/forwarder/all` shows it (field order matters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyInfo {
    pub local: String,
    pub remote: String,
    pub protocol: String,
}

/// Counters for `/stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ForwardStats {
    pub exposed: u64,
    pub unexposed: u64,
    pub expose_errors: u64,
    /// Host connections accepted by TCP and unix forwards.
    pub connections: u64,
    /// Accepted connections that could not be opened towards the guest.
    pub connection_errors: u64,
    pub udp_flows_opened: u64,
    pub udp_flows_expired: u64,
    pub udp_flows_evicted: u64,
    /// Datagrams from host clients into the guest.
    pub udp_datagrams_in: u64,
    /// Datagrams from the guest back to host clients.
    pub udp_datagrams_out: u64,
    /// Datagrams dropped: unknown guest MAC after retries, full queues,
    /// host send errors, guest replies from the wrong address, no free
    /// gateway port, an IPv6 guest on a network without IPv6.
    pub udp_dropped: u64,
}

/// The forwards of one engine.
pub struct Forwarder {
    /// Keyed (local, protocol): iteration order is `/all`'s order.
    proxies: RefCell<BTreeMap<(String, String), Proxy>>,
    /// The UDP forwards' flows; each forward is found again by a weak
    /// reference, so a reply racing an unexpose finds nothing.
    udp: RefCell<UdpForwards<Weak<UdpForward>>>,
    pending_retries: Cell<usize>,
    /// Everything but the UDP flow counts, which `udp` keeps.
    stats: Cell<ForwardStats>,
}

impl Default for Forwarder {
    fn default() -> Self {
        Forwarder {
            proxies: RefCell::default(),
            udp: RefCell::new(UdpForwards::new(UDP_PORTS, MAX_UDP_FLOWS_PER_FORWARD, UDP_IDLE)),
            pending_retries: Cell::new(0),
            stats: Cell::default(),
        }
    }
}

struct Proxy {
    info: ProxyInfo,
    kind: ProxyKind,
}

enum ProxyKind {
    Stream(Rc<StreamForward>),
    Udp(Rc<UdpForward>),
}

enum StreamListener {
    Tcp(tokio::net::TcpListener),
    #[cfg(unix)]
    Unix(tokio::net::UnixListener, PathBuf),
}

struct StreamForward {
    listener: RefCell<Option<StreamListener>>,
    task: RefCell<Option<JoinHandle<()>>>,
}

struct UdpForward {
    /// Its flows' entry in [`Forwarder::udp`].
    id: ForwardId,
    remote: SocketAddr,
    socket: RefCell<Option<tokio::net::UdpSocket>>,
    task: RefCell<Option<JoinHandle<()>>>,
}

impl Forwarder {
    fn count(&self, f: impl FnOnce(&mut ForwardStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    pub fn stats(&self) -> ForwardStats {
        let flows = self.udp.borrow().counts();
        ForwardStats {
            udp_flows_opened: flows.opened,
            udp_flows_expired: flows.expired,
            udp_flows_evicted: flows.evicted,
            ..self.stats.get()
        }
    }

    /// Number of forwards.
    pub fn len(&self) -> usize {
        self.proxies.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.proxies.borrow().is_empty()
    }

    /// Open UDP forward flows.
    pub fn udp_flows(&self) -> usize {
        self.udp.borrow().flows()
    }

    /// Every forward, sorted by local address then protocol.
    pub fn list(&self) -> Vec<ProxyInfo> {
        self.proxies.borrow().values().map(|p| p.info.clone()).collect()
    }

    /// Ends every forward (at shutdown: removes unix socket files).
    pub fn close_all(&self) {
        let all = std::mem::take(&mut *self.proxies.borrow_mut());
        for (_, proxy) in all {
            self.close(proxy);
        }
    }

    /// Removes the forward of `protocol` on `local` (gvproxy's `Unexpose`).
    /// Logs go through `engine`'s limiter: the inside API lets any guest
    /// process call this.
    pub fn unexpose(&self, engine: &Engine, protocol: &str, local: &str) -> Result<(), String> {
        let proxy = self.proxies.borrow_mut().remove(&(local.to_string(), protocol.to_string()));
        let Some(proxy) = proxy else { return Err("proxy not found".to_string()) };
        crate::limited!(info, engine.logs.borrow_mut(), std::time::Instant::now(), "forward-change",
            protocol, local, remote = %proxy.info.remote, "forward removed");
        self.close(proxy);
        self.count(|s| s.unexposed += 1);
        Ok(())
    }

    fn close(&self, proxy: Proxy) {
        match proxy.kind {
            ProxyKind::Stream(f) => {
                // Dropping the listener closes the socket now, not whenever
                // the aborted task is next dropped.
                let listener = f.listener.borrow_mut().take();
                match listener {
                    #[cfg(unix)]
                    Some(StreamListener::Unix(l, path)) => {
                        drop(l);
                        let _ = std::fs::remove_file(path);
                    }
                    other => drop(other),
                }
                if let Some(t) = f.task.borrow_mut().take() {
                    t.abort();
                }
            }
            ProxyKind::Udp(f) => {
                f.socket.borrow_mut().take();
                if let Some(t) = f.task.borrow_mut().take() {
                    t.abort();
                }
                self.udp.borrow_mut().remove(f.id);
            }
        }
    }

    /// Adds a forward (gvproxy's `Expose`): `protocol` is `tcp`, `udp` or
    /// `unix`; for tcp and udp `remote` is `IPv4:port` or `[IPv6]:port` in
    /// the guest, for unix `tcp://` and the same. The error is the text the
    /// API answers with.
    pub fn expose(&self, engine: &Rc<Engine>, protocol: &str, local: &str, remote: &str) -> Result<(), String> {
        let result = self.try_expose(engine, protocol, local, remote);
        match &result {
            Ok(()) => {
                self.count(|s| s.exposed += 1);
                crate::limited!(
                    info,
                    engine.logs.borrow_mut(),
                    std::time::Instant::now(),
                    "forward-change",
                    protocol,
                    local,
                    remote,
                    "forward added"
                );
            }
            Err(e) => {
                self.count(|s| s.expose_errors += 1);
                crate::limited!(info, engine.logs.borrow_mut(), std::time::Instant::now(), "forward-change",
                    protocol, local, remote, error = %e, "forward refused");
            }
        }
        result
    }

    fn try_expose(&self, engine: &Rc<Engine>, protocol: &str, local: &str, remote: &str) -> Result<(), String> {
        let key = (local.to_string(), protocol.to_string());
        if self.proxies.borrow().contains_key(&key) {
            return Err("proxy already running".to_string());
        }
        if self.proxies.borrow().len() >= MAX_FORWARDS {
            return Err(format!("too many forwards (at most {MAX_FORWARDS})"));
        }
        let kind = match protocol {
            "tcp" => {
                let target = tcpip_address(remote)?;
                let listener = listen_tcp(local)?;
                self.start_stream(engine, StreamListener::Tcp(listener), target)
            }
            "udp" => {
                let target = tcpip_address(remote)?;
                let socket = listen_udp(local)?;
                self.start_udp(engine, socket, target)
            }
            #[cfg(unix)]
            "unix" => {
                let target = unix_remote(remote)?;
                let path = PathBuf::from(local);
                let listener = listen_unix(&path)?;
                self.start_stream(engine, StreamListener::Unix(listener, path), target)
            }
            other => return Err(format!("unknown protocol {other}")),
        };
        let info = ProxyInfo { local: local.to_string(), remote: remote.to_string(), protocol: protocol.to_string() };
        self.proxies.borrow_mut().insert(key, Proxy { info, kind });
        Ok(())
    }

    fn start_stream(&self, engine: &Rc<Engine>, listener: StreamListener, target: SocketAddr) -> ProxyKind {
        let fwd = Rc::new(StreamForward { listener: RefCell::new(Some(listener)), task: RefCell::new(None) });
        let task = tokio::task::spawn_local(accept_loop(engine.clone(), fwd.clone(), target));
        *fwd.task.borrow_mut() = Some(task);
        ProxyKind::Stream(fwd)
    }

    fn start_udp(&self, engine: &Rc<Engine>, socket: tokio::net::UdpSocket, target: SocketAddr) -> ProxyKind {
        let fwd = Rc::new_cyclic(|weak| UdpForward {
            id: self.udp.borrow_mut().add(target, weak.clone()),
            remote: target,
            socket: RefCell::new(Some(socket)),
            task: RefCell::new(None),
        });
        let task = tokio::task::spawn_local(udp_loop(engine.clone(), fwd.clone()));
        *fwd.task.borrow_mut() = Some(task);
        ProxyKind::Udp(fwd)
    }
}

/// A UDP datagram from the guest to the gateway (either family) on a port
/// that is not a gateway service: the reply of a UDP forward flow, if one
/// uses `dst`'s port. Returns false when no flow does (the caller counts a
/// drop).
pub fn udp_from_guest(engine: &Rc<Engine>, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> bool {
    let fw = &engine.forwarder;
    let reply = fw.udp.borrow_mut().from_guest(dst.port(), src, Instant::now());
    let (fwd, client) = match reply {
        FromGuest::NoFlow => return false,
        FromGuest::WrongSource => {
            fw.count(|s| s.udp_dropped += 1);
            return true;
        }
        FromGuest::ToClient { handle, client } => (handle.upgrade(), client),
    };
    // Straight to the kernel, as the NAT does: a UDP send never blocks for
    // long, and a full buffer drops the datagram as a wire would.
    let sent = fwd.is_some_and(|f| match f.socket.borrow().as_ref() {
        Some(s) => socket2::SockRef::from(s).send_to(payload, &client.into()).is_ok(),
        None => false,
    });
    fw.count(|s| if sent { s.udp_datagrams_out += 1 } else { s.udp_dropped += 1 });
    true
}

async fn accept_loop(engine: Rc<Engine>, fwd: Rc<StreamForward>, target: SocketAddr) {
    loop {
        let accepted = poll_fn(|cx| {
            let guard = fwd.listener.borrow();
            match guard.as_ref() {
                None => Poll::Ready(None),
                Some(StreamListener::Tcp(l)) => l.poll_accept(cx).map(|r| {
                    Some(r.map(|(s, _)| {
                        let _ = s.set_nodelay(true);
                        Stream::Tcp(s)
                    }))
                }),
                #[cfg(unix)]
                Some(StreamListener::Unix(l, _)) => l.poll_accept(cx).map(|r| Some(r.map(|(s, _)| Stream::Unix(s)))),
            }
        })
        .await;
        let result = match accepted {
            None => return,
            Some(Ok(Stream::Tcp(s))) => crate::shell::tcp::connect_to_guest(&engine, target, s),
            #[cfg(unix)]
            Some(Ok(Stream::Unix(s))) => crate::shell::tcp::connect_to_guest(&engine, target, s),
            Some(Err(e)) => {
                crate::limited_warn!(engine.logs.borrow_mut(), Instant::now(), "forward-accept",
                    error = %e, "port forward: accept failed");
                // Out of descriptors, say: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        engine.forwarder.count(|s| s.connections += 1);
        if let Err(e) = result {
            engine.forwarder.count(|s| s.connection_errors += 1);
            crate::limited_warn!(engine.logs.borrow_mut(), Instant::now(), "forward-connect",
                guest = %target, error = %e, "port forward: cannot open a connection into the guest");
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

enum UdpEvent {
    Datagram(usize, SocketAddr),
    Sweep,
    Error(io::Error),
    Closed,
}

async fn udp_loop(engine: Rc<Engine>, fwd: Rc<UdpForward>) {
    let mut buf = vec![0u8; 65536];
    let mut sweep = tokio::time::interval(UDP_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut errors_in_a_row = 0u32;
    loop {
        let event = poll_fn(|cx| {
            if sweep.poll_tick(cx).is_ready() {
                return Poll::Ready(UdpEvent::Sweep);
            }
            let guard = fwd.socket.borrow();
            let Some(socket) = guard.as_ref() else { return Poll::Ready(UdpEvent::Closed) };
            let mut rb = ReadBuf::new(&mut buf);
            match socket.poll_recv_from(cx, &mut rb) {
                Poll::Ready(Ok(from)) => Poll::Ready(UdpEvent::Datagram(rb.filled().len(), from)),
                Poll::Ready(Err(e)) => Poll::Ready(UdpEvent::Error(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match event {
            UdpEvent::Closed => return,
            UdpEvent::Sweep => {
                let gone = engine.forwarder.udp.borrow_mut().expire(fwd.id, Instant::now());
                for c in gone {
                    tracing::debug!(client = %c.client, port = c.port, "UDP forward flow expired");
                }
            }
            UdpEvent::Error(e) => {
                errors_in_a_row += 1;
                crate::limited_warn!(engine.logs.borrow_mut(), Instant::now(), "forward-udp-recv",
                    error = %e, "UDP port forward: receive failed");
                if errors_in_a_row > 8 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            UdpEvent::Datagram(n, client) => {
                errors_in_a_row = 0;
                udp_to_guest(&engine, &fwd, client, &buf[..n]);
            }
        }
    }
}

/// One datagram from host client `client` into the guest.
fn udp_to_guest(engine: &Rc<Engine>, fwd: &Rc<UdpForward>, client: SocketAddr, payload: &[u8]) {
    let fw = &engine.forwarder;
    let now = Instant::now();
    let (gateway, gateway6, gateway_mac) = {
        let net = engine.net.borrow();
        (net.cfg.gateway_ip, net.cfg.ipv6.as_ref().map(|v6| v6.gateway), net.cfg.gateway_mac)
    };
    // Before a flow is opened: one that cannot carry anything would only
    // hold a port.
    if fwd.remote.is_ipv6() && gateway6.is_none() {
        fw.count(|s| s.udp_dropped += 1);
        crate::limited_warn!(engine.logs.borrow_mut(), now, "forward-udp-no-ipv6", guest = %fwd.remote,
            "UDP port forward to an IPv6 guest address, but the network has no IPv6; dropping datagram");
        return;
    }
    let out = fw.udp.borrow_mut().to_guest(fwd.id, client, now);
    let out = match out {
        Ok(out) => out,
        Err(Refused::NoFreePort) => {
            fw.count(|s| s.udp_dropped += 1);
            crate::limited_warn!(engine.logs.borrow_mut(), now, "forward-udp-ports",
                %client, "UDP port forward: no free gateway port; dropping datagram");
            return;
        }
        Err(Refused::NoForward) => {
            fw.count(|s| s.udp_dropped += 1);
            return;
        }
    };
    for c in &out.closed {
        let expired = c.why == CloseReason::Expired;
        tracing::debug!(client = %c.client, port = c.port, expired, "UDP forward flow closed");
    }
    if out.opened {
        tracing::debug!(%client, port = out.port, guest = %out.target, "UDP forward flow opened");
    }
    let mut datagram = match (out.target, gateway6) {
        (SocketAddr::V4(target), _) => {
            let mut frame = Vec::with_capacity(rdnet_wire::frame::ETH_HEADER + 28 + payload.len());
            // The destination MAC is filled in by the send (from the neighbor table).
            rdnet_wire::frame::udp(
                &mut frame,
                gateway_mac,
                EthernetAddress([0; 6]),
                SocketAddrV4::new(gateway, out.port),
                target,
                payload,
            );
            ToGuestDatagram::Frame4(frame)
        }
        (SocketAddr::V6(target), Some(gateway6)) => ToGuestDatagram::Udp6 {
            src: SocketAddrV6::new(gateway6, out.port, 0, 0),
            dst: target,
            payload: payload.to_vec(),
        },
        (SocketAddr::V6(_), None) => {
            // Checked above; the configuration does not change.
            fw.count(|s| s.udp_dropped += 1);
            return;
        }
    };
    if datagram.send(engine) {
        fw.count(|s| s.udp_datagrams_in += 1);
        return;
    }
    // The guest's MAC is not known yet (for IPv4 the send asked by ARP).
    if fw.pending_retries.get() >= MAX_PENDING_RETRIES {
        fw.count(|s| s.udp_dropped += 1);
        return;
    }
    fw.pending_retries.set(fw.pending_retries.get() + 1);
    let engine = engine.clone();
    tokio::task::spawn_local(async move {
        let mut sent = false;
        for ms in [20, 100, 400, 1000] {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if datagram.send(&engine) {
                sent = true;
                break;
            }
        }
        let fw = &engine.forwarder;
        fw.pending_retries.set(fw.pending_retries.get().saturating_sub(1));
        fw.count(|s| if sent { s.udp_datagrams_in += 1 } else { s.udp_dropped += 1 });
    });
}

/// A forward's datagram into the guest, kept for a retry when the guest's
/// MAC is not known yet.
enum ToGuestDatagram {
    /// A complete IPv4 frame but for its destination MAC.
    Frame4(Vec<u8>),
    Udp6 {
        src: SocketAddrV6,
        dst: SocketAddrV6,
        payload: Vec<u8>,
    },
}

impl ToGuestDatagram {
    fn send(&mut self, engine: &Engine) -> bool {
        match self {
            ToGuestDatagram::Frame4(frame) => engine.send_ipv4_frame_to_guest(frame),
            ToGuestDatagram::Udp6 { src, dst, payload } => engine.send_udp_reply((*src).into(), (*dst).into(), payload),
        }
    }
}

// ---------------------------------------------------------------------------
// Addresses, parsed and reported as Go's net package does.

/// Go's `strconv.Quote` for the short strings in error messages.
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `net.SplitHostPort`, with its error texts.
pub fn split_host_port(hostport: &str) -> Result<(String, String), String> {
    let addr_err = |why: &str| {
        if hostport.is_empty() { why.to_string() } else { format!("address {hostport}: {why}") }
    };
    const MISSING_PORT: &str = "missing port in address";
    const TOO_MANY_COLONS: &str = "too many colons in address";
    let Some(i) = hostport.rfind(':') else { return Err(addr_err(MISSING_PORT)) };
    let (host, j, k);
    if hostport.starts_with('[') {
        let Some(end) = hostport.find(']') else { return Err(addr_err("missing ']' in address")) };
        if end + 1 == hostport.len() {
            return Err(addr_err(MISSING_PORT));
        } else if end + 1 != i {
            if hostport.as_bytes()[end + 1] == b':' {
                return Err(addr_err(TOO_MANY_COLONS));
            }
            return Err(addr_err(MISSING_PORT));
        }
        host = &hostport[1..end];
        (j, k) = (1, end + 1);
    } else {
        host = &hostport[..i];
        if host.contains(':') {
            return Err(addr_err(TOO_MANY_COLONS));
        }
        (j, k) = (0, 0);
    }
    if hostport[j..].contains('[') {
        return Err(addr_err("unexpected '[' in address"));
    }
    if hostport[k..].contains(']') {
        return Err(addr_err("unexpected ']' in address"));
    }
    Ok((host.to_string(), hostport[i + 1..].to_string()))
}

/// gvproxy's `remote()`: an empty host in `remote` (`":8080"`) means the
/// address the API request came from (`peer`, as Go's `RemoteAddr`).
pub fn fill_remote_host(remote: &str, peer: &str) -> Result<String, String> {
    let (host, _) = split_host_port(remote)?;
    if !host.is_empty() {
        return Ok(remote.to_string());
    }
    let (peer_host, _) = split_host_port(peer)?;
    // gvproxy pastes the host in bare, which no parser takes back for an
    // IPv6 caller; brackets make it the `[IPv6]:port` form.
    if peer_host.contains(':') {
        return Ok(format!("[{peer_host}]{remote}"));
    }
    Ok(format!("{peer_host}{remote}"))
}

/// gvproxy's `tcpipAddress`: `IPv4:port` in the guest, and beyond gvproxy
/// `[IPv6]:port` as Go's `net.JoinHostPort` writes it. An IPv4-mapped
/// IPv6 address means the IPv4 guest, as Go's `To4` reads it.
pub fn tcpip_address(remote: &str) -> Result<SocketAddr, String> {
    if remote.starts_with('[') {
        return tcpip_address6(remote);
    }
    let parts: Vec<&str> = remote.split(':').collect();
    if parts.len() != 2 {
        return Err("invalid remote addr".to_string());
    }
    let port = go_atoi(parts[1])?;
    // Go converts with uint16(port): out-of-range values wrap.
    let port = port as u16;
    // gvproxy would crash on a host that is not an IPv4 address.
    let ip: Ipv4Addr = parts[0].parse().map_err(|_| "invalid remote addr".to_string())?;
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
}

/// `[IPv6]:port`: the port read as the IPv4 form reads it (Atoi's errors,
/// wrapped to 16 bits); anything else wrong is `invalid remote addr`. A
/// zone (`%eth0`) is refused: guests are reached by global addresses.
fn tcpip_address6(remote: &str) -> Result<SocketAddr, String> {
    let invalid = || "invalid remote addr".to_string();
    let (host, port) = split_host_port(remote).map_err(|_| invalid())?;
    let ip: Ipv6Addr = host.parse().map_err(|_| invalid())?;
    let port = go_atoi(&port)? as u16;
    Ok(match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
        None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
    })
}

/// Go's `strconv.Atoi` with its error texts.
fn go_atoi(s: &str) -> Result<i64, String> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("strconv.Atoi: parsing {}: invalid syntax", go_quote(s)));
    }
    s.parse::<i64>().map_err(|_| format!("strconv.Atoi: parsing {}: value out of range", go_quote(s)))
}

/// A `tcp://IP:port` (or `tcp://[IPv6]:port`) remote of a unix forward, as
/// gvproxy reads it with `url.Parse`.
#[cfg_attr(not(unix), allow(dead_code))]
fn unix_remote(remote: &str) -> Result<SocketAddr, String> {
    let parse_err = |why: &str| format!("failed to parse remote uri :{remote} : parse {}: {why}", go_quote(remote));
    // A URL scheme starts with a letter and runs to the first ':'.
    let scheme_end = remote.find(':');
    let scheme = match scheme_end {
        Some(0) => return Err(parse_err("missing protocol scheme")),
        Some(n)
            if remote.as_bytes()[0].is_ascii_alphabetic()
                && remote[..n].bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) =>
        {
            &remote[..n]
        }
        _ => "",
    };
    let rest = if scheme.is_empty() { remote } else { &remote[scheme.len() + 1..] };
    if scheme.is_empty() && rest.split('/').next().is_some_and(|seg| seg.contains(':')) {
        return Err(parse_err("first path segment in URL cannot contain colon"));
    }
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "tcp" {
        return Err(format!("remote protocol for unix forwarder is not implemented: {scheme}"));
    }
    let authority = rest.strip_prefix("//").map(|a| a.split(['/', '?', '#']).next().unwrap_or("")).unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    // url.Hostname() and url.Port(), joined again with a colon.
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, p),
        _ => (hostport, ""),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // Joined as Go's net.JoinHostPort would, brackets round an IPv6 host.
    if host.contains(':') {
        return tcpip_address(&format!("[{host}]:{port}"));
    }
    tcpip_address(&format!("{host}:{port}"))
}

/// A host address to listen on, resolved as Go's `net.Listen` would.
struct ListenAddr {
    addr: SocketAddr,
    /// Any address (empty host, 0.0.0.0 or ::): Go listens dual-stack.
    wildcard: bool,
    /// How Go prints it in errors (`:80` for an empty host).
    display: String,
}

fn resolve_local(network: &str, local: &str) -> Result<ListenAddr, String> {
    let (host, port) = split_host_port(local)?;
    let port: u16 = if port.is_empty() {
        0
    } else if port.bytes().all(|b| b.is_ascii_digit()) {
        port.parse().map_err(|_| format!("address {port}: invalid port"))?
    } else {
        return Err(format!("lookup {network}/{port}: unknown port"));
    };
    let ip: Option<IpAddr> = if host.is_empty() {
        None
    } else if host.eq_ignore_ascii_case("localhost") {
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
    } else {
        Some(host.parse().map_err(|_| format!("lookup {host}: no such host"))?)
    };
    let display = match ip {
        None => format!(":{port}"),
        Some(ip) => SocketAddr::new(ip, port).to_string(),
    };
    let wildcard = ip.is_none_or(|ip| ip.is_unspecified());
    let addr = SocketAddr::new(ip.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)), port);
    Ok(ListenAddr { addr, wildcard, display })
}

/// Go's text for a system error: strerror with a lower-case first letter.
pub fn go_errno_text(e: &io::Error) -> String {
    let Some(code) = e.raw_os_error() else {
        return match e.kind() {
            io::ErrorKind::InvalidInput => "invalid argument".to_string(),
            _ => e.to_string(),
        };
    };
    let text = io::Error::from_raw_os_error(code).to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

/// A socket for `la`: dual-stack IPv6 for wildcards when the host has IPv6,
/// as Go does, else IPv4.
fn socket_for(la: &ListenAddr, ty: socket2::Type) -> io::Result<(socket2::Socket, SocketAddr)> {
    use socket2::{Domain, Socket};
    if la.wildcard {
        if let Ok(s) = Socket::new(Domain::IPV6, ty, None)
            && s.set_only_v6(false).is_ok()
        {
            return Ok((s, SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), la.addr.port())));
        }
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), la.addr.port());
        return Ok((Socket::new(Domain::IPV4, ty, None)?, v4));
    }
    Ok((Socket::new(Domain::for_address(la.addr), ty, None)?, la.addr))
}

fn listen_tcp(local: &str) -> Result<tokio::net::TcpListener, String> {
    let la = resolve_local("tcp", local).map_err(|e| format!("listen tcp: {e}"))?;
    let fail = |op: &str, e: io::Error| format!("listen tcp {}: {op}: {}", la.display, go_errno_text(&e));
    let (sock, addr) = socket_for(&la, socket2::Type::STREAM).map_err(|e| fail("socket", e))?;
    sock.set_reuse_address(true).map_err(|e| fail("setsockopt", e))?;
    sock.set_nonblocking(true).map_err(|e| fail("setsockopt", e))?;
    sock.bind(&addr.into()).map_err(|e| fail("bind", e))?;
    sock.listen(1024).map_err(|e| fail("listen", e))?;
    tokio::net::TcpListener::from_std(sock.into()).map_err(|e| fail("listen", e))
}

fn listen_udp(local: &str) -> Result<tokio::net::UdpSocket, String> {
    let la = resolve_local("udp", local)?;
    let fail = |op: &str, e: io::Error| format!("listen udp {}: {op}: {}", la.display, go_errno_text(&e));
    let (sock, addr) = socket_for(&la, socket2::Type::DGRAM).map_err(|e| fail("socket", e))?;
    sock.set_nonblocking(true).map_err(|e| fail("setsockopt", e))?;
    sock.bind(&addr.into()).map_err(|e| fail("bind", e))?;
    tokio::net::UdpSocket::from_std(sock.into()).map_err(|e| fail("bind", e))
}

#[cfg(unix)]
fn listen_unix(path: &Path) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::FileTypeExt;
    let fail = |e: io::Error| format!("listen unix {}: bind: {}", path.display(), go_errno_text(&e));
    // Replace a stale socket file; anything else at the path is left alone
    // (gvproxy would delete it) and the bind reports it.
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path).map_err(|e| format!("remove {}: {}", path.display(), go_errno_text(&e)))?;
    }
    let std_listener = std::os::unix::net::UnixListener::bind(path).map_err(fail)?;
    std_listener.set_nonblocking(true).map_err(fail)?;
    tokio::net::UnixListener::from_std(std_listener).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_host_port_matches_go() {
        assert_eq!(split_host_port("127.0.0.1:80").unwrap(), ("127.0.0.1".into(), "80".into()));
        assert_eq!(split_host_port(":8080").unwrap(), ("".into(), "8080".into()));
        assert_eq!(split_host_port("[::1]:80").unwrap(), ("::1".into(), "80".into()));
        assert_eq!(split_host_port("").unwrap_err(), "missing port in address");
        assert_eq!(split_host_port("1.2.3.4").unwrap_err(), "address 1.2.3.4: missing port in address");
        assert_eq!(split_host_port("::1:80").unwrap_err(), "address ::1:80: too many colons in address");
        assert_eq!(split_host_port("[::1]").unwrap_err(), "address [::1]: missing port in address");
        assert_eq!(split_host_port("[::1:80").unwrap_err(), "address [::1:80: missing ']' in address");
        assert_eq!(split_host_port("a]:80").unwrap_err(), "address a]:80: unexpected ']' in address");
        assert_eq!(split_host_port("@").unwrap_err(), "address @: missing port in address");
    }

    #[test]
    fn remote_host_defaults_to_the_caller() {
        assert_eq!(fill_remote_host(":8080", "192.168.127.2:40000").unwrap(), "192.168.127.2:8080");
        assert_eq!(fill_remote_host("192.168.127.3:22", "@").unwrap(), "192.168.127.3:22");
        assert_eq!(fill_remote_host(":8080", "@").unwrap_err(), "address @: missing port in address");
    }

    #[test]
    fn guest_addresses_as_gvproxy_reads_them() {
        assert_eq!(tcpip_address("192.168.127.2:22").unwrap(), "192.168.127.2:22".parse().unwrap());
        assert_eq!(tcpip_address("192.168.127.2").unwrap_err(), "invalid remote addr");
        assert_eq!(tcpip_address("192.168.127.2:x").unwrap_err(), "strconv.Atoi: parsing \"x\": invalid syntax");
        assert_eq!(tcpip_address("192.168.127.2:65537").unwrap().port(), 1);
        assert_eq!(unix_remote("tcp://192.168.127.2:22").unwrap(), "192.168.127.2:22".parse().unwrap());
        assert_eq!(
            unix_remote("ssh://192.168.127.2:22").unwrap_err(),
            "remote protocol for unix forwarder is not implemented: ssh"
        );
        assert_eq!(
            unix_remote("192.168.127.2:22").unwrap_err(),
            "failed to parse remote uri :192.168.127.2:22 : parse \"192.168.127.2:22\": first path segment in URL cannot contain colon"
        );
    }

    #[test]
    fn every_ipv4_form_reads_and_fails_as_before() {
        let ok = |s: &str| tcpip_address(s).unwrap();
        let err = |s: &str| tcpip_address(s).unwrap_err();
        assert_eq!(ok("192.168.127.2:0"), "192.168.127.2:0".parse().unwrap());
        assert_eq!(ok("192.168.127.2:+22").port(), 22);
        assert_eq!(ok("192.168.127.2:-1").port(), 65535);
        assert_eq!(ok("192.168.127.2:65536").port(), 0);
        assert_eq!(ok("192.168.127.2:0022").port(), 22);
        for bad in ["", "a:b:c", "192.168.127.2:22:1", "localhost:22", "::1:22", "1.2.3:4", "fd5a::1"] {
            assert_eq!(err(bad), "invalid remote addr", "{bad:?}");
        }
        // The port is read before the host, as in gvproxy.
        assert_eq!(err("bogus:x"), "strconv.Atoi: parsing \"x\": invalid syntax");
        assert_eq!(err(":"), "strconv.Atoi: parsing \"\": invalid syntax");
        assert_eq!(err("192.168.127.2:"), "strconv.Atoi: parsing \"\": invalid syntax");
        assert_eq!(err("192.168.127.2:+"), "strconv.Atoi: parsing \"+\": invalid syntax");
        assert_eq!(err("192.168.127.2:1e3"), "strconv.Atoi: parsing \"1e3\": invalid syntax");
        assert_eq!(
            err("192.168.127.2:99999999999999999999"),
            "strconv.Atoi: parsing \"99999999999999999999\": value out of range"
        );
        assert_eq!(err("192.168.127.2:\n"), "strconv.Atoi: parsing \"\\n\": invalid syntax");
    }

    #[test]
    fn ipv6_guests_as_go_writes_them() {
        let guest6: SocketAddr = "[fd5a:94ef:e40c:0:5894:efff:fee4:cee]:80".parse().unwrap();
        assert_eq!(tcpip_address("[fd5a:94ef:e40c:0:5894:efff:fee4:cee]:80").unwrap(), guest6);
        assert_eq!(tcpip_address("[FD5A:94EF:E40C::5894:EFFF:FEE4:CEE]:80").unwrap(), guest6);
        // The port as the IPv4 form reads it.
        assert_eq!(tcpip_address("[fd5a::2]:65617").unwrap(), "[fd5a::2]:81".parse().unwrap());
        assert_eq!(tcpip_address("[fd5a::2]:x").unwrap_err(), "strconv.Atoi: parsing \"x\": invalid syntax");
        assert_eq!(tcpip_address("[fd5a::2]:").unwrap_err(), "strconv.Atoi: parsing \"\": invalid syntax");
        // An IPv4-mapped address is the IPv4 guest.
        assert_eq!(tcpip_address("[::ffff:192.168.127.2]:22").unwrap(), "192.168.127.2:22".parse().unwrap());
        for bad in [
            "[fd5a::2]",
            "[fd5a::2]80",
            "[fd5a::2]:80:1",
            "[fd5a::2:80",
            "[fd5a::2]]:80",
            "[[fd5a::2]]:80",
            "[192.168.127.2]:80",
            "[fe80::1%eth0]:80",
            "[]:80",
            "[zz::1]:80",
            "[fd5a::2]:[80]",
            "[fd5a:::2]:80",
            "[fd5a::2 ]:80",
        ] {
            assert_eq!(tcpip_address(bad).unwrap_err(), "invalid remote addr", "{bad:?}");
        }
        // Unix forwards: url.Parse's host and port, joined again.
        assert_eq!(unix_remote("tcp://[fd5a:94ef:e40c:0:5894:efff:fee4:cee]:80").unwrap(), guest6);
        assert_eq!(unix_remote("tcp://user@[fd5a::2]:22/path").unwrap(), "[fd5a::2]:22".parse().unwrap());
        assert_eq!(unix_remote("tcp://[fd5a::2]").unwrap_err(), "strconv.Atoi: parsing \"\": invalid syntax");
        assert_eq!(unix_remote("tcp://[zz::1]:22").unwrap_err(), "invalid remote addr");
        // The API fills in an IPv6 caller's address in brackets.
        assert_eq!(fill_remote_host(":8080", "[fd5a::2]:40000").unwrap(), "[fd5a::2]:8080");
        assert_eq!(tcpip_address(&fill_remote_host(":8080", "[fd5a::2]:40000").unwrap()).unwrap().port(), 8080);
    }

    #[test]
    fn local_addresses_and_errors_as_go_prints_them() {
        let la = resolve_local("tcp", ":8080").unwrap();
        assert!(la.wildcard);
        assert_eq!(la.display, ":8080");
        let la = resolve_local("tcp", "localhost:80").unwrap();
        assert_eq!(la.display, "127.0.0.1:80");
        assert!(!la.wildcard);
        assert_eq!(resolve_local("tcp", "1.2.3.4:99999").err().unwrap(), "address 99999: invalid port");
        assert_eq!(listen_tcp("bogus").err().unwrap(), "listen tcp: address bogus: missing port in address");
        assert_eq!(go_errno_text(&io::Error::from_raw_os_error(libc_eaddrinuse())), "address already in use");
    }

    fn libc_eaddrinuse() -> i32 {
        io::Error::from(io::ErrorKind::AddrInUse).raw_os_error().unwrap_or(98)
    }
}
