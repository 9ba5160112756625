//! The listener table and the TCP and UDP forwarders.
//!
//! How this works: [`Proxy`] owns a table of listeners keyed by binding
//! (protocol, host, port), so `127.0.0.1:8080/tcp`, `[::1]:8080/tcp`,
//! `*:8080/tcp` and `127.0.0.1:8080/udp` are independent entries and removing
//! one never touches another. Each entry is one tokio task that owns its
//! socket. Publishing binds the socket synchronously (so a bind error is
//! reported right away) and spawns the task; publishing an existing key is a
//! no-op. Removing aborts the task and waits until it is gone, so the socket
//! is closed by the time `apply` returns and the address can be published
//! again.
//!
//! Every address (`*`, an empty `HostIp`) is one dual-stack socket on `[::]`
//! with `IPV6_V6ONLY` off, as Go's `":PORT"`; where the namespace has no
//! IPv6 it falls back to `0.0.0.0`. An explicit `::` is IPv6 only and
//! `0.0.0.0` IPv4 only, so Docker's pair of bindings for one port can both
//! be published.
//!
//! TCP: every accepted connection gets its own task that dials
//! `upstream:port` (a failure resets the client's connection) and copies
//! both directions independently; when one side reaches EOF the write side of
//! the other is shut down (half-close), and an error in either direction ends
//! both. Connection tasks are not owned by the
//! listener, so removing a listener lets live connections finish.
//!
//! UDP: the listener task keeps one session per (client address, address it
//! wrote to): a socket connected to `upstream:port`, and a task that relays
//! the upstream's replies back to that client from the listening socket, with
//! the address the client wrote to as their source (see [`dgram`]), so a
//! connected client accepts them. Sessions end after [`UDP_IDLE`] without
//! traffic in either direction; the table holds at most [`UDP_MAX_SESSIONS`]
//! per listener, evicting the least recently active. Sessions belong to the
//! listener: removing it ends them. Reads take at most `-udpBuffer` bytes
//! (and never more than a datagram can hold): a longer datagram is
//! truncated, as Go's wsl-proxy does, with a warning once per listener.
//! Every UDP socket also asks the kernel for a `-udpBuffer`-byte receive
//! buffer (capped by `net.core.rmem_max`), so bursts queue rather than drop.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

use crate::dgram;
use crate::mapping::{Binding, Host, Proto, Request};
use crate::ratelimit::{LogLimiter, limited};

/// A UDP session without traffic for this long is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(90);
/// Most UDP sessions (client addresses) per listener.
pub const UDP_MAX_SESSIONS: usize = 1024;
/// How long dialing the upstream for a TCP connection may take.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Copy buffer per direction of a TCP connection.
const TCP_BUF: usize = 64 * 1024;
/// Largest UDP payload: a bigger read buffer would never be filled.
pub const MAX_DATAGRAM: usize = 65535;

/// How UDP sockets are sized (`-udpBuffer`).
#[derive(Debug, Clone, Copy)]
pub struct UdpSizing {
    /// Bytes one read takes; longer datagrams are truncated.
    read: usize,
    /// Receive buffer asked of the kernel.
    socket: usize,
}

impl UdpSizing {
    pub fn new(udp_buffer: usize) -> Self {
        UdpSizing { read: udp_buffer.clamp(1, MAX_DATAGRAM), socket: udp_buffer }
    }
}

/// The published ports.
pub struct Proxy {
    upstream: IpAddr,
    udp: UdpSizing,
    /// Shared with the control connections: what a client can make us log.
    log: Arc<SyncMutex<LogLimiter>>,
    table: Mutex<HashMap<Binding, AbortOnDrop>>,
}

impl Proxy {
    pub fn new(upstream: IpAddr, udp: UdpSizing, log: Arc<SyncMutex<LogLimiter>>) -> Self {
        Proxy { upstream, udp, log, table: Mutex::new(HashMap::new()) }
    }

