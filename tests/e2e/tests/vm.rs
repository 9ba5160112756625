//! Issue 17: the WSL layout inside a real Linux guest, over real AF_VSOCK.
//!
//! The world: a test VM (`rdnet_e2e::vm`, TESTING.md "A real VM") — a
//! Debian cloud kernel under QEMU's software emulation with a virtio-vsock
//! device backed by vhost-device-vsock, guest CID 3, no network device —
//! and host-switch on this side in a network namespace that has only `lo`,
//! reaching the guest through the VMM's hybrid-vsock socket
//! (`hybridvsock://UDS:PORT`). Inside the guest everything runs as Rancher
//! Desktop runs it under WSL: network-setup in the guest's default
//! namespace listens on vsock port 6669, and after host-switch's handshake
//! dials CID 2 port 6656 (arriving here on `UDS_6656`), builds the distro's
//! namespace with its init under unshare, and hands the connection to
//! vm-switch as fd 3; wsl-proxy runs in the default namespace. The tests
//! drive the guest through its command agent (another vsock port).
//!
//! What this shows that unix sockets could not: the handshake and the data
//! link over real vsock (with a VMM that passes no half-close and no peer
//! credentials on), where network-setup's socket lives (the default
//! namespace), what a dial from a new namespace does on this kernel, and
//! that the vsock peer vanishing — host-switch killed, vm-switch killed, the
//! whole VM killed — is noticed on the other side.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rdnet_e2e::vm::{self, Vm};
use rdnet_e2e::{Netns, Proc, TempDir, bin, privileged, socket_exists, tcp_ready_in, wait_until};

/// Rancher Desktop's layout (COMPAT.md §5, current defaults).
const VETH_WSL: &str = "veth-rd-wsl";
const VETH_WSL_ADDR: &str = "192.168.143.2/24";
const VETH_NS: &str = "veth-rd-ns";
const VETH_NS_ADDR: &str = "192.168.143.1/24";
const PID_FILE: &str = "/run/wsl-init.pid";
const SETUP_LOG: &str = "/var/log/network-setup.log";
/// A shell prelude for guest scripts: `D CMD…` runs CMD in the distro's
/// network namespace (entered through the PID in the pid file), `pid_of
/// NAME` prints the PIDs of processes called NAME (so they can be ended by
/// PID).
const PRELUDE: &str = r#"
D() { nsenter -t "$(cat /run/wsl-init.pid)" -n "$@"; }
pid_of() { for p in /proc/[0-9]*; do [ "$(cat "$p/comm" 2>/dev/null)" = "$1" ] && echo "${p#/proc/}"; done; return 0; }
"#;

// busybox's wget is used without -T: Debian's busybox-static 1.35 crashes
// (SIGSEGV) with it; the agent's time limit bounds every command instead.

/// Bounds on the guest's commands and waits (TCG is slow, and the other
/// core may be busy).
const CMD: Duration = Duration::from_secs(30);
const LINK_WAIT: Duration = Duration::from_secs(120);
const NOTICE_WAIT: Duration = Duration::from_secs(30);

/// The VM and host-switch's side. Fields drop in declaration order: the
/// processes, then the VM, then the host namespace, the files last.
struct Rig {
    host_switch: Option<Proc>,
    http: Option<Proc>,
    vm: Vm,
    host: Netns,
    dir: TempDir,
}

impl Rig {
    /// Boots the VM with this build's guest programs; `None` when the test
    /// must be skipped (outside CI only).
    fn boot() -> Option<Rig> {
        if !privileged() {
            return None;
        }
        let image = vm::image()?;
        let bins: Vec<PathBuf> = ["network-setup", "vm-switch", "wsl-proxy"].into_iter().map(bin).collect();
        let mut bins = bins;
        bins.push(PathBuf::from(env!("CARGO_BIN_EXE_rdnet-vm-agent")));
        let vm = Vm::boot(&image, &bins);
        Some(Rig { host_switch: None, http: None, vm, host: Netns::new("rdh"), dir: TempDir::new("vmhost") })
    }

    fn hybrid(&self, port: u32) -> String {
        format!("hybridvsock://{}:{port}", self.vm.uds().display())
    }

