//! The Windows resolver and DNS settings, through dnsapi and iphlpapi: the
//! DNS server's only `unsafe` code.
//!
//! How this works: [`system_resolver`] pairs `DnsQuery_W` (every Windows,
//! and Wine) with `DnsQueryRaw` when dnsapi.dll exports it (Windows 11 and
//! later; looked up at run time, so the program still starts where it is
//! missing). `DnsQuery_W` blocks and returns a linked list of `DNS_RECORDW`
//! in memory the OS allocates: every record is copied into an
//! [`OsRecord`] (names and strings read with a bound, flexible arrays
//! checked against the record's data length) before the list is freed, and
//! anything that does not read cleanly makes the whole answer
//! [`OsAnswer::Unusable`], so the query is forwarded rather than answered
//! wrongly. `DnsQueryRaw` completes on an OS thread through a callback; its
//! context (which also holds the cancel handle the OS writes, and which
//! must stay put until the callback) is reference-counted, one count for
//! the caller during the call and one for the callback, so neither can
//! outlive the other's use. Queries skip multicast name resolution (LLMNR,
//! mDNS) and NetBIOS: a guest must not make the host ask its LAN, where
//! anyone may answer. [`adapters`] and [`resolver_search_list`] read the
//! DNS settings for [`super::hostconf`].

#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ptr::{null, null_mut};
use std::sync::{Arc, Mutex};

use windows_sys::Win32::Foundation::{
    DNS_ERROR_RCODE_NAME_ERROR, DNS_ERROR_RCODE_REFUSED, DNS_ERROR_RCODE_SERVER_FAILURE, DNS_INFO_NO_RECORDS,
    DNS_REQUEST_PENDING, ERROR_BUFFER_OVERFLOW, ERROR_MORE_DATA, ERROR_TIMEOUT,
};
use windows_sys::Win32::NetworkManagement::Dns::{
    DNS_PROTOCOL_TCP, DNS_PROTOCOL_UDP, DNS_QUERY_NO_MULTICAST, DNS_QUERY_NO_NETBT, DNS_QUERY_RAW_CANCEL,
    DNS_QUERY_RAW_OPTION_BEST_EFFORT_PARSE, DNS_QUERY_RAW_REQUEST, DNS_QUERY_RAW_REQUEST_VERSION1,
    DNS_QUERY_RAW_RESULT, DNS_QUERY_RAW_RESULTS_VERSION1, DNS_QUERY_TREAT_AS_FQDN, DNS_RECORDA, DNS_RECORDW,
    DNS_TXT_DATAW, DnsConfigSearchList, DnsFree, DnsFreeRecordList, DnsQuery_W, DnsQueryConfig,
};
use windows_sys::Win32::NetworkManagement::IpHelper::{
    GAA_FLAG_SKIP_ANYCAST, GAA_FLAG_SKIP_FRIENDLY_NAME, GAA_FLAG_SKIP_MULTICAST, GAA_FLAG_SKIP_UNICAST,
    GetAdaptersAddresses, IP_ADAPTER_ADDRESSES_LH,
};
use windows_sys::Win32::NetworkManagement::Ndis::IfOperStatusUp;
use windows_sys::Win32::Networking::WinSock::{
    AF_INET, AF_INET6, AF_UNSPEC, SOCKADDR_IN, SOCKADDR_IN6, SOCKET_ADDRESS,
};
use windows_sys::Win32::System::LibraryLoader::{GetProcAddress, LOAD_LIBRARY_SEARCH_SYSTEM32, LoadLibraryExW};

use super::hostconf::{AdapterDns, parse_multi_sz};
use super::system::{
    self, OsAnswer, OsData, OsRecord, PerTypeApi, RawApi, RawDone, RawOutcome, Section, SystemResolver,
};

/// Options for every query: the name as given (the guest applied its own
/// search list), no LLMNR/mDNS, no NetBIOS. The cache, the hosts file and
/// the name resolution policy still apply.
const QUERY_OPTIONS: u32 = DNS_QUERY_TREAT_AS_FQDN | DNS_QUERY_NO_MULTICAST | DNS_QUERY_NO_NETBT;
/// Longest string read from OS memory, in UTF-16 units (a DNS name has at
/// most 253 characters; TXT strings at most 255 bytes).
const MAX_STRING: usize = 1024;
/// Most adapters, servers and suffixes walked in the adapters' lists.
const MAX_LIST: usize = 256;

