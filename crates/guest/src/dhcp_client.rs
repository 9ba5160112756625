//! A DHCPv4 client as a sans-I/O state machine (RFC 2131), so vm-switch can
//! configure its tap without udhcpc or dhclient.
//!
//! How this works: the client never touches a socket or a clock. The caller
//! feeds it whole Ethernet frames that arrived for it ([`DhcpClient::handle_frame`])
//! and tells it when time has passed ([`DhcpClient::handle_timeout`], at or
//! after [`DhcpClient::poll_timeout`]); the client answers through a queue of
//! [`Output`]s drained with [`DhcpClient::poll_output`]: Ethernet frames to
//! transmit on the link, and leases to apply to or remove from the interface.
//! The states are RFC 2131's: INIT → SELECTING (DISCOVER broadcast, first
//! valid OFFER wins) → REQUESTING (REQUEST broadcast naming the chosen server)
//! → BOUND (ACK applied) → RENEWING at T1 (REQUEST unicast to the server's IP
//! and to the MAC the ACK came from) → REBINDING at T2 (REQUEST broadcast) →
//! at expiry, or on a NAK, the lease is removed and everything starts over
//! (after a NAK, with a 3 s pause first, as udhcpc).
//! DISCOVER and REQUEST are retransmitted with exponential backoff (1 s
//! doubling to 64 s, ±10 % jitter); a REQUEST unanswered four times restarts
//! discovery; renewals are retried after half the remaining time (at least
//! 60 s). Replies are only accepted with our transaction id and hardware
//! address; anything else, malformed or not, is ignored.
//!
//! Besides frames and leases the client reports the events busybox udhcpc
//! hands its `-s` script (vm-switch's `-dhcp-script`): a new lease
//! ([`Output::Configure`], udhcpc's `bound`) is told apart from the same
//! address renewed or rebound ([`Output::Renew`], `renew`); a NAK it acted
//! on is [`Output::Nak`] (before the lease it ends is removed); and an
//! attempt that got no lease is [`Output::LeaseFail`]: every
//! [`ClientConfig::discover_attempts`] unanswered DISCOVERs (udhcpc's
//! `-t 3`), and whenever REQUESTs for an offer go unanswered. The client
//! keeps trying after a failure; only the caller's script learns of it.

use std::collections::VecDeque;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use dhcproto::Encodable;
use dhcproto::v4::{DhcpOption, DhcpOptions, Message, MessageType, Opcode, OptionCode};

use rdnet_wire::Mac;
use rdnet_wire::frame::{
    BROADCAST_MAC, DHCP_CLIENT_PORT, DHCP_SERVER_PORT, build_udp_frame, is_unicast, parse_udp as parse_udp_frame,
};

/// First retransmission delay of DISCOVER and REQUEST.
pub const INITIAL_RETRANSMIT: Duration = Duration::from_secs(1);
/// Cap of the exponential backoff.
pub const MAX_RETRANSMIT: Duration = Duration::from_secs(64);
/// REQUESTs sent in REQUESTING before going back to discovery.
pub const REQUEST_ATTEMPTS: u32 = 4;
/// Lower bound of the retry interval in RENEWING and REBINDING.
pub const MIN_RENEW_RETRANSMIT: Duration = Duration::from_secs(60);
/// Shorter leases are treated as this long, so a bogus server cannot make
/// the client spin.
pub const MIN_LEASE: Duration = Duration::from_secs(10);
/// Wait after a NAK before discovering again (udhcpc sleeps 3 s too).
pub const NAK_DELAY: Duration = Duration::from_secs(3);
/// Lease time used when an ACK carries none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3600);

/// What the client is configured with.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Our hardware address: source of every frame, `chaddr`, client id.
    pub mac: Mac,
    /// Sent as option 12 when set.
    pub hostname: Option<String>,
    /// Option 57; values below 576 are raised to 576.
    pub max_message_size: u16,
    /// Seeds transaction ids and jitter (tests pass a fixed one).
    pub seed: u64,
    /// Unanswered DISCOVERs that make a [`Output::LeaseFail`] (at least 1).
    pub discover_attempts: u32,
}

/// udhcpc's default `-t`: DISCOVERs before its script hears `leasefail`.
pub const DEFAULT_DISCOVER_ATTEMPTS: u32 = 3;

impl ClientConfig {
    pub fn new(mac: Mac) -> Self {
        ClientConfig {
            mac,
            hostname: None,
            max_message_size: 1500,
            seed: rand::random(),
            discover_attempts: DEFAULT_DISCOVER_ATTEMPTS,
        }
    }
}

/// RFC 2131's client states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Init,
    Selecting,
    Requesting,
    Bound,
    Renewing,
    Rebinding,
}

/// An address lease and the configuration that came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// Option 3 (the first usable entry).
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Option 119, or else option 15; names without the trailing dot.
    pub search: Vec<String>,
    /// Option 15 as the server sent it (when fit for a resolv.conf line:
    /// letters, digits, `-`, `_`, `.` and spaces).
    pub domain: Option<String>,
    /// Option 119 alone, names without the trailing dot.
    pub domain_search: Vec<String>,
    /// Option 28.
    pub broadcast: Option<Ipv4Addr>,
    /// The ACK's `siaddr` (the next server, for booting), when not 0.0.0.0.
    pub next_server: Option<Ipv4Addr>,
    /// Option 26.
    pub mtu: Option<u16>,
    /// Option 54, or the reply's source address.
    pub server_id: Ipv4Addr,
    /// Ethernet source of the ACK: where renewals are unicast.
    pub server_mac: Mac,
    /// `None`: infinite lease.
    pub lease_time: Option<Duration>,
    /// T1, from when the lease was granted.
    pub renew_after: Duration,
    /// T2, from when the lease was granted.
    pub rebind_after: Duration,
}

impl fmt::Display for Lease {
    /// `192.168.127.2/24 router 192.168.127.1 dns 192.168.127.1 mtu 1500 lease 3600s`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)?;
        if let Some(r) = self.router {
            write!(f, " router {r}")?;
        }
        if !self.dns.is_empty() {
            let dns: Vec<String> = self.dns.iter().map(ToString::to_string).collect();
            write!(f, " dns {}", dns.join(","))?;
        }
        if let Some(mtu) = self.mtu {
            write!(f, " mtu {mtu}")?;
        }
        match self.lease_time {
            Some(t) => write!(f, " lease {}s", t.as_secs())?,
            None => write!(f, " lease infinite")?,
        }
        if !self.search.is_empty() {
            write!(f, " search {}", self.search.join(" "))?;
        }
        Ok(())
    }
}

/// A DHCPNAK the client acted upon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nak {
    /// `yiaddr` of the NAK (0.0.0.0 from a well-behaved server).
    pub address: Ipv4Addr,
    /// Option 54, when present.
    pub server_id: Option<Ipv4Addr>,
    /// Option 56, the server's reason, with anything but printable ASCII
    /// replaced by `?`.
    pub message: Option<String>,
}

