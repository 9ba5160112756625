//! Answers from the host's own resolver API (on Windows, dnsapi), so that
//! guests resolve whatever the host resolves: VPN split DNS and name
//! resolution policy (NRPT) rules, the hosts file, the resolver's cache.
//!
//! How this works: [`SystemResolver::resolve`] tries, in turn:
//! 1. the raw API ([`RawApi`], Windows' `DnsQueryRaw`: the guest's message
//!    in, a whole DNS message out) when the OS has it; its answer goes back
//!    with the guest's ID;
//! 2. the per-type API ([`PerTypeApi`], Windows' `DnsQuery_W`: a name and a
//!    type in, a list of records or a status out), for a plain query (one
//!    question, class IN, a name of host-name characters, a type whose
//!    records we can rebuild): [`answer_per_type`] encodes the records into
//!    an answer, keeping their sections and TTLs. A name with records but
//!    none of the asked type answers NOERROR with no records, never
//!    NXDOMAIN (musl's resolver gives up on the name otherwise). APIs that
//!    report "no records of this type" like "no such name" (Wine) are asked
//!    a second time with A, then AAAA: if either shows the name exists, the
//!    answer is NOERROR-no-data;
//! 3. otherwise [`Resolved::Forward`]: the caller forwards the guest's bytes
//!    to the host's DNS servers itself.
//!
//! The OS calls never run on the engine thread: per-type calls block, so
//! they run on tokio's blocking pool, at most [`MAX_OS_QUERIES`] at once
//! (a permit travels with each call and is returned when the OS returns,
//! also after the guest's query timed out); raw calls complete through a
//! callback on an OS thread and hold a permit until then.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, NULL, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::message;

/// OS resolver calls in flight at once (blocking threads, OS requests).
pub const MAX_OS_QUERIES: usize = 32;
/// Most records taken from one OS answer.
pub const MAX_RECORDS: usize = 512;

/// The section a record came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Answer,
    Authority,
    Additional,
}

/// One record as the OS resolver returned it, copied out of OS memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsRecord {
    /// The owner name, as text without the trailing dot.
    pub name: String,
    pub section: Section,
    pub ttl: u32,
    pub data: OsData,
}

/// Record data: the types the per-type API hands back as structures, and
/// everything else as its RDATA bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OsData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    Ns(String),
    Ptr(String),
    Mx {
        preference: u16,
        exchange: String,
    },
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    /// The strings of a TXT record (each becomes one or more
    /// character-strings of at most 255 bytes).
    Txt(Vec<String>),
    Soa {
        mname: String,
        rname: String,
        serial: u32,
        refresh: u32,
        retry: u32,
        expire: u32,
        minimum: u32,
    },
    /// Any other type (CAA among them), as RDATA.
    Raw {
        rtype: u16,
        rdata: Vec<u8>,
    },
}

/// What the per-type API said about one name and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OsAnswer {
    Records(Vec<OsRecord>),
    /// The name exists but has no records of this type (Windows:
    /// `DNS_INFO_NO_RECORDS`, 9501).
    NoData,
    /// No such name (Windows: `DNS_ERROR_RCODE_NAME_ERROR`, 9003). Wine says
    /// this for "no records of this type" too.
    NameError,
    /// The resolver tried and failed (server failure, timeout).
    ServerFailure,
    /// The servers refused.
    Refused,
    /// The API cannot answer this (an unsupported type, records it cannot
    /// hand back, an error that is not about DNS): forward instead. The
    /// number is the OS's status, for logs.
    Unusable(i32),
}

/// A resolver API that takes a name and a type (Windows: `DnsQuery_W`).
/// `query` blocks; it is only ever called on a blocking thread.
pub trait PerTypeApi: Send + Sync + 'static {
    /// `name` has no trailing dot.
    fn query(&self, name: &str, qtype: u16) -> OsAnswer;
}

/// What a raw query ended with.
#[derive(Debug)]
pub enum RawOutcome {
    /// A DNS message (its ID may differ from the query's).
    Message(Vec<u8>),
    /// No message; the OS's status.
    Status(i32),
}

/// Called once with the outcome, on whatever thread the OS chooses.
pub type RawDone = Box<dyn FnOnce(RawOutcome) + Send>;