/// The Windows resolver: `DnsQueryRaw` when the OS has it, `DnsQuery_W`.
pub fn system_resolver() -> SystemResolver {
    let raw = RawFns::load().map(|f| Arc::new(f) as Arc<dyn RawApi>);
    SystemResolver::new(raw, Arc::new(DnsQueryW))
}

/// `DnsQuery_W`, per name and type.
struct DnsQueryW;

impl PerTypeApi for DnsQueryW {
    fn query(&self, name: &str, qtype: u16) -> OsAnswer {
        let wide: Vec<u16> = name.encode_utf16().chain([0]).collect();
        let mut first: *mut DNS_RECORDA = null_mut();
        // SAFETY: `wide` is a NUL-terminated UTF-16 string that lives
        // through the call; `first` is a valid place for the result list;
        // the extra and reserved pointers may be null.
        let status = unsafe { DnsQuery_W(wide.as_ptr(), qtype, QUERY_OPTIONS, null_mut(), &mut first, null_mut()) };
        // Freed on every path below, once the records are copied.
        let list = RecordList(first.cast::<DNS_RECORDW>());
        match status as i32 {
            0 => match list.copy() {
                Some(records) if records.is_empty() => OsAnswer::NoData,
                Some(records) => OsAnswer::Records(records),
                None => OsAnswer::Unusable(0),
            },
            DNS_INFO_NO_RECORDS => OsAnswer::NoData,
            s if s == DNS_ERROR_RCODE_NAME_ERROR as i32 => OsAnswer::NameError,
            s if s == DNS_ERROR_RCODE_SERVER_FAILURE as i32 || s == ERROR_TIMEOUT as i32 => OsAnswer::ServerFailure,
            s if s == DNS_ERROR_RCODE_REFUSED as i32 => OsAnswer::Refused,
            // Format errors, "not implemented" (Wine says so for types it
            // cannot parse), no servers, bad parameters: not an answer.
            s => OsAnswer::Unusable(s),
        }
    }
}

/// A record list from `DnsQuery_W`, freed on drop.
struct RecordList(*mut DNS_RECORDW);

impl Drop for RecordList {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the list came from DnsQuery_W and is freed once, here.
            unsafe { DnsFree(self.0.cast::<c_void>(), DnsFreeRecordList) };
        }
    }
}

impl RecordList {
    /// Copies the records out; `None` if one does not read cleanly.
    fn copy(&self) -> Option<Vec<OsRecord>> {
        let mut out = Vec::new();
        let mut p = self.0.cast_const();
        while !p.is_null() {
            if out.len() == system::MAX_RECORDS {
                break;
            }
            // SAFETY: `p` is the list's head or a `pNext` of a record in it;
            // the list stays allocated until `self` drops.
            if let Some(record) = unsafe { copy_record(p) }? {
                out.push(record);
            }
            // SAFETY: as above.
            p = unsafe { (*p).pNext };
        }
        Some(out)
    }
}