/// What the client asks its caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this Ethernet frame on the link.
    Transmit(Vec<u8>),
    /// Apply this new lease to the interface (udhcpc's `bound`).
    Configure(Lease),
    /// The lease in force was renewed or rebound for the same address; its
    /// settings may have changed (udhcpc's `renew`). Apply it again.
    Renew(Lease),
    /// Remove this lease's address from the interface (`deconfig`).
    Deconfigure(Lease),
    /// A server refused our REQUEST (`nak`); a lease it ends follows as
    /// [`Output::Deconfigure`].
    Nak(Nak),
    /// No lease came of the attempts so far (`leasefail`); the client goes
    /// on trying.
    LeaseFail,
}

#[derive(Debug, Clone, Copy)]
struct Offer {
    address: Ipv4Addr,
    server_id: Ipv4Addr,
}

#[derive(Debug, Clone, Copy)]
struct Timers {
    t1: Instant,
    t2: Instant,
    expiry: Instant,
}

pub struct DhcpClient {
    cfg: ClientConfig,
    rng: u64,
    state: State,
    xid: u32,
    /// Start of the current exchange (the `secs` field).
    exchange_start: Instant,
    attempts: u32,
    next_tx: Option<Instant>,
    offer: Option<Offer>,
    lease: Option<Lease>,
    /// `None` while not bound or for an infinite lease.
    timers: Option<Timers>,
    out: VecDeque<Output>,
}

impl DhcpClient {
    /// A client in INIT; its first DISCOVER goes out at the first
    /// [`handle_timeout`](Self::handle_timeout) (due at `now`).
    pub fn new(cfg: ClientConfig, now: Instant) -> Self {
        // xorshift must not start at zero.
        let rng = cfg.seed | 1;
        DhcpClient {
            cfg,
            rng,
            state: State::Init,
            xid: 0,
            exchange_start: now,
            attempts: 0,
            next_tx: Some(now),
            offer: None,
            lease: None,
            timers: None,
            out: VecDeque::new(),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The lease in force (BOUND, RENEWING, REBINDING).
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    pub fn mac(&self) -> Mac {
        self.cfg.mac
    }

    /// The next queued action, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next;
    /// `None` when nothing is due ever (an infinite lease).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let deadline = match (self.state, self.timers) {
            (State::Bound, Some(t)) => Some(t.t1),
            (State::Renewing, Some(t)) => Some(t.t2),
            (State::Rebinding, Some(t)) => Some(t.expiry),
            _ => None,
        };
        match (self.state, self.next_tx, deadline) {
            (State::Bound, _, d) => d,
            (_, Some(a), Some(b)) => Some(a.min(b)),
            (_, a, b) => a.or(b),
        }
    }