/// A resolver API that takes a DNS message (Windows: `DnsQueryRaw`).
pub trait RawApi: Send + Sync + 'static {
    /// Starts a query for `query` (a DNS message; `tcp`: the guest asked
    /// over TCP, so the answer need not fit a datagram). `done` is called
    /// exactly once when `Ok` is returned, never when `Err` (the OS's status)
    /// is.
    fn start(&self, query: &[u8], tcp: bool, done: RawDone) -> Result<(), i32>;
}

/// Which API answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Raw,
    PerType,
}

/// The outcome of [`SystemResolver::resolve`].
#[derive(Debug)]
pub enum Resolved {
    Answer(Vec<u8>, Path),
    /// The OS APIs cannot answer this query: forward it.
    Forward,
    /// No room for another OS call ([`MAX_OS_QUERIES`] busy).
    Busy,
}

/// The host's resolver APIs.
pub struct SystemResolver {
    raw: Option<Arc<dyn RawApi>>,
    per_type: Arc<dyn PerTypeApi>,
    slots: Arc<Semaphore>,
}

impl SystemResolver {
    pub fn new(raw: Option<Arc<dyn RawApi>>, per_type: Arc<dyn PerTypeApi>) -> Self {
        SystemResolver { raw, per_type, slots: Arc::new(Semaphore::new(MAX_OS_QUERIES)) }
    }

    /// Whether the raw API is there (for the startup log).
    pub fn has_raw(&self) -> bool {
        self.raw.is_some()
    }

    /// Answers `query` (the guest's bytes, `parsed`) through the OS, or says
    /// why not. The caller bounds the time it waits.
    pub async fn resolve(&self, query: &[u8], parsed: &Message, tcp: bool) -> Resolved {
        if let Some(raw) = &self.raw {
            let Ok(permit) = self.slots.clone().try_acquire_owned() else { return Resolved::Busy };
            if let Some(answer) = raw_query(raw.as_ref(), query, tcp, permit).await
                && let Some(answer) = message::with_id(answer, parsed.metadata.id)
            {
                return Resolved::Answer(answer, Path::Raw);
            }
        }
        let Some((name, qtype)) = per_type_question(parsed) else { return Resolved::Forward };
        let Ok(permit) = self.slots.clone().try_acquire_owned() else { return Resolved::Busy };
        let api = self.per_type.clone();
        let parsed_copy = parsed.clone();
        let job = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            answer_per_type(api.as_ref(), &parsed_copy, &name, qtype)
        });
        match job.await {
            Ok(Some(answer)) => Resolved::Answer(answer, Path::PerType),
            Ok(None) | Err(_) => Resolved::Forward,
        }
    }
}

/// Runs one raw query; `None` when it could not start or gave no message.
async fn raw_query(raw: &dyn RawApi, query: &[u8], tcp: bool, permit: OwnedSemaphorePermit) -> Option<Vec<u8>> {
    let (tx, rx) = oneshot::channel();
    let done: RawDone = Box::new(move |outcome| {
        // The permit is held until the OS is done with the query.
        drop(permit);
        let _ = tx.send(outcome);
    });
    if let Err(status) = raw.start(query, tcp, done) {
        tracing::debug!(status, "DnsQueryRaw refused the query; asking per type");
        return None;
    }
    match rx.await {
        Ok(RawOutcome::Message(m)) if message::id_and_qr(&m).is_some_and(|(_, qr)| qr) => Some(m),
        Ok(RawOutcome::Message(_)) => None,
        Ok(RawOutcome::Status(status)) => {
            tracing::debug!(status, "DnsQueryRaw gave no message; asking per type");
            None
        }
        Err(_) => None,
    }
}

/// Record types the per-type API (Windows' DNS_RECORD) hands back as
/// structures that are not rebuilt here: queries for them are forwarded.
/// Every other type is either rebuilt from its structure (A, NS, CNAME, SOA,
/// PTR, MX, TXT, AAAA, SRV) or comes back as RDATA.
const STRUCTURED_ELSEWHERE: &[u16] = &[
    3, 4, 7, 8, 9, 10, 11, 13, 14, 17, 18, 19, 20, 21, 24, 25, 26, 29, 30, 34, 35, 39, 41, 43, 46, 47, 48, 49, 50, 51,
    52, 64, 65, 249, 250, 0xff01, 0xff02,
];

/// Whether records of `rtype` come from the per-type API as structures
/// that are not rebuilt here.
pub fn structured_elsewhere(rtype: u16) -> bool {
    STRUCTURED_ELSEWHERE.contains(&rtype)
}

