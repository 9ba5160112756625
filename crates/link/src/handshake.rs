//! The handshake that pairs network-setup (the guest, in the WSL VM) with
//! host-switch (the host) before the data link opens (spec/COMPAT.md §4).
//!
//! How this works. The guest listens on its handshake endpoint (vsock port
//! 6669 in WSL). For every connection it writes the signature phrase and then
//! reads five bytes: `READY` completes the handshake; anything else (other
//! bytes, an early close, silence past a timeout) closes that connection and
//! the guest keeps listening. Connections are answered concurrently, so one
//! silent peer cannot hold up the others ([`guest_accept_ready`]). The host
//! finds its guest by dialing that endpoint once a second and reading the
//! signature, until it matches one the host accepts or a deadline passes
//! (300 s, [`host_find_peer`]). The host accepts both generations of
//! Rancher Desktop's phrase by default ([`HOST_SIGNATURES`]): it reads until
//! what arrived is one of its phrases or can no longer become one. On a
//! wrong phrase it writes its own back before closing, so the guest can say
//! which phrase the host wanted (a Go guest just reads "githu", not
//! `READY`, and closes, as for any other refusal). Both sides log a wrong
//! phrase at info, with both phrases, at most once a minute. With its own data listener already up, it dials once
//! more, checks the signature again and writes `READY`
//! ([`host_send_ready`]); the guest then dials the host's data endpoint (port
//! 6656). [`host_handshake_loop`] adds the later Rancher Desktop rules: after
//! `READY` the host waits 10 s for a data connection and otherwise redoes the
//! handshake, at most 5 times in a row; and whenever its data connections are
//! all gone it starts over, so a restarted guest or a guest that lost its
//! link pairs again without a restart of the host. The host's accept loop
//! reports data connections through [`DataLinks`].
//!
//! Every function here works on any byte stream, so the protocol is tested
//! over in-memory pipes and unix sockets as well as used over vsock.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::endpoint::{Endpoint, Listener, dial};

/// The phrase of the current Rancher Desktop (`src/go/networking`,
/// `pkg/vsock/constants.go`): what network-setup writes by default.
pub const SIGNATURE: &str = "github.com/rancher-sandbox/rancher-desktop/src/go/networking";
/// The seed's phrase (rancher-desktop-networking v1.2.7).
pub const SEED_SIGNATURE: &str = "github.com/rancher-sandbox/rancher-desktop-networking";
/// What host-switch accepts by default: either generation of network-setup.
pub const HOST_SIGNATURES: [&str; 2] = [SIGNATURE, SEED_SIGNATURE];
/// How often a wrong phrase is logged at info on either side.
const WRONG_SIGNATURE_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// What the host writes once its data listener is up.
pub const READY: &[u8; 5] = b"READY";
/// The guest's handshake port and the host's data port (vsock).
pub const HANDSHAKE_PORT: u32 = 6669;
pub const DATA_PORT: u32 = 6656;
/// Longest signature either side accepts (it sizes the host's read).
pub const MAX_SIGNATURE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the peer closed the connection after {got} of {want} bytes")]
    Closed { got: usize, want: usize },
    #[error("no answer within {}", Seconds(*.0))]
    Timeout(Duration),
    #[error("the peer's signature {got:?} is not {want}")]
    WrongSignature { got: String, want: String },
    #[error("expected READY, got {0:?}")]
    NotReady(String),
    #[error("cannot connect to {endpoint}")]
    Dial {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("handshake I/O failed")]
    Io(#[source] io::Error),
    #[error("no peer at {endpoint} answered with the signature within {}", Seconds(*.waited))]
    NotFound {
        endpoint: String,
        waited: Duration,
        #[source]
        last: Option<Box<HandshakeError>>,
    },
    #[error("no data connection arrived after {attempts} handshakes ({} each)", Seconds(*.wait))]
    NoDataConnection { attempts: u32, wait: Duration },
}

/// A duration as people read it in a log: whole seconds from one second
/// up (`300 s`), milliseconds below.
#[derive(Debug, Clone, Copy)]
pub struct Seconds(pub Duration);

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 >= Duration::from_secs(1) {
            write!(f, "{} s", self.0.as_secs())
        } else {
            write!(f, "{} ms", self.0.as_millis())
        }
    }
}

