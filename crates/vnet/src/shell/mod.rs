//! The I/O shell around [`Network`]: VM connections in, frames out.
//!
//! How this works: everything on the packet path runs on one thread (a
//! current-thread tokio runtime with a `LocalSet`), so the network is shared
//! through `Rc<RefCell<…>>` without locks or cross-thread wake-ups. Each VM
//! connection is a port with a reader task and a writer task. The reader
//! decodes every frame one `read` delivered and hands each to the network;
//! frames the network emits are encoded (length prefix and all) straight
//! into the destination port's pending buffer, and that port's writer is
//! woken once; it writes whatever accumulated in one `write`, so a burst
//! costs one syscall per port rather than one per frame. A framing error or
//! I/O error ends only that connection (with a logged reason); its MAC
//! entries leave with its port.

pub mod capture;
pub mod icmp;
pub mod tcp;
#[cfg(all(test, unix))]
mod tcp_tests;
#[cfg(all(test, unix))]
pub(crate) mod test_vm;
pub mod udp;

use std::cell::RefCell;
use std::net::{SocketAddr, SocketAddrV4};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rdnet_link::handshake::DataLinks;
use rdnet_link::http_connect::{Opening, OpeningError, Prefixed, read_opening};
use rdnet_link::{Decoder, FrameError, FrameReader, Framing, LinkError, LinkStream, encode_frame};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use smoltcp::wire::{IpProtocol, Ipv4Repr};

use crate::gateway::dns::DnsServer;
use crate::gateway::{FrameSink, Network, Upcall};
use crate::nat::NatPolicy;
use crate::ratelimit::LogLimiter;
use crate::shell::capture::Capture;
use crate::shell::tcp::TcpNat;
use crate::switch::PortId;
use icmp::IcmpNat;
use udp::UdpNat;

/// Settings of the I/O shell (the network's own live in `NetConfig`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub framing: Framing,
    pub allow_link_local: bool,
    /// Upstream resolvers; empty means the host's own configuration.
    pub dns_upstreams: Vec<SocketAddr>,
    /// DHCP hands out the host's DNS search list as it is at the time
    /// (re-read every few seconds) rather than `NetConfig::search_domains`.
    pub follow_host_search: bool,
    pub max_udp_flows: usize,
    pub udp_idle_timeout: Duration,
    pub max_tcp_flows: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            framing: Framing::U16Le,
            allow_link_local: false,
            dns_upstreams: Vec::new(),
            follow_host_search: false,
            max_udp_flows: 4096,
            udp_idle_timeout: Duration::from_secs(90),
            max_tcp_flows: 32768,
        }
    }
}

/// A port whose peer stops reading may queue at most this much; beyond it,
/// frames for that port are dropped rather than growing memory without end.
pub const MAX_PENDING_PER_PORT: usize = 16 * 1024 * 1024;

struct PortTx {
    /// Frames waiting for the writer, each with its length prefix, are
    /// `pending[..used]`; the rest is scratch kept from earlier batches so
    /// a frame built in place (`Engine::build_frame_to_guest`) does not
    /// zero memory first.
    pending: Vec<u8>,
    used: usize,
    /// Stream ports use the configured framing; datagram ports a u32
    /// prefix the writer strips again.
    framing: Framing,
    notify: Rc<Notify>,
    closed: bool,
}

impl PortTx {
    fn new(framing: Framing, notify: Rc<Notify>) -> Self {
        PortTx { pending: Vec::with_capacity(64 * 1024), used: 0, framing, notify, closed: false }
    }
}

struct Ports {
    map: crate::FastMap<PortId, PortTx>,
    capture: Option<Capture>,
    overflow_drops: u64,
}

impl FrameSink for Ports {
    fn send(&mut self, port: PortId, frame: &[u8]) {
        if let Some(c) = self.capture.as_mut() {
            c.record(frame);
        }
        let Some(tx) = self.map.get_mut(&port) else { return };
        if tx.closed || tx.used + frame.len() > MAX_PENDING_PER_PORT {
            self.overflow_drops += 1;
            return;
        }
        let was_empty = tx.used == 0;
        tx.pending.truncate(tx.used);
        let ok = encode_frame(tx.framing, frame, &mut tx.pending).is_ok();
        tx.used = tx.pending.len();
        if ok && was_empty {
            tx.notify.notify_one();
        }
    }
}