/// The name (no trailing dot) and type to ask the per-type API, when the
/// query is one it can answer faithfully: a standard query with one
/// question of class IN for a type that is not a meta type, about a name of
/// host-name characters (others, such as escaped or non-ASCII labels, the
/// API could misread).
pub fn per_type_question(query: &Message) -> Option<(String, u16)> {
    if query.metadata.op_code != OpCode::Query || query.queries.len() != 1 {
        return None;
    }
    let q = &query.queries[0];
    if q.query_class() != DNSClass::IN {
        return None;
    }
    let qtype = u16::from(q.query_type());
    // 0, OPT, and the meta types (IXFR, AXFR, MAILB, MAILA, ANY).
    if qtype == 0 || qtype == 41 || (128..=255).contains(&qtype) || structured_elsewhere(qtype) {
        return None;
    }
    let name = q.name();
    if name.is_root() {
        return None;
    }
    let mut text = String::new();
    for label in name.iter() {
        if label.is_empty() || !label.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_') {
            return None;
        }
        if !text.is_empty() {
            text.push('.');
        }
        text.push_str(std::str::from_utf8(label).ok()?);
    }
    Some((text, qtype))
}

/// The answer to `query` (asking `name`, `qtype`) from the per-type API, or
/// `None` when it cannot answer and the query should be forwarded.
pub fn answer_per_type(api: &dyn PerTypeApi, query: &Message, name: &str, qtype: u16) -> Option<Vec<u8>> {
    let (rcode, records) = match api.query(name, qtype) {
        OsAnswer::Records(records) => (ResponseCode::NoError, records),
        OsAnswer::NoData => (ResponseCode::NoError, Vec::new()),
        OsAnswer::NameError => match second_look(api, name, qtype)? {
            Some(chain) => (ResponseCode::NoError, chain),
            None => (ResponseCode::NXDomain, Vec::new()),
        },
        OsAnswer::ServerFailure => (ResponseCode::ServFail, Vec::new()),
        OsAnswer::Refused => (ResponseCode::Refused, Vec::new()),
        OsAnswer::Unusable(status) => {
            tracing::debug!(name, qtype, status, "the resolver API cannot answer this; forwarding");
            return None;
        }
    };
    let mut reply = message::response_to(query, rcode);
    for r in records.into_iter().take(MAX_RECORDS) {
        let section = r.section;
        let record = to_record(r)?;
        match section {
            Section::Answer => reply.answers.push(record),
            Section::Authority => reply.authorities.push(record),
            Section::Additional => reply.additionals.push(record),
        }
    }
    reply.to_vec().ok()
}

/// After "no such name": does the name exist with an A or AAAA record (or
/// an alias)? `Some(Some(cnames))` if so (the alias records of that answer,
/// which belong in a no-data answer too), `Some(None)` if neither shows it,
/// `None` if the API could not tell (forward the query).
fn second_look(api: &dyn PerTypeApi, name: &str, qtype: u16) -> Option<Option<Vec<OsRecord>>> {
    for other in [u16::from(RecordType::A), u16::from(RecordType::AAAA)] {
        if other == qtype {
            continue;
        }
        match api.query(name, other) {
            OsAnswer::Records(records) => {
                let chain =
                    records.into_iter().filter(|r| matches!(r.data, OsData::Cname(_)) && r.section == Section::Answer);
                return Some(Some(chain.collect()));
            }
            OsAnswer::NoData => return Some(Some(Vec::new())),
            OsAnswer::NameError => {}
            // It cannot tell: NXDOMAIN stands as the first answer said.
            OsAnswer::ServerFailure | OsAnswer::Refused | OsAnswer::Unusable(_) => return Some(None),
        }
    }
    Some(None)
}

/// The RDATA of a record of a type the per-type API does not parse, given
/// the `wDataLength` bytes of its data: newer Windows puts them in a
/// `DNS_UNKNOWN_DATA` (a 32-bit little-endian byte count, then the bytes,
/// padded), older ones may copy the bytes bare. Taken as counted when the
/// count fits and accounts for all but the padding (under 8 bytes) — bare
/// RDATA almost never starts with such a number — else as bare.
pub fn unknown_rdata(data: &[u8]) -> &[u8] {
    if let Some((count, rest)) = data.split_first_chunk::<4>() {
        let count = u32::from_le_bytes(*count) as usize;
        if count <= rest.len() && rest.len() - count < 8 {
            return &rest[..count];
        }
    }
    data
}

