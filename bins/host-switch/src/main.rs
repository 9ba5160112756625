//! host-switch: the host side of the virtual network (gvproxy-compatible).
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;

use clap::Parser;
use ipnet::Ipv4Net;
use rdnet_cli::{LogOptions, go_bool, init_logging, out_of_range, parse_go_args, runtime_error, usage_error};
#[cfg(windows)]
use rdnet_link::discovery::{AbortOnDrop, DiscoveryError, Server, discover_and_serve};
use rdnet_link::handshake::{DataLinks, HOST_SIGNATURES, HostTiming, host_handshake_loop, validate_signature};
use rdnet_link::{Endpoint, Framing, Listener, listen};
use rdnet_vnet::config::{ConfigError, MAX_MTU, MIN_MTU};
use rdnet_vnet::forward::StaticForward;
use rdnet_vnet::{Engine, EngineConfig, NetConfig, Network};

/// Virtual switch and gateway for a VM's network, with NAT onto the host's
/// own sockets, DHCP, DNS and port forwarding.
#[derive(Parser, Debug)]
#[command(name = "host-switch", version)]
struct Opts {
    /// Debug logging.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = go_bool)]
    debug: bool,
    /// The virtual network (gateway = first address, VM = second, host alias = last).
    #[arg(long, default_value = "192.168.127.0/24")]
    subnet: Ipv4Net,
    /// The virtual network's IPv6 /64 (gateway = ::1, host alias = ::fe,
    /// guests by SLAAC); empty (`--subnet6=`) keeps it IPv4-only.
    #[arg(long, default_value = rdnet_vnet::config::DEFAULT_SUBNET6)]
    subnet6: String,
    /// Static forward HostIP:Port=GuestIP:Port (optional udp: prefix); repeatable.
    #[arg(long = "port-forward")]
    port_forward: Vec<StaticForward>,
    /// Also serve the HTTP API (gvproxy's) here: unix:///path,
    /// tcp://127.0.0.1:PORT or (Windows) npipe://./pipe/NAME; repeatable. It
    /// is always served inside the virtual network at gateway:80.
    #[arg(long)]
    api: Vec<Endpoint>,
    /// Where VMs connect: unix:///path, unixgram:///path (a frame per datagram), tcp://IP:PORT, vsock://:PORT,
    /// hvsock://VMGUID:PORT, npipe://./pipe/NAME, hybridvsock:///VMM.sock:PORT (Firecracker, Cloud
    /// Hypervisor, vhost-device-vsock: the guest's dial of CID 2 PORT, on VMM.sock_PORT), winsock://IPv4:PORT
    /// (Windows: TCP through the Hyper-V socket code, to test it where Hyper-V is missing); repeatable. Default: on
    /// Linux vsock://:6656; on Windows, find WSL's VM (the one whose guest
    /// answers the handshake on port 6669) and listen on its port 6656.
    #[arg(long)]
    listen: Vec<Endpoint>,
    /// MTU of the virtual network (announced by DHCP), up to 65521.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Log file (appended to); stderr when not given.
    #[arg(long)]
    logfile: Option<PathBuf>,
    /// Upstream DNS resolver IP:PORT (repeatable); default: the host's own
    /// resolver (on Windows its resolver API, elsewhere resolv.conf's
    /// nameservers), followed as it changes.
    #[arg(long = "dns-upstream")]
    dns_upstream: Vec<SocketAddr>,
    /// Allow NAT to link-local 169.254.0.0/16 (cloud metadata lives there).
    #[arg(long = "allow-link-local", num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = go_bool)]
    allow_link_local: bool,
    /// Most concurrent TCP flows; new connections beyond it are reset.
    #[arg(long = "max-flows", default_value_t = 32768)]
    max_flows: usize,
    /// Most concurrent UDP flows (least recently used evicted first).
    #[arg(long = "max-udp-flows", default_value_t = 4096)]
    max_udp_flows: usize,
    /// Length-prefix framing on stream links: u16le (default) or u32be (qemu).
    #[arg(long, default_value = "u16le")]
    framing: Framing,
    /// Write a pcap capture of all frames here ("" for none). Default: with
    /// -debug, capture.pcap in the working directory (as gvproxy does).
    #[arg(long)]
    capture: Option<String>,
    /// The capture stops once its file would grow beyond this many bytes.
    #[arg(long = "capture-max-bytes", default_value_t = rdnet_vnet::shell::capture::DEFAULT_MAX_BYTES)]
    capture_max_bytes: u64,
    /// The guest's handshake endpoint (vsock://CID:6669, unix:///path,
    /// hybridvsock:///VMM.sock:6669 for a guest behind a hybrid-vsock VMM): find
    /// network-setup there by its signature, tell it READY once -listen is
    /// up, and pair again whenever its data connection is lost.
    #[arg(long)]
    handshake: Option<Endpoint>,
    /// A signature phrase the guest's network-setup may announce
    /// (repeatable); by default both the current Rancher Desktop's and the
    /// seed's are accepted.
    #[arg(long, default_values_t = HOST_SIGNATURES.map(String::from))]
    signature: Vec<String>,
}

