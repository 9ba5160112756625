//! The DHCP server on the gateway (port 67).
//!
//! How this works: leases map a client MAC to an address and an expiry.
//! The device MAC has a static lease on the second address; other clients
//! get the lowest address that was never leased, else the lowest whose lease
//! expired, so a returning MAC finds its old address for as long as nobody
//! else needed it. DISCOVER only proposes (OFFER); REQUEST commits (ACK) or
//! refuses an address that is not the client's to have (NAK); RELEASE and
//! DECLINE free it; INFORM is answered with options only. A REQUEST for an
//! address that is free is granted even without a prior OFFER, so clients
//! keep their addresses across a host-switch restart. Time is passed in.
//! The search list (option 119, its first domain also as option 15) is the
//! configured one, or the host's current one when the server follows the
//! host's DNS settings ([`DhcpServer::follow_search`]): every reply, renewals
//! included, carries the list as it is at that moment.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Encodable, Name};
use smoltcp::wire::EthernetAddress;

use crate::config::NetConfig;
use crate::gateway::dns::hostconf::HostDnsConfig;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("undecodable DHCP message")]
    Decode,
    #[error("DHCP message is not a request from an Ethernet client")]
    NotAClientRequest,
    #[error("DHCP message has no message type")]
    NoMessageType,
}

#[derive(Debug, Clone)]
struct Lease {
    ip: Ipv4Addr,
    expires: Instant,
}

/// Where and what to answer.
#[derive(Debug)]
pub struct Reply {
    pub payload: Vec<u8>,
    pub dst_ip: Ipv4Addr,
    pub dst_mac: EthernetAddress,
    pub kind: MessageType,
}

#[derive(Debug)]
pub struct DhcpServer {
    server_ip: Ipv4Addr,
    subnet: ipnet::Ipv4Net,
    host_ip: Ipv4Addr,
    netmask: Ipv4Addr,
    mtu: u16,
    lease_time: Duration,
    search: Vec<Name>,
    /// The host's DNS settings, when the search list follows them.
    host_dns: Option<tokio::sync::watch::Receiver<Arc<HostDnsConfig>>>,
    static_by_mac: HashMap<EthernetAddress, Ipv4Addr>,
    static_by_ip: HashMap<Ipv4Addr, EthernetAddress>,
    leases: HashMap<EthernetAddress, Lease>,
    owner: HashMap<Ipv4Addr, EthernetAddress>,
}

impl DhcpServer {
    pub fn new(cfg: &NetConfig) -> Self {
        let search = names(&cfg.search_domains);
        let mut s = DhcpServer {
            server_ip: cfg.gateway_ip,
            subnet: cfg.subnet,
            host_ip: cfg.host_ip,
            netmask: cfg.netmask(),
            mtu: cfg.mtu,
            lease_time: Duration::from_secs(cfg.lease_secs.into()),
            search,
            host_dns: None,
            static_by_mac: HashMap::new(),
            static_by_ip: HashMap::new(),
            leases: HashMap::new(),
            owner: HashMap::new(),
        };
        s.add_static(cfg.device_mac, cfg.device_ip);
        s
    }

    /// From now on, hands out the host's search list as `host` reports it
    /// (replacing the configured one).
    pub fn follow_search(&mut self, mut host: tokio::sync::watch::Receiver<Arc<HostDnsConfig>>) {
        self.search = names(&host.borrow_and_update().search);
        self.host_dns = Some(host);
    }

    /// The search list being handed out.
    pub fn search_domains(&self) -> Vec<String> {
        self.search.iter().map(|n| n.to_ascii().trim_end_matches('.').to_string()).collect()
    }

    pub fn add_static(&mut self, mac: EthernetAddress, ip: Ipv4Addr) {
        self.static_by_mac.insert(mac, ip);
        self.static_by_ip.insert(ip, mac);
    }

    /// Leases that have not expired, by address.
    pub fn active_leases(&self, now: Instant) -> Vec<(Ipv4Addr, EthernetAddress)> {
        let mut v: Vec<_> = self.leases.iter().filter(|(_, l)| l.expires > now).map(|(mac, l)| (l.ip, *mac)).collect();
        v.sort();
        v
    }

    /// The MAC an address is leased to, if the lease is live.
    pub fn mac_of(&self, ip: Ipv4Addr, now: Instant) -> Option<EthernetAddress> {
        let mac = self.owner.get(&ip)?;
        self.leases.get(mac).filter(|l| l.expires > now && l.ip == ip).map(|_| *mac)
    }

    fn usable(&self, ip: Ipv4Addr) -> bool {
        self.subnet.contains(&ip)
            && ip != self.subnet.network()
            && ip != self.subnet.broadcast()
            && ip != self.server_ip
            && ip != self.host_ip
    }