/// A raw answer that came over TCP: with or without the 2-byte length
/// prefix (the raw API takes TCP queries prefixed and its documentation
/// does not say about answers), told apart by where the query's `id` sits.
pub fn unframe_tcp_answer(mut answer: Vec<u8>, id: u16) -> Vec<u8> {
    let id = id.to_be_bytes();
    let prefixed = answer.len() >= 2 + message::HEADER_LEN
        && usize::from(u16::from_be_bytes([answer[0], answer[1]])) == answer.len() - 2
        && answer[2..4] == id;
    if prefixed && answer[..2] != id {
        answer.drain(..2);
    }
    answer
}

/// A name from the OS as a DNS name, label by label (no escapes, no IDNA:
/// the bytes are the UTF-8 the OS decoded them from). `None` if it is not a
/// valid name.
fn to_name(text: &str) -> Option<Name> {
    let text = text.strip_suffix('.').unwrap_or(text);
    if text.is_empty() {
        return Some(Name::root());
    }
    // 255 bytes in wire form: the labels, a length byte each, the root.
    if text.len() + 2 > 255 {
        return None;
    }
    let labels: Vec<&[u8]> = text.split('.').map(str::as_bytes).collect();
    if labels.iter().any(|l| l.is_empty() || l.len() > 63) {
        return None;
    }
    Name::from_labels(labels).ok()
}

