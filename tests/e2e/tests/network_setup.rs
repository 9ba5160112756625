//! network-setup and the handshake, end to end, as Rancher Desktop runs it
//! today (issues 5 and 13).
//!
//! The world (TESTING.md): host-switch runs in a "host" namespace that has
//! only `lo`, listening on a unix socket; network-setup runs in a second
//! namespace standing for WSL's default one, does the handshake with
//! host-switch over another unix socket (standing in for vsock port 6669),
//! dials host-switch's socket and sets up the distro: under OpenRC a fresh
//! network namespace with the init in its own pid namespace, under systemd
//! the namespace of a process a stand-in systemd names on a private D-Bus
//! bus; then vm-switch on the host link and the veth pair. Each test has its
//! own WSL namespace, so the default veth names cannot collide between tests
//! running in parallel. Whatever network-setup leaves running in the
//! distro's namespace (the init by design, anything else on failure) is
//! ended by PID by the rig's guard. The environment that selects systemd
//! mode or a D-Bus bus is never inherited from whatever runs the tests: no
//! test can reach the machine's own system bus.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use rdnet_e2e::{Netns, Proc, TempDir, World, bin, privileged, socket_exists, tcp_ready_in, wait_until};

const LEASE_WAIT: Duration = Duration::from_secs(30);
const HTTP_PORT: u16 = 18181;
const TOKEN: &str = "network-setup-e2e-token";
const CURRENT_SIGNATURE: &str = "github.com/rancher-sandbox/rancher-desktop/src/go/networking";
const SEED_SIGNATURE: &str = "github.com/rancher-sandbox/rancher-desktop-networking";
/// Variables that would switch network-setup to systemd mode or point it at
/// a D-Bus bus: removed from every network-setup the tests start, and set
/// only where a test means them.
const MODE_ENV: [&str; 2] = ["SYSTEMD_EXEC_PID", "DBUS_SYSTEM_BUS_ADDRESS"];

/// An init for `-unshare-arg`: PID 1 of its pid namespace, so it needs a
/// handler to end on SIGTERM. Written to a file named `init`, its process
/// is called `init` (comm), as the distro's real one is.
const INIT_SCRIPT: &str = "#!/bin/sh\ntrap 'exit 0' TERM INT\nsleep 1000 &\nwait\n";

