//! Talking to the upstream resolvers: where they are, and one exchange over
//! UDP or TCP.
//!
//! How this works: each UDP exchange uses a fresh socket (a random source
//! port per query) connected to the resolver, so only that resolver's
//! datagrams arrive; the first one carrying the query's ID with QR set is
//! the answer. A resolver that is not listening shows up as ECONNREFUSED at
//! once, so the caller moves on (or answers SERVFAIL) without waiting. A TCP
//! exchange writes one length-prefixed query and reads one answer. Callers
//! bound every exchange with a timeout. Without configured upstreams the
//! host's `/etc/resolv.conf` is used (Unix), re-read when it changes.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UdpSocket};

use super::message::id_and_qr;

pub const DNS_PORT: u16 = 53;
/// The largest DNS message (over TCP; a UDP datagram is smaller still).
pub const MAX_MESSAGE: usize = 65535;

/// Sends `query` to `upstream` over UDP and returns the first datagram that
/// answers it (same ID, QR set).
pub async fn exchange_udp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let (id, _) = id_and_qr(query).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "short query"))?;
    let bind: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        // An ICMP error (nobody listening) only raises EPOLLERR, which a
        // plain `recv().await` would not wake for: wait for either.
        let ready = sock.ready(Interest::READABLE | Interest::ERROR).await?;
        match sock.try_recv(&mut buf) {
            Ok(n) if id_and_qr(&buf[..n]) == Some((id, true)) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if ready.is_error() {
                    if let Some(e) = sock.take_error()? {
                        return Err(e);
                    }
                    sock.try_io(Interest::ERROR, || Err::<(), _>(io::ErrorKind::WouldBlock.into())).ok();
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sends `query` to `upstream` over TCP (2-byte length framing) and reads
/// one answer.
pub async fn exchange_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let len = u16::try_from(query.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
    let mut stream = TcpStream::connect(upstream).await?;
    stream.set_nodelay(true)?;
    let mut out = Vec::with_capacity(2 + query.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    stream.write_all(&out).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}

/// The `nameserver` lines of a resolv.conf, as socket addresses on port 53.
/// Scoped IPv6 addresses (`fe80::1%eth0`) are skipped.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            words.next()?.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, DNS_PORT))
        .collect()
}

/// Where forwarded queries go.
#[derive(Debug)]
pub struct Upstreams {
    configured: Vec<SocketAddr>,
    /// From the host's configuration, and when it was last looked at.
    host: Vec<SocketAddr>,
    checked: Option<Instant>,
    modified: Option<SystemTime>,
}

/// How often the host's resolv.conf is checked for changes.
const RECHECK: Duration = Duration::from_secs(5);

#[cfg(unix)]
const RESOLV_CONF: &str = "/etc/resolv.conf";

impl Upstreams {
    pub fn new(configured: Vec<SocketAddr>) -> Self {
        Upstreams { configured, host: Vec::new(), checked: None, modified: None }
    }

    /// The resolvers to try, in order. Empty when none are configured and
    /// the host has none either (then every forwarded query gets SERVFAIL).
    pub fn current(&mut self, now: Instant) -> Vec<SocketAddr> {
        if !self.configured.is_empty() {
            return self.configured.clone();
        }
        if self.checked.is_none_or(|t| now.saturating_duration_since(t) >= RECHECK) {
            self.checked = Some(now);
            self.reload_host();
        }
        self.host.clone()
    }

    #[cfg(unix)]
    fn reload_host(&mut self) {
        let modified = std::fs::metadata(RESOLV_CONF).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified == self.modified {
            return;
        }
        self.modified = modified;
        let servers = std::fs::read_to_string(RESOLV_CONF).map(|t| parse_resolv_conf(&t)).unwrap_or_default();
        if servers != self.host {
            tracing::info!(
                "DNS upstreams from {RESOLV_CONF}: {}",
                servers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            );
        }
        self.host = servers;
    }

    /// Windows: the host's resolvers are not read yet; with no
    /// `--dns-upstream`, forwarded queries get SERVFAIL.
    #[cfg(not(unix))]
    fn reload_host(&mut self) {
        if self.modified.is_none() {
            self.modified = Some(SystemTime::UNIX_EPOCH);
            tracing::warn!("no DNS upstreams configured (--dns-upstream): names outside the local zones fail");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lines() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.53\nnameserver  ::1 \nnameserver fe80::1%eth0\n\
                    nameserverx 1.1.1.1\noptions ndots:2\nnameserver\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec!["10.0.0.53:53".parse::<SocketAddr>().unwrap(), "[::1]:53".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn configured_upstreams_win() {
        let up: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        let mut u = Upstreams::new(vec![up]);
        assert_eq!(u.current(Instant::now()), vec![up]);
    }
}