    /// host-switch in the host namespace, as on a hybrid-vsock host: the
    /// guest's data connections on `UDS_6656`, the handshake through
    /// `CONNECT 6669`. Returns once its data listener exists (the VMM
    /// needs it before the guest dials).
    fn start_host_switch(&mut self, extra: &[&str]) {
        let listen = self.hybrid(6656);
        let handshake = self.hybrid(6669);
        let api = format!("unix://{}", self.dir.join("api.sock").display());
        // DNS never leaves the host namespace (TESTING.md): nothing but
        // the local zones is asked, and the upstream is its own loopback.
        let mut args = vec![
            "--listen",
            &listen,
            "--handshake",
            &handshake,
            "--api",
            &api,
            "--dns-upstream",
            "127.0.0.1:53",
            "-debug",
            "--capture=",
        ];
        args.extend_from_slice(extra);
        let p = self.host.spawn(&self.dir, bin("host-switch"), &args);
        let data = PathBuf::from(format!("{}_6656", self.vm.uds().display()));
        assert!(
            wait_until(Duration::from_secs(10), || socket_exists(&data)),
            "host-switch did not listen on {}:\n{}",
            data.display(),
            p.logs()
        );
        self.host_switch = Some(p);
    }

    fn host_switch_logs(&self) -> String {
        self.host_switch.as_ref().map(Proc::logs).unwrap_or_default()
    }

    /// Everything printed so far, for failure messages.
    fn logs(&self) -> String {
        let guest = self
            .vm
            .try_run(Duration::from_secs(10), &["/bin/sh", "-c", "tail -n 60 /var/log/*.log /var/log/*.out 2>&1"])
            .map(|o| o.stdout)
            .unwrap_or_else(|e| format!("(cannot read the guest's logs: {e})"));
        format!("--- host-switch ---\n{}\n--- guest logs ---\n{guest}\n{}", self.host_switch_logs(), self.vm.logs())
    }

    fn sh_ok(&self, script: &str) -> String {
        let out = self.vm.sh(CMD, &format!("{PRELUDE}{script}"));
        assert!(
            out.success(),
            "in the VM: {script}\nstatus {}\nstdout: {}\nstderr: {}\n{}",
            out.status,
            out.stdout,
            out.stderr,
            self.logs()
        );
        out.stdout
    }

    /// True once `script` succeeds in the guest, polled for at most `limit`.
    fn wait_guest(&self, limit: Duration, script: &str) -> bool {
        let script = format!("{PRELUDE}{script}");
        wait_until(limit, || {
            let ok = self.vm.try_run(CMD, &["/bin/sh", "-c", &script]).is_ok_and(|o| o.success());
            if !ok {
                std::thread::sleep(Duration::from_millis(400));
            }
            ok
        })
    }

    /// network-setup as Rancher Desktop's wsl-init starts it (COMPAT.md §8),
    /// detached from the agent; returns its PID.
    fn start_network_setup(&self) -> String {
        let pid = self.sh_ok(&format!(
            "setsid /rdnet/bin/network-setup --logfile {SETUP_LOG} --vm-switch-path /rdnet/bin/vm-switch \
             --vm-switch-logfile /var/log/vm-switch.log -debug --unshare-arg /rdnet/distro-init \
             </dev/null >/var/log/network-setup.out 2>&1 & echo $!"
        ));
        pid.trim().to_string()
    }

    /// Waits until the distro's eth0 has its lease; returns the PID of the
    /// one vm-switch.
    fn wait_for_link(&self) -> String {
        assert!(
            self.wait_guest(LINK_WAIT, "D ip -4 -o addr show dev eth0 | grep -q 'inet 192.168.127.2/24'"),
            "the distro's eth0 got no lease\n{}",
            self.logs()
        );
        let pids = self.sh_ok("pid_of vm-switch");
        let pids: Vec<&str> = pids.split_whitespace().collect();
        assert_eq!(pids.len(), 1, "one vm-switch: {pids:?}\n{}", self.logs());
        pids[0].to_string()
    }

    /// A file of `len` random bytes served by python's http.server on the
    /// host namespace's 127.0.0.1:`port`; returns its sha256.
    fn serve_blob(&mut self, port: u16, len: usize) -> String {
        let www = self.dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        let blob = www.join("blob");
        let data: Vec<u8> = (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8).collect();
        std::fs::write(&blob, data).unwrap();
        let sum = rdnet_e2e::run("sha256sum", &[&blob]);
        let sum = String::from_utf8_lossy(&sum.stdout).split_whitespace().next().unwrap_or_default().to_string();
        let port_s = port.to_string();
        let www_s = www.display().to_string();
        let p = self.host.spawn(
            &self.dir,
            "python3",
            &["-m", "http.server", &port_s, "--bind", "127.0.0.1", "--directory", &www_s],
        );
        assert!(wait_until(Duration::from_secs(10), || tcp_ready_in(&self.host, port)), "http.server: {}", p.logs());
        self.http = Some(p);
        sum
    }

