//! The DNS server on the gateway (port 53, UDP and TCP).
//!
//! How this works: every message from a guest is decoded once
//! ([`message::classify`]). Names inside the local zones
//! (`rancher-desktop.internal.`, `docker.internal.` and whatever the API
//! adds) are answered at once, TTL 0. Everything else is forwarded as the
//! guest sent it (its ID, its EDNS record) to the upstream resolvers in
//! order, over UDP, each attempt bounded by [`ATTEMPT_TIMEOUT`]; an upstream
//! that refuses, times out or answers SERVFAIL/REFUSED makes us try the
//! next, and when none answers the guest gets SERVFAIL (within a few
//! seconds, never silence). A truncated UDP answer is fetched again over TCP
//! when the guest itself asked over TCP. An answer bigger than the guest's
//! UDP limit (512 bytes, or its EDNS size, and at most one datagram on the
//! link) is cut to header + question with TC set, so the guest retries over
//! TCP. Each forwarded UDP query is one local task; at most
//! [`MAX_IN_FLIGHT`] run at once (beyond that: SERVFAIL). A TCP connection
//! carries any number of queries, answered in order, and closes after
//! [`TCP_IDLE`] without one.

pub mod message;
pub mod upstream;
pub mod zone;

use std::cell::{Cell, RefCell};
use std::net::{SocketAddr, SocketAddrV4};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

use crate::config::NetConfig;
use crate::engine::Engine;
use crate::ratelimit::LogLimiter;
pub use message::Decision;
use upstream::Upstreams;
pub use zone::{Record, Zone};

pub const DNS_PORT: u16 = 53;
/// One attempt at one upstream resolver.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Forwarded queries waiting for an upstream at once.
pub const MAX_IN_FLIGHT: usize = 512;
/// A guest's TCP connection with no query for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(30);
/// Most concurrent TCP connections from guests.
pub const MAX_TCP_CONNECTIONS: usize = 256;

/// Counters for `/stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DnsStats {
    pub udp_queries: u64,
    pub tcp_queries: u64,
    /// Answered from the local zones.
    pub local_answers: u64,
    /// Sent to an upstream resolver.
    pub forwarded: u64,
    /// Forwarded queries no upstream answered (the guest got SERVFAIL).
    pub upstream_failures: u64,
    pub formerr: u64,
    /// Messages that were not answerable queries.
    pub dropped: u64,
    /// Answers cut down (TC set) to fit the guest's UDP limit.
    pub truncated: u64,
    /// Queries refused for lack of room ([`MAX_IN_FLIGHT`], TCP connections).
    pub overloaded: u64,
}

pub struct DnsServer {
    zones: RefCell<Vec<Zone>>,
    upstreams: RefCell<Upstreams>,
    /// The largest DNS payload in one UDP datagram on the virtual link.
    link_udp_max: usize,
    stats: Cell<DnsStats>,
    in_flight: Cell<usize>,
    tcp_connections: Cell<usize>,
    logs: RefCell<LogLimiter>,
}

impl DnsServer {
    pub fn new(cfg: &NetConfig, upstreams: Vec<SocketAddr>) -> Self {
        DnsServer {
            zones: RefCell::new(Zone::defaults(cfg.gateway_ip, cfg.host_ip)),
            upstreams: RefCell::new(Upstreams::new(upstreams)),
            link_udp_max: (cfg.mtu as usize).saturating_sub(crate::frame::IPV4_HEADER + crate::frame::UDP_HEADER),
            stats: Cell::new(DnsStats::default()),
            in_flight: Cell::new(0),
            tcp_connections: Cell::new(0),
            logs: RefCell::new(LogLimiter::default()),
        }
    }

    /// The local zones (for `/services/dns/all`).
    pub fn zones(&self) -> Vec<Zone> {
        self.zones.borrow().clone()
    }

    /// Adds or merges a zone (for `POST /services/dns/add`), as gvproxy does.
    pub fn add_zone(&self, zone: Zone) {
        zone::merge(&mut self.zones.borrow_mut(), zone);
    }

