//! Port mappings from the Rancher Desktop guest agent (COMPAT §7).
//!
//! The agent writes one JSON object per connection:
//!
//! ```json
//! {"remove":false,"ports":{"6443/tcp":[{"HostIp":"127.0.0.1","HostPort":"6443"}]},"connectAddrs":null}
//! ```
//!
//! `ports` is a Docker port map: `"port/proto"` → list of host bindings. This
//! module turns such a body into a normalized [`Request`]: whether to publish
//! or remove, and a deduplicated list of [`Binding`]s (protocol, the address
//! to listen on, the upstream port). Parsing is all-or-nothing: if any part of
//! a body is invalid the whole body is rejected, so a bad message never
//! changes half of what is published. Unknown fields are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::Deserialize;

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One normalized binding: listen on `listen` (in the default namespace) and
/// forward to `upstreamAddress:upstream_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Binding {
    pub proto: Proto,
    pub listen: SocketAddr,
    pub upstream_port: u16,
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} → :{}", self.listen, self.proto, self.upstream_port)
    }
}

/// A parsed message: publish (`remove == false`) or remove these bindings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub remove: bool,
    pub bindings: Vec<Binding>,
}

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("invalid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("invalid port key {key:?}: {reason}")]
    Key { key: String, reason: &'static str },
    #[error("invalid protocol {proto:?} in {key:?} (expected tcp or udp)")]
    Proto { key: String, proto: String },
    #[error("invalid HostIp {ip:?} for {key:?}")]
    HostIp { key: String, ip: String },
    #[error("invalid HostPort {port:?} for {key:?}")]
    HostPort { key: String, port: String },
}

/// The wire format, as the guest agent sends it. Only what we use is typed;
/// everything else (`connectAddrs`, future fields) is ignored.
#[derive(Debug, Deserialize)]
struct PortMapping {
    #[serde(default)]
    remove: bool,
    #[serde(default)]
    ports: Option<BTreeMap<String, Option<Vec<PortBinding>>>>,
}

#[derive(Debug, Deserialize)]
struct PortBinding {
    #[serde(rename = "HostIp", default)]
    host_ip: Option<String>,
    #[serde(rename = "HostPort", default)]
    host_port: Option<HostPort>,
}

/// Docker sends `HostPort` as a string; a number is accepted too.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum HostPort {
    Text(String),
    Number(serde_json::Number),
}

impl HostPort {
    fn text(&self) -> String {
        match self {
            HostPort::Text(s) => s.clone(),
            HostPort::Number(n) => n.to_string(),
        }
    }
}

/// Parses one message body into a normalized request.
pub fn parse(body: &[u8]) -> Result<Request, MappingError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(MappingError::Json)?;
    check_shape(&value)?;
    let raw: PortMapping = serde_json::from_value(value).map_err(MappingError::Json)?;
    let mut set = BTreeSet::new();
    for (key, bindings) in raw.ports.unwrap_or_default() {
        let proto = parse_key(&key)?;
        for b in bindings.unwrap_or_default() {
            let ip = parse_host_ip(b.host_ip.as_deref().unwrap_or(""))
                .ok_or_else(|| MappingError::HostIp { key: key.clone(), ip: b.host_ip.clone().unwrap_or_default() })?;
            let port_text = b.host_port.as_ref().map(HostPort::text).unwrap_or_default();
            let port =
                parse_port(&port_text).ok_or_else(|| MappingError::HostPort { key: key.clone(), port: port_text })?;
            set.insert(Binding { proto, listen: SocketAddr::new(ip, port), upstream_port: port });
        }
    }
    Ok(Request { remove: raw.remove, bindings: set.into_iter().collect() })
}

/// serde would also read a struct from a JSON array (`[]`, `[true, null]`);
/// the message and each binding must be objects.
fn check_shape(value: &serde_json::Value) -> Result<(), MappingError> {
    use serde::de::Error as _;
    let not_object = |what: &str| MappingError::Json(serde_json::Error::custom(format!("{what} is not a JSON object")));
    let obj = value.as_object().ok_or_else(|| not_object("the message"))?;
    if let Some(ports) = obj.get("ports").and_then(|p| p.as_object()) {
        for bindings in ports.values().filter_map(|b| b.as_array()) {
            if !bindings.iter().all(|b| b.is_object()) {
                return Err(not_object("a port binding"));
            }
        }
    }
    Ok(())
}