    /// Runs whatever is due at `now`: (re)transmissions and the lease's
    /// T1/T2/expiry transitions.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Each step either waits for a future instant or moves to a state
        // whose own step then waits; the bound only guards against a bug.
        for _ in 0..8 {
            let due = self.next_tx.is_some_and(|t| t <= now);
            match self.state {
                State::Init => self.start_discovery(now),
                State::Selecting if due => {
                    let every = self.cfg.discover_attempts.max(1);
                    if self.attempts > 0 && self.attempts.is_multiple_of(every) {
                        tracing::debug!("dhcp: {} DISCOVERs unanswered", self.attempts);
                        self.out.push_back(Output::LeaseFail);
                    }
                    self.send_discover(now);
                }
                State::Requesting if due => {
                    if self.attempts >= REQUEST_ATTEMPTS {
                        tracing::debug!("dhcp: no answer to REQUEST, back to discovery");
                        self.out.push_back(Output::LeaseFail);
                        self.start_discovery(now);
                    } else {
                        self.send_request(now);
                    }
                }
                State::Bound | State::Renewing | State::Rebinding => {
                    let Some(t) = self.timers else { return };
                    if now >= t.expiry {
                        tracing::debug!("dhcp: lease expired");
                        self.drop_lease();
                        self.start_discovery(now);
                    } else if now >= t.t2 && self.state != State::Rebinding {
                        self.begin_exchange(State::Rebinding, now);
                        self.send_request(now);
                    } else if now >= t.t1 && self.state == State::Bound {
                        self.begin_exchange(State::Renewing, now);
                        self.send_request(now);
                    } else if self.state != State::Bound && due {
                        self.send_request(now);
                    } else {
                        return;
                    }
                }
                State::Selecting | State::Requesting => return,
            }
        }
    }

    /// Tells the client that the link (re)connected: whatever exchange is
    /// in progress is retransmitted now instead of after its backoff.
    pub fn link_restored(&mut self, now: Instant) {
        match self.state {
            State::Init | State::Bound => {}
            State::Selecting => {
                self.attempts = 0;
                self.send_discover(now);
            }
            State::Requesting | State::Renewing | State::Rebinding => self.send_request(now),
        }
        self.handle_timeout(now);
    }

    /// Offers a frame that arrived from the link. Returns true if it was a
    /// DHCP reply for our current exchange and was acted upon; anything
    /// else (other traffic, stale or foreign replies, garbage) is ignored.
    pub fn handle_frame(&mut self, now: Instant, frame: &[u8]) -> bool {
        let Some(udp) = parse_udp_frame(frame) else { return false };
        if udp.dst.port() != DHCP_CLIENT_PORT || udp.src.port() != DHCP_SERVER_PORT {
            return false;
        }
        if udp.dst_mac != self.cfg.mac && udp.dst_mac != BROADCAST_MAC {
            return false;
        }
        let Some(msg) = decode_message(udp.payload) else { return false };
        // `chaddr()` slices by `hlen`: check it first.
        if msg.opcode() != Opcode::BootReply || msg.xid() != self.xid || msg.hlen() != 6 {
            return false;
        }
        if msg.chaddr() != self.cfg.mac {
            return false;
        }
        let Some(kind) = msg.opts().msg_type() else { return false };
        let server_id = server_id(msg.opts()).or_else(|| Some(*udp.src.ip()).filter(|ip| is_unicast(*ip)));

        match (self.state, kind) {
            (State::Selecting, MessageType::Offer) => {
                let Some(server_id) = server_id else { return false };
                let address = msg.yiaddr();
                if !is_unicast(address) {
                    return false;
                }
                tracing::debug!("dhcp: offer {address} from {server_id}");
                self.offer = Some(Offer { address, server_id });
                self.state = State::Requesting;
                self.attempts = 0;
                self.send_request(now);
                true
            }
            (State::Requesting, MessageType::Ack | MessageType::Nak) => {
                let Some(offer) = self.offer else { return false };
                if server_id.is_some_and(|s| s != offer.server_id) {
                    return false;
                }
                if kind == MessageType::Nak {
                    tracing::debug!("dhcp: NAK from {}", offer.server_id);
                    self.out.push_back(Output::Nak(nak_of(&msg)));
                    self.discover_after_nak(now);
                    return true;
                }
                match lease_from_ack(&msg, offer.server_id, udp.src_mac) {
                    Some(lease) => {
                        self.bind(lease, now, false);
                        true
                    }
                    None => false,
                }
            }
            (State::Renewing | State::Rebinding, MessageType::Ack | MessageType::Nak) => {
                let Some(old) = self.lease.clone() else { return false };
                // Renewals are answered by the lease's server; when rebinding
                // any server may answer.
                if self.state == State::Renewing && server_id.is_some_and(|s| s != old.server_id) {
                    return false;
                }
                if kind == MessageType::Nak {
                    tracing::debug!("dhcp: NAK while {:?}", self.state);
                    self.out.push_back(Output::Nak(nak_of(&msg)));
                    self.drop_lease();
                    self.discover_after_nak(now);
                    return true;
                }
                let Some(lease) = lease_from_ack(&msg, server_id.unwrap_or(old.server_id), udp.src_mac) else {
                    return false;
                };
                // A new address is a new lease: the old one goes first.
                let renewal = lease.address == old.address && lease.prefix_len == old.prefix_len;
                if !renewal {
                    self.drop_lease();
                }
                self.bind(lease, now, renewal);
                true
            }
            _ => false,
        }
    }

    fn bind(&mut self, lease: Lease, now: Instant, renewal: bool) {
        self.timers = lease.lease_time.map(|total| Timers {
            t1: now + lease.renew_after,
            t2: now + lease.rebind_after,
            expiry: now + total,
        });
        self.state = State::Bound;
        self.next_tx = None;
        self.offer = None;
        self.lease = Some(lease.clone());
        self.out.push_back(if renewal { Output::Renew(lease) } else { Output::Configure(lease) });
    }

    fn drop_lease(&mut self) {
        self.timers = None;
        if let Some(old) = self.lease.take() {
            self.out.push_back(Output::Deconfigure(old));
        }
    }

    fn begin_exchange(&mut self, state: State, now: Instant) {
        self.state = state;
        self.xid = self.random() as u32;
        self.exchange_start = now;
        self.attempts = 0;
    }

    fn start_discovery(&mut self, now: Instant) {
        self.offer = None;
        self.timers = None;
        self.begin_exchange(State::Selecting, now);
        self.send_discover(now);
    }

    /// Discovery again, its first DISCOVER after [`NAK_DELAY`]: a server
    /// that refuses every REQUEST must not drive a loop at its own pace.
    fn discover_after_nak(&mut self, now: Instant) {
        self.offer = None;
        self.timers = None;
        self.begin_exchange(State::Selecting, now);
        self.next_tx = Some(now + NAK_DELAY);
    }

    fn send_discover(&mut self, now: Instant) {
        self.attempts += 1;
        let msg = self.message(MessageType::Discover, Ipv4Addr::UNSPECIFIED, now);
        self.transmit(&msg, BROADCAST_MAC, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST);
        self.next_tx = Some(now + self.backoff());
    }

    /// The REQUEST of the current state: selecting (broadcast, names the
    /// server), renewing (unicast) or rebinding (broadcast, from our address).
    fn send_request(&mut self, now: Instant) {
        self.attempts += 1;
        match self.state {
            State::Requesting => {
                let Some(offer) = self.offer else { return };
                let mut msg = self.message(MessageType::Request, Ipv4Addr::UNSPECIFIED, now);
                msg.opts_mut().insert(DhcpOption::RequestedIpAddress(offer.address));
                msg.opts_mut().insert(DhcpOption::ServerIdentifier(offer.server_id));
                self.transmit(&msg, BROADCAST_MAC, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST);
                self.next_tx = Some(now + self.backoff());
            }
            State::Renewing | State::Rebinding => {
                let (Some(lease), Some(t)) = (self.lease.clone(), self.timers) else { return };
                let msg = self.message(MessageType::Request, lease.address, now);
                let deadline = if self.state == State::Renewing {
                    self.transmit(&msg, lease.server_mac, lease.address, lease.server_id);
                    t.t2
                } else {
                    self.transmit(&msg, BROADCAST_MAC, lease.address, Ipv4Addr::BROADCAST);
                    t.expiry
                };
                let half = deadline.saturating_duration_since(now) / 2;
                self.next_tx = Some((now + half.max(MIN_RENEW_RETRANSMIT)).min(deadline));
            }
            _ => {}
        }
    }

    fn message(&self, kind: MessageType, ciaddr: Ipv4Addr, now: Instant) -> Message {
        let unspec = Ipv4Addr::UNSPECIFIED;
        let mut msg = Message::new_with_id(self.xid, ciaddr, unspec, unspec, unspec, &self.cfg.mac);
        let secs = now.saturating_duration_since(self.exchange_start).as_secs();
        msg.set_secs(u16::try_from(secs).unwrap_or(u16::MAX));
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        let mut client_id = vec![1u8];
        client_id.extend_from_slice(&self.cfg.mac);
        opts.insert(DhcpOption::ClientIdentifier(client_id));
        opts.insert(DhcpOption::MaxMessageSize(self.cfg.max_message_size.max(576)));
        opts.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::DomainName,
            OptionCode::InterfaceMtu,
            OptionCode::AddressLeaseTime,
            OptionCode::ServerIdentifier,
            OptionCode::Renewal,
            OptionCode::Rebinding,
            OptionCode::DomainSearch,
            OptionCode::BroadcastAddr,
        ]));
        if let Some(name) = &self.cfg.hostname {
            opts.insert(DhcpOption::Hostname(name.clone()));
        }
        msg
    }

    fn transmit(&mut self, msg: &Message, dst_mac: Mac, src: Ipv4Addr, dst: Ipv4Addr) {
        let payload = match msg.to_vec() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("dhcp: cannot encode message: {e}");
                return;
            }
        };
        let src = SocketAddrV4::new(src, DHCP_CLIENT_PORT);
        let dst = SocketAddrV4::new(dst, DHCP_SERVER_PORT);
        if let Some(frame) = build_udp_frame(self.cfg.mac, dst_mac, src, dst, &payload) {
            self.out.push_back(Output::Transmit(frame));
        }
    }

    /// Exponential backoff for the current attempt, with ±10 % jitter.
    fn backoff(&mut self) -> Duration {
        let exp = self.attempts.saturating_sub(1).min(6);
        let base = INITIAL_RETRANSMIT.saturating_mul(1 << exp).min(MAX_RETRANSMIT);
        let permille = 900 + (self.random() % 201) as u32;
        base * permille / 1000
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: plenty for transaction ids and jitter.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Decodes a server's message, passing on to dhcproto only the options
/// this client reads, with plausible lengths (see `rdnet_wire::dhcp`).
/// dhcproto stops reading options at the first one it cannot decode (text
/// that is not UTF-8, a bad domain list), losing every later one, so the
/// options that can fail that way are read one by one, each on its own.
pub(crate) fn decode_message(payload: &[u8]) -> Option<Message> {
    // domain name, message (text), domain search
    const FALLIBLE: [u8; 3] = [15, 56, 119];
    let mut msg = rdnet_wire::dhcp::decode_filtered(payload, |code, len| match code {
        // subnet mask, server id, lease time, T1, T2, broadcast address
        1 | 54 | 51 | 58 | 59 | 28 => len == 4,
        // router, DNS servers
        3 | 6 => len % 4 == 0,
        26 => len == 2,
        53 => len == 1,
        _ => false,
    })?;
    for code in FALLIBLE {
        if let Some(one) = rdnet_wire::dhcp::decode_filtered(payload, |c, _| c == code)
            && let Some(opt) = one.opts().get(OptionCode::from(code))
        {
            msg.opts_mut().insert(opt.clone());
        }
    }
    Some(msg)
}

/// What a NAK says, for the caller's script.
fn nak_of(msg: &Message) -> Nak {
    let message = match msg.opts().get(OptionCode::Message) {
        Some(DhcpOption::Message(text)) => {
            Some(text.chars().map(|c| if c == ' ' || c.is_ascii_graphic() { c } else { '?' }).collect())
        }
        _ => None,
    };
    Nak { address: msg.yiaddr(), server_id: server_id(msg.opts()), message }
}

fn server_id(opts: &DhcpOptions) -> Option<Ipv4Addr> {
    match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) if is_unicast(*ip) => Some(*ip),
        _ => None,
    }
}