    pub fn stats(&self) -> DnsStats {
        self.stats.get()
    }

    fn count(&self, f: impl FnOnce(&mut DnsStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Classifies one message and counts the outcome.
    fn decide(&self, bytes: &[u8]) -> Decision {
        let decision = message::classify(&self.zones.borrow(), bytes);
        match &decision {
            Decision::Reply(r) if message::rcode(r) == Some(1) => self.count(|s| s.formerr += 1),
            Decision::Reply(_) => self.count(|s| s.local_answers += 1),
            Decision::Forward(_) => self.count(|s| s.forwarded += 1),
            Decision::Drop => {
                self.count(|s| s.dropped += 1);
                crate::limited_warn!(
                    self.logs.borrow_mut(),
                    Instant::now(),
                    "dns-drop",
                    len = bytes.len(),
                    "ignoring a DNS message that is not a query"
                );
            }
        }
        decision
    }

    /// Answers one query that arrived over UDP at `server` from `client`:
    /// local answers at once, forwarded ones from a local task.
    pub fn serve_udp(self: Rc<Self>, engine: &Rc<Engine>, client: SocketAddrV4, server: SocketAddrV4, query: &[u8]) {
        self.count(|s| s.udp_queries += 1);
        match self.decide(query) {
            Decision::Drop => {}
            Decision::Reply(reply) => {
                // A local answer is small, but the guest's limit still rules.
                let limit = Message::from_vec(query)
                    .map_or(message::CLASSIC_UDP, |q| message::udp_limit(&q, self.link_udp_max));
                let reply = self.fit(reply, limit);
                engine.send_udp_to_guest(server, client, &reply);
            }
            Decision::Forward(parsed) => {
                if self.in_flight.get() >= MAX_IN_FLIGHT {
                    self.count(|s| s.overloaded += 1);
                    crate::limited_warn!(
                        self.logs.borrow_mut(),
                        Instant::now(),
                        "dns-overload",
                        limit = MAX_IN_FLIGHT,
                        "too many DNS queries in flight: answering SERVFAIL"
                    );
                    engine.send_udp_to_guest(server, client, &message::servfail(&parsed));
                    return;
                }
                let limit = message::udp_limit(&parsed, self.link_udp_max);
                let engine = engine.clone();
                let query = query.to_vec();
                // Counted now, not when the task first runs: a burst within
                // one tick must meet the bound too.
                self.in_flight.set(self.in_flight.get() + 1);
                tokio::task::spawn_local(async move {
                    let _guard = InFlight(&self.in_flight);
                    let reply = self.forward(&query, &parsed, false).await;
                    let reply = self.fit(reply, limit);
                    engine.send_udp_to_guest(server, client, &reply);
                });
            }
        }
    }

    fn fit(&self, reply: Vec<u8>, limit: usize) -> Vec<u8> {
        if reply.len() <= limit {
            return reply;
        }
        self.count(|s| s.truncated += 1);
        message::fit_udp(reply, limit)
    }

    /// Forwards `query` to the upstreams in turn; the first usable answer
    /// wins, else SERVFAIL. `tcp`: the guest asked over TCP, so a truncated
    /// UDP answer is fetched again over TCP.
    async fn forward(&self, query: &[u8], parsed: &Message, tcp: bool) -> Vec<u8> {
        let upstreams = self.upstreams.borrow_mut().current(Instant::now());
        let mut fallback = None;
        for up in upstreams {
            let answer = match timeout(ATTEMPT_TIMEOUT, upstream::exchange_udp(up, query)).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    crate::limited_warn!(self.logs.borrow_mut(), Instant::now(), "dns-upstream-error", upstream = %up, error = %e, "DNS upstream failed");
                    continue;
                }
                Err(_) => {
                    crate::limited_warn!(self.logs.borrow_mut(), Instant::now(), "dns-upstream-timeout", upstream = %up, "DNS upstream did not answer in time");
                    continue;
                }
            };
            if tcp && message::is_truncated(&answer) {
                match timeout(2 * ATTEMPT_TIMEOUT, upstream::exchange_tcp(up, query)).await {
                    Ok(Ok(full)) if message::id_and_qr(&full).is_some() => return full,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::debug!(upstream = %up, error = %e, "DNS over TCP to upstream failed"),
                    Err(_) => tracing::debug!(upstream = %up, "DNS over TCP to upstream timed out"),
                }
                return answer;
            }
            // SERVFAIL (2) or REFUSED (5): another resolver may do better.
            if matches!(message::rcode(&answer), Some(2 | 5)) {
                fallback = Some(answer);
                continue;
            }
            return answer;
        }
        fallback.unwrap_or_else(|| {
            self.count(|s| s.upstream_failures += 1);
            message::servfail(parsed)
        })
    }

