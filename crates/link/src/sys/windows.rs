//! Windows transports: Hyper-V sockets (`hvsock://VM:PORT`) and named pipes
//! (`npipe://./pipe/NAME`), and the list of running VMs from the registry.
//!
//! How this works. A Hyper-V socket is a Winsock socket of family AF_HYPERV
//! (34) whose address is a VM id and a service id; a vsock port P is the
//! service `{P:08x}-facb-11e6-bd58-64006a7986d3` (see [`crate::hvsock`]).
//! tokio cannot register such a socket (it drives only the kinds of socket
//! it creates), so a connected one is put in non-blocking mode and bridged
//! to async code by two threads ([`crate::bridge`]); a listening one gets an
//! accept thread that hands new connections over a channel. Every thread
//! waits with `select()` bounded by [`TICK`], so dropping a stream or a
//! listener ends its threads and closes the socket within a tick, with no
//! cancellation races. Dialing is a blocking `connect` on tokio's blocking
//! pool, bounded by `HVSOCKET_CONNECT_TIMEOUT`.
//!
//! Named pipes use tokio's own support (overlapped I/O on its completion
//! port): the listener keeps one unconnected instance ready and creates the
//! next as soon as a client connects; remote clients are rejected. Every
//! instance is created with an explicit security descriptor: owned by the
//! user running this process, with a protected DACL granting `GENERIC_ALL`
//! to that user and to LocalSystem and to nobody else (the default DACL
//! would also let Everyone and anonymous clients read, and administrators
//! in); [`pipe_security`] reads it back.
//!
//! What has been exercised where: the socket code (the same functions, with
//! an AF_INET address instead of AF_HYPERV), the named pipes and the
//! registry reading run under Wine in CI (the tests below); the AF_HYPERV
//! addresses themselves only on real Windows, which CI does not have.

use std::io;
use std::mem::size_of;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::windows::named_pipe::{ClientOptions, NamedPipeClient, NamedPipeServer, ServerOptions};
use tokio::sync::{Mutex, mpsc};
use windows_sys::Win32::Networking::WinSock as ws;
use windows_sys::Win32::System::Hypervisor as hv;
use windows_sys::core::GUID;

use super::pipe_path;
use crate::bridge::{BlockingSocket, BridgeStream, Ready, TICK};
use crate::endpoint::Endpoint;
use crate::hvsock::{self, Guid};

/// Bound on one Hyper-V `connect` (the handshake probes once a second).
const HV_CONNECT_TIMEOUT_MS: u32 = 5_000;
/// Connections accepted but not yet taken by `accept()`.
const ACCEPT_QUEUE: usize = 16;

pub enum SysStream {
    HvSock(BridgeStream),
    PipeServer(NamedPipeServer),
    PipeClient(NamedPipeClient),
}

pub enum SysListener {
    HvSock(SockListener),
    Pipe(PipeListener),
}

pub async fn dial(ep: &Endpoint) -> io::Result<SysStream> {
    match ep {
        Endpoint::HvSock { vm, port } => {
            let addr = hv_addr(vm, *port)?;
            let sock = tokio::task::spawn_blocking(move || {
                connect_blocking(ws::AF_HYPERV, hv::HV_PROTOCOL_RAW as i32, &addr, |s| {
                    s.set_opt_u32(
                        hv::HV_PROTOCOL_RAW as i32,
                        hv::HVSOCKET_CONNECT_TIMEOUT as i32,
                        HV_CONNECT_TIMEOUT_MS,
                    )
                })
            })
            .await
            .map_err(io::Error::other)??;
            Ok(SysStream::HvSock(BridgeStream::spawn(sock, "hvsock")?))
        }
        Endpoint::Npipe(name) => dial_pipe(name).await.map(SysStream::PipeClient),
        Endpoint::Winsock(addr) => {
            let addr = inet_addr(*addr);
            let sock =
                tokio::task::spawn_blocking(move || connect_blocking(ws::AF_INET, ws::IPPROTO_TCP, &addr, tune_tcp))
                    .await
                    .map_err(io::Error::other)??;
            Ok(SysStream::HvSock(BridgeStream::spawn(sock, "winsock")?))
        }
        other => Err(unsupported(other)),
    }
}

