//! How this works: everything runs on one current-thread tokio runtime.
//! At start the tap is created (never reused: an existing name is an error),
//! given its MAC and MTU, and brought up together with `lo`. The tap
//! outlives link sessions. A session owns one connection to the host, split
//! into two halves that run concurrently in one task: "up" waits for the tap
//! to be readable, drains every frame already queued into the link writer
//! (plus any frames the DHCP client wants sent) and then flushes them in one
//! write; "down" takes frames from the link reader and writes each to the
//! tap, except DHCP replies for us (UDP to port 68, to our MAC or broadcast)
//! when -dhcp is on, which go to the DHCP task instead. Which frame goes
//! where, and which are dropped and why, is decided by the pure rules of
//! `rdnet_guest::link_rules`; this module only moves bytes. The DHCP task owns
//! the sans-I/O client, its timers, and the netlink/resolv.conf side effects;
//! it talks to sessions over bounded channels, so the packet path never
//! waits on it (frames it sends while no link is up are dropped, and it is
//! told when a link comes up so it retransmits at once). Each session
//! starts with the offload hello (`rdnet_wire::offload`); while a host that
//! answered it is connected the tap has TSO and checksum offload on, so
//! frames cross the link as 64 KiB segments (see `rdnet_wire::vnet_hdr`
//! for the header each tap read and write carries). With the inherited
//! descriptor (`-vsock-fd`) the program ends with its only session: status
//! 0 on EOF, 1 on an error. With `--connect` a lost link is redialled with
//! backoff (100 ms doubling to 2 s), keeping the same tap.
//!
//! With `-dhcp-script` the DHCP task configures nothing itself: it runs the
//! script for each of the client's events, as busybox udhcpc does, one at a
//! time (see `script.rs`). `-trace-packets` logs one decoded line per frame
//! crossing the link, both ways; the switch is a single flag read with one
//! relaxed atomic load per frame, which SIGUSR1 flips at run time.
//! SIGTERM, SIGINT and SIGHUP end the program cleanly (status 0), and the
//! tap goes away with its descriptor; every other signal that would end it
//! by default is caught and logged (`signals.rs`).

use std::future::pending;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use rdnet_cli::{LogOptions, error_chain, init_logging, out_of_range};
use rdnet_guest::configure::{apply_lease, remove_lease, set_ipv6, write_resolv_conf};
use rdnet_guest::dhcp_client::{ClientConfig, DhcpClient, Output};
use rdnet_guest::dhcp_script::ScriptEvent;
use rdnet_guest::link_rules::{FromLink, FromTap, from_link, from_tap, is_router_advert, router_advert_dns};
use rdnet_guest::netlink::{Netlink, NetlinkError};
use rdnet_guest::tap::{Tap, TapError};
use rdnet_guest::trace::PacketSummary;
use rdnet_link::http_connect::{self, RefuseHttpAnswer};
use rdnet_link::{Decoder, Endpoint, EndpointError, FrameReader, FrameWriter, Framing, LinkError, LinkStream, dial};
use rdnet_wire::ndp_dns::RaDns;
use rdnet_wire::offload::{self, Hello, Role};
use rdnet_wire::{Mac, MacDisplay, parse_mac};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use crate::Opts;
use crate::script::Script;
use crate::signals::{Event as SignalEvent, Signals};

/// A deadline that never comes (a year), for settings with nothing to expire.
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);
/// Bytes queued for the link before a flush even if the tap has more.
const BATCH_BYTES: usize = 256 * 1024;
const REDIAL_MIN: Duration = Duration::from_millis(100);
const REDIAL_MAX: Duration = Duration::from_secs(2);
const ETH_HEADER: u32 = 14;
const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65521;

/// Whether each frame crossing the link is logged (`-trace-packets`,
/// flipped by SIGUSR1).
static TRACE: AtomicBool = AtomicBool::new(false);
const VM_TO_HOST: &str = "vm→host";
const HOST_TO_VM: &str = "host→vm";

/// Flips packet tracing; returns whether it is on now.
pub(crate) fn toggle_trace() -> bool {
    !TRACE.fetch_xor(true, Ordering::Relaxed)
}

/// Logs `frame` when tracing is on: one relaxed load when it is off.
#[inline(always)]
fn trace(direction: &str, frame: &[u8]) {
    if TRACE.load(Ordering::Relaxed) {
        trace_line(direction, frame);
    }
}

#[cold]
#[inline(never)]
fn trace_line(direction: &str, frame: &[u8]) {
    info!("{direction} {}", PacketSummary(frame));
}

/// A flag's value that cannot work, worded as Go's flag package words it.
#[derive(Debug, thiserror::Error)]
#[error("invalid value {value:?} for flag -{flag}: {reason}")]
pub struct BadFlag {
    flag: &'static str,
    value: String,
    reason: String,
}