const DEFAULT_LISTEN: &str = "vsock://:6656";
const PROGRAM: &str = "host-switch";
/// How long blocking work may hold the exit (part of the time a console
/// close leaves us, `rdnet_cli::sys::CLOSE_GRACE`).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// Bounds of the flow-table flags.
const MAX_FLOW_LIMIT: usize = 1 << 20;

fn main() -> ExitCode {
    // A daemon keeps no descriptor it inherited but does not own (fd:// endpoints are its own).
    rdnet_cli::close_inherited_fds(&rdnet_cli::fds_named_in_args(std::env::args()));
    let opts: Opts = parse_go_args();
    // Every flag is checked before anything is opened.
    let cfg = match net_config(&opts) {
        Ok(cfg) => cfg,
        Err(msg) => return usage_error(PROGRAM, msg),
    };
    init_logging(&LogOptions { logfile: opts.logfile.clone(), debug: opts.debug });
    let code = match run(opts, cfg) {
        Ok(()) => {
            tracing::info!("host-switch stopped");
            ExitCode::SUCCESS
        }
        Err(e) => runtime_error(PROGRAM, &*e),
    };
    // A console close or logoff waits for this before Windows ends us.
    rdnet_cli::console_shutdown_done();
    code
}

/// The network's settings from the flags, or the usage error that says
/// which flag is wrong.
fn net_config(opts: &Opts) -> Result<NetConfig, String> {
    let invalid = |flag: &str, value: &dyn std::fmt::Display, reason: &str| {
        format!("invalid value \"{value}\" for flag -{flag}: {reason}")
    };
    for s in &opts.signature {
        validate_signature(s).map_err(|e| invalid("signature", s, &e))?;
    }
    for (flag, value) in [("max-flows", opts.max_flows), ("max-udp-flows", opts.max_udp_flows)] {
        if !(1..=MAX_FLOW_LIMIT).contains(&value) {
            return Err(invalid(flag, &value, &out_of_range(1, MAX_FLOW_LIMIT)));
        }
    }
    let cfg = NetConfig::new(opts.subnet, opts.mtu).map_err(|e| match e {
        ConfigError::SubnetTooSmall(_) => invalid(
            "subnet",
            &opts.subnet,
            "too small: it needs room for a gateway, a device and a host address (at most /29)",
        ),
        ConfigError::BadMtu(m) => invalid("mtu", &m, &out_of_range(MIN_MTU, MAX_MTU)),
        ConfigError::BadSubnet6(p) => invalid("subnet6", &p, "must be a /64"),
    })?;
    let prefix6 = match opts.subnet6.trim() {
        "" => None,
        text => Some(text.parse::<ipnet::Ipv6Net>().map_err(|e| invalid("subnet6", &text, &e.to_string()))?),
    };
    let cfg = cfg.with_ipv6(prefix6).map_err(|e| invalid("subnet6", &opts.subnet6, &e.to_string()))?;
    Ok(cfg)
}