pub async fn listen(ep: &Endpoint) -> io::Result<SysListener> {
    match ep {
        Endpoint::HvSock { vm, port } => {
            let addr = hv_addr(vm, *port)?;
            Ok(SysListener::HvSock(listen_on(Sock::new(ws::AF_HYPERV, hv::HV_PROTOCOL_RAW as i32)?, &addr, "hvsock")?))
        }
        Endpoint::Npipe(name) => listen_pipe(name).map(SysListener::Pipe),
        Endpoint::Winsock(addr) => {
            let s = Sock::new(ws::AF_INET, ws::IPPROTO_TCP)?;
            // Accepted sockets inherit these.
            tune_tcp(&s)?;
            Ok(SysListener::HvSock(listen_on(s, &inet_addr(*addr), "winsock")?))
        }
        other => Err(unsupported(other)),
    }
}

fn unsupported(ep: &Endpoint) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, format!("{ep} is not available on Windows"))
}

impl SysListener {
    pub async fn accept(&self) -> io::Result<(crate::LinkStream, String)> {
        match self {
            SysListener::HvSock(l) => {
                let (sock, peer) = l.next().await?;
                let stream = BridgeStream::spawn(sock, "hvsock")?;
                Ok((crate::LinkStream::Sys(SysStream::HvSock(stream)), peer))
            }
            SysListener::Pipe(l) => {
                let server = l.next().await?;
                Ok((crate::LinkStream::Sys(SysStream::PipeServer(server)), l.url.clone()))
            }
        }
    }
}

/// The running compute systems (VMs) by id, from the Host Compute Service's
/// volatile store; empty when the key does not exist (no VM has run).
pub fn compute_systems() -> io::Result<Vec<String>> {
    subkey_guids(windows_registry::LOCAL_MACHINE, hvsock::COMPUTE_SYSTEM_KEY)
}

fn subkey_guids(root: &windows_registry::Key, path: &str) -> io::Result<Vec<String>> {
    const NOT_FOUND: i32 = windows_sys::Win32::Foundation::ERROR_FILE_NOT_FOUND as i32;
    let key = match root.open(path) {
        Ok(key) => key,
        Err(e) if e.code().0 & 0xffff == NOT_FOUND => return Ok(Vec::new()),
        Err(e) => return Err(io::Error::other(format!("reading the registry key {path}: {e}"))),
    };
    let names = key.keys().map_err(|e| io::Error::other(format!("listing the registry key {path}: {e}")))?;
    Ok(hvsock::parse_compute_systems(names).iter().map(Guid::to_string).collect())
}

// ------------------------------------------------------------ Winsock sockets

fn sys_guid(g: Guid) -> GUID {
    GUID::from_u128(g.0)
}

fn hv_addr(vm: &str, port: u32) -> io::Result<hv::SOCKADDR_HV> {
    let vm = hvsock::vm_id(vm).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(hv::SOCKADDR_HV {
        Family: ws::AF_HYPERV,
        Reserved: 0,
        VmId: sys_guid(vm),
        ServiceId: sys_guid(hvsock::service_id(port)),
    })
}

/// `winsock://`'s address.
fn inet_addr(addr: std::net::SocketAddrV4) -> ws::SOCKADDR_IN {
    let mut a = ws::SOCKADDR_IN { sin_family: ws::AF_INET, sin_port: addr.port().to_be(), ..Default::default() };
    a.sin_addr.S_un.S_addr = u32::from(*addr.ip()).to_be();
    a
}

/// What `tcp://` links get (no Nagle delay, large buffers), so that
/// `winsock://` differs from `tcp://` only in how the socket is driven.
fn tune_tcp(s: &Sock) -> io::Result<()> {
    s.set_opt_u32(ws::IPPROTO_TCP, ws::TCP_NODELAY, 1)?;
    let size = crate::endpoint::LINK_SOCKET_BUFFER as u32;
    // Best effort, as for tcp://: a smaller buffer only costs speed.
    let _ = s.set_opt_u32(ws::SOL_SOCKET, ws::SO_SNDBUF, size);
    let _ = s.set_opt_u32(ws::SOL_SOCKET, ws::SO_RCVBUF, size);
    Ok(())
}

/// A socket address type this module can bind, connect and describe.
trait SockAddr: Copy + Default + Send + 'static {
    fn describe(&self) -> String;
}

impl SockAddr for hv::SOCKADDR_HV {
    fn describe(&self) -> String {
        let g = |g: GUID| Guid::from_fields(g.data1, g.data2, g.data3, g.data4);
        let (vm, service) = (g(self.VmId), g(self.ServiceId));
        match hvsock::service_port(service) {
            Some(port) => format!("hvsock://{vm}:{port}"),
            None => format!("hvsock://{vm}/{service}"),
        }
    }
}

