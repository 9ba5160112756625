//! network-setup: runs in the WSL VM's default network namespace. It pairs
//! with host-switch over the handshake, finds or builds the distro's own
//! network namespace (under OpenRC a new one with the init inside, in its
//! own pid and mount namespaces; under systemd the one of the
//! `-namespace-service` unit's main process), starts vm-switch there on the
//! host connection, links the two namespaces with a veth pair, and recovers
//! when host-switch restarts. Flags follow the current Rancher Desktop's Go
//! program (spec/COMPAT.md §1, §4, §5), plus the endpoints, pid file and
//! veth layout as flags, so the seed's (v1.2.7) layout stays reachable.
#![deny(unsafe_code)]

#[cfg(target_os = "linux")]
mod caps;
#[cfg(target_os = "linux")]
mod setup;
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod sys;
#[cfg(target_os = "linux")]
mod systemd;

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ipnet::Ipv4Net;
use rdnet_link::Endpoint;
use rdnet_link::handshake::SIGNATURE;

const PROGRAM: &str = "network-setup";

/// The veth layout of the current Rancher Desktop. The seed's was `veth-rd0`
/// 192.168.1.1/24 ↔ `veth-rd1` 192.168.1.2/24, whose route captured a
/// common home network (192.168.1.0/24) in WSL's default namespace.
pub const VETH_HOST_NAME: &str = "veth-rd-wsl";
pub const VETH_HOST_ADDRESS: &str = "192.168.143.2/24";
pub const VETH_NS_NAME: &str = "veth-rd-ns";
pub const VETH_NS_ADDRESS: &str = "192.168.143.1/24";
/// The systemd unit whose main process holds the distro's namespace.
pub const NAMESPACE_SERVICE: &str = "network-namespace.service";
/// Set by systemd (v248 and later) in every service's environment; Rancher
/// Desktop's Go program takes its presence as "running under systemd".
pub const SYSTEMD_ENV: &str = "SYSTEMD_EXEC_PID";

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
    /// Per-packet tracing in vm-switch (passed on as its -trace-packets).
    #[arg(long = "trace-packets", num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = rdnet_cli::go_bool)]
    pub trace_packets: bool,
    /// Tap interface vm-switch creates in the namespace.
    #[arg(long = "tap-interface", default_value = "eth0")]
    pub tap_interface: String,
    /// The virtual network (passed on to vm-switch; must match host-switch).
    #[arg(long, default_value = "192.168.127.0/24")]
    pub subnet: String,
    /// The virtual network's IPv6 /64 (passed on to vm-switch as
    /// -subnet6 when given; empty turns IPv6 off on the tap). Not given:
    /// vm-switch's default.
    #[arg(long)]
    pub subnet6: Option<String>,
    /// MAC address of the tap interface (passed on to vm-switch).
    #[arg(long = "tap-mac-address", default_value = "5a:94:ef:e4:0c:ee")]
    pub tap_mac_address: String,
    /// Script run on DHCP events, as udhcpc -s (passed on to vm-switch; empty:
    /// vm-switch's own configuration).
    #[arg(long = "dhcp-script", default_value = "")]
    pub dhcp_script: String,
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
    /// --fork --propagation slave` (required, except under systemd, where
    /// it is ignored).
    #[arg(long = "unshare-arg")]
    pub unshare_arg: Option<String>,
    /// Under systemd (SYSTEMD_EXEC_PID set): the unit whose main process
    /// holds the distro's network namespace.
    #[arg(long = "namespace-service", default_value = NAMESPACE_SERVICE)]
    pub namespace_service: String,
    /// Log file, opened for append (/dev/stdout: the inherited stdout).
    #[arg(long, default_value = "/var/log/network-setup.log")]
    pub logfile: PathBuf,
    /// Where host-switch does the handshake with us.
    #[arg(long = "handshake-listen", default_value = "vsock://:6669")]
    pub handshake_listen: Endpoint,
    /// The host's data endpoint, dialled after the handshake from this
    /// namespace and handed to vm-switch as fd 3.
    #[arg(long = "host-connect", default_value = "vsock://2:6656")]
    pub host_connect: Endpoint,
    /// The signature phrase written to host-switch during the handshake
    /// (the seed's: github.com/rancher-sandbox/rancher-desktop-networking).
    #[arg(long, default_value = SIGNATURE)]
    pub signature: String,
    /// Where unshare's PID is written (mode 0600); its child is the
    /// namespaced init. Not written under systemd.
    #[arg(long = "pid-file", default_value = "/run/wsl-init.pid")]
    pub pid_file: PathBuf,
    /// The veth end in this (the starting) namespace (the seed's: veth-rd0).
    #[arg(long = "veth-host-name", default_value = VETH_HOST_NAME)]
    pub veth_host_name: String,
    /// The address of -veth-host-name (the seed's: 192.168.1.1/24).
    #[arg(long = "veth-host-address", default_value = VETH_HOST_ADDRESS)]
    pub veth_host_address: Ipv4Net,
    /// The veth end in the distro's namespace (the seed's: veth-rd1).
    #[arg(long = "veth-ns-name", default_value = VETH_NS_NAME)]
    pub veth_ns_name: String,
    /// The address of -veth-ns-name (the seed's: 192.168.1.2/24).
    #[arg(long = "veth-ns-address", default_value = VETH_NS_ADDRESS)]
    pub veth_ns_address: Ipv4Net,
}

