//! network-setup: runs in the WSL VM's default network namespace. It pairs
//! with host-switch over the handshake, builds the distro's own network
//! namespace with its init inside (in its own pid and mount namespaces),
//! starts vm-switch there on the host connection, links the two namespaces
//! with a veth pair, and recovers when host-switch restarts. Flags follow the
//! Go original (spec/COMPAT.md §1, §4, §5), plus the endpoints, pid file and
//! veth names as flags.
#![deny(unsafe_code)]

#[cfg(target_os = "linux")]
mod setup;
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod sys;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ipnet::Ipv4Net;
use rdnet_link::Endpoint;
use rdnet_link::handshake::SIGNATURE;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "network-setup",
    args_override_self = true,
    about = "Sets up the WSL distro's network namespace and connects it to host-switch"
)]
pub struct Opts {
    /// Debug logging (also passed on to vm-switch).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = rdnet_cli::go_bool)]
    pub debug: bool,
    /// Tap interface vm-switch creates in the namespace.
    #[arg(long = "tap-interface", default_value = "eth0")]
    pub tap_interface: String,
    /// The virtual network (passed on to vm-switch; must match host-switch).
    #[arg(long, default_value = "192.168.127.0/24")]
    pub subnet: String,
    /// MAC address of the tap interface (passed on to vm-switch).
    #[arg(long = "tap-mac-address", default_value = "5a:94:ef:e4:0c:ee")]
    pub tap_mac_address: String,
    /// The vm-switch binary to start inside the namespace (required).
    #[arg(long = "vm-switch-path")]
    pub vm_switch_path: Option<PathBuf>,
    /// vm-switch's log file (passed on as its -logfile).
    #[arg(long = "vm-switch-logfile")]
    pub vm_switch_logfile: Option<PathBuf>,
    /// Where vm-switch's DHCP client writes the DNS settings (passed on as
    /// its -resolv-conf; by default vm-switch writes /etc/resolv.conf).
    #[arg(long = "vm-switch-resolv-conf")]
    pub vm_switch_resolv_conf: Option<PathBuf>,
    /// The namespaced init: one argument for `unshare --pid --mount-proc
    /// --fork --propagation slave` (required).
    #[arg(long = "unshare-arg")]
    pub unshare_arg: Option<String>,
    /// Log file, opened for append.
    #[arg(long, default_value = "/var/log/network-setup.log")]
    pub logfile: PathBuf,
    /// Where host-switch does the handshake with us.
    #[arg(long = "handshake-listen", default_value = "vsock://:6669")]
    pub handshake_listen: Endpoint,
    /// The host's data endpoint, dialled after the handshake from this
    /// namespace and handed to vm-switch as fd 3.
    #[arg(long = "host-connect", default_value = "vsock://2:6656")]
    pub host_connect: Endpoint,
    /// The signature phrase written to host-switch during the handshake.
    #[arg(long, default_value = SIGNATURE)]
    pub signature: String,
    /// Where the namespaced init's PID is written (mode 0600).
    #[arg(long = "pid-file", default_value = "/run/wsl-init.pid")]
    pub pid_file: PathBuf,
    /// The veth end in this (the starting) namespace.
    #[arg(long = "veth-host-name", default_value = "veth-rd0")]
    pub veth_host_name: String,
    /// Its address.
    #[arg(long = "veth-host-address", default_value = "192.168.1.1/24")]
    pub veth_host_address: Ipv4Net,
    /// The veth end in the new namespace.
    #[arg(long = "veth-ns-name", default_value = "veth-rd1")]
    pub veth_ns_name: String,
    /// Its address.
    #[arg(long = "veth-ns-address", default_value = "192.168.1.2/24")]
    pub veth_ns_address: Ipv4Net,
}

/// A flag that is missing or has a value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub debug: bool,
    pub tap_interface: String,
    pub subnet: String,
    pub tap_mac_address: String,
    pub vm_switch_path: PathBuf,
    pub vm_switch_logfile: Option<PathBuf>,
    pub vm_switch_resolv_conf: Option<PathBuf>,
    /// The init's command line after `unshare … --propagation slave`.
    pub init_command: Vec<String>,
    pub handshake_listen: Endpoint,
    pub host_connect: Endpoint,
    pub signature: String,
    pub pid_file: PathBuf,
    pub veth_host: (String, Ipv4Net),
    pub veth_ns: (String, Ipv4Net),
}