impl SockAddr for ws::SOCKADDR_IN {
    fn describe(&self) -> String {
        // SAFETY: every variant of the IN_ADDR union is plain integers
        // covering the same four bytes, so any bit pattern is valid.
        let ip = unsafe { self.sin_addr.S_un.S_addr };
        format!("tcp://{}:{}", std::net::Ipv4Addr::from(u32::from_be(ip)), u16::from_be(self.sin_port))
    }
}

fn wsa_init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let mut data = ws::WSADATA::default();
        // SAFETY: `data` is a valid, writable WSADATA. Winsock counts
        // startups; this one is never undone, like the standard library's.
        let r = unsafe { ws::WSAStartup(0x0202, &mut data) };
        if r != 0 {
            tracing::warn!(error = r, "WSAStartup failed");
        }
    });
}

fn last_error() -> io::Error {
    // SAFETY: reads the calling thread's last Winsock error; no arguments.
    io::Error::from_raw_os_error(unsafe { ws::WSAGetLastError() })
}

fn check(r: i32) -> io::Result<()> {
    if r == ws::SOCKET_ERROR { Err(last_error()) } else { Ok(()) }
}

/// An owned Winsock socket, closed on drop.
pub struct Sock(ws::SOCKET);

impl Drop for Sock {
    fn drop(&mut self) {
        // SAFETY: `self.0` is a socket this value owns; it is closed once,
        // here, and nothing uses it afterwards.
        unsafe { ws::closesocket(self.0) };
    }
}

impl Sock {
    fn new(family: u16, protocol: i32) -> io::Result<Sock> {
        wsa_init();
        let flags = ws::WSA_FLAG_OVERLAPPED | ws::WSA_FLAG_NO_HANDLE_INHERIT;
        // SAFETY: plain arguments; a null protocol-info pointer is allowed.
        let s = unsafe { ws::WSASocketW(i32::from(family), ws::SOCK_STREAM, protocol, std::ptr::null(), 0, flags) };
        if s == ws::INVALID_SOCKET { Err(last_error()) } else { Ok(Sock(s)) }
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        let mut arg = u32::from(on);
        // SAFETY: FIONBIO reads one u32 through the valid pointer `arg`.
        check(unsafe { ws::ioctlsocket(self.0, ws::FIONBIO, &mut arg) })
    }

    fn set_opt_u32(&self, level: i32, name: i32, value: u32) -> io::Result<()> {
        let ptr = (&value as *const u32).cast::<u8>();
        // SAFETY: `ptr` points to `value`, 4 readable bytes, as declared.
        check(unsafe { ws::setsockopt(self.0, level, name, ptr, size_of::<u32>() as i32) })
    }

    fn connect<A: SockAddr>(&self, addr: &A) -> io::Result<()> {
        let ptr = (addr as *const A).cast::<ws::SOCKADDR>();
        // SAFETY: `ptr` points to a whole, initialised address of the
        // socket's family, `size_of::<A>()` bytes long.
        check(unsafe { ws::connect(self.0, ptr, size_of::<A>() as i32) })
    }

    fn bind<A: SockAddr>(&self, addr: &A) -> io::Result<()> {
        let ptr = (addr as *const A).cast::<ws::SOCKADDR>();
        // SAFETY: as in `connect`.
        check(unsafe { ws::bind(self.0, ptr, size_of::<A>() as i32) })
    }

    fn listen(&self) -> io::Result<()> {
        // SAFETY: plain arguments on a socket this value owns.
        check(unsafe { ws::listen(self.0, 128) })
    }

    fn accept<A: SockAddr>(&self) -> io::Result<(Sock, A)> {
        let mut addr = A::default();
        let mut len = size_of::<A>() as i32;
        let ptr = (&mut addr as *mut A).cast::<ws::SOCKADDR>();
        // SAFETY: `ptr`/`len` describe `addr`, writable and `len` bytes
        // long; Winsock writes at most `len` bytes and updates `len`.
        let s = unsafe { ws::accept(self.0, ptr, &mut len) };
        if s == ws::INVALID_SOCKET { Err(last_error()) } else { Ok((Sock(s), addr)) }
    }

    #[cfg(test)]
    fn local_addr<A: SockAddr>(&self) -> io::Result<A> {
        let mut addr = A::default();
        let mut len = size_of::<A>() as i32;
        let ptr = (&mut addr as *mut A).cast::<ws::SOCKADDR>();
        // SAFETY: as in `accept`.
        check(unsafe { ws::getsockname(self.0, ptr, &mut len) })?;
        Ok(addr)
    }
}