    /// curl in the host namespace.
    fn host_curl(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["-sS", "--max-time", "20"];
        all.extend_from_slice(args);
        self.host.exec("curl", &all)
    }
}

/// The stack as Rancher Desktop runs it, end to end, over real vsock.
#[test]
fn wsl_layout_in_a_real_vm() {
    let Some(mut rig) = Rig::boot() else { return };
    let token = format!("distro-page-{}", std::process::id());
    rig.start_host_switch(&["-port-forward", "127.0.0.1:18080=192.168.127.2:8080"]);
    let setup_pid = rig.start_network_setup();

    // The handshake over real vsock, the guest's dial of CID 2:6656, the
    // lease from host-switch's DHCP server.
    let vm_switch = rig.wait_for_link();
    let routes = rig.sh_ok("D ip route");
    assert!(routes.contains("default via 192.168.127.1"), "{routes}");
    let resolv = rig.sh_ok("cat /etc/resolv.conf");
    assert!(resolv.contains("nameserver 192.168.127.1"), "{resolv}");
    let log = rig.sh_ok(&format!("cat {SETUP_LOG}"));
    // The guest names its peer by vsock address: the host is CID 2.
    assert!(log.contains("handshake complete") && log.contains("vsock://2:"), "{log}");
    assert!(log.contains("connected to the host at vsock://2:6656"), "{log}");
    // host-switch's peer is the VMM's unix connection, named as such: its
    // credentials are those of the vsock backend, not of anything in the
    // guest, so nothing may rest on them.
    let hs = rig.host_switch_logs();
    let vmm = rig.vm.vmm_pid().expect("the vsock backend runs");
    assert!(hs.contains(&format!("{} (unix:pid={vmm},", rig.hybrid(6656))), "{hs}");

    // The veth pair and the init, as Rancher Desktop lays them out.
    let wsl_addr = rig.sh_ok(&format!("ip -4 -o addr show dev {VETH_WSL}"));
    assert!(wsl_addr.contains(VETH_WSL_ADDR), "{wsl_addr}");
    let ns_addr = rig.sh_ok(&format!("D ip -4 -o addr show dev {VETH_NS}"));
    assert!(ns_addr.contains(VETH_NS_ADDR), "{ns_addr}");
    let init_pid = rig.sh_ok(&format!("cat {PID_FILE}")).trim().to_string();
    rig.sh_ok(&format!("kill -0 {init_pid}"));

    // Where the sockets live: network-setup's vsock connection to 2:6656
    // and its handshake listener belong to the default namespace (AF_VSOCK
    // sockets are listed in the namespace that created them), though
    // vm-switch, in the distro's namespace, holds the connection.
    let default_ss = rig.sh_ok("/bin/ss --vsock -a -n -p");
    assert!(
        default_ss.lines().any(|l| l.contains("ESTAB") && l.contains(" 2:6656") && l.contains("vm-switch")),
        "{default_ss}"
    );
    assert!(default_ss.lines().any(|l| l.contains("LISTEN") && l.contains("*:6669")), "{default_ss}");
    let distro_ss = rig.sh_ok("D /bin/ss --vsock -a -n");
    assert!(!distro_ss.contains(":6656") && !distro_ss.contains(":6669"), "{distro_ss}");

    // Ping of the gateway; HTTP through the NAT to the host namespace's
    // loopback (byte-exact).
    rig.sh_ok("D ping -c 2 -W 5 192.168.127.1");
    let sum = rig.serve_blob(18090, 256 * 1024);
    let got = rig.sh_ok("D wget -q -O /tmp/blob http://192.168.127.254:18090/blob && sha256sum /tmp/blob");
    assert!(got.starts_with(&sum), "through the NAT: {got} != {sum}");

    // DNS: the gateway's local zones.
    for (name, want) in [
        ("host.rancher-desktop.internal", "192.168.127.254"),
        ("gateway.rancher-desktop.internal", "192.168.127.1"),
        ("host.docker.internal", "192.168.127.254"),
    ] {
        let out = rig.sh_ok(&format!("D nslookup {name} 192.168.127.1"));
        assert!(
            out.contains(&format!("Address: {want}")) || out.contains(&format!("Address 1: {want}")),
            "{name}: {out}"
        );
    }

    // A server in the distro, reached from this side through host-switch's
    // port forwards: the static one and one added through the API.
    rig.sh_ok(&format!(
        "mkdir -p /tmp/www && echo {token} > /tmp/www/index.html && \
         D setsid httpd -f -p 8080 -h /tmp/www </dev/null >/dev/null 2>&1 &"
    ));
    assert!(rig.wait_guest(CMD, "D wget -q -O - http://127.0.0.1:8080/index.html"), "httpd\n{}", rig.logs());
    let got = rig.host_curl(&["http://127.0.0.1:18080/index.html"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), token, "static forward: {got:?}\n{}", rig.logs());
    let api = rig.dir.join("api.sock").display().to_string();
    let expose = rig.host_curl(&[
        "--unix-socket",
        &api,
        "-w",
        "%{http_code}",
        "-d",
        r#"{"local":"127.0.0.1:18081","remote":"192.168.127.2:8080","protocol":"tcp"}"#,
        "http://api/services/forwarder/expose",
    ]);
    assert_eq!(String::from_utf8_lossy(&expose.stdout), "200", "{expose:?}");
    let got = rig.host_curl(&["http://127.0.0.1:18081/index.html"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), token, "API forward: {got:?}");

    // wsl-proxy in the default namespace: a port mapping from the guest
    // agent's socket makes it listen on 127.0.0.1:8080 and forward over the
    // veth pair to the distro's 192.168.143.1:8080.
    rig.sh_ok(
        "setsid /rdnet/bin/wsl-proxy -debug -logfile /var/log/wsl-proxy.log </dev/null \
         >/var/log/wsl-proxy.out 2>&1 &",
    );
    assert!(rig.wait_guest(CMD, "test -S /run/wsl-proxy.sock"), "wsl-proxy\n{}", rig.logs());
    rig.sh_ok(
        r#"/rdnet/bin/rdnet-vm-agent unix-send /run/wsl-proxy.sock '{"remove":false,"ports":{"8080/tcp":[{"HostIp":"127.0.0.1","HostPort":"8080"}]},"connectAddrs":null}'"#,
    );
    assert!(
        rig.wait_guest(CMD, &format!("wget -q -O - http://127.0.0.1:8080/index.html | grep -qx {token}")),
        "wsl-proxy did not forward\n{}",
        rig.logs()
    );

    // host-switch killed: the VMM resets the guest's vsock connection,
    // vm-switch ends, and network-setup goes back to the handshake; a new
    // host-switch pairs with it again and the distro carries on — same
    // init, same namespace and veth, a new vm-switch, no reboot.
    if let Some(mut old) = rig.host_switch.take() {
        let _ = std::process::Command::new("kill").args(["-KILL", &old.pid().to_string()]).status();
        let _ = old.child.wait();
    }
    assert!(
        rig.wait_guest(NOTICE_WAIT, &format!("grep -q 'the host link is gone' {SETUP_LOG} && ! kill -0 {vm_switch}")),
        "the guest did not notice host-switch's end\n{}",
        rig.logs()
    );
    rig.sh_ok(&format!("kill -0 {setup_pid} && kill -0 {init_pid} && ip link show {VETH_WSL} >/dev/null"));
    rig.start_host_switch(&["-port-forward", "127.0.0.1:18080=192.168.127.2:8080"]);
    let vm_switch2 = rig.wait_for_link();
    assert_ne!(vm_switch2, vm_switch, "a new vm-switch");
    assert_eq!(rig.sh_ok(&format!("cat {PID_FILE}")).trim(), init_pid, "the same distro init");
    let got = rig.sh_ok("D wget -q -O /tmp/blob http://192.168.127.254:18090/blob && sha256sum /tmp/blob");
    assert!(got.starts_with(&sum), "through the NAT after the restart: {got}");
    let got = rig.host_curl(&["http://127.0.0.1:18080/index.html"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), token, "static forward after the restart: {got:?}");

    // vm-switch killed while the host link is up: network-setup stops
    // (README, setup.rs): it removes the veth and leaves the init — and the
    // distro's namespace — running. Its end closes the last guest end of
    // the vsock connection, and host-switch notices.
    rig.sh_ok(&format!("kill -KILL {vm_switch2}"));
    assert!(
        rig.wait_guest(NOTICE_WAIT, &format!("! kill -0 {setup_pid} 2>/dev/null")),
        "network-setup kept running after vm-switch was killed\n{}",
        rig.logs()
    );
    let log = rig.sh_ok(&format!("cat {SETUP_LOG}"));
    assert!(log.contains("vm-switch failed") && log.contains("while the host link was up"), "{log}");
    rig.sh_ok(&format!("! ip link show {VETH_WSL} 2>/dev/null"));
    rig.sh_ok(&format!("kill -0 {init_pid} && D ip link show lo >/dev/null"));
    assert!(
        wait_until(NOTICE_WAIT, || rig.host_switch_logs().contains("the data connection is gone")),
        "host-switch did not notice the guest's end of the link\n{}",
        rig.logs()
    );
    assert!(rig.host_switch.as_mut().is_some_and(|p| p.try_wait().is_none()), "host-switch keeps running");
}