    /// Serves one guest TCP connection to port 53: 2-byte length-prefixed
    /// queries, answered in order, until the guest closes, sends garbage or
    /// stays idle for [`TCP_IDLE`].
    pub async fn serve_tcp<S: AsyncRead + AsyncWrite + Unpin>(self: Rc<Self>, mut stream: S) {
        if self.tcp_connections.get() >= MAX_TCP_CONNECTIONS {
            self.count(|s| s.overloaded += 1);
            crate::limited_warn!(
                self.logs.borrow_mut(),
                Instant::now(),
                "dns-tcp-overload",
                limit = MAX_TCP_CONNECTIONS,
                "too many DNS TCP connections: closing a new one"
            );
            let _ = stream.shutdown().await;
            return;
        }
        self.tcp_connections.set(self.tcp_connections.get() + 1);
        let _guard = InFlight(&self.tcp_connections);
        let mut query = Vec::new();
        loop {
            let mut len = [0u8; 2];
            match timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => break,
            }
            let n = u16::from_be_bytes(len) as usize;
            query.clear();
            query.resize(n, 0);
            match timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
                Ok(Ok(_)) => {}
                _ => break,
            }
            self.count(|s| s.tcp_queries += 1);
            let reply = match self.decide(&query) {
                Decision::Drop => break,
                Decision::Reply(r) => r,
                Decision::Forward(parsed) => {
                    self.in_flight.set(self.in_flight.get() + 1);
                    let _guard = InFlight(&self.in_flight);
                    self.forward(&query, &parsed, true).await
                }
            };
            let reply = message::fit_udp(reply, upstream::MAX_MESSAGE);
            let mut out = Vec::with_capacity(2 + reply.len());
            out.extend_from_slice(&(reply.len() as u16).to_be_bytes());
            out.extend_from_slice(&reply);
            match timeout(TCP_IDLE, stream.write_all(&out)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        let _ = stream.shutdown().await;
    }
}

