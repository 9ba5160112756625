//! The DNS server on the gateway (port 53, UDP and TCP).
//!
//! How this works: every message from a guest is decoded once
//! ([`message::classify`]). Names inside the local zones
//! (`rancher-desktop.internal.`, `docker.internal.` and whatever the API
//! adds) are answered at once, TTL 0. Everything else is forwarded. With
//! `--dns-upstream` it goes to those servers; otherwise it follows the host:
//! on Windows the host's own resolver API answers first ([`system`]:
//! `DnsQueryRaw`, else `DnsQuery_W` per question, so VPN split DNS, NRPT
//! rules and the hosts file apply), and what that cannot express goes to
//! the host's DNS servers ([`hostconf`]: resolv.conf on Unix, the adapters
//! on Windows, re-read off-thread every few seconds). Forwarding sends the
//! guest's bytes as they are (its ID, its EDNS record) over UDP to the
//! upstreams in the order [`upstream::Health`] gives (those that keep
//! failing last): the first at once, the next one when the last started has
//! not answered within [`STAGGER`] or has failed, each attempt bounded by
//! [`ATTEMPT_TIMEOUT`]; the first usable answer wins, SERVFAIL/REFUSED only
//! when nothing better comes, and when none answers the guest gets SERVFAIL
//! (within a few seconds, never silence). A truncated UDP answer is fetched
//! again over TCP when the guest itself asked over TCP. An answer bigger
//! than the guest's UDP limit (512 bytes, or its EDNS size, and at most one
//! datagram on the link) is cut to header + question with TC set, so the
//! guest retries over TCP. Each forwarded UDP query is one local task; at
//! most [`MAX_IN_FLIGHT`] run at once (beyond that: SERVFAIL). A TCP
//! connection carries any number of queries, answered in order, and closes
//! after [`TCP_IDLE`] without one.

pub mod hostconf;
pub mod message;
#[cfg(windows)]
mod sys;
pub mod system;
pub mod upstream;
pub mod zone;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::timeout;

use crate::config::NetConfig;
use crate::ratelimit::LogLimiter;
use crate::shell::Engine;
use hostconf::HostDnsConfig;
pub use message::Decision;
use system::{Path, Resolved, SystemResolver};
use upstream::Health;
pub use zone::{Record, Zone, ZoneError, ZoneTable};

pub const DNS_PORT: u16 = 53;
/// One attempt at one upstream resolver.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an upstream may take before the next one is asked as well.
pub const STAGGER: Duration = Duration::from_millis(500);
/// How long the host's resolver API may take for one query.
pub const SYSTEM_TIMEOUT: Duration = Duration::from_secs(5);
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
    /// Queries refused for lack of room ([`MAX_IN_FLIGHT`], TCP connections,
    /// busy resolver API).
    pub overloaded: u64,
    /// Answered by the host's resolver API from the guest's message
    /// (Windows: `DnsQueryRaw`).
    pub system_raw: u64,
    /// Answered by the host's resolver API per question (Windows:
    /// `DnsQuery_W`).
    pub system_per_type: u64,
    /// Queries the resolver API could not express, forwarded to the host's
    /// DNS servers instead.
    pub system_forwarded: u64,
    /// Forwarded answers that came from an upstream other than the first.
    pub upstream_failovers: u64,
}

/// Where forwarded queries go.
enum Resolution {
    /// `--dns-upstream`: these servers.
    Fixed(Vec<SocketAddr>),
    /// The host's settings, and its resolver API first when there is one.
    Host { config: watch::Receiver<Arc<HostDnsConfig>>, system: Option<SystemResolver> },
}

pub struct DnsServer {
    zones: RefCell<ZoneTable>,
    resolution: Resolution,
    health: RefCell<Health>,
    /// The largest DNS payload in one UDP datagram on the virtual link.
    link_udp_max: usize,
    stats: Cell<DnsStats>,
    in_flight: Cell<usize>,
    tcp_connections: Cell<usize>,
    logs: RefCell<LogLimiter>,
}