/// One record as an [`OsRecord`]: `Some(None)` for one to leave out (the
/// question section), `None` when it does not read cleanly.
///
/// # Safety
/// `p` must point to a record of a list returned by `DnsQuery_W` (or
/// another dnsapi call returning `DNS_RECORDW`), still allocated. Data
/// beyond the structure (flexible arrays, RDATA) is reached through `p`
/// itself, whose allocation holds it.
unsafe fn copy_record(p: *const DNS_RECORDW) -> Option<Option<OsRecord>> {
    // SAFETY: the caller says `p` points to a live record.
    let r = unsafe { &*p };
    // SAFETY: Flags is a union of a u32 and bit fields over it.
    let section = match unsafe { r.Flags.DW } & 0x3 {
        1 => Section::Answer,
        2 => Section::Authority,
        3 => Section::Additional,
        _ => return Some(None),
    };
    // SAFETY: pName is null or a NUL-terminated string of the record.
    let name = unsafe { wide(r.pName) }?;
    // SAFETY: the OS fills `Data` with the member that belongs to `wType`,
    // which is the one each arm reads; the strings it points to belong to
    // the record; the raw arm reads wDataLength bytes, which the record's
    // allocation holds, through `p`.
    let data = unsafe {
        match r.wType {
            1 => OsData::A(Ipv4Addr::from(r.Data.A.IpAddress.to_ne_bytes())),
            28 => OsData::Aaaa(Ipv6Addr::from(r.Data.AAAA.Ip6Address.IP6Byte)),
            2 => OsData::Ns(wide(r.Data.NS.pNameHost)?),
            5 => OsData::Cname(wide(r.Data.CNAME.pNameHost)?),
            12 => OsData::Ptr(wide(r.Data.PTR.pNameHost)?),
            15 => OsData::Mx { preference: r.Data.MX.wPreference, exchange: wide(r.Data.MX.pNameExchange)? },
            33 => OsData::Srv {
                priority: r.Data.SRV.wPriority,
                weight: r.Data.SRV.wWeight,
                port: r.Data.SRV.wPort,
                target: wide(r.Data.SRV.pNameTarget)?,
            },
            6 => OsData::Soa {
                mname: wide(r.Data.SOA.pNamePrimaryServer)?,
                rname: wide(r.Data.SOA.pNameAdministrator)?,
                serial: r.Data.SOA.dwSerialNo,
                refresh: r.Data.SOA.dwRefresh,
                retry: r.Data.SOA.dwRetry,
                expire: r.Data.SOA.dwExpire,
                minimum: r.Data.SOA.dwDefaultTtl,
            },
            16 => OsData::Txt(txt_strings(p)?),
            t if system::structured_elsewhere(t) => return None,
            t => {
                // The record's allocation holds wDataLength bytes of data.
                let data = std::slice::from_raw_parts((&raw const (*p).Data).cast::<u8>(), usize::from(r.wDataLength));
                OsData::Raw { rtype: t, rdata: system::unknown_rdata(data).to_vec() }
            }
        }
    };
    Some(Some(OsRecord { name, section, ttl: r.dwTtl, data }))
}

/// The strings of a TXT record, its count checked against its data length.
///
/// # Safety
/// As [`copy_record`], for a record of type TXT.
unsafe fn txt_strings(p: *const DNS_RECORDW) -> Option<Vec<String>> {
    // SAFETY: the caller says `p` is a live TXT record, whose data is a
    // DNS_TXT_DATAW.
    let (count, data_len) = unsafe { ((*p).Data.TXT.dwStringCount as usize, usize::from((*p).wDataLength)) };
    let array_at = std::mem::offset_of!(DNS_TXT_DATAW, pStringArray);
    let needed = count.checked_mul(size_of::<*mut u16>())?.checked_add(array_at)?;
    if needed > data_len {
        return None;
    }
    // SAFETY: a place projection through the raw pointer (no reference to
    // the one-element array, so the pointer may reach the whole array).
    let first = unsafe { (&raw const (*p).Data.TXT.pStringArray).cast::<*mut u16>() };
    // SAFETY: the data holds `count` pointers from `first` on (checked
    // against wDataLength above), each a string of the record.
    (0..count).map(|i| unsafe { wide(*first.add(i)) }).collect()
}

/// A NUL-terminated UTF-16 string from OS memory; `None` if null, longer
/// than [`MAX_STRING`] or not valid UTF-16.
///
/// # Safety
/// `p` must be null or point to a NUL-terminated UTF-16 string (reading
/// stops at the NUL or after [`MAX_STRING`] units).
unsafe fn wide(p: *const u16) -> Option<String> {
    if p.is_null() {
        return None;
    }
    let mut len = 0;
    // SAFETY: the string is NUL-terminated; at most MAX_STRING units are read.
    while unsafe { *p.add(len) } != 0 {
        len += 1;
        if len == MAX_STRING {
            return None;
        }
    }
    // SAFETY: `len` units before the NUL were just read.
    String::from_utf16(unsafe { std::slice::from_raw_parts(p, len) }).ok()
}

type DnsQueryRawFn = unsafe extern "system" fn(*const DNS_QUERY_RAW_REQUEST, *mut DNS_QUERY_RAW_CANCEL) -> i32;
type DnsQueryRawResultFreeFn = unsafe extern "system" fn(*const DNS_QUERY_RAW_RESULT);