impl BlockingSocket for Sock {
    fn wait(&self, ready: Ready, timeout: Duration) -> io::Result<bool> {
        let mut set = ws::FD_SET { fd_count: 1, ..Default::default() };
        set.fd_array[0] = self.0;
        let mut errors = set;
        let tv = ws::TIMEVAL { tv_sec: timeout.as_secs() as i32, tv_usec: timeout.subsec_micros() as i32 };
        let (read, write) = match ready {
            Ready::Read => (&mut set as *mut ws::FD_SET, std::ptr::null_mut()),
            Ready::Write => (std::ptr::null_mut(), &mut set as *mut ws::FD_SET),
        };
        // SAFETY: each set pointer is null or points to a valid FD_SET that
        // lives across the call; `tv` is a valid TIMEVAL. The first argument
        // is ignored on Windows.
        let n = unsafe { ws::select(0, read, write, &mut errors, &tv) };
        if n == ws::SOCKET_ERROR { Err(last_error()) } else { Ok(n > 0) }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let len = buf.len().min(i32::MAX as usize) as i32;
        // SAFETY: `buf` is writable for `len` bytes.
        let n = unsafe { ws::recv(self.0, buf.as_mut_ptr(), len, 0) };
        if n == ws::SOCKET_ERROR { Err(last_error()) } else { Ok(n as usize) }
    }

    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len().min(i32::MAX as usize) as i32;
        // SAFETY: `buf` is readable for `len` bytes.
        let n = unsafe { ws::send(self.0, buf.as_ptr(), len, 0) };
        if n == ws::SOCKET_ERROR { Err(last_error()) } else { Ok(n as usize) }
    }

    fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: plain arguments on a socket this value owns.
        check(unsafe { ws::shutdown(self.0, ws::SD_SEND) })
    }
}

/// Connects a new blocking socket (after `prepare`), then makes it
/// non-blocking for the bridge.
fn connect_blocking<A: SockAddr>(
    family: u16,
    protocol: i32,
    addr: &A,
    prepare: impl FnOnce(&Sock) -> io::Result<()>,
) -> io::Result<Sock> {
    let s = Sock::new(family, protocol)?;
    prepare(&s)?;
    s.connect(addr).map_err(|e| io::Error::new(e.kind(), format!("connecting to {}: {e}", addr.describe())))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A listening Winsock socket served by an accept thread.
pub struct SockListener {
    accepted: Mutex<mpsc::Receiver<io::Result<(Sock, String)>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for SockListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl SockListener {
    async fn next(&self) -> io::Result<(Sock, String)> {
        let mut rx = self.accepted.lock().await;
        rx.recv().await.ok_or_else(|| io::Error::other("the accept thread has ended"))?
    }
}

fn listen_on<A: SockAddr>(s: Sock, addr: &A, name: &str) -> io::Result<SockListener> {
    s.bind(addr).map_err(|e| io::Error::new(e.kind(), format!("binding {}: {e}", addr.describe())))?;
    s.listen()?;
    s.set_nonblocking(true)?;
    spawn_accept_thread::<A>(s, name)
}

/// Starts the accept thread of the listening, non-blocking socket `s`.
fn spawn_accept_thread<A: SockAddr>(s: Sock, name: &str) -> io::Result<SockListener> {
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    std::thread::Builder::new().name(format!("{name}-accept")).spawn(move || accept_loop::<A>(s, tx, &thread_stop))?;
    Ok(SockListener { accepted: Mutex::new(rx), stop })
}

fn accept_loop<A: SockAddr>(s: Sock, tx: mpsc::Sender<io::Result<(Sock, String)>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match s.wait(Ready::Read, TICK) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                if !hand_over(&tx, Err(e), stop) {
                    return;
                }
                std::thread::sleep(TICK);
                continue;
            }
        }
        let item = match s.accept::<A>() {
            Ok((c, peer)) => c.set_nonblocking(true).map(|()| (c, peer.describe())),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            // A client that gave up before we accepted it: not our error.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) => {
                continue;
            }
            Err(e) => Err(e),
        };
        let failed = item.is_err();
        if !hand_over(&tx, item, stop) {
            return;
        }
        if failed {
            std::thread::sleep(TICK);
        }
    }
}

