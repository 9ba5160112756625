//! Running the `-dhcp-script` the way busybox udhcpc runs its `-s` script.
//!
//! How this works: the DHCP task calls [`Script::run`] for each event, in
//! order, and waits for it, so the script never sees two events at once
//! (udhcpc waits too). The wait is an async one on the DHCP task alone, so
//! frames keep flowing meanwhile. The script gets the event as its only
//! argument and the lease in udhcpc's variables
//! (`rdnet_guest::dhcp_script`), on top of vm-switch's own environment
//! cleared of those names; stdin is /dev/null, stdout and stderr are
//! vm-switch's own (as the Go vm-switch gives udhcpc its own). It runs in
//! a process group of its own: a script still running after
//! [`SCRIPT_TIMEOUT`] is killed with everything it started, and so is one
//! running when vm-switch exits. A failure to start, a non-zero exit and a
//! timeout are logged; none stops vm-switch.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rdnet_guest::dhcp_script::{ScriptEvent, VARIABLES};
use tracing::{debug, info, warn};

/// How long one run of the script may take before it is killed.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why `path` cannot be a `-dhcp-script`, checked at start.
pub fn check(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err("not a regular file".into()),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err("not executable".into()),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err("no such file".into()),
        Err(e) => Err(e.to_string()),
    }
}

pub struct Script {
    path: PathBuf,
}

/// Kills a script's process group unless the script was waited for.
struct Group(Option<Pid>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Script {
    pub fn new(path: PathBuf) -> Script {
        Script { path }
    }

    /// Runs the script for `event` on `ifname` and waits for it (at most
    /// [`SCRIPT_TIMEOUT`]).
    pub async fn run(&self, event: ScriptEvent<'_>, ifname: &str) {
        self.run_with_timeout(event, ifname, SCRIPT_TIMEOUT).await;
    }

    async fn run_with_timeout(&self, event: ScriptEvent<'_>, ifname: &str, limit: Duration) -> Outcome {
        let name = event.name();
        let mut cmd = tokio::process::Command::new(&self.path);
        cmd.arg(name).stdin(Stdio::null()).process_group(0).kill_on_drop(true);
        for var in VARIABLES {
            cmd.env_remove(var);
        }
        cmd.envs(event.environment(ifname));
        let started = Instant::now();
        // ETXTBSY: the script was just written, and a process forked
        // elsewhere meanwhile still holds the writer's descriptor until it
        // execs (seen with tests running in parallel); it passes quickly.
        let mut attempts = 0;
        let mut child = loop {
            match cmd.spawn() {
                Ok(c) => break c,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 20 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    warn!("cannot run -dhcp-script {} {name}: {e}", self.path.display());
                    return Outcome::NotStarted;
                }
            }
        };
        let mut group = Group(child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw));
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(status)) => {
                // Reaped: the group id may be reused from now on.
                group.0 = None;
                if status.success() {
                    debug!("-dhcp-script {name} done in {:?}", started.elapsed());
                    Outcome::Exited(0)
                } else {
                    warn!("-dhcp-script {} {name} failed: {status}", self.path.display());
                    Outcome::Exited(status.code().unwrap_or(-1))
                }
            }
            Ok(Err(e)) => {
                warn!("waiting for -dhcp-script {} {name} failed: {e}", self.path.display());
                Outcome::NotStarted
            }
            Err(_) => {
                warn!("-dhcp-script {} {name} still running after {limit:?}: killing it", self.path.display());
                drop(group);
                let _ = child.wait().await;
                info!("-dhcp-script {name} killed");
                Outcome::TimedOut
            }
        }
    }
}

/// How a run ended (for tests).
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    NotStarted,
    Exited(i32),
    TimedOut,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::net::Ipv4Addr;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rdnet-vmsw-script-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("script.sh");
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn check_refuses_what_cannot_run() {
        let dir = temp_dir("check");
        assert_eq!(check(&dir.join("none")), Err("no such file".into()));
        assert_eq!(check(&dir), Err("not a regular file".into()));
        let plain = dir.join("plain");
        fs::write(&plain, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(check(&plain), Err("not executable".into()));
        assert_eq!(check(&write_script(&dir, "exit 0")), Ok(()));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn runs_with_the_event_and_only_its_variables() {
        let dir = temp_dir("run");
        let out = dir.join("out");
        let script = write_script(
            &dir,
            &format!("echo \"$# $1 [$interface] [$ip] [$serverid] [$message]\" >> {}", out.display()),
        );
        let s = Script::new(script);
        let rt = runtime();
        let nak = rdnet_guest::Nak {
            address: Ipv4Addr::UNSPECIFIED,
            server_id: Some(Ipv4Addr::new(192, 168, 127, 1)),
            message: Some("no".into()),
        };
        assert_eq!(rt.block_on(s.run_with_timeout(ScriptEvent::Deconfig, "eth7", SCRIPT_TIMEOUT)), Outcome::Exited(0));
        assert_eq!(rt.block_on(s.run_with_timeout(ScriptEvent::Nak(&nak), "eth7", SCRIPT_TIMEOUT)), Outcome::Exited(0));
        assert_eq!(
            fs::read_to_string(&out).unwrap(),
            "1 deconfig [eth7] [] [] []\n1 nak [eth7] [0.0.0.0] [192.168.127.1] [no]\n"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failure_and_timeout_are_survived() {
        let dir = temp_dir("fail");
        let rt = runtime();
        let failing = Script::new(write_script(&dir, "exit 3"));
        assert_eq!(
            rt.block_on(failing.run_with_timeout(ScriptEvent::LeaseFail, "eth0", SCRIPT_TIMEOUT)),
            Outcome::Exited(3)
        );
        let missing = Script::new(dir.join("gone"));
        assert_eq!(
            rt.block_on(missing.run_with_timeout(ScriptEvent::LeaseFail, "eth0", SCRIPT_TIMEOUT)),
            Outcome::NotStarted
        );
        // A script that hangs, with a child of its own: both are killed.
        let pidfile = dir.join("child.pid");
        let hanging = Script::new(write_script(&dir, &format!("sleep 30 & echo $! > {}\nwait", pidfile.display())));
        let started = Instant::now();
        let outcome = rt.block_on(hanging.run_with_timeout(ScriptEvent::Deconfig, "eth0", Duration::from_millis(500)));
        assert_eq!(outcome, Outcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid: i32 = fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        // The orphaned sleep is reaped by init; it must be gone (or a zombie) soon.
        let gone = (0..100).any(|_| {
            let state = fs::read_to_string(format!("/proc/{pid}/stat")).ok();
            let dead = state.as_deref().is_none_or(|s| s.split_whitespace().nth(2) == Some("Z"));
            if !dead {
                std::thread::sleep(Duration::from_millis(20));
            }
            dead
        });
        assert!(gone, "the script's child {pid} survived the kill");
        fs::remove_dir_all(&dir).unwrap();
    }
}