    /// Publishes or removes the request's bindings. Each binding is handled
    /// on its own: one that cannot be bound is logged and the rest go on.
    pub async fn apply(&self, req: &Request) {
        let mut table = self.table.lock().await;
        for b in &req.bindings {
            if req.remove {
                match table.remove(b) {
                    Some(task) => {
                        task.stop().await;
                        tracing::info!("removed {b}");
                    }
                    None => limited!(info, self.log, "remove {b}: not published"),
                }
                continue;
            }
            match table.entry(*b) {
                Entry::Occupied(_) => tracing::debug!("publish {b}: already published"),
                Entry::Vacant(slot) => match self.start(b) {
                    Ok((task, on)) => {
                        slot.insert(task);
                        let upstream = SocketAddr::new(self.upstream, b.port);
                        match on {
                            Some(on) => tracing::info!("published {b} on {on} (upstream {upstream})"),
                            None => tracing::info!("published {b} (upstream {upstream})"),
                        }
                    }
                    Err(e) => limited!(error, self.log, "publish {b}: {e}"),
                },
            }
        }
    }

    /// Closes every listener.
    pub async fn close_all(&self) {
        let mut table = self.table.lock().await;
        for (_, task) in table.drain() {
            task.stop().await;
        }
    }

    /// Binds and starts serving; returns the task and, for every address,
    /// what that became.
    fn start(&self, b: &Binding) -> io::Result<(AbortOnDrop, Option<String>)> {
        let upstream = SocketAddr::new(self.upstream, b.port);
        let (socket, on) = self.listen_socket(b)?;
        let task = match b.proto {
            Proto::Tcp => tokio::spawn(serve_tcp(TcpListener::from_std(socket.into())?, upstream)),
            Proto::Udp => {
                let listener = UdpSocket::from_std(socket.into())?;
                tokio::spawn(serve_udp(Arc::new(listener), upstream, self.udp))
            }
        };
        Ok((AbortOnDrop(Some(task)), on))
    }

    fn listen_socket(&self, b: &Binding) -> io::Result<(Socket, Option<String>)> {
        let ip = match b.host {
            Host::Ip(ip) => return Ok((self.open(b.proto, SocketAddr::new(ip, b.port), true)?, None)),
            Host::All => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        match self.open(b.proto, SocketAddr::new(ip, b.port), false) {
            Ok(s) => Ok((s, Some(format!("[::]:{} (IPv4 and IPv6)", b.port)))),
            Err(e) if ipv6_unavailable(&e) => {
                let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), b.port);
                let s = self.open(b.proto, v4, true)?;
                limited!(warn, self.log, "{b}: no IPv6 here ({e}), listening on IPv4 only");
                Ok((s, Some(format!("{v4} (IPv4 only)"))))
            }
            Err(e) => Err(e),
        }
    }

    /// A bound (and for TCP listening) socket on `addr`. An IPv6 socket is
    /// IPv6 only when `only_v6`, dual-stack otherwise.
    fn open(&self, proto: Proto, addr: SocketAddr, only_v6: bool) -> io::Result<Socket> {
        let (ty, protocol) = match proto {
            Proto::Tcp => (Type::STREAM, Protocol::TCP),
            Proto::Udp => (Type::DGRAM, Protocol::UDP),
        };
        let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
        if addr.is_ipv6() {
            socket.set_only_v6(only_v6)?;
        }
        socket.set_nonblocking(true)?;
        match proto {
            Proto::Tcp => {
                // Re-publishing a port must not wait for TIME_WAIT connections.
                socket.set_reuse_address(true)?;
                socket.bind(&addr.into())?;
                socket.listen(1024)?;
            }
            Proto::Udp => {
                size_udp(&socket, self.udp);
                if addr.ip().is_unspecified() {
                    dgram::want_destination(&socket, addr.is_ipv6())?;
                }
                socket.bind(&addr.into())?;
            }
        }
        Ok(socket)
    }
}

/// Errors that mean the namespace cannot do IPv6 at all (no IPv6 in the
/// kernel, or no address to bind), as opposed to a real conflict such as
/// the port being taken.
fn ipv6_unavailable(e: &io::Error) -> bool {
    use nix::errno::Errno;
    let unavailable = [Errno::EAFNOSUPPORT, Errno::EPROTONOSUPPORT, Errno::EADDRNOTAVAIL];
    e.raw_os_error().is_some_and(|code| unavailable.iter().any(|u| *u as i32 == code))
}