impl Config {
    pub fn from_opts(o: &Opts) -> Result<Config, UsageError> {
        let usage = |s: String| UsageError(s);
        let vm_switch_path = match &o.vm_switch_path {
            Some(p) if !p.as_os_str().is_empty() => p.clone(),
            _ => {
                return Err(usage(
                    "missing required flag -vm-switch-path: the vm-switch binary to start inside the namespace".into(),
                ));
            }
        };
        if !vm_switch_path.is_file() {
            return Err(usage(format!("-vm-switch-path {}: no such file", vm_switch_path.display())));
        }
        let unshare_arg = match &o.unshare_arg {
            Some(a) if !a.trim().is_empty() => a.clone(),
            _ => {
                return Err(usage(
                    "missing required flag -unshare-arg: the init command to run in the new namespaces".into(),
                ));
            }
        };
        if rdnet_guest::parse_mac(&o.tap_mac_address).is_none() {
            return Err(usage(format!("invalid -tap-mac-address {:?}", o.tap_mac_address)));
        }
        let subnet: Ipv4Net = o.subnet.parse().map_err(|e| usage(format!("invalid -subnet {:?}: {e}", o.subnet)))?;
        if subnet.prefix_len() > 29 {
            return Err(usage(format!("invalid -subnet {:?}: too small (at most /29)", o.subnet)));
        }
        for (flag, name) in [
            ("-tap-interface", &o.tap_interface),
            ("--veth-host-name", &o.veth_host_name),
            ("--veth-ns-name", &o.veth_ns_name),
        ] {
            if !valid_ifname(name) {
                return Err(usage(format!("invalid {flag} {name:?}: not an interface name")));
            }
        }
        if o.veth_ns_name == o.tap_interface {
            return Err(usage(format!("--veth-ns-name and -tap-interface are both {:?}", o.tap_interface)));
        }
        rdnet_link::handshake::validate_signature(&o.signature)
            .map_err(|e| usage(format!("invalid --signature: {e}")))?;
        if matches!(o.handshake_listen, Endpoint::Fd(_)) {
            return Err(usage("--handshake-listen cannot be fd://".into()));
        }
        if matches!(o.host_connect, Endpoint::Fd(_) | Endpoint::Vsock { cid: None, .. }) {
            return Err(usage(format!("--host-connect {}: needs an address to dial", o.host_connect)));
        }
        Ok(Config {
            debug: o.debug,
            tap_interface: o.tap_interface.clone(),
            subnet: o.subnet.clone(),
            tap_mac_address: o.tap_mac_address.clone(),
            vm_switch_path,
            vm_switch_logfile: o.vm_switch_logfile.clone(),
            vm_switch_resolv_conf: o.vm_switch_resolv_conf.clone(),
            init_command: init_command(&unshare_arg),
            handshake_listen: o.handshake_listen.clone(),
            host_connect: o.host_connect.clone(),
            signature: o.signature.clone(),
            pid_file: o.pid_file.clone(),
            veth_host: (o.veth_host_name.clone(), o.veth_host_address),
            veth_ns: (o.veth_ns_name.clone(), o.veth_ns_address),
        })
    }
}

fn valid_ifname(name: &str) -> bool {
    // IFNAMSIZ is 16 on Linux, including the terminating NUL.
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// The init's arguments for unshare. The Go original passes `-unshare-arg`
/// to unshare as one argument (Rancher Desktop gives a program path such as
/// `/usr/local/bin/wsl-init`), and so does this whenever the whole string
/// names a program (a path that exists, or a name found on `PATH`). A string
/// that names no program but contains whitespace, which the original could
/// only fail to execute, is split on whitespace instead (no quoting), so
/// `-unshare-arg "/bin/sleep 1000"` works too.
pub fn init_command(arg: &str) -> Vec<String> {
    if names_program(arg) || !arg.contains(char::is_whitespace) {
        vec![arg.to_string()]
    } else {
        arg.split_whitespace().map(str::to_string).collect()
    }
}

fn names_program(s: &str) -> bool {
    if s.contains('/') {
        return std::path::Path::new(s).is_file();
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(s).is_file()))
}