/// Allows one log line per [`WRONG_SIGNATURE_LOG_INTERVAL`] per process
/// (per side: host and guest each keep one).
struct OncePerInterval(std::sync::Mutex<Option<std::time::Instant>>);

impl OncePerInterval {
    const fn new() -> Self {
        OncePerInterval(std::sync::Mutex::new(None))
    }

    fn allow(&self) -> bool {
        let Ok(mut last) = self.0.lock() else { return false };
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < WRONG_SIGNATURE_LOG_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }
}

static GUEST_WRONG_SIGNATURE_LOG: OncePerInterval = OncePerInterval::new();
static HOST_WRONG_SIGNATURE_LOG: OncePerInterval = OncePerInterval::new();

/// The phrases a host accepts, as a message names them.
fn phrases(signatures: &[impl AsRef<str>]) -> String {
    signatures.iter().map(|s| format!("{:?}", s.as_ref())).collect::<Vec<_>>().join(" or ")
}

/// Checks a `--signature` value: non-empty and at most [`MAX_SIGNATURE`] bytes.
pub fn validate_signature(signature: &str) -> Result<(), String> {
    if signature.is_empty() {
        return Err("the signature phrase must not be empty".into());
    }
    if signature.len() > MAX_SIGNATURE {
        return Err(format!("the signature phrase is longer than {MAX_SIGNATURE} bytes"));
    }
    Ok(())
}

/// At most 120 bytes of `b`, as text, for messages.
fn printable(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(120)]).into_owned()
}

/// Reads exactly `n` bytes within `limit`.
async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize, limit: Duration) -> Result<Vec<u8>, HandshakeError> {
    let fill = async {
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match s.read(&mut buf[got..]).await {
                Ok(0) => return Err(HandshakeError::Closed { got, want: n }),
                Ok(k) => got += k,
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
        Ok(buf)
    };
    timeout(limit, fill).await.map_err(|_| HandshakeError::Timeout(limit))?
}

/// Writes all of `data` and flushes, within `limit`.
async fn write_all<S: AsyncWrite + Unpin>(s: &mut S, data: &[u8], limit: Duration) -> Result<(), HandshakeError> {
    let write = async {
        s.write_all(data).await?;
        s.flush().await
    };
    timeout(limit, write).await.map_err(|_| HandshakeError::Timeout(limit))?.map_err(HandshakeError::Io)
}

// ---------------------------------------------------------------- guest side

/// The guest's half on one accepted connection: writes the signature, then
/// expects `READY` within `limit`.
pub async fn guest_answer<S>(s: &mut S, signature: &str, limit: Duration) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    write_all(s, signature.as_bytes(), limit).await?;
    let mut got = read_n(s, READY.len(), limit).await?;
    if got == READY {
        return Ok(());
    }
    // Not READY: perhaps a host that wants another phrase and wrote it
    // back. Its write comes in one piece, so a short wait gets the rest.
    let mut rest = vec![0u8; MAX_SIGNATURE];
    if let Ok(Ok(n)) = timeout(Duration::from_millis(300), s.read(&mut rest)).await {
        got.extend_from_slice(&rest[..n]);
    }
    Err(HandshakeError::NotReady(printable(&got)))
}

