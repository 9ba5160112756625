//! network-setup's supervisor: the handshake, the distro's namespace,
//! vm-switch, the veth pair, recovery and shutdown.
//!
//! How this works. Everything runs on one current-thread tokio runtime on
//! the main thread, which stays in the namespace network-setup was started
//! in (WSL's default one); the distro's network namespace is only ever
//! entered on short-lived dedicated threads ([`NetNs::run`]), which is also
//! how the init and vm-switch are started inside it. A stale host-side veth
//! is removed first. Under systemd ([`Mode::Systemd`]) the distro's
//! namespace is then looked up at once, before any handshake, so a wrong or
//! stopped unit is reported immediately: the namespace of the unit's main
//! process, held open by descriptor from then on; no namespace or init is
//! created and no pid file written. The handshake listener is opened once
//! and kept for the program's life. Each round: wait for a handshake that
//! ends in `READY` ([`guest_accept_ready`]), dial the host from this
//! namespace, and hand the connection to a new vm-switch in the distro's
//! namespace as fd 3. Under OpenRC the first round creates the namespace,
//! starts `unshare --pid --mount-proc --fork --propagation slave <init>` in
//! it, waits for unshare's child (the init, PID 1 of the new pid namespace)
//! to appear and writes **unshare's** PID to the pid file, as the Go program
//! does (Rancher Desktop's scripts look for the child named `init` of that
//! PID and enter its namespaces). The first round in either mode creates
//! the veth pair after starting vm-switch; later rounds reuse namespace,
//! init and veth, so the distro never notices. network-setup keeps its own
//! duplicate of the host connection and never reads from it; when vm-switch
//! exits it asks the kernel (a zero-timeout poll) whether the host end has
//! hung up. The rule: if the host link is gone (hang-up, reset), vm-switch's
//! exit was the link's end: go back to the handshake (host-switch,
//! restarted, dials it again); if the link is still up, vm-switch itself
//! ended: shut down. SIGTERM, SIGINT, SIGHUP and SIGQUIT shut down too.
//! Shutting down stops vm-switch (SIGTERM, then SIGKILL after 5 s) and
//! removes the veth; the init (or the unit's process) is left running, as
//! the Go program does, and so is its namespace.

use std::fs::{OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use ipnet::IpNet;
use nix::sys::signal::{Signal as NixSignal, kill};
use nix::unistd::Pid;
use rdnet_guest::netlink::{Netlink, NetlinkError};
use rdnet_guest::netns::NetNs;
use rdnet_link::handshake::guest_accept_ready;
use rdnet_link::sys::SysStream;
use rdnet_link::{Endpoint, LinkStream, dial, listen};
use tokio::process::{Child, Command};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, error, info, warn};

use crate::sys::{pass_as_fd3, peer_hung_up};
use crate::systemd::{SystemdError, unit_namespace};
use crate::{Config, Mode};