impl Ports {
    /// Reserves room for a `frame_len`-byte frame at the end of `port`'s
    /// queue and returns it, or `None` if the port is gone, closed or full.
    /// The frame is queued by [`commit`](Self::commit).
    fn reserve(&mut self, port: PortId, frame_len: usize) -> Option<&mut [u8]> {
        let tx = self.map.get_mut(&port)?;
        if tx.closed || tx.used + frame_len > MAX_PENDING_PER_PORT {
            return None;
        }
        let mut prefix = Vec::with_capacity(4);
        tx.framing.put_prefix(frame_len, &mut prefix).ok()?;
        let start = tx.used + prefix.len();
        if tx.pending.len() < start + frame_len {
            tx.pending.resize(start + frame_len, 0);
        }
        tx.pending[tx.used..start].copy_from_slice(&prefix);
        Some(&mut tx.pending[start..start + frame_len])
    }

    /// Queues the frame last reserved on `port`.
    fn commit(&mut self, port: PortId, frame_len: usize) {
        let Some(tx) = self.map.get_mut(&port) else { return };
        let was_empty = tx.used == 0;
        let start = tx.used + tx.framing.prefix_len();
        tx.used = start + frame_len;
        if let Some(c) = self.capture.as_mut() {
            c.record(&tx.pending[start..tx.used]);
        }
        if was_empty {
            tx.notify.notify_one();
        }
    }
}

/// The shared state of one host-switch.
pub struct Engine {
    pub net: RefCell<Network>,
    ports: RefCell<Ports>,
    pub config: EngineConfig,
    pub nat: NatPolicy,
    pub udp: RefCell<UdpNat>,
    pub icmp: RefCell<IcmpNat>,
    pub dns: Rc<DnsServer>,
    pub tcp: RefCell<TcpNat>,
    /// Rate limits for logs a guest can trigger from the shell's modules.
    pub logs: RefCell<LogLimiter>,
    /// Port forwards from the host into the guests (and the API's table).
    pub forwarder: crate::forward::Forwarder,
    /// Whether the router advertisement timer runs.
    ra_timer: std::cell::Cell<bool>,
    /// While a frame is handled: more frames from the same link read
    /// follow it (see `nat::tcp::Arrival::more_follow`).
    more_follow: std::cell::Cell<bool>,
}

impl Engine {
    pub fn new(mut net: Network, config: EngineConfig) -> Rc<Self> {
        let nat = NatPolicy::new(&net.cfg, config.allow_link_local);
        let dns = Rc::new(DnsServer::new(&net.cfg, config.dns_upstreams.clone()));
        if config.follow_host_search {
            // The DNS server's view of the host's settings when it follows
            // them; otherwise one of DHCP's own.
            let host = dns.host_config().unwrap_or_else(crate::gateway::dns::hostconf::watch);
            net.dhcp.follow_search(host);
        }
        let mut tcp = TcpNat::new(crate::nat::tcp::TcpCore::new(
            tokio::time::Instant::now().into_std(),
            net.cfg.gateway_ip,
            net.cfg.subnet.prefix_len(),
            net.cfg.ipv6.as_ref().map(|v6| (v6.gateway, v6.prefix.prefix_len())),
            net.cfg.mtu.into(),
            config.max_tcp_flows,
        ));
        let dns_tcp = dns.clone();
        tcp.register_service(
            crate::gateway::dns::DNS_PORT,
            Rc::new(move |stream, _peer| {
                tokio::task::spawn_local(dns_tcp.clone().serve_tcp(stream));
            }),
        );
        Rc::new(Engine {
            tcp: RefCell::new(tcp),
            logs: RefCell::new(LogLimiter::default()),
            forwarder: crate::forward::Forwarder::default(),
            ports: RefCell::new(Ports { map: Default::default(), capture: None, overflow_drops: 0 }),
            udp: RefCell::new(UdpNat::new(config.max_udp_flows, config.udp_idle_timeout, usize::from(net.cfg.mtu))),
            icmp: RefCell::new(IcmpNat::new()),
            dns,
            nat,
            net: RefCell::new(net),
            config,
            ra_timer: std::cell::Cell::new(false),
            more_follow: std::cell::Cell::new(false),
        })
    }