/// A flag that is missing or has a value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

/// Go's wording for a value that cannot be used.
fn invalid(flag: &str, value: impl AsRef<OsStr>, reason: impl std::fmt::Display) -> UsageError {
    UsageError(format!("invalid value {:?} for flag -{flag}: {reason}", value.as_ref()))
}

/// Where the distro's network namespace comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// A new namespace with `unshare … <init_command>` inside (OpenRC; the
    /// seed's only way).
    OpenRc { init_command: Vec<String> },
    /// The namespace of a systemd unit's main process; `-unshare-arg`, when
    /// given, is ignored (and logged as such).
    Systemd { unit: String, ignored_unshare_arg: Option<String> },
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub debug: bool,
    pub trace_packets: bool,
    pub tap_interface: String,
    pub subnet: String,
    pub subnet6: Option<String>,
    pub tap_mac_address: String,
    pub dhcp_script: String,
    pub vm_switch_path: PathBuf,
    pub vm_switch_logfile: Option<PathBuf>,
    pub vm_switch_resolv_conf: Option<PathBuf>,
    pub mode: Mode,
    pub handshake_listen: Endpoint,
    pub host_connect: Endpoint,
    pub signature: String,
    pub pid_file: PathBuf,
    pub veth_host: (String, Ipv4Net),
    pub veth_ns: (String, Ipv4Net),
}

/// Whether to run in systemd mode, from `SYSTEMD_EXEC_PID`'s value: set and
/// not empty, as Rancher Desktop's Go program decides.
pub fn systemd_mode(value: Option<&OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty())
}

