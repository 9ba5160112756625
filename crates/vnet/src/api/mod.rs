//! The HTTP API (gvproxy's), inside the virtual network at `gateway:80` and
//! on host endpoints given by `--api`.
//!
//! How this works: hyper's HTTP/1 server runs on the engine's own thread;
//! every connection is a local task whose handlers use the `Rc<Engine>`
//! directly (no channels, no locks). The inside API is the gateway's TCP
//! service on port 80, so it answers only on the gateway address; a host
//! endpoint is any listener `rdnet_link::listen` makes (unix socket, TCP).
//!
//! Answers are gvproxy's byte for byte: the same paths, JSON encoded as Go's
//! `json.Encoder` does (`<>&` escaped, a final newline), `200` with an empty
//! body for a successful change, plain-text errors ending in a newline
//! (`400` for a body that does not decode, with Go's decoder message, `500`
//! for a refused expose/unexpose, `404 page not found`). What gvproxy leaves
//! unbounded is bounded here: a request body may be at most [`MAX_BODY`]
//! (`413` beyond), headers must arrive within [`READ_TIMEOUT`] and the body
//! within the same time, a response the client does not read fails after
//! [`WRITE_TIMEOUT`], a connection is closed gracefully after
//! [`CONN_LIFETIME`], and at most [`MAX_CONNECTIONS`] are served at once.

pub mod gojson;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::gateway::dns::Zone;
use crate::shell::Engine;
use gojson::Field;

/// The gateway port of the inside API.
pub const API_PORT: u16 = 80;
/// Largest request body accepted (gvproxy has no limit; requests are tiny).
pub const MAX_BODY: usize = 1024 * 1024;
/// A larger body is read and thrown away up to this size, so the client
/// sees the 413 instead of a reset; beyond it the connection is closed.
const MAX_DRAIN: u64 = 16 * 1024 * 1024;
/// Time for a request's headers, and again for its body (Rancher Desktop's
/// API server: 10 s read and write timeouts).
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection (keep-alive included) is closed gracefully after this.
pub const CONN_LIFETIME: Duration = Duration::from_secs(120);
/// Connections served at once, over all API endpoints of the thread.
pub const MAX_CONNECTIONS: usize = 128;

thread_local! {
    static CONNECTIONS: Cell<usize> = const { Cell::new(0) };
}

const EXPOSE_FIELDS: &[Field] = &[
    Field { name: "local", go_type: "string" },
    Field { name: "remote", go_type: "string" },
    Field { name: "protocol", go_type: "types.TransportProtocol" },
];
const UNEXPOSE_FIELDS: &[Field] =
    &[Field { name: "local", go_type: "string" }, Field { name: "protocol", go_type: "types.TransportProtocol" }];

/// Who sent a request, as Go's `Request.RemoteAddr` would show it.
#[derive(Debug, Clone)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A unix-socket (or named-pipe) client: Go shows `@`.
    Local,
}

impl Peer {
    fn remote_addr(&self) -> String {
        match self {
            Peer::Tcp(a) => a.to_string(),
            Peer::Local => "@".to_string(),
        }
    }

    /// From `rdnet_link`'s peer description (`tcp://1.2.3.4:5`, `unix://…`).
    pub fn from_link_peer(peer: &str) -> Peer {
        peer.strip_prefix("tcp://").and_then(|a| a.parse().ok()).map_or(Peer::Local, Peer::Tcp)
    }
}

/// Makes the API a TCP service of the gateway on port 80.
pub fn register_inside(engine: &Rc<Engine>) {
    let weak = Rc::downgrade(engine);
    engine.tcp.borrow_mut().register_service(
        API_PORT,
        Rc::new(move |stream, guest| {
            if let Some(engine) = weak.upgrade() {
                tokio::task::spawn_local(serve_connection(engine, stream, Peer::Tcp(guest)));
            }
        }),
    );
}

