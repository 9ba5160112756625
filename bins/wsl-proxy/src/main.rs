//! wsl-proxy: publishes ports of the distro's namespace on the default
//! namespace's addresses (COMPAT §1, §7).
//!
//! How this works: the Rancher Desktop guest agent connects to a unix socket
//! (`-socketFile`, mode 0600) and writes one JSON port mapping per
//! connection. Each connection is read until one whole JSON value has arrived
//! (newline, EOF, or simply the closing brace), bounded in size and time;
//! the body is parsed by [`mapping`] and applied to the listener table in
//! [`proxy`], which forwards TCP and UDP to `-upstreamAddress:HostPort`
//! through the veth pair. A body that does not parse is logged and ignored.
//! SIGTERM/SIGINT close every listener, remove the socket file, exit 0.
#![deny(unsafe_code)]

mod mapping;
mod proxy;

use std::io;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;

use crate::mapping::Framing;
use crate::proxy::Proxy;

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

#[derive(Parser, Debug)]
#[command(name = "wsl-proxy", about = "Forwards ports published in the distro's namespace to the default namespace")]
struct Opts {
    /// Debug logging.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = rdnet_cli::go_bool)]
    debug: bool,
    /// Log file, opened for append.
    #[arg(long, default_value = "/var/log/wsl-proxy.log")]
    logfile: PathBuf,
    /// Unix socket the guest agent writes port mappings to.
    #[arg(long = "socketFile", default_value = "/run/wsl-proxy.sock")]
    socket_file: PathBuf,
    /// Address published ports are forwarded to (the distro side of the veth).
    #[arg(long = "upstreamAddress", default_value = "192.168.1.2", value_parser = parse_upstream)]
    upstream_address: IpAddr,
}

fn parse_upstream(s: &str) -> Result<IpAddr, String> {
    let inner = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    inner.parse().map_err(|_| format!("{s:?} is not an IP address"))
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

fn main() {
    // A daemon keeps no descriptor it inherited but does not own.
    rdnet_cli::close_inherited_fds(&[]);
    let opts: Opts = rdnet_cli::parse_go_args();
    rdnet_cli::init_logging(&rdnet_cli::LogOptions { logfile: Some(opts.logfile.clone()), debug: opts.debug });
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
        .and_then(|rt| rt.block_on(run(&opts)));
    if let Err(e) = result {
        let text = rdnet_cli::error_chain(&e);
        tracing::error!("{text}");
        eprintln!("wsl-proxy: {text}");
        std::process::exit(1);
    }
}

async fn run(opts: &Opts) -> Result<(), Error> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let path = &opts.socket_file;
    let listener = bind_control(path)?;
    tracing::info!("wsl-proxy listening on {}, forwarding to {}", path.display(), opts.upstream_address);

    let proxy = Arc::new(Proxy::new(opts.upstream_address));
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let accept = async {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            match listener.accept().await {
                Ok((conn, _)) => {
                    let proxy = proxy.clone();
                    tokio::spawn(async move {
                        handle(conn, &proxy).await;
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
async fn handle(mut conn: UnixStream, proxy: &Proxy) {
    let body = match tokio::time::timeout(READ_TIMEOUT, read_message(&mut conn)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            tracing::warn!("ignoring port mapping: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("ignoring port mapping: no complete message within {READ_TIMEOUT:?}");
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
        Ok(req) => proxy.apply(&req).await,
        Err(e) => tracing::warn!("ignoring port mapping: {e}"),
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