impl Config {
    /// Checks every flag; `systemd` selects the mode (see [`systemd_mode`]).
    /// Reads file metadata only: nothing is created or opened for writing.
    pub fn from_opts(o: &Opts, systemd: bool) -> Result<Config, UsageError> {
        let vm_switch_path = match &o.vm_switch_path {
            Some(p) if !p.as_os_str().is_empty() => p.clone(),
            _ => {
                return Err(UsageError(
                    "missing required flag -vm-switch-path: the vm-switch binary to start inside the namespace".into(),
                ));
            }
        };
        if !vm_switch_path.is_file() {
            return Err(invalid("vm-switch-path", &vm_switch_path, "no such file"));
        }
        if !o.dhcp_script.is_empty() && !std::path::Path::new(&o.dhcp_script).is_file() {
            return Err(invalid("dhcp-script", &o.dhcp_script, "no such file"));
        }
        validate_unit_name(&o.namespace_service).map_err(|e| invalid("namespace-service", &o.namespace_service, e))?;
        let unshare_arg = o.unshare_arg.as_ref().filter(|a| !a.trim().is_empty());
        let mode = match (systemd, unshare_arg) {
            (true, arg) => Mode::Systemd { unit: o.namespace_service.clone(), ignored_unshare_arg: arg.cloned() },
            (false, Some(arg)) => Mode::OpenRc { init_command: init_command(arg) },
            (false, None) => {
                return Err(UsageError(format!(
                    "missing required flag -unshare-arg: the init command to run in the new namespaces \
                     (not needed under systemd, where {SYSTEMD_ENV} is set)"
                )));
            }
        };
        if rdnet_guest::parse_mac(&o.tap_mac_address).is_none() {
            return Err(invalid("tap-mac-address", &o.tap_mac_address, "not a MAC address"));
        }
        let subnet: Ipv4Net = o.subnet.parse().map_err(|e| invalid("subnet", &o.subnet, e))?;
        if subnet.prefix_len() > 29 {
            return Err(invalid("subnet", &o.subnet, "too small (at most /29)"));
        }
        if let Some(text) = o.subnet6.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            let prefix: ipnet::Ipv6Net = text.parse().map_err(|e| invalid("subnet6", text, e))?;
            if prefix.prefix_len() != 64 {
                return Err(invalid("subnet6", text, "must be a /64"));
            }
        }
        for (flag, name) in [
            ("tap-interface", &o.tap_interface),
            ("veth-host-name", &o.veth_host_name),
            ("veth-ns-name", &o.veth_ns_name),
        ] {
            if !valid_ifname(name) {
                return Err(invalid(flag, name, "not an interface name (1 to 15 bytes, no '/', ':' or spaces)"));
            }
        }
        if o.veth_ns_name == o.tap_interface {
            return Err(invalid("veth-ns-name", &o.veth_ns_name, "-tap-interface has that name"));
        }
        if o.veth_host_address.addr() == o.veth_ns_address.addr() {
            return Err(invalid(
                "veth-ns-address",
                o.veth_ns_address.to_string(),
                "the same address as -veth-host-address",
            ));
        }
        rdnet_link::handshake::validate_signature(&o.signature).map_err(|e| invalid("signature", &o.signature, e))?;
        if matches!(o.handshake_listen, Endpoint::Fd(_)) {
            return Err(invalid("handshake-listen", o.handshake_listen.to_string(), "cannot be fd://"));
        }
        if matches!(o.host_connect, Endpoint::Fd(_) | Endpoint::Vsock { cid: None, .. }) {
            return Err(invalid("host-connect", o.host_connect.to_string(), "needs an address to dial"));
        }
        Ok(Config {
            debug: o.debug,
            trace_packets: o.trace_packets,
            tap_interface: o.tap_interface.clone(),
            subnet: o.subnet.clone(),
            subnet6: o.subnet6.clone(),
            tap_mac_address: o.tap_mac_address.clone(),
            dhcp_script: o.dhcp_script.clone(),
            vm_switch_path,
            vm_switch_logfile: o.vm_switch_logfile.clone(),
            vm_switch_resolv_conf: o.vm_switch_resolv_conf.clone(),
            mode,
            handshake_listen: o.handshake_listen.clone(),
            host_connect: o.host_connect.clone(),
            signature: o.signature.clone(),
            pid_file: o.pid_file.clone(),
            veth_host: (o.veth_host_name.clone(), o.veth_host_address),
            veth_ns: (o.veth_ns_name.clone(), o.veth_ns_address),
        })
    }

    /// vm-switch's arguments, in the order Rancher Desktop's Go program
    /// gives them (`-dhcp-script` always, even empty), then ours.
    pub fn vm_switch_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "-tap-interface",
            &self.tap_interface,
            "-subnet",
            &self.subnet,
            "-tap-mac-address",
            &self.tap_mac_address,
            "-dhcp-script",
            &self.dhcp_script,
        ]
        .iter()
        .map(OsString::from)
        .collect();
        if let Some(log) = &self.vm_switch_logfile {
            args.extend(["-logfile".into(), log.into()]);
        }
        if self.debug {
            args.push("-debug".into());
        }
        if self.trace_packets {
            args.push("-trace-packets".into());
        }
        if let Some(path) = &self.vm_switch_resolv_conf {
            args.extend(["--resolv-conf".into(), path.into()]);
        }
        if let Some(prefix) = &self.subnet6 {
            // One argument, so an empty value stays a value.
            args.push(format!("-subnet6={prefix}").into());
        }
        args
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

