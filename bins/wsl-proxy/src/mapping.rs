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
//! to listen on, the port).
//!
//! How this works: the body is read as a generic JSON value and walked by
//! hand rather than deserialized into a struct, so that one entry of the
//! wrong kind costs only that entry, as in Go (which skips a key it cannot
//! use and applies the rest). Only the envelope is all-or-nothing: a body
//! that is not JSON, not an object, whose `remove` is not a boolean or whose
//! `ports` is not an object is rejected whole, since then we cannot tell
//! what the sender meant at all. Everything below that (a key with an
//! unknown protocol, a bindings value that is not a list, a binding that is
//! not an object, a bad `HostIp` or `HostPort`) is skipped and reported in
//! [`Request::skipped`]. Unknown fields are ignored; field names match
//! exactly first and then without regard to ASCII case, as Go's
//! `encoding/json` does.
//!
//! Addresses: an empty or missing `HostIp` is every address, IPv4 and IPv6
//! ([`Host::All`], Go's `":PORT"`). `localhost` is `127.0.0.1`: Go resolves
//! it and listens on the first IPv4 answer only; we do the same without
//! asking a resolver. Anything else must be an IP literal (IPv6 may be
//! bracketed); `0.0.0.0` and `::` are each one family's wildcard, so
//! Docker's usual pair of bindings for one port does not collide.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde_json::{Map, Value};

/// How many skipped entries a [`Request`] describes one by one; the rest
/// are only counted, so a hostile body cannot make us hold (or log) one
/// record per byte.
pub const SKIP_DETAILS: usize = 10;
/// How much of a string from the body a skip reason quotes.
const QUOTED: usize = 64;

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

/// Where a binding listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    /// Every address of both families (an empty `HostIp`).
    All,
    Ip(IpAddr),
}

/// One normalized binding: listen on `host:port` (in the default namespace)
/// and forward to `upstreamAddress:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Binding {
    pub proto: Proto,
    pub host: Host,
    pub port: u16,
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host {
            Host::All => write!(f, "*:{}/{}", self.port, self.proto),
            Host::Ip(ip) => write!(f, "{}/{}", SocketAddr::new(ip, self.port), self.proto),
        }
    }
}

/// A parsed message: publish (`remove == false`) or remove these bindings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub remove: bool,
    pub bindings: Vec<Binding>,
    /// The first [`SKIP_DETAILS`] entries that could not be used.
    pub skipped: Vec<Skipped>,
    /// How many entries were skipped in all.
    pub skipped_count: usize,
}

/// A body rejected whole.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("invalid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("{0}")]
    Shape(&'static str),
}

/// One entry that was skipped: the port key it belongs to and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The key, quoted and cut to a loggable length.
    pub key: String,
    pub reason: SkipReason,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Why an entry was skipped. Strings from the body are quoted and cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("container port {0} is not a number between 1 and 65535")]
    ContainerPort(String),
    #[error("protocol {0} is not tcp or udp")]
    Proto(String),
    #[error("the bindings are not a list")]
    NotList,
    #[error("a binding is not an object")]
    NotObject,
    #[error("HostIp is not a string")]
    HostIpType,
    #[error("HostIp {0} is not an IP address")]
    HostIp(String),
    #[error("HostPort is missing")]
    NoHostPort,
    #[error("HostPort is not a string or a number")]
    HostPortType,
    #[error("HostPort {0} is not a number between 1 and 65535")]
    HostPort(String),
}