/// The lease an ACK grants, or `None` if it grants no usable address.
fn lease_from_ack(msg: &Message, server_id: Ipv4Addr, server_mac: Mac) -> Option<Lease> {
    let address = msg.yiaddr();
    if !is_unicast(address) {
        return None;
    }
    let opts = msg.opts();
    let prefix_len = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => mask_to_prefix(*mask),
        _ => None,
    }
    .unwrap_or_else(|| classful_prefix(address));
    let router = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(list)) => list.iter().copied().find(|r| is_unicast(*r)),
        _ => None,
    };
    let mut dns = Vec::new();
    if let Some(DhcpOption::DomainNameServer(list)) = opts.get(OptionCode::DomainNameServer) {
        for ip in list.iter().copied().filter(|ip| is_unicast(*ip)) {
            if !dns.contains(&ip) {
                dns.push(ip);
            }
        }
    }
    let mut domain_search: Vec<String> = match opts.get(OptionCode::DomainSearch) {
        Some(DhcpOption::DomainSearch(names)) => names.iter().filter_map(|n| clean_domain(&n.to_string())).collect(),
        _ => Vec::new(),
    };
    domain_search.dedup();
    // One name by the RFC; some servers send a space-separated list.
    // Anything else (newlines…) must not reach resolv.conf.
    let domain = match opts.get(OptionCode::DomainName) {
        Some(DhcpOption::DomainName(name))
            if !name.trim().is_empty()
                && name
                    .bytes()
                    .all(|b| b == b' ' || b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') =>
        {
            Some(name.clone())
        }
        _ => None,
    };
    let mut search = domain_search.clone();
    if search.is_empty()
        && let Some(name) = &domain
    {
        search = name.split(' ').filter_map(clean_domain).collect();
        search.dedup();
    }
    let broadcast = match opts.get(OptionCode::BroadcastAddr) {
        Some(DhcpOption::BroadcastAddr(ip)) => Some(*ip),
        _ => None,
    };
    let mtu = match opts.get(OptionCode::InterfaceMtu) {
        Some(DhcpOption::InterfaceMtu(m)) if *m >= 68 => Some(*m),
        _ => None,
    };
    let lease_time = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(u32::MAX)) => None,
        Some(DhcpOption::AddressLeaseTime(s)) => Some(Duration::from_secs(u64::from(*s)).max(MIN_LEASE)),
        _ => Some(DEFAULT_LEASE),
    };
    let secs_opt = |code| match opts.get(code) {
        Some(DhcpOption::Renewal(s) | DhcpOption::Rebinding(s)) => Some(Duration::from_secs(u64::from(*s))),
        _ => None,
    };
    let (renew_after, rebind_after) = match lease_time {
        Some(total) => {
            let t1 = secs_opt(OptionCode::Renewal).filter(|t| !t.is_zero() && *t < total).unwrap_or(total / 2);
            let t2 = secs_opt(OptionCode::Rebinding).filter(|t| *t > t1 && *t < total).unwrap_or_else(|| {
                let d = total * 7 / 8;
                if d > t1 { d } else { t1 + (total - t1) / 2 }
            });
            (t1, t2)
        }
        None => (Duration::MAX, Duration::MAX),
    };
    Some(Lease {
        address,
        prefix_len,
        router,
        dns,
        search,
        domain,
        domain_search,
        broadcast,
        next_server: Some(msg.siaddr()).filter(|ip| !ip.is_unspecified()),
        mtu,
        server_id,
        server_mac,
        lease_time,
        renew_after,
        rebind_after,
    })
}

fn mask_to_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (ones > 0 && ones + m.trailing_zeros() == 32).then_some(ones as u8)
}