/// Serves the API on a host listener until the task is dropped.
pub async fn serve_listener(engine: Rc<Engine>, listener: rdnet_link::Listener) {
    // No authentication: the socket file's permissions are the API's only
    // guard, so only its owner may connect (gvproxy leaves the umask's).
    #[cfg(unix)]
    if let rdnet_link::Listener::Unix { path, .. } = &listener {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!(path = %path.display(), error = %e, "API: cannot make the socket owner-only");
        }
    }
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::task::spawn_local(serve_connection(engine.clone(), stream, Peer::from_link_peer(&peer)));
            }
            Err(e) => {
                crate::limited_warn!(engine.logs.borrow_mut(), Instant::now(), "api-accept",
                    error = %e, "API: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

struct ConnectionSlot;

impl ConnectionSlot {
    fn take() -> Option<ConnectionSlot> {
        CONNECTIONS.with(|c| {
            if c.get() >= MAX_CONNECTIONS {
                return None;
            }
            c.set(c.get() + 1);
            Some(ConnectionSlot)
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        CONNECTIONS.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

/// Serves HTTP/1 requests on one connection. Must run on a `LocalSet`.
pub async fn serve_connection<S>(engine: Rc<Engine>, stream: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let Some(_slot) = ConnectionSlot::take() else {
        crate::limited_warn!(
            engine.logs.borrow_mut(),
            Instant::now(),
            "api-busy",
            max = MAX_CONNECTIONS,
            "API: too many connections; closing a new one"
        );
        return;
    };
    let service = {
        let peer = peer.clone();
        service_fn(move |req| {
            let engine = engine.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(handle(&engine, &peer, req).await) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .title_case_headers(true)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(WriteTimeout::new(stream)), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(peer = %peer.remote_addr(), error = %e, "API connection ended with an error");
            }
        }
        _ = tokio::time::sleep(CONN_LIFETIME) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(READ_TIMEOUT, conn).await;
        }
    }
}

/// A stream whose writes fail when the peer takes nothing for
/// [`WRITE_TIMEOUT`] (an answer nobody reads must not hold a connection).
struct WriteTimeout<S> {
    inner: S,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

/// How long a response may wait for the client to read it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

impl<S> WriteTimeout<S> {
    fn new(inner: S) -> Self {
        WriteTimeout { inner, stalled: None }
    }

    /// Maps a pending write to a timeout error once it waited too long.
    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "write timeout"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, r)
    }
}

type Body = Full<Bytes>;

fn respond(status: StatusCode, content_type: Option<&'static str>, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Some(ct) = content_type {
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    r
}

/// Go's `http.Error`: plain text, a newline after the message.
fn error(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = respond(status, Some("text/plain; charset=utf-8"), format!("{msg}\n").into_bytes());
    r.headers_mut().insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

/// Go's `json.NewEncoder(w).Encode(v)`; Go labels it as sniffed text.
fn json<T: Serialize + ?Sized>(v: &T) -> Response<Body> {
    respond(StatusCode::OK, Some("text/plain; charset=utf-8"), gojson::encode(v))
}

/// `w.WriteHeader(http.StatusOK)`: no body.
fn ok() -> Response<Body> {
    respond(StatusCode::OK, None, Vec::new())
}

fn closing(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn handle(engine: &Rc<Engine>, peer: &Peer, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let post = req.method() == Method::POST;
    tracing::debug!(method = %req.method(), %path, peer = %peer.remote_addr(), "API request");
    match path.as_str() {
        "/services/forwarder/all" => json(&engine.forwarder.list()),
        "/services/forwarder/expose" if !post => error(StatusCode::BAD_REQUEST, "post only"),
        "/services/forwarder/expose" => match read_body(req).await {
            Ok(body) => expose(engine, peer, &body),
            Err(r) => r,
        },
        "/services/forwarder/unexpose" if !post => error(StatusCode::BAD_REQUEST, "post only"),
        "/services/forwarder/unexpose" => match read_body(req).await {
            Ok(body) => unexpose(engine, &body),
            Err(r) => r,
        },
        "/services/dhcp/leases" | "/leases" => json(&leases(engine)),
        "/services/dns/all" => json(&engine.dns.zones()),
        "/services/dns/add" if !post => error(StatusCode::BAD_REQUEST, "post only"),
        "/services/dns/add" => match read_body(req).await {
            Ok(body) => add_zone(engine, &body),
            Err(r) => r,
        },
        "/cam" => json(&cam(engine)),
        "/stats" => json(&stats(engine)),
        _ => error(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

/// Reads a request body of at most [`MAX_BODY`] within [`READ_TIMEOUT`].
async fn read_body(req: Request<Incoming>) -> Result<Vec<u8>, Response<Body>> {
    let too_large = || closing(error(StatusCode::PAYLOAD_TOO_LARGE, "http: request body too large"));
    let declared =
        req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_DRAIN) {
        return Err(too_large());
    }
    let mut body = req.into_body();
    let mut buf = Vec::new();
    let mut total: u64 = 0;
    let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(closing(error(StatusCode::BAD_REQUEST, "i/o timeout"))),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(closing(error(StatusCode::BAD_REQUEST, &e.to_string()))),
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else { continue };
                total += data.len() as u64;
                if total > MAX_DRAIN {
                    return Err(too_large());
                }
                if total <= MAX_BODY as u64 {
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
    if total > MAX_BODY as u64 {
        return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "http: request body too large"));
    }
    Ok(buf)
}

fn expose(engine: &Rc<Engine>, peer: &Peer, body: &[u8]) -> Response<Body> {
    let fields = match gojson::decode_strings(body, "ExposeRequest", "types.ExposeRequest", EXPOSE_FIELDS) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let [local, remote, protocol] = <[String; 3]>::try_from(fields).unwrap_or_default();
    let protocol = if protocol.is_empty() { "tcp".to_string() } else { protocol };
    let remote = if protocol != "unix" && protocol != "npipe" {
        match crate::forward::fill_remote_host(&remote, &peer.remote_addr()) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        }
    } else {
        remote
    };
    match engine.forwarder.expose(engine, &protocol, &local, &remote) {
        Ok(()) => ok(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

fn unexpose(engine: &Rc<Engine>, body: &[u8]) -> Response<Body> {
    let fields = match gojson::decode_strings(body, "UnexposeRequest", "types.UnexposeRequest", UNEXPOSE_FIELDS) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let [local, protocol] = <[String; 2]>::try_from(fields).unwrap_or_default();
    let protocol = if protocol.is_empty() { "tcp".to_string() } else { protocol };
    match engine.forwarder.unexpose(engine, &protocol, &local) {
        Ok(()) => ok(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

fn add_zone(engine: &Rc<Engine>, body: &[u8]) -> Response<Body> {
    let (value, range) = match gojson::first_value(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let zone = if value == gojson::Value::Null {
        Zone { name: String::new(), records: Vec::new(), default_ip: None }
    } else {
        match serde_json::from_slice::<Zone>(&body[range]) {
            Ok(z) => z,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("json: {e}")),
        }
    };
    let (name, records) = (zone.name.clone(), zone.records.len());
    // Anyone in the guest may call this: bounded, and logged through the limiter.
    match engine.dns.add_zone(zone) {
        Ok(()) => {
            crate::limited!(debug, engine.logs.borrow_mut(), Instant::now(), "api-dns-add",
                zone = %name, records, "DNS zone added through the API");
            ok()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// A MAC address as Go prints one.
fn mac_text(mac: &smoltcp::wire::EthernetAddress) -> String {
    rdnet_wire::MacDisplay(mac.0).to_string()
}

/// gvproxy's `IPPool.Leases()`: address → MAC, the gateway's and the static
/// reservation included.
fn leases(engine: &Engine) -> BTreeMap<String, String> {
    let net = engine.net.borrow();
    let mut map = BTreeMap::new();
    map.insert(net.cfg.gateway_ip.to_string(), mac_text(&net.cfg.gateway_mac));
    map.insert(net.cfg.device_ip.to_string(), mac_text(&net.cfg.device_mac));
    for (ip, mac) in net.dhcp.active_leases(Instant::now()) {
        map.insert(ip.to_string(), mac_text(&mac));
    }
    // IPv6 has no leases (SLAAC): the gateway's addresses and the guest
    // addresses it has seen in use, in the same map.
    if let Some(v6) = &net.cfg.ipv6 {
        for ip in [v6.gateway, v6.link_local] {
            map.insert(ip.to_string(), mac_text(&net.cfg.gateway_mac));
        }
    }
    for (ip, mac) in net.ipv6.neighbors() {
        map.insert(ip.to_string(), mac_text(&mac));
    }
    map
}

/// gvproxy's `Switch.CAM()`: learned MAC → connection number (from 0).
fn cam(engine: &Engine) -> BTreeMap<String, i64> {
    let net = engine.net.borrow();
    net.switch.entries().map(|(mac, port)| (mac_text(mac), i64::from(*port) - 1)).collect()
}

#[derive(Serialize)]
struct Flows {
    tcp: usize,
    tcp_connecting: usize,
    tcp_refused: u64,
    udp: usize,
    icmp: usize,
    forwards: usize,
    forward_udp: usize,
    /// TCP connections refused or reset for want of buffer memory.
    tcp_memory_refused: u64,
    tcp_beyond_window: u64,
}

/// Where memory goes: TCP buffers (committed as data reaches them) and the
/// process as the system counts it.
#[derive(Serialize)]
struct MemoryView {
    tcp_buffers_committed: usize,
    /// Buffer chunks committed on a fault instead of ahead (Windows; 0
    /// unless a write was not foreseen).
    tcp_buffer_fault_commits: u64,
    process: Option<crate::sys::ProcessMemory>,
}

#[derive(Serialize)]
struct StatsView {
    /// gvproxy's names: bytes to and from the VMs.
    #[serde(rename = "BytesSent")]
    bytes_sent: u64,
    #[serde(rename = "BytesReceived")]
    bytes_received: u64,
    #[serde(flatten)]
    net: crate::stats::Stats,
    port_overflow_drops: u64,
    capture_drops: u64,
    vm_connections: usize,
    flows: Flows,
    dhcp_leases: usize,
    /// Guest IPv6 addresses the gateway knows (bounded per MAC and in all).
    ipv6_neighbors: usize,
    dns: crate::gateway::dns::DnsStats,
    udp_nat: crate::nat::udp::UdpNatStats,
    icmp_nat: crate::nat::icmp::IcmpNatStats,
    forwarder: crate::forward::ForwardStats,
    memory: MemoryView,
}

fn stats(engine: &Engine) -> StatsView {
    let (net_stats, leases, ipv6_neighbors) = {
        let net = engine.net.borrow();
        (net.stats.clone(), net.dhcp.active_leases(Instant::now()).len(), net.ipv6.len())
    };
    let tcp = engine.tcp.borrow();
    StatsView {
        bytes_sent: net_stats.bytes_out,
        bytes_received: net_stats.bytes_in,
        net: net_stats,
        port_overflow_drops: engine.overflow_drops(),
        capture_drops: engine.capture_drops(),
        vm_connections: engine.port_count(),
        flows: Flows {
            tcp: tcp.len(),
            tcp_connecting: tcp.connecting(),
            tcp_refused: tcp.stats().refused_syns,
            udp: engine.udp.borrow().len(),
            icmp: engine.icmp.borrow().len(),
            forwards: engine.forwarder.len(),
            forward_udp: engine.forwarder.udp_flows(),
            tcp_memory_refused: tcp.stats().memory_refused,
            tcp_beyond_window: tcp.stats().beyond_window,
        },
        dhcp_leases: leases,
        ipv6_neighbors,
        dns: engine.dns.stats(),
        udp_nat: engine.udp.borrow().stats(),
        icmp_nat: engine.icmp.borrow().stats(),
        forwarder: engine.forwarder.stats(),
        memory: MemoryView {
            tcp_buffers_committed: crate::sys::committed_total(),
            tcp_buffer_fault_commits: crate::sys::fault_commits(),
            process: crate::sys::process_memory(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_as_go_shows_them() {
        assert_eq!(Peer::from_link_peer("tcp://127.0.0.1:5000").remote_addr(), "127.0.0.1:5000");
        assert_eq!(Peer::from_link_peer("unix:///run/x.sock").remote_addr(), "@");
    }
}