/// Parses one message body into a normalized request.
pub fn parse(body: &[u8]) -> Result<Request, MappingError> {
    let value: Value = serde_json::from_slice(body).map_err(MappingError::Json)?;
    let Value::Object(message) = value else {
        return Err(MappingError::Shape("the message is not a JSON object"));
    };
    // Go leaves a field that is null at its zero value.
    let remove = match field(&message, "remove") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(MappingError::Shape("\"remove\" is not true or false")),
    };
    let ports = match field(&message, "ports") {
        None | Some(Value::Null) => None,
        Some(Value::Object(ports)) => Some(ports),
        Some(_) => return Err(MappingError::Shape("\"ports\" is not an object")),
    };
    let mut out = Collector::default();
    for (key, bindings) in ports.into_iter().flatten() {
        let proto = match parse_key(key) {
            Ok(proto) => proto,
            Err(reason) => {
                out.skip(key, reason);
                continue;
            }
        };
        let bindings = match bindings {
            Value::Null => continue,
            Value::Array(list) => list,
            _ => {
                out.skip(key, SkipReason::NotList);
                continue;
            }
        };
        for binding in bindings {
            match parse_binding(binding) {
                Ok((host, port)) => {
                    out.bindings.insert(Binding { proto, host, port });
                }
                Err(reason) => out.skip(key, reason),
            }
        }
    }
    Ok(Request {
        remove,
        bindings: out.bindings.into_iter().collect(),
        skipped: out.skipped,
        skipped_count: out.skipped_count,
    })
}

#[derive(Default)]
struct Collector {
    bindings: BTreeSet<Binding>,
    skipped: Vec<Skipped>,
    skipped_count: usize,
}

impl Collector {
    fn skip(&mut self, key: &str, reason: SkipReason) {
        self.skipped_count += 1;
        if self.skipped.len() < SKIP_DETAILS {
            self.skipped.push(Skipped { key: quote(key), reason });
        }
    }
}

/// A field by its exact name, else by the first name equal to it without
/// regard to ASCII case (Go's rule, minus its Unicode special cases).
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
}

/// `"6443/tcp"` → tcp. The protocol is case-insensitive; a key without one
/// is TCP, as in Docker. The container port must be a valid port number (it
/// is not used for forwarding: the upstream port is the host port).
fn parse_key(key: &str) -> Result<Proto, SkipReason> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    if parse_port(port).is_none() {
        return Err(SkipReason::ContainerPort(quote(port)));
    }
    if proto.eq_ignore_ascii_case("tcp") {
        Ok(Proto::Tcp)
    } else if proto.eq_ignore_ascii_case("udp") {
        Ok(Proto::Udp)
    } else {
        Err(SkipReason::Proto(quote(proto)))
    }
}

fn parse_binding(binding: &Value) -> Result<(Host, u16), SkipReason> {
    let Value::Object(binding) = binding else { return Err(SkipReason::NotObject) };
    let host = match field(binding, "HostIp") {
        None | Some(Value::Null) => Host::All,
        Some(Value::String(s)) => parse_host_ip(s).ok_or_else(|| SkipReason::HostIp(quote(s)))?,
        Some(_) => return Err(SkipReason::HostIpType),
    };
    // Docker sends HostPort as a string; a whole number is accepted too.
    let port_text = match field(binding, "HostPort") {
        None | Some(Value::Null) => return Err(SkipReason::NoHostPort),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err(SkipReason::HostPortType),
    };
    let port = parse_port(&port_text).ok_or_else(|| SkipReason::HostPort(quote(&port_text)))?;
    Ok((host, port))
}

/// Empty: every address. `localhost`: 127.0.0.1 (see the module doc). IPv6
/// may be bracketed (`[::1]`).
pub fn parse_host_ip(s: &str) -> Option<Host> {
    if s.is_empty() {
        return Some(Host::All);
    }
    if s.eq_ignore_ascii_case("localhost") {
        return Some(Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().ok().map(|ip| Host::Ip(IpAddr::V6(ip)));
    }
    s.parse().ok().map(Host::Ip)
}

/// Only plain decimal digits (no sign, no blanks), 1..=65535.
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|&p| p != 0)
}