fn run(opts: Opts, cfg: NetConfig) -> Result<(), Box<dyn std::error::Error>> {
    raise_fd_limit();
    // Windows without --listen or --handshake: find the guest's VM (COMPAT §4).
    let discover = cfg!(windows) && opts.listen.is_empty() && opts.handshake.is_none();
    let listen_on = if !opts.listen.is_empty() {
        opts.listen.clone()
    } else if discover {
        Vec::new()
    } else {
        vec![DEFAULT_LISTEN.parse::<Endpoint>()?]
    };
    tracing::info!(
        subnet = %cfg.subnet, gateway = %cfg.gateway_ip, host = %cfg.host_ip, mtu = cfg.mtu,
        subnet6 = %cfg.ipv6.as_ref().map_or("off".to_string(), |v6| v6.prefix.to_string()),
        forwards = opts.port_forward.len(), "starting host-switch"
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&rt, async move {
        let engine_cfg = EngineConfig {
            framing: opts.framing,
            allow_link_local: opts.allow_link_local,
            dns_upstreams: opts.dns_upstream.clone(),
            // DHCP hands out the host's search suffixes, kept current.
            follow_host_search: true,
            max_udp_flows: opts.max_udp_flows,
            max_tcp_flows: opts.max_flows,
            ..EngineConfig::default()
        };
        let engine = Engine::new(Network::new(cfg), engine_cfg);
        let capture = match &opts.capture {
            Some(p) if p.is_empty() => None,
            Some(p) => Some(std::path::PathBuf::from(p)),
            None => opts.debug.then(|| "capture.pcap".into()),
        };
        if let Some(path) = capture {
            // Whole frames, also those above the MTU that VMs which
            // negotiated offload exchange (rdnet_wire::offload).
            let snaplen = engine.max_frame().max(rdnet_wire::offload::MAX_LARGE_FRAME) as u32;
            match rdnet_vnet::shell::capture::Capture::create(&path, snaplen, opts.capture_max_bytes) {
                Ok(c) => {
                    tracing::info!(path = %path.display(), max_bytes = opts.capture_max_bytes, "capturing frames");
                    engine.start_capture(c);
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot write the packet capture"),
            }
        }
        rdnet_vnet::api::register_inside(&engine);
        for f in &opts.port_forward {
            let (local, remote) = (f.local.to_string(), f.remote.to_string());
            engine
                .forwarder
                .expose(&engine, f.protocol.as_str(), &local, &remote)
                .map_err(|e| format!("port forward {}:{local}={remote}: {e}", f.protocol.as_str()))?;
        }
        for ep in &opts.api {
            let l = listen(ep).await.map_err(|e| format!("serving the API on {ep}: {e}"))?;
            tracing::info!(endpoint = %l.local_endpoint().unwrap_or_else(|| ep.clone()), "serving the API");
            tokio::task::spawn_local(rdnet_vnet::api::serve_listener(engine.clone(), l));
        }
        let mut listeners = Vec::new();
        for ep in &listen_on {
            #[cfg(unix)]
            if let Endpoint::Unixgram(path) = ep {
                let link =
                    rdnet_link::datagram::DatagramLink::bind(path).map_err(|e| format!("listening on {ep}: {e}"))?;
                tracing::info!(endpoint = %ep, "listening for a VM (one frame per datagram)");
                tokio::task::spawn_local(engine.clone().serve_datagram(link));
                continue;
            }
            let l = listen(ep).await.map_err(|e| format!("listening on {ep}: {e}"))?;
            tracing::info!(endpoint = %l.local_endpoint().unwrap_or_else(|| ep.clone()), "listening for VMs");
            listeners.push(Rc::new(l));
        }
        // With --handshake, data connections are counted for the handshake.
        let links = (opts.handshake.is_some() || discover).then(DataLinks::new);
        for l in &listeners {
            tokio::task::spawn_local(accept_loop(engine.clone(), l.clone(), links.clone()));
        }
        let handshake = async {
            match (&opts.handshake, &links) {
                (Some(ep), Some(links)) => {
                    let e = host_handshake_loop(ep, &opts.signature, &HostTiming::default(), links).await;
                    format!("handshake with {ep} failed: {}", rdnet_cli::error_chain(&e))
                }
                #[cfg(windows)]
                (None, Some(links)) => {
                    let e = serve_discovered(engine.clone(), &opts.signature, links).await;
                    format!("serving WSL's VM failed: {}", rdnet_cli::error_chain(&e))
                }
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = wait_for_shutdown() => {}
            e = handshake => return Err(e.into()),
        }
        tracing::info!("shutting down");
        engine.forwarder.close_all();
        Ok::<(), Box<dyn std::error::Error>>(())
    });
    // Dropping the tasks closes every listener; blocking work still
    // running (an ICMP echo waiting for its reply, a DNS query in the
    // system resolver) gets a bounded time, so the shutdown is bounded.
    drop(local);
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

async fn accept_loop(engine: Rc<Engine>, listener: Rc<Listener>, links: Option<DataLinks>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::task::spawn_local(engine.clone().serve(stream, peer, links.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Windows without --listen: find the VM whose guest answers the handshake
/// among the running compute systems, serve its Hyper-V port 6656, and
/// follow the guest to a new VM when WSL restarts.
#[cfg(windows)]
async fn serve_discovered(engine: Rc<Engine>, signatures: &[String], links: &DataLinks) -> DiscoveryError {
    let mut vms = rdnet_link::sys::compute_systems;
    let endpoint = |vm: &str, port: u32| Endpoint::HvSock { vm: vm.to_string(), port };
    let mut serve = |l: Listener| -> Server {
        let task = tokio::task::spawn_local(accept_loop(engine.clone(), Rc::new(l), Some(links.clone())));
        Box::new(AbortOnDrop(task.abort_handle()))
    };
    discover_and_serve(&mut vms, &endpoint, signatures, &HostTiming::default(), links, &mut serve).await
}

async fn wait_for_shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        // Ctrl-C, Ctrl-Break, console close, logoff and shutdown.
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        if let Err(e) = rdnet_cli::watch_console(move |event| {
            let _ = tx.try_send(event);
        }) {
            tracing::warn!(error = %e, "cannot watch console control events (Ctrl-C, console close)");
            std::future::pending::<()>().await;
        }
        if let Some(event) = rx.recv().await {
            tracing::info!(%event, "console control event");
        }
    }
}

/// Many flows need many sockets: lift the soft open-file limit to the hard one.
fn raise_fd_limit() {
    #[cfg(unix)]
    {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
            && soft < hard
        {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => tracing::debug!(from = soft, to = hard, "raised open-file limit"),
                Err(e) => tracing::warn!(error = %e, "cannot raise open-file limit"),
            }
        }
    }
}
