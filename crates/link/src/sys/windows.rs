//! Windows transports: Hyper-V sockets (`hvsock://VM:PORT`), named pipes
//! (`npipe://./pipe/NAME`), `winsock://IPv4:PORT` (the Hyper-V socket code
//! with a TCP address, for Wine), and the list of running VMs from the
//! registry.
//!
//! How this works. A Hyper-V socket is a Winsock socket of family AF_HYPERV
//! (34) whose address is a VM id and a service id; a vsock port P is the
//! service `{P:08x}-facb-11e6-bd58-64006a7986d3` (see [`crate::hvsock`]).
//! Such sockets run on tokio's own poller like its TCP sockets do
//! ([`super::winsock`]: AFD polling on the runtime's completion port,
//! non-blocking connect, accept, `recv` and `send`), so a connection costs
//! no thread and no copy. Dialing sets `HVSOCKET_CONNECT_TIMEOUT` and bounds
//! the wait by [`CONNECT_LIMIT`] as well. `winsock://` runs the same
//! functions with an AF_INET address and the socket options of `tcp://`
//! links.
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
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::windows::named_pipe::{ClientOptions, NamedPipeClient, NamedPipeServer, ServerOptions};
use tokio::sync::Mutex;
use windows_sys::Win32::Networking::WinSock as ws;
use windows_sys::Win32::System::Hypervisor as hv;
use windows_sys::core::GUID;

use super::pipe_path;
use super::winsock::{self, Sock, SockAddr, SockListener, SockStream};
use crate::endpoint::Endpoint;
use crate::hvsock::{self, Guid};

/// Bound on one Hyper-V `connect`, set on the socket (the handshake probes
/// once a second).
const HV_CONNECT_TIMEOUT_MS: u32 = 5_000;
/// Bound on the wait for any `connect` here: the socket option's, plus a
/// margin so that its more telling error comes first.
pub const CONNECT_LIMIT: Duration = Duration::from_millis(HV_CONNECT_TIMEOUT_MS as u64 + 1_000);

pub enum SysStream {
    /// A Hyper-V (or `winsock://`) socket.
    Sock(SockStream),
    PipeServer(NamedPipeServer),
    PipeClient(NamedPipeClient),
}

pub enum SysListener {
    HvSock(SockListener<hv::SOCKADDR_HV>),
    Winsock(SockListener<ws::SOCKADDR_IN>),
    Pipe(PipeListener),
}

pub async fn dial(ep: &Endpoint) -> io::Result<SysStream> {
    match ep {
        Endpoint::HvSock { vm, port } => {
            let addr = hv_addr(vm, *port)?;
            let s = Sock::new(ws::AF_HYPERV, hv::HV_PROTOCOL_RAW as i32)?;
            s.set_opt_u32(hv::HV_PROTOCOL_RAW as i32, hv::HVSOCKET_CONNECT_TIMEOUT as i32, HV_CONNECT_TIMEOUT_MS)?;
            winsock::connect(s, &addr, CONNECT_LIMIT).await.map(SysStream::Sock)
        }
        Endpoint::Npipe(name) => dial_pipe(name).await.map(SysStream::PipeClient),
        Endpoint::Winsock(addr) => {
            let s = Sock::new(ws::AF_INET, ws::IPPROTO_TCP)?;
            tune_tcp(&s)?;
            winsock::connect(s, &inet_addr(*addr), CONNECT_LIMIT).await.map(SysStream::Sock)
        }
        other => Err(unsupported(other)),
    }
}

pub async fn listen(ep: &Endpoint) -> io::Result<SysListener> {
    match ep {
        Endpoint::HvSock { vm, port } => {
            let addr = hv_addr(vm, *port)?;
            let s = Sock::new(ws::AF_HYPERV, hv::HV_PROTOCOL_RAW as i32)?;
            Ok(SysListener::HvSock(winsock::listen(s, &addr)?))
        }
        Endpoint::Npipe(name) => listen_pipe(name).map(SysListener::Pipe),
        Endpoint::Winsock(addr) => {
            let s = Sock::new(ws::AF_INET, ws::IPPROTO_TCP)?;
            // Accepted sockets inherit these.
            tune_tcp(&s)?;
            Ok(SysListener::Winsock(winsock::listen(s, &inet_addr(*addr))?))
        }
        other => Err(unsupported(other)),
    }
}

