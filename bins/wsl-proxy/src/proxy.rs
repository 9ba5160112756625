//! The listener table and the TCP and UDP forwarders.
//!
//! How this works: [`Proxy`] owns a table of listeners keyed by
//! (protocol, listen address) — the listen address carries both `HostIp` and
//! `HostPort`, so `127.0.0.1:8080/tcp`, `[::1]:8080/tcp` and
//! `127.0.0.1:8080/udp` are three independent entries and removing one never
//! touches another. Each entry is one tokio task that owns its socket.
//! Publishing binds the socket synchronously (so a bind error is reported
//! right away) and spawns the task; publishing an existing key is a no-op.
//! Removing aborts the task and waits until it is gone, so the socket is
//! closed by the time `apply` returns and the address can be published again.
//!
//! TCP: every accepted connection gets its own task that dials
//! `upstream:port` (a failure resets the client's connection) and copies
//! both directions independently; when one side reaches EOF the write side of
//! the other is shut down (half-close), and an error in either direction ends
//! both. Connection tasks are not owned by the
//! listener, so removing a listener lets live connections finish.
//!
//! UDP: the listener task keeps one session per client address: a socket
//! connected to `upstream:port`, and a task that relays the upstream's replies
//! back to that client from the listening socket (so the client sees replies
//! from the address it sent to). Sessions end after [`UDP_IDLE`] without
//! traffic in either direction; the table holds at most [`UDP_MAX_SESSIONS`]
//! per listener, evicting the least recently active. Sessions belong to the
//! listener: removing it ends them.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

use crate::mapping::{Binding, Proto, Request};

/// A UDP session without traffic for this long is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(90);
/// Most UDP sessions (client addresses) per listener.
pub const UDP_MAX_SESSIONS: usize = 1024;
/// How long dialing the upstream for a TCP connection may take.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Copy buffer per direction of a TCP connection.
const TCP_BUF: usize = 64 * 1024;
/// Largest UDP payload.
const UDP_BUF: usize = 65536;

type Key = (Proto, SocketAddr);

/// The published ports.
pub struct Proxy {
    upstream: IpAddr,
    table: Mutex<HashMap<Key, AbortOnDrop>>,
}

impl Proxy {
    pub fn new(upstream: IpAddr) -> Self {
        Proxy { upstream, table: Mutex::new(HashMap::new()) }
    }

    /// Publishes or removes the request's bindings. Each binding is handled
    /// on its own: one that cannot be bound is logged and the rest go on.
    pub async fn apply(&self, req: &Request) {
        let mut table = self.table.lock().await;
        for b in &req.bindings {
            let key = (b.proto, b.listen);
            if req.remove {
                match table.remove(&key) {
                    Some(task) => {
                        task.stop().await;
                        tracing::info!("removed {b}");
                    }
                    None => tracing::info!("remove {b}: not published"),
                }
                continue;
            }
            match table.entry(key) {
                Entry::Occupied(_) => tracing::debug!("publish {b}: already published"),
                Entry::Vacant(slot) => match self.start(b) {
                    Ok(task) => {
                        slot.insert(task);
                        tracing::info!("published {b} (upstream {})", SocketAddr::new(self.upstream, b.upstream_port));
                    }
                    Err(e) => tracing::error!("publish {b}: {e}"),
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

    fn start(&self, b: &Binding) -> io::Result<AbortOnDrop> {
        let upstream = SocketAddr::new(self.upstream, b.upstream_port);
        let task = match b.proto {
            Proto::Tcp => {
                let listener = bind_tcp(b.listen)?;
                tokio::spawn(serve_tcp(listener, upstream))
            }
            Proto::Udp => {
                let socket = bind_udp(b.listen)?;
                tokio::spawn(serve_udp(Arc::new(socket), upstream))
            }
        };
        Ok(AbortOnDrop(Some(task)))
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

fn new_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        // `::` must not also claim IPv4: Docker publishes 0.0.0.0 and :: as
        // two bindings of the same port.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    // Re-publishing a port must not wait for TIME_WAIT connections.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
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

/// One client of a UDP listener.
struct Session {
    socket: Arc<UdpSocket>,
    /// Milliseconds since the listener's epoch at the last datagram either way.
    last: Arc<AtomicU64>,
    id: u64,
    _relay: AbortOnDrop,
}

async fn serve_udp(listener: Arc<UdpSocket>, upstream: SocketAddr) {
    let epoch = Instant::now();
    let now_ms = move || epoch.elapsed().as_millis() as u64;
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; UDP_BUF];
    loop {
        let (len, client) = tokio::select! {
            r = listener.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(e) => {
                    // e.g. ECONNREFUSED from an ICMP error for an earlier reply.
                    tracing::debug!("udp recv on {:?}: {e}", listener.local_addr().ok());
                    continue;
                }
            },
            Some((client, id)) = ended_rx.recv() => {
                if sessions.get(&client).is_some_and(|s| s.id == id) {
                    sessions.remove(&client);
                    tracing::debug!("udp session {client} → {upstream} closed");
                }
                continue;
            }
        };
        if !sessions.contains_key(&client) {
            if sessions.len() >= UDP_MAX_SESSIONS
                && let Some(oldest) =
                    sessions.iter().min_by_key(|(_, s)| s.last.load(Ordering::Relaxed)).map(|(a, _)| *a)
            {
                sessions.remove(&oldest);
                tracing::debug!("udp session {oldest} → {upstream} evicted (table full)");
            }
            let socket = match connect_udp(upstream).await {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::warn!("udp {client} → {upstream}: {e}");
                    continue;
                }
            };
            next_id += 1;
            let last = Arc::new(AtomicU64::new(now_ms()));
            let relay = tokio::spawn(relay_udp_replies(
                socket.clone(),
                listener.clone(),
                client,
                last.clone(),
                now_ms,
                ended_tx.clone(),
                next_id,
            ));
            tracing::debug!("udp session {client} → {upstream} opened");
            sessions.insert(client, Session { socket, last, id: next_id, _relay: AbortOnDrop(Some(relay)) });
        }
        if let Some(s) = sessions.get(&client) {
            s.last.store(now_ms(), Ordering::Relaxed);
            if let Err(e) = s.socket.send(&buf[..len]).await {
                tracing::debug!("udp {client} → {upstream}: {e}");
            }
        }
    }
}

async fn connect_udp(upstream: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    Ok(socket)
}

/// Relays the upstream's replies to `client` until the session is idle for
/// [`UDP_IDLE`], then reports its end to the listener.
async fn relay_udp_replies(
    socket: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    last: Arc<AtomicU64>,
    now_ms: impl Fn() -> u64,
    ended: mpsc::UnboundedSender<(SocketAddr, u64)>,
    id: u64,
) {
    let idle_ms = UDP_IDLE.as_millis() as u64;
    let mut buf = vec![0u8; UDP_BUF];
    loop {
        let idle_for = now_ms().saturating_sub(last.load(Ordering::Relaxed));
        if idle_for >= idle_ms {
            break;
        }
        let wait = Duration::from_millis(idle_ms - idle_for);
        match tokio::time::timeout(wait, socket.recv(&mut buf)).await {
            Err(_) => continue, // re-check: the client may have sent meanwhile
            Ok(Ok(len)) => {
                last.store(now_ms(), Ordering::Relaxed);
                if let Err(e) = listener.send_to(&buf[..len], client).await {
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
    let _ = ended.send((client, id));
}