/// `program` in `ns` with none of [`MODE_ENV`] inherited, plus `env`.
fn setup_command(ns: &Netns, program: impl AsRef<std::ffi::OsStr>, env: &[(&str, &str)]) -> Command {
    let mut cmd = ns.command(program);
    for key in MODE_ENV {
        cmd.env_remove(key);
    }
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

/// unshare's PID (from the pid file) and its child's, the init's.
#[derive(Clone, Copy, Debug)]
struct Distro {
    unshare: i32,
    init: i32,
}

struct Rig {
    setup: Option<Proc>,
    http: Option<Proc>,
    distro_net: Option<u64>,
    pid_file: PathBuf,
    handshake: String,
    wsl: Netns,
    world: World,
    /// Holds the handshake socket; removed last.
    _hs_dir: TempDir,
}

impl Rig {
    /// host-switch (with `hs_extra`) in its host namespace, and an empty
    /// namespace for network-setup.
    fn new(hs_extra: &[&str]) -> Rig {
        let hs_dir = TempDir::new("nsetup-hs");
        let handshake = format!("unix://{}", hs_dir.join("hs-handshake.sock").display());
        let mut args = vec!["--handshake", handshake.as_str()];
        args.extend_from_slice(hs_extra);
        // World::new returns once host-switch listens for VMs, which it
        // does before the handshake.
        let world = World::new(&args);
        let pid_file = world.dir.join("wsl-init.pid");
        Rig {
            setup: None,
            http: None,
            distro_net: None,
            pid_file,
            handshake,
            wsl: Netns::new("rdw"),
            world,
            _hs_dir: hs_dir,
        }
    }

    fn restart_host_switch(&mut self, hs_extra: &[&str]) {
        let mut args = vec!["--handshake", self.handshake.as_str()];
        args.extend_from_slice(hs_extra);
        self.world.start_host_switch(&args);
    }

    /// The init script `init` in the world's directory.
    fn write_init(&self) -> PathBuf {
        let init = self.world.dir.join("init");
        fs::write(&init, INIT_SCRIPT).unwrap();
        fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
        init
    }

    /// The flags that only tests give: unix sockets for vsock, and every
    /// file network-setup and vm-switch write in the world's directory.
    fn test_flags(&self) -> Vec<String> {
        vec![
            "--handshake-listen".into(),
            self.handshake.clone(),
            "--host-connect".into(),
            format!("unix://{}", self.world.socket.display()),
            "--pid-file".into(),
            self.pid_file.display().to_string(),
            "--vm-switch-resolv-conf".into(),
            self.world.dir.join("resolv.conf").display().to_string(),
        ]
    }

    /// network-setup in the WSL namespace with `extra` flags after the usual ones.
    fn start_setup(&mut self, extra: &[&str]) {
        self.start_setup_env(&[], extra);
    }

    /// The same, with `env` added to its environment.
    fn start_setup_env(&mut self, env: &[(&str, &str)], extra: &[&str]) {
        let init = self.write_init().display().to_string();
        let vm_switch = bin("vm-switch").display().to_string();
        let vm_log = self.world.dir.join("vm-switch.log").display().to_string();
        let mut args: Vec<String> = [
            "-debug",
            "-vm-switch-path",
            &vm_switch,
            "-vm-switch-logfile",
            &vm_log,
            "-unshare-arg",
            &init,
            "-logfile",
            "/dev/stdout",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.test_flags());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = setup_command(&self.wsl, bin("network-setup"), env);
        cmd.args(&args);
        self.setup = Some(Proc::spawn(&self.world.dir, &mut cmd));
    }

    fn setup(&mut self) -> &mut Proc {
        self.setup.as_mut().expect("network-setup started")
    }

    fn logs(&self) -> String {
        let mut s = self.world.logs();
        if let Some(p) = &self.setup {
            s += &format!("--- network-setup ---\n{}\n", p.logs());
        }
        for file in ["network-setup.log", "vm-switch.log"] {
            if let Ok(text) = fs::read_to_string(self.world.dir.join(file)) {
                s += &format!("--- {file} ---\n{text}\n");
            }
        }
        s
    }

    /// unshare's PID once network-setup has written it, and the init's.
    fn wait_distro(&mut self) -> Distro {
        let mut unshare = None;
        wait_until(Duration::from_secs(20), || {
            unshare = read_pid(&self.pid_file);
            unshare.is_some()
        });
        let unshare = unshare.unwrap_or_else(|| panic!("no pid file\n{}", self.logs()));
        self.distro_net = ns_inode(unshare, "net");
        let mut init = None;
        wait_until(Duration::from_secs(5), || {
            init = children_of(unshare).first().copied();
            init.is_some()
        });
        let init = init.unwrap_or_else(|| panic!("unshare (pid {unshare}) has no child\n{}", self.logs()));
        Distro { unshare, init }
    }

    /// Runs `program` inside the network namespace of `pid`.
    fn distro_exec(&self, pid: i32, program: &str, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .arg(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("nsenter {program}: {e}"))
    }

    fn eth0_address(&self, pid: i32) -> Option<String> {
        let out = self.distro_exec(pid, "ip", &["-4", "-o", "addr", "show", "dev", "eth0"]);
        first_inet(&out)
    }

    fn wait_lease(&self, pid: i32) -> Option<String> {
        let mut addr = None;
        wait_until(LEASE_WAIT, || {
            addr = self.eth0_address(pid);
            addr.is_some()
        });
        addr
    }

    fn curl_host(&self, pid: i32) -> Option<String> {
        let url = format!("http://192.168.127.254:{HTTP_PORT}/token.txt");
        let out = self.distro_exec(pid, "curl", &["-s", "-m", "3", &url]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A web server on 127.0.0.1:HTTP_PORT in the host namespace.
    fn start_http(&mut self) {
        let root = self.world.dir.join("www");
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("token.txt"), TOKEN).unwrap();
        let root = root.display().to_string();
        let port = HTTP_PORT.to_string();
        let p = self.world.host.spawn(
            &self.world.dir,
            "python3",
            &["-m", "http.server", "--bind", "127.0.0.1", "--directory", &root, &port],
        );
        assert!(wait_until(Duration::from_secs(10), || tcp_ready_in(&self.world.host, HTTP_PORT)), "{}", p.logs());
        self.http = Some(p);
    }

    /// PIDs of processes in the distro's network namespace.
    fn distro_pids(&self) -> Vec<i32> {
        self.distro_net.map(pids_in_netns).unwrap_or_default()
    }

    /// Waits up to `within` for network-setup to exit.
    fn wait_setup_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(within, || {
            status = self.setup().try_wait();
            status.is_some()
        });
        status
    }

    fn veth_address(&self, name: &str) -> Option<String> {
        first_inet(&self.wsl.exec("ip", &["-4", "-o", "addr", "show", "dev", name]))
    }

    fn wsl_has_link(&self, name: &str) -> bool {
        self.wsl.exec("ip", &["link", "show", name]).status.success()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // network-setup first: it stops vm-switch and removes the veth.
        drop(self.setup.take());
        drop(self.http.take());
        // Then whatever is left in the distro's namespace (the init,
        // unshare), and in one the pid file names if that is another (a
        // namespace network-setup made where a test meant it to use one).
        let mut inodes: Vec<u64> = self.distro_net.into_iter().collect();
        if let Some(inode) = read_pid(&self.pid_file).and_then(|pid| ns_inode(pid, "net"))
            && !inodes.contains(&inode)
        {
            inodes.push(inode);
        }
        for inode in inodes {
            for signal in ["TERM", "KILL"] {
                for pid in pids_in_netns(inode) {
                    let _ = Command::new("kill")
                        .args([format!("-{signal}"), pid.to_string()])
                        .stderr(Stdio::null())
                        .status();
                }
                if wait_until(Duration::from_secs(3), || pids_in_netns(inode).is_empty()) {
                    break;
                }
            }
        }
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn ns_inode(pid: i32, kind: &str) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/{kind}")).ok().map(|m| m.ino())
}

fn pids_in_netns(inode: u64) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| ns_inode(*pid, "net") == Some(inode))
        .collect()
}