fn unsupported(ep: &Endpoint) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, format!("{ep} is not available on Windows"))
}

impl SysListener {
    pub async fn accept(&self) -> io::Result<(crate::LinkStream, String)> {
        let (stream, peer) = match self {
            SysListener::HvSock(l) => l.accept().await?,
            SysListener::Winsock(l) => l.accept().await?,
            SysListener::Pipe(l) => {
                let server = l.next().await?;
                return Ok((crate::LinkStream::Sys(SysStream::PipeServer(server)), l.url.clone()));
            }
        };
        Ok((crate::LinkStream::Sys(SysStream::Sock(stream)), peer))
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

// ------------------------------------------------------- socket addresses

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
            SysStream::Sock($s) => $e,
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
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            SysStream::Sock(s) => s.is_write_vectored(),
            SysStream::PipeServer(s) => s.is_write_vectored(),
            SysStream::PipeClient(s) => s.is_write_vectored(),
        }
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
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn loopback(port: u16) -> ws::SOCKADDR_IN {
        inet_addr(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port))
    }

    /// A socket dialed by this module's code, and the std end it reached.
    async fn dialed_pair() -> (SockStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let s = Sock::new(ws::AF_INET, ws::IPPROTO_TCP).unwrap();
        let s = winsock::connect(s, &loopback(port), CONNECT_LIMIT).await.unwrap();
        let (peer, _) = l.accept().unwrap();
        (s, peer)
    }

    /// Small messages both ways, 8 MiB each way at once checked byte for
    /// byte (back-pressure, no loss), half-close both ways.
    #[tokio::test]
    async fn winsock_stream_round_trips() {
        let (mut s, mut peer) = dialed_pair().await;
        s.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        peer.write_all(b"pong").unwrap();
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");

        const N: usize = 8 << 20;
        let pattern = |i: usize| (i * 7 + i / 4093) as u8;
        let echo = std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            let (mut seen, mut out) = (0usize, 0usize);
            while seen < N {
                let n = peer.read(&mut buf).unwrap();
                assert!(n > 0, "EOF after {seen} bytes");
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, pattern(seen + k), "byte {}", seen + k);
                }
                seen += n;
                // Answer with the same amount of our own pattern.
                let reply: Vec<u8> = (out..out + n).map(|i| pattern(i).wrapping_add(1)).collect();
                peer.write_all(&reply).unwrap();
                out += n;
            }
            peer
        });
        let (mut rd, mut wr) = tokio::io::split(s);
        let writer = async {
            let data: Vec<u8> = (0..N).map(pattern).collect();
            for chunk in data.chunks(100_000) {
                wr.write_all(chunk).await.unwrap();
            }
        };
        let reader = async {
            let mut buf = vec![0u8; 50_000];
            let mut seen = 0usize;
            while seen < N {
                let n = rd.read(&mut buf).await.unwrap();
                assert!(n > 0, "EOF after {seen} bytes");
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, pattern(seen + k).wrapping_add(1));
                }
                seen += n;
            }
        };
        tokio::join!(writer, reader);
        let mut peer = echo.join().unwrap();
        let mut s = rd.unsplit(wr);

        // Half-close from our side: the peer reads EOF, and can still answer.
        s.write_all(b"last").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"last");
        peer.write_all(b"after").unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after");
        // The peer closes: we read EOF.
        peer.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    /// Dropping the stream right after a write: the data still arrives,
    /// then EOF (a graceful close).
    #[tokio::test]
    async fn winsock_stream_drop_delivers_what_was_written() {
        let (mut s, mut peer) = dialed_pair().await;
        let reader = std::thread::spawn(move || {
            peer.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut all = Vec::new();
            peer.read_to_end(&mut all).unwrap();
            all
        });
        let data = vec![0x5au8; 1 << 20];
        s.write_all(&data).await.unwrap();
        drop(s);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got.iter().all(|b| *b == 0x5a));
    }

    /// A peer that resets: writes fail and reads end, nothing hangs.
    #[tokio::test]
    async fn winsock_stream_ends_when_the_peer_is_gone() {
        let (mut s, peer) = dialed_pair().await;
        drop(peer);
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if s.write_all(&[0u8; 65536]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        })
        .await;
        assert!(ended.is_ok(), "the stream kept going on a dead connection");
    }

    #[tokio::test]
    async fn winsock_dial_refused_and_unanswered() {
        // Refused: a port nobody listens on (taken, then freed).
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let s = Sock::new(ws::AF_INET, ws::IPPROTO_TCP).unwrap();
        let e = winsock::connect(s, &loopback(port), CONNECT_LIMIT).await.err().expect("connected to nobody");
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
        // Unanswered: a listener with a backlog of one that never accepts.
        // Once the backlog is full, Linux (so Wine) drops further SYNs and
        // the connect stays pending: the limit ends it. Windows refuses
        // instead. Either way the dial fails, within the limit.
        let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        full.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        full.listen(1).unwrap();
        let port = full.local_addr().unwrap().as_socket().unwrap().port();
        let mut queued = Vec::new();
        for _ in 0..3 {
            let c = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            c.set_nonblocking(true).unwrap();
            let _ = c.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into());
            queued.push(c);
        }
        std::thread::sleep(Duration::from_millis(200));
        let s = Sock::new(ws::AF_INET, ws::IPPROTO_TCP).unwrap();
        let t = std::time::Instant::now();
        let r = winsock::connect(s, &loopback(port), Duration::from_millis(500)).await;
        let took = t.elapsed();
        assert!(r.is_err(), "connected past a full backlog");
        assert!(took < Duration::from_secs(3), "the dial took {took:?} with a 500 ms limit");
        drop(queued);
    }

    #[tokio::test]
    async fn winsock_listener_accepts_and_closes_at_once() {
        let s = Sock::new(ws::AF_INET, ws::IPPROTO_TCP).unwrap();
        let l = winsock::listen(s, &loopback(0)).unwrap();
        let port = u16::from_be(l.local_addr().unwrap().sin_port);
        let l = SysListener::Winsock(l);
        for round in 0..3u8 {
            let client = std::thread::spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                c.write_all(&[round; 3]).unwrap();
                let mut back = [0u8; 3];
                c.read_exact(&mut back).unwrap();
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
        // A client that connects and resets before the accept does not
        // stop the next accept.
        let quitter = TcpStream::connect(("127.0.0.1", port)).unwrap();
        socket2::SockRef::from(&quitter).set_linger(Some(Duration::ZERO)).unwrap();
        drop(quitter);
        let next = std::thread::spawn(move || TcpStream::connect(("127.0.0.1", port)).map(|_| ()));
        let accepted = tokio::time::timeout(Duration::from_secs(10), l.accept()).await;
        assert!(
            matches!(accepted, Ok(Ok(_))),
            "accept after a reset client failed: {:?}",
            accepted.as_ref().map(|r| r.as_ref().map(|(_, p)| p.clone()))
        );
        next.join().unwrap().unwrap();
        drop(l);
        // No thread to notice a flag: the socket is closed by the drop.
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "the listening socket outlived its listener");
    }

    /// The point of it all: connections add no threads. 64 `winsock://`
    /// connections and 32 `npipe://` ones, made through the crate's own
    /// `listen` and `dial` (192 streams, each moving a little data both
    /// ways), leave the process's thread count where it was, give or take
    /// what other tests running in parallel start. The bridge this replaced
    /// took two threads per Hyper-V socket stream: 256 here.
    #[tokio::test]
    async fn connections_take_no_threads() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let sock: Endpoint = format!("winsock://127.0.0.1:{port}").parse().unwrap();
        let pipe = Endpoint::Npipe(format!("./pipe/rdnet-threads-{}", std::process::id()));
        let sock_l = crate::listen(&sock).await.unwrap();
        let pipe_l = crate::listen(&pipe).await.unwrap();
        let before = thread_count();
        let mut streams = Vec::new();
        for i in 0..96u8 {
            let (ep, l) = if i < 64 { (&sock, &sock_l) } else { (&pipe, &pipe_l) };
            let (dialed, accepted) = tokio::join!(crate::dial(ep), l.accept());
            let (mut a, (mut b, _)) = (dialed.unwrap(), accepted.unwrap());
            a.write_all(&[i; 100]).await.unwrap();
            let mut got = [0u8; 100];
            b.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [i; 100]);
            b.write_all(&[!i; 100]).await.unwrap();
            a.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [!i; 100]);
            streams.push((a, b));
        }
        let after = thread_count();
        assert!(after < before + 32, "{before} threads before 96 connections, {after} with them");
        drop(streams);
    }

    /// Dropping a pending operation cancels it and loses nothing: a read
    /// given up on (its future dropped) leaves the stream whole, and the
    /// data that comes later is read in full; an accept given up on leaves
    /// the listener working; a dial given up on leaves nothing behind; a
    /// task blocked in a read, aborted, closes its stream (the peer reads
    /// EOF), with no thread left to notice.
    #[tokio::test]
    async fn winsock_pending_io_is_cancelled_by_drop() {
        let (mut s, mut peer) = dialed_pair().await;
        let mut buf = [0u8; 16];
        let gave_up = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await;
        assert!(gave_up.is_err(), "read {gave_up:?} with nothing sent");
        peer.write_all(b"after the cancel").unwrap();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"after the cancel");

        // A stream whose reader is blocked, then aborted.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        reader.abort();
        assert!(reader.await.unwrap_err().is_cancelled());
        peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        // EOF, not a timeout: the abort dropped (closed) the socket.
        assert_eq!(peer.read_to_end(&mut rest).unwrap(), 0);

        let s = Sock::new(ws::AF_INET, ws::IPPROTO_TCP).unwrap();
        let l = winsock::listen(s, &loopback(0)).unwrap();
        let port = u16::from_be(l.local_addr().unwrap().sin_port);
        assert!(tokio::time::timeout(Duration::from_millis(100), l.accept()).await.is_err());
        let client = std::thread::spawn(move || TcpStream::connect(("127.0.0.1", port)).map(|_| ()));
        let accepted = tokio::time::timeout(Duration::from_secs(10), l.accept()).await;
        assert!(matches!(accepted, Ok(Ok(_))), "no accept after a cancelled one");
        client.join().unwrap().unwrap();

        // A dial dropped while its connect is pending (the caller's own
        // timeout, shorter than the dial's): nothing hangs, the next dial
        // to a live listener works.
        let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        full.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        full.listen(1).unwrap();
        let full_port = full.local_addr().unwrap().as_socket().unwrap().port();
        let mut queued = Vec::new();
        for _ in 0..3 {
            let c = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            c.set_nonblocking(true).unwrap();
            let _ = c.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], full_port)).into());
            queued.push(c);
        }
        let s = Sock::new(ws::AF_INET, ws::IPPROTO_TCP).unwrap();
        let _ =
            tokio::time::timeout(Duration::from_millis(100), winsock::connect(s, &loopback(full_port), CONNECT_LIMIT))
                .await;
        let s = Sock::new(ws::AF_INET, ws::IPPROTO_TCP).unwrap();
        let to = loopback(port);
        let (dialed, accepted) = tokio::join!(winsock::connect(s, &to, CONNECT_LIMIT), l.accept());
        dialed.unwrap();
        accepted.unwrap();
        drop(queued);
    }

    /// Named pipes in bulk: 8 MiB each way at once, checked byte for byte
    /// (back-pressure, no loss); a read given up on loses nothing; the
    /// client going away ends the server's reads (EOF) and fails its
    /// writes, and the server going away does the same to the client.
    #[tokio::test]
    async fn named_pipe_bulk_cancel_and_close() {
        let ep = Endpoint::Npipe(format!("./pipe/rdnet-bulk-{}", std::process::id()));
        let l = crate::listen(&ep).await.unwrap();
        for round in 0..2u8 {
            let (client, server) = tokio::join!(crate::dial(&ep), l.accept());
            let (client, (server, _)) = (client.unwrap(), server.unwrap());
            let (mut client, mut server) = if round == 0 { (client, server) } else { (server, client) };

            let mut buf = [0u8; 4];
            assert!(tokio::time::timeout(Duration::from_millis(100), server.read(&mut buf)).await.is_err());
            client.write_all(b"late").await.unwrap();
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"late");

            let (mut crd, mut cwr) = tokio::io::split(client);
            let (mut srd, mut swr) = tokio::io::split(server);
            tokio::join!(
                send_pattern(&mut cwr, 1),
                send_pattern(&mut swr, 2),
                check_pattern(&mut srd, 1),
                check_pattern(&mut crd, 2)
            );
            let (client, mut server) = (crd.unsplit(cwr), srd.unsplit(swr));

            // One end goes away: the other reads EOF (or a broken pipe,
            // which ends the stream all the same) and cannot write.
            drop(client);
            let mut rest = Vec::new();
            let ended = tokio::time::timeout(Duration::from_secs(10), server.read_to_end(&mut rest)).await;
            assert!(matches!(ended, Ok(Ok(0)) | Ok(Err(_))), "round {round}: {ended:?}");
            let wrote = tokio::time::timeout(Duration::from_secs(10), server.write_all(b"gone")).await;
            assert!(matches!(wrote, Ok(Err(_))), "round {round}: a write to a closed pipe: {wrote:?}");
        }
    }

    const BULK: usize = 8 << 20;

    fn pattern(i: usize, k: u8) -> u8 {
        (i * 7 + i / 4093) as u8 ^ k
    }

    /// Writes [`BULK`] bytes of pattern `k`, in 100 000-byte writes.
    async fn send_pattern(wr: &mut (impl AsyncWrite + Unpin), k: u8) {
        let data: Vec<u8> = (0..BULK).map(|i| pattern(i, k)).collect();
        for chunk in data.chunks(100_000) {
            wr.write_all(chunk).await.unwrap();
        }
    }

    /// Reads [`BULK`] bytes and checks them against pattern `k`.
    async fn check_pattern(rd: &mut (impl AsyncRead + Unpin), k: u8) {
        let mut buf = vec![0u8; 50_000];
        let mut seen = 0usize;
        while seen < BULK {
            let n = rd.read(&mut buf).await.unwrap();
            assert!(n > 0, "EOF after {seen} bytes");
            for (j, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, pattern(seen + j, k), "byte {}", seen + j);
            }
            seen += n;
        }
    }

    /// Threads of this process (Toolhelp snapshot).
    fn thread_count() -> usize {
        use windows_sys::Win32::Foundation::{CloseHandle, INVALID_HANDLE_VALUE};
        use windows_sys::Win32::System::Diagnostics::ToolHelp::{
            CreateToolhelp32Snapshot, TH32CS_SNAPTHREAD, THREADENTRY32, Thread32First, Thread32Next,
        };
        use windows_sys::Win32::System::Threading::GetCurrentProcessId;
        // SAFETY: plain arguments; the snapshot handle is checked and closed.
        let snap = unsafe { CreateToolhelp32Snapshot(TH32CS_SNAPTHREAD, 0) };
        assert!(snap != INVALID_HANDLE_VALUE, "{}", io::Error::last_os_error());
        // SAFETY: no arguments.
        let me = unsafe { GetCurrentProcessId() };
        let mut entry = THREADENTRY32 { dwSize: size_of::<THREADENTRY32>() as u32, ..Default::default() };
        let mut n = 0;
        // SAFETY: `entry` is a THREADENTRY32 with its size set, as the
        // calls require; `snap` is a valid snapshot.
        let mut more = unsafe { Thread32First(snap, &mut entry) } != 0;
        while more {
            if entry.th32OwnerProcessID == me {
                n += 1;
            }
            // SAFETY: as above.
            more = unsafe { Thread32Next(snap, &mut entry) } != 0;
        }
        // SAFETY: opened above, closed once.
        unsafe { CloseHandle(snap) };
        n
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
        drop(l);
        assert!(crate::dial(&ep).await.is_err());
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
