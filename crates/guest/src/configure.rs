//! Applying a DHCP [`Lease`] to an interface, and taking it away again.
//!
//! How this works: applying is idempotent, so a renewed lease is applied
//! the same way as a new one: the MTU (option 26, never above `max_mtu`)
//! is set, the address is added with "replace" semantics, the default route
//! via the router is replaced (marked on-link when the router lies outside
//! the leased subnet), and the DNS servers and search domains are written
//! to the resolv.conf path. Removing deletes the default route and the
//! address; resolv.conf is left as it is. Nothing here runs on the packet
//! path: vm-switch calls it from its DHCP task.

use std::io;
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};

use std::net::IpAddr;

use rdnet_wire::ndp_dns::RaDns;

use crate::dhcp_client::Lease;
use crate::netlink::{Netlink, NetlinkError};
use crate::resolv;

#[derive(Debug, thiserror::Error)]
pub enum ConfigureError {
    #[error("invalid leased prefix {0}")]
    BadPrefix(String),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("cannot write {path}")]
    Resolv {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn lease_net(lease: &Lease) -> Result<Ipv4Net, ConfigureError> {
    Ipv4Net::new(lease.address, lease.prefix_len)
        .map_err(|_| ConfigureError::BadPrefix(format!("{}/{}", lease.address, lease.prefix_len)))
}

/// Applies the lease's MTU (clamped to `max_mtu`), address and default route
/// to `ifname`. Returns the MTU set, if any.
pub async fn apply_lease(
    nl: &Netlink,
    ifname: &str,
    lease: &Lease,
    max_mtu: Option<u32>,
) -> Result<Option<u32>, ConfigureError> {
    let net = lease_net(lease)?;
    let mtu = lease.mtu.map(|m| max_mtu.map_or(u32::from(m), |max| u32::from(m).min(max)));
    if let Some(mtu) = mtu {
        nl.set_mtu(ifname, mtu).await?;
    }
    nl.replace_address(ifname, IpNet::V4(net)).await?;
    if let Some(router) = lease.router {
        let onlink = !net.contains(&router);
        nl.replace_default_route(router, Some(ifname), onlink).await?;
    }
    Ok(mtu)
}

/// Removes the lease's default route and address from `ifname`.
pub async fn remove_lease(nl: &Netlink, ifname: &str, lease: &Lease) -> Result<(), ConfigureError> {
    let net = lease_net(lease)?;
    if let Some(router) = lease.router {
        // Usually already gone with the address; ignore "not found".
        let _ = nl.del_default_route(router, Some(ifname)).await;
    }
    nl.del_address(ifname, IpNet::V4(net)).await?;
    Ok(())
}

/// Writes the lease's DNS servers and search domains to `path`. Returns
/// false (and writes nothing) when the lease has neither.
pub fn write_resolv_conf(path: &Path, lease: Option<&Lease>, ra: Option<&RaDns>) -> Result<bool, ConfigureError> {
    let text = resolv::render(&servers(lease, ra), &search(lease, ra), source(lease, ra).as_deref());
    let Some(text) = text else {
        return Ok(false);
    };
    resolv::write_atomic(path, &text)
        .map_err(|source| ConfigureError::Resolv { path: path.display().to_string(), source })?;
    Ok(true)
}

/// The lease's IPv4 servers first (what the Go vm-switch's resolv.conf
/// held), then the router advertisements' IPv6 ones.
fn servers(lease: Option<&Lease>, ra: Option<&RaDns>) -> Vec<IpAddr> {
    let v4 = lease.into_iter().flat_map(|l| l.dns.iter().copied().map(IpAddr::V4));
    let v6 = ra.into_iter().flat_map(|r| r.servers.iter().copied().map(IpAddr::V6));
    let mut all: Vec<IpAddr> = Vec::new();
    for ip in v4.chain(v6) {
        if !all.contains(&ip) {
            all.push(ip);
        }
    }
    all
}

fn search(lease: Option<&Lease>, ra: Option<&RaDns>) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    let names = lease.into_iter().flat_map(|l| l.search.iter()).chain(ra.into_iter().flat_map(|r| r.search.iter()));
    for name in names {
        if !all.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            all.push(name.clone());
        }
    }
    all
}

fn source(lease: Option<&Lease>, ra: Option<&RaDns>) -> Option<String> {
    let from_lease = lease.map(|l| format!("the DHCP lease of {}", l.server_id));
    let from_ra =
        ra.filter(|r| !r.servers.is_empty() || !r.search.is_empty()).map(|_| "router advertisements".to_string());
    match (from_lease, from_ra) {
        (Some(l), Some(r)) => Some(format!("{l} and {r}")),
        (l, r) => l.or(r),
    }
}