/// `DnsQueryRaw` and `DnsQueryRawResultFree`, found at run time.
struct RawFns {
    query: DnsQueryRawFn,
    free: DnsQueryRawResultFreeFn,
}

impl RawFns {
    fn load() -> Option<RawFns> {
        let dll: Vec<u16> = "dnsapi.dll".encode_utf16().chain([0]).collect();
        // SAFETY: a NUL-terminated name; loading from System32 only. The
        // module stays loaded for the life of the process (dnsapi is
        // already loaded for DnsQuery_W; this only adds a reference).
        let module = unsafe { LoadLibraryExW(dll.as_ptr(), null_mut(), LOAD_LIBRARY_SEARCH_SYSTEM32) };
        if module.is_null() {
            return None;
        }
        // SAFETY: a valid module handle and NUL-terminated names.
        let query = unsafe { GetProcAddress(module, c"DnsQueryRaw".as_ptr().cast()) }?;
        // SAFETY: as above.
        let free = unsafe { GetProcAddress(module, c"DnsQueryRawResultFree".as_ptr().cast()) }?;
        // SAFETY: these exports have exactly these signatures (windns.h).
        unsafe {
            Some(RawFns {
                query: std::mem::transmute::<unsafe extern "system" fn() -> isize, DnsQueryRawFn>(query),
                free: std::mem::transmute::<unsafe extern "system" fn() -> isize, DnsQueryRawResultFreeFn>(free),
            })
        }
    }
}

/// What one raw query's callback needs; shared by the caller (during the
/// call) and the callback.
struct RawContext {
    done: Mutex<Option<RawDone>>,
    /// Filled by the OS during `DnsQueryRaw`; must not move until the
    /// callback (the context is heap-allocated and kept alive until then).
    cancel: UnsafeCell<DNS_QUERY_RAW_CANCEL>,
    free: DnsQueryRawResultFreeFn,
    tcp: bool,
    id: u16,
}

// SAFETY: `cancel` is written only by the OS during the DnsQueryRaw call
// and never read by us; everything else is Send + Sync or immutable.
unsafe impl Sync for RawContext {}
// SAFETY: as above; the function pointer and plain data may move threads.
unsafe impl Send for RawContext {}