    pub fn max_frame(&self) -> usize {
        self.net.borrow().cfg.max_frame()
    }

    /// The largest frame a stream link may carry: above the MTU for VMs
    /// that negotiated segmentation offload (`rdnet_wire::offload`); taking
    /// them from any VM costs nothing and keeps the framing in sync.
    fn max_link_frame(&self) -> usize {
        self.max_frame().max(rdnet_wire::offload::MAX_LARGE_FRAME)
    }

    /// Frames dropped because a port's peer did not keep up.
    pub fn overflow_drops(&self) -> u64 {
        self.ports.borrow().overflow_drops
    }

    /// Frames the pcap capture left out because the disk did not keep up.
    pub fn capture_drops(&self) -> u64 {
        self.ports.borrow().capture.as_ref().map_or(0, Capture::dropped_frames)
    }

    /// Number of VM connections being served.
    pub fn port_count(&self) -> usize {
        self.ports.borrow().map.len()
    }

    /// Records every frame received and sent to a pcap file from now on.
    /// Must run inside a `LocalSet`: a tick hands what was recorded to the
    /// capture's writer once a second, so the file is current while quiet.
    pub fn start_capture(self: &Rc<Self>, capture: Capture) {
        self.ports.borrow_mut().capture = Some(capture);
        let weak = Rc::downgrade(self);
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(crate::shell::capture::HANDOFF_AFTER);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(engine) = weak.upgrade() else { return };
                let mut ports = engine.ports.borrow_mut();
                match ports.capture.as_mut() {
                    Some(c) if c.is_running() => c.hand_off_if_due(),
                    _ => return,
                }
            }
        });
    }

    /// Feeds one frame from `port` into the network.
    pub fn handle_frame(self: &Rc<Self>, port: PortId, frame: &[u8]) {
        let now = Instant::now();
        let upcall = {
            let mut net = self.net.borrow_mut();
            let mut ports = self.ports.borrow_mut();
            if let Some(c) = ports.capture.as_mut() {
                c.record(frame);
            }
            net.handle_frame(port, frame, now, &mut *ports)
        };
        match upcall {
            Upcall::Ipv4 { header, packet, .. } => self.route_ipv4(port, &header, packet, now),
            Upcall::Ipv6 { header, packet, .. } => self.route_ipv6(port, &header, packet, now),
            Upcall::None => {}
        }
    }

    /// IPv6 the gateway must route: its DNS server, replies to UDP port
    /// forwards, the TCP, UDP and echo NATs; anything else is answered with ICMPv6 "no route" at once, so
    /// the guest fails fast.
    fn route_ipv6(self: &Rc<Self>, port: PortId, header: &smoltcp::wire::Ipv6Repr, packet: &[u8], now: Instant) {
        let gateway6 = self.net.borrow().cfg.ipv6.as_ref().map(|v6| v6.gateway);
        if header.next_header == IpProtocol::Tcp {
            let large = self.net.borrow().takes_large_frames(port);
            tcp::handle_guest_packet(self, port, packet, large);
            return;
        }
        if header.next_header == IpProtocol::Udp {
            let Some(udp) = packet
                .get(40..)
                .and_then(|body| smoltcp::wire::UdpPacket::new_checked(body).ok())
                .filter(|udp| udp.verify_checksum(&header.src_addr.into(), &header.dst_addr.into()))
            else {
                self.net.borrow_mut().stats.drops.malformed += 1;
                return;
            };
            let src = SocketAddr::from((header.src_addr, udp.src_port()));
            let dst = SocketAddr::from((header.dst_addr, udp.dst_port()));
            if Some(header.dst_addr) == gateway6 {
                if udp.dst_port() == crate::gateway::dns::DNS_PORT {
                    self.dns.clone().serve_udp(self, src, dst, udp.payload());
                } else if !crate::forward::udp_from_guest(self, src, dst, udp.payload()) {
                    // Not a reply to a UDP port forward either.
                    self.net.borrow_mut().stats.drops.not_for_us += 1;
                }
                return;
            }
            if UdpNat::send(self, src, dst, udp.payload(), now) {
                return;
            }
        }
        if header.next_header == IpProtocol::Icmpv6
            && IcmpNat::handle(self, (header.src_addr.into(), header.dst_addr.into()), packet, now)
        {
            return;
        }
        let mut net = self.net.borrow_mut();
        let mut ports = self.ports.borrow_mut();
        net.unreachable6(header, packet, now, &mut *ports);
    }

    /// Answers a guest's IPv6 packet with ICMPv6 "no route" from the gateway.
    pub fn no_route6(&self, packet: &[u8]) {
        let Ok(ip) = smoltcp::wire::Ipv6Packet::new_checked(packet) else { return };
        let Ok(header) = smoltcp::wire::Ipv6Repr::parse(&ip) else { return };
        let mut net = self.net.borrow_mut();
        let mut ports = self.ports.borrow_mut();
        net.unreachable6(&header, packet, Instant::now(), &mut *ports);
    }

    /// Sends a complete IP packet of either version to the guest owning its
    /// destination (ICMP errors the NAT builds).
    pub fn send_ip_to_guest(&self, packet: &[u8]) -> bool {
        match packet.first().map(|b| b >> 4) {
            Some(4) => self.send_ipv4_to_guest(packet),
            Some(6) => {
                let mut net = self.net.borrow_mut();
                let mut ports = self.ports.borrow_mut();
                net.send_ipv6_to_guest(packet, Instant::now(), &mut *ports)
            }
            _ => false,
        }
    }

    /// Sends a UDP datagram from the gateway to a guest, either family
    /// (DNS answers, UDP port forwards).
    pub fn send_udp_reply(&self, src: std::net::SocketAddr, dst: std::net::SocketAddr, payload: &[u8]) -> bool {
        use std::net::SocketAddr::{V4, V6};
        match (src, dst) {
            (V4(src), V4(dst)) => self.send_udp_to_guest(src, dst, payload),
            (V6(src), V6(dst)) => {
                let mut net = self.net.borrow_mut();
                let mut ports = self.ports.borrow_mut();
                net.send_udp6_to_guest(src, dst, payload, Instant::now(), &mut *ports)
            }
            _ => false,
        }
    }

    /// Sends the periodic router advertisement from now on (once per
    /// engine, from the first VM connection: it needs a `LocalSet`).
    fn start_router_adverts(self: &Rc<Self>) {
        if self.ra_timer.replace(true) || self.net.borrow().cfg.ipv6.is_none() {
            return;
        }
        let weak = Rc::downgrade(self);
        tokio::task::spawn_local(async move {
            loop {
                let next = {
                    let Some(engine) = weak.upgrade() else { return };
                    let mut net = engine.net.borrow_mut();
                    let mut ports = engine.ports.borrow_mut();
                    net.poll_ipv6(Instant::now(), &mut *ports)
                };
                let Some(next) = next else { return };
                tokio::time::sleep_until(next.into()).await;
            }
        });
    }

    /// IPv4 the gateway must route: its own services or the NAT.
    fn route_ipv4(self: &Rc<Self>, port: PortId, header: &Ipv4Repr, packet: &[u8], now: Instant) {
        let gateway = self.net.borrow().cfg.gateway_ip;
        match header.next_header {
            IpProtocol::Udp => {
                let Some((src, dst, payload)) = rdnet_wire::frame::parse_udp_ip(packet) else {
                    self.net.borrow_mut().stats.drops.malformed += 1;
                    return;
                };
                if *dst.ip() == gateway {
                    if dst.port() == crate::gateway::dns::DNS_PORT {
                        self.dns.clone().serve_udp(self, src.into(), dst.into(), payload);
                    } else if !crate::forward::udp_from_guest(self, src.into(), dst.into(), payload) {
                        // Not a reply to a UDP port forward either.
                        self.net.borrow_mut().stats.drops.not_for_us += 1;
                    }
                    return;
                }
                UdpNat::send(self, src.into(), dst.into(), payload, now);
            }
            IpProtocol::Icmp => {
                IcmpNat::handle(self, (header.src_addr.into(), header.dst_addr.into()), packet, now);
            }
            IpProtocol::Tcp => {
                let large = self.net.borrow().takes_large_frames(port);
                tcp::handle_guest_packet(self, port, packet, large)
            }
            _ => self.net.borrow_mut().stats.drops.unsupported_protocol += 1,
        }
    }

    /// Sends a UDP datagram to a guest (NAT replies, DNS answers).
    pub fn send_udp_to_guest(&self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> bool {
        let mut net = self.net.borrow_mut();
        let mut ports = self.ports.borrow_mut();
        net.send_udp_to_guest(src, dst, payload, Instant::now(), &mut *ports)
    }

    /// Sends an IPv4 packet placed after 14 bytes of headroom in `frame`.
    pub fn send_ipv4_frame_to_guest(&self, frame: &mut [u8]) -> bool {
        let mut net = self.net.borrow_mut();
        let mut ports = self.ports.borrow_mut();
        net.send_ipv4_frame_to_guest(frame, Instant::now(), &mut *ports)
    }

    /// Bytes queued for the guest at `dst`, not yet written to its link.
    pub fn port_backlog(&self, dst: std::net::IpAddr) -> usize {
        let Some((port, _)) = self.net.borrow().port_for_guest(dst, 0) else { return 0 };
        self.ports.borrow().map.get(&port).map_or(0, |tx| tx.used)
    }

    /// Sends an IP packet of either version placed after 14 bytes of
    /// headroom in `frame`.
    pub fn send_ip_frame_to_guest(&self, frame: &mut [u8]) -> bool {
        let mut net = self.net.borrow_mut();
        let mut ports = self.ports.borrow_mut();
        net.send_ip_frame_to_guest(frame, Instant::now(), &mut *ports)
    }

    /// Builds an IP packet of `len` bytes for the guest at `dst` straight
    /// into its port's queue: `fill` gets the packet's bytes (after the
    /// Ethernet header this writes). Saves the copy of a 64 KiB segment
    /// from a buffer of its own. When that cannot be done (destination
    /// unknown, frame too big for the port, port full) `fill` comes back
    /// unused, for the general path, which deals with those cases. With
    /// `fill`'s result comes what the port has queued now (see
    /// [`Engine::port_backlog`]).
    pub fn build_frame_to_guest<R, F: FnOnce(&mut [u8]) -> R>(
        &self,
        dst: std::net::IpAddr,
        len: usize,
        fill: F,
    ) -> Result<(R, usize), F> {
        let mut net = self.net.borrow_mut();
        let frame_len = rdnet_wire::frame::ETH_HEADER + len;
        let Some((port, mac)) = net.port_for_guest(dst, frame_len) else { return Err(fill) };
        let gateway_mac = net.cfg.gateway_mac;
        let mut ports = self.ports.borrow_mut();
        let Some(buf) = ports.reserve(port, frame_len) else { return Err(fill) };
        let mut eth = smoltcp::wire::EthernetFrame::new_unchecked(&mut *buf);
        eth.set_dst_addr(mac);
        eth.set_src_addr(gateway_mac);
        eth.set_ethertype(match dst {
            std::net::IpAddr::V4(_) => smoltcp::wire::EthernetProtocol::Ipv4,
            std::net::IpAddr::V6(_) => smoltcp::wire::EthernetProtocol::Ipv6,
        });
        let r = fill(&mut buf[rdnet_wire::frame::ETH_HEADER..]);
        ports.commit(port, frame_len);
        net.stats.frames_out += 1;
        net.stats.bytes_out += frame_len as u64;
        Ok((r, ports.map.get(&port).map_or(0, |tx| tx.used)))
    }

    /// Sends a complete IPv4 packet to the guest owning its destination.
    pub fn send_ipv4_to_guest(&self, packet: &[u8]) -> bool {
        let mut net = self.net.borrow_mut();
        let mut ports = self.ports.borrow_mut();
        net.send_ipv4_to_guest(packet, Instant::now(), &mut *ports)
    }

    /// Serves one connection on a VM listener until it ends. Must run inside
    /// a `LocalSet`. Its first bytes say what it is
    /// (`rdnet_link::http_connect`): frames (our vm-switch, the Go one), a
    /// gvproxy-style `POST /connect` followed by frames (gvisor-tap-vsock's
    /// guest forwarder), or another HTTP request, which the API answers. A
    /// frame link is counted in `links` (the handshake's data connections)
    /// while it is served; a probe that closes before sending anything is
    /// logged at debug only.
    pub async fn serve(self: Rc<Self>, stream: LinkStream, peer: String, links: Option<DataLinks>) {
        let mut stream = match stream.quiet() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot take over the VM connection");
                return;
            }
        };
        let (opening, prefix) = match read_opening(&mut stream).await {
            Ok(o) => o,
            Err(OpeningError::Closed) => {
                tracing::debug!(%peer, "connection closed before sending anything (a probe)");
                return;
            }
            Err(e) => {
                self.net.borrow_mut().stats.drops.link_errors += 1;
                crate::limited_warn!(self.logs.borrow_mut(), Instant::now(), "link-opening",
                    %peer, "closing a connection on the VM listener: {}", rdnet_link_error_chain(&e));
                return;
            }
        };
        let stream = Prefixed::new(prefix, stream);
        let how = match opening {
            Opening::Frames => "raw frames",
            Opening::Connect => "POST /connect",
            Opening::Http { method, path } => {
                tracing::debug!(%peer, "HTTP {method} {path} on the VM listener: serving the API");
                crate::api::serve_connection(self, stream, crate::api::Peer::from_link_peer(&peer)).await;
                return;
            }
        };
        let _counted = links.as_ref().map(DataLinks::connected);
        self.serve_frames(stream, peer, how).await;
    }

    async fn serve_frames<S>(self: Rc<Self>, stream: S, peer: String, how: &str)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    {
        let port = self.net.borrow_mut().add_port();
        self.start_router_adverts();
        let notify = Rc::new(Notify::new());
        self.ports.borrow_mut().map.insert(port, PortTx::new(self.config.framing, notify.clone()));
        tracing::info!(port, %peer, "VM connected ({how})");
        let (read_half, mut write_half) = tokio::io::split(stream);

        let writer = {
            let engine = self.clone();
            tokio::task::spawn_local(async move {
                let mut spare = Vec::with_capacity(64 * 1024);
                loop {
                    let (closed, used) = {
                        let mut ports = engine.ports.borrow_mut();
                        let Some(tx) = ports.map.get_mut(&port) else { break };
                        std::mem::swap(&mut tx.pending, &mut spare);
                        (tx.closed, std::mem::take(&mut tx.used))
                    };
                    if used > 0 {
                        // The queue is empty again: flows that stopped for it
                        // fill it while this batch is written.
                        tcp::wake_throttled(&engine);
                        if let Err(e) = write_half.write_all(&spare[..used]).await {
                            tracing::warn!(port, error = %e, "writing to VM failed");
                            break;
                        }
                        // Large bursts leave a large buffer; give it back.
                        if spare.capacity() > 4 * 1024 * 1024 {
                            spare = Vec::with_capacity(64 * 1024);
                        }
                        continue;
                    }
                    if closed {
                        break;
                    }
                    // Done for now: a quiet link stops watching for room.
                    if write_half.flush().await.is_err() {
                        break;
                    }
                    notify.notified().await;
                }
                let _ = write_half.shutdown().await;
            })
        };

        // The link carries frames of at most MTU + 14 bytes until the VM's
        // offload hello was answered (rdnet_wire::offload), 65535 after.
        let mut reader = FrameReader::new(read_half, Decoder::new(self.config.framing, self.max_frame()));
        reader.reserve_for(self.max_link_frame());
        let mut large = false;
        let (mut frames, mut bytes) = (0u32, 0usize);
        let result = loop {
            // Buffered frames come without awaiting I/O; yield now and then
            // so other tasks run during a burst: other VM connections,
            // aborted flow tasks, whose sockets close only once dropped
            // (20 000 UDP flows in a burst held 6 000 fds above the bound),
            // and the flows that pass the data on (64 large frames would
            // fill their buffers before they got to drain any).
            if frames >= 64 || bytes >= 256 * 1024 {
                (frames, bytes) = (0, 0);
                UdpNat::flush(&self);
                tokio::task::yield_now().await;
            }
            match reader.next_frame_in_batch().await {
                Ok(Some((frame, more))) => {
                    frames += 1;
                    bytes += frame.len();
                    self.more_follow.set(more);
                    self.handle_frame(port, frame);
                    self.more_follow.set(false);
                    if !more {
                        // The read's last frame need not have been UDP.
                        UdpNat::flush(&self);
                    }
                    if !large && self.net.borrow().switch.takes_large_frames(port) {
                        large = true;
                        reader.set_max_frame(self.max_link_frame());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        // A read that ended in a cut frame left the frames before it queued.
        UdpNat::flush(&self);
        match &result {
            Ok(()) => tracing::info!(port, %peer, "VM disconnected"),
            Err(LinkError::Frame(FrameError::TooLong { len, max })) => {
                self.net.borrow_mut().stats.drops.link_errors += 1;
                let limit = if large { "" } else { ": MTU + 14 until the offload hello" };
                tracing::warn!(port, %peer, "closing VM connection: a {len}-byte frame is longer than the link allows ({max} bytes{limit})")
            }
            Err(LinkError::Frame(e)) => {
                self.net.borrow_mut().stats.drops.link_errors += 1;
                tracing::warn!(port, %peer, "closing VM connection: protocol error: {e}")
            }
            Err(e) => {
                self.net.borrow_mut().stats.drops.link_errors += 1;
                tracing::warn!(port, %peer, "closing VM connection: {}", rdnet_link_error_chain(e))
            }
        }
        self.close_port(port, writer).await;
    }

    /// Forgets a port's MACs, stops its writer and drops what it had queued.
    async fn close_port(&self, port: PortId, writer: tokio::task::JoinHandle<()>) {
        self.net.borrow_mut().remove_port(port);
        if let Some(tx) = self.ports.borrow_mut().map.get_mut(&port) {
            tx.closed = true;
            tx.pending.clear();
            tx.used = 0;
            tx.notify.notify_one();
        }
        let _ = writer.await;
        self.ports.borrow_mut().map.remove(&port);
        tcp::wake_throttled(self);
    }

    /// Serves a datagram link (one frame per datagram, vfkit-style) until
    /// it fails. The VM is whoever sent last; its `VFKT` greeting is
    /// consumed. A bad datagram is dropped: there is no stream to lose.
    #[cfg(unix)]
    pub async fn serve_datagram(self: Rc<Self>, link: rdnet_link::datagram::DatagramLink) {
        let link = Rc::new(link);
        let port = self.net.borrow_mut().add_port();
        self.start_router_adverts();
        let notify = Rc::new(Notify::new());
        self.ports.borrow_mut().map.insert(port, PortTx::new(Framing::U32Be, notify.clone()));
        let peer: Rc<RefCell<Option<std::path::PathBuf>>> = Rc::default();
        tracing::info!(port, path = %link.path().display(), "serving datagram link");

        let writer = {
            let (engine, link, peer) = (self.clone(), link.clone(), peer.clone());
            tokio::task::spawn_local(async move {
                let mut spare = Vec::with_capacity(64 * 1024);
                let decoder = Decoder::new(Framing::U32Be, u32::MAX as usize);
                loop {
                    let (closed, used) = {
                        let mut ports = engine.ports.borrow_mut();
                        let Some(tx) = ports.map.get_mut(&port) else { break };
                        std::mem::swap(&mut tx.pending, &mut spare);
                        (tx.closed, std::mem::take(&mut tx.used))
                    };
                    if used > 0 {
                        tcp::wake_throttled(&engine);
                    }
                    let to = peer.borrow().clone();
                    let mut rest = &spare[..used];
                    while let Ok(Some((frame, used))) = decoder.decode(rest) {
                        if let Some(to) = &to
                            && let Err(e) = link.send_to(frame, to).await
                        {
                            tracing::debug!(port, error = %e, "datagram send failed");
                        }
                        rest = &rest[used..];
                    }
                    if closed {
                        break;
                    }
                    notify.notified().await;
                }
            })
        };

        let mut buf = vec![0u8; 65536];
        let max = self.max_frame();
        let err = loop {
            match link.recv(&mut buf).await {
                Ok((n, from)) => {
                    if from.is_some() {
                        *peer.borrow_mut() = from;
                    }
                    if &buf[..n] == rdnet_link::datagram::VFKIT_GREETING {
                        continue;
                    }
                    if n == 0 || n > max {
                        self.net.borrow_mut().stats.drops.malformed += 1;
                        continue;
                    }
                    self.handle_frame(port, &buf[..n]);
                }
                Err(e) => break e,
            }
        };
        tracing::warn!(port, error = %err, "datagram link failed");
        self.close_port(port, writer).await;
    }
}

fn rdnet_link_error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