/// A string from the body as it may appear in a log line: quoted, escaped,
/// and cut once the escaped text reaches [`QUOTED`] characters. The bound
/// is on the escaped form because one control character escapes to up to
/// ten (`\u{10ffff}`), and it is the log line that must stay short.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for (at, c) in s.char_indices() {
        let escaped = c.escape_debug();
        if out.len() - 1 + escaped.len() > QUOTED {
            out.push('"');
            out.push_str(&format!("… ({} bytes)", s.len()));
            debug_assert!(at < s.len());
            return out;
        }
        out.extend(escaped);
    }
    out.push('"');
    out
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

    fn ok(body: &str) -> Request {
        parse(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    fn one(body: &str) -> Binding {
        let r = ok(body);
        assert_eq!(r.bindings.len(), 1, "{r:?}");
        assert_eq!(r.skipped_count, 0, "{r:?}");
        r.bindings[0]
    }

    /// The reasons a body's entries were skipped, nothing else published.
    fn skipped_only(body: &str) -> Vec<SkipReason> {
        let r = ok(body);
        assert!(r.bindings.is_empty(), "{body}: {r:?}");
        assert_eq!(r.skipped_count, r.skipped.len(), "{r:?}");
        r.skipped.into_iter().map(|s| s.reason).collect()
    }

    fn binding(ip: &str, port: &str) -> String {
        format!(r#"{{"ports":{{"80/tcp":[{{"HostIp":"{ip}","HostPort":"{port}"}}]}}}}"#)
    }

    fn bind(proto: Proto, ip: &str, port: u16) -> Binding {
        let host = if ip.is_empty() { Host::All } else { Host::Ip(ip.parse().unwrap()) };
        Binding { proto, host, port }
    }

    #[test]
    fn guest_agent_example() {
        let r = ok(
            r#"{"remove":false,"ports":{"6443/tcp":[{"HostIp":"127.0.0.1","HostPort":"6443"}]},"connectAddrs":null}"#,
        );
        assert!(!r.remove);
        assert_eq!(r.bindings, vec![bind(Proto::Tcp, "127.0.0.1", 6443)]);
        assert!(r.skipped.is_empty());
    }

    #[test]
    fn remove_flag_and_unknown_fields() {
        let r = ok(r#"{"remove":true,"extra":[1,2],"ports":{"53/udp":[{"HostIp":"","HostPort":"5353","Other":1}]},
                "connectAddrs":[{"x":1}]}"#);
        assert!(r.remove);
        assert_eq!(r.bindings, vec![bind(Proto::Udp, "", 5353)]);
    }

    #[test]
    fn field_names_match_without_case_as_in_go() {
        let r = ok(r#"{"Remove":true,"PORTS":{"80/tcp":[{"hostip":"127.0.0.1","hostPort":"81"}]}}"#);
        assert!(r.remove);
        assert_eq!(r.bindings, vec![bind(Proto::Tcp, "127.0.0.1", 81)]);
        // The exact spelling wins over another one.
        let r = ok(r#"{"Remove":true,"remove":false}"#);
        assert!(!r.remove);
    }

    #[test]
    fn null_and_missing_ports() {
        let bodies = [
            r#"{"remove":false,"ports":null}"#,
            r#"{}"#,
            r#"{"remove":null}"#,
            r#"{"ports":{"80/tcp":null}}"#,
            r#"{"ports":{"80/tcp":[]}}"#,
        ];
        for body in bodies {
            let r = ok(body);
            assert!(r.bindings.is_empty() && r.skipped.is_empty(), "{body}");
            assert!(!r.remove);
        }
    }

    #[test]
    fn bodies_rejected_whole() {
        let json = ["", "not json", "{", r#"{"ports":{"80/tcp":[{"HostPort":"80"}]}"#, "\u{0}"];
        for body in json {
            assert!(matches!(parse(body.as_bytes()), Err(MappingError::Json(_))), "{body:?}");
        }
        let shape = [
            "[]",
            "[true,null]",
            "5",
            "\"x\"",
            r#"{"remove":"yes"}"#,
            r#"{"remove":1}"#,
            r#"{"ports":5}"#,
            r#"{"ports":[]}"#,
        ];
        for body in shape {
            assert!(matches!(parse(body.as_bytes()), Err(MappingError::Shape(_))), "{body:?}");
        }
        assert!(parse(b"\xff\xfe").is_err());
    }

    #[test]
    fn a_bad_key_is_skipped_and_the_rest_applies() {
        let r = ok(r#"{"ports":{
                "7000/sctp":[{"HostIp":"","HostPort":"7000"}],
                "x/tcp":[{"HostIp":"","HostPort":"7001"}],
                "8080/tcp":[{"HostIp":"","HostPort":"8080"}],
                "53/udp":[{"HostIp":"127.0.0.1","HostPort":"5353"}]}}"#);
        assert_eq!(r.bindings, vec![bind(Proto::Tcp, "", 8080), bind(Proto::Udp, "127.0.0.1", 5353)]);
        assert_eq!(r.skipped_count, 2);
        let text: Vec<String> = r.skipped.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                r#""7000/sctp": protocol "sctp" is not tcp or udp"#,
                r#""x/tcp": container port "x" is not a number between 1 and 65535"#
            ]
        );
    }

    #[test]
    fn bad_bindings_are_skipped_one_by_one() {
        let r = ok(r#"{"remove":true,"ports":{"80/tcp":[
                {"HostIp":"","HostPort":"80"},
                {"HostIp":"nope","HostPort":"81"},
                {"HostIp":"","HostPort":"x"},
                ["127.0.0.1","82"],
                {"HostIp":"::1","HostPort":"83"}],
              "90/tcp":{"HostPort":"90"}}}"#);
        assert!(r.remove);
        assert_eq!(r.bindings, vec![bind(Proto::Tcp, "", 80), bind(Proto::Tcp, "::1", 83)]);
        let reasons: Vec<SkipReason> = r.skipped.into_iter().map(|s| s.reason).collect();
        assert_eq!(
            reasons,
            [
                SkipReason::HostIp("\"nope\"".into()),
                SkipReason::HostPort("\"x\"".into()),
                SkipReason::NotObject,
                SkipReason::NotList
            ]
        );
    }

    #[test]
    fn wrong_shapes_inside_a_binding() {
        assert_eq!(skipped_only(r#"{"ports":{"80/tcp":[{"HostIp":5,"HostPort":"80"}]}}"#), [SkipReason::HostIpType]);
        assert_eq!(skipped_only(r#"{"ports":{"80/tcp":[{"HostIp":""}]}}"#), [SkipReason::NoHostPort]);
        assert_eq!(skipped_only(r#"{"ports":{"80/tcp":[{"HostPort":true}]}}"#), [SkipReason::HostPortType]);
        assert_eq!(skipped_only(r#"{"ports":{"80/tcp":[null, 7]}}"#), [SkipReason::NotObject, SkipReason::NotObject]);
        assert_eq!(skipped_only(r#"{"ports":{"80/tcp":"80"}}"#), [SkipReason::NotList]);
    }

    #[test]
    fn skip_details_are_bounded_and_quoted_short() {
        let many = vec!["1"; 10_000].join(",");
        let r = ok(&format!(r#"{{"ports":{{"80/tcp":[{many},{{"HostPort":"80"}}]}}}}"#));
        assert_eq!(r.bindings, vec![bind(Proto::Tcp, "", 80)]);
        assert_eq!(r.skipped_count, 10_000);
        assert_eq!(r.skipped.len(), SKIP_DETAILS);

        let long = "7".repeat(5000);
        let r = ok(&format!(r#"{{"ports":{{"{long}/tcp":[{{"HostPort":"80"}}]}}}}"#));
        let line = r.skipped[0].to_string();
        assert!(line.len() < 300 && line.contains("(5004 bytes)"), "{line}");
        // Control characters are escaped, multi-byte ones cut on a boundary.
        let r = ok(&format!(r#"{{"ports":{{"80/\n{}":[{{"HostPort":"80"}}]}}}}"#, "é".repeat(100)));
        let line = r.skipped[0].to_string();
        assert!(line.contains("\\n") && !line.contains('\n'), "{line}");
        // Found by the fuzzer: characters that escape long ("\u{7f}") must
        // not multiply the quoted length.
        let r = ok(&format!(r#"{{"ports":{{"6{}443/tc~":[{{"HostPort":"80"}}]}}}}"#, "\u{7f}".repeat(200)));
        let line = r.skipped[0].to_string();
        assert!(line.chars().count() < 250 && line.contains("(208 bytes)"), "{line}");
    }

    #[test]
    fn protocol_is_case_insensitive() {
        assert_eq!(one(r#"{"ports":{"80/TCP":[{"HostIp":"","HostPort":"80"}]}}"#).proto, Proto::Tcp);
        assert_eq!(one(r#"{"ports":{"80/Udp":[{"HostIp":"","HostPort":"80"}]}}"#).proto, Proto::Udp);
        assert_eq!(one(r#"{"ports":{"80":[{"HostIp":"","HostPort":"80"}]}}"#).proto, Proto::Tcp);
        assert_eq!(
            skipped_only(r#"{"ports":{"80/sctp":[{"HostIp":"","HostPort":"80"}]}}"#),
            [SkipReason::Proto("\"sctp\"".into())]
        );
        assert_eq!(
            skipped_only(r#"{"ports":{"8000-8010/tcp":[{"HostPort":"80"}]}}"#),
            [SkipReason::ContainerPort("\"8000-8010\"".into())]
        );
    }

    #[test]
    fn host_ips() {
        let host = |ip: &str| one(&binding(ip, "8080")).host;
        let ip = |s: &str| Host::Ip(s.parse().unwrap());
        assert_eq!(host(""), Host::All);
        assert_eq!(host("localhost"), ip("127.0.0.1"));
        assert_eq!(host("LocalHost"), ip("127.0.0.1"));
        assert_eq!(host("::1"), ip("::1"));
        assert_eq!(host("[::1]"), ip("::1"));
        assert_eq!(host("0.0.0.0"), ip("0.0.0.0"));
        assert_eq!(host("::"), ip("::"));
        // A missing or null HostIp is the empty one: every address.
        assert_eq!(one(r#"{"ports":{"80/tcp":[{"HostPort":"81"}]}}"#).host, Host::All);
        assert_eq!(one(r#"{"ports":{"80/tcp":[{"HostIp":null,"HostPort":"81"}]}}"#).host, Host::All);
        for bad in ["nope", "1.2.3", "[127.0.0.1]", "::1]", "127.0.0.1:80", "[::1", " ", "fe80::1%eth0"] {
            assert_eq!(skipped_only(&binding(bad, "80")), [SkipReason::HostIp(format!("{bad:?}"))], "{bad}");
        }
    }

    #[test]
    fn invalid_port_strings() {
        for bad in ["", "0", "65536", "-1", "+80", " 80", "80 ", "8o", "1e3", "0x50", "999999", "80/tcp", "80-90"] {
            assert_eq!(skipped_only(&binding("", bad)), [SkipReason::HostPort(format!("{bad:?}"))], "{bad:?}");
        }
        assert_eq!(skipped_only(r#"{"ports":{"80/tcp":[{"HostIp":"","HostPort":-1}]}}"#).len(), 1);
        assert_eq!(skipped_only(r#"{"ports":{"80/tcp":[{"HostIp":"","HostPort":1.5}]}}"#).len(), 1);
        assert_eq!(one(r#"{"ports":{"80/tcp":[{"HostPort":65535}]}}"#).port, 65535);
        assert_eq!(one(r#"{"ports":{"80/tcp":[{"HostPort":"00080"}]}}"#).port, 80);
    }

    #[test]
    fn duplicates_collapse_and_keys_differ_by_ip_and_proto() {
        let r = ok(r#"{"ports":{
                "80/tcp":[{"HostIp":"127.0.0.1","HostPort":"80"},{"HostIp":"localhost","HostPort":"80"},
                          {"HostIp":"::1","HostPort":"80"},{"HostIp":"","HostPort":"80"},{"HostPort":"80"}],
                "80/TCP":[{"HostIp":"127.0.0.1","HostPort":"80"}],
                "80/udp":[{"HostIp":"127.0.0.1","HostPort":"80"}]}}"#);
        assert_eq!(
            r.bindings,
            vec![
                bind(Proto::Tcp, "", 80),
                bind(Proto::Tcp, "127.0.0.1", 80),
                bind(Proto::Tcp, "::1", 80),
                bind(Proto::Udp, "127.0.0.1", 80)
            ]
        );
    }

    #[test]
    fn bindings_display_as_logged() {
        assert_eq!(bind(Proto::Tcp, "", 80).to_string(), "*:80/tcp");
        assert_eq!(bind(Proto::Udp, "::1", 53).to_string(), "[::1]:53/udp");
        assert_eq!(bind(Proto::Tcp, "127.0.0.1", 9000).to_string(), "127.0.0.1:9000/tcp");
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