/// Accepts connections on `listener` and answers each with [`guest_answer`]
/// until one of them says `READY`; returns that peer's name. Failed
/// connections are closed and logged; accept errors are retried. Runs until
/// it succeeds (the caller decides when to give up, e.g. on a signal).
pub async fn guest_accept_ready(listener: &Listener, signature: &str, limit: Duration) -> String {
    let mut pending: JoinSet<(String, Result<(), HandshakeError>)> = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((mut stream, peer)) => {
                    debug!(%peer, "handshake connection");
                    let signature = signature.to_string();
                    pending.spawn(async move {
                        let result = guest_answer(&mut stream, &signature, limit).await;
                        (peer, result)
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accepting a handshake connection failed");
                    sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = pending.join_next(), if !pending.is_empty() => match done {
                Ok((peer, Ok(()))) => {
                    info!(%peer, "handshake complete: the host is READY");
                    return peer;
                }
                // A probe reads the signature and closes: that is normal.
                Ok((peer, Err(HandshakeError::Closed { got: 0, .. }))) => {
                    debug!(%peer, "handshake probe answered");
                }
                Ok((peer, Err(HandshakeError::NotReady(got)))) if got.len() > READY.len() => {
                    if GUEST_WRONG_SIGNATURE_LOG.allow() {
                        info!(
                            %peer,
                            "handshake refused: host-switch expects the signature {got:?}, this side sends {signature:?} (--signature)"
                        );
                    } else {
                        debug!(%peer, "handshake refused: host-switch expects {got:?}");
                    }
                }
                Ok((peer, Err(e))) => info!(%peer, "handshake connection closed: {e}"),
                Err(e) => warn!(error = %e, "handshake task failed"),
            },
        }
    }
}

// ----------------------------------------------------------------- host side

/// Timing of the host's side; [`Default`] is Rancher Desktop's.
#[derive(Debug, Clone)]
pub struct HostTiming {
    /// Between two probes of the guest's handshake endpoint.
    pub interval: Duration,
    /// How long to look for the guest before giving up.
    pub deadline: Duration,
    /// Bound on each dial, read and write.
    pub io_timeout: Duration,
    /// How long to wait for the data connection after `READY`.
    pub data_wait: Duration,
    /// Handshakes in a row without a data connection before giving up.
    pub attempts: u32,
}

impl Default for HostTiming {
    fn default() -> Self {
        HostTiming {
            interval: Duration::from_secs(1),
            deadline: Duration::from_secs(300),
            io_timeout: Duration::from_secs(5),
            data_wait: Duration::from_secs(10),
            attempts: 5,
        }
    }
}

/// Reads the guest's phrase and returns the index of the accepted one it
/// is. Reads until what arrived equals an accepted phrase or is a prefix of
/// none, so phrases of any length can be accepted together.
pub async fn host_check_signature<S>(
    s: &mut S,
    signatures: &[impl AsRef<str>],
    limit: Duration,
) -> Result<usize, HandshakeError>
where
    S: AsyncRead + Unpin,
{
    let longest = signatures.iter().map(|p| p.as_ref().len()).max().unwrap_or(0);
    let check = async {
        let mut buf = vec![0u8; longest];
        let mut got = 0;
        loop {
            let candidates = signatures.iter().map(|p| p.as_ref().as_bytes());
            if let Some(i) = candidates.clone().position(|p| got >= p.len() && buf[..p.len()] == *p) {
                return Ok(i);
            }
            if got == longest || !candidates.clone().any(|p| p.starts_with(&buf[..got.min(p.len())])) {
                // The rest of the guest's phrase, for the message: it was
                // written in one piece, so it is there or nearly.
                buf.resize(MAX_SIGNATURE, 0);
                if let Ok(Ok(n)) = timeout(Duration::from_millis(100), s.read(&mut buf[got..])).await {
                    got += n;
                }
                return Err(HandshakeError::WrongSignature { got: printable(&buf[..got]), want: phrases(signatures) });
            }
            match s.read(&mut buf[got..longest]).await {
                Ok(0) => return Err(HandshakeError::Closed { got, want: longest }),
                Ok(k) => got += k,
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
    };
    timeout(limit, check).await.map_err(|_| HandshakeError::Timeout(limit))?
}

async fn dial_within(ep: &Endpoint, limit: Duration) -> Result<crate::LinkStream, HandshakeError> {
    match timeout(limit, dial(ep)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(HandshakeError::Dial { endpoint: ep.to_string(), source }),
        Err(_) => Err(HandshakeError::Timeout(limit)),
    }
}

/// Checks the guest's phrase on a fresh connection; on a wrong one, writes
/// the host's first phrase back (best effort) so the guest can log it.
async fn dial_and_check(
    ep: &Endpoint,
    signatures: &[impl AsRef<str>],
    limit: Duration,
) -> Result<crate::LinkStream, HandshakeError> {
    let mut s = dial_within(ep, limit).await?;
    match host_check_signature(&mut s, signatures, limit).await {
        Ok(_) => Ok(s),
        Err(e @ HandshakeError::WrongSignature { .. }) => {
            if let Some(ours) = signatures.first() {
                let _ = write_all(&mut s, ours.as_ref().as_bytes(), Duration::from_millis(500)).await;
            }
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// One probe: dials the guest's handshake endpoint and checks its signature.
pub async fn host_probe(ep: &Endpoint, signatures: &[impl AsRef<str>], limit: Duration) -> Result<(), HandshakeError> {
    dial_and_check(ep, signatures, limit).await.map(drop)
}

/// Tells the guest the data listener is up: dials, checks the signature and
/// writes `READY`.
pub async fn host_send_ready(
    ep: &Endpoint,
    signatures: &[impl AsRef<str>],
    limit: Duration,
) -> Result<(), HandshakeError> {
    let mut s = dial_and_check(ep, signatures, limit).await?;
    write_all(&mut s, READY, limit).await?;
    let _ = timeout(limit, s.shutdown()).await;
    Ok(())
}

/// Logs a probe's failure: a wrong phrase at info once a minute (it will
/// not fix itself), the first other failure at info, the rest at debug.
pub fn log_probe_failure(what: &dyn std::fmt::Display, e: &HandshakeError, first: bool) {
    match e {
        HandshakeError::WrongSignature { got, want } if HOST_WRONG_SIGNATURE_LOG.allow() => {
            info!("handshake: {what} announced the signature {got:?}; host-switch accepts {want} (--signature)")
        }
        _ if first => info!("handshake: waiting for {what} ({e})"),
        _ => debug!("handshake: probing {what} failed: {e}"),
    }
}

/// Probes `ep` every `interval` until the signature matches or `deadline`
/// has passed.
pub async fn host_find_peer(
    ep: &Endpoint,
    signatures: &[impl AsRef<str>],
    t: &HostTiming,
) -> Result<(), HandshakeError> {
    let start = Instant::now();
    let mut failures = 0u64;
    loop {
        let tried = Instant::now();
        match host_probe(ep, signatures, t.io_timeout).await {
            Ok(()) => {
                info!(endpoint = %ep, "handshake: the guest answered with the signature");
                return Ok(());
            }
            Err(e) => {
                log_probe_failure(&format_args!("the guest at {ep}"), &e, failures == 0);
                failures += 1;
                let next = tried + t.interval;
                if next.duration_since(start) >= t.deadline {
                    return Err(HandshakeError::NotFound {
                        endpoint: ep.to_string(),
                        waited: start.elapsed(),
                        last: Some(Box::new(e)),
                    });
                }
                sleep_until(next).await;
            }
        }
    }
}

/// What the host's accept loop reports: data connections now open and ever
/// opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounts {
    pub live: usize,
    pub total: u64,
}

/// Counts the host's data connections for [`host_handshake_loop`]. Clone it
/// into the accept loop and hold the guard of [`DataLinks::connected`] while
/// a connection is served.
#[derive(Debug, Clone)]
pub struct DataLinks {
    tx: Arc<watch::Sender<LinkCounts>>,
}

impl Default for DataLinks {
    fn default() -> Self {
        DataLinks::new()
    }
}

impl DataLinks {
    pub fn new() -> DataLinks {
        DataLinks { tx: Arc::new(watch::channel(LinkCounts::default()).0) }
    }

    /// A data connection opened; it counts as open until the guard drops.
    pub fn connected(&self) -> DataLinkGuard {
        self.tx.send_modify(|c| {
            c.live += 1;
            c.total += 1;
        });
        DataLinkGuard { tx: self.tx.clone() }
    }

    pub fn counts(&self) -> LinkCounts {
        *self.tx.borrow()
    }
}

/// Marks one data connection open while it lives.
#[derive(Debug)]
pub struct DataLinkGuard {
    tx: Arc<watch::Sender<LinkCounts>>,
}

impl Drop for DataLinkGuard {
    fn drop(&mut self) {
        self.tx.send_modify(|c| c.live = c.live.saturating_sub(1));
    }
}

/// The host's side, for as long as the host runs: pair with the guest, wait
/// for its data connection (redoing the handshake up to `attempts` times),
/// and pair again whenever every data connection is gone. The data listener
/// must already be up. Returns only when it gives up, with the reason.
pub async fn host_handshake_loop(
    ep: &Endpoint,
    signatures: &[impl AsRef<str>],
    t: &HostTiming,
    links: &DataLinks,
) -> HandshakeError {
    let mut rx = links.tx.subscribe();
    loop {
        let mut attempt = 0;
        loop {
            attempt += 1;
            if let Err(e) = host_find_peer(ep, signatures, t).await {
                return e;
            }
            let before = rx.borrow_and_update().total;
            match host_send_ready(ep, signatures, t.io_timeout).await {
                Ok(()) => {
                    info!(endpoint = %ep, attempt, "handshake: READY sent; waiting for the data connection");
                    let arrived = async { rx.wait_for(|c| c.total > before).await.map(|_| ()) };
                    match timeout(t.data_wait, arrived).await {
                        Ok(_) => {
                            info!(endpoint = %ep, "handshake: the guest's data connection arrived");
                            break;
                        }
                        Err(_) => warn!(attempt, "handshake: no data connection within {}", Seconds(t.data_wait)),
                    }
                }
                Err(e) => warn!(endpoint = %ep, attempt, "handshake: sending READY failed: {e}"),
            }
            if attempt >= t.attempts {
                return HandshakeError::NoDataConnection { attempts: attempt, wait: t.data_wait };
            }
        }
        let _ = rx.wait_for(|c| c.live == 0).await.map(|_| ());
        warn!(endpoint = %ep, "handshake: the data connection is gone; pairing with the guest again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    const T: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn both_halves_over_a_pipe() {
        let (mut guest, mut host) = duplex(4096);
        let g = tokio::spawn(async move { guest_answer(&mut guest, SIGNATURE, T).await });
        host_check_signature(&mut host, &[SIGNATURE], T).await.unwrap();
        host.write_all(READY).await.unwrap();
        g.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn phrases_of_different_lengths_are_told_apart() {
        for (i, phrase) in HOST_SIGNATURES.iter().enumerate() {
            let (mut guest, mut host) = duplex(4096);
            guest.write_all(phrase.as_bytes()).await.unwrap();
            assert_eq!(host_check_signature(&mut host, &HOST_SIGNATURES, T).await.unwrap(), i);
        }
        // A prefix of an accepted phrase followed by other bytes is wrong
        // as soon as it diverges, without waiting for more.
        let (mut guest, mut host) = duplex(4096);
        guest.write_all(b"github.com/rancher-sandbox/rancher-desktop-nope").await.unwrap();
        let e = host_check_signature(&mut host, &HOST_SIGNATURES, T).await.unwrap_err();
        assert!(matches!(&e, HandshakeError::WrongSignature { want, .. } if want.contains(SEED_SIGNATURE)), "{e}");
    }

    #[test]
    fn durations_read_in_whole_seconds() {
        let e = HandshakeError::NotFound { endpoint: "x".into(), waited: Duration::from_millis(300_004), last: None };
        assert!(e.to_string().ends_with("within 300 s"), "{e}");
        assert_eq!(Seconds(Duration::from_millis(250)).to_string(), "250 ms");
    }

    #[tokio::test]
    async fn wrong_signature_is_refused_by_the_host() {
        let (mut guest, mut host) = duplex(4096);
        // Same length as SIGNATURE, different bytes.
        let other = "x".repeat(SIGNATURE.len());
        guest.write_all(other.as_bytes()).await.unwrap();
        let e = host_check_signature(&mut host, &[SIGNATURE], T).await.unwrap_err();
        assert!(matches!(e, HandshakeError::WrongSignature { .. }), "{e}");
    }

    #[tokio::test]
    async fn anything_but_ready_is_refused_by_the_guest() {
        let (mut guest, mut host) = duplex(4096);
        let g = tokio::spawn(async move { guest_answer(&mut guest, SIGNATURE, T).await });
        host_check_signature(&mut host, &[SIGNATURE], T).await.unwrap();
        host.write_all(b"READX").await.unwrap();
        let e = g.await.unwrap().unwrap_err();
        assert!(matches!(&e, HandshakeError::NotReady(got) if got == "READX"), "{e}");
    }

    #[tokio::test]
    async fn a_peer_that_closes_early() {
        // Host side: half a signature, then EOF.
        let (mut guest, mut host) = duplex(4096);
        guest.write_all(&SIGNATURE.as_bytes()[..10]).await.unwrap();
        drop(guest);
        let e = host_check_signature(&mut host, &[SIGNATURE], T).await.unwrap_err();
        assert!(matches!(e, HandshakeError::Closed { got: 10, want } if want == SIGNATURE.len()), "{e}");
        // Guest side: the host reads the signature and hangs up (a probe).
        let (mut guest, mut host) = duplex(4096);
        let g = tokio::spawn(async move { guest_answer(&mut guest, SIGNATURE, T).await });
        host_check_signature(&mut host, &[SIGNATURE], T).await.unwrap();
        host.write_all(b"RE").await.unwrap();
        drop(host);
        let e = g.await.unwrap().unwrap_err();
        assert!(matches!(e, HandshakeError::Closed { got: 2, want: 5 }), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn ready_never_sent_times_out() {
        let (mut guest, mut host) = duplex(4096);
        let started = Instant::now();
        let g = tokio::spawn(async move { guest_answer(&mut guest, SIGNATURE, Duration::from_secs(30)).await });
        host_check_signature(&mut host, &[SIGNATURE], T).await.unwrap();
        // `host` stays open and silent.
        let e = g.await.unwrap().unwrap_err();
        assert!(matches!(e, HandshakeError::Timeout(d) if d == Duration::from_secs(30)), "{e}");
        assert!(started.elapsed() >= Duration::from_secs(30));
        drop(host);
        // And a guest that never writes its signature times the host out.
        let (_guest, mut host) = duplex(4096);
        let e = host_check_signature(&mut host, &[SIGNATURE], T).await.unwrap_err();
        assert!(matches!(e, HandshakeError::Timeout(_)), "{e}");
    }

    #[test]
    fn signatures_are_checked() {
        assert!(validate_signature(SIGNATURE).is_ok());
        assert!(validate_signature(SEED_SIGNATURE).is_ok());
        assert!(validate_signature("").is_err());
        assert!(validate_signature(&"x".repeat(MAX_SIGNATURE + 1)).is_err());
    }

    #[tokio::test]
    async fn data_link_counts() {
        let links = DataLinks::new();
        let a = links.connected();
        let b = links.clone().connected();
        assert_eq!(links.counts(), LinkCounts { live: 2, total: 2 });
        drop(a);
        drop(b);
        assert_eq!(links.counts(), LinkCounts { live: 0, total: 2 });
    }

    #[cfg(unix)]
    mod over_unix_sockets {
        use super::*;
        use crate::endpoint::listen;

        struct Dir(std::path::PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        fn dir(name: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("rdnet-hs-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }

        fn fast() -> HostTiming {
            HostTiming {
                interval: Duration::from_millis(20),
                deadline: Duration::from_secs(5),
                io_timeout: Duration::from_secs(2),
                data_wait: Duration::from_millis(300),
                attempts: 2,
            }
        }

        #[tokio::test]
        async fn host_accepts_either_generation_by_default() {
            for phrase in HOST_SIGNATURES {
                let d = dir("either");
                let ep = Endpoint::Unix(d.0.join("hs.sock"));
                let l = listen(&ep).await.unwrap();
                let guest = async { guest_accept_ready(&l, phrase, T).await };
                let host = async {
                    host_find_peer(&ep, &HOST_SIGNATURES, &fast()).await.unwrap();
                    host_send_ready(&ep, &HOST_SIGNATURES, T).await.unwrap();
                };
                let (peer, ()) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(guest, host) })
                    .await
                    .expect("handshake finished");
                assert!(peer.starts_with("unix:pid="), "{peer}");
            }
        }

        #[tokio::test]
        async fn a_wrong_phrase_is_named_to_the_guest() {
            let d = dir("wrong");
            let ep = Endpoint::Unix(d.0.join("hs.sock"));
            let l = listen(&ep).await.unwrap();
            let guest = async {
                let (mut s, _) = l.accept().await.unwrap();
                guest_answer(&mut s, SEED_SIGNATURE, T).await
            };
            let host = async { host_probe(&ep, &[SIGNATURE], T).await };
            let (g, h) = tokio::join!(guest, host);
            let h = h.unwrap_err();
            assert!(
                matches!(&h, HandshakeError::WrongSignature { got, want } if got == SEED_SIGNATURE && want.contains(SIGNATURE)),
                "{h}"
            );
            let g = g.unwrap_err();
            assert!(matches!(&g, HandshakeError::NotReady(got) if got == SIGNATURE), "{g}");
        }

        #[tokio::test]
        async fn guest_keeps_listening_after_bad_peers() {
            let d = dir("bad");
            let ep = Endpoint::Unix(d.0.join("hs.sock"));
            let l = listen(&ep).await.unwrap();
            let guest = async { guest_accept_ready(&l, SIGNATURE, T).await };
            let host = async {
                // One that says the wrong word, one that hangs up at once,
                // one that stays silent: none of them ends the handshake.
                let mut wrong = dial(&ep).await.unwrap();
                host_check_signature(&mut wrong, &[SIGNATURE], T).await.unwrap();
                wrong.write_all(b"HELLO").await.unwrap();
                drop(dial(&ep).await.unwrap());
                let silent = dial(&ep).await.unwrap();
                host_send_ready(&ep, &[SIGNATURE], T).await.unwrap();
                silent
            };
            let (_, _silent) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(guest, host) })
                .await
                .expect("handshake finished");
        }

        #[tokio::test]
        async fn host_gives_up_when_nobody_answers() {
            let d = dir("none");
            let ep = Endpoint::Unix(d.0.join("nobody.sock"));
            let t = HostTiming { deadline: Duration::from_millis(200), ..fast() };
            let e = host_find_peer(&ep, &[SIGNATURE], &t).await.unwrap_err();
            assert!(matches!(&e, HandshakeError::NotFound { last: Some(_), .. }), "{e}");
        }

        #[tokio::test]
        async fn host_loop_retries_then_gives_up_without_a_data_connection() {
            let d = dir("nodata");
            let ep = Endpoint::Unix(d.0.join("hs.sock"));
            let l = listen(&ep).await.unwrap();
            let links = DataLinks::new();
            // The guest completes every handshake but never connects.
            let guest = async {
                let mut n = 0;
                loop {
                    guest_accept_ready(&l, SIGNATURE, T).await;
                    n += 1;
                    if n == 2 {
                        std::future::pending::<()>().await;
                    }
                }
            };
            let t = fast();
            let e = tokio::select! {
                e = host_handshake_loop(&ep, &[SIGNATURE], &t, &links) => e,
                _ = guest => unreachable!(),
            };
            assert!(matches!(e, HandshakeError::NoDataConnection { attempts: 2, .. }), "{e}");
        }

        #[tokio::test]
        async fn host_loop_pairs_again_when_the_data_connection_ends() {
            let d = dir("again");
            let ep = Endpoint::Unix(d.0.join("hs.sock"));
            let l = listen(&ep).await.unwrap();
            let links = DataLinks::new();
            let host_links = links.clone();
            let hs = ep.clone();
            let host = tokio::spawn(async move { host_handshake_loop(&hs, &[SIGNATURE], &fast(), &host_links).await });
            for _ in 0..2 {
                tokio::time::timeout(Duration::from_secs(10), guest_accept_ready(&l, SIGNATURE, T))
                    .await
                    .expect("the host paired");
                // The "data connection": open, then lost.
                let conn = links.connected();
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(conn);
            }
            assert_eq!(links.counts().total, 2);
            host.abort();
        }
    }
}