fn classful_prefix(addr: Ipv4Addr) -> u8 {
    match addr.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// A domain name fit for resolv.conf (letters, digits, `-`, `_`, `.`), without
/// its trailing dot; `None` otherwise.
fn clean_domain(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    ok.then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::Decodable;
    use dhcproto::Name;
    use rdnet_wire::dhcp::OPTIONS_START;
    use std::str::FromStr;

    const MAC: Mac = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];
    const SERVER_MAC: Mac = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd];
    const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 1);
    const YIADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 2);

    fn client(now: Instant) -> DhcpClient {
        let mut cfg = ClientConfig::new(MAC);
        cfg.seed = 42;
        DhcpClient::new(cfg, now)
    }

    fn outputs(c: &mut DhcpClient) -> Vec<Output> {
        std::iter::from_fn(|| c.poll_output()).collect()
    }

    /// A sent frame, decoded.
    struct Sent {
        dst_mac: Mac,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        msg: Message,
    }

    fn decode(frame: &[u8]) -> Sent {
        let udp = parse_udp_frame(frame).expect("valid UDP frame");
        assert_eq!(udp.src_mac, MAC);
        Sent { dst_mac: udp.dst_mac, src: udp.src, dst: udp.dst, msg: Message::from_bytes(udp.payload).unwrap() }
    }

    fn sent(c: &mut DhcpClient) -> Vec<Sent> {
        outputs(c)
            .into_iter()
            .map(|o| match o {
                Output::Transmit(f) => decode(&f),
                other => panic!("expected a frame, got {other:?}"),
            })
            .collect()
    }

    fn one_sent(c: &mut DhcpClient) -> Sent {
        let mut v = sent(c);
        assert_eq!(v.len(), 1, "expected exactly one frame");
        v.remove(0)
    }

    fn kind(m: &Message) -> MessageType {
        m.opts().msg_type().unwrap()
    }

    /// A server reply to `req`, built with dhcproto, as an Ethernet frame.
    fn reply(req: &Message, kind: MessageType, extra: &[DhcpOption]) -> Vec<u8> {
        let mut m = Message::new_with_id(
            req.xid(),
            Ipv4Addr::UNSPECIFIED,
            if kind == MessageType::Nak { Ipv4Addr::UNSPECIFIED } else { YIADDR },
            SERVER,
            Ipv4Addr::UNSPECIFIED,
            &MAC,
        );
        m.set_opcode(Opcode::BootReply);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(SERVER));
        if kind != MessageType::Nak {
            o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
            o.insert(DhcpOption::Router(vec![SERVER]));
            o.insert(DhcpOption::DomainNameServer(vec![SERVER]));
            o.insert(DhcpOption::AddressLeaseTime(3600));
            o.insert(DhcpOption::InterfaceMtu(1500));
            o.insert(DhcpOption::DomainSearch(vec![Name::from_str("example.internal.").unwrap()]));
        }
        for opt in extra {
            o.insert(opt.clone());
        }
        frame_of(&m, YIADDR)
    }

    fn frame_of(m: &Message, to: Ipv4Addr) -> Vec<u8> {
        build_udp_frame(
            SERVER_MAC,
            MAC,
            SocketAddrV4::new(SERVER, DHCP_SERVER_PORT),
            SocketAddrV4::new(to, DHCP_CLIENT_PORT),
            &m.to_vec().unwrap(),
        )
        .unwrap()
    }

    /// Drives a fresh client to BOUND; returns it and the bind time.
    fn bound(t0: Instant, extra: &[DhcpOption]) -> DhcpClient {
        let mut c = client(t0);
        c.handle_timeout(t0);
        let discover = one_sent(&mut c);
        assert!(c.handle_frame(t0, &reply(&discover.msg, MessageType::Offer, extra)));
        let request = one_sent(&mut c);
        assert!(c.handle_frame(t0, &reply(&request.msg, MessageType::Ack, extra)));
        let out = outputs(&mut c);
        assert!(matches!(out.as_slice(), [Output::Configure(_)]), "{out:?}");
        assert_eq!(c.state(), State::Bound);
        c
    }

    #[test]
    fn discover_offer_request_ack() {
        let t0 = Instant::now();
        let mut c = client(t0);
        assert_eq!(c.state(), State::Init);
        assert_eq!(c.poll_timeout(), Some(t0));
        c.handle_timeout(t0);
        assert_eq!(c.state(), State::Selecting);

        let d = one_sent(&mut c);
        assert_eq!(kind(&d.msg), MessageType::Discover);
        assert_eq!(d.dst_mac, BROADCAST_MAC);
        assert_eq!(d.src, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68));
        assert_eq!(d.dst, SocketAddrV4::new(Ipv4Addr::BROADCAST, 67));
        assert_eq!(d.msg.chaddr(), MAC);
        assert_eq!(d.msg.opcode(), Opcode::BootRequest);
        assert!(d.msg.opts().get(OptionCode::ParameterRequestList).is_some());

        assert!(c.handle_frame(t0, &reply(&d.msg, MessageType::Offer, &[])));
        assert_eq!(c.state(), State::Requesting);
        let r = one_sent(&mut c);
        assert_eq!(kind(&r.msg), MessageType::Request);
        assert_eq!(r.dst_mac, BROADCAST_MAC);
        assert_eq!(r.msg.xid(), d.msg.xid());
        assert_eq!(r.msg.opts().get(OptionCode::RequestedIpAddress), Some(&DhcpOption::RequestedIpAddress(YIADDR)));
        assert_eq!(r.msg.opts().get(OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(SERVER)));

        assert!(c.handle_frame(t0, &reply(&r.msg, MessageType::Ack, &[])));
        let out = outputs(&mut c);
        let [Output::Configure(lease)] = out.as_slice() else { panic!("{out:?}") };
        assert_eq!(lease.address, YIADDR);
        assert_eq!(lease.prefix_len, 24);
        assert_eq!(lease.router, Some(SERVER));
        assert_eq!(lease.dns, vec![SERVER]);
        assert_eq!(lease.search, vec!["example.internal".to_string()]);
        assert_eq!(lease.mtu, Some(1500));
        assert_eq!(lease.server_mac, SERVER_MAC);
        assert_eq!(lease.lease_time, Some(Duration::from_secs(3600)));
        assert_eq!(lease.renew_after, Duration::from_secs(1800));
        assert_eq!(lease.rebind_after, Duration::from_secs(3150));
        assert_eq!(
            lease.to_string(),
            "192.168.127.2/24 router 192.168.127.1 dns 192.168.127.1 mtu 1500 lease 3600s search example.internal"
        );
        assert_eq!(c.state(), State::Bound);
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(1800)));
        // A duplicate ACK changes nothing.
        assert!(!c.handle_frame(t0, &reply(&r.msg, MessageType::Ack, &[])));
        assert!(outputs(&mut c).is_empty());
    }

    #[test]
    fn discover_is_retransmitted_with_backoff() {
        let t0 = Instant::now();
        let mut c = client(t0);
        c.handle_timeout(t0);
        let first = one_sent(&mut c);
        let mut at = t0;
        let mut prev_gap = Duration::ZERO;
        for n in 0..9u32 {
            let due = c.poll_timeout().unwrap();
            let gap = due - at;
            let nominal = INITIAL_RETRANSMIT.saturating_mul(1 << n.min(6)).min(MAX_RETRANSMIT);
            assert!(gap >= nominal * 9 / 10 && gap <= nominal * 11 / 10, "attempt {n}: {gap:?} vs {nominal:?}");
            assert!(gap + Duration::from_secs(8) > prev_gap);
            prev_gap = gap;
            // Nothing before it is due.
            c.handle_timeout(due - Duration::from_millis(1));
            assert!(outputs(&mut c).is_empty());
            c.handle_timeout(due);
            // Every third DISCOVER unanswered is a lease failure (udhcpc -t 3).
            if (n + 1) % DEFAULT_DISCOVER_ATTEMPTS == 0 {
                assert_eq!(c.poll_output(), Some(Output::LeaseFail), "after DISCOVER {}", n + 1);
            }
            let again = one_sent(&mut c);
            assert_eq!(kind(&again.msg), MessageType::Discover);
            assert_eq!(again.msg.xid(), first.msg.xid());
            at = due;
        }
        assert!(prev_gap <= MAX_RETRANSMIT * 11 / 10);
    }

    #[test]
    fn request_retransmitted_then_discovery_restarts() {
        let t0 = Instant::now();
        let mut c = client(t0);
        c.handle_timeout(t0);
        let d = one_sent(&mut c);
        assert!(c.handle_frame(t0, &reply(&d.msg, MessageType::Offer, &[])));
        assert_eq!(kind(&one_sent(&mut c).msg), MessageType::Request);
        for _ in 1..REQUEST_ATTEMPTS {
            let due = c.poll_timeout().unwrap();
            c.handle_timeout(due);
            assert_eq!(kind(&one_sent(&mut c).msg), MessageType::Request);
            assert_eq!(c.state(), State::Requesting);
        }
        let due = c.poll_timeout().unwrap();
        c.handle_timeout(due);
        assert_eq!(c.poll_output(), Some(Output::LeaseFail), "an offer that came to nothing");
        let again = one_sent(&mut c);
        assert_eq!(kind(&again.msg), MessageType::Discover);
        assert_ne!(again.msg.xid(), d.msg.xid(), "a new exchange gets a new xid");
        assert_eq!(c.state(), State::Selecting);
    }

    #[test]
    fn nak_while_requesting_restarts() {
        let t0 = Instant::now();
        let mut c = client(t0);
        c.handle_timeout(t0);
        let d = one_sent(&mut c);
        assert!(c.handle_frame(t0, &reply(&d.msg, MessageType::Offer, &[])));
        let r = one_sent(&mut c);
        let nak = reply(&r.msg, MessageType::Nak, &[DhcpOption::Message("address in use\n\u{7}".into())]);
        assert!(c.handle_frame(t0, &nak));
        assert_eq!(c.state(), State::Selecting);
        // No lease to remove: the NAK, then discovery.
        assert_eq!(
            c.poll_output(),
            Some(Output::Nak(Nak {
                address: Ipv4Addr::UNSPECIFIED,
                server_id: Some(SERVER),
                message: Some("address in use??".into())
            }))
        );
        // Discovery again, after a pause.
        assert!(outputs(&mut c).is_empty());
        assert_eq!(c.poll_timeout(), Some(t0 + NAK_DELAY));
        c.handle_timeout(t0 + NAK_DELAY);
        let out = sent(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(kind(&out[0].msg), MessageType::Discover);
        assert_ne!(out[0].msg.xid(), r.msg.xid());
    }

    #[test]
    fn renew_at_t1_unicast_then_ack() {
        let t0 = Instant::now();
        let mut c = bound(t0, &[]);
        let t1 = t0 + Duration::from_secs(1800);
        c.handle_timeout(t1 - Duration::from_secs(1));
        assert!(outputs(&mut c).is_empty());
        c.handle_timeout(t1);
        assert_eq!(c.state(), State::Renewing);
        let r = one_sent(&mut c);
        assert_eq!(kind(&r.msg), MessageType::Request);
        assert_eq!(r.dst_mac, SERVER_MAC);
        assert_eq!(r.src, SocketAddrV4::new(YIADDR, 68));
        assert_eq!(r.dst, SocketAddrV4::new(SERVER, 67));
        assert_eq!(r.msg.ciaddr(), YIADDR);
        assert!(r.msg.opts().get(OptionCode::RequestedIpAddress).is_none());
        assert!(r.msg.opts().get(OptionCode::ServerIdentifier).is_none());

        // Retried after half the time to T2 (1350 s / 2).
        assert_eq!(c.poll_timeout(), Some(t1 + Duration::from_secs(675)));
        c.handle_timeout(t1 + Duration::from_secs(675));
        let retry = one_sent(&mut c);
        assert_eq!(retry.msg.xid(), r.msg.xid());

        let now = t1 + Duration::from_secs(700);
        assert!(c.handle_frame(now, &reply(&r.msg, MessageType::Ack, &[])));
        let out = outputs(&mut c);
        // The same address: a renewal, not a new lease.
        assert!(matches!(out.as_slice(), [Output::Renew(l)] if l.address == YIADDR), "{out:?}");
        assert_eq!(c.state(), State::Bound);
        assert_eq!(c.poll_timeout(), Some(now + Duration::from_secs(1800)));
    }

    #[test]
    fn rebind_at_t2_broadcast_then_expiry_restarts() {
        let t0 = Instant::now();
        let mut c = bound(t0, &[]);
        c.handle_timeout(t0 + Duration::from_secs(1800));
        assert_eq!(one_sent(&mut c).dst_mac, SERVER_MAC);
        let t2 = t0 + Duration::from_secs(3150);
        c.handle_timeout(t2);
        assert_eq!(c.state(), State::Rebinding);
        let rb = one_sent(&mut c);
        assert_eq!(kind(&rb.msg), MessageType::Request);
        assert_eq!(rb.dst_mac, BROADCAST_MAC);
        assert_eq!(rb.src, SocketAddrV4::new(YIADDR, 68));
        assert_eq!(rb.dst, SocketAddrV4::new(Ipv4Addr::BROADCAST, 67));
        assert_eq!(rb.msg.ciaddr(), YIADDR);
        // Half of the 450 s left is less than the 60 s floor? No: 225 s.
        assert_eq!(c.poll_timeout(), Some(t2 + Duration::from_secs(225)));

        let expiry = t0 + Duration::from_secs(3600);
        c.handle_timeout(expiry);
        let out = outputs(&mut c);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[0], Output::Deconfigure(l) if l.address == YIADDR));
        let Output::Transmit(f) = &out[1] else { panic!("{out:?}") };
        assert_eq!(kind(&decode(f).msg), MessageType::Discover);
        assert_eq!(c.state(), State::Selecting);
        assert!(c.lease().is_none());
    }

    #[test]
    fn rebind_ack_rebinds() {
        let t0 = Instant::now();
        let mut c = bound(t0, &[]);
        let t2 = t0 + Duration::from_secs(3150);
        // A jump straight past T2 goes to REBINDING without a renewal.
        c.handle_timeout(t2 + Duration::from_secs(1));
        assert_eq!(c.state(), State::Rebinding);
        let rb = one_sent(&mut c);
        // Rebound with other settings: still udhcpc's `renew` (it names the
        // event by the state the ACK arrived in), carrying the new settings.
        let ack = reply(&rb.msg, MessageType::Ack, &[DhcpOption::DomainNameServer(vec![Ipv4Addr::new(10, 0, 0, 53)])]);
        assert!(c.handle_frame(t2, &ack));
        assert_eq!(c.state(), State::Bound);
        let out = outputs(&mut c);
        assert!(matches!(out.as_slice(), [Output::Renew(l)] if l.dns == vec![Ipv4Addr::new(10, 0, 0, 53)]), "{out:?}");
    }

    #[test]
    fn lease_fail_counts_discovers_and_keeps_trying() {
        let t0 = Instant::now();
        let mut cfg = ClientConfig::new(MAC);
        cfg.seed = 1;
        cfg.discover_attempts = 2;
        let mut c = DhcpClient::new(cfg, t0);
        let mut fails = 0;
        let mut discovers = 0;
        for _ in 0..7 {
            let due = c.poll_timeout().unwrap();
            c.handle_timeout(due);
            for o in outputs(&mut c) {
                match o {
                    Output::LeaseFail => {
                        assert_eq!(discovers % 2, 0, "after every second DISCOVER");
                        fails += 1;
                    }
                    Output::Transmit(f) => {
                        assert_eq!(kind(&decode(&f).msg), MessageType::Discover);
                        discovers += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!((discovers, fails), (7, 3));
        assert_eq!(c.state(), State::Selecting);
        // An offer still ends it the usual way.
        let d = one_sent_after(&mut c);
        assert!(c.handle_frame(t0, &reply(&d.msg, MessageType::Offer, &[])));
    }

    /// The next DISCOVER, skipping lease failures.
    fn one_sent_after(c: &mut DhcpClient) -> Sent {
        let due = c.poll_timeout().unwrap();
        c.handle_timeout(due);
        let frames: Vec<Sent> = outputs(c)
            .into_iter()
            .filter_map(|o| match o {
                Output::Transmit(f) => Some(decode(&f)),
                _ => None,
            })
            .collect();
        frames.into_iter().next().expect("a frame")
    }

    #[test]
    fn udhcpc_fields_of_a_lease() {
        let t0 = Instant::now();
        let c = bound(
            t0,
            &[
                DhcpOption::DomainName("corp.example".into()),
                DhcpOption::BroadcastAddr(Ipv4Addr::new(192, 168, 127, 255)),
            ],
        );
        let l = c.lease().unwrap();
        assert_eq!(l.domain.as_deref(), Some("corp.example"));
        assert_eq!(l.domain_search, vec!["example.internal".to_string()]);
        // Option 119 wins for resolv.conf.
        assert_eq!(l.search, vec!["example.internal".to_string()]);
        assert_eq!(l.broadcast, Some(Ipv4Addr::new(192, 168, 127, 255)));
        assert_eq!(l.next_server, Some(SERVER), "siaddr");
        // Without option 119 the domain is the search list.
        let ack = {
            let mut m = Message::new_with_id(1, Ipv4Addr::UNSPECIFIED, YIADDR, SERVER, Ipv4Addr::UNSPECIFIED, &MAC);
            m.set_opcode(Opcode::BootReply);
            m.opts_mut().insert(DhcpOption::DomainName("a.example b.example".into()));
            m
        };
        let l = lease_from_ack(&ack, SERVER, SERVER_MAC).unwrap();
        assert_eq!(l.domain.as_deref(), Some("a.example b.example"));
        assert!(l.domain_search.is_empty());
        assert_eq!(l.search, vec!["a.example".to_string(), "b.example".to_string()]);
        assert_eq!(l.broadcast, None);
    }

    #[test]
    fn text_options_that_are_not_utf8_do_not_hide_the_reply() {
        let t0 = Instant::now();
        let mut c = client(t0);
        c.handle_timeout(t0);
        let d = one_sent(&mut c);
        let offer = reply(&d.msg, MessageType::Offer, &[]);
        let payload = parse_udp_frame(&offer).unwrap().payload.to_vec();
        let mut p = payload[..OPTIONS_START].to_vec();
        p.extend_from_slice(&[15, 3, 0xff, 0xfe, b'x', 56, 2, 0xc3, 0x28]);
        p.extend_from_slice(&payload[OPTIONS_START..]);
        let m = decode_message(&p).expect("read without its text options");
        assert!(m.opts().get(OptionCode::DomainName).is_none());
        assert!(m.opts().get(OptionCode::DomainSearch).is_some(), "later options are kept");
        assert!(c.handle_frame(t0, &frame_of_raw(&p)));
    }

    #[test]
    fn nak_while_renewing_deconfigures_and_restarts() {
        let t0 = Instant::now();
        let mut c = bound(t0, &[]);
        let t1 = t0 + Duration::from_secs(1800);
        c.handle_timeout(t1);
        let r = one_sent(&mut c);
        assert!(c.handle_frame(t1, &reply(&r.msg, MessageType::Nak, &[])));
        let out = outputs(&mut c);
        // As udhcpc: `nak`, then `deconfig`, then discovery after a pause.
        assert!(matches!(&out[0], Output::Nak(n) if n.server_id == Some(SERVER) && n.message.is_none()), "{out:?}");
        assert!(matches!(&out[1], Output::Deconfigure(l) if l.address == YIADDR), "{out:?}");
        assert_eq!(out.len(), 2);
        assert_eq!(c.poll_timeout(), Some(t1 + NAK_DELAY));
        c.handle_timeout(t1 + NAK_DELAY);
        assert_eq!(kind(&one_sent(&mut c).msg), MessageType::Discover);
        assert_eq!(c.state(), State::Selecting);
    }

    #[test]
    fn changed_address_on_renew_replaces_lease() {
        let t0 = Instant::now();
        let mut c = bound(t0, &[]);
        let t1 = t0 + Duration::from_secs(1800);
        c.handle_timeout(t1);
        let r = one_sent(&mut c);
        let mut ack =
            Message::from_bytes(parse_udp_frame(&reply(&r.msg, MessageType::Ack, &[])).unwrap().payload).unwrap();
        ack.set_yiaddr(Ipv4Addr::new(192, 168, 127, 9));
        assert!(c.handle_frame(t1, &frame_of(&ack, YIADDR)));
        let out = outputs(&mut c);
        assert!(matches!(&out[0], Output::Deconfigure(l) if l.address == YIADDR), "{out:?}");
        assert!(matches!(&out[1], Output::Configure(l) if l.address == Ipv4Addr::new(192, 168, 127, 9)));
    }

    #[test]
    fn lease_options() {
        let t0 = Instant::now();
        let mut c = bound(
            t0,
            &[
                DhcpOption::AddressLeaseTime(100),
                DhcpOption::Renewal(30),
                DhcpOption::Rebinding(60),
                DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 0, 0)),
                DhcpOption::DomainNameServer(vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::UNSPECIFIED]),
                DhcpOption::InterfaceMtu(65520),
            ],
        );
        let l = c.lease().unwrap().clone();
        assert_eq!(l.prefix_len, 16);
        assert_eq!(l.dns, vec![Ipv4Addr::new(10, 0, 0, 1)]);
        assert_eq!(l.mtu, Some(65520));
        assert_eq!((l.renew_after, l.rebind_after), (Duration::from_secs(30), Duration::from_secs(60)));
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(30)));
        c.handle_timeout(t0 + Duration::from_secs(30));
        one_sent(&mut c);
        // The 60 s floor is capped at T2.
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn domain_name_used_without_search_and_bad_names_dropped() {
        let ack = {
            let mut m = Message::new_with_id(1, Ipv4Addr::UNSPECIFIED, YIADDR, SERVER, Ipv4Addr::UNSPECIFIED, &MAC);
            m.set_opcode(Opcode::BootReply);
            m.opts_mut().insert(DhcpOption::MessageType(MessageType::Ack));
            m.opts_mut().insert(DhcpOption::DomainName("corp.example\nnameserver 6.6.6.6".into()));
            m
        };
        let l = lease_from_ack(&ack, SERVER, SERVER_MAC).unwrap();
        assert!(l.search.is_empty(), "an option with a newline is dropped whole: {:?}", l.search);
        assert_eq!(l.prefix_len, 24, "classful default without a mask");
        assert_eq!(l.lease_time, Some(DEFAULT_LEASE));
        let mut m = ack.clone();
        m.opts_mut().insert(DhcpOption::DomainName("a.example b.example".into()));
        m.opts_mut().insert(DhcpOption::AddressLeaseTime(u32::MAX));
        let l = lease_from_ack(&m, SERVER, SERVER_MAC).unwrap();
        assert_eq!(l.search, vec!["a.example".to_string(), "b.example".to_string()]);
        assert_eq!(l.lease_time, None);
        assert_eq!(l.to_string(), "192.168.127.2/24 lease infinite search a.example b.example");
    }

    #[test]
    fn infinite_lease_has_no_timers() {
        let t0 = Instant::now();
        let mut c = bound(t0, &[DhcpOption::AddressLeaseTime(u32::MAX)]);
        assert_eq!(c.poll_timeout(), None);
        c.handle_timeout(t0 + Duration::from_secs(1_000_000));
        assert!(outputs(&mut c).is_empty());
        assert_eq!(c.state(), State::Bound);
    }

    #[test]
    fn foreign_and_stale_replies_are_ignored() {
        let t0 = Instant::now();
        let mut c = client(t0);
        c.handle_timeout(t0);
        let d = one_sent(&mut c);
        let offer = reply(&d.msg, MessageType::Offer, &[]);

        // Wrong xid.
        let mut m = Message::from_bytes(parse_udp_frame(&offer).unwrap().payload).unwrap();
        m.set_xid(d.msg.xid().wrapping_add(1));
        assert!(!c.handle_frame(t0, &frame_of(&m, YIADDR)));
        // Someone else's chaddr.
        let mut m = Message::from_bytes(parse_udp_frame(&offer).unwrap().payload).unwrap();
        m.set_chaddr(&[1, 2, 3, 4, 5, 6]);
        assert!(!c.handle_frame(t0, &frame_of(&m, YIADDR)));
        // A request, not a reply.
        let mut m = Message::from_bytes(parse_udp_frame(&offer).unwrap().payload).unwrap();
        m.set_opcode(Opcode::BootRequest);
        assert!(!c.handle_frame(t0, &frame_of(&m, YIADDR)));
        // An ACK while selecting.
        assert!(!c.handle_frame(t0, &reply(&d.msg, MessageType::Ack, &[])));
        // Addressed to another MAC.
        let mut other = offer.clone();
        other[..6].copy_from_slice(&[2, 2, 2, 2, 2, 2]);
        assert!(!c.handle_frame(t0, &other));
        assert!(outputs(&mut c).is_empty());
        assert_eq!(c.state(), State::Selecting);
        // The real one still works.
        assert!(c.handle_frame(t0, &offer));
    }

    #[test]
    fn garbage_frames_are_ignored() {
        let t0 = Instant::now();
        let mut c = client(t0);
        c.handle_timeout(t0);
        let d = one_sent(&mut c);
        let offer = reply(&d.msg, MessageType::Offer, &[]);
        let payload = parse_udp_frame(&offer).unwrap().payload.to_vec();
        let mut seed = 7u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        assert!(!c.handle_frame(t0, &[]));
        assert!(!c.handle_frame(t0, &[0xff; 13]));
        for len in 0..payload.len() {
            c.handle_frame(t0, &frame_of_raw(&payload[..len]));
        }
        let mut accepted = 0;
        for i in 0..20_000 {
            let mut p = payload.clone();
            for _ in 0..(1 + next() % 8) {
                let at = (next() as usize) % p.len();
                p[at] = next() as u8;
            }
            if i % 3 == 0 {
                p.truncate((next() as usize) % (payload.len() + 1));
            }
            // hlen is byte 2: make sure large values are exercised.
            if i % 5 == 0 && p.len() > 2 {
                p[2] = 200;
            }
            let mut fresh = client(t0);
            fresh.handle_timeout(t0);
            fresh.xid = d.msg.xid();
            if fresh.handle_frame(t0, &frame_of_raw(&p)) {
                accepted += 1;
            }
            // And random bytes where the Ethernet frame should be.
            let mut f = offer.clone();
            let at = (next() as usize) % f.len();
            f[at] ^= 1 << (next() % 8);
            f.truncate((next() as usize) % (offer.len() + 1));
            fresh.handle_frame(t0, &f);
        }
        // Some mutations leave a valid offer; most must not be.
        assert!(accepted < 20_000);
    }

    #[test]
    fn options_dhcproto_would_panic_on_are_filtered() {
        let t0 = Instant::now();
        let mut c = client(t0);
        c.handle_timeout(t0);
        let d = one_sent(&mut c);
        let offer = reply(&d.msg, MessageType::Offer, &[]);
        let payload = parse_udp_frame(&offer).unwrap().payload.to_vec();
        // Rapid commit with a length, SLAAC with a bad length, classless
        // routes with a /40, inserted before the real options.
        let evil: &[&[u8]] = &[&[80, 1, 0], &[116, 2, 1, 1], &[121, 5, 40, 1, 2, 3, 4], &[118, 1, 9], &[52, 1, 3]];
        for opt in evil {
            let mut p = payload[..OPTIONS_START].to_vec();
            p.extend_from_slice(opt);
            p.extend_from_slice(&payload[OPTIONS_START..]);
            assert!(decode_message(&p).is_some());
            let mut fresh = client(t0);
            fresh.handle_timeout(t0);
            fresh.poll_output();
            fresh.xid = d.msg.xid();
            assert!(fresh.handle_frame(t0, &frame_of_raw(&p)), "still a valid offer with {opt:?}");
        }
        // Random TLVs in the options area.
        let mut seed = 99u64;
        for _ in 0..20_000 {
            let mut p = payload[..OPTIONS_START].to_vec();
            for _ in 0..(seed % 5) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let code = (seed >> 33) as u8;
                let len = ((seed >> 45) % 12) as u8;
                p.push(code);
                p.push(len);
                p.extend((0..len).map(|i| (seed >> (i % 56)) as u8));
            }
            p.extend_from_slice(&payload[OPTIONS_START..]);
            let _ = decode_message(&p);
            seed = seed.wrapping_add(0x9e37_79b9);
        }
        assert!(decode_message(&payload[..239]).is_none());
        let mut bad_magic = payload.clone();
        bad_magic[236] = 0;
        assert!(decode_message(&bad_magic).is_none());
    }

    fn frame_of_raw(payload: &[u8]) -> Vec<u8> {
        build_udp_frame(
            SERVER_MAC,
            MAC,
            SocketAddrV4::new(SERVER, DHCP_SERVER_PORT),
            SocketAddrV4::new(YIADDR, DHCP_CLIENT_PORT),
            payload,
        )
        .unwrap()
    }

    #[test]
    fn link_restored_retransmits_now() {
        let t0 = Instant::now();
        let mut c = client(t0);
        c.handle_timeout(t0);
        one_sent(&mut c);
        let later = t0 + Duration::from_millis(300);
        c.link_restored(later);
        assert_eq!(kind(&one_sent(&mut c).msg), MessageType::Discover);
        let mut b = bound(t0, &[]);
        b.link_restored(later);
        assert!(outputs(&mut b).is_empty());
    }

    #[test]
    fn prefix_helpers() {
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 0, 255, 0)), None);
        assert_eq!(mask_to_prefix(Ipv4Addr::UNSPECIFIED), None);
        assert_eq!(classful_prefix(Ipv4Addr::new(10, 1, 2, 3)), 8);
        assert_eq!(classful_prefix(Ipv4Addr::new(172, 16, 0, 1)), 16);
    }
}