/// `"6443/tcp"` → tcp. The protocol is case-insensitive; a key without one
/// is TCP, as in Docker. The container port must be a valid port number (it
/// is not used for forwarding: the upstream port is the host port).
fn parse_key(key: &str) -> Result<Proto, MappingError> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    if parse_port(port).is_none() {
        return Err(MappingError::Key { key: key.to_string(), reason: "container port is not a number in 1-65535" });
    }
    if proto.eq_ignore_ascii_case("tcp") {
        Ok(Proto::Tcp)
    } else if proto.eq_ignore_ascii_case("udp") {
        Ok(Proto::Udp)
    } else {
        Err(MappingError::Proto { key: key.to_string(), proto: proto.to_string() })
    }
}

/// Empty (or `localhost`) means 127.0.0.1; IPv6 may be bracketed (`[::1]`).
pub fn parse_host_ip(s: &str) -> Option<IpAddr> {
    if s.is_empty() || s.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    s.parse().ok()
}

/// Only plain decimal digits (no sign, no blanks), 1..=65535.
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|&p| p != 0)
}

/// Where a message ends in a growing buffer, the way Go's `json.Decoder`
/// reads one value from a stream: `Complete(n)` once the first `n` bytes hold
/// a whole JSON value, `Incomplete` while more bytes could finish it, and
/// `Invalid` as soon as no continuation can make it valid JSON.
#[derive(Debug, PartialEq, Eq)]
pub enum Framing {
    Complete(usize),
    Incomplete,
    Invalid,
}