fn bad(flag: &'static str, value: impl ToString, reason: impl ToString) -> BadFlag {
    BadFlag { flag, value: value.to_string(), reason: reason.to_string() }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("-vsock-fd {fd}: no such open descriptor (was the host link passed?)")]
    NoFd { fd: i32 },
    #[error("tap interface {0} already exists; refusing to start")]
    TapExists(String),
    #[error("cannot create the tap device")]
    Tap(#[source] TapError),
    #[error("cannot configure the network")]
    Netlink(#[from] NetlinkError),
    #[error("cannot start the event loop")]
    Runtime(#[source] io::Error),
    #[error("cannot install the signal handlers")]
    Signal(#[source] io::Error),
    #[error("cannot use the host link {url}")]
    Dial {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("reading from the host link failed")]
    LinkRead(#[source] LinkError),
    #[error("writing to the host link failed")]
    LinkWrite(#[source] io::Error),
    #[error("reading from the tap device failed")]
    TapRead(#[source] io::Error),
}

impl Error {
    /// Errors that end a link session but not the program (with --connect).
    fn is_link_error(&self) -> bool {
        matches!(self, Error::LinkRead(_) | Error::LinkWrite(_))
    }
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    tap: String,
    mac: Mac,
    subnet: Ipv4Net,
    /// `None`: IPv6 off on the tap.
    subnet6: Option<Ipv6Net>,
    endpoint: Endpoint,
    redial: bool,
    /// Open each dialled link with gvproxy's `POST /connect`.
    http_connect: bool,
    resolv_conf: PathBuf,
    dhcp: bool,
    mtu: u32,
    tap_mtu: Arc<AtomicU32>,
    /// `-dhcp-script`, made absolute.
    script: Option<PathBuf>,
    trace: bool,
}

impl Config {
    /// Checks every flag without opening or changing anything (the script
    /// is only looked at).
    pub fn from_opts(o: &Opts) -> Result<Config, BadFlag> {
        let mac = parse_mac(&o.tap_mac_address).ok_or_else(|| {
            bad("tap-mac-address", &o.tap_mac_address, "expected six hex bytes such as 5a:94:ef:e4:0c:ee")
        })?;
        if !rdnet_guest::tap::valid_ifname(&o.tap_interface) {
            return Err(bad(
                "tap-interface",
                &o.tap_interface,
                "not an interface name (1 to 15 bytes without '/', ':' or spaces)",
            ));
        }
        let subnet: Ipv4Net = o.subnet.parse().map_err(|e: ipnet::AddrParseError| {
            bad("subnet", &o.subnet, format!("{e} (expected an IPv4 prefix such as 192.168.127.0/24)"))
        })?;
        // Gateway, device and host alias must fit (spec/COMPAT.md §2).
        if subnet.prefix_len() > 29 {
            return Err(bad("subnet", &o.subnet, "too small: the prefix must be /29 or shorter"));
        }
        let subnet6 = if o.subnet6.is_empty() {
            None
        } else {
            let net: Ipv6Net = o.subnet6.parse().map_err(|e: ipnet::AddrParseError| {
                bad("subnet6", &o.subnet6, format!("{e} (expected an IPv6 prefix such as fd5a:94ef:e40c::/64)"))
            })?;
            // Addresses come from router advertisements (SLAAC), which
            // need a /64.
            if net.prefix_len() != 64 {
                return Err(bad(
                    "subnet6",
                    &o.subnet6,
                    "must be a /64 (addresses come by SLAAC); empty turns IPv6 off",
                ));
            }
            Some(net.trunc())
        };
        if !(MIN_MTU..=MAX_MTU).contains(&o.mtu) {
            return Err(bad("mtu", o.mtu, out_of_range(MIN_MTU, MAX_MTU)));
        }
        let (endpoint, redial) = match &o.connect {
            Some(url) => (parse_connect_url(url).map_err(|e: EndpointError| bad("connect", url, e.reason))?, true),
            None => {
                if o.vsock_fd < 0 {
                    return Err(bad("vsock-fd", o.vsock_fd, "must be a descriptor number (0 or more)"));
                }
                (Endpoint::Fd(o.vsock_fd), false)
            }
        };
        let script = if o.dhcp_script.is_empty() {
            None
        } else {
            let value = &o.dhcp_script;
            if !o.dhcp {
                return Err(bad("dhcp-script", value, "has no use with -dhcp=false"));
            }
            let path = Path::new(value);
            crate::script::check(path).map_err(|reason| bad("dhcp-script", value, reason))?;
            Some(std::path::absolute(path).map_err(|e| bad("dhcp-script", value, e))?)
        };
        Ok(Config {
            tap: o.tap_interface.clone(),
            mac,
            subnet: subnet.trunc(),
            subnet6,
            endpoint,
            redial,
            http_connect: redial && o.connect_http,
            resolv_conf: o.resolv_conf.clone(),
            dhcp: o.dhcp,
            mtu: o.mtu,
            tap_mtu: Arc::new(AtomicU32::new(o.mtu)),
            script,
            trace: o.trace_packets,
        })
    }

    fn max_frame(&self) -> usize {
        (self.mtu + ETH_HEADER).min(u16::MAX as u32) as usize
    }
}

/// Runs vm-switch with a command line [`Config::from_opts`] accepted.
pub fn main(opts: &Opts, cfg: Config) -> ExitCode {
    // The inherited link descriptor must be checked before anything (the
    // log file, the runtime) could be given its number.
    let inherited_ok = cfg.redial || fd_is_open(opts.vsock_fd);
    init_logging(&LogOptions { logfile: Some(opts.logfile.clone()), debug: opts.debug });
    TRACE.store(cfg.trace, Ordering::Relaxed);
    let result = if inherited_ok { run(cfg) } else { Err(Error::NoFd { fd: opts.vsock_fd }) };
    match result {
        Ok(code) => code,
        Err(e) => rdnet_cli::runtime_error("vm-switch", &e),
    }
}

/// Whether descriptor `fd` is open (without /proc, dialing will tell).
fn fd_is_open(fd: i32) -> bool {
    if fd < 0 {
        return false;
    }
    !Path::new("/proc/self/fd").is_dir() || std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_ok()
}

fn run(cfg: Config) -> Result<ExitCode, Error> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)?;
    rt.block_on(async {
        let mut signals = Signals::install().map_err(Error::Signal)?;
        if cfg.trace {
            info!("packet tracing on (SIGUSR1 toggles it)");
        }
        let sw = switch(cfg);
        tokio::pin!(sw);
        loop {
            tokio::select! {
                r = &mut sw => return r,
                event = signals.next() => match event {
                    SignalEvent::Exit(name) => {
                        info!("{name}: exiting");
                        return Ok(ExitCode::SUCCESS);
                    }
                    SignalEvent::ToggleTrace => {
                        info!("packet tracing {} (SIGUSR1)", if toggle_trace() { "on" } else { "off" });
                    }
                },
            }
        }
    })
}

async fn switch(cfg: Config) -> Result<ExitCode, Error> {
    // The inherited descriptor is claimed first, before the tap or netlink
    // open anything.
    let mut first_link = if cfg.redial {
        None
    } else {
        let link = dial(&cfg.endpoint).await.map_err(|source| Error::Dial { url: cfg.endpoint.to_string(), source })?;
        Some(link)
    };

    let nl = Netlink::new()?;
    if nl.link_exists(&cfg.tap).await? {
        return Err(Error::TapExists(cfg.tap.clone()));
    }
    let tap = Tap::create(&cfg.tap).map_err(|e| match e {
        TapError::Exists(name) => Error::TapExists(name),
        e => Error::Tap(e),
    })?;
    nl.set_mac(&cfg.tap, cfg.mac).await?;
    nl.set_mtu(&cfg.tap, cfg.mtu).await?;
    // A GSO packet (its Ethernet header included) must fit one u16-framed
    // frame; the kernel cuts anything larger in software before the tap.
    nl.set_gso_max_size(&cfg.tap, rdnet_wire::offload::MAX_LARGE_FRAME as u32).await?;
    // IPv6 is configured by the gateway's router advertisements, unless
    // addressing is left to another program (-dhcp=false); turning it off
    // (-subnet6=) holds either way. Before the link is up, so its first
    // address is already made the way set here.
    if (cfg.dhcp || cfg.subnet6.is_none())
        && let Err(e) = set_ipv6(&cfg.tap, cfg.subnet6.is_some())
    {
        warn!("cannot set up IPv6 on {}: {e}", cfg.tap);
    }
    nl.set_up(&cfg.tap).await?;
    nl.set_up("lo").await?;
    info!(
        "tap {} up (mac {}, mtu {}), subnet {}, subnet6 {}, link {}, dhcp {}",
        cfg.tap,
        MacDisplay(cfg.mac),
        cfg.mtu,
        cfg.subnet,
        cfg.subnet6.map_or_else(|| "off".to_string(), |n| n.to_string()),
        cfg.endpoint,
        if cfg.dhcp { "on" } else { "off" }
    );

    let mut dhcp = cfg.dhcp.then(|| spawn_dhcp(&cfg, nl.clone()));

    if let Some(link) = first_link.take() {
        return match session(link, &tap, dhcp.as_mut(), &cfg).await {
            Ok(()) => {
                info!("host link closed: exiting");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Err(e),
        };
    }

    let mut delay = REDIAL_MIN;
    let mut failures = 0u32;
    loop {
        match dial(&cfg.endpoint).await {
            Ok(link) => {
                info!("connected to {}", cfg.endpoint);
                failures = 0;
                let started = Instant::now();
                match session(link, &tap, dhcp.as_mut(), &cfg).await {
                    Ok(()) => info!("host link closed; redialling {}", cfg.endpoint),
                    Err(e) if e.is_link_error() => warn!("host link lost: {}; redialling", error_chain(&e)),
                    Err(e) => return Err(e),
                }
                if started.elapsed() > Duration::from_secs(1) {
                    delay = REDIAL_MIN;
                }
            }
            Err(e) => {
                if failures == 0 {
                    warn!("cannot connect to {}: {e}; retrying", cfg.endpoint);
                } else {
                    debug!("cannot connect to {}: {e}; retrying in {delay:?}", cfg.endpoint);
                }
                failures = failures.saturating_add(1);
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(REDIAL_MAX);
    }
}

/// A `--connect` URL: an endpoint, where gvisor-tap-vsock's form with the
/// `/connect` path (`vsock://2:1024/connect`, `tcp://H:P/connect`) names the
/// same endpoint (the path is what `POST /connect` asks for).
fn parse_connect_url(url: &str) -> Result<Endpoint, EndpointError> {
    let base = match url.strip_suffix(http_connect::CONNECT_PATH) {
        Some(base) if base.starts_with("vsock://") || base.starts_with("tcp://") => base,
        _ => url,
    };
    base.parse().map_err(|e: EndpointError| EndpointError { url: url.to_string(), ..e })
}

/// The session side of the DHCP task.
struct DhcpLink {
    /// Frames from the link for the client.
    to_client: mpsc::Sender<Vec<u8>>,
    /// Frames the client wants on the link.
    from_client: mpsc::Receiver<Vec<u8>>,
    link_up: Arc<Notify>,
}

async fn recv_or_pending(rx: &mut Option<&mut mpsc::Receiver<Vec<u8>>>) -> Option<Vec<u8>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => pending().await,
    }
}

/// One connection to the host: pumps frames both ways until the link ends
/// (`Ok` on a clean EOF) or something fails. The session offers segmentation
/// offload (`rdnet_wire::offload`) and turns the tap's TSO on only while a
/// host that answered the offer is connected.
async fn session(link: LinkStream, tap: &Tap, dhcp: Option<&mut DhcpLink>, cfg: &Config) -> Result<(), Error> {
    let max_frame = cfg.max_frame();
    let mut link = link.quiet().map_err(Error::LinkWrite)?;
    if cfg.http_connect {
        link.write_all(&http_connect::connect_request()).await.map_err(Error::LinkWrite)?;
    }
    let (rd, wr) = tokio::io::split(link);
    // A peer that answers the POST with HTTP (gvproxy's 400 for a wrong
    // path) instead of frames is reported as such.
    let rd = if cfg.http_connect { RefuseHttpAnswer::new(rd) } else { RefuseHttpAnswer::passthrough(rd) };
    // Large frames come only from a host that agreed to send them, but
    // accepting them always costs nothing and keeps the framing in sync.
    let mut reader = FrameReader::new(rd, Decoder::new(Framing::U16Le, offload::MAX_LARGE_FRAME));
    let mut writer = FrameWriter::new(wr, Framing::U16Le);
    // The gateway's MAC while offload is on.
    let offload = std::cell::Cell::new(None);
    let result = session_io(&mut reader, &mut writer, tap, dhcp, cfg, max_frame, &offload).await;
    if offload.get().is_some() {
        // The next host may not take large frames: the kernel must cut
        // its segments again (and segments in flight are retransmitted so).
        if let Err(e) = tap.set_offload(false) {
            warn!("turning the tap's offloads off failed: {e}");
        }
    }
    result
}

async fn session_io<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    tap: &Tap,
    dhcp: Option<&mut DhcpLink>,
    cfg: &Config,
    max_frame: usize,
    offload: &std::cell::Cell<Option<Mac>>,
) -> Result<(), Error>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let (to_client, mut from_client, link_up) = match dhcp {
        Some(d) => {
            // Whatever the client said while no link was up is stale.
            while d.from_client.try_recv().is_ok() {}
            (Some(d.to_client.clone()), Some(&mut d.from_client), Some(d.link_up.clone()))
        }
        None => (None, None, None),
    };
    if let Some(n) = link_up {
        n.notify_one();
    }

    let up = async {
        let mut dropped = RateLimit::new();
        let hello = offload::hello_frame(cfg.mac, [0xff; 6], Hello { role: Role::Vm, flags: offload::LARGE_TCP });
        trace(VM_TO_HOST, &hello);
        let _ = writer.push(&hello);
        writer.flush().await.map_err(Error::LinkWrite)?;
        loop {
            tokio::select! {
                guard = tap.readable() => {
                    let mut guard = guard.map_err(Error::TapRead)?;
                    while writer.pending() < BATCH_BYTES {
                        // Read straight into the link's write buffer.
                        let mut drop_reason = None;
                        // Room beyond a link frame, so an oversized packet is
                        // read whole and dropped, not cut and sent.
                        let r = writer.push_with(offload::MAX_LARGE_FRAME + 1024, |buf| {
                            let (hdr, len) = match guard.try_read(buf) {
                                None => return Err(io::ErrorKind::WouldBlock.into()),
                                Some(r) => r?,
                            };
                            let frame = &mut buf[..len];
                            if let FromTap::Drop(why) = from_tap(&hdr, frame, max_frame, offload.get()) {
                                drop_reason = Some(why);
                            }
                            if drop_reason.is_some() {
                                return Ok(0);
                            }
                            trace(VM_TO_HOST, frame);
                            Ok(len)
                        });
                        match r {
                            Ok(_) => {
                                if let Some(why) = drop_reason
                                    && let Some(n) = dropped.allow()
                                {
                                    warn!("dropping a frame from the tap: {why}{}", held_back(n));
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(Error::TapRead(e)),
                        }
                    }
                }
                Some(frame) = recv_or_pending(&mut from_client) => {
                    trace(VM_TO_HOST, &frame);
                    let _ = writer.push(&frame);
                    if let Some(rx) = from_client.as_mut() {
                        while let Ok(f) = rx.try_recv() {
                            trace(VM_TO_HOST, &f);
                            let _ = writer.push(&f);
                        }
                    }
                }
            }
            writer.flush().await.map_err(Error::LinkWrite)?;
        }
    };

    let down = async {
        let mut tap_errors = RateLimit::new();
        let mut dhcp_full = RateLimit::new();
        let mut undeliverable = RateLimit::new();
        loop {
            match reader.next_frame_mut().await {
                Ok(Some(frame)) => {
                    let frame: &mut [u8] = frame;
                    trace(HOST_TO_VM, frame);
                    let mtu = cfg.tap_mtu.load(Ordering::Relaxed) as usize;
                    let written = match from_link(frame, &cfg.mac, to_client.is_some(), max_frame, mtu, offload.get()) {
                        FromLink::ToDhcpClient => {
                            if let Some(tx) = &to_client
                                && tx.try_send(frame.to_vec()).is_err()
                                && let Some(n) = dhcp_full.allow()
                            {
                                debug!("DHCP client busy: dropping a DHCP frame{}", held_back(n));
                            }
                            continue;
                        }
                        FromLink::EnableOffload { gateway } => {
                            match tap.set_offload(true) {
                                Ok(()) => {
                                    offload.set(Some(gateway));
                                    info!("host takes large TCP segments: segmentation offload on");
                                }
                                Err(e) => warn!("cannot turn on the tap's offloads: {e}"),
                            }
                            continue;
                        }
                        FromLink::Ignore => continue,
                        FromLink::ToTap => {
                            // The kernel takes the RA's prefix, route and
                            // MTU; its DNS options are for resolv.conf,
                            // which the DHCP task writes.
                            if let Some(tx) = &to_client
                                && cfg.subnet6.is_some()
                                && is_router_advert(frame)
                            {
                                let _ = tx.try_send(frame.to_vec());
                            }
                            tap.write(frame).await
                        }
                        FromLink::ToTapWithHeader(hdr) => tap.write_with_header(&hdr, frame).await,
                        FromLink::Drop(why) => {
                            if let Some(n) = undeliverable.allow() {
                                warn!("dropping a {}-byte frame from the host: {why}{}", frame.len(), held_back(n));
                            }
                            continue;
                        }
                    };
                    if let Err(e) = written
                        && let Some(n) = tap_errors.allow()
                    {
                        warn!("writing a {}-byte frame to the tap failed: {e}{}", frame.len(), held_back(n));
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(Error::LinkRead(e)),
            }
        }
    };

    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

fn spawn_dhcp(cfg: &Config, nl: Netlink) -> DhcpLink {
    let (to_client, rx) = mpsc::channel(64);
    let (tx, from_client) = mpsc::channel(64);
    let link_up = Arc::new(Notify::new());
    let mut ccfg = ClientConfig::new(cfg.mac);
    ccfg.max_message_size = u16::try_from(cfg.mtu).unwrap_or(u16::MAX);
    let client = DhcpClient::new(ccfg, Instant::now());
    let task = DhcpTask {
        client,
        nl,
        ifname: cfg.tap.clone(),
        resolv_conf: cfg.resolv_conf.clone(),
        max_mtu: cfg.mtu,
        tap_mtu: cfg.tap_mtu.clone(),
        subnet: cfg.subnet,
        current: None,
        ra: None,
        script: cfg.script.clone().map(Script::new),
    };
    tokio::spawn(task.run(rx, tx, link_up.clone()));
    DhcpLink { to_client, from_client, link_up }
}

struct DhcpTask {
    client: DhcpClient,
    nl: Netlink,
    ifname: String,
    resolv_conf: PathBuf,
    max_mtu: u32,
    /// The tap's MTU now (a lease may lower it), for the size of the
    /// segments a large frame is cut into.
    tap_mtu: Arc<AtomicU32>,
    subnet: Ipv4Net,
    /// The lease last applied.
    current: Option<rdnet_guest::Lease>,
    /// `-dhcp-script`: it, not vm-switch, applies the leases.
    script: Option<Script>,
    /// The DNS settings of the gateway's last router advertisement, and
    /// when its servers and its search list expire.
    ra: Option<(RaDns, Instant, Instant)>,
}

/// Whether a renewal changed nothing that is applied or logged.
fn same_settings(a: &rdnet_guest::Lease, b: &rdnet_guest::Lease) -> bool {
    (a.address, a.prefix_len, a.router, &a.dns, &a.search, a.mtu, a.lease_time)
        == (b.address, b.prefix_len, b.router, &b.dns, &b.search, b.mtu, b.lease_time)
}

impl DhcpTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Vec<u8>>, tx: mpsc::Sender<Vec<u8>>, link_up: Arc<Notify>) {
        // As udhcpc: the script hears `deconfig` before anything else.
        if let Some(script) = &self.script {
            script.run(ScriptEvent::Deconfig, &self.ifname).await;
        }
        loop {
            while let Some(out) = self.client.poll_output() {
                match out {
                    // Dropped when no link takes it; the client retransmits.
                    Output::Transmit(frame) => {
                        let _ = tx.try_send(frame);
                    }
                    Output::Configure(lease) => self.lease_in_force(lease, false).await,
                    Output::Renew(lease) => self.lease_in_force(lease, true).await,
                    Output::Deconfigure(lease) => self.lease_ended(lease).await,
                    Output::Nak(nak) => {
                        let from = nak.server_id.map(|s| format!(" from {s}")).unwrap_or_default();
                        let why = nak.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
                        info!("DHCP NAK{from}{why}");
                        if let Some(script) = &self.script {
                            script.run(ScriptEvent::Nak(&nak), &self.ifname).await;
                        }
                    }
                    Output::LeaseFail => {
                        info!("no DHCP lease yet; still trying");
                        if let Some(script) = &self.script {
                            script.run(ScriptEvent::LeaseFail, &self.ifname).await;
                        }
                    }
                }
            }
            let deadline = self.client.poll_timeout();
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => pending().await,
                }
            };
            let ra_expiry = self.ra.as_ref().map(|(_, servers, search)| (*servers).min(*search));
            let ra_timer = async {
                match ra_expiry {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => pending().await,
                }
            };
            tokio::select! {
                frame = rx.recv() => match frame {
                    Some(f) => match router_advert_dns(&f) {
                        Some(dns) => self.router_advert(dns, Instant::now()),
                        None => {
                            self.client.handle_frame(Instant::now(), &f);
                        }
                    },
                    None => return,
                },
                _ = timer => self.client.handle_timeout(Instant::now()),
                _ = ra_timer => self.ra_expired(Instant::now()),
                _ = link_up.notified() => self.client.link_restored(Instant::now()),
            }
        }
    }

    /// A new (`renewal` false) or renewed lease: hands it to the script, or
    /// applies it.
    async fn lease_in_force(&mut self, lease: rdnet_guest::Lease, renewal: bool) {
        let same = self.current.as_ref().is_some_and(|c| same_settings(c, &lease));
        if same {
            debug!("lease renewed: {lease}");
        } else {
            info!("lease {lease}");
        }
        self.current = Some(lease.clone());
        if !self.subnet.contains(&lease.address) {
            warn!("leased address {} is outside -subnet {}", lease.address, self.subnet);
        }
        if let Some(script) = &self.script {
            // The script sees the MTU this link can carry, as vm-switch
            // itself would apply it.
            let mut told = lease.clone();
            told.mtu = lease.mtu.map(|m| m.min(u16::try_from(self.max_mtu).unwrap_or(u16::MAX)));
            let event = if renewal { ScriptEvent::Renew(&told) } else { ScriptEvent::Bound(&told) };
            script.run(event, &self.ifname).await;
            // Large frames from the host are cut to whatever MTU it set.
            if let Ok(Some(info)) = self.nl.link_info(&self.ifname).await
                && let Some(mtu) = info.mtu
            {
                self.tap_mtu.store(mtu.min(self.max_mtu), Ordering::Relaxed);
            }
            return;
        }
        let applied = apply_lease(&self.nl, &self.ifname, &lease, Some(self.max_mtu)).await;
        if let Ok(Some(mtu)) = applied {
            self.tap_mtu.store(mtu, Ordering::Relaxed);
        }
        match applied {
            Ok(Some(mtu)) if lease.mtu.is_some_and(|m| u32::from(m) != mtu) => {
                warn!("DHCP MTU {} capped at --mtu {mtu}", lease.mtu.unwrap_or_default())
            }
            Ok(_) => {}
            Err(e) => warn!("applying the lease to {} failed: {}", self.ifname, error_chain(&e)),
        }
        self.write_dns();
    }

    async fn lease_ended(&mut self, lease: rdnet_guest::Lease) {
        self.current = None;
        if let Some(script) = &self.script {
            info!("lease {}/{} ended", lease.address, lease.prefix_len);
            script.run(ScriptEvent::Deconfig, &self.ifname).await;
            return;
        }
        info!("lease {}/{} ended: removing the address", lease.address, lease.prefix_len);
        if let Err(e) = remove_lease(&self.nl, &self.ifname, &lease).await {
            warn!("removing the lease from {} failed: {}", self.ifname, error_chain(&e));
        }
    }

    /// The gateway's router advertisement: its DNS servers and search list
    /// go to resolv.conf beside the lease's (a lifetime of 0 withdraws them).
    fn router_advert(&mut self, dns: RaDns, now: Instant) {
        // Nothing to expire when an option is absent (or empty): otherwise
        // its lifetime of 0 would fire the timer at once, on every RA.
        let expiry = |secs: u32, empty: bool| now + if empty { NEVER } else { Duration::from_secs(u64::from(secs)) };
        let servers_until = expiry(dns.servers_lifetime, dns.servers.is_empty());
        let search_until = expiry(dns.search_lifetime, dns.search.is_empty());
        let unchanged =
            self.ra.as_ref().is_some_and(|(old, _, _)| old.servers == dns.servers && old.search == dns.search);
        if !unchanged {
            info!(
                "router advertisement: DNS {} search {}",
                dns.servers.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
                dns.search.join(" ")
            );
        }
        self.ra = Some((dns, servers_until, search_until));
        if !unchanged {
            self.write_dns();
        }
    }

    /// Drops the router advertisement's DNS settings whose lifetime ran out.
    fn ra_expired(&mut self, now: Instant) {
        let Some((dns, servers_until, search_until)) = self.ra.as_mut() else { return };
        let mut changed = false;
        if now >= *servers_until {
            changed |= !dns.servers.is_empty();
            dns.servers.clear();
            *servers_until = now + NEVER;
        }
        if now >= *search_until {
            changed |= !dns.search.is_empty();
            dns.search.clear();
            *search_until = now + NEVER;
        }
        if dns.servers.is_empty() && dns.search.is_empty() {
            self.ra = None;
        }
        if changed {
            info!("the router advertisement's DNS settings expired");
            self.write_dns();
        }
    }

    /// Writes resolv.conf from the lease and the router advertisement
    /// (unless a -dhcp-script owns it).
    fn write_dns(&self) {
        if self.script.is_some() {
            return;
        }
        let ra = self.ra.as_ref().map(|(dns, _, _)| dns);
        match write_resolv_conf(Path::new(&self.resolv_conf), self.current.as_ref(), ra) {
            Ok(true) => debug!("wrote {}", self.resolv_conf.display()),
            Ok(false) => {}
            Err(e) => warn!("{}", error_chain(&e)),
        }
    }
}

/// One log line per interval for each kind of trouble, so nothing the guest
/// or host sends can flood the log (`rdnet_wire::ratelimit`, which every
/// program shares); the next line that passes says how many were held back.
struct RateLimit(rdnet_wire::ratelimit::Window);

impl RateLimit {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn new() -> Self {
        RateLimit(rdnet_wire::ratelimit::Window::new(1, Self::INTERVAL))
    }

    /// `Some(lines held back since the last one)` when a line may pass.
    fn allow(&mut self) -> Option<u64> {
        match self.0.check(Instant::now()) {
            rdnet_wire::ratelimit::Verdict::Log { suppressed } => Some(suppressed),
            rdnet_wire::ratelimit::Verdict::Quiet => None,
        }
    }
}

/// " (N similar lines held back)" when N > 0.
fn held_back(n: u64) -> String {
    if n > 0 { format!(" ({n} similar lines held back)") } else { String::new() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> Opts {
        rdnet_cli::parse_go_args_from(std::iter::once("vm-switch").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_match_the_go_original() {
        let o = opts(&[]);
        assert!(!o.debug && o.dhcp);
        assert_eq!(o.tap_interface, "eth0");
        assert_eq!(o.tap_mac_address, "5a:94:ef:e4:0c:ee");
        assert_eq!(o.subnet, "192.168.127.0/24");
        assert_eq!(o.logfile, PathBuf::from("/var/log/vm-switch.log"));
        assert_eq!(o.vsock_fd, 3);
        assert_eq!(o.resolv_conf, PathBuf::from("/etc/resolv.conf"));
        assert_eq!(o.mtu, 1500);
        let c = Config::from_opts(&o).unwrap();
        assert_eq!(c.endpoint, Endpoint::Fd(3));
        assert!(!c.redial);
        assert_eq!(c.max_frame(), 1514);
    }

    #[test]
    fn subnet6_is_a_64_or_empty() {
        let c = Config::from_opts(&opts(&[])).unwrap();
        assert_eq!(c.subnet6, Some("fd5a:94ef:e40c::/64".parse().unwrap()));
        assert_eq!(Config::from_opts(&opts(&["-subnet6="])).unwrap().subnet6, None);
        let e = Config::from_opts(&opts(&["-subnet6", "fd00::/48"])).unwrap_err().to_string();
        assert!(e.contains("must be a /64"), "{e}");
        assert!(Config::from_opts(&opts(&["-subnet6", "192.168.0.0/24"])).is_err());
    }

    #[test]
    fn gvproxy_connect_urls_and_the_http_opening() {
        let c = Config::from_opts(&opts(&["--connect", "vsock://2:1024/connect"])).unwrap();
        assert_eq!(c.endpoint, Endpoint::Vsock { cid: Some(2), port: 1024 });
        assert!(c.http_connect);
        let c =
            Config::from_opts(&opts(&["--connect", "tcp://127.0.0.1:7777/connect", "-connect-http=false"])).unwrap();
        assert_eq!(c.endpoint, Endpoint::Tcp("127.0.0.1:7777".parse().unwrap()));
        assert!(!c.http_connect);
        // A unix socket's path is the whole path, /connect or not.
        let c = Config::from_opts(&opts(&["--connect", "unix:///run/x/connect"])).unwrap();
        assert_eq!(c.endpoint, Endpoint::Unix("/run/x/connect".into()));
        // The inherited link speaks frames at once.
        assert!(!Config::from_opts(&opts(&[])).unwrap().http_connect);
        assert!(Config::from_opts(&opts(&["--connect", "vsock://2:x/connect"])).is_err());
    }

    #[test]
    fn go_style_flags() {
        let o = opts(&[
            "-debug",
            "-tap-interface",
            "tap9",
            "--tap-mac-address=02:00:00:00:00:01",
            "-subnet=10.0.0.0/16",
            "-dhcp=false",
            "--connect",
            "unix:///tmp/x.sock",
            "-mtu",
            "65521",
        ]);
        assert!(o.debug && !o.dhcp);
        let c = Config::from_opts(&o).unwrap();
        assert_eq!(c.tap, "tap9");
        assert_eq!(c.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(c.endpoint, Endpoint::Unix("/tmp/x.sock".into()));
        assert!(c.redial);
        assert_eq!(c.max_frame(), 65535);
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["-tap-mac-address", "nope"][..],
            &["-subnet", "10.0.0.0"],
            &["-subnet", "10.0.0.0/30"],
            &["-subnet", "fd00::/64"],
            &["--mtu", "65522"],
            &["--mtu", "67"],
            &["--connect", "ftp://x"],
            &["-tap-interface", "a/b"],
        ] {
            assert!(Config::from_opts(&opts(args)).is_err(), "{args:?}");
        }
    }

    fn refusal(args: &[&str]) -> String {
        match Config::from_opts(&opts(args)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{args:?} accepted"),
        }
    }

    #[test]
    fn refusals_read_as_go_flag_errors() {
        assert_eq!(
            refusal(&["-subnet", "garbage"]),
            "invalid value \"garbage\" for flag -subnet: invalid IP address syntax \
             (expected an IPv4 prefix such as 192.168.127.0/24)"
        );
        assert_eq!(
            refusal(&["-subnet", "10.0.0.0/30"]),
            "invalid value \"10.0.0.0/30\" for flag -subnet: too small: the prefix must be /29 or shorter"
        );
        assert_eq!(refusal(&["-mtu", "67"]), "invalid value \"67\" for flag -mtu: must be between 68 and 65521");
        assert!(
            refusal(&["-tap-mac-address", "nope"]).starts_with("invalid value \"nope\" for flag -tap-mac-address: ")
        );
        assert!(refusal(&["-vsock-fd", "-1"]).starts_with("invalid value \"-1\" for flag -vsock-fd: "));
        assert!(refusal(&["--connect", "ftp://x"]).starts_with("invalid value \"ftp://x\" for flag -connect: "));
    }

    #[test]
    fn dhcp_script_is_checked_at_start() {
        let dir = std::env::temp_dir().join(format!("rdnet-vmsw-cfg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.sh");
        assert_eq!(
            refusal(&["-dhcp-script", missing.to_str().unwrap()]),
            format!("invalid value {:?} for flag -dhcp-script: no such file", missing.display().to_string())
        );
        let script = dir.join("ok.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(refusal(&["-dhcp-script", script.to_str().unwrap()]).ends_with(": not executable"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = Config::from_opts(&opts(&["-dhcp-script", script.to_str().unwrap(), "-trace-packets"])).unwrap();
        assert_eq!(c.script.as_deref(), Some(script.as_path()));
        assert!(c.trace);
        assert!(
            refusal(&["-dhcp-script", script.to_str().unwrap(), "-dhcp=false"])
                .ends_with("has no use with -dhcp=false")
        );
        // Empty, as Rancher Desktop passes it: vm-switch configures itself.
        let c = Config::from_opts(&opts(&["-dhcp-script", ""])).unwrap();
        assert!(c.script.is_none() && !c.trace);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn trace_toggles() {
        let before = TRACE.load(Ordering::Relaxed);
        assert_eq!(toggle_trace(), !before);
        assert_eq!(toggle_trace(), before);
    }

    #[test]
    fn inherited_descriptor_check() {
        assert!(fd_is_open(0) || fd_is_open(1) || fd_is_open(2));
        assert!(!fd_is_open(-1));
        assert!(!fd_is_open(1_000_000));
    }

    #[test]
    fn rate_limit() {
        let mut r = RateLimit::new();
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(held_back(0), "");
        assert_eq!(held_back(3), " (3 similar lines held back)");
    }
}
