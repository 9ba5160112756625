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
    /// The error is the reason alone; the flag parser names the flag and
    /// the value (`invalid value "…" for flag -port-forward: …`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (protocol, rest) = match s.split_once(':') {
            Some(("udp", rest)) => (Protocol::Udp, rest),
            Some(("tcp", rest)) => (Protocol::Tcp, rest),
            _ => (Protocol::Tcp, s),
        };
        let (local, remote) = rest.split_once('=').ok_or("expected [udp:]HostIP:Port=GuestIP:Port")?;
        let local = parse_side(local, "host")?;
        let remote = parse_side(remote, "guest")?;
        Ok(StaticForward { protocol, local, remote })
    }
}

/// One side of a forward, `IP:PORT` (`[IPv6]:PORT`), with an error that
/// says which part is wrong.
fn parse_side(text: &str, side: &str) -> Result<SocketAddr, String> {
    let (ip, port) = text.rsplit_once(':').ok_or_else(|| format!("the {side} side {text:?} is not IP:PORT"))?;
    let port: u16 = match port.parse::<u64>() {
        Ok(p) if (1..=65535).contains(&p) => p as u16,
        Ok(p) => return Err(format!("the {side} port {p} is out of range: must be between 1 and 65535")),
        Err(_) => return Err(format!("the {side} port {port:?} is not a number")),
    };
    let bare = ip.strip_prefix('[').and_then(|i| i.strip_suffix(']')).unwrap_or(ip);
    let ip: std::net::IpAddr = bare.parse().map_err(|_| format!("the {side} address {ip:?} is not an IP address"))?;
    if ip.is_ipv6() && !text.starts_with('[') {
        return Err(format!("the {side} side {text:?}: write an IPv6 address in brackets, [ADDR]:PORT"));
    }
    Ok(SocketAddr::new(ip, port))
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

    #[test]
    fn errors_say_which_part_is_wrong() {
        let e = |s: &str| s.parse::<StaticForward>().unwrap_err();
        assert_eq!(
            e("127.0.0.1:99999=192.168.127.2:80"),
            "the host port 99999 is out of range: must be between 1 and 65535"
        );
        assert_eq!(e("127.0.0.1:80=192.168.127.2:0"), "the guest port 0 is out of range: must be between 1 and 65535");
        assert_eq!(e("localhost:80=192.168.127.2:80"), r#"the host address "localhost" is not an IP address"#);
        assert_eq!(e("127.0.0.1:http=192.168.127.2:80"), r#"the host port "http" is not a number"#);
        assert_eq!(e("127.0.0.1:80"), "expected [udp:]HostIP:Port=GuestIP:Port");
    }
}