#[cfg(target_os = "linux")]
fn main() -> ExitCode {
    use rdnet_cli::{LogOptions, error_chain, init_logging};

    let opts: Opts = rdnet_cli::parse_go_args();
    // Keep none of the parent's descriptors besides stdio (vm-switch and the
    // init are started from here and would inherit them too).
    rdnet_cli::close_inherited_fds(&[]);
    init_logging(&LogOptions { logfile: Some(opts.logfile.clone()), debug: opts.debug });
    let cfg = match Config::from_opts(&opts) {
        Ok(cfg) => cfg,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("network-setup: {e}");
            return ExitCode::from(2);
        }
    };
    match setup::run(cfg) {
        Ok(setup::Outcome::Signal(name)) => {
            tracing::info!("{name}: stopped");
            ExitCode::SUCCESS
        }
        Ok(setup::Outcome::VmSwitchExited(status)) if status.success() => {
            tracing::info!("vm-switch exited ({status}) while the host link was up: stopped");
            ExitCode::SUCCESS
        }
        Ok(setup::Outcome::VmSwitchExited(status)) => {
            tracing::error!("vm-switch failed ({status}) while the host link was up: stopped");
            eprintln!("network-setup: vm-switch failed ({status})");
            ExitCode::FAILURE
        }
        Err(e) => {
            let msg = error_chain(&e);
            tracing::error!("{msg}");
            eprintln!("network-setup: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn main() -> ExitCode {
    let _opts: Opts = rdnet_cli::parse_go_args();
    eprintln!("network-setup: only Linux (the WSL VM) is supported");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Opts, rdnet_cli::FlagError> {
        rdnet_cli::parse_go_args_from(std::iter::once("network-setup").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_the_go_original() {
        let o = parse(&[]).unwrap();
        assert!(!o.debug);
        assert_eq!(o.tap_interface, "eth0");
        assert_eq!(o.subnet, "192.168.127.0/24");
        assert_eq!(o.tap_mac_address, "5a:94:ef:e4:0c:ee");
        assert_eq!(o.logfile, PathBuf::from("/var/log/network-setup.log"));
        assert_eq!(o.handshake_listen.to_string(), "vsock://:6669");
        assert_eq!(o.host_connect.to_string(), "vsock://2:6656");
        assert_eq!(o.signature, "github.com/rancher-sandbox/rancher-desktop/src/go/networking");
        assert_eq!(o.pid_file, PathBuf::from("/run/wsl-init.pid"));
        assert_eq!(
            (o.veth_host_name.as_str(), o.veth_host_address.to_string().as_str()),
            ("veth-rd0", "192.168.1.1/24")
        );
        assert_eq!((o.veth_ns_name.as_str(), o.veth_ns_address.to_string().as_str()), ("veth-rd1", "192.168.1.2/24"));
        assert!(o.vm_switch_path.is_none() && o.unshare_arg.is_none() && o.vm_switch_logfile.is_none());
    }

    #[test]
    fn required_flags_are_named() {
        let o = parse(&["-unshare-arg", "/sbin/init"]).unwrap();
        let e = Config::from_opts(&o).unwrap_err().to_string();
        assert!(e.contains("-vm-switch-path"), "{e}");
        let o = parse(&["-vm-switch-path", "/bin/sh"]).unwrap();
        let e = Config::from_opts(&o).unwrap_err().to_string();
        assert!(e.contains("-unshare-arg"), "{e}");
        let o = parse(&["-vm-switch-path=/bin/sh", "-unshare-arg="]).unwrap();
        assert!(Config::from_opts(&o).unwrap_err().to_string().contains("-unshare-arg"));
    }

    #[test]
    fn later_rancher_desktop_values() {
        let o = parse(&[
            "-vm-switch-path",
            "/bin/sh",
            "-unshare-arg",
            "/usr/local/bin/wsl-init",
            "--signature",
            "github.com/rancher-sandbox/rancher-desktop/src/go/networking",
            "--veth-host-name=veth-rd-wsl",
            "--veth-host-address=192.168.143.2/24",
            "--veth-ns-name",
            "veth-rd-ns",
            "--veth-ns-address",
            "192.168.143.1/24",
            "-debug",
        ])
        .unwrap();
        let c = Config::from_opts(&o).unwrap();
        assert_eq!(c.signature, rdnet_link::handshake::SIGNATURE);
        assert_eq!(c.veth_host.0, "veth-rd-wsl");
        assert_eq!(c.veth_ns.1.to_string(), "192.168.143.1/24");
        assert!(c.debug);
        assert_eq!(c.init_command, vec!["/usr/local/bin/wsl-init"]);
    }

    #[test]
    fn bad_values_are_refused() {
        let base = ["-vm-switch-path", "/bin/sh", "-unshare-arg", "/sbin/init"];
        for extra in [
            &["-tap-mac-address", "nope"][..],
            &["-subnet", "10.0.0.0/30"],
            &["--veth-ns-name", "a-name-far-too-long"],
            &["--veth-ns-name", "eth0"],
            &["--signature="],
            &["--host-connect", "vsock://:6656"],
        ] {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            assert!(Config::from_opts(&parse(&args).unwrap()).is_err(), "{extra:?}");
        }
        assert!(parse(&["--veth-host-address", "300.1.1.1/24"]).is_err());
        let o = parse(&["-vm-switch-path", "/nonexistent/vm-switch", "-unshare-arg", "/sbin/init"]).unwrap();
        assert!(Config::from_opts(&o).unwrap_err().to_string().contains("/nonexistent/vm-switch"));
    }

    #[test]
    fn unshare_arg_is_one_argument_when_it_names_a_program() {
        assert_eq!(init_command("/usr/local/bin/wsl-init"), vec!["/usr/local/bin/wsl-init"]);
        assert_eq!(init_command("sh"), vec!["sh"]);
        // Names no program and has spaces: split.
        assert_eq!(init_command("/bin/sleep 1000"), vec!["/bin/sleep", "1000"]);
        // A path with a space that exists stays whole.
        let dir = std::env::temp_dir().join(format!("rdnet ns-setup {}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let prog = dir.join("my init");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        let whole = prog.display().to_string();
        assert_eq!(init_command(&whole), vec![whole.clone()]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