/// Sets the tap's IPv6 up as a guest of the virtual network: on (and
/// configured by the gateway's router advertisements: SLAAC with an
/// EUI-64 address, the default route, the MTU) or off altogether. Writes
/// the per-interface sysctls of the caller's network namespace; the tap
/// must exist, and should not be up yet, so its first address is already
/// made the way set here.
pub fn set_ipv6(ifname: &str, enabled: bool) -> io::Result<()> {
    let dir = Path::new("/proc/sys/net/ipv6/conf").join(ifname);
    if !dir.exists() {
        // A kernel without IPv6: nothing to turn on or off.
        return if enabled {
            Err(io::Error::new(io::ErrorKind::Unsupported, "the kernel has no IPv6"))
        } else {
            Ok(())
        };
    }
    let settings: &[(&str, &str)] = if enabled {
        // accept_ra 2: RAs are taken even if forwarding is on in the guest
        // (container hosts turn it on); addr_gen_mode 0: EUI-64, so the
        // device's address follows from its MAC, as its IPv4 lease does.
        &[
            ("addr_gen_mode", "0"),
            ("accept_ra", "2"),
            ("autoconf", "1"),
            ("accept_ra_mtu", "1"),
            ("accept_dad", "1"),
            ("disable_ipv6", "0"),
        ]
    } else {
        &[("disable_ipv6", "1")]
    };
    for (name, value) in settings {
        std::fs::write(dir.join(name), value)
            .map_err(|e| io::Error::new(e.kind(), format!("net.ipv6.conf.{ifname}.{name}={value}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::NetNs;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn lease() -> Lease {
        Lease {
            address: Ipv4Addr::new(192, 168, 127, 2),
            prefix_len: 24,
            router: Some(Ipv4Addr::new(192, 168, 127, 1)),
            dns: vec![Ipv4Addr::new(192, 168, 127, 1)],
            search: vec!["example.internal".into()],
            domain: None,
            domain_search: vec!["example.internal".into()],
            broadcast: None,
            next_server: None,
            mtu: Some(9000),
            server_id: Ipv4Addr::new(192, 168, 127, 1),
            server_mac: [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd],
            lease_time: Some(Duration::from_secs(3600)),
            renew_after: Duration::from_secs(1800),
            rebind_after: Duration::from_secs(3150),
        }
    }

    #[test]
    fn resolv_conf_from_lease() {
        let dir = std::env::temp_dir().join(format!("rdnet-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        assert!(write_resolv_conf(&path, Some(&lease()), None).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("search example.internal\nnameserver 192.168.127.1\n"), "{text}");
        // The RA's servers after the lease's, its search list merged.
        let ra = RaDns {
            servers: vec!["fd5a:94ef:e40c::1".parse().unwrap()],
            servers_lifetime: 600,
            search: vec!["EXAMPLE.internal".into(), "v6.example".into()],
            search_lifetime: 600,
        };
        assert!(write_resolv_conf(&path, Some(&lease()), Some(&ra)).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with(
                "search example.internal v6.example\nnameserver 192.168.127.1\nnameserver fd5a:94ef:e40c::1\n"
            ),
            "{text}"
        );
        assert!(
            text.starts_with("# Generated by vm-switch from the DHCP lease of 192.168.127.1 and router advertisements")
        );
        // The RA alone (no lease yet).
        assert!(write_resolv_conf(&path, None, Some(&ra)).unwrap());
        assert!(std::fs::read_to_string(&path).unwrap().contains("nameserver fd5a:94ef:e40c::1\n"));
        let mut empty = lease();
        empty.dns.clear();
        empty.search.clear();
        assert!(!write_resolv_conf(&dir.join("other"), Some(&empty), None).unwrap());
        assert!(!dir.join("other").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn apply_and_remove_in_a_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let ns = NetNs::new_anonymous().unwrap();
        ns.block_on(|| async {
            let nl = Netlink::new().unwrap();
            nl.create_veth("cf-a", "cf-b", None).await.unwrap();
            nl.set_up("cf-a").await.unwrap();
            nl.set_up("cf-b").await.unwrap();
            let l = lease();
            assert_eq!(apply_lease(&nl, "cf-a", &l, Some(1500)).await.unwrap(), Some(1500));
            // Applying twice (a renewal) is fine.
            apply_lease(&nl, "cf-a", &l, Some(1500)).await.unwrap();
            assert_eq!(nl.link_info("cf-a").await.unwrap().unwrap().mtu, Some(1500));
            assert_eq!(nl.addresses("cf-a").await.unwrap(), vec!["192.168.127.2/24".parse::<Ipv4Net>().unwrap()]);
            remove_lease(&nl, "cf-a", &l).await.unwrap();
            assert!(nl.addresses("cf-a").await.unwrap().is_empty());
            // A router outside the subnet is on-link.
            let mut far = l.clone();
            far.router = Some(Ipv4Addr::new(10, 0, 0, 1));
            apply_lease(&nl, "cf-a", &far, None).await.unwrap();
            assert_eq!(nl.link_info("cf-a").await.unwrap().unwrap().mtu, Some(9000));
        })
        .unwrap();
    }
}