/// Decrements a counter when dropped (also when a task is cancelled).
struct InFlight<'a>(&'a Cell<usize>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, TXT};
    use hickory_proto::rr::{Name, RData, RecordType};
    use std::net::Ipv4Addr;
    use std::str::FromStr;
    use tokio::net::{TcpListener, UdpSocket};

    fn cfg() -> NetConfig {
        NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap()
    }

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
        m.to_vec().unwrap()
    }

    /// A toy upstream on loopback: answers every query over UDP with TC set
    /// and over TCP with `records` TXT records.
    async fn toy_upstream(records: usize) -> SocketAddr {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let answer = move |q: &[u8], truncated: bool| {
            let q = Message::from_vec(q).unwrap();
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.add_queries(q.queries.iter().cloned());
            r.metadata.truncation = truncated;
            if !truncated {
                for i in 0..records {
                    let txt = TXT::new(vec!["y".repeat(250), format!("{i}")]);
                    r.add_answer(hickory_proto::rr::Record::from_rdata(
                        q.queries[0].name().clone(),
                        5,
                        RData::TXT(txt),
                    ));
                }
                r.add_answer(hickory_proto::rr::Record::from_rdata(
                    q.queries[0].name().clone(),
                    5,
                    RData::A(A(Ipv4Addr::new(10, 1, 2, 3))),
                ));
            }
            r.to_vec().unwrap()
        };
        tokio::task::spawn_local(async move {
            let mut buf = vec![0; 65535];
            loop {
                tokio::select! {
                    Ok((n, from)) = udp.recv_from(&mut buf) => {
                        let _ = udp.send_to(&answer(&buf[..n], true), from).await;
                    }
                    Ok((mut s, _)) = tcp.accept() => {
                        let mut len = [0; 2];
                        s.read_exact(&mut len).await.unwrap();
                        let mut q = vec![0; u16::from_be_bytes(len) as usize];
                        s.read_exact(&mut q).await.unwrap();
                        let a = answer(&q, false);
                        s.write_all(&(a.len() as u16).to_be_bytes()).await.unwrap();
                        s.write_all(&a).await.unwrap();
                    }
                }
            }
        });
        addr
    }

    async fn ask_tcp(server: Rc<DnsServer>, q: &[u8]) -> Message {
        let (mut ours, theirs) = tokio::io::duplex(1 << 17);
        tokio::task::spawn_local(server.serve_tcp(theirs));
        ours.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        ours.write_all(q).await.unwrap();
        let mut len = [0; 2];
        ours.read_exact(&mut len).await.unwrap();
        let mut a = vec![0; u16::from_be_bytes(len) as usize];
        ours.read_exact(&mut a).await.unwrap();
        Message::from_vec(&a).unwrap()
    }

    fn run_local(f: impl std::future::Future<Output = ()>) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f);
    }

    #[test]
    fn tcp_local_and_forwarded_with_tc_retry() {
        run_local(async {
            let up = toy_upstream(8).await;
            let server = Rc::new(DnsServer::new(&cfg(), vec![up]));
            let a = ask_tcp(server.clone(), &query("host.rancher-desktop.internal.", RecordType::A)).await;
            assert_eq!(a.answers[0].data, RData::A(A(Ipv4Addr::new(192, 168, 127, 254))));
            assert_eq!(a.edns.map(|e| e.max_payload()), Some(1232));
            // Upstream's UDP answer is truncated; over TCP we get it whole.
            let a = ask_tcp(server.clone(), &query("big.example.test.", RecordType::TXT)).await;
            assert_eq!(a.metadata.id, 0x4242);
            assert!(!a.metadata.truncation);
            assert_eq!(a.answers.len(), 9);
            assert_eq!(server.stats().tcp_queries, 2);
            assert_eq!(server.stats().local_answers, 1);
            assert_eq!(server.stats().forwarded, 1);
        });
    }

    #[test]
    fn dead_upstream_gives_servfail_fast() {
        run_local(async {
            // Bind and drop: nothing listens there any more.
            let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
            let server = Rc::new(DnsServer::new(&cfg(), vec![dead]));
            let started = std::time::Instant::now();
            let a = ask_tcp(server.clone(), &query("x.example.test.", RecordType::A)).await;
            assert_eq!(a.metadata.response_code, ResponseCode::ServFail);
            assert_eq!(a.metadata.id, 0x4242);
            // Refused at once, not after the 2-second attempt timeout.
            assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
            assert_eq!(server.stats().upstream_failures, 1);
        });
    }

    #[test]
    fn tcp_garbage_closes() {
        run_local(async {
            let server = Rc::new(DnsServer::new(&cfg(), vec![]));
            let (mut ours, theirs) = tokio::io::duplex(1024);
            let task = tokio::task::spawn_local(server.clone().serve_tcp(theirs));
            ours.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
            let mut rest = Vec::new();
            ours.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            task.await.unwrap();
            assert_eq!(server.stats().dropped, 1);
        });
    }

    #[test]
    fn zones_api() {
        let server = DnsServer::new(&cfg(), vec![]);
        assert_eq!(server.zones().len(), 2);
        server.add_zone(Zone { name: "docker.internal.".into(), records: vec![], default_ip: None });
        assert_eq!(server.zones().len(), 2);
        assert_eq!(server.zones()[1].records.len(), 2);
        server.add_zone(Zone { name: "extra.".into(), records: vec![], default_ip: None });
        assert_eq!(server.zones().len(), 3);
    }
}