fn to_record(r: OsRecord) -> Option<Record> {
    let rdata = match r.data {
        OsData::A(ip) => RData::A(A(ip)),
        OsData::Aaaa(ip) => RData::AAAA(AAAA(ip)),
        OsData::Cname(n) => RData::CNAME(CNAME(to_name(&n)?)),
        OsData::Ns(n) => RData::NS(NS(to_name(&n)?)),
        OsData::Ptr(n) => RData::PTR(PTR(to_name(&n)?)),
        OsData::Mx { preference, exchange } => RData::MX(MX::new(preference, to_name(&exchange)?)),
        OsData::Srv { priority, weight, port, target } => {
            RData::SRV(SRV::new(priority, weight, port, to_name(&target)?))
        }
        OsData::Txt(strings) => {
            // A character-string holds at most 255 bytes: longer strings
            // (the OS joins nothing, but be safe) are cut into several.
            let chunks: Vec<&[u8]> = strings.iter().flat_map(|s| s.as_bytes().chunks(255)).collect();
            if chunks.is_empty() {
                RData::TXT(TXT::from_bytes(vec![&[][..]]))
            } else {
                RData::TXT(TXT::from_bytes(chunks))
            }
        }
        OsData::Soa { mname, rname, serial, refresh, retry, expire, minimum } => RData::SOA(SOA::new(
            to_name(&mname)?,
            to_name(&rname)?,
            serial,
            refresh as i32,
            retry as i32,
            expire as i32,
            minimum,
        )),
        OsData::Raw { rtype, rdata } => {
            let code = RecordType::from(rtype);
            // Types with names inside them are never raw here; OPT and the
            // meta types never records.
            if rtype == 41 || rtype == 0 {
                return None;
            }
            RData::Unknown { code, rdata: if rdata.is_empty() { NULL::new() } else { NULL::with(rdata) } }
        }
    };
    Some(Record::from_rdata(to_name(&r.name)?, r.ttl, rdata))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, MessageType, Query};
    use std::collections::HashMap;
    use std::str::FromStr;
    use std::sync::Mutex;

    /// The per-type API, mocked: answers from a table keyed by (name,
    /// type); anything else is `missing` (NameError for Windows, and for
    /// Wine which says so for no-data too). Counts the calls.
    struct Mock {
        table: HashMap<(String, u16), OsAnswer>,
        missing: OsAnswer,
        calls: Mutex<Vec<(String, u16)>>,
    }

    impl PerTypeApi for Mock {
        fn query(&self, name: &str, qtype: u16) -> OsAnswer {
            self.calls.lock().unwrap().push((name.to_string(), qtype));
            self.table.get(&(name.to_string(), qtype)).cloned().unwrap_or_else(|| self.missing.clone())
        }
    }

    fn rec(name: &str, ttl: u32, data: OsData) -> OsRecord {
        OsRecord { name: name.into(), section: Section::Answer, ttl, data }
    }

    const A_T: u16 = 1;
    const AAAA_T: u16 = 28;

    /// A host `www.corp.test` (A only, TTL 300, via an alias), as Wine
    /// would report it (9003 for everything else).
    fn wine_like() -> Mock {
        let mut table = HashMap::new();
        table.insert(
            ("alias.corp.test".to_string(), A_T),
            OsAnswer::Records(vec![
                rec("alias.corp.test", 60, OsData::Cname("www.corp.test".into())),
                rec("www.corp.test", 300, OsData::A(Ipv4Addr::new(10, 1, 2, 3))),
            ]),
        );
        table.insert(
            ("www.corp.test".to_string(), A_T),
            OsAnswer::Records(vec![rec("www.corp.test", 300, OsData::A(Ipv4Addr::new(10, 1, 2, 3)))]),
        );
        Mock { table, missing: OsAnswer::NameError, calls: Mutex::new(Vec::new()) }
    }

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::new(0x5151, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
        m
    }

    fn ask(api: &dyn PerTypeApi, name: &str, qtype: RecordType) -> Option<Message> {
        let q = query(name, qtype);
        let (n, t) = per_type_question(&q).expect("a per-type question");
        answer_per_type(api, &q, &n, t).map(|b| Message::from_vec(&b).unwrap())
    }

    #[test]
    fn records_come_back_with_ttls_and_the_guests_header() {
        let api = wine_like();
        let r = ask(&api, "alias.corp.test.", RecordType::A).unwrap();
        assert_eq!((r.metadata.id, r.metadata.response_code), (0x5151, ResponseCode::NoError));
        assert!(r.metadata.recursion_desired && r.metadata.recursion_available && !r.metadata.authoritative);
        assert_eq!(r.queries, query("alias.corp.test.", RecordType::A).queries);
        assert_eq!(r.edns.map(|e| e.max_payload()), Some(1232));
        let got: Vec<String> = r.answers.iter().map(|a| format!("{} {} {}", a.name, a.ttl, a.data)).collect();
        assert_eq!(got, ["alias.corp.test. 60 www.corp.test.", "www.corp.test. 300 10.1.2.3"]);
    }

    #[test]
    fn nodata_is_never_nxdomain() {
        // Wine: 9003 for the AAAA of a name that has an A record. The second
        // look (A) shows the name exists: NOERROR, no records.
        let api = wine_like();
        let r = ask(&api, "www.corp.test.", RecordType::AAAA).unwrap();
        assert_eq!((r.metadata.response_code, r.answers.len()), (ResponseCode::NoError, 0));
        assert_eq!(*api.calls.lock().unwrap(), [("www.corp.test".into(), AAAA_T), ("www.corp.test".into(), A_T)]);
        // Through an alias: the alias stays in the no-data answer.
        let r = ask(&api, "alias.corp.test.", RecordType::TXT).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::CNAME(CNAME(Name::from_str("www.corp.test.").unwrap())));
        // A missing name: both looks fail, NXDOMAIN.
        let api = wine_like();
        let r = ask(&api, "nothing.corp.test.", RecordType::AAAA).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(api.calls.lock().unwrap().len(), 2, "AAAA, then A");
        let api = wine_like();
        let r = ask(&api, "nothing.corp.test.", RecordType::MX).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(api.calls.lock().unwrap().len(), 3, "MX, then A and AAAA");
        // Windows proper says "no records" (9501) itself.
        let mut api = wine_like();
        api.table.insert(("www.corp.test".into(), AAAA_T), OsAnswer::NoData);
        let r = ask(&api, "www.corp.test.", RecordType::AAAA).unwrap();
        assert_eq!((r.metadata.response_code, r.answers.len()), (ResponseCode::NoError, 0));
        assert_eq!(api.calls.lock().unwrap().len(), 1);
    }

    #[test]
    fn failures_map_to_rcodes_or_forwarding() {
        let mut api = wine_like();
        api.missing = OsAnswer::ServerFailure;
        assert_eq!(ask(&api, "x.test.", RecordType::A).unwrap().metadata.response_code, ResponseCode::ServFail);
        api.missing = OsAnswer::Refused;
        assert_eq!(ask(&api, "x.test.", RecordType::A).unwrap().metadata.response_code, ResponseCode::Refused);
        api.missing = OsAnswer::Unusable(9004);
        assert!(ask(&api, "x.test.", RecordType::CAA).is_none(), "forwarded");
        // A second look that cannot tell leaves NXDOMAIN.
        let mut api = wine_like();
        api.table.insert(("gone.test".into(), A_T), OsAnswer::ServerFailure);
        assert_eq!(ask(&api, "gone.test.", RecordType::AAAA).unwrap().metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn every_record_type_encodes() {
        let n = "h.corp.test";
        let mut table = HashMap::new();
        let caa = vec![0, 5, b'i', b's', b's', b'u', b'e', b'c', b'a', b'.', b't'];
        let records = vec![
            rec(n, 1, OsData::Aaaa("fd00::9".parse().unwrap())),
            rec(n, 2, OsData::Ns("ns1.corp.test".into())),
            rec(n, 3, OsData::Ptr("p.corp.test.".into())),
            rec(n, 4, OsData::Mx { preference: 10, exchange: "mail.corp.test".into() }),
            rec(n, 5, OsData::Srv { priority: 1, weight: 5, port: 8080, target: "h.corp.test".into() }),
            rec(n, 6, OsData::Txt(vec!["a".repeat(300), "b".into()])),
            rec(
                n,
                7,
                OsData::Soa {
                    mname: "ns1.corp.test".into(),
                    rname: "hostmaster.corp.test".into(),
                    serial: 2024,
                    refresh: 3600,
                    retry: 600,
                    expire: 86400,
                    minimum: 30,
                },
            ),
            rec(n, 8, OsData::Raw { rtype: 257, rdata: caa.clone() }),
            rec(n, 9, OsData::Raw { rtype: 65400, rdata: vec![0xde, 0xad] }),
            OsRecord {
                name: "ns1.corp.test".into(),
                section: Section::Additional,
                ttl: 10,
                data: OsData::A(Ipv4Addr::new(10, 0, 0, 53)),
            },
            OsRecord {
                name: "corp.test".into(),
                section: Section::Authority,
                ttl: 11,
                data: OsData::Ns("ns1.corp.test".into()),
            },
        ];
        table.insert((n.to_string(), 65400), OsAnswer::Records(records));
        let api = Mock { table, missing: OsAnswer::NameError, calls: Mutex::new(Vec::new()) };
        let r = ask(&api, "h.corp.test.", RecordType::Unknown(65400)).unwrap();
        let text: Vec<String> =
            r.answers[..8].iter().map(|a| format!("{} {} {}", a.ttl, a.record_type(), a.data)).collect();
        assert_eq!(
            text,
            [
                "1 AAAA fd00::9",
                "2 NS ns1.corp.test.",
                "3 PTR p.corp.test.",
                "4 MX 10 mail.corp.test.",
                "5 SRV 1 5 8080 h.corp.test.",
                &format!("6 TXT {}{}b", "a".repeat(255), "a".repeat(45)),
                "7 SOA ns1.corp.test. hostmaster.corp.test. 2024 3600 600 86400 30",
                "8 CAA 0 issue \"ca.t\"",
            ]
            .map(|s| s.to_string())
        );
        assert_eq!(r.answers.len(), 9);
        assert_eq!(
            (r.answers[8].ttl, &r.answers[8].data),
            (9, &RData::Unknown { code: RecordType::Unknown(65400), rdata: NULL::with(vec![0xde, 0xad]) })
        );
        assert_eq!(r.answers[5].data, RData::TXT(TXT::from_bytes(vec![&[b'a'; 255][..], &[b'a'; 45][..], b"b"])));
        assert_eq!(r.additionals.len(), 1);
        assert_eq!(r.authorities.len(), 1);
    }

    #[test]
    fn raw_data_and_tcp_framing() {
        // Counted (DNS_UNKNOWN_DATA), padded to 8 bytes.
        assert_eq!(unknown_rdata(&[2, 0, 0, 0, 0xde, 0xad, 0, 0]), [0xde, 0xad]);
        assert_eq!(unknown_rdata(&[0, 0, 0, 0]), [0u8; 0]);
        // Bare CAA RDATA: its first bytes read as a huge count.
        let caa = [0, 5, b'i', b's', b's', b'u', b'e', b'c', b'a'];
        assert_eq!(unknown_rdata(&caa), caa);
        assert_eq!(unknown_rdata(&[1, 2]), [1, 2]);
        // A count that leaves 8 or more bytes over is not a count.
        assert_eq!(unknown_rdata(&[1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0]).len(), 13);

        let q = query("a.test.", RecordType::A);
        let bare = message::response_to(&q, ResponseCode::NoError).to_vec().unwrap();
        assert_eq!(unframe_tcp_answer(bare.clone(), 0x5151), bare);
        let mut framed = (bare.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&bare);
        assert_eq!(unframe_tcp_answer(framed, 0x5151), bare);
        assert_eq!(unframe_tcp_answer(vec![1, 2, 3], 7), [1, 2, 3]);
    }

    #[test]
    fn bad_names_are_forwarded() {
        // Names the OS could misread are not asked.
        let odd: [&[&[u8]]; 4] = [&[b"a.b", b"test"], &[b"sp ace", b"test"], &[], &["caf\u{e9}".as_bytes(), b"test"]];
        for labels in odd {
            let mut q = query("a.test.", RecordType::A);
            q.queries[0].set_name(Name::from_labels(labels.iter().copied()).unwrap());
            assert!(per_type_question(&q).is_none(), "{labels:?}");
        }
        for t in [RecordType::ANY, RecordType::AXFR, RecordType::HTTPS, RecordType::DS, RecordType::OPT] {
            assert!(per_type_question(&query("a.test.", t)).is_none(), "{t}");
        }
        let mut q = query("a.test.", RecordType::A);
        q.queries[0].set_query_class(DNSClass::CH);
        assert!(per_type_question(&q).is_none());
        assert_eq!(
            per_type_question(&query("Mixed-Case_x.Test.", RecordType::A)),
            Some(("Mixed-Case_x.Test".into(), 1))
        );
        // Records the OS returns with names that are not names: forwarded.
        let mut table = HashMap::new();
        table.insert(
            ("a.test".to_string(), A_T),
            OsAnswer::Records(vec![rec("a.test", 1, OsData::Cname(format!("{}.test", "x".repeat(64))))]),
        );
        let api = Mock { table, missing: OsAnswer::NameError, calls: Mutex::new(Vec::new()) };
        assert!(ask(&api, "a.test.", RecordType::A).is_none());
    }

    /// A raw API that answers at once from another thread, or refuses.
    struct RawMock {
        answer: Option<Vec<u8>>,
    }

    impl RawApi for RawMock {
        fn start(&self, query: &[u8], _tcp: bool, done: RawDone) -> Result<(), i32> {
            let Some(answer) = self.answer.clone() else { return Err(87) };
            let len = query.len();
            std::thread::spawn(move || done(if len > 0 { RawOutcome::Message(answer) } else { RawOutcome::Status(1) }));
            Ok(())
        }
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn raw_first_then_per_type_then_forward() {
        let q = query("www.corp.test.", RecordType::A);
        let bytes = q.to_vec().unwrap();
        // The raw API's answer, with the guest's ID put back.
        let mut upstream = message::response_to(&q, ResponseCode::NoError);
        upstream.metadata.id = 7;
        upstream.add_answer(Record::from_rdata(
            Name::from_str("www.corp.test.").unwrap(),
            9,
            RData::A(A::new(1, 2, 3, 4)),
        ));
        let raw = Arc::new(RawMock { answer: Some(upstream.to_vec().unwrap()) });
        let sys = SystemResolver::new(Some(raw), Arc::new(wine_like()));
        let Resolved::Answer(a, Path::Raw) = run(sys.resolve(&bytes, &q, false)) else { panic!("raw") };
        let a = Message::from_vec(&a).unwrap();
        assert_eq!((a.metadata.id, a.answers.len()), (0x5151, 1));
        // The raw API refuses: per type.
        let sys = SystemResolver::new(Some(Arc::new(RawMock { answer: None })), Arc::new(wine_like()));
        let Resolved::Answer(a, Path::PerType) = run(sys.resolve(&bytes, &q, false)) else { panic!("per type") };
        assert_eq!(Message::from_vec(&a).unwrap().answers[0].ttl, 300);
        // No raw API, a query per type cannot express: forward.
        let sys = SystemResolver::new(None, Arc::new(wine_like()));
        let any = query("www.corp.test.", RecordType::ANY);
        assert!(matches!(run(sys.resolve(&any.to_vec().unwrap(), &any, false)), Resolved::Forward));
        // Every slot taken: busy, not a pile of threads.
        let sys = SystemResolver::new(None, Arc::new(wine_like()));
        let _held: Vec<_> = (0..MAX_OS_QUERIES).map(|_| sys.slots.clone().try_acquire_owned().unwrap()).collect();
        assert!(matches!(run(sys.resolve(&bytes, &q, false)), Resolved::Busy));
    }
}