impl RawApi for RawFns {
    fn start(&self, query: &[u8], tcp: bool, done: RawDone) -> Result<(), i32> {
        let id = query.get(..2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
        // Over TCP the raw API takes the message with its 2-byte length.
        let mut bytes = Vec::with_capacity(query.len() + 2);
        if tcp {
            bytes.extend_from_slice(&u16::try_from(query.len()).map_err(|_| -1)?.to_be_bytes());
        }
        bytes.extend_from_slice(query);
        let ctx = Arc::new(RawContext {
            done: Mutex::new(Some(done)),
            cancel: UnsafeCell::new(DNS_QUERY_RAW_CANCEL::default()),
            free: self.free,
            tcp,
            id,
        });
        let for_callback = Arc::into_raw(ctx.clone());
        let request = DNS_QUERY_RAW_REQUEST {
            version: DNS_QUERY_RAW_REQUEST_VERSION1,
            resultsVersion: DNS_QUERY_RAW_RESULTS_VERSION1,
            dnsQueryRawSize: bytes.len() as u32,
            dnsQueryRaw: bytes.as_mut_ptr(),
            dnsQueryName: null_mut(),
            dnsQueryType: 0,
            queryOptions: u64::from(QUERY_OPTIONS),
            interfaceIndex: 0,
            queryCompletionCallback: Some(raw_done),
            queryContext: for_callback.cast_mut().cast::<c_void>(),
            queryRawOptions: u64::from(DNS_QUERY_RAW_OPTION_BEST_EFFORT_PARSE),
            customServersSize: 0,
            customServers: null_mut(),
            protocol: if tcp { DNS_PROTOCOL_TCP } else { DNS_PROTOCOL_UDP },
            ..Default::default()
        };
        // SAFETY: the request and the query bytes live through the call
        // (the OS copies the query); the cancel handle lives in the shared
        // context, which the callback's reference keeps in place until the
        // callback has run.
        let status = unsafe { (self.query)(&request, ctx.cancel.get()) };
        if status == DNS_REQUEST_PENDING {
            return Ok(());
        }
        // Not pending: the callback will not run; its reference is ours.
        // SAFETY: `for_callback` came from Arc::into_raw above and was not
        // handed on.
        drop(unsafe { Arc::from_raw(for_callback) });
        Err(status)
    }
}

/// The raw API's completion callback.
///
/// # Safety
/// Called by the OS once per query that `DnsQueryRaw` reported pending,
/// with the context pointer given to it and the query's results.
unsafe extern "system" fn raw_done(context: *const c_void, results: *const DNS_QUERY_RAW_RESULT) {
    if context.is_null() {
        return;
    }
    // SAFETY: the pointer is the callback's reference from Arc::into_raw.
    let ctx = unsafe { Arc::from_raw(context.cast::<RawContext>()) };
    let outcome = if results.is_null() {
        RawOutcome::Status(-1)
    } else {
        // SAFETY: non-null results stay valid until freed below.
        let r = unsafe { &*results };
        let message = (!r.queryRawResponse.is_null() && r.queryRawResponseSize > 0).then(|| {
            // SAFETY: the OS says the buffer holds queryRawResponseSize bytes.
            unsafe { std::slice::from_raw_parts(r.queryRawResponse, r.queryRawResponseSize as usize) }.to_vec()
        });
        let status = r.queryStatus;
        // SAFETY: the results came with this callback and are freed once,
        // after the copy.
        unsafe { (ctx.free)(results) };
        match message {
            Some(m) if ctx.tcp => RawOutcome::Message(system::unframe_tcp_answer(m, ctx.id)),
            Some(m) => RawOutcome::Message(m),
            None => RawOutcome::Status(status),
        }
    };
    let done = ctx.done.lock().ok().and_then(|mut d| d.take());
    if let Some(done) = done {
        done(outcome);
    }
}

/// The network adapters' DNS settings (`GetAdaptersAddresses`); empty on
/// failure.
pub fn adapters() -> Vec<AdapterDns> {
    let flags = GAA_FLAG_SKIP_UNICAST | GAA_FLAG_SKIP_ANYCAST | GAA_FLAG_SKIP_MULTICAST | GAA_FLAG_SKIP_FRIENDLY_NAME;
    let mut size: u32 = 16 * 1024;
    // The list can grow between the size query and the call: a few tries.
    for _ in 0..4 {
        // u64s, so the buffer is aligned for the structures.
        let mut buf = vec![0u64; (size as usize).div_ceil(8)];
        // SAFETY: `buf` has `size` writable bytes, 8-aligned; `size` is a
        // valid in/out length.
        let rc =
            unsafe { GetAdaptersAddresses(u32::from(AF_UNSPEC), flags, null(), buf.as_mut_ptr().cast(), &mut size) };
        match rc {
            0 => {
                // SAFETY: on success the buffer holds the adapters' list.
                return unsafe { walk_adapters(buf.as_ptr().cast()) };
            }
            ERROR_BUFFER_OVERFLOW if size as usize <= 4 << 20 => continue,
            _ => return Vec::new(),
        }
    }
    Vec::new()
}

/// # Safety
/// `first` must be the head of a list filled by GetAdaptersAddresses, whose
/// buffer outlives the call.
unsafe fn walk_adapters(first: *const IP_ADAPTER_ADDRESSES_LH) -> Vec<AdapterDns> {
    let mut out = Vec::new();
    let mut a = first;
    while !a.is_null() && out.len() < MAX_LIST {
        // SAFETY: `a` is the head or a `Next` of the list.
        let ad = unsafe { &*a };
        let mut servers = Vec::new();
        let mut s = ad.FirstDnsServerAddress;
        while !s.is_null() && servers.len() < MAX_LIST {
            // SAFETY: an element of the adapter's server list.
            let server = unsafe { &*s };
            // SAFETY: the address points into the same buffer.
            if let Some(addr) = unsafe { socket_address(&server.Address) } {
                servers.push(addr);
            }
            s = server.Next;
        }
        let mut suffixes = Vec::new();
        let mut x = ad.FirstDnsSuffix;
        while !x.is_null() && suffixes.len() < MAX_LIST {
            // SAFETY: an element of the adapter's suffix list.
            let suffix = unsafe { &*x };
            let len = suffix.String.iter().position(|u| *u == 0).unwrap_or(suffix.String.len());
            if let Ok(text) = String::from_utf16(&suffix.String[..len])
                && !text.is_empty()
            {
                suffixes.push(text);
            }
            x = suffix.Next;
        }
        out.push(AdapterDns {
            up: ad.OperStatus == IfOperStatusUp,
            metric: ad.Ipv4Metric,
            servers,
            // SAFETY: DnsSuffix is null or a string in the same buffer.
            suffix: unsafe { wide(ad.DnsSuffix) }.filter(|s| !s.is_empty()),
            suffixes,
        });
        a = ad.Next;
    }
    out
}

/// A DNS server's socket address, on port 53.
///
/// # Safety
/// `sa.lpSockaddr` must be null or point to `sa.iSockaddrLength` bytes.
unsafe fn socket_address(sa: &SOCKET_ADDRESS) -> Option<SocketAddr> {
    let p = sa.lpSockaddr;
    if p.is_null() {
        return None;
    }
    let len = usize::try_from(sa.iSockaddrLength).ok()?;
    // SAFETY: the address has at least a family field when not null.
    let family = unsafe { (*p).sa_family };
    if family == AF_INET && len >= size_of::<SOCKADDR_IN>() {
        // SAFETY: an AF_INET address of the full size; read unaligned.
        let v4 = unsafe { p.cast::<SOCKADDR_IN>().read_unaligned() };
        // SAFETY: S_addr is the whole union, in network byte order.
        let ip = Ipv4Addr::from(unsafe { v4.sin_addr.S_un.S_addr }.to_ne_bytes());
        Some(SocketAddr::V4(SocketAddrV4::new(ip, 53)))
    } else if family == AF_INET6 && len >= size_of::<SOCKADDR_IN6>() {
        // SAFETY: an AF_INET6 address of the full size; read unaligned.
        let v6 = unsafe { p.cast::<SOCKADDR_IN6>().read_unaligned() };
        // SAFETY: the bytes view of the address; the scope id of the union.
        let (ip, scope) = unsafe { (Ipv6Addr::from(v6.sin6_addr.u.Byte), v6.Anonymous.sin6_scope_id) };
        Some(SocketAddr::V6(SocketAddrV6::new(ip, 53, 0, scope)))
    } else {
        None
    }
}

/// The resolver's own search list (`DnsQueryConfig`), when it reads as a
/// list of names (Wine's form; see [`parse_multi_sz`]); empty otherwise.
pub fn resolver_search_list() -> Vec<String> {
    let mut len: u32 = 0;
    // SAFETY: a size query: no buffer, a valid length pointer.
    let rc = unsafe { DnsQueryConfig(DnsConfigSearchList, 0, null(), null(), null_mut(), &mut len) };
    if (rc != 0 && rc as u32 != ERROR_MORE_DATA) || len == 0 || len > 64 * 1024 {
        return Vec::new();
    }
    let mut buf = vec![0u16; (len as usize).div_ceil(2)];
    let mut got = (buf.len() * 2) as u32;
    // SAFETY: `buf` has `got` writable bytes.
    let rc = unsafe { DnsQueryConfig(DnsConfigSearchList, 0, null(), null(), buf.as_mut_ptr().cast(), &mut got) };
    if rc != 0 {
        return Vec::new();
    }
    let units = (got as usize / 2).min(buf.len());
    parse_multi_sz(&buf[..units]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_and_search_list_read_without_crashing() {
        // Whatever this machine (or Wine) has: the calls work and what comes
        // back is well-formed.
        for a in adapters() {
            assert!(a.servers.iter().all(|s| s.port() == 53), "{a:?}");
        }
        for name in resolver_search_list() {
            assert!(!name.is_empty());
        }
    }

    #[test]
    fn raw_api_lookup_does_not_crash() {
        // Present on Windows 11, absent on older Windows and Wine.
        let _ = RawFns::load().is_some();
    }
}