/// Queues `item` for `accept()`, waiting while the queue is full; false
/// when the listener is gone.
fn hand_over(
    tx: &mpsc::Sender<io::Result<(Sock, String)>>,
    mut item: io::Result<(Sock, String)>,
    stop: &AtomicBool,
) -> bool {
    loop {
        match tx.try_send(item) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(back)) => {
                if stop.load(Ordering::Acquire) {
                    return false;
                }
                item = back;
                std::thread::sleep(TICK);
            }
        }
    }
}

// ---------------------------------------------------------------- named pipes

/// A named-pipe server: one instance always waits for the next client.
pub struct PipeListener {
    path: String,
    url: String,
    /// Security descriptor of every instance, as SDDL.
    sddl: String,
    next: Mutex<NamedPipeServer>,
}

fn listen_pipe(name: &str) -> io::Result<PipeListener> {
    let path = pipe_path(name)?;
    let sddl = owner_only_sddl(&current_user_sid()?);
    let first = create_pipe(&path, &sddl, true)
        .map_err(|e| io::Error::new(e.kind(), format!("creating the pipe {path}: {e}")))?;
    Ok(PipeListener { url: format!("npipe://{name}"), path, sddl, next: Mutex::new(first) })
}

impl PipeListener {
    async fn next(&self) -> io::Result<NamedPipeServer> {
        let mut next = self.next.lock().await;
        let connected = next.connect().await;
        // Whatever happened to this instance, the next client gets a fresh one.
        let fresh = create_pipe(&self.path, &self.sddl, false)?;
        let server = std::mem::replace(&mut *next, fresh);
        connected.map(|()| server)
    }
}

/// The pipe's security descriptor: owner `sid`, and a protected DACL (no
/// inherited entries) granting everything to `sid` and LocalSystem only.
fn owner_only_sddl(sid: &str) -> String {
    format!("O:{sid}D:P(A;;GA;;;{sid})(A;;GA;;;SY)")
}

/// A pipe instance whose security descriptor is `sddl`.
fn create_pipe(path: &str, sddl: &str, first: bool) -> io::Result<NamedPipeServer> {
    use windows_sys::Win32::Security::SECURITY_ATTRIBUTES;
    let sd = SecurityDescriptor::from_sddl(sddl)?;
    let mut attrs = SECURITY_ATTRIBUTES {
        nLength: size_of::<SECURITY_ATTRIBUTES>() as u32,
        lpSecurityDescriptor: sd.0,
        bInheritHandle: 0,
    };
    let mut options = ServerOptions::new();
    options.first_pipe_instance(first).reject_remote_clients(true);
    // SAFETY: `attrs` is a valid SECURITY_ATTRIBUTES whose descriptor (`sd`)
    // lives until after the call, which copies it into the new pipe.
    unsafe { options.create_with_security_attributes_raw(path, (&raw mut attrs).cast()) }
}

/// A self-relative security descriptor allocated by the system (LocalFree).
struct SecurityDescriptor(windows_sys::Win32::Security::PSECURITY_DESCRIPTOR);

impl SecurityDescriptor {
    fn from_sddl(sddl: &str) -> io::Result<SecurityDescriptor> {
        use windows_sys::Win32::Security::Authorization::{
            ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
        };
        let wide = wide(sddl);
        let mut sd = std::ptr::null_mut();
        // SAFETY: `wide` is NUL-terminated; `sd` receives a LocalAlloc'd
        // descriptor that `Drop` frees; the size output is optional.
        let ok = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                wide.as_ptr(),
                SDDL_REVISION_1,
                &mut sd,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 || sd.is_null() {
            return Err(io::Error::new(
                io::Error::last_os_error().kind(),
                format!("security descriptor {sddl}: {}", io::Error::last_os_error()),
            ));
        }
        Ok(SecurityDescriptor(sd))
    }
}

impl Drop for SecurityDescriptor {
    fn drop(&mut self) {
        // SAFETY: allocated by ConvertStringSecurityDescriptorToSecurityDescriptorW
        // with LocalAlloc, freed once.
        unsafe { windows_sys::Win32::Foundation::LocalFree(self.0) };
    }
}

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

/// A wide string the system allocated with LocalAlloc, as a `String`
/// (and freed).
///
/// # Safety
/// `p` is null or a NUL-terminated wide string from LocalAlloc, not used
/// afterwards.
unsafe fn take_local_wide(p: *mut u16) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller's contract: NUL-terminated, so the scan stops
    // inside the allocation; freed once, after the copy.
    unsafe {
        let len = (0..).take_while(|i| *p.add(*i) != 0).count();
        let s = String::from_utf16_lossy(std::slice::from_raw_parts(p, len));
        windows_sys::Win32::Foundation::LocalFree(p.cast());
        Some(s)
    }
}