    /// May `mac` hold `ip` now?
    fn assignable(&self, mac: EthernetAddress, ip: Ipv4Addr, now: Instant) -> bool {
        if !self.usable(ip) {
            return false;
        }
        if let Some(fixed) = self.static_by_mac.get(&mac) {
            return *fixed == ip;
        }
        if self.static_by_ip.contains_key(&ip) {
            return false;
        }
        match self.owner.get(&ip) {
            None => true,
            Some(m) if *m == mac => true,
            Some(m) => self.leases.get(m).is_none_or(|l| l.expires <= now || l.ip != ip),
        }
    }

    fn choose(&self, mac: EthernetAddress, requested: Option<Ipv4Addr>, now: Instant) -> Option<Ipv4Addr> {
        if let Some(ip) = self.static_by_mac.get(&mac) {
            return Some(*ip);
        }
        if let Some(l) = self.leases.get(&mac)
            && self.assignable(mac, l.ip, now)
        {
            return Some(l.ip);
        }
        if let Some(ip) = requested.filter(|ip| self.assignable(mac, *ip, now)) {
            return Some(ip);
        }
        let first = u32::from(self.subnet.network()) + 1;
        let last = u32::from(self.subnet.broadcast());
        // Bounded scan, so a huge subnet cannot make each DISCOVER slow.
        let pool = || (first..last).take(1 << 16).map(Ipv4Addr::from);
        pool()
            .find(|ip| self.usable(*ip) && !self.static_by_ip.contains_key(ip) && !self.owner.contains_key(ip))
            .or_else(|| pool().find(|ip| self.assignable(mac, *ip, now)))
    }

    fn commit(&mut self, mac: EthernetAddress, ip: Ipv4Addr, now: Instant) {
        if let Some(old) = self.leases.get(&mac)
            && old.ip != ip
            && self.owner.get(&old.ip) == Some(&mac)
        {
            self.owner.remove(&old.ip);
        }
        if let Some(prev) = self.owner.insert(ip, mac)
            && prev != mac
        {
            self.leases.remove(&prev);
        }
        self.leases.insert(mac, Lease { ip, expires: now + self.lease_time });
    }

    fn release(&mut self, mac: EthernetAddress, ip: Ipv4Addr) {
        if self.leases.get(&mac).is_some_and(|l| l.ip == ip) {
            self.leases.remove(&mac);
            self.owner.remove(&ip);
        }
    }

    /// The search list as it is now (the host's, when it follows it), for
    /// the IPv6 side's advertisements.
    pub fn current_search(&mut self) -> Vec<String> {
        self.refresh_search();
        self.search_domains()
    }

    #[cfg(test)]
    pub fn set_search_for_tests(&mut self, domains: Vec<String>) {
        self.search = names(&domains);
    }

    fn refresh_search(&mut self) {
        if let Some(host) = &mut self.host_dns
            && host.has_changed().unwrap_or(false)
        {
            self.search = names(&host.borrow_and_update().search);
        }
    }

    /// Handles one datagram that arrived on port 67.
    pub fn handle(&mut self, payload: &[u8], now: Instant) -> Result<Option<Reply>, DhcpError> {
        self.refresh_search();
        // Only the options read below pass to dhcproto (see rdnet_wire::dhcp).
        let req =
            rdnet_wire::dhcp::decode_filtered(payload, |code, len| matches!((code, len), (53, 1) | (50, 4) | (54, 4)))
                .ok_or(DhcpError::Decode)?;
        // hlen is checked before chaddr(), which would panic on hlen > 16.
        if req.opcode() != Opcode::BootRequest || req.htype() != HType::Eth || req.hlen() != 6 {
            return Err(DhcpError::NotAClientRequest);
        }
        let mac = EthernetAddress::from_bytes(req.chaddr());
        if !mac.is_unicast() {
            return Err(DhcpError::NotAClientRequest);
        }
        let kind = req.opts().msg_type().ok_or(DhcpError::NoMessageType)?;
        let requested = match req.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let server_id = match req.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        match kind {
            MessageType::Discover => {
                let Some(ip) = self.choose(mac, requested, now) else {
                    return Ok(None); // pool exhausted: stay silent, as RFC 2131 allows
                };
                Ok(Some(self.reply(&req, mac, MessageType::Offer, ip)))
            }
            MessageType::Request => {
                if server_id.is_some_and(|s| s != self.server_ip) {
                    return Ok(None); // the client chose another server
                }
                let wanted = requested.or_else(|| Some(req.ciaddr()).filter(|ip| !ip.is_unspecified()));
                match wanted {
                    Some(ip) if self.assignable(mac, ip, now) => {
                        self.commit(mac, ip, now);
                        Ok(Some(self.reply(&req, mac, MessageType::Ack, ip)))
                    }
                    _ => Ok(Some(self.reply(&req, mac, MessageType::Nak, Ipv4Addr::UNSPECIFIED))),
                }
            }
            MessageType::Release => {
                self.release(mac, req.ciaddr());
                Ok(None)
            }
            MessageType::Decline => {
                if let Some(ip) = requested {
                    self.release(mac, ip);
                }
                Ok(None)
            }
            MessageType::Inform => Ok(Some(self.reply(&req, mac, MessageType::Ack, Ipv4Addr::UNSPECIFIED))),
            _ => Ok(None),
        }
    }