impl DnsServer {
    /// A server forwarding to `upstreams`, or when there are none to the
    /// host's resolver (read now and followed from then on).
    pub fn new(cfg: &NetConfig, upstreams: Vec<SocketAddr>) -> Self {
        if !upstreams.is_empty() {
            return Self::with(cfg, Resolution::Fixed(upstreams));
        }
        Self::with(cfg, Resolution::Host { config: hostconf::watch(), system: host_system_resolver() })
    }

    /// A server following the host's settings as `config` reports them,
    /// asking `system` first (tests pass their own).
    pub fn following_host(
        cfg: &NetConfig,
        config: watch::Receiver<Arc<HostDnsConfig>>,
        system: Option<SystemResolver>,
    ) -> Self {
        Self::with(cfg, Resolution::Host { config, system })
    }

    fn with(cfg: &NetConfig, resolution: Resolution) -> Self {
        DnsServer {
            zones: RefCell::new({
                let mut zones = ZoneTable::new(Zone::defaults(cfg.gateway_ip, cfg.host_ip));
                if let Some(v6) = &cfg.ipv6 {
                    zones.set_ipv6_twins(vec![(cfg.gateway_ip, v6.gateway), (cfg.host_ip, v6.host)]);
                }
                zones
            }),
            resolution,
            health: RefCell::new(Health::default()),
            link_udp_max: (cfg.mtu as usize)
                .saturating_sub(rdnet_wire::frame::IPV4_HEADER + rdnet_wire::frame::UDP_HEADER),
            stats: Cell::new(DnsStats::default()),
            in_flight: Cell::new(0),
            tcp_connections: Cell::new(0),
            logs: RefCell::new(LogLimiter::default()),
        }
    }

    /// The host's DNS settings as this server follows them (none with
    /// `--dns-upstream`).
    pub fn host_config(&self) -> Option<watch::Receiver<Arc<HostDnsConfig>>> {
        match &self.resolution {
            Resolution::Host { config, .. } => Some(config.clone()),
            Resolution::Fixed(_) => None,
        }
    }

    /// The local zones (for `/services/dns/all`).
    pub fn zones(&self) -> Vec<Zone> {
        self.zones.borrow().zones()
    }

    /// Adds or merges a zone (for `POST /services/dns/add`), as gvproxy
    /// does, within the table's bounds.
    pub fn add_zone(&self, zone: Zone) -> Result<(), zone::ZoneError> {
        self.zones.borrow_mut().merge(zone)
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
    pub fn serve_udp(self: Rc<Self>, engine: &Rc<Engine>, client: SocketAddr, server: SocketAddr, query: &[u8]) {
        self.count(|s| s.udp_queries += 1);
        match self.decide(query) {
            Decision::Drop => {}
            Decision::Reply(reply) => {
                // A local answer is small, but the guest's limit still rules.
                let limit = Message::from_vec(query)
                    .map_or(message::CLASSIC_UDP, |q| message::udp_limit(&q, self.link_udp_max(client)));
                let reply = self.fit(reply, limit);
                engine.send_udp_reply(server, client, &reply);
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
                    engine.send_udp_reply(server, client, &message::servfail(&parsed));
                    return;
                }
                let limit = message::udp_limit(&parsed, self.link_udp_max(client));
                let engine = engine.clone();
                let query = query.to_vec();
                // Counted now, not when the task first runs: a burst within
                // one tick must meet the bound too.
                self.in_flight.set(self.in_flight.get() + 1);
                tokio::task::spawn_local(async move {
                    let _guard = InFlight(&self.in_flight);
                    let reply = self.forward(&query, &parsed, false).await;
                    let reply = self.fit(reply, limit);
                    engine.send_udp_reply(server, client, &reply);
                });
            }
        }
    }