/// The processes whose parent is `parent` (from `/proc/*/stat`).
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // "pid (comm) state ppid ...": comm may hold spaces.
                stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

fn cmdline(pid: i32) -> Vec<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    // The list ends with a NUL, which leaves one empty item behind.
    args.pop();
    args
}

fn first_inet(out: &Output) -> Option<String> {
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().skip_while(|w| *w != "inet").nth(1).map(str::to_string)
}

/// The IPv4 address/prefix of `dev` in `ip -o -4 addr` output.
fn inet_of(ip_o_addr: &str, dev: &str) -> Option<String> {
    ip_o_addr.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.nth(1) == Some(dev)).then(|| words.skip_while(|w| *w != "inet").nth(1).map(str::to_string))?
    })
}

fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// The vm-switch processes in the distro's namespace.
fn vm_switch_pids(rig: &Rig) -> Vec<i32> {
    let exe = bin("vm-switch");
    rig.distro_pids()
        .into_iter()
        .filter(|pid| fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .collect()
}

fn wait_vm_switch(rig: &Rig) -> Vec<i32> {
    let mut vm = Vec::new();
    wait_until(Duration::from_secs(10), || {
        vm = vm_switch_pids(rig);
        !vm.is_empty()
    });
    assert!(!vm.is_empty(), "no vm-switch\n{}", rig.logs());
    vm
}

/// `s` as one word for /bin/sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn handshake_distro_veth_nat_recovery_and_sigterm() {
    if !privileged() {
        return;
    }
    let mut rig = Rig::new(&[]);
    rig.start_http();
    rig.start_setup(&[]);

    // The handshake over unix sockets, then the pid file: unshare's PID,
    // whose child is the init.
    let d = rig.wait_distro();
    let setup_pid = rig.setup().pid();
    let mode = fs::metadata(&rig.pid_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "pid file mode");
    assert_eq!(comm(d.unshare), "unshare", "the pid file names unshare");
    assert!(alive(d.init), "init {} is not running\n{}", d.init, rig.logs());
    // unshare stays in our pid namespace, its child is PID 1 of a new one;
    // both are in the distro's network namespace.
    assert_eq!(ns_inode(d.unshare, "pid"), ns_inode(setup_pid, "pid"));
    for kind in ["net", "pid", "mnt"] {
        let (ours, theirs) = (ns_inode(setup_pid, kind), ns_inode(d.init, kind));
        assert!(ours.is_some() && theirs.is_some() && ours != theirs, "{kind} namespace: {ours:?} vs {theirs:?}");
    }
    assert_eq!(ns_inode(d.unshare, "net"), ns_inode(d.init, "net"));
    // network-setup stayed in the namespace it was started in.
    let wsl_net = fs::metadata(format!("/run/netns/{}", rig.wsl.name)).unwrap().ino();
    assert_eq!(ns_inode(setup_pid, "net"), Some(wsl_net));

    // eth0 in the distro gets its lease from host-switch's DHCP server.
    assert_eq!(rig.wait_lease(d.init).as_deref(), Some("192.168.127.2/24"), "{}", rig.logs());
    // DNS settings go where --vm-switch-resolv-conf says.
    let resolv = rig.world.dir.join("resolv.conf");
    let dns = wait_until(Duration::from_secs(5), || {
        fs::read_to_string(&resolv).is_ok_and(|t| t.contains("nameserver 192.168.127.1"))
    });
    assert!(dns, "resolv.conf: {:?}", fs::read_to_string(&resolv));

    // The veth pair, current Rancher Desktop's layout by default:
    // addresses on both ends, ping both ways.
    assert_eq!(rig.veth_address("veth-rd-wsl").as_deref(), Some("192.168.143.2/24"), "{}", rig.logs());
    let out = rig.distro_exec(d.init, "ip", &["-4", "-o", "addr", "show", "dev", "veth-rd-ns"]);
    assert_eq!(first_inet(&out).as_deref(), Some("192.168.143.1/24"), "{}", rig.logs());
    assert!(rig.wsl.exec("ping", &["-c", "2", "-i", "0.2", "-W", "2", "192.168.143.1"]).status.success());
    assert!(rig.distro_exec(d.init, "ping", &["-c", "2", "-i", "0.2", "-W", "2", "192.168.143.2"]).status.success());

    // -logfile /dev/stdout: the log is on the inherited standard output.
    let stdout = rig.setup().stdout();
    assert!(stdout.contains("waiting for host-switch's handshake"), "network-setup's stdout:\n{stdout}");

    // Through host-switch's NAT to the host namespace's loopback.
    let mut got = None;
    wait_until(Duration::from_secs(15), || {
        got = rig.curl_host(d.init);
        got.is_some()
    });
    assert_eq!(got.as_deref(), Some(TOKEN), "{}", rig.logs());

    // host-switch goes away and comes back, stopped cleanly and then
    // killed: connectivity returns by itself each time, the init stays.
    for kill in ["TERM", "KILL"] {
        let hs = rig.world.host_switch();
        if kill == "TERM" {
            assert!(hs.terminate(Duration::from_secs(10)).is_some(), "host-switch did not stop");
        } else {
            let _ = hs.child.kill();
            let _ = hs.child.wait();
        }
        rig.world.host_switch = None;
        let gone = wait_until(Duration::from_secs(10), || rig.curl_host(d.init).is_none());
        assert!(gone, "curl still works without host-switch");
        let restarted = Instant::now();
        rig.restart_host_switch(&[]);
        let mut got = None;
        let back = wait_until(Duration::from_secs(45), || {
            got = rig.curl_host(d.init);
            got.is_some()
        });
        assert!(back, "no connectivity 45 s after host-switch restarted (SIG{kill})\n{}", rig.logs());
        eprintln!("connectivity back {:?} after host-switch's restart (SIG{kill})", restarted.elapsed());
        assert_eq!(got.as_deref(), Some(TOKEN));
        assert!(alive(d.init), "the init died during recovery\n{}", rig.logs());
        assert_eq!(read_pid(&rig.pid_file), Some(d.unshare), "the pid file changed");
        assert_eq!(rig.eth0_address(d.init).as_deref(), Some("192.168.127.2/24"), "same lease after recovery");
        assert!(rig.setup().try_wait().is_none(), "network-setup exited\n{}", rig.logs());
        assert_eq!(vm_switch_pids(&rig).len(), 1, "exactly one vm-switch\n{}", rig.logs());
    }

    // SIGTERM: vm-switch stops, the veth goes, exit status 0.
    let status = rig.setup().terminate(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "network-setup exit: {status:?}\n{}", rig.logs());
    assert!(!rig.wsl_has_link("veth-rd-wsl"), "veth-rd-wsl is still there");
    assert!(wait_until(Duration::from_secs(5), || vm_switch_pids(&rig).is_empty()), "vm-switch still runs");
    assert!(alive(d.init), "the init is left running, as the Go original did");
}

