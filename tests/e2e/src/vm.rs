//! The test VM (TESTING.md, "A real VM"): a Debian cloud kernel under QEMU's
//! software emulation with a real virtio-vsock device, for the tests that
//! need real AF_VSOCK (`tests/vm.rs`).
//!
//! How this works. `scripts/vm-image paths` builds (or finds in its cache)
//! the kernel and a base initramfs, and names QEMU and vhost-device-vsock.
//! [`Vm::boot`] appends a second cpio archive holding this build's binaries
//! under `/rdnet/bin` (stripped, so the guest's RAM holds no debug info),
//! starts vhost-device-vsock (guest CID 3; its host side is the unix socket
//! [`Vm::uds`]) and QEMU with that device and no network device at all,
//! both inside a network namespace of their own that has only `lo`. The
//! guest's console goes to a file ([`Vm::console`]). The guest's busybox
//! init keeps `rdnet-vm-agent serve 7070` running; [`Vm::run`] reaches it
//! through the VMM's hybrid-vsock socket (`CONNECT 7070`) and runs one
//! command per connection, with a time limit enforced in the guest and a
//! socket timeout here. Dropping the [`Vm`] ends QEMU and vhost-device-vsock
//! by PID and removes their namespace and files.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{Netns, Proc, TempDir, socket_exists, wait_until};

/// The vsock port the guest's command agent listens on (`/etc/inittab` in
/// `scripts/vm-image`).
pub const AGENT_PORT: u32 = 7070;
/// The guest's vsock CID (vhost-device-vsock's `guest-cid`).
pub const GUEST_CID: u32 = 3;
/// How long a boot may take until the agent answers: a few seconds under
/// TCG on an idle machine, more with the other core busy.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Most output the agent sends per stream (it keeps 4 MiB).
const MAX_ANSWER: usize = 4 << 20;

/// Where the kernel, the base initramfs and the two programs are.
#[derive(Debug, Clone)]
pub struct VmImage {
    pub qemu: PathBuf,
    pub vhost: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The test VM's image, built once per test process. `None` (with one line
/// printed) when QEMU or vhost-device-vsock is missing outside CI; in CI
/// (`CI=true`) that, and any failure to build the image, fails the test.
pub fn image() -> Option<VmImage> {
    static IMAGE: OnceLock<Result<VmImage, (bool, String)>> = OnceLock::new();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    match IMAGE.get_or_init(find_image) {
        Ok(i) => Some(i.clone()),
        Err((true, why)) if !ci => {
            eprintln!("skipping VM test: {why}");
            None
        }
        Err((_, why)) => panic!("the test VM cannot run: {why}"),
    }
}

/// Runs `scripts/vm-image paths`. The error's flag says whether a missing
/// tool (exit 3: skippable outside CI) is to blame.
fn find_image() -> Result<VmImage, (bool, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/vm-image");
    let out = Command::new(&script)
        .arg("paths")
        .output()
        .map_err(|e| (false, format!("cannot run {}: {e}", script.display())))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        let missing = out.status.code() == Some(3);
        return Err((missing, format!("scripts/vm-image paths failed ({}): {stderr}", out.status)));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(PathBuf::from)
            .ok_or_else(|| (false, format!("scripts/vm-image paths printed no {key}: {text}")))
    };
    Ok(VmImage { qemu: get("QEMU")?, vhost: get("VHOST")?, kernel: get("KERNEL")?, initrd: get("INITRD")? })
}