    fn reply(&self, req: &Message, mac: EthernetAddress, kind: MessageType, yiaddr: Ipv4Addr) -> Reply {
        let inform = kind == MessageType::Ack && yiaddr.is_unspecified();
        let mut m = Message::default();
        m.set_opcode(Opcode::BootReply)
            .set_htype(HType::Eth)
            .set_xid(req.xid())
            .set_flags(req.flags())
            .set_giaddr(req.giaddr())
            .set_chaddr(&mac.0);
        if kind != MessageType::Nak {
            m.set_yiaddr(yiaddr).set_siaddr(self.server_ip);
        }
        if inform || kind == MessageType::Ack {
            m.set_ciaddr(req.ciaddr());
        }
        let opts = m.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(self.server_ip));
        if kind != MessageType::Nak {
            if !inform {
                let secs = self.lease_time.as_secs() as u32;
                opts.insert(DhcpOption::AddressLeaseTime(secs));
                opts.insert(DhcpOption::Renewal(secs / 2));
                opts.insert(DhcpOption::Rebinding(secs / 8 * 7));
            }
            opts.insert(DhcpOption::SubnetMask(self.netmask));
            opts.insert(DhcpOption::Router(vec![self.server_ip]));
            opts.insert(DhcpOption::DomainNameServer(vec![self.server_ip]));
            opts.insert(DhcpOption::InterfaceMtu(self.mtu));
            if let Some(first) = self.search.first() {
                opts.insert(DhcpOption::DomainName(first.to_ascii().trim_end_matches('.').to_string()));
                opts.insert(DhcpOption::DomainSearch(self.search.clone()));
            }
        }
        // RFC 2131 §4.1: where the answer goes.
        let ciaddr = req.ciaddr();
        let (dst_ip, dst_mac) = if kind == MessageType::Nak {
            (Ipv4Addr::BROADCAST, EthernetAddress::BROADCAST)
        } else if !ciaddr.is_unspecified() {
            (ciaddr, mac)
        } else if req.flags().broadcast() {
            (Ipv4Addr::BROADCAST, EthernetAddress::BROADCAST)
        } else {
            (yiaddr, mac)
        };
        // Encoding our own well-formed message cannot fail; an empty payload
        // (dropped by the caller) is the safe answer if it ever did.
        let payload = m.to_vec().unwrap_or_default();
        Reply { payload, dst_ip, dst_mac, kind }
    }
}

/// Search domains as DNS names; ones that are not names are left out.
fn names(domains: &[String]) -> Vec<Name> {
    domains.iter().filter_map(|d| Name::from_str(d).ok()).collect()
}

/// Builds a client message (for tests and tools).
pub fn client_message(mac: EthernetAddress, kind: MessageType, xid: u32, opts: Vec<DhcpOption>) -> Vec<u8> {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootRequest).set_htype(HType::Eth).set_xid(xid).set_chaddr(&mac.0).set_flags(Flags::default());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in opts {
        m.opts_mut().insert(o);
    }
    m.to_vec().unwrap_or_default()
}