/// The SID of the user this process runs as, as a string (`S-1-5-21-…`).
pub fn current_user_sid() -> io::Result<String> {
    use windows_sys::Win32::Foundation::CloseHandle;
    use windows_sys::Win32::Security::Authorization::ConvertSidToStringSidW;
    use windows_sys::Win32::Security::{GetTokenInformation, TOKEN_QUERY, TOKEN_USER, TokenUser};
    use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};
    let mut token = std::ptr::null_mut();
    // SAFETY: the current-process pseudo-handle needs no closing; `token`
    // is closed below.
    if unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) } == 0 {
        return Err(io::Error::last_os_error());
    }
    let result = (|| {
        let mut len = 0u32;
        // SAFETY: a size query (null buffer, length 0).
        unsafe { GetTokenInformation(token, TokenUser, std::ptr::null_mut(), 0, &mut len) };
        // u64s: TOKEN_USER holds pointers.
        let mut buf = vec![0u64; (len as usize).div_ceil(8).max(size_of::<TOKEN_USER>().div_ceil(8))];
        let cap = (buf.len() * 8) as u32;
        // SAFETY: `buf` is writable for `cap` bytes and 8-byte aligned.
        if unsafe { GetTokenInformation(token, TokenUser, buf.as_mut_ptr().cast(), cap, &mut len) } == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: on success the buffer starts with a TOKEN_USER whose SID
        // points into the same buffer, alive until the end of this closure.
        let sid = unsafe { (*buf.as_ptr().cast::<TOKEN_USER>()).User.Sid };
        let mut text = std::ptr::null_mut();
        // SAFETY: a valid SID; `text` receives a LocalAlloc'd string.
        if unsafe { ConvertSidToStringSidW(sid, &mut text) } == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just allocated by ConvertSidToStringSidW.
        unsafe { take_local_wide(text) }.ok_or_else(|| io::Error::other("no SID string"))
    })();
    // SAFETY: opened above, closed once.
    unsafe { CloseHandle(token) };
    result
}

/// The security of a named pipe as its clients see it: the owner and DACL
/// read back with `GetSecurityInfo` from a client handle, as SDDL.
pub fn pipe_security(name: &str) -> io::Result<String> {
    use windows_sys::Win32::Foundation::{CloseHandle, INVALID_HANDLE_VALUE, LocalFree};
    use windows_sys::Win32::Security::Authorization::{
        ConvertSecurityDescriptorToStringSecurityDescriptorW, GetSecurityInfo, SDDL_REVISION_1, SE_KERNEL_OBJECT,
    };
    use windows_sys::Win32::Security::{DACL_SECURITY_INFORMATION, OWNER_SECURITY_INFORMATION};
    use windows_sys::Win32::Storage::FileSystem::{CreateFileW, OPEN_EXISTING, READ_CONTROL};
    let path = wide(&pipe_path(name)?);
    // SAFETY: `path` is NUL-terminated; the handle is checked and closed.
    let handle = unsafe {
        CreateFileW(path.as_ptr(), READ_CONTROL, 0, std::ptr::null(), OPEN_EXISTING, 0, std::ptr::null_mut())
    };
    if handle == INVALID_HANDLE_VALUE {
        return Err(io::Error::last_os_error());
    }
    let what = OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION;
    let mut sd = std::ptr::null_mut();
    // SAFETY: a valid handle opened with READ_CONTROL; the owner and DACL
    // pointers are not asked for (they point into `sd`); `sd` receives a
    // LocalAlloc'd descriptor, freed below.
    let rc = unsafe {
        GetSecurityInfo(
            handle,
            SE_KERNEL_OBJECT,
            what,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut sd,
        )
    };
    // SAFETY: opened above, closed once.
    unsafe { CloseHandle(handle) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc as i32));
    }
    let mut text = std::ptr::null_mut();
    // SAFETY: `sd` is the descriptor GetSecurityInfo returned; `text`
    // receives a LocalAlloc'd string; the length output is optional.
    let ok = unsafe {
        ConvertSecurityDescriptorToStringSecurityDescriptorW(sd, SDDL_REVISION_1, what, &mut text, std::ptr::null_mut())
    };
    let err = io::Error::last_os_error();
    // SAFETY: allocated by GetSecurityInfo, freed once.
    unsafe { LocalFree(sd) };
    if ok == 0 {
        return Err(err);
    }
    // SAFETY: just allocated by the conversion.
    unsafe { take_local_wide(text) }.ok_or_else(|| io::Error::other("no SDDL string"))
}