/// Rancher Desktop's `wsl-init` (assets/scripts/wsl-init) with the test's
/// paths: started normally it execs network-setup with Rancher Desktop's
/// command line (plus the test-only flags at the end); as PID 1 of the new
/// pid namespace it ends by exec'ing a program named `init`. What the real
/// one mounts is left out (it would change mounts of this machine); the
/// data directories it is given are written down instead.
fn wsl_init_script(network_setup: &Path, vm_switch: &Path, init: &Path, test_flags: &[String]) -> String {
    let test_flags: Vec<String> = test_flags.iter().map(|f| sh_quote(f)).collect();
    format!(
        r#"#!/bin/sh
set -o errexit -o nounset

NETWORK_SETUP_LOG="${{LOG_DIR}}/network-setup.log"
VM_SWITCH_LOG="${{LOG_DIR}}/vm-switch.log"

if [ $$ -ne "1" ]; then
    exec {network_setup} --logfile "$NETWORK_SETUP_LOG" \
    --vm-switch-path {vm_switch} --vm-switch-logfile \
    "$VM_SWITCH_LOG" ${{RD_DEBUG:+-debug}} ${{RD_VMSWITCH_TRACE:+-trace-packets}} --unshare-arg "${{0}}" \
    {test_flags}
fi

echo "${{DISTRO_DATA_DIRS}}" > "${{LOG_DIR}}/distro-data-dirs"
exec {init}
"#,
        network_setup = sh_quote(&network_setup.display().to_string()),
        vm_switch = sh_quote(&vm_switch.display().to_string()),
        init = sh_quote(&init.display().to_string()),
        test_flags = test_flags.join(" "),
    )
}

