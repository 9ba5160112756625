//! Port-forward specifications (`-port-forward [udp:]HostIP:Port=GuestIP:Port`).

use std::net::SocketAddr;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticForward {
    pub protocol: Protocol,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl FromStr for StaticForward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (protocol, rest) = match s.split_once(':') {
            Some(("udp", rest)) => (Protocol::Udp, rest),
            Some(("tcp", rest)) => (Protocol::Tcp, rest),
            _ => (Protocol::Tcp, s),
        };
        let (local, remote) = rest
            .split_once('=')
            .ok_or_else(|| format!("invalid port forward {s:?}: expected HostIP:Port=GuestIP:Port"))?;
        let local = local.parse().map_err(|_| format!("invalid port forward {s:?}: bad host address {local:?}"))?;
        let remote = remote.parse().map_err(|_| format!("invalid port forward {s:?}: bad guest address {remote:?}"))?;
        Ok(StaticForward { protocol, local, remote })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rancher_desktop_forms() {
        let f: StaticForward = "127.0.0.1:6443=192.168.127.2:6443".parse().unwrap();
        assert_eq!(f.protocol, Protocol::Tcp);
        assert_eq!(f.local, "127.0.0.1:6443".parse().unwrap());
        assert_eq!(f.remote, "192.168.127.2:6443".parse().unwrap());
        let f: StaticForward = "udp:127.0.0.1:53=192.168.127.2:53".parse().unwrap();
        assert_eq!(f.protocol, Protocol::Udp);
        let f: StaticForward = "[::1]:80=192.168.127.2:80".parse().unwrap();
        assert!(f.local.is_ipv6());
        for bad in ["", "127.0.0.1:1", "127.0.0.1=1.2.3.4:5", "x:1=1.2.3.4:5", "127.0.0.1:99999=1.2.3.4:5"] {
            assert!(bad.parse::<StaticForward>().is_err(), "{bad}");
        }
    }
}
