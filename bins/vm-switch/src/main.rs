//! vm-switch: the guest end of the virtual network. It creates a tap device
//! in its network namespace and pumps Ethernet frames between it and the
//! host link (u16-LE framed), and configures the tap with its own DHCP
//! client. Flags follow the Go original (spec/COMPAT.md §1, §5).
#![deny(unsafe_code)]

#[cfg(target_os = "linux")]
mod script;
#[cfg(target_os = "linux")]
mod signals;
#[cfg(target_os = "linux")]
mod switch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(name = "vm-switch", about = "Connects a tap device to the host's virtual network")]
pub struct Opts {
    /// Debug logging.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = rdnet_cli::go_bool)]
    pub debug: bool,
    /// Name of the tap device to create.
    #[arg(long = "tap-interface", default_value = "eth0")]
    pub tap_interface: String,
    /// MAC address of the tap device.
    #[arg(long = "tap-mac-address", default_value = "5a:94:ef:e4:0c:ee")]
    pub tap_mac_address: String,
    /// The virtual network (must match host-switch).
    #[arg(long, default_value = "192.168.127.0/24")]
    pub subnet: String,
    /// The virtual network's IPv6 prefix (a /64; must match host-switch):
    /// the tap takes its address, route and MTU from the gateway's router
    /// advertisements, and their DNS servers go to resolv.conf beside the
    /// IPv4 ones. Empty turns IPv6 off on the tap.
    #[arg(long, default_value = "fd5a:94ef:e40c::/64")]
    pub subnet6: String,
    /// Log file, opened for append.
    #[arg(long, default_value = "/var/log/vm-switch.log")]
    pub logfile: PathBuf,
    /// Inherited, already-connected host link (unused with -connect).
    #[arg(long = "vsock-fd", default_value_t = 3)]
    pub vsock_fd: i32,
    /// Dial the host link at this URL (unix://, tcp://, vsock://; gvproxy's
    /// vsock://2:1024/connect form too) and redial whenever it drops,
    /// instead of using the inherited descriptor.
    #[arg(long)]
    pub connect: Option<String>,
    /// Open each -connect connection with gvproxy's `POST /connect`, as
    /// gvisor-tap-vsock's guest forwarder does (gvproxy's -listen requires
    /// it; host-switch takes either); -connect-http=false sends frames at once.
    #[arg(long = "connect-http", num_args = 0..=1, require_equals = true, default_value = "true",
          default_missing_value = "true", value_parser = rdnet_cli::go_bool)]
    pub connect_http: bool,
    /// Where the DHCP client writes the DNS settings (through a symlink
    /// there, which stays; unused with -dhcp-script).
    #[arg(long = "resolv-conf", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Configure the tap with the built-in DHCP client (-dhcp=false leaves
    /// addressing to another program).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true",
          default_missing_value = "true", value_parser = rdnet_cli::go_bool)]
    pub dhcp: bool,
    /// MTU of the tap; the largest frame on the link is MTU + 14.
    #[arg(long, default_value_t = 1500)]
    pub mtu: u32,
    /// Log one decoded line per packet, both ways (SIGUSR1 toggles it at
    /// run time).
    #[arg(long = "trace-packets", num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = rdnet_cli::go_bool)]
    pub trace_packets: bool,
    /// A udhcpc-style script (as busybox udhcpc -s SCRIPT) that is told of
    /// each DHCP event and applies the lease itself; empty: vm-switch
    /// configures the interface and resolv.conf itself.
    // A String: clap's path parser refuses the empty value, which
    // Rancher Desktop passes (`-dhcp-script ""`).
    #[arg(long = "dhcp-script", default_value = "")]
    pub dhcp_script: String,
}

#[cfg(target_os = "linux")]
fn main() -> ExitCode {
    let opts: Opts = rdnet_cli::parse_go_args();
    // The whole command line is checked before anything is opened or
    // changed: a bad value is a usage error (exit 2) even when the host
    // link, the log file or the tap would fail too.
    let cfg = match switch::Config::from_opts(&opts) {
        Ok(cfg) => cfg,
        Err(e) => return rdnet_cli::usage_error("vm-switch", e),
    };
    // A daemon keeps only what it owns: the host link it was handed (unless
    // it dials one itself), not the rest of its parent's descriptors.
    let keep: &[i32] = if opts.connect.is_some() { &[] } else { &[opts.vsock_fd] };
    rdnet_cli::close_inherited_fds(keep);
    switch::main(&opts, cfg)
}

#[cfg(not(target_os = "linux"))]
fn main() -> ExitCode {
    let _opts: Opts = rdnet_cli::parse_go_args();
    eprintln!("vm-switch: only Linux guests are supported");
    ExitCode::FAILURE
}