/// The gateway's side of DHCP: a message for the server's port, answered
/// through the switch like every frame the gateway sends.
impl super::Network {
    pub(super) fn handle_dhcp(&mut self, data: &[u8], now: Instant, out: &mut impl super::FrameSink) {
        let reply = match self.dhcp.handle(data, now) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                self.stats.drops.dhcp_invalid += 1;
                crate::limited_warn!(self.logs, now, "dhcp-invalid", error = %e, "ignoring DHCP message");
                return;
            }
        };
        if reply.payload.is_empty() {
            return;
        }
        if !reply.dst_ip.is_broadcast() && !reply.dst_ip.is_unspecified() {
            self.remember(reply.dst_ip, reply.dst_mac);
        }
        tracing::debug!(ip = %reply.dst_ip, mac = %rdnet_wire::MacDisplay(reply.dst_mac.0), "DHCP {:?}", reply.kind);
        let mut buf = std::mem::take(&mut self.scratch);
        rdnet_wire::frame::udp(
            &mut buf,
            self.cfg.gateway_mac,
            reply.dst_mac,
            std::net::SocketAddrV4::new(self.cfg.gateway_ip, SERVER_PORT),
            std::net::SocketAddrV4::new(reply.dst_ip, CLIENT_PORT),
            &reply.payload,
        );
        self.stats.dhcp_replies += 1;
        self.deliver(&buf, now, out);
        self.scratch = buf;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEVICE_MAC;
    use dhcproto::{Decodable, Decoder};

    const OTHER: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x33]);
    const THIRD: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x44]);

    fn server() -> DhcpServer {
        let mut cfg = NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap();
        cfg.search_domains = vec!["example.test".into()];
        DhcpServer::new(&cfg)
    }

    fn decode(r: &Reply) -> Message {
        Message::decode(&mut Decoder::new(&r.payload)).unwrap()
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 127, last)
    }

    fn request(s: &mut DhcpServer, mac: EthernetAddress, want: Ipv4Addr, now: Instant) -> Reply {
        let m = client_message(
            mac,
            MessageType::Request,
            7,
            vec![DhcpOption::RequestedIpAddress(want), DhcpOption::ServerIdentifier(ip(1))],
        );
        s.handle(&m, now).unwrap().unwrap()
    }

    #[test]
    fn device_gets_static_lease_with_all_options() {
        let mut s = server();
        let now = Instant::now();
        let r = s.handle(&client_message(DEVICE_MAC, MessageType::Discover, 42, vec![]), now).unwrap().unwrap();
        assert_eq!(r.kind, MessageType::Offer);
        let m = decode(&r);
        assert_eq!(m.xid(), 42);
        assert_eq!(m.yiaddr(), ip(2));
        assert_eq!(m.opcode(), Opcode::BootReply);
        let o = m.opts();
        assert_eq!(o.get(OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(ip(1))));
        assert_eq!(o.get(OptionCode::AddressLeaseTime), Some(&DhcpOption::AddressLeaseTime(3600)));
        assert_eq!(o.get(OptionCode::SubnetMask), Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0))));
        assert_eq!(o.get(OptionCode::Router), Some(&DhcpOption::Router(vec![ip(1)])));
        assert_eq!(o.get(OptionCode::DomainNameServer), Some(&DhcpOption::DomainNameServer(vec![ip(1)])));
        assert_eq!(o.get(OptionCode::InterfaceMtu), Some(&DhcpOption::InterfaceMtu(1500)));
        assert!(matches!(o.get(OptionCode::DomainSearch), Some(DhcpOption::DomainSearch(d)) if d.len() == 1));
        assert_eq!(o.get(OptionCode::DomainName), Some(&DhcpOption::DomainName("example.test".into())));
        let r = request(&mut s, DEVICE_MAC, ip(2), now);
        assert_eq!(r.kind, MessageType::Ack);
        assert_eq!((r.dst_ip, r.dst_mac), (ip(2), DEVICE_MAC));
        assert_eq!(s.active_leases(now), vec![(ip(2), DEVICE_MAC)]);
    }

    #[test]
    fn others_get_lowest_free_and_nak_for_foreign_address() {
        let mut s = server();
        let now = Instant::now();
        assert_eq!(request(&mut s, OTHER, ip(3), now).kind, MessageType::Ack);
        // The static address, someone else's address, the gateway, host alias, out of subnet.
        for bad in [ip(2), ip(3), ip(1), ip(254), ip(255), Ipv4Addr::new(10, 0, 0, 5)] {
            let r = request(&mut s, THIRD, bad, now);
            assert_eq!(r.kind, MessageType::Nak, "{bad}");
            assert_eq!(r.dst_mac, EthernetAddress::BROADCAST);
        }
        let r = s.handle(&client_message(THIRD, MessageType::Discover, 1, vec![]), now).unwrap().unwrap();
        assert_eq!(decode(&r).yiaddr(), ip(4));
    }

    #[test]
    fn release_frees_and_returning_mac_gets_old_address() {
        let mut s = server();
        let t0 = Instant::now();
        request(&mut s, OTHER, ip(3), t0);
        request(&mut s, THIRD, ip(4), t0);
        // OTHER's lease expires; it comes back later and gets .3 again.
        let later = t0 + Duration::from_secs(7200);
        let r = s.handle(&client_message(OTHER, MessageType::Discover, 1, vec![]), later).unwrap().unwrap();
        assert_eq!(decode(&r).yiaddr(), ip(3));
        // RELEASE frees .4 for the next newcomer... after never-used ones.
        let mut rel = Message::default();
        rel.set_opcode(Opcode::BootRequest).set_htype(HType::Eth).set_chaddr(&THIRD.0).set_ciaddr(ip(4));
        rel.opts_mut().insert(DhcpOption::MessageType(MessageType::Release));
        assert!(s.handle(&rel.to_vec().unwrap(), t0).unwrap().is_none());
        assert!(s.active_leases(t0).iter().all(|(_, m)| *m != THIRD));
        assert_eq!(request(&mut s, EthernetAddress([2, 9, 9, 9, 9, 9]), ip(4), t0).kind, MessageType::Ack);
    }

    #[test]
    fn renew_by_ciaddr_and_inform() {
        let mut s = server();
        let now = Instant::now();
        request(&mut s, OTHER, ip(3), now);
        let mut renew = Message::default();
        renew.set_opcode(Opcode::BootRequest).set_htype(HType::Eth).set_chaddr(&OTHER.0).set_ciaddr(ip(3));
        renew.opts_mut().insert(DhcpOption::MessageType(MessageType::Request));
        let r = s.handle(&renew.to_vec().unwrap(), now).unwrap().unwrap();
        assert_eq!(r.kind, MessageType::Ack);
        assert_eq!(r.dst_ip, ip(3));
        let mut inform = renew.clone();
        inform.opts_mut().insert(DhcpOption::MessageType(MessageType::Inform));
        let r = s.handle(&inform.to_vec().unwrap(), now).unwrap().unwrap();
        let m = decode(&r);
        assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(m.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert!(m.opts().get(OptionCode::Router).is_some());
    }

    #[test]
    fn other_server_chosen_and_garbage() {
        let mut s = server();
        let now = Instant::now();
        let m = client_message(
            OTHER,
            MessageType::Request,
            1,
            vec![DhcpOption::RequestedIpAddress(ip(3)), DhcpOption::ServerIdentifier(ip(9))],
        );
        assert!(s.handle(&m, now).unwrap().is_none());
        assert!(s.handle(b"", now).is_err());
        assert!(s.handle(&[0u8; 300], now).is_err());
        // hlen 200 must not reach chaddr()'s slice.
        let mut bytes = client_message(OTHER, MessageType::Discover, 1, vec![]);
        bytes[2] = 200;
        assert!(s.handle(&bytes, now).is_err());
        // Options dhcproto would assert on (rapid commit with a length,
        // classless routes with a /40) are filtered before decoding.
        for evil in [&[80u8, 1, 0][..], &[121, 5, 40, 1, 2, 3, 4], &[118, 1, 9]] {
            let ok = client_message(OTHER, MessageType::Discover, 1, vec![]);
            let mut p = ok[..240].to_vec();
            p.extend_from_slice(evil);
            p.extend_from_slice(&ok[240..]);
            assert!(s.handle(&p, now).unwrap().is_some());
        }
    }

    #[test]
    fn search_list_follows_the_host() {
        let mut s = server();
        let host = HostDnsConfig { servers: vec![], search: vec!["vpn.corp.test".into(), "corp.test".into()] };
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(host));
        s.follow_search(rx);
        let now = Instant::now();
        let search_of = |r: &Reply| {
            let m = decode(r);
            let domain = m.opts().get(OptionCode::DomainName).cloned();
            let list = match m.opts().get(OptionCode::DomainSearch) {
                Some(DhcpOption::DomainSearch(d)) => d.iter().map(|n| n.to_string()).collect(),
                _ => vec![],
            };
            (domain, list)
        };
        let r = request(&mut s, OTHER, ip(3), now);
        assert_eq!(
            search_of(&r),
            (
                Some(DhcpOption::DomainName("vpn.corp.test".into())),
                vec!["vpn.corp.test.".to_string(), "corp.test.".to_string()]
            )
        );
        // The VPN drops: the next reply (a renewal) carries the new list.
        tx.send(Arc::new(HostDnsConfig { servers: vec![], search: vec!["home.test".into()] })).unwrap();
        let r = request(&mut s, OTHER, ip(3), now);
        assert_eq!(search_of(&r), (Some(DhcpOption::DomainName("home.test".into())), vec!["home.test.".to_string()]));
        assert_eq!(s.search_domains(), ["home.test"]);
        // None at all: neither option.
        tx.send(Arc::new(HostDnsConfig::default())).unwrap();
        let r = request(&mut s, OTHER, ip(3), now);
        assert_eq!(search_of(&r), (None, vec![]));
    }
}