async fn dial_pipe(name: &str) -> io::Result<NamedPipeClient> {
    const BUSY: i32 = windows_sys::Win32::Foundation::ERROR_PIPE_BUSY as i32;
    let path = pipe_path(name)?;
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ClientOptions::new().open(&path) {
            Ok(c) => return Ok(c),
            // Every instance is taken; the server makes a new one at once.
            Err(e) if e.raw_os_error() == Some(BUSY) && tokio::time::Instant::now() < give_up => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("opening the pipe {path}: {e}"))),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------ stream plumbing

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            SysStream::HvSock($s) => $e,
            SysStream::PipeServer($s) => $e,
            SysStream::PipeClient($s) => $e,
        }
    };
}

impl AsyncRead for SysStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for SysStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

// These run under Wine in CI (scripts/test), where AF_HYPERV does not
// exist: the socket code is exercised with AF_INET addresses instead.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::tests::{Peer, drop_flushes, round_trips};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    impl Peer for TcpStream {
        fn shutdown_write(&self) -> io::Result<()> {
            self.shutdown(Shutdown::Write)
        }
        fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
            TcpStream::set_read_timeout(self, d)
        }
    }

    fn loopback(port: u16) -> ws::SOCKADDR_IN {
        inet_addr(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port))
    }

    /// A Winsock socket made by this module, connected to a std listener.
    fn dialed_pair() -> (Sock, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let s = connect_blocking(ws::AF_INET, ws::IPPROTO_TCP, &loopback(port), |_| Ok(())).unwrap();
        let (peer, _) = l.accept().unwrap();
        (s, peer)
    }

    #[tokio::test]
    async fn winsock_socket_bridged_round_trips() {
        let (s, peer) = dialed_pair();
        round_trips(s, peer).await;
    }

    #[tokio::test]
    async fn winsock_socket_bridged_flushes_on_drop() {
        let (s, peer) = dialed_pair();
        drop_flushes(s, peer).await;
    }

    #[tokio::test]
    async fn winsock_listener_accepts_and_stops() {
        let s = Sock::new(ws::AF_INET, ws::IPPROTO_TCP).unwrap();
        s.bind(&loopback(0)).unwrap();
        s.listen().unwrap();
        s.set_nonblocking(true).unwrap();
        let port = u16::from_be(s.local_addr::<ws::SOCKADDR_IN>().unwrap().sin_port);
        let l = spawn_accept_thread::<ws::SOCKADDR_IN>(s, "test").unwrap();
        let l = SysListener::HvSock(l);
        for round in 0..3u8 {
            let client = std::thread::spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                std::io::Write::write_all(&mut c, &[round; 3]).unwrap();
                let mut back = [0u8; 3];
                std::io::Read::read_exact(&mut c, &mut back).unwrap();
                back
            });
            let (mut conn, peer) = l.accept().await.unwrap();
            assert!(peer.starts_with("tcp://127.0.0.1:"), "{peer}");
            let mut got = [0u8; 3];
            conn.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [round; 3]);
            conn.write_all(&[round + 1; 3]).await.unwrap();
            assert_eq!(client.join().unwrap(), [round + 1; 3]);
        }
        drop(l);
        // The accept thread closes the socket within a tick or two.
        let mut closed = false;
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(50));
            if TcpStream::connect(("127.0.0.1", port)).is_err() {
                closed = true;
                break;
            }
        }
        assert!(closed, "the listening socket outlived its listener");
    }

    /// `winsock://` through the crate's own `listen` and `dial`: the Hyper-V
    /// socket code end to end, with an AF_INET address.
    #[tokio::test]
    async fn winsock_endpoints_listen_and_dial() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ep: Endpoint = format!("winsock://127.0.0.1:{port}").parse().unwrap();
        let l = crate::listen(&ep).await.unwrap();
        for round in 0..3u8 {
            let (client, server) = tokio::join!(crate::dial(&ep), l.accept());
            let (mut client, (mut server, peer)) = (client.unwrap(), server.unwrap());
            assert!(peer.starts_with("tcp://127.0.0.1:"), "{peer}");
            let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 + u32::from(round)) as u8).collect();
            let echo = async {
                let mut got = vec![0u8; data.len()];
                server.read_exact(&mut got).await.unwrap();
                server.write_all(&got).await.unwrap();
                server.shutdown().await.unwrap();
            };
            let talk = async {
                client.write_all(&data).await.unwrap();
                let mut back = Vec::new();
                client.read_to_end(&mut back).await.unwrap();
                assert!(back == data, "round {round}: the echo differs");
            };
            tokio::join!(echo, talk);
        }
    }

    #[tokio::test]
    async fn hyper_v_sockets_fail_cleanly_where_missing() {
        // Wine has no AF_HYPERV: both directions must return an error (on
        // Windows with Hyper-V, the wildcard listen may succeed).
        let ep = Endpoint::HvSock { vm: "wildcard".into(), port: 50_000 };
        if let Err(e) = listen(&ep).await {
            assert!(!e.to_string().is_empty());
        }
        let ep = Endpoint::HvSock { vm: "00000000-0000-0000-0000-000000000001".into(), port: 50_000 };
        assert!(dial(&ep).await.is_err());
        let bad = Endpoint::HvSock { vm: "not-a-guid".into(), port: 1 };
        assert_eq!(dial(&bad).await.err().map(|e| e.kind()), Some(io::ErrorKind::InvalidInput));
    }

    #[tokio::test]
    async fn named_pipe_listen_and_dial() {
        let name = format!("./pipe/rdnet-test-{}", std::process::id());
        let ep = Endpoint::Npipe(name.clone());
        let l = crate::listen(&ep).await.unwrap();
        // Only this user and LocalSystem get in, as read back from a client
        // handle (which takes the waiting instance; the next one has the
        // same descriptor).
        let user = current_user_sid().unwrap();
        let sddl = tokio::task::spawn_blocking({
            let name = name.clone();
            move || pipe_security(&name)
        });
        let (sddl, _) = tokio::join!(sddl, l.accept());
        let sddl = sddl.unwrap().unwrap();
        let parsed = crate::sys::Sddl::parse(&sddl).unwrap();
        assert!(parsed.admits_only(&user), "{sddl} (user {user})");
        // A second server on the same name is refused (FILE_FLAG_FIRST_PIPE_INSTANCE,
        // which Wine 8.0 does not enforce).
        if !under_wine() {
            assert!(crate::listen(&ep).await.is_err());
        }
        for round in 0..3u8 {
            let (client, server) = tokio::join!(crate::dial(&ep), l.accept());
            let (mut client, mut server) = (client.unwrap(), server.unwrap());
            assert_eq!(server.1, format!("npipe://{name}"));
            client.write_all(&[round; 1000]).await.unwrap();
            let mut got = [0u8; 1000];
            server.0.read_exact(&mut got).await.unwrap();
            assert!(got.iter().all(|b| *b == round));
            server.0.write_all(b"ok").await.unwrap();
            let mut ok = [0u8; 2];
            client.read_exact(&mut ok).await.unwrap();
            assert_eq!(&ok, b"ok");
        }
        drop(l);
        assert!(crate::dial(&ep).await.is_err());
    }

    fn under_wine() -> bool {
        windows_registry::LOCAL_MACHINE.open(r"Software\Wine").is_ok()
    }

    #[test]
    fn registry_subkeys_are_read() {
        let path = format!(r"Software\rdnet-test-{}\ComputeSystem", std::process::id());
        let root = windows_registry::CURRENT_USER;
        let key = root.create(&path).unwrap();
        for sub in ["3F2504E0-4F89-11D3-9A0C-0305E82C3301", "not-a-vm", "{7d3a9a4c-0f3e-4b7e-8f2b-0c1f2e3d4a5b}"] {
            key.create(sub).unwrap();
        }
        let mut got = subkey_guids(root, &path).unwrap();
        got.sort();
        root.remove_tree(path.rsplit_once('\\').unwrap().0).unwrap();
        assert_eq!(got, ["3f2504e0-4f89-11d3-9a0c-0305e82c3301", "7d3a9a4c-0f3e-4b7e-8f2b-0c1f2e3d4a5b"]);
        // A missing key is no VM, not an error.
        assert_eq!(subkey_guids(root, r"Software\rdnet-test-missing\x").unwrap(), Vec::<String>::new());
        // The real key: present on Windows with Hyper-V, absent under Wine.
        compute_systems().unwrap();
    }
}