#[test]
fn started_as_rancher_desktop_starts_it() {
    if !privileged() {
        return;
    }
    let mut rig = Rig::new(&[]);
    let init = rig.write_init();
    let script = rig.world.dir.join("wsl-init");
    let (network_setup, vm_switch) = (bin("network-setup"), bin("vm-switch"));
    fs::write(&script, wsl_init_script(&network_setup, &vm_switch, &init, &rig.test_flags())).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    // The log directory is the world's, where the rig looks for the logs.
    let log_dir = rig.world.dir.path.display().to_string();
    let data_dirs = "/var/lib/rancher-desktop:/var/lib/docker";
    let env =
        [("LOG_DIR", log_dir.as_str()), ("DISTRO_DATA_DIRS", data_dirs), ("RD_DEBUG", "1"), ("RD_VMSWITCH_TRACE", "1")];
    let mut cmd = setup_command(&rig.wsl, &script, &env);
    rig.setup = Some(Proc::spawn(&rig.world.dir, &mut cmd));
    let d = rig.wait_distro();

    // network-setup runs with Rancher Desktop's own command line.
    let setup_pid = rig.setup().pid();
    let argv = cmdline(setup_pid);
    let ns_log = format!("{log_dir}/network-setup.log");
    let vm_log = format!("{log_dir}/vm-switch.log");
    let rd_argv = [
        network_setup.display().to_string(),
        "--logfile".into(),
        ns_log.clone(),
        "--vm-switch-path".into(),
        vm_switch.display().to_string(),
        "--vm-switch-logfile".into(),
        vm_log.clone(),
        "-debug".into(),
        "-trace-packets".into(),
        "--unshare-arg".into(),
        script.display().to_string(),
    ];
    assert_eq!(argv[..rd_argv.len().min(argv.len())], rd_argv[..], "network-setup's argv\n{}", rig.logs());
    assert_eq!(argv[rd_argv.len()..], rig.test_flags()[..]);

    // The pid file names unshare; its child is called init, and entering
    // the child's namespaces (as Rancher Desktop's scripts do) lands in the
    // distro: its pid namespace (init is PID 1), its eth0 with the lease and
    // its end of the veth.
    assert_eq!(comm(d.unshare), "unshare");
    let named_init = wait_until(Duration::from_secs(10), || {
        children_of(d.unshare).into_iter().any(|c| c == d.init && comm(c) == "init")
    });
    assert!(named_init, "unshare's child is {:?}, not init\n{}", comm(d.init), rig.logs());
    assert_eq!(rig.wait_lease(d.init).as_deref(), Some("192.168.127.2/24"), "{}", rig.logs());
    let target = d.init.to_string();
    let enter = |args: &[&str]| {
        let out = Command::new("nsenter")
            .args(["--target", &target, "--net", "--mount", "--pid"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("nsenter: {e}"));
        assert!(out.status.success(), "nsenter {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(enter(&["cat", "/proc/1/comm"]).trim(), "init", "PID 1 inside");
    let addrs = enter(&["ip", "-o", "-4", "addr"]);
    assert_eq!(inet_of(&addrs, "eth0").as_deref(), Some("192.168.127.2/24"), "{addrs}");
    assert_eq!(inet_of(&addrs, "veth-rd-ns").as_deref(), Some("192.168.143.1/24"), "{addrs}");
    // The environment reached the init as Rancher Desktop's does.
    let recorded = fs::read_to_string(rig.world.dir.join("distro-data-dirs")).unwrap_or_default();
    assert_eq!(recorded.trim(), data_dirs);

    // WSL's side of the veth, and no route for the home network
    // 192.168.1.0/24 (the seed's veth took it).
    assert_eq!(rig.veth_address("veth-rd-wsl").as_deref(), Some("192.168.143.2/24"), "{}", rig.logs());
    let to_distro = rig.wsl.exec("ip", &["route", "get", "192.168.143.1"]);
    assert!(String::from_utf8_lossy(&to_distro.stdout).contains("dev veth-rd-wsl"), "{to_distro:?}");
    let home = rig.wsl.exec("ip", &["route", "get", "192.168.1.50"]);
    let home_text = format!("{}{}", String::from_utf8_lossy(&home.stdout), String::from_utf8_lossy(&home.stderr));
    assert!(!home_text.contains("veth-rd"), "192.168.1.50 is routed into the distro: {home_text}");
    assert!(rig.wsl.exec("ping", &["-c", "1", "-W", "2", "192.168.143.1"]).status.success(), "{}", rig.logs());

    // vm-switch got Rancher Desktop's arguments: -dhcp-script always (here
    // empty), -debug from RD_DEBUG, -trace-packets from RD_VMSWITCH_TRACE,
    // and its log in LOG_DIR.
    let vm = wait_vm_switch(&rig);
    let vm_argv = cmdline(vm[0]);
    assert!(vm_argv.windows(2).any(|w| w[0] == "-dhcp-script" && w[1].is_empty()), "{vm_argv:?}");
    assert!(vm_argv.windows(2).any(|w| w[0] == "-logfile" && w[1] == vm_log), "{vm_argv:?}");
    for flag in ["-debug", "-trace-packets"] {
        assert!(vm_argv.iter().any(|a| a == flag), "{flag} missing: {vm_argv:?}");
    }
    let vm_logged = wait_until(Duration::from_secs(5), || fs::metadata(&vm_log).is_ok_and(|m| m.len() > 0));
    assert!(vm_logged, "nothing in {vm_log}");
    // The chain's end: vm-switch traces packets (the lease it got, both ways).
    let traced = || {
        let text = fs::read_to_string(&vm_log).unwrap_or_default();
        text.contains("vm→host") && text.contains("host→vm") && text.contains("(DHCP ACK)")
    };
    assert!(
        wait_until(Duration::from_secs(5), traced),
        "no packet trace in {vm_log}:\n{}",
        fs::read_to_string(&vm_log).unwrap_or_default()
    );
    let ns_text = fs::read_to_string(&ns_log).unwrap_or_default();
    assert!(ns_text.contains(&format!("wrote unshare's pid {}", d.unshare)), "{ns_log}:\n{ns_text}");

    let status = rig.setup().terminate(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{}", rig.logs());
    assert!(!rig.wsl_has_link("veth-rd-wsl"));
}

#[test]
fn seed_layout_and_signature_through_flags() {
    if !privileged() {
        return;
    }
    // host-switch accepts only the seed's phrase here.
    let mut rig = Rig::new(&["--signature", SEED_SIGNATURE]);
    // The init as a command with an argument, as well.
    rig.start_setup(&[
        "--signature",
        SEED_SIGNATURE,
        "--veth-host-name",
        "veth-rd0",
        "--veth-host-address",
        "192.168.1.1/24",
        "--veth-ns-name",
        "veth-rd1",
        "--veth-ns-address",
        "192.168.1.2/24",
        "-unshare-arg",
        "/bin/sleep 1000",
    ]);
    let d = rig.wait_distro();
    assert_eq!(comm(d.init), "sleep", "the init is the command given");
    assert_eq!(rig.wait_lease(d.init).as_deref(), Some("192.168.127.2/24"), "{}", rig.logs());
    assert_eq!(rig.veth_address("veth-rd0").as_deref(), Some("192.168.1.1/24"), "{}", rig.logs());
    let out = rig.distro_exec(d.init, "ip", &["-4", "-o", "addr", "show", "dev", "veth-rd1"]);
    assert_eq!(first_inet(&out).as_deref(), Some("192.168.1.2/24"), "{}", rig.logs());
    assert!(!rig.wsl_has_link("veth-rd-wsl"));
    assert!(rig.wsl.exec("ping", &["-c", "1", "-W", "2", "192.168.1.2"]).status.success(), "{}", rig.logs());
    let status = rig.setup().terminate(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(!rig.wsl_has_link("veth-rd0"));
}

#[test]
fn a_wrong_signature_never_completes_the_handshake() {
    if !privileged() {
        return;
    }
    // host-switch accepts only the seed's phrase; network-setup announces
    // the current one (its default).
    let mut rig = Rig::new(&["--signature", SEED_SIGNATURE]);
    rig.start_setup(&[]);
    std::thread::sleep(Duration::from_secs(4));
    // Both sides say so at info, naming both phrases, once (not per probe).
    let host_log = rig.world.host_switch().logs();
    let host_lines: Vec<&str> = host_log.lines().filter(|l| l.contains("announced the signature")).collect();
    assert_eq!(host_lines.len(), 1, "{}", rig.logs());
    assert!(
        host_lines[0].contains(" INFO ")
            && host_lines[0].contains(CURRENT_SIGNATURE)
            && host_lines[0].contains(SEED_SIGNATURE),
        "{}",
        host_lines[0]
    );
    let setup_log = rig.setup().logs();
    let setup_lines: Vec<&str> =
        setup_log.lines().filter(|l| l.contains("host-switch expects the signature")).collect();
    assert_eq!(setup_lines.len(), 1, "{}", rig.logs());
    assert!(
        setup_lines[0].contains(" INFO ")
            && setup_lines[0].contains(CURRENT_SIGNATURE)
            && setup_lines[0].contains(SEED_SIGNATURE),
        "{}",
        setup_lines[0]
    );
    assert!(!rig.pid_file.exists(), "the distro was set up without a handshake\n{}", rig.logs());
    assert!(rig.setup().try_wait().is_none(), "network-setup gave up\n{}", rig.logs());
    assert!(rig.world.host_switch().try_wait().is_none(), "host-switch gave up early\n{}", rig.logs());
    assert!(!rig.wsl_has_link("veth-rd-wsl"));
    let status = rig.setup().terminate(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[test]
fn vm_switch_failing_on_a_live_link_shuts_down() {
    if !privileged() {
        return;
    }
    let mut rig = Rig::new(&[]);
    rig.start_setup(&[]);
    let d = rig.wait_distro();
    let vm = wait_vm_switch(&rig);
    assert!(wait_until(Duration::from_secs(10), || rig.wsl_has_link("veth-rd-wsl")));
    // A crash while host-switch is still there: shut down, not recover.
    for pid in &vm {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    let status = rig.wait_setup_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "network-setup should fail: {status:?}\n{}", rig.logs());
    let out = rig.setup().logs();
    assert_eq!(out.matches("vm-switch failed").count(), 1, "the error once:\n{out}");
    assert!(!rig.wsl_has_link("veth-rd-wsl"), "veth-rd-wsl is still there");
    assert!(alive(d.init));
}

/// A stand-in for systemd on a private bus: owns `org.freedesktop.systemd1`
/// and answers the Manager's `GetUnit` and each unit's `MainPID`, served
/// from a thread of the test process with its own runtime; stopped on drop.
struct StandInSystemd {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// systemd's error for a unit it has not loaded.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.systemd1")]
enum SystemdError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchUnit(String),
}

struct Manager {
    /// Unit name → object path.
    units: HashMap<String, String>,
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    fn get_unit(&self, name: &str) -> Result<zbus::zvariant::OwnedObjectPath, SystemdError> {
        let path = self.units.get(name).ok_or_else(|| SystemdError::NoSuchUnit(format!("Unit {name} not loaded.")))?;
        zbus::zvariant::OwnedObjectPath::try_from(path.as_str()).map_err(|e| SystemdError::ZBus(e.into()))
    }
}

struct Service {
    main_pid: u32,
}

#[zbus::interface(name = "org.freedesktop.systemd1.Service")]
impl Service {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> u32 {
        self.main_pid
    }
}

/// A unit's object path as systemd escapes it (`_2d` for `-`, ...).
fn unit_path(name: &str) -> String {
    let escaped: String = name
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("_{b:02x}") })
        .collect();
    format!("/org/freedesktop/systemd1/unit/{escaped}")
}

impl StandInSystemd {
    fn start(address: &str, units: &[(&str, u32)]) -> StandInSystemd {
        let address = address.to_string();
        let units: Vec<(String, u32)> = units.iter().map(|(n, p)| (n.to_string(), *p)).collect();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let manager = Manager { units: units.iter().map(|(n, _)| (n.clone(), unit_path(n))).collect() };
                let built = async {
                    let mut builder = zbus::connection::Builder::address(address.as_str())?
                        .name("org.freedesktop.systemd1")?
                        .serve_at("/org/freedesktop/systemd1", manager)?;
                    for (name, pid) in &units {
                        builder = builder.serve_at(unit_path(name), Service { main_pid: *pid })?;
                    }
                    builder.build().await
                }
                .await;
                match built {
                    Ok(conn) => {
                        let _ = ready_tx.send(Ok(()));
                        let _ = stopped.await;
                        drop(conn);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                    }
                }
            });
        });
        match ready.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            other => panic!("the stand-in systemd did not start: {other:?}"),
        }
        StandInSystemd { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for StandInSystemd {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A private D-Bus bus (dbus-daemon, everything allowed) on a unix socket
/// in `dir`, run in `ns`; returns the process and its address.
fn private_bus(ns: &Netns, dir: &TempDir) -> (Proc, String) {
    let socket = dir.join("system_bus_socket");
    let config = dir.join("bus.conf");
    fs::write(
        &config,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
            socket.display()
        ),
    )
    .unwrap();
    let config_arg = format!("--config-file={}", config.display());
    let bus = ns.spawn(dir, "dbus-daemon", &[config_arg.as_str(), "--nofork", "--nopidfile"]);
    assert!(wait_until(Duration::from_secs(10), || socket_exists(&socket)), "dbus-daemon: {}", bus.logs());
    (bus, format!("unix:path={}", socket.display()))
}

#[test]
fn systemd_mode_uses_the_units_namespace() {
    if !privileged() {
        return;
    }
    let mut rig = Rig::new(&[]);
    let (bus, address) = private_bus(&rig.wsl, &rig.world.dir);
    // The unit's main process: a sleeper holding its own network namespace.
    let sleeper = Proc::spawn(&rig.world.dir, Command::new("unshare").args(["--net", "sleep", "1000"]));
    let our_net = ns_inode(std::process::id() as i32, "net");
    let isolated = wait_until(Duration::from_secs(5), || {
        comm(sleeper.pid()) == "sleep" && ns_inode(sleeper.pid(), "net").is_some_and(|n| Some(n) != our_net)
    });
    assert!(isolated, "the sleeper has no namespace of its own: {}", sleeper.logs());
    let sleeper_pid = sleeper.pid();
    let sleeper_net = ns_inode(sleeper_pid, "net");
    rig.distro_net = sleeper_net;
    // shared.service's process is in network-setup's own namespace (the bus's).
    let _systemd = StandInSystemd::start(
        &address,
        &[
            ("network-namespace.service", sleeper_pid as u32),
            ("stopped.service", 0),
            ("shared.service", bus.pid() as u32),
        ],
    );
    let env = [("SYSTEMD_EXEC_PID", "4242"), ("DBUS_SYSTEM_BUS_ADDRESS", address.as_str())];

    // Errors come at once, before any handshake, once each, exit status 1.
    let unreachable = format!("unix:path={}", rig.world.dir.join("no-bus").display());
    for (env, extra, expected) in [
        (env, &["-namespace-service", "nope.service"][..], r#"systemd has no unit "nope.service" loaded"#),
        (env, &["-namespace-service", "stopped.service"], "stopped.service is not running (MainPID 0)"),
        (env, &["-namespace-service", "shared.service"], "is in network-setup's own network namespace"),
        (
            [("SYSTEMD_EXEC_PID", "4242"), ("DBUS_SYSTEM_BUS_ADDRESS", unreachable.as_str())],
            &[],
            "cannot connect to the system D-Bus at unix:path=",
        ),
    ] {
        rig.start_setup_env(&env, extra);
        let status = rig.wait_setup_exit(Duration::from_secs(10));
        let out = rig.setup().logs();
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{extra:?}: {status:?}\n{out}");
        assert_eq!(out.matches(expected).count(), 1, "{extra:?}: expected {expected:?} once:\n{out}");
        assert!(!rig.pid_file.exists(), "a pid file under systemd");
    }

    // The unit's namespace: no namespace, unshare or init of our own, the
    // warning about -unshare-arg (the rig always gives one), the veth into
    // the sleeper's namespace, vm-switch there with the lease.
    rig.start_setup_env(&env, &[]);
    let vm = wait_vm_switch(&rig);
    let setup_pid = rig.setup().pid();
    let children = children_of(setup_pid);
    assert_eq!(children, vm, "network-setup's only child is vm-switch\n{}", rig.logs());
    assert_eq!(rig.wait_lease(sleeper_pid).as_deref(), Some("192.168.127.2/24"), "{}", rig.logs());
    let out = rig.distro_exec(sleeper_pid, "ip", &["-4", "-o", "addr", "show", "dev", "veth-rd-ns"]);
    assert_eq!(first_inet(&out).as_deref(), Some("192.168.143.1/24"), "{}", rig.logs());
    assert_eq!(rig.veth_address("veth-rd-wsl").as_deref(), Some("192.168.143.2/24"), "{}", rig.logs());
    assert!(rig.wsl.exec("ping", &["-c", "1", "-W", "2", "192.168.143.1"]).status.success(), "{}", rig.logs());
    let log = rig.setup().logs();
    let warning: Vec<&str> = log.lines().filter(|l| l.contains("ignoring -unshare-arg")).collect();
    assert!(warning.len() == 1 && warning[0].contains(" WARN "), "{log}");
    assert!(log.contains(&format!("network-namespace.service's (main pid {sleeper_pid}")), "{log}");
    assert!(!rig.pid_file.exists(), "a pid file under systemd");
    assert_eq!(ns_inode(setup_pid, "pid"), ns_inode(vm[0], "pid"), "no pid namespace of our own");

    // Stopping: vm-switch and the veth go, the unit's process stays.
    let status = rig.setup().terminate(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{}", rig.logs());
    assert!(!rig.wsl_has_link("veth-rd-wsl"));
    let gone = rig.distro_exec(sleeper_pid, "ip", &["link", "show", "veth-rd-ns"]);
    assert!(!gone.status.success(), "veth-rd-ns is still in the unit's namespace");
    assert!(wait_until(Duration::from_secs(5), || vm_switch_pids(&rig).is_empty()), "vm-switch still runs");
    assert!(alive(sleeper_pid), "the unit's process was touched");
    drop(sleeper);
}

#[test]
fn without_privileges_it_says_so_at_once() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("nsetup-caps");
    let ns = Netns::new("rdw");
    let log = dir.join("network-setup.log");
    let (log_arg, vm_switch) = (log.display().to_string(), bin("vm-switch").display().to_string());
    let handshake = format!("unix://{}", dir.join("hs.sock").display());
    let pid_file = dir.join("wsl-init.pid").display().to_string();
    // Root without a single capability (uid 0 keeps its files: the log).
    let mut cmd = setup_command(&ns, "setpriv", &[]);
    cmd.args(["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]).arg(bin("network-setup")).args([
        "-vm-switch-path",
        &vm_switch,
        "-unshare-arg",
        "/bin/true",
        "-logfile",
        &log_arg,
        "--handshake-listen",
        &handshake,
        "--pid-file",
        &pid_file,
    ]);
    let started = Instant::now();
    let mut p = Proc::spawn(&dir, &mut cmd);
    let mut status = None;
    wait_until(Duration::from_secs(10), || {
        status = p.try_wait();
        status.is_some()
    });
    let took = started.elapsed();
    let out = p.logs();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{status:?}\n{out}");
    assert!(took < Duration::from_secs(3), "took {took:?} to refuse");
    for cap in ["CAP_SYS_ADMIN", "CAP_NET_ADMIN"] {
        assert_eq!(out.matches(cap).count(), 1, "stderr names {cap} once:\n{out}");
    }
    let logged = fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("missing privileges"), "the log says so too:\n{logged}");
    assert!(!socket_exists(&dir.join("hs.sock")), "it listened for the handshake");
}

#[test]
fn usage_errors_exit_2_before_touching_anything() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("nsetup-flags");
    let ns = Netns::new("rdw");
    let log = dir.join("ns.log");
    let log_arg = log.display().to_string();
    let pid_file = dir.join("wsl-init.pid");
    let pid_arg = pid_file.display().to_string();
    let vm_switch = bin("vm-switch").display().to_string();
    let base = ["-logfile", &log_arg, "--pid-file", &pid_arg];
    let full = ["-vm-switch-path", &vm_switch, "-unshare-arg", "/bin/true"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-unshare-arg", "/bin/true"], "missing required flag -vm-switch-path"),
        (vec!["-vm-switch-path", &vm_switch], "missing required flag -unshare-arg"),
        ([&full[..], &["-subnet", "garbage"]].concat(), r#"invalid value "garbage" for flag -subnet: "#),
        ([&full[..], &["-namespace-service", ""]].concat(), r#"invalid value "" for flag -namespace-service"#),
        (
            [&full[..], &["-dhcp-script", "/nonexistent"]].concat(),
            r#"invalid value "/nonexistent" for flag -dhcp-script"#,
        ),
        ([&full[..], &["-trace-packets", "true"]].concat(), r#"unexpected argument "true" after -trace-packets"#),
        ([&full[..], &["-bogus"]].concat(), "flag provided but not defined: -bogus"),
    ];
    for (args, expected) in cases {
        let out = setup_command(&ns, bin("network-setup"), &[])
            .args(base)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("network-setup: {e}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with(&format!("network-setup: {expected}")), "{args:?}: {err}");
        assert_eq!(err.matches(expected).count(), 1, "{args:?}: printed once: {err}");
        assert!(!log.exists() && !pid_file.exists(), "{args:?}: files were made before the flags were checked");
    }
    // The systemd unit name is checked in either mode (a bus that does not
    // exist, should the check let it through).
    let no_bus = format!("unix:path={}", dir.join("no-bus").display());
    let out =
        setup_command(&ns, bin("network-setup"), &[("SYSTEMD_EXEC_PID", "1"), ("DBUS_SYSTEM_BUS_ADDRESS", &no_bus)])
            .args(base)
            .args(["-vm-switch-path", &vm_switch, "-namespace-service", "no unit"])
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!log.exists());
}
