//! wsl-proxy: publishes ports of the distro's namespace on the default
//! namespace's addresses (COMPAT §1, §7).
//!
//! How this works: the command line is checked whole before anything is
//! opened (a bad one exits 2). The Rancher Desktop guest agent connects to
//! a unix socket (`-socketFile`, mode 0600) and writes one JSON port mapping
//! per connection. Each connection is read until one whole JSON value has
//! arrived (newline, EOF, or simply the closing brace), bounded in size and
//! time; the body is parsed by [`mapping`] and applied to the listener table
//! in [`proxy`], which forwards TCP and UDP to `-upstreamAddress:HostPort`
//! through the veth pair. A body whose envelope is unusable is logged and
//! ignored; an entry that is unusable is logged and skipped, and the rest of
//! its message applies. What a client can make us log passes one shared
//! [`ratelimit::LogLimiter`]. SIGTERM/SIGINT close every listener, remove
//! the socket file, exit 0.
#![deny(unsafe_code)]

mod dgram;
mod mapping;
mod proxy;
mod ratelimit;

use std::io;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use clap::Parser;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;

use crate::mapping::Framing;
use crate::proxy::{Proxy, UdpSizing};
use crate::ratelimit::{LogLimiter, limited};

const PROGRAM: &str = "wsl-proxy";
/// Largest accepted message body.
const MAX_BODY: usize = 1024 * 1024;
/// How long a client may take to send its message.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// After a message, how long and how much of what follows is read before
/// closing.
const DRAIN_TIME: Duration = Duration::from_secs(1);
const DRAIN_BYTES: usize = 64 * 1024;
/// How much of a message body a debug log line shows.
const LOGGED_BODY: usize = 1024;
/// Control connections handled at once; more wait in the accept queue.
const MAX_CLIENTS: usize = 64;
/// `-udpBuffer` limits. Above 65535 the value only sizes the kernel's
/// receive buffer (which `net.core.rmem_max` caps anyway); 1 GiB keeps a
/// typo from asking for absurd amounts.
const UDP_BUFFER_MIN: i64 = 1;
const UDP_BUFFER_MAX: i64 = 1 << 30;
/// A unix socket path must fit `sun_path` (108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Parser, Debug)]
#[command(name = "wsl-proxy", about = "Forwards ports published in the distro's namespace to the default namespace")]
struct Opts {
    /// Debug logging.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = rdnet_cli::go_bool)]
    debug: bool,
    /// Log file, opened for append.
    #[arg(long, default_value = "/var/log/wsl-proxy.log", value_parser = parse_path)]
    logfile: PathBuf,
    /// Unix socket the guest agent writes port mappings to.
    #[arg(long = "socketFile", default_value = "/run/wsl-proxy.sock", value_parser = parse_path)]
    socket_file: PathBuf,
    /// Address published ports are forwarded to (the distro side of the veth;
    /// the seed's layout used 192.168.1.2).
    #[arg(long = "upstreamAddress", default_value = "192.168.143.1", value_parser = parse_upstream)]
    upstream_address: IpAddr,
    /// Largest UDP datagram forwarded, in bytes: longer ones are truncated;
    /// also the socket receive buffer asked of the kernel.
    #[arg(long = "udpBuffer", default_value = "8388608", value_parser = parse_udp_buffer)]
    udp_buffer: usize,
}

fn parse_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() { Err("empty path".into()) } else { Ok(PathBuf::from(s)) }
}

fn parse_upstream(s: &str) -> Result<IpAddr, String> {
    let inner = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    inner.parse().map_err(|_| "not an IP address".to_string())
}

/// A whole number in Go's `flag.Int` spellings (decimal, `0x`, `0o`, `0b`,
/// a leading `0` for octal, `_` between digits), within the limits.
fn parse_udp_buffer(s: &str) -> Result<usize, String> {
    let range = || rdnet_cli::out_of_range(UDP_BUFFER_MIN, UDP_BUFFER_MAX);
    let n = parse_go_int(s).ok_or_else(|| "parse error".to_string())?.ok_or_else(range)?;
    if !(UDP_BUFFER_MIN..=UDP_BUFFER_MAX).contains(&n) {
        return Err(range());
    }
    usize::try_from(n).map_err(|_| range())
}

