//! Talking to upstream resolvers: one exchange over UDP or TCP, and how
//! each upstream has been doing.
//!
//! How this works: each UDP exchange uses a fresh socket (a random source
//! port per query) connected to the resolver, so only that resolver's
//! datagrams arrive; the first one carrying the query's ID with QR set is
//! the answer. A resolver that is not listening shows up as ECONNREFUSED at
//! once, so the caller moves on (or answers SERVFAIL) without waiting. A TCP
//! exchange writes one length-prefixed query and reads one answer. Callers
//! bound every exchange with a timeout. [`Health`] counts each upstream's
//! consecutive failures: after [`FAILURES_TO_SKIP`] it goes to the end of
//! the order for [`SKIP_FOR`], so queries stop waiting for it, yet it is
//! still tried when everything before it fails.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

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

/// Consecutive failures (timeouts, errors, slower than another upstream)
/// after which an upstream is skipped.
pub const FAILURES_TO_SKIP: u32 = 2;
/// How long a failing upstream is skipped; afterwards it is tried again,
/// and one more failure skips it again.
pub const SKIP_FOR: Duration = Duration::from_secs(30);

/// How the upstreams have been doing: which to try first.
#[derive(Debug, Default)]
pub struct Health {
    entries: HashMap<SocketAddr, Entry>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    failures: u32,
    skip_until: Option<Instant>,
}

impl Health {
    /// `list` in the order to try it: upstreams not being skipped first, in
    /// list order, then the skipped ones, the soonest back first. Nothing
    /// is left out, so a query still reaches a skipped upstream when all
    /// others fail. Forgets upstreams no longer in `list`.
    pub fn order(&mut self, list: &[SocketAddr], now: Instant) -> Vec<SocketAddr> {
        self.entries.retain(|up, _| list.contains(up));
        let skipped_until = |up: &SocketAddr| self.entries.get(up).and_then(|e| e.skip_until).filter(|t| *t > now);
        let mut order: Vec<SocketAddr> = list.iter().copied().filter(|up| skipped_until(up).is_none()).collect();
        let mut skipped: Vec<(Instant, SocketAddr)> =
            list.iter().filter_map(|up| skipped_until(up).map(|t| (t, *up))).collect();
        skipped.sort_by_key(|(t, _)| *t);
        order.extend(skipped.into_iter().map(|(_, up)| up));
        order
    }

    /// An answer came from `up`.
    pub fn success(&mut self, up: SocketAddr) {
        self.entries.remove(&up);
    }

    /// `up` failed; true when that makes it skipped from now on.
    pub fn failure(&mut self, up: SocketAddr, now: Instant) -> bool {
        let e = self.entries.entry(up).or_default();
        e.failures = e.failures.saturating_add(1);
        if e.failures >= FAILURES_TO_SKIP && e.skip_until.is_none_or(|t| t <= now) {
            e.skip_until = Some(now + SKIP_FOR);
            return true;
        }
        false
    }

    /// Whether `up` is being skipped now.
    pub fn is_skipped(&self, up: &SocketAddr, now: Instant) -> bool {
        self.entries.get(up).and_then(|e| e.skip_until).is_some_and(|t| t > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failing_upstreams_go_last_for_a_while() {
        let (a, b, c) = (addr("10.0.0.1:53"), addr("10.0.0.2:53"), addr("10.0.0.3:53"));
        let list = [a, b, c];
        let mut h = Health::default();
        let t0 = Instant::now();
        assert_eq!(h.order(&list, t0), list);
        // One failure is not enough; a success forgets it.
        assert!(!h.failure(a, t0));
        h.success(a);
        assert!(!h.failure(a, t0));
        assert_eq!(h.order(&list, t0), list);
        // Two in a row: skipped, but still tried last.
        assert!(h.failure(a, t0));
        assert!(h.is_skipped(&a, t0));
        assert_eq!(h.order(&list, t0), [b, c, a]);
        let t1 = t0 + Duration::from_secs(1);
        assert!(!h.failure(c, t1) && h.failure(c, t1));
        assert_eq!(h.order(&list, t1), [b, a, c], "skipped ones: soonest back first");
        // Back after SKIP_FOR; one more failure skips it again at once.
        let t2 = t0 + SKIP_FOR;
        assert_eq!(h.order(&list, t2), [a, b, c]);
        assert!(h.failure(a, t2));
        assert_eq!(h.order(&list, t2), [b, c, a]);
        // A success clears it; an upstream that leaves the list is forgotten.
        h.success(a);
        assert_eq!(h.order(&[a, b], t2), [a, b]);
        assert!(!h.is_skipped(&c, t2) && h.entries.len() <= 2);
    }
}
