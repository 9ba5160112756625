//! Issue 5: network-setup and the handshake, end to end.
//!
//! The world (TESTING.md): host-switch runs in a "host" namespace that has
//! only `lo`, listening on a unix socket; network-setup runs in a second
//! namespace standing for WSL's default one, does the handshake with
//! host-switch over another unix socket (standing in for vsock port 6669),
//! dials host-switch's socket and builds the distro: a fresh network
//! namespace with the init in its own pid namespace, vm-switch on the host
//! link, and the veth pair. Each test has its own WSL namespace, so the
//! default veth names cannot collide between tests running in parallel.
//! Whatever network-setup leaves running in the distro's namespace (the init
//! by design, anything else on failure) is ended by PID by the rig's guard.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rdnet_e2e::{Netns, Proc, TempDir, World, bin, privileged, tcp_ready_in, wait_until};

const LEASE_WAIT: Duration = Duration::from_secs(30);
const HTTP_PORT: u16 = 18181;
const TOKEN: &str = "network-setup-e2e-token";
const LATER_SIGNATURE: &str = "github.com/rancher-sandbox/rancher-desktop/src/go/networking";
const SEED_SIGNATURE: &str = "github.com/rancher-sandbox/rancher-desktop-networking";

/// An init for `-unshare-arg`: PID 1 of its pid namespace, so it needs a
/// handler to end on SIGTERM.
const INIT_SCRIPT: &str = "#!/bin/sh\ntrap 'exit 0' TERM INT\nsleep 1000 &\nwait\n";

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

    /// network-setup in the WSL namespace with `extra` flags after the usual ones.
    fn start_setup(&mut self, extra: &[&str]) {
        let init = self.world.dir.join("init.sh");
        fs::write(&init, INIT_SCRIPT).unwrap();
        fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
        let vm_switch = bin("vm-switch").display().to_string();
        let host = format!("unix://{}", self.world.socket.display());
        let pid_file = self.pid_file.display().to_string();
        let init = init.display().to_string();
        let vm_log = self.world.dir.join("vm-switch.log").display().to_string();
        let resolv = self.world.dir.join("resolv.conf").display().to_string();
        let mut args = vec![
            "-debug",
            "-vm-switch-path",
            &vm_switch,
            "-vm-switch-logfile",
            &vm_log,
            "--vm-switch-resolv-conf",
            &resolv,
            "-unshare-arg",
            &init,
            "-logfile",
            "/dev/stdout",
            "--handshake-listen",
            &self.handshake,
            "--host-connect",
            &host,
            "--pid-file",
            &pid_file,
        ];
        args.extend_from_slice(extra);
        self.setup = Some(self.wsl.spawn(&self.world.dir, bin("network-setup"), &args));
    }

    fn setup(&mut self) -> &mut Proc {
        self.setup.as_mut().expect("network-setup started")
    }

    fn logs(&self) -> String {
        let mut s = self.world.logs();
        if let Some(p) = &self.setup {
            s += &format!("--- network-setup ---\n{}\n", p.logs());
        }
        let vm_log = fs::read_to_string(self.world.dir.join("vm-switch.log")).unwrap_or_default();
        s += &format!("--- vm-switch.log ---\n{vm_log}\n");
        s
    }

    /// The init's PID once network-setup has written it.
    fn wait_init_pid(&mut self) -> i32 {
        let mut pid = None;
        wait_until(Duration::from_secs(20), || {
            pid = read_pid(&self.pid_file);
            pid.is_some()
        });
        let pid = pid.unwrap_or_else(|| panic!("no pid file\n{}", self.logs()));
        self.distro_net = ns_inode(pid, "net");
        pid
    }

    /// Runs `program` inside the distro's network namespace.
    fn distro_exec(&self, init: i32, program: &str, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/proc/{init}/ns/net"))
            .arg(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("nsenter {program}: {e}"))
    }

    fn eth0_address(&self, init: i32) -> Option<String> {
        let out = self.distro_exec(init, "ip", &["-4", "-o", "addr", "show", "dev", "eth0"]);
        first_inet(&out)
    }

    fn curl_host(&self, init: i32) -> Option<String> {
        let url = format!("http://192.168.127.254:{HTTP_PORT}/token.txt");
        let out = self.distro_exec(init, "curl", &["-s", "-m", "3", &url]);
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
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // network-setup first: it stops vm-switch and removes the veth.
        drop(self.setup.take());
        drop(self.http.take());
        if self.distro_net.is_none() {
            self.distro_net = read_pid(&self.pid_file).and_then(|pid| ns_inode(pid, "net"));
        }
        // Then whatever is left in the distro's namespace (the init, unshare).
        if let Some(inode) = self.distro_net {
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

fn read_pid(path: &std::path::Path) -> Option<i32> {
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

fn first_inet(out: &Output) -> Option<String> {
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().skip_while(|w| *w != "inet").nth(1).map(str::to_string)
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

#[test]
fn handshake_distro_veth_nat_recovery_and_sigterm() {
    if !privileged() {
        return;
    }
    let mut rig = Rig::new(&[]);
    rig.start_http();
    rig.start_setup(&[]);

    // The handshake over unix sockets, then the pid file.
    let init = rig.wait_init_pid();
    let setup_pid = rig.setup().pid();
    let mode = fs::metadata(&rig.pid_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "pid file mode");
    assert!(alive(init), "init {init} is not running\n{}", rig.logs());
    for kind in ["net", "pid"] {
        let (ours, theirs) = (ns_inode(setup_pid, kind), ns_inode(init, kind));
        assert!(ours.is_some() && theirs.is_some() && ours != theirs, "{kind} namespace: {ours:?} vs {theirs:?}");
    }
    // network-setup stayed in the namespace it was started in.
    let wsl_net = fs::metadata(format!("/run/netns/{}", rig.wsl.name)).unwrap().ino();
    assert_eq!(ns_inode(setup_pid, "net"), Some(wsl_net));

    // eth0 in the distro gets its lease from host-switch's DHCP server.
    let mut addr = None;
    wait_until(LEASE_WAIT, || {
        addr = rig.eth0_address(init);
        addr.is_some()
    });
    assert_eq!(addr.as_deref(), Some("192.168.127.2/24"), "{}", rig.logs());
    // DNS settings go where --vm-switch-resolv-conf says.
    let resolv = rig.world.dir.join("resolv.conf");
    let dns = wait_until(Duration::from_secs(5), || {
        fs::read_to_string(&resolv).is_ok_and(|t| t.contains("nameserver 192.168.127.1"))
    });
    assert!(dns, "resolv.conf: {:?}", fs::read_to_string(&resolv));

    // The veth pair: addresses on both ends, ping both ways.
    let out = rig.wsl.exec("ip", &["-4", "-o", "addr", "show", "dev", "veth-rd0"]);
    assert_eq!(first_inet(&out).as_deref(), Some("192.168.1.1/24"), "{}", rig.logs());
    let out = rig.distro_exec(init, "ip", &["-4", "-o", "addr", "show", "dev", "veth-rd1"]);
    assert_eq!(first_inet(&out).as_deref(), Some("192.168.1.2/24"), "{}", rig.logs());
    assert!(rig.wsl.exec("ping", &["-c", "2", "-i", "0.2", "-W", "2", "192.168.1.2"]).status.success());
    assert!(rig.distro_exec(init, "ping", &["-c", "2", "-i", "0.2", "-W", "2", "192.168.1.1"]).status.success());

    // Through host-switch's NAT to the host namespace's loopback.
    let mut got = None;
    wait_until(Duration::from_secs(15), || {
        got = rig.curl_host(init);
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
        let gone = wait_until(Duration::from_secs(10), || rig.curl_host(init).is_none());
        assert!(gone, "curl still works without host-switch");
        let restarted = std::time::Instant::now();
        rig.restart_host_switch(&[]);
        let mut got = None;
        let back = wait_until(Duration::from_secs(45), || {
            got = rig.curl_host(init);
            got.is_some()
        });
        assert!(back, "no connectivity 45 s after host-switch restarted (SIG{kill})\n{}", rig.logs());
        eprintln!("connectivity back {:?} after host-switch's restart (SIG{kill})", restarted.elapsed());
        assert_eq!(got.as_deref(), Some(TOKEN));
        assert!(alive(init), "the init died during recovery\n{}", rig.logs());
        assert_eq!(read_pid(&rig.pid_file), Some(init), "the pid file changed");
        assert_eq!(rig.eth0_address(init).as_deref(), Some("192.168.127.2/24"), "same lease after recovery");
        assert!(rig.setup().try_wait().is_none(), "network-setup exited\n{}", rig.logs());
        assert_eq!(vm_switch_pids(&rig).len(), 1, "exactly one vm-switch\n{}", rig.logs());
    }

    // SIGTERM: vm-switch stops, the veth goes, exit status 0.
    let status = rig.setup().terminate(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "network-setup exit: {status:?}\n{}", rig.logs());
    assert!(!rig.wsl.exec("ip", &["link", "show", "veth-rd0"]).status.success(), "veth-rd0 is still there");
    assert!(wait_until(Duration::from_secs(5), || vm_switch_pids(&rig).is_empty()), "vm-switch still runs");
    assert!(alive(init), "the init is left running, as the Go original did");
}

#[test]
fn later_rancher_desktop_names_and_signature() {
    if !privileged() {
        return;
    }
    let mut rig = Rig::new(&["--signature", LATER_SIGNATURE]);
    // The init as a command with an argument, as well.
    rig.start_setup(&[
        "--signature",
        LATER_SIGNATURE,
        "--veth-host-name",
        "veth-rd-wsl",
        "--veth-host-address",
        "192.168.143.2/24",
        "--veth-ns-name",
        "veth-rd-ns",
        "--veth-ns-address",
        "192.168.143.1/24",
        "-unshare-arg",
        "/bin/sleep 1000",
    ]);
    let init = rig.wait_init_pid();
    let comm = fs::read_to_string(format!("/proc/{init}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "sleep", "the init is the command given");
    let mut addr = None;
    wait_until(LEASE_WAIT, || {
        addr = rig.eth0_address(init);
        addr.is_some()
    });
    assert_eq!(addr.as_deref(), Some("192.168.127.2/24"), "{}", rig.logs());
    let out = rig.wsl.exec("ip", &["-4", "-o", "addr", "show", "dev", "veth-rd-wsl"]);
    assert_eq!(first_inet(&out).as_deref(), Some("192.168.143.2/24"), "{}", rig.logs());
    let out = rig.distro_exec(init, "ip", &["-4", "-o", "addr", "show", "dev", "veth-rd-ns"]);
    assert_eq!(first_inet(&out).as_deref(), Some("192.168.143.1/24"), "{}", rig.logs());
    assert!(rig.wsl.exec("ping", &["-c", "1", "-W", "2", "192.168.143.1"]).status.success(), "{}", rig.logs());
    let status = rig.setup().terminate(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(!rig.wsl.exec("ip", &["link", "show", "veth-rd-wsl"]).status.success());
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
            && host_lines[0].contains(LATER_SIGNATURE)
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
            && setup_lines[0].contains(LATER_SIGNATURE)
            && setup_lines[0].contains(SEED_SIGNATURE),
        "{}",
        setup_lines[0]
    );
    assert!(!rig.pid_file.exists(), "the distro was set up without a handshake\n{}", rig.logs());
    assert!(rig.setup().try_wait().is_none(), "network-setup gave up\n{}", rig.logs());
    assert!(rig.world.host_switch().try_wait().is_none(), "host-switch gave up early\n{}", rig.logs());
    assert!(!rig.wsl.exec("ip", &["link", "show", "veth-rd0"]).status.success());
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
    let init = rig.wait_init_pid();
    let mut vm = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            vm = vm_switch_pids(&rig);
            !vm.is_empty()
        }),
        "no vm-switch\n{}",
        rig.logs()
    );
    assert!(wait_until(Duration::from_secs(10), || rig.wsl.exec("ip", &["link", "show", "veth-rd0"]).status.success()));
    // A crash while host-switch is still there: shut down, not recover.
    for pid in &vm {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    let mut status = None;
    wait_until(Duration::from_secs(10), || {
        status = rig.setup().try_wait();
        status.is_some()
    });
    assert!(status.is_some_and(|s| !s.success()), "network-setup should fail: {status:?}\n{}", rig.logs());
    assert!(!rig.wsl.exec("ip", &["link", "show", "veth-rd0"]).status.success(), "veth-rd0 is still there");
    assert!(alive(init));
}

#[test]
fn missing_required_flags_are_named() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("nsetup-flags");
    let log = dir.join("ns.log").display().to_string();
    let vm_switch = bin("vm-switch").display().to_string();
    for (args, flag) in [
        (vec!["-unshare-arg", "/bin/true", "-logfile", &log], "-vm-switch-path"),
        (vec!["-vm-switch-path", &vm_switch, "-logfile", &log], "-unshare-arg"),
    ] {
        let out = Command::new(bin("network-setup")).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(flag), "{args:?}: stderr does not name {flag}: {err}");
    }
}