/// A name systemd could have loaded: 1 to 255 bytes of `[A-Za-z0-9:_.\-@]`
/// with a type suffix (`network-namespace.service`). A bad name would only
/// come back from systemd as "no such unit" after the handshake.
fn validate_unit_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > 255 {
        return Err("longer than 255 bytes");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b":_.-@\\".contains(&b)) {
        return Err("not a systemd unit name (letters, digits and :_.-@\\ only)");
    }
    match name.rsplit_once('.') {
        Some((stem, suffix)) if !stem.is_empty() && !suffix.is_empty() => Ok(()),
        _ => Err("not a systemd unit name (needs a type suffix such as .service)"),
    }
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
    use rdnet_cli::{LogOptions, init_logging, runtime_error};

    let opts: Opts = rdnet_cli::parse_go_args();
    // The whole command line is checked before anything is opened.
    let cfg = match Config::from_opts(&opts, systemd_mode(std::env::var_os(SYSTEMD_ENV).as_deref())) {
        Ok(cfg) => cfg,
        Err(e) => return rdnet_cli::usage_error(PROGRAM, e),
    };
    // Keep none of the parent's descriptors besides stdio (vm-switch and the
    // init are started from here and would inherit them too).
    rdnet_cli::close_inherited_fds(&[]);
    init_logging(&LogOptions { logfile: Some(opts.logfile.clone()), debug: opts.debug });
    // Without these every step after the handshake would fail, possibly
    // minutes from now: say so at once.
    if let Err(e) = caps::check_own() {
        return runtime_error(PROGRAM, &e);
    }
    match setup::run(cfg) {
        Ok(setup::Outcome::Signal(name)) => {
            tracing::info!("{name}: stopped");
            ExitCode::SUCCESS
        }
        Ok(setup::Outcome::VmSwitchExited(status)) => {
            tracing::info!("vm-switch exited ({status}) while the host link was up: stopped");
            ExitCode::SUCCESS
        }
        Err(e) => runtime_error(PROGRAM, &e),
    }
}