    /// The largest DNS message one frame to `client` carries: IPv6's
    /// header is 20 bytes longer than IPv4's.
    fn link_udp_max(&self, client: SocketAddr) -> usize {
        if client.is_ipv6() { self.link_udp_max.saturating_sub(20) } else { self.link_udp_max }
    }

    fn fit(&self, reply: Vec<u8>, limit: usize) -> Vec<u8> {
        if reply.len() <= limit {
            return reply;
        }
        self.count(|s| s.truncated += 1);
        message::fit_udp(reply, limit)
    }

    /// Answers a query the local zones do not: through the host's resolver
    /// API where there is one, else from the upstreams; SERVFAIL when
    /// nothing answers. `tcp`: the guest asked over TCP (an answer need not
    /// fit a datagram).
    async fn forward(&self, query: &[u8], parsed: &Message, tcp: bool) -> Vec<u8> {
        let servers = match &self.resolution {
            Resolution::Fixed(list) => list.clone(),
            Resolution::Host { config, system } => {
                if let Some(system) = system {
                    match timeout(SYSTEM_TIMEOUT, system.resolve(query, parsed, tcp)).await {
                        Ok(Resolved::Answer(answer, path)) => {
                            self.count(|s| match path {
                                Path::Raw => s.system_raw += 1,
                                Path::PerType => s.system_per_type += 1,
                            });
                            return answer;
                        }
                        Ok(Resolved::Forward) => self.count(|s| s.system_forwarded += 1),
                        Ok(Resolved::Busy) => {
                            self.count(|s| s.overloaded += 1);
                            crate::limited_warn!(
                                self.logs.borrow_mut(),
                                Instant::now(),
                                "dns-system-busy",
                                limit = system::MAX_OS_QUERIES,
                                "too many queries waiting for the host's resolver: answering SERVFAIL"
                            );
                            return message::servfail(parsed);
                        }
                        Err(_) => {
                            self.count(|s| s.upstream_failures += 1);
                            crate::limited_warn!(
                                self.logs.borrow_mut(),
                                Instant::now(),
                                "dns-system-timeout",
                                "the host's resolver did not answer in time: answering SERVFAIL"
                            );
                            return message::servfail(parsed);
                        }
                    }
                }
                // Cloned out at once: the borrow must not live across awaits.
                config.borrow().servers.clone()
            }
        };
        match self.exchange_any(&servers, query, tcp).await {
            Some(answer) => answer,
            None => {
                self.count(|s| s.upstream_failures += 1);
                message::servfail(parsed)
            }
        }
    }