/// Asks for a `-udpBuffer`-sized receive buffer; the kernel may give less,
/// which only means a burst can drop earlier.
fn size_udp(socket: &Socket, sizing: UdpSizing) {
    if let Err(e) = socket.set_recv_buffer_size(sizing.socket) {
        tracing::debug!("SO_RCVBUF {}: {e}", sizing.socket);
    }
}

/// A task that is aborted when its handle is dropped.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl AbortOnDrop {
    /// Aborts the task and waits until it (and the sockets it owns) is gone.
    async fn stop(mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

async fn serve_tcp(listener: TcpListener, upstream: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(async move {
                    match forward_tcp(client, peer, upstream).await {
                        Ok((up, down)) => {
                            tracing::debug!("tcp {peer} → {upstream} done: {up} bytes up, {down} down")
                        }
                        Err(e) => tracing::debug!("tcp {peer} → {upstream}: {e}"),
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept on {:?}: {e}", listener.local_addr().ok());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn forward_tcp(client: TcpStream, peer: SocketAddr, upstream: SocketAddr) -> io::Result<(u64, u64)> {
    let connected = tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(upstream))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")));
    let server = match connected {
        Ok(s) => s,
        Err(e) => {
            // Reset rather than close, so the client sees the refusal instead
            // of an empty reply.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return Err(e);
        }
    };
    tracing::debug!("tcp {peer} → {upstream}: connected");
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, mut client_write) = client.into_split();
    let (server_read, mut server_write) = server.into_split();
    let up = async {
        let n = tokio::io::copy_buf(&mut BufReader::with_capacity(TCP_BUF, client_read), &mut server_write).await?;
        server_write.shutdown().await?;
        Ok::<u64, io::Error>(n)
    };
    let down = async {
        let n = tokio::io::copy_buf(&mut BufReader::with_capacity(TCP_BUF, server_read), &mut client_write).await?;
        client_write.shutdown().await?;
        Ok::<u64, io::Error>(n)
    };
    tokio::try_join!(up, down)
}

/// One client of a UDP listener, and the address it wrote to.
type SessionKey = (SocketAddr, Option<IpAddr>);

struct Session {
    socket: Arc<UdpSocket>,
    /// Milliseconds since the listener's epoch at the last datagram either way.
    last: Arc<AtomicU64>,
    id: u64,
    _relay: AbortOnDrop,
}

/// What a listener's sessions share.
struct UdpShared {
    listener: Arc<UdpSocket>,
    upstream: SocketAddr,
    sizing: UdpSizing,
    epoch: Instant,
    /// Whether truncation has been reported for this listener yet.
    truncation_reported: AtomicBool,
}

impl UdpShared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Warns the first time a datagram did not fit `-udpBuffer`.
    fn note_truncation(&self, len: usize, from: &str) {
        if !self.truncation_reported.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "udp {from}: a datagram longer than -udpBuffer was cut to {len} bytes \
                 (reported once per published port; upstream {})",
                self.upstream
            );
        }
    }
}