/// The kernel's AF_VSOCK facts this layout rests on, and the guest
/// vanishing under a live link.
#[test]
fn vsock_namespaces_and_a_vanishing_guest() {
    let Some(mut rig) = Rig::boot() else { return };

    // A host listener for guest connections to CID 2 port 6999, counting them.
    let path = PathBuf::from(format!("{}_6999", rig.vm.uds().display()));
    let listener = UnixListener::bind(&path).expect("bind the host listener");
    let accepted = Arc::new(AtomicU32::new(0));
    {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if conn.is_ok() {
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }
    // From the guest's default namespace, a dial of the host works.
    let out = rig.vm.sh(CMD, "/rdnet/bin/rdnet-vm-agent dial 2 6999");
    assert!(out.success(), "{out:?}");
    assert!(wait_until(Duration::from_secs(10), || accepted.load(Ordering::SeqCst) == 1), "the host saw the dial");
    // From a new network namespace, the same dial also reaches the host on
    // this kernel (Debian's 6.1 virtio transport): AF_VSOCK is not
    // network-namespaced there, only its sockets are listed per namespace.
    // network-setup still dials from the default namespace, as under WSL
    // (whose Hyper-V transport this VM cannot show); the other test checks
    // where its socket lives.
    let out = rig.vm.sh(CMD, "unshare -n /rdnet/bin/rdnet-vm-agent dial 2 6999");
    assert!(out.success(), "a dial from a new network namespace on this kernel: {out:?}");
    assert!(wait_until(Duration::from_secs(10), || accepted.load(Ordering::SeqCst) == 2), "the host saw the dial");
    // A half-close from the guest does not reach this side through this
    // VMM (vhost-device-vsock 0.3.0 passes only the close on), while data
    // still flows back to the guest after it. The handshake and the link
    // work over this transport (the other test), so neither relies on a
    // half-close arriving.
    let path_hc = PathBuf::from(format!("{}_6997", rig.vm.uds().display()));
    let listener_hc = UnixListener::bind(&path_hc).expect("bind the host listener");
    let half_close = std::thread::spawn(move || -> std::io::Result<(Vec<u8>, &'static str, bool)> {
        use std::io::{Read, Write};
        let (mut c, _) = listener_hc.accept()?;
        c.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut got = [0u8; 4];
        c.read_exact(&mut got)?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut b = [0u8; 16];
        let after = match c.read(&mut b) {
            Ok(0) => "eof",
            Ok(_) => "more data",
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => "nothing",
            Err(_) => "error",
        };
        c.write_all(b"pong")?;
        // The guest closes once it has the answer: that end does arrive.
        c.set_read_timeout(Some(Duration::from_secs(20)))?;
        let closed = matches!(c.read(&mut b), Ok(0));
        Ok((got.to_vec(), after, closed))
    });
    let out = rig.vm.sh(CMD, "/rdnet/bin/rdnet-vm-agent dial 2 6997 ping");
    assert!(out.success() && out.stdout.contains("answer: pong"), "{out:?}");
    let (got, after, closed) = half_close.join().expect("listener thread").expect("half-close exchange");
    assert_eq!(got, b"ping");
    assert_eq!(after, "nothing", "the guest's shutdown(SHUT_WR) seen through vhost-device-vsock 0.3.0");
    assert!(closed, "the guest's close arrives");
    let _ = std::fs::remove_file(&path_hc);

    // A dial of a host port nobody listens on fails (vhost-device-vsock
    // 0.3.0 lets it time out rather than refusing it) and reaches no one.
    let out = rig.vm.sh(CMD, "/rdnet/bin/rdnet-vm-agent dial 2 6998");
    assert!(!out.success(), "{out:?}");

    // The stack up, then the whole guest vanishes: host-switch hears of it
    // from the VMM, drops the link, and goes back to looking for the guest.
    rig.start_host_switch(&[]);
    rig.start_network_setup();
    rig.wait_for_link();
    rig.vm.kill();
    assert!(
        wait_until(NOTICE_WAIT, || rig.host_switch_logs().contains("the data connection is gone")),
        "host-switch did not notice the guest vanish\n{}",
        rig.host_switch_logs()
    );
    assert!(rig.host_switch.as_mut().is_some_and(|p| p.try_wait().is_none()), "host-switch keeps running");
    let _ = std::fs::remove_file(&path);
}