/// `strconv.ParseInt(s, 0, 64)`, which Go's `flag.Int` uses: `None` for a
/// syntax error, `Some(None)` for a number beyond 64 bits.
fn parse_go_int(s: &str) -> Option<Option<i64>> {
    let (negative, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    // Underscores only between digits, or between a base prefix and a digit.
    let bad_underscores = digits.ends_with('_') || digits.contains("__") || (radix == 10 && digits.starts_with('_'));
    let clean: String = digits.chars().filter(|&c| c != '_').collect();
    if bad_underscores || clean.is_empty() || !clean.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = u128::from_str_radix(&clean, radix).unwrap_or(u128::MAX);
    let value = i128::try_from(magnitude).ok().map(|m| if negative { -m } else { m });
    Some(value.and_then(|v| i64::try_from(v).ok()))
}

/// What the flags cannot say about themselves: checked after parsing, before
/// anything is opened.
fn check(opts: &Opts) -> Result<(), String> {
    if opts.socket_file.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(format!(
            "invalid value {:?} for flag -socketFile: longer than {MAX_SOCKET_PATH} bytes, the limit of a unix socket path",
            opts.socket_file.display().to_string()
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("cannot replace {path}")]
    Stale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the permissions of {path}")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot install signal handlers")]
    Signal(#[source] io::Error),
    #[error("cannot start the runtime")]
    Runtime(#[source] io::Error),
}

fn main() -> ExitCode {
    // A daemon keeps no descriptor it inherited but does not own.
    rdnet_cli::close_inherited_fds(&[]);
    let opts: Opts = rdnet_cli::parse_go_args();
    if let Err(msg) = check(&opts) {
        return rdnet_cli::usage_error(PROGRAM, msg);
    }
    rdnet_cli::init_logging(&rdnet_cli::LogOptions { logfile: Some(opts.logfile.clone()), debug: opts.debug });
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
        .and_then(|rt| rt.block_on(run(&opts)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => rdnet_cli::runtime_error(PROGRAM, &e),
    }
}

async fn run(opts: &Opts) -> Result<(), Error> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let path = &opts.socket_file;
    let listener = bind_control(path)?;
    tracing::info!(
        "wsl-proxy listening on {}, forwarding to {} (UDP buffer {} bytes)",
        path.display(),
        opts.upstream_address,
        opts.udp_buffer
    );

    let log = Arc::new(SyncMutex::new(LogLimiter::default()));
    let proxy = Arc::new(Proxy::new(opts.upstream_address, UdpSizing::new(opts.udp_buffer), log.clone()));
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let accept = async {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            match listener.accept().await {
                Ok((conn, _)) => {
                    let proxy = proxy.clone();
                    let log = log.clone();
                    tokio::spawn(async move {
                        handle(conn, &proxy, &log).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!("accept on {}: {e}", path.display());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    let signal_name = tokio::select! {
        _ = accept => "accept loop ended",
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!("{signal_name}: closing");
    drop(listener);
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", path.display());
    }
    proxy.close_all().await;
    Ok(())
}

/// Binds the control socket with owner-only permissions, replacing a stale
/// socket file. The umask is narrowed while binding so the socket is never
/// reachable by others, not even between bind and chmod.
fn bind_control(path: &Path) -> Result<UnixListener, Error> {
    use nix::sys::stat::{Mode, umask};
    rdnet_link::endpoint::remove_stale_socket(path)
        .map_err(|source| Error::Stale { path: path.to_path_buf(), source })?;
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(|source| Error::Listen { path: path.to_path_buf(), source })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| Error::Chmod { path: path.to_path_buf(), source })?;
    Ok(listener)
}

/// Reads one message from a control connection and applies it.
async fn handle(mut conn: UnixStream, proxy: &Proxy, log: &SyncMutex<LogLimiter>) {
    let body = match tokio::time::timeout(READ_TIMEOUT, read_message(&mut conn)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            limited!(warn, log, "ignoring port mapping: {e}");
            return;
        }
        Err(_) => {
            limited!(warn, log, "ignoring port mapping: no complete message within {READ_TIMEOUT:?}");
            return;
        }
    };
    if tracing::enabled!(tracing::Level::DEBUG) {
        let shown = &body[..body.len().min(LOGGED_BODY)];
        let more =
            if body.len() > LOGGED_BODY { format!(" (+{} bytes)", body.len() - LOGGED_BODY) } else { String::new() };
        tracing::debug!("port mapping: {:?}{more}", String::from_utf8_lossy(shown));
    }
    match mapping::parse(&body) {
        Ok(req) => {
            for skipped in &req.skipped {
                limited!(warn, log, "skipping port mapping entry {skipped}");
            }
            let unlisted = req.skipped_count - req.skipped.len();
            if unlisted > 0 {
                limited!(warn, log, "skipping {unlisted} more port mapping entries of the same message");
            }
            proxy.apply(&req).await;
        }
        Err(e) => limited!(warn, log, "ignoring port mapping: {e}"),
    }
    // A client that writes the newline (or more) separately must not get
    // EPIPE because we closed right after the closing brace: read what
    // follows, briefly and bounded, before closing.
    let mut sink = vec![0u8; 4096];
    let mut left = DRAIN_BYTES;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while left > 0 {
            match conn.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Reads until one whole JSON value has arrived, the peer closes, or the
/// size limit is hit. Returns the bytes of that one value (or everything on
/// EOF, which the parser then rejects if it is not valid).
async fn read_message(conn: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(buf);
        }
        buf.extend_from_slice(&chunk[..n]);
        match mapping::framing(&buf) {
            Framing::Complete(end) => {
                buf.truncate(end);
                return Ok(buf);
            }
            // Let the parser produce the error message.
            Framing::Invalid => return Ok(buf),
            Framing::Incomplete if buf.len() > MAX_BODY => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("message larger than {MAX_BODY} bytes"),
                ));
            }
            Framing::Incomplete => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdnet_cli::FlagError;

    fn parse(args: &[&str]) -> Result<Opts, FlagError> {
        rdnet_cli::parse_go_args_from(std::iter::once(PROGRAM).chain(args.iter().copied()))
    }

    fn usage(args: &[&str]) -> String {
        match parse(args) {
            Err(FlagError::Usage(msg)) => msg,
            other => panic!("{args:?}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_current_rancher_desktop() {
        let o = parse(&[]).unwrap();
        assert!(!o.debug);
        assert_eq!(o.logfile, PathBuf::from("/var/log/wsl-proxy.log"));
        assert_eq!(o.socket_file, PathBuf::from("/run/wsl-proxy.sock"));
        assert_eq!(o.upstream_address, "192.168.143.1".parse::<IpAddr>().unwrap());
        assert_eq!(o.udp_buffer, 8_388_608);
        assert!(check(&o).is_ok());
    }

    #[test]
    fn rancher_desktops_argv_and_the_seed_upstream() {
        let o = parse(&["-debug=false", "-logfile=/var/log/rd/wsl-proxy.log"]).unwrap();
        assert_eq!(o.logfile, PathBuf::from("/var/log/rd/wsl-proxy.log"));
        assert!(!o.debug);
        let o = parse(&["-upstreamAddress", "192.168.1.2"]).unwrap();
        assert_eq!(o.upstream_address, "192.168.1.2".parse::<IpAddr>().unwrap());
        let o = parse(&["--upstreamAddress=[fd00::1]"]).unwrap();
        assert_eq!(o.upstream_address, "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(
            usage(&["-upstreamAddress", "host.local"]),
            r#"invalid value "host.local" for flag -upstreamAddress: not an IP address"#
        );
    }

    #[test]
    fn udp_buffer_values() {
        let buf = |v: &str| parse(&["-udpBuffer", v]).map(|o| o.udp_buffer);
        assert_eq!(buf("1").unwrap(), 1);
        assert_eq!(buf("65535").unwrap(), 65535);
        assert_eq!(buf("1073741824").unwrap(), 1 << 30);
        // Go's flag.Int spellings.
        assert_eq!(buf("0x800000").unwrap(), 8 << 20);
        assert_eq!(buf("0o17").unwrap(), 15);
        assert_eq!(buf("017").unwrap(), 15);
        assert_eq!(buf("0b101").unwrap(), 5);
        assert_eq!(buf("1_000").unwrap(), 1000);
        assert_eq!(buf("0x_10").unwrap(), 16);
        assert_eq!(buf("+8").unwrap(), 8);
        let range = "must be between 1 and 1073741824";
        for v in ["0", "-1", "1073741825", "99999999999999999999999", "-0x1"] {
            assert_eq!(usage(&["-udpBuffer", v]), format!("invalid value {v:?} for flag -udpBuffer: {range}"), "{v}");
        }
        for v in ["", "x", "8M", "1.5", "1__0", "_1", "10_", "0x", "08", "0b2", " 1", "--1"] {
            assert_eq!(
                usage(&[&format!("-udpBuffer={v}")]),
                format!("invalid value {v:?} for flag -udpBuffer: parse error"),
                "{v:?}"
            );
        }
    }

    #[test]
    fn paths_are_checked_before_use() {
        assert_eq!(usage(&["-socketFile="]), r#"invalid value "" for flag -socketFile: empty path"#);
        assert_eq!(usage(&["-logfile", ""]), r#"invalid value "" for flag -logfile: empty path"#);
        let long = format!("/tmp/{}.sock", "s".repeat(120));
        let o = parse(&["-socketFile", &long]).unwrap();
        assert!(check(&o).unwrap_err().contains("longer than 107 bytes"));
    }
}