async fn serve_udp(listener: Arc<UdpSocket>, upstream: SocketAddr, sizing: UdpSizing) {
    let shared = Arc::new(UdpShared {
        listener,
        upstream,
        sizing,
        epoch: Instant::now(),
        truncation_reported: AtomicBool::new(false),
    });
    let mut sessions: HashMap<SessionKey, Session> = HashMap::new();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(SessionKey, u64)>();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; sizing.read];
    loop {
        let got = tokio::select! {
            r = dgram::recv(&shared.listener, &mut buf) => match r {
                Ok(v) => v,
                Err(e) => {
                    // e.g. ECONNREFUSED from an ICMP error for an earlier reply.
                    tracing::debug!("udp recv on {:?}: {e}", shared.listener.local_addr().ok());
                    continue;
                }
            },
            Some((key, id)) = ended_rx.recv() => {
                if sessions.get(&key).is_some_and(|s| s.id == id) {
                    sessions.remove(&key);
                    tracing::debug!("udp session {} → {upstream} closed", key.0);
                }
                continue;
            }
        };
        if got.truncated {
            shared.note_truncation(got.len, &got.from.to_string());
        }
        let key = (got.from, got.to);
        if !sessions.contains_key(&key) {
            if sessions.len() >= UDP_MAX_SESSIONS
                && let Some(oldest) =
                    sessions.iter().min_by_key(|(_, s)| s.last.load(Ordering::Relaxed)).map(|(k, _)| *k)
            {
                sessions.remove(&oldest);
                tracing::debug!("udp session {} → {upstream} evicted (table full)", oldest.0);
            }
            let socket = match connect_udp(upstream, sizing).await {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::warn!("udp {} → {upstream}: {e}", got.from);
                    continue;
                }
            };
            next_id += 1;
            let last = Arc::new(AtomicU64::new(shared.now_ms()));
            let relay = tokio::spawn(relay_udp_replies(
                socket.clone(),
                shared.clone(),
                key,
                last.clone(),
                ended_tx.clone(),
                next_id,
            ));
            tracing::debug!("udp session {} → {upstream} opened", got.from);
            sessions.insert(key, Session { socket, last, id: next_id, _relay: AbortOnDrop(Some(relay)) });
        }
        if let Some(s) = sessions.get(&key) {
            s.last.store(shared.now_ms(), Ordering::Relaxed);
            if let Err(e) = s.socket.send(&buf[..got.len]).await {
                tracing::debug!("udp {} → {upstream}: {e}", got.from);
            }
        }
    }
}

async fn connect_udp(upstream: SocketAddr, sizing: UdpSizing) -> io::Result<UdpSocket> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    size_udp(&socket, sizing);
    socket.bind(&local.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(upstream).await?;
    Ok(socket)
}

/// Relays the upstream's replies to the session's client until the session
/// is idle for [`UDP_IDLE`], then reports its end to the listener.
async fn relay_udp_replies(
    socket: Arc<UdpSocket>,
    shared: Arc<UdpShared>,
    key: SessionKey,
    last: Arc<AtomicU64>,
    ended: mpsc::UnboundedSender<(SessionKey, u64)>,
    id: u64,
) {
    let (client, source) = key;
    let idle_ms = UDP_IDLE.as_millis() as u64;
    let mut buf = vec![0u8; shared.sizing.read];
    loop {
        let idle_for = shared.now_ms().saturating_sub(last.load(Ordering::Relaxed));
        if idle_for >= idle_ms {
            break;
        }
        let wait = Duration::from_millis(idle_ms - idle_for);
        match tokio::time::timeout(wait, dgram::recv(&socket, &mut buf)).await {
            Err(_) => continue, // re-check: the client may have sent meanwhile
            Ok(Ok(got)) => {
                last.store(shared.now_ms(), Ordering::Relaxed);
                if got.truncated {
                    shared.note_truncation(got.len, &shared.upstream.to_string());
                }
                if let Err(e) = dgram::send(&shared.listener, &buf[..got.len], client, source).await {
                    tracing::debug!("udp reply to {client}: {e}");
                }
            }
            // Nothing listens upstream (ICMP port unreachable): keep the
            // session, the next datagram may find it.
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Ok(Err(e)) => {
                tracing::debug!("udp session {client}: {e}");
                break;
            }
        }
    }
    let _ = ended.send((key, id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;

    #[test]
    fn only_a_missing_ipv6_falls_back_to_ipv4() {
        let err = |e: Errno| io::Error::from_raw_os_error(e as i32);
        assert!(ipv6_unavailable(&err(Errno::EAFNOSUPPORT)));
        assert!(ipv6_unavailable(&err(Errno::EADDRNOTAVAIL)));
        // A taken port is a conflict to report, not a reason to half-publish.
        assert!(!ipv6_unavailable(&err(Errno::EADDRINUSE)));
        assert!(!ipv6_unavailable(&err(Errno::EACCES)));
        assert!(!ipv6_unavailable(&io::Error::other("x")));
    }

    #[test]
    fn reads_never_exceed_a_datagram_and_smaller_values_are_honoured() {
        let s = UdpSizing::new(8 << 20);
        assert_eq!((s.read, s.socket), (MAX_DATAGRAM, 8 << 20));
        let s = UdpSizing::new(512);
        assert_eq!((s.read, s.socket), (512, 512));
    }
}