/// What a command in the guest did.
#[derive(Debug)]
pub struct VmOutput {
    /// Exit status; 128 + N for signal N, 124 when the time limit ended it.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl VmOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// A running test VM; everything it started is ended on drop.
// Fields drop in declaration order: QEMU before its vsock backend, both
// before their namespace, the files last.
pub struct Vm {
    qemu: Option<Proc>,
    vhost: Option<Proc>,
    _ns: Netns,
    uds: PathBuf,
    console: PathBuf,
    pub dir: TempDir,
}

impl Vm {
    /// Boots the image with `bins` (paths of programs, installed as
    /// `/rdnet/bin/NAME`) and waits until the guest's agent answers.
    pub fn boot(image: &VmImage, bins: &[PathBuf]) -> Vm {
        let dir = TempDir::new("vm");
        let initrd = dir.join("initrd.cpio");
        let mut archive = fs::read(&image.initrd).expect("read the base initramfs");
        // The kernel wants each archive to start at a multiple of 4 bytes.
        pad4(&mut archive);
        archive.extend(overlay(&dir, bins));
        fs::write(&initrd, archive).expect("write the initramfs");
        let ns = Netns::new("rdv");
        let vhost_sock = dir.join("vhost.sock");
        let uds = dir.join("vm.vsock");
        let console = dir.join("console.log");
        let backend = format!("guest-cid={GUEST_CID},socket={},uds-path={}", vhost_sock.display(), uds.display());
        let vhost = ns.spawn(&dir, &image.vhost, &["--vm", &backend]);
        assert!(
            wait_until(Duration::from_secs(10), || socket_exists(&vhost_sock)),
            "vhost-device-vsock did not listen:\n{}",
            vhost.logs()
        );
        let append = "console=ttyS0 panic=-1 loglevel=4";
        let qemu_args: Vec<String> = [
            // No network device, no display, no defaults: the only way in or
            // out of the guest is the vsock device (and the console file).
            "-nodefaults",
            "-nic",
            "none",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            // /dev/kvm is PVM on these machines and boots no stock kernel.
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "512M",
            // vhost-user needs the guest's memory shared with the backend.
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
            "-chardev",
            &format!("socket,id=vsock0,path={}", vhost_sock.display()),
            "-device",
            "vhost-user-vsock-pci,chardev=vsock0",
            "-kernel",
            &image.kernel.display().to_string(),
            "-initrd",
            &initrd.display().to_string(),
            "-append",
            append,
            "-serial",
            &format!("file:{}", console.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let qemu = ns.spawn(&dir, &image.qemu, &qemu_args);
        let mut vm = Vm { qemu: Some(qemu), vhost: Some(vhost), _ns: ns, uds, console, dir };
        let started = Instant::now();
        let mut last = String::new();
        let up = wait_until(BOOT_TIMEOUT, || {
            if vm.qemu.as_mut().is_some_and(|q| q.try_wait().is_some()) {
                return true;
            }
            match vm.try_run(Duration::from_secs(5), &["/bin/true"]) {
                Ok(o) if o.success() => true,
                Ok(o) => {
                    last = format!("{o:?}");
                    false
                }
                Err(e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(200));
                    false
                }
            }
        });
        let exited = vm.qemu.as_mut().and_then(|q| q.try_wait());
        assert!(
            up && exited.is_none(),
            "the VM did not come up within {BOOT_TIMEOUT:?} (QEMU exit: {exited:?}; last: {last})\n{}",
            vm.logs()
        );
        eprintln!("VM up in {:.1} s", started.elapsed().as_secs_f64());
        vm
    }

    /// The VMM's hybrid-vsock socket: `CONNECT P` reaches guest port P, and
    /// the guest's connections to CID 2 port P arrive on `uds_P`.
    pub fn uds(&self) -> &Path {
        &self.uds
    }

    /// What the guest printed on its console so far.
    pub fn console(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// The console and the VMM's own output, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = format!("--- VM console ---\n{}\n", self.console());
        if let Some(p) = &self.qemu {
            s += &format!("--- qemu ---\n{}\n", p.logs());
        }
        if let Some(p) = &self.vhost {
            s += &format!("--- vhost-device-vsock ---\n{}\n", p.logs());
        }
        s
    }

    /// The PID of the vsock backend (vhost-device-vsock): the process at
    /// the other end of every unix connection to [`Vm::uds`].
    pub fn vmm_pid(&self) -> Option<i32> {
        self.vhost.as_ref().map(Proc::pid)
    }

    /// Ends QEMU now (SIGKILL): the guest and all its connections vanish.
    pub fn kill(&mut self) {
        if let Some(q) = self.qemu.as_mut() {
            let _ = Command::new("kill").args(["-KILL", &q.pid().to_string()]).status();
            let _ = q.child.wait();
        }
    }

    /// Runs `argv` in the guest for at most `limit`.
    pub fn run(&self, limit: Duration, argv: &[&str]) -> VmOutput {
        self.try_run(limit, argv).unwrap_or_else(|e| panic!("running {argv:?} in the VM: {e}\n{}", self.logs()))
    }

    /// Runs a shell script in the guest for at most `limit`.
    pub fn sh(&self, limit: Duration, script: &str) -> VmOutput {
        self.run(limit, &["/bin/sh", "-c", script])
    }

    /// Runs a shell script that must succeed; returns its stdout.
    pub fn sh_ok(&self, limit: Duration, script: &str) -> String {
        let out = self.sh(limit, script);
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

    /// One request to the agent. The socket's own timeout backs the guest's
    /// time limit, so a dead guest cannot hang a test.
    pub fn try_run(&self, limit: Duration, argv: &[&str]) -> Result<VmOutput, String> {
        let mut s = UnixStream::connect(&self.uds).map_err(|e| format!("connect {}: {e}", self.uds.display()))?;
        let io_limit = limit + Duration::from_secs(15);
        s.set_read_timeout(Some(io_limit)).map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(io_limit)).map_err(|e| e.to_string())?;
        s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes()).map_err(|e| format!("CONNECT: {e}"))?;
        // Byte by byte up to the newline: the answer follows it.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.last() != Some(&b'\n') {
            match s.read(&mut b) {
                Ok(0) => return Err(format!("the VMM refused CONNECT {AGENT_PORT} (answer {line:?})")),
                Ok(_) => line.push(b[0]),
                Err(e) => return Err(format!("waiting for the VMM's answer: {e}")),
            }
            if line.len() > 64 {
                return Err(format!("the VMM's answer is too long: {line:?}"));
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(format!("the VMM answered {:?}", String::from_utf8_lossy(&line)));
        }
        let mut body = limit.as_millis().to_string().into_bytes();
        for a in argv {
            body.push(0);
            body.extend_from_slice(a.as_bytes());
        }
        let mut req = (body.len() as u32).to_le_bytes().to_vec();
        req.extend(body);
        s.write_all(&req).map_err(|e| format!("sending the request: {e}"))?;
        let mut head = [0u8; 4];
        s.read_exact(&mut head).map_err(|e| format!("reading the status: {e}"))?;
        let status = i32::from_le_bytes(head);
        let mut parts = Vec::new();
        for _ in 0..2 {
            s.read_exact(&mut head).map_err(|e| format!("reading the answer: {e}"))?;
            let len = u32::from_le_bytes(head) as usize;
            if len > MAX_ANSWER {
                return Err(format!("the agent announced {len} bytes of output (at most {MAX_ANSWER})"));
            }
            let mut part = vec![0u8; len];
            s.read_exact(&mut part).map_err(|e| format!("reading the answer: {e}"))?;
            parts.push(String::from_utf8_lossy(&part).into_owned());
        }
        let stderr = parts.pop().unwrap_or_default();
        let stdout = parts.pop().unwrap_or_default();
        Ok(VmOutput { status, stdout, stderr })
    }
}

/// A cpio archive ("newc") with each of `bins`, stripped, as
/// `/rdnet/bin/NAME` (mode 0755); the kernel unpacks it over the base image.
fn overlay(dir: &TempDir, bins: &[PathBuf]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 0x5000u32;
    let mut entry = |out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        ino += 1;
        let namesize = name.len() + 1;
        out.extend_from_slice(
            format!(
                "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
                0, // uid
                0, // gid
                1, // nlink
                0, // mtime
                data.len(),
                0, // devmajor
                0, // devminor
                0, // rdevmajor
                0, // rdevminor
                0, // check
            )
            .as_bytes(),
        );
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(out);
        out.extend_from_slice(data);
        pad4(out);
    };
    entry(&mut out, "rdnet", 0o040755, &[]);
    entry(&mut out, "rdnet/bin", 0o040755, &[]);
    for bin in bins {
        let name = bin.file_name().and_then(|n| n.to_str()).expect("binary name");
        let stripped = dir.join(format!("{name}.stripped"));
        let ok = Command::new("strip").arg("-o").arg(&stripped).arg(bin).status().is_ok_and(|s| s.success());
        // Unstripped works too, only bigger (and slower to unpack).
        let data = fs::read(if ok { &stripped } else { bin }).unwrap_or_else(|e| panic!("read {}: {e}", bin.display()));
        entry(&mut out, &format!("rdnet/bin/{name}"), 0o100755, &data);
    }
    entry(&mut out, "TRAILER!!!", 0, &[]);
    out
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}