/// Bound on the handshake's reads and writes per connection.
const HANDSHAKE_IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Dial attempts after a READY before going back to the handshake.
const DIAL_ATTEMPTS: u32 = 3;
const DIAL_RETRY: Duration = Duration::from_millis(300);
/// How long vm-switch gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for unshare's child (the init) to appear.
const INIT_WAIT: Duration = Duration::from_secs(5);
/// How long a restarted vm-switch waits for its predecessor's tap to go.
const TAP_GONE_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the event loop")]
    Runtime(#[source] io::Error),
    #[error("cannot install the signal handlers")]
    Signal(#[source] io::Error),
    #[error("cannot listen for the handshake on {endpoint}")]
    Listen {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the network namespace")]
    Netns(#[source] io::Error),
    #[error("cannot start the namespaced init (unshare)")]
    Init(#[source] io::Error),
    #[error("unshare exited at once ({0}); check -unshare-arg")]
    InitExited(ExitStatus),
    #[error("the namespaced init (the child of unshare, pid {0}) did not appear")]
    InitNotFound(u32),
    #[error("cannot find the distro's network namespace (systemd mode)")]
    Systemd(#[from] SystemdError),
    #[error(
        "{unit}'s main process (pid {main_pid}) is in network-setup's own network namespace: \
         the unit made no namespace for the distro"
    )]
    UnitNotIsolated { unit: String, main_pid: u32 },
    #[error("cannot write the pid file {path}")]
    PidFile {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start vm-switch ({path})")]
    VmSwitch {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("waiting for vm-switch failed")]
    VmSwitchWait(#[source] io::Error),
    #[error("vm-switch failed ({0}) while the host link was up")]
    VmSwitchFailed(ExitStatus),
    #[error("cannot hand the host connection to vm-switch")]
    HostFd(#[source] io::Error),
    #[error("cannot configure the network")]
    Netlink(#[from] NetlinkError),
}

/// Why network-setup stopped (errors aside).
#[derive(Debug)]
pub enum Outcome {
    Signal(&'static str),
    /// vm-switch exited successfully while the host link was still up
    /// (a failure is [`Error::VmSwitchFailed`]).
    VmSwitchExited(ExitStatus),
}

/// Runs network-setup until a signal, a vm-switch failure or an error;
/// cleans up (vm-switch, veth) in every case.
pub fn run(cfg: Config) -> Result<Outcome, Error> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)?;
    rt.block_on(async move {
        let signals = Signals::new().map_err(Error::Signal)?;
        let origin = Netlink::new()?;
        let mut sup = Supervisor { cfg, origin, signals, distro: None, vm_switch: None, veth_created: false };
        let result = sup.serve().await;
        sup.cleanup().await;
        result
    })
}

struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    quit: Signal,
}

impl Signals {
    fn new() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
            _ = self.quit.recv() => "SIGQUIT",
        }
    }
}

/// The distro's side, made or found once and kept across host-switch
/// restarts.
struct Distro {
    ns: NetNs,
    owner: Owner,
}

/// Whose namespace it is.
enum Owner {
    /// Ours: unshare (its PID is in the pid file) and its child, the init.
    Unshare { unshare_pid: u32, init_pid: i32 },
    /// A systemd unit's main process, which is never ours to touch.
    Unit { unit: String, main_pid: u32 },
}

struct Supervisor {
    cfg: Config,
    /// Netlink in the namespace network-setup started in.
    origin: Netlink,
    signals: Signals,
    distro: Option<Distro>,
    vm_switch: Option<Child>,
    veth_created: bool,
}

impl Supervisor {
    async fn serve(&mut self) -> Result<Outcome, Error> {
        let (host_veth, _) = &self.cfg.veth_host;
        if self.origin.delete_link(host_veth).await? {
            info!("removed a stale {host_veth}");
        }
        if let Mode::Systemd { unit, ignored_unshare_arg } = &self.cfg.mode {
            if let Some(arg) = ignored_unshare_arg {
                warn!("running under systemd ({}): ignoring -unshare-arg {arg:?}", crate::SYSTEMD_ENV);
            }
            let unit = unit.clone();
            let distro = tokio::select! {
                d = find_unit_distro(&unit) => d?,
                s = self.signals.recv() => return Ok(Outcome::Signal(s)),
            };
            self.distro = Some(distro);
        }
        let ep = &self.cfg.handshake_listen;
        let listener = listen(ep).await.map_err(|source| Error::Listen { endpoint: ep.to_string(), source })?;
        info!("waiting for host-switch's handshake on {ep}");
        loop {
            tokio::select! {
                _ = guest_accept_ready(&listener, &self.cfg.signature, HANDSHAKE_IO_TIMEOUT) => {}
                s = self.signals.recv() => return Ok(Outcome::Signal(s)),
            }
            let link = tokio::select! {
                l = dial_host(&self.cfg.host_connect) => l,
                s = self.signals.recv() => return Ok(Outcome::Signal(s)),
            };
            let Some(link) = link else { continue };
            let (link, watch) = into_fds(link).map_err(Error::HostFd)?;
            // A namespace we did not just create may still hold a tap from an
            // earlier vm-switch (ours after a restart, or under systemd one
            // left by an earlier network-setup).
            let existing = self.distro.is_some();
            let ns = match (&self.distro, &self.cfg.mode) {
                (Some(d), _) => d.ns.try_clone().map_err(Error::Netns)?,
                (None, mode) => {
                    let d = match mode.clone() {
                        Mode::OpenRc { init_command } => self.create_distro(&init_command).await?,
                        Mode::Systemd { unit, .. } => find_unit_distro(&unit).await?,
                    };
                    let ns = d.ns.try_clone().map_err(Error::Netns)?;
                    self.distro = Some(d);
                    ns
                }
            };
            if existing {
                wait_tap_gone(&ns, &self.cfg.tap_interface).await;
            }
            self.vm_switch = Some(self.start_vm_switch(&ns, link)?);
            if !self.veth_created {
                self.create_veth(&ns).await?;
            }
            let waited = match self.vm_switch.as_mut() {
                Some(child) => tokio::select! {
                    st = child.wait() => st,
                    s = self.signals.recv() => return Ok(Outcome::Signal(s)),
                },
                None => continue,
            };
            self.vm_switch = None;
            let status = waited.map_err(Error::VmSwitchWait)?;
            if link_hung_up(&watch) {
                warn!("vm-switch exited ({status}): the host link is gone; waiting for host-switch's handshake again");
                continue;
            }
            if !status.success() {
                return Err(Error::VmSwitchFailed(status));
            }
            return Ok(Outcome::VmSwitchExited(status));
        }
    }

    /// The new network namespace with the init inside; writes unshare's
    /// PID to the pid file.
    async fn create_distro(&mut self, init_command: &[String]) -> Result<Distro, Error> {
        let ns = NetNs::new_anonymous().map_err(Error::Netns)?;
        info!("created the distro's network namespace (net:[{}])", ns.inode().unwrap_or(0));
        let unshare = if Path::new("/usr/bin/unshare").exists() { "/usr/bin/unshare" } else { "unshare" };
        let mut cmd = Command::new(unshare);
        cmd.args(["--pid", "--mount-proc", "--fork", "--propagation", "slave"]).args(init_command);
        cmd.stdin(Stdio::null());
        let mut child = spawn_in(&ns, cmd).map_err(Error::Init)?;
        let unshare_pid = child.id().ok_or(Error::InitNotFound(0))?;
        // The pid file is for finding the init: write it only once the
        // init exists.
        let init_pid = match wait_for_child_of(unshare_pid, &mut child).await {
            Ok(pid) => pid,
            Err(e) => {
                let _ = child.start_kill();
                return Err(e);
            }
        };
        info!(
            "started unshare (pid {unshare_pid}); its child, pid {init_pid}, is the namespaced init {init_command:?}"
        );
        if let Err(source) = write_pid_file(&self.cfg.pid_file, unshare_pid) {
            // Nobody could find this init: do not leave it behind.
            let _ = kill(Pid::from_raw(init_pid), NixSignal::SIGKILL);
            let _ = child.start_kill();
            return Err(Error::PidFile { path: self.cfg.pid_file.display().to_string(), source });
        }
        // Reap unshare whenever it ends; the distro's end is not ours to act on.
        tokio::spawn(async move {
            match child.wait().await {
                Ok(status) => warn!("the namespaced init ended (unshare pid {unshare_pid}: {status})"),
                Err(e) => warn!("waiting for unshare (pid {unshare_pid}) failed: {e}"),
            }
        });
        Ok(Distro { ns, owner: Owner::Unshare { unshare_pid, init_pid } })
    }

    fn start_vm_switch(&self, ns: &NetNs, link: OwnedFd) -> Result<Child, Error> {
        let c = &self.cfg;
        let mut cmd = Command::new(&c.vm_switch_path);
        cmd.args(c.vm_switch_args());
        cmd.stdin(Stdio::null());
        pass_as_fd3(&mut cmd, link.as_raw_fd());
        let child = spawn_in(ns, cmd)
            .map_err(|source| Error::VmSwitch { path: c.vm_switch_path.display().to_string(), source })?;
        // The child has its own copy as fd 3 now.
        drop(link);
        info!("started vm-switch (pid {}) on the host link", child.id().unwrap_or(0));
        Ok(child)
    }

    /// The veth pair between this namespace and the distro's, addressed and up.
    async fn create_veth(&mut self, ns: &NetNs) -> Result<(), Error> {
        let (host, host_addr) = &self.cfg.veth_host;
        let (peer, peer_addr) = &self.cfg.veth_ns;
        self.origin.create_veth(host, peer, Some(ns.as_fd())).await?;
        self.veth_created = true;
        self.origin.add_address(host, IpNet::V4(*host_addr)).await?;
        self.origin.set_up(host).await?;
        let inside = Netlink::new_in(ns)?;
        inside.add_address(peer, IpNet::V4(*peer_addr)).await?;
        inside.set_up(peer).await?;
        inside.set_up("lo").await?;
        info!("veth {host} ({host_addr}) <-> {peer} ({peer_addr}) is up");
        Ok(())
    }

    /// Stops vm-switch and removes the veth; the init and its namespace stay.
    async fn cleanup(&mut self) {
        if let Some(child) = self.vm_switch.take() {
            stop(child).await;
        }
        if self.veth_created {
            let (host, _) = &self.cfg.veth_host;
            match self.origin.delete_link(host).await {
                Ok(true) => info!("removed {host}"),
                Ok(false) => debug!("{host} was already gone"),
                Err(e) => error!("cannot remove {host}: {}", rdnet_cli::error_chain(&e)),
            }
        }
        match self.distro.as_ref().map(|d| &d.owner) {
            Some(Owner::Unshare { unshare_pid, init_pid }) => {
                info!("the namespaced init (pid {init_pid}, child of unshare pid {unshare_pid}) keeps running")
            }
            Some(Owner::Unit { unit, main_pid }) => info!("{unit} (main pid {main_pid}) was left alone"),
            None => {}
        }
    }
}

/// Under systemd: the namespace of `unit`'s main process, which must not be
/// this one (the unit would have made no namespace: vm-switch's tap and
/// the whole distro would land in WSL's default namespace).
async fn find_unit_distro(unit: &str) -> Result<Distro, Error> {
    let (main_pid, ns) = unit_namespace(unit).await?;
    let here = NetNs::current().and_then(|n| n.inode()).map_err(Error::Netns)?;
    if ns.inode().map_err(Error::Netns)? == here {
        return Err(Error::UnitNotIsolated { unit: unit.to_string(), main_pid });
    }
    info!("the distro's network namespace is {unit}'s (main pid {main_pid}, net:[{}])", ns.inode().unwrap_or(0));
    Ok(Distro { ns, owner: Owner::Unit { unit: unit.to_string(), main_pid } })
}

/// Dials the host a few times; `None` (logged) sends us back to the handshake.
async fn dial_host(ep: &Endpoint) -> Option<LinkStream> {
    for attempt in 1..=DIAL_ATTEMPTS {
        match dial(ep).await {
            Ok(link) => {
                info!("connected to the host at {ep}");
                return Some(link);
            }
            Err(e) if attempt < DIAL_ATTEMPTS => {
                debug!("dialing the host at {ep} failed: {e}; retrying");
                sleep(DIAL_RETRY).await;
            }
            Err(e) => warn!("cannot connect to the host at {ep}: {e}; waiting for a new handshake"),
        }
    }
    None
}

/// The connection as a plain descriptor for vm-switch, and a duplicate that
/// network-setup keeps to see whether the host hung up. Both close-on-exec.
fn into_fds(link: LinkStream) -> io::Result<(OwnedFd, OwnedFd)> {
    let fd: OwnedFd = match link {
        LinkStream::Unix(s) => s.into_std()?.into(),
        LinkStream::Tcp(s) => s.into_std()?.into(),
        LinkStream::Sys(SysStream::Vsock(s)) => s.as_fd().try_clone_to_owned()?,
        other => {
            return Err(io::Error::new(io::ErrorKind::Unsupported, format!("cannot pass {other:?} to vm-switch")));
        }
    };
    let watch = fd.try_clone()?;
    Ok((fd, watch))
}

/// Whether the peer of `fd` has hung up or reset the connection, without
/// reading from it.
fn link_hung_up(fd: &OwnedFd) -> bool {
    match peer_hung_up(fd.as_fd()) {
        Ok(gone) => gone,
        Err(e) => {
            warn!("cannot poll the host link: {e}; treating it as gone");
            true
        }
    }
}

/// Spawns `cmd` from a thread inside `ns`, so the process lands there.
fn spawn_in(ns: &NetNs, mut cmd: Command) -> io::Result<Child> {
    let rt = tokio::runtime::Handle::current();
    ns.run(move || {
        let _enter = rt.enter();
        cmd.spawn()
    })?
}

/// The PID of `parent`'s first child (unshare forks the init).
async fn wait_for_child_of(parent: u32, unshare: &mut Child) -> Result<i32, Error> {
    let end = Instant::now() + INIT_WAIT;
    loop {
        if let Some(pid) = child_of(parent) {
            return Ok(pid);
        }
        if let Ok(Some(status)) = unshare.try_wait() {
            return Err(Error::InitExited(status));
        }
        if Instant::now() >= end {
            return Err(Error::InitNotFound(parent));
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// A process whose parent is `parent`, from `/proc/*/stat`.
fn child_of(parent: u32) -> Option<i32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            return Some(pid);
        }
    }
    None
}

fn write_pid_file(path: &Path, unshare_pid: u32) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.set_permissions(Permissions::from_mode(0o600))?;
    f.write_all(unshare_pid.to_string().as_bytes())?;
    info!("wrote unshare's pid {unshare_pid} (the init's parent) to {}", path.display());
    Ok(())
}

/// Waits until the predecessor's tap has gone from the namespace (a tap
/// disappears with its last descriptor), so the new vm-switch can create it.
async fn wait_tap_gone(ns: &NetNs, tap: &str) {
    let Ok(nl) = Netlink::new_in(ns) else { return };
    let end = Instant::now() + TAP_GONE_WAIT;
    while Instant::now() < end {
        match nl.link_exists(tap).await {
            Ok(true) => sleep(Duration::from_millis(50)).await,
            _ => return,
        }
    }
    warn!("{tap} is still there; starting vm-switch anyway");
}

/// SIGTERM by PID, then SIGKILL after [`STOP_GRACE`].
async fn stop(mut child: Child) {
    let Some(pid) = child.id() else { return };
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), NixSignal::SIGTERM);
    }
    match timeout(STOP_GRACE, child.wait()).await {
        Ok(Ok(status)) => info!("vm-switch (pid {pid}) stopped ({status})"),
        Ok(Err(e)) => warn!("waiting for vm-switch (pid {pid}) failed: {e}"),
        Err(_) => {
            warn!("vm-switch (pid {pid}) ignored SIGTERM; killing it");
            let _ = child.kill().await;
        }
    }
}