    /// Sends `query` to `servers` in health order: the first at once, the
    /// next when the last one started has failed or has not answered within
    /// [`STAGGER`]. The first usable answer wins (fetched again over TCP
    /// when `tcp` and it came truncated); attempts still running that began
    /// earlier count as failures of their upstreams, being slower. A
    /// SERVFAIL or REFUSED answer is kept in case nothing better comes.
    /// `None` when no upstream answered at all.
    async fn exchange_any(&self, servers: &[SocketAddr], query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        type Attempt<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<u8>>> + 'a>>;
        let order = self.health.borrow_mut().order(servers, Instant::now());
        let start = |up: SocketAddr| -> Attempt<'_> {
            Box::pin(async move {
                match timeout(ATTEMPT_TIMEOUT, upstream::exchange_udp(up, query)).await {
                    Ok(r) => r,
                    Err(_) => Err(io::ErrorKind::TimedOut.into()),
                }
            })
        };
        // (index in `order`, the attempt)
        let mut running: Vec<(usize, Attempt<'_>)> = Vec::new();
        let mut next = 0;
        let mut fallback = None;
        let stagger = tokio::time::sleep(STAGGER);
        tokio::pin!(stagger);
        enum Event {
            Done(usize, io::Result<Vec<u8>>),
            Stagger,
        }
        loop {
            if running.is_empty() {
                let Some(up) = order.get(next) else { break };
                running.push((next, start(*up)));
                next += 1;
                stagger.as_mut().reset(tokio::time::Instant::now() + STAGGER);
            }
            let event = std::future::poll_fn(|cx| {
                for (i, (_, attempt)) in running.iter_mut().enumerate() {
                    if let Poll::Ready(r) = attempt.as_mut().poll(cx) {
                        return Poll::Ready(Event::Done(i, r));
                    }
                }
                if next < order.len() && stagger.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Stagger);
                }
                Poll::Pending
            })
            .await;
            let (index, result) = match event {
                Event::Stagger => {
                    running.push((next, start(order[next])));
                    next += 1;
                    stagger.as_mut().reset(tokio::time::Instant::now() + STAGGER);
                    continue;
                }
                Event::Done(i, result) => {
                    let (index, _) = running.swap_remove(i);
                    (index, result)
                }
            };
            let up = order[index];
            let answer = match result {
                Ok(answer) => answer,
                Err(e) => {
                    if e.kind() == io::ErrorKind::TimedOut {
                        crate::limited_warn!(self.logs.borrow_mut(), Instant::now(), "dns-upstream-timeout", upstream = %up, "DNS upstream did not answer in time");
                    } else {
                        crate::limited_warn!(self.logs.borrow_mut(), Instant::now(), "dns-upstream-error", upstream = %up, error = %e, "DNS upstream failed");
                    }
                    self.upstream_failed(up);
                    // Whoever is next need not wait for the stagger.
                    if let Some(up) = order.get(next) {
                        running.push((next, start(*up)));
                        next += 1;
                        stagger.as_mut().reset(tokio::time::Instant::now() + STAGGER);
                    }
                    continue;
                }
            };
            // SERVFAIL (2) or REFUSED (5): another resolver may do better.
            if matches!(message::rcode(&answer), Some(2 | 5)) {
                fallback = Some(answer);
                if let Some(up) = order.get(next) {
                    running.push((next, start(*up)));
                    next += 1;
                    stagger.as_mut().reset(tokio::time::Instant::now() + STAGGER);
                }
                continue;
            }
            self.health.borrow_mut().success(up);
            for (slower, _) in &running {
                if *slower < index {
                    self.upstream_failed(order[*slower]);
                }
            }
            if index > 0 {
                self.count(|s| s.upstream_failovers += 1);
            }
            if tcp && message::is_truncated(&answer) {
                match timeout(2 * ATTEMPT_TIMEOUT, upstream::exchange_tcp(up, query)).await {
                    Ok(Ok(full)) if message::id_and_qr(&full).is_some() => return Some(full),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::debug!(upstream = %up, error = %e, "DNS over TCP to upstream failed"),
                    Err(_) => tracing::debug!(upstream = %up, "DNS over TCP to upstream timed out"),
                }
            }
            return Some(answer);
        }
        fallback
    }

    /// Counts a failure of `up`, saying so when it becomes skipped.
    fn upstream_failed(&self, up: SocketAddr) {
        if self.health.borrow_mut().failure(up, Instant::now()) {
            crate::limited_warn!(
                self.logs.borrow_mut(),
                Instant::now(),
                "dns-upstream-skipped",
                upstream = %up,
                secs = upstream::SKIP_FOR.as_secs(),
                "DNS upstream keeps failing: asking it last for a while"
            );
        }
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

/// The host's resolver API, where the OS has one.
fn host_system_resolver() -> Option<SystemResolver> {
    #[cfg(windows)]
    {
        let resolver = sys::system_resolver();
        let api = if resolver.has_raw() { "DnsQueryRaw" } else { "DnsQuery_W per question" };
        tracing::info!(api, "DNS without --dns-upstream goes through the Windows resolver");
        Some(resolver)
    }
    #[cfg(not(windows))]
    {
        None
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
        server.add_zone(Zone { name: "docker.internal.".into(), records: vec![], default_ip: None }).unwrap();
        assert_eq!(server.zones().len(), 2);
        assert_eq!(server.zones()[1].records.len(), 2);
        server.add_zone(Zone { name: "extra.".into(), records: vec![], default_ip: None }).unwrap();
        assert_eq!(server.zones().len(), 3);
    }

    /// A toy upstream on loopback that answers every UDP query with
    /// `rcode` and one A record (10.0.0.`tag`), so a test sees who answered.
    async fn answering_upstream(rcode: ResponseCode, tag: u8) -> SocketAddr {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        tokio::task::spawn_local(async move {
            let mut buf = vec![0; 65535];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
                let mut r = Message::response(q.metadata.id, OpCode::Query);
                r.add_queries(q.queries.iter().cloned());
                r.metadata.response_code = rcode;
                if rcode == ResponseCode::NoError {
                    r.add_answer(hickory_proto::rr::Record::from_rdata(
                        q.queries[0].name().clone(),
                        5,
                        RData::A(A(Ipv4Addr::new(10, 0, 0, tag))),
                    ));
                }
                let _ = udp.send_to(&r.to_vec().unwrap(), from).await;
            }
        });
        addr
    }

    /// A UDP socket that takes queries and never answers, for as long as
    /// the returned socket lives.
    fn silent_upstream() -> (std::net::UdpSocket, SocketAddr) {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        (s, addr)
    }

    async fn forwarded(server: &DnsServer, name: &str) -> Message {
        let q = query(name, RecordType::A);
        let parsed = Message::from_vec(&q).unwrap();
        Message::from_vec(&server.forward(&q, &parsed, false).await).unwrap()
    }

    fn answered_by(m: &Message) -> Option<u8> {
        match m.answers.first().map(|a| &a.data) {
            Some(RData::A(a)) => Some(a.0.octets()[3]),
            _ => None,
        }
    }

    #[test]
    fn silent_upstream_is_passed_over_and_then_skipped() {
        run_local(async {
            let (_silent, dead) = silent_upstream();
            let good = answering_upstream(ResponseCode::NoError, 2).await;
            let server = DnsServer::new(&cfg(), vec![dead, good]);
            // The first queries wait a stagger for the silent one, then the
            // next answers: never SERVFAIL.
            for i in 0..upstream::FAILURES_TO_SKIP {
                let started = std::time::Instant::now();
                let a = forwarded(&server, &format!("q{i}.example.test.")).await;
                assert_eq!((a.metadata.response_code, answered_by(&a)), (ResponseCode::NoError, Some(2)));
                assert!(started.elapsed() < ATTEMPT_TIMEOUT, "took {:?}", started.elapsed());
            }
            assert_eq!(server.stats().upstream_failovers, u64::from(upstream::FAILURES_TO_SKIP));
            // Now it keeps failing: skipped, the good one is asked first.
            assert!(server.health.borrow().is_skipped(&dead, Instant::now()));
            for i in 0..5 {
                let started = std::time::Instant::now();
                let a = forwarded(&server, &format!("r{i}.example.test.")).await;
                assert_eq!(answered_by(&a), Some(2));
                assert!(started.elapsed() < STAGGER, "took {:?}", started.elapsed());
            }
            assert_eq!(server.stats().upstream_failovers, u64::from(upstream::FAILURES_TO_SKIP));
            assert_eq!(server.stats().upstream_failures, 0);
        });
    }

    #[test]
    fn servfail_and_refused_upstreams_yield_to_a_real_answer() {
        run_local(async {
            let bad = answering_upstream(ResponseCode::ServFail, 1).await;
            let refusing = answering_upstream(ResponseCode::Refused, 3).await;
            let good = answering_upstream(ResponseCode::NoError, 2).await;
            let server = DnsServer::new(&cfg(), vec![bad, refusing, good]);
            let a = forwarded(&server, "x.example.test.").await;
            assert_eq!((a.metadata.response_code, answered_by(&a)), (ResponseCode::NoError, Some(2)));
            // Only SERVFAIL anywhere: the upstream's SERVFAIL, not silence.
            let server = DnsServer::new(&cfg(), vec![bad]);
            let a = forwarded(&server, "x.example.test.").await;
            assert_eq!(a.metadata.response_code, ResponseCode::ServFail);
            assert_eq!(a.metadata.id, 0x4242);
        });
    }

    #[test]
    fn host_settings_are_followed_without_a_restart() {
        run_local(async {
            let first = answering_upstream(ResponseCode::NoError, 1).await;
            let second = answering_upstream(ResponseCode::NoError, 2).await;
            let (tx, rx) = watch::channel(Arc::new(HostDnsConfig { servers: vec![first], search: vec![] }));
            let server = DnsServer::following_host(&cfg(), rx, None);
            assert_eq!(answered_by(&forwarded(&server, "a.example.test.").await), Some(1));
            // A VPN connects: the next query goes where the host now sends it.
            tx.send(Arc::new(HostDnsConfig { servers: vec![second], search: vec![] })).unwrap();
            assert_eq!(answered_by(&forwarded(&server, "a.example.test.").await), Some(2));
            // No servers at all: SERVFAIL, at once.
            tx.send(Arc::new(HostDnsConfig::default())).unwrap();
            let a = forwarded(&server, "a.example.test.").await;
            assert_eq!(a.metadata.response_code, ResponseCode::ServFail);
            assert_eq!(server.stats().upstream_failures, 1);
        });
    }

    /// The per-type API, mocked: `known.test` has an A record; everything
    /// else "no such name", as Wine says it.
    struct OsMock;

    impl system::PerTypeApi for OsMock {
        fn query(&self, name: &str, qtype: u16) -> system::OsAnswer {
            match (name, qtype) {
                ("known.test", 1) => system::OsAnswer::Records(vec![system::OsRecord {
                    name: name.into(),
                    section: system::Section::Answer,
                    ttl: 77,
                    data: system::OsData::A(Ipv4Addr::new(10, 7, 7, 7)),
                }]),
                _ => system::OsAnswer::NameError,
            }
        }
    }

    #[test]
    fn the_host_resolver_api_answers_first() {
        run_local(async {
            let fallback = answering_upstream(ResponseCode::NoError, 9).await;
            let (_tx, rx) = watch::channel(Arc::new(HostDnsConfig { servers: vec![fallback], search: vec![] }));
            let system = SystemResolver::new(None, Arc::new(OsMock));
            let server = Rc::new(DnsServer::following_host(&cfg(), rx, Some(system)));
            let a = forwarded(&server, "known.test.").await;
            assert_eq!((answered_by(&a), a.answers[0].ttl), (Some(7), 77));
            let q = query("known.test.", RecordType::AAAA);
            let parsed = Message::from_vec(&q).unwrap();
            let a = Message::from_vec(&server.forward(&q, &parsed, false).await).unwrap();
            assert_eq!((a.metadata.response_code, a.answers.len()), (ResponseCode::NoError, 0));
            let a = forwarded(&server, "missing.test.").await;
            assert_eq!(a.metadata.response_code, ResponseCode::NXDomain);
            // Over TCP too.
            let a = ask_tcp(server.clone(), &query("known.test.", RecordType::A)).await;
            assert_eq!(answered_by(&a), Some(7));
            assert_eq!(server.stats().system_per_type, 4);
            // What the API cannot express goes to the host's DNS servers.
            let any = query("known.test.", RecordType::ANY);
            let parsed = Message::from_vec(&any).unwrap();
            let a = Message::from_vec(&server.forward(&any, &parsed, false).await).unwrap();
            assert_eq!(answered_by(&a), Some(9));
            assert_eq!(server.stats().system_forwarded, 1);
        });
    }
}