pub fn framing(buf: &[u8]) -> Framing {
    let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<serde::de::IgnoredAny>();
    match values.next() {
        Some(Ok(_)) => Framing::Complete(values.byte_offset()),
        Some(Err(e)) if e.is_eof() => Framing::Incomplete,
        Some(Err(_)) => Framing::Invalid,
        None => Framing::Incomplete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(body: &str) -> Binding {
        let r = parse(body.as_bytes()).unwrap();
        assert_eq!(r.bindings.len(), 1, "{r:?}");
        r.bindings[0]
    }

    fn binding(ip: &str, port: &str) -> String {
        format!(r#"{{"ports":{{"80/tcp":[{{"HostIp":"{ip}","HostPort":"{port}"}}]}}}}"#)
    }

    #[test]
    fn guest_agent_example() {
        let r = parse(
            br#"{"remove":false,"ports":{"6443/tcp":[{"HostIp":"127.0.0.1","HostPort":"6443"}]},"connectAddrs":null}"#,
        )
        .unwrap();
        assert!(!r.remove);
        assert_eq!(
            r.bindings,
            vec![Binding { proto: Proto::Tcp, listen: "127.0.0.1:6443".parse().unwrap(), upstream_port: 6443 }]
        );
    }

    #[test]
    fn remove_flag_and_unknown_fields() {
        let r = parse(
            br#"{"remove":true,"extra":[1,2],"ports":{"53/udp":[{"HostIp":"","HostPort":"5353","Other":1}]},
                "connectAddrs":[{"x":1}]}"#,
        )
        .unwrap();
        assert!(r.remove);
        assert_eq!(
            r.bindings,
            vec![Binding { proto: Proto::Udp, listen: "127.0.0.1:5353".parse().unwrap(), upstream_port: 5353 }]
        );
    }

    #[test]
    fn null_and_missing_ports() {
        let bodies =
            [r#"{"remove":false,"ports":null}"#, r#"{}"#, r#"{"ports":{"80/tcp":null}}"#, r#"{"ports":{"80/tcp":[]}}"#];
        for body in bodies {
            let r = parse(body.as_bytes()).unwrap();
            assert!(r.bindings.is_empty(), "{body}");
            assert!(!r.remove);
        }
    }

    #[test]
    fn bad_json() {
        let bodies = [
            "",
            "not json",
            "{",
            r#"{"ports":{"80/tcp":[{"HostPort":"80"}]}"#,
            "[]",
            "[true,null]",
            "\u{0}",
            r#"{"remove":"yes"}"#,
            r#"{"ports":5}"#,
            r#"{"ports":{"80/tcp":{"HostPort":"80"}}}"#,
            r#"{"ports":{"80/tcp":[["127.0.0.1","80"]]}}"#,
        ];
        for body in bodies {
            assert!(matches!(parse(body.as_bytes()), Err(MappingError::Json(_))), "{body:?}");
        }
        assert!(parse(b"\xff\xfe").is_err());
    }

    #[test]
    fn protocol_is_case_insensitive() {
        assert_eq!(one(r#"{"ports":{"80/TCP":[{"HostIp":"","HostPort":"80"}]}}"#).proto, Proto::Tcp);
        assert_eq!(one(r#"{"ports":{"80/Udp":[{"HostIp":"","HostPort":"80"}]}}"#).proto, Proto::Udp);
        assert_eq!(one(r#"{"ports":{"80":[{"HostIp":"","HostPort":"80"}]}}"#).proto, Proto::Tcp);
        assert!(matches!(
            parse(br#"{"ports":{"80/sctp":[{"HostIp":"","HostPort":"80"}]}}"#),
            Err(MappingError::Proto { .. })
        ));
        assert!(matches!(
            parse(br#"{"ports":{"x/tcp":[{"HostIp":"","HostPort":"80"}]}}"#),
            Err(MappingError::Key { .. })
        ));
    }

    #[test]
    fn host_ips() {
        let listen = |ip: &str| one(&binding(ip, "8080")).listen;
        assert_eq!(listen(""), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(listen("localhost"), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(listen("::1"), "[::1]:8080".parse().unwrap());
        assert_eq!(listen("[::1]"), "[::1]:8080".parse().unwrap());
        assert_eq!(listen("0.0.0.0"), "0.0.0.0:8080".parse().unwrap());
        assert_eq!(listen("::"), "[::]:8080".parse().unwrap());
        // A missing HostIp is the empty one.
        assert_eq!(one(r#"{"ports":{"80/tcp":[{"HostPort":"81"}]}}"#).listen, "127.0.0.1:81".parse().unwrap());
        for bad in ["nope", "1.2.3", "[127.0.0.1]", "::1]", "127.0.0.1:80", "[::1"] {
            assert!(matches!(parse(binding(bad, "80").as_bytes()), Err(MappingError::HostIp { .. })), "{bad}");
        }
    }

    #[test]
    fn invalid_port_strings() {
        for bad in ["", "0", "65536", "-1", "+80", " 80", "80 ", "8o", "1e3", "0x50", "999999", "80/tcp"] {
            assert!(matches!(parse(binding("", bad).as_bytes()), Err(MappingError::HostPort { .. })), "{bad:?}");
        }
        assert!(parse(br#"{"ports":{"80/tcp":[{"HostIp":""}]}}"#).is_err());
        assert!(parse(br#"{"ports":{"80/tcp":[{"HostIp":"","HostPort":-1}]}}"#).is_err());
        assert!(parse(br#"{"ports":{"80/tcp":[{"HostIp":"","HostPort":1.5}]}}"#).is_err());
        assert_eq!(one(r#"{"ports":{"80/tcp":[{"HostPort":65535}]}}"#).upstream_port, 65535);
        assert_eq!(one(r#"{"ports":{"80/tcp":[{"HostPort":"00080"}]}}"#).upstream_port, 80);
    }

    #[test]
    fn one_bad_binding_rejects_the_body() {
        let body = br#"{"ports":{"80/tcp":[{"HostIp":"","HostPort":"80"}],"81/tcp":[{"HostIp":"","HostPort":"x"}]}}"#;
        assert!(parse(body).is_err());
    }

    #[test]
    fn duplicates_collapse_and_keys_differ_by_ip_and_proto() {
        let r = parse(
            br#"{"ports":{
                "80/tcp":[{"HostIp":"127.0.0.1","HostPort":"80"},{"HostIp":"","HostPort":"80"},
                          {"HostIp":"::1","HostPort":"80"}],
                "80/TCP":[{"HostIp":"127.0.0.1","HostPort":"80"}],
                "80/udp":[{"HostIp":"127.0.0.1","HostPort":"80"}]}}"#,
        )
        .unwrap();
        assert_eq!(r.bindings.len(), 3, "{r:?}");
    }

    #[test]
    fn framing_finds_the_end_of_one_value() {
        assert_eq!(framing(b""), Framing::Incomplete);
        assert_eq!(framing(b"  \n"), Framing::Incomplete);
        assert_eq!(framing(br#"{"remove":"#), Framing::Incomplete);
        assert_eq!(framing(br#"{"remove":false}"#), Framing::Complete(16));
        assert_eq!(framing(b"{\"remove\":false}\n{\"x\""), Framing::Complete(16));
        assert_eq!(framing(b"{]"), Framing::Invalid);
        assert_eq!(framing(b"garbage"), Framing::Invalid);
    }
}