#[cfg(not(target_os = "linux"))]
fn main() -> ExitCode {
    let _opts: Opts = rdnet_cli::parse_go_args();
    eprintln!("{PROGRAM}: only Linux (the WSL VM) is supported");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Opts, rdnet_cli::FlagError> {
        rdnet_cli::parse_go_args_from(std::iter::once("network-setup").chain(args.iter().copied()))
    }

    fn usage(args: &[&str], systemd: bool) -> String {
        Config::from_opts(&parse(args).unwrap(), systemd).unwrap_err().to_string()
    }

    /// Rancher Desktop's own command line (assets/scripts/wsl-init).
    const RD_ARGV: &[&str] = &[
        "--logfile",
        "/var/log/rd/network-setup.log",
        "--vm-switch-path",
        "/bin/sh",
        "--vm-switch-logfile",
        "/var/log/rd/vm-switch.log",
        "-debug",
        "-trace-packets",
        "--unshare-arg",
        "/usr/local/bin/wsl-init",
    ];

    #[test]
    fn defaults_follow_the_current_rancher_desktop() {
        let o = parse(&[]).unwrap();
        assert!(!o.debug && !o.trace_packets);
        assert_eq!(o.tap_interface, "eth0");
        assert_eq!(o.subnet, "192.168.127.0/24");
        assert_eq!(o.tap_mac_address, "5a:94:ef:e4:0c:ee");
        assert_eq!(o.dhcp_script, "");
        assert_eq!(o.namespace_service, "network-namespace.service");
        assert_eq!(o.logfile, PathBuf::from("/var/log/network-setup.log"));
        assert_eq!(o.handshake_listen.to_string(), "vsock://:6669");
        assert_eq!(o.host_connect.to_string(), "vsock://2:6656");
        assert_eq!(o.signature, "github.com/rancher-sandbox/rancher-desktop/src/go/networking");
        assert_eq!(o.pid_file, PathBuf::from("/run/wsl-init.pid"));
        assert_eq!(
            (o.veth_host_name.as_str(), o.veth_host_address.to_string().as_str()),
            ("veth-rd-wsl", "192.168.143.2/24")
        );
        assert_eq!(
            (o.veth_ns_name.as_str(), o.veth_ns_address.to_string().as_str()),
            ("veth-rd-ns", "192.168.143.1/24")
        );
        assert!(o.vm_switch_path.is_none() && o.unshare_arg.is_none() && o.vm_switch_logfile.is_none());
    }

    #[test]
    fn rancher_desktops_command_line_is_accepted() {
        let c = Config::from_opts(&parse(RD_ARGV).unwrap(), false).unwrap();
        assert!(c.debug && c.trace_packets);
        assert_eq!(c.mode, Mode::OpenRc { init_command: vec!["/usr/local/bin/wsl-init".into()] });
        assert_eq!(c.vm_switch_logfile, Some(PathBuf::from("/var/log/rd/vm-switch.log")));
        assert_eq!(c.veth_host.0, "veth-rd-wsl");
        assert_eq!(c.veth_ns.1.to_string(), "192.168.143.1/24");
    }

    #[test]
    fn vm_switch_gets_rancher_desktops_arguments() {
        let c = Config::from_opts(&parse(RD_ARGV).unwrap(), false).unwrap();
        let expected: Vec<OsString> = [
            "-tap-interface",
            "eth0",
            "-subnet",
            "192.168.127.0/24",
            "-tap-mac-address",
            "5a:94:ef:e4:0c:ee",
            "-dhcp-script",
            "",
            "-logfile",
            "/var/log/rd/vm-switch.log",
            "-debug",
            "-trace-packets",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(c.vm_switch_args(), expected);

        // No log file, no debug or tracing; a script and a resolv.conf path.
        let o = parse(&[
            "-vm-switch-path=/bin/sh",
            "-unshare-arg=/sbin/init",
            "-dhcp-script=/bin/true",
            "--vm-switch-resolv-conf=/tmp/r.conf",
            "-trace-packets=false",
            "-subnet6=",
        ])
        .unwrap();
        let args = Config::from_opts(&o, false).unwrap().vm_switch_args();
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "-tap-interface",
                "eth0",
                "-subnet",
                "192.168.127.0/24",
                "-tap-mac-address",
                "5a:94:ef:e4:0c:ee",
                "-dhcp-script",
                "/bin/true",
                "--resolv-conf",
                "/tmp/r.conf",
                "-subnet6="
            ]
        );
        for bad in ["fd00::/48", "nonsense"] {
            let o = parse(&["-vm-switch-path=/bin/sh", "-unshare-arg=/sbin/init", &format!("-subnet6={bad}")]).unwrap();
            assert!(Config::from_opts(&o, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn systemd_mode_comes_from_the_environment() {
        assert!(!systemd_mode(None));
        assert!(!systemd_mode(Some(OsStr::new(""))));
        assert!(systemd_mode(Some(OsStr::new("1234"))));

        // Under systemd -unshare-arg is not needed, and ignored when given.
        let o = parse(&["-vm-switch-path", "/bin/sh"]).unwrap();
        let c = Config::from_opts(&o, true).unwrap();
        assert_eq!(c.mode, Mode::Systemd { unit: "network-namespace.service".into(), ignored_unshare_arg: None });
        let c = Config::from_opts(&parse(RD_ARGV).unwrap(), true).unwrap();
        assert_eq!(
            c.mode,
            Mode::Systemd {
                unit: "network-namespace.service".into(),
                ignored_unshare_arg: Some("/usr/local/bin/wsl-init".into())
            }
        );
        let o = parse(&["-vm-switch-path", "/bin/sh", "-namespace-service", "rd-netns@1.service"]).unwrap();
        let c = Config::from_opts(&o, true).unwrap();
        assert_eq!(c.mode, Mode::Systemd { unit: "rd-netns@1.service".into(), ignored_unshare_arg: None });
    }

    #[test]
    fn required_flags_are_named() {
        let e = usage(&["-unshare-arg", "/sbin/init"], false);
        assert!(e.starts_with("missing required flag -vm-switch-path"), "{e}");
        let e = usage(&["-unshare-arg", "/sbin/init"], true);
        assert!(e.starts_with("missing required flag -vm-switch-path"), "{e}");
        let e = usage(&["-vm-switch-path", "/bin/sh"], false);
        assert!(e.starts_with("missing required flag -unshare-arg") && e.contains(SYSTEMD_ENV), "{e}");
        let e = usage(&["-vm-switch-path=/bin/sh", "-unshare-arg="], false);
        assert!(e.starts_with("missing required flag -unshare-arg"), "{e}");
    }

    #[test]
    fn seed_layout_through_flags() {
        let o = parse(&[
            "-vm-switch-path",
            "/bin/sh",
            "-unshare-arg",
            "/usr/local/bin/wsl-init",
            "--signature",
            rdnet_link::handshake::SEED_SIGNATURE,
            "--veth-host-name=veth-rd0",
            "--veth-host-address=192.168.1.1/24",
            "--veth-ns-name",
            "veth-rd1",
            "--veth-ns-address",
            "192.168.1.2/24",
        ])
        .unwrap();
        let c = Config::from_opts(&o, false).unwrap();
        assert_eq!(c.signature, rdnet_link::handshake::SEED_SIGNATURE);
        assert_eq!((c.veth_host.0.as_str(), c.veth_host.1.to_string().as_str()), ("veth-rd0", "192.168.1.1/24"));
        assert_eq!((c.veth_ns.0.as_str(), c.veth_ns.1.to_string().as_str()), ("veth-rd1", "192.168.1.2/24"));
    }

    #[test]
    fn bad_values_read_as_go_writes_them() {
        let base = ["-vm-switch-path", "/bin/sh", "-unshare-arg", "/sbin/init"];
        for (extra, expected) in [
            (&["-tap-mac-address", "nope"][..], r#"invalid value "nope" for flag -tap-mac-address: "#),
            (&["-subnet", "garbage"], r#"invalid value "garbage" for flag -subnet: "#),
            (&["-subnet", "10.0.0.0/30"], r#"invalid value "10.0.0.0/30" for flag -subnet: too small"#),
            (
                &["--veth-ns-name", "a-name-far-too-long"],
                r#"invalid value "a-name-far-too-long" for flag -veth-ns-name"#,
            ),
            (&["--veth-ns-name", "eth0"], r#"invalid value "eth0" for flag -veth-ns-name"#),
            (
                &["--veth-ns-address", "192.168.143.2/24"],
                r#"invalid value "192.168.143.2/24" for flag -veth-ns-address"#,
            ),
            (&["--signature="], r#"invalid value "" for flag -signature"#),
            (&["--host-connect", "vsock://:6656"], r#"invalid value "vsock://:6656" for flag -host-connect"#),
            (&["-namespace-service="], r#"invalid value "" for flag -namespace-service: must not be empty"#),
            (&["-namespace-service", "a b.service"], r#"invalid value "a b.service" for flag -namespace-service"#),
            (&["-namespace-service", "nosuffix"], r#"invalid value "nosuffix" for flag -namespace-service"#),
            (&["-dhcp-script", "/nonexistent/script"], r#"invalid value "/nonexistent/script" for flag -dhcp-script"#),
            (
                &["-vm-switch-path", "/nonexistent/vm-switch"],
                r#"invalid value "/nonexistent/vm-switch" for flag -vm-switch-path: no such file"#,
            ),
        ] {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            let e = usage(&args, false);
            assert!(e.starts_with(expected), "{extra:?}: {e}");
        }
        // Values clap checks itself come out in the same form.
        let Err(rdnet_cli::FlagError::Usage(e)) = parse(&["--veth-host-address", "300.1.1.1/24"]) else {
            panic!("a bad address parsed")
        };
        assert!(e.starts_with(r#"invalid value "300.1.1.1/24" for flag -veth-host-address"#), "{e}");
        assert!(parse(&["-trace-packets=maybe"]).is_err());
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
