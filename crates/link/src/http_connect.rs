//! gvproxy's HTTP opening on stream links (spec/COMPAT.md §3).
//!
//! gvproxy's `-listen` endpoints speak HTTP first: gvisor-tap-vsock's guest
//! forwarder (`cmd/vm`, as Podman and Lima run it) opens every connection
//! with `POST /connect HTTP/1.1`, headers and a blank line; gvproxy answers
//! nothing and u16-LE frames follow. Any other request on such a listener is
//! the HTTP API. Our own vm-switch and the Go one send frames at once.
//!
//! How this works. The server side ([`read_opening`]) looks at the first
//! bytes of a new connection: if they spell an HTTP method and a space, the
//! request head is read (bounded in size and time) and parsed with
//! `httparse`; `POST /connect` makes the connection a frame link, anything
//! else is handed on as an HTTP request. Otherwise the bytes are a frame's
//! length prefix. A raw peer's first frame is at most MTU + 14 bytes, so its
//! first two bytes cannot spell a method at the default MTU ("PO" would be a
//! 20304-byte frame); even at larger MTUs a frame whose length and
//! destination MAC read `POST ` is not something a VM sends first. Every
//! byte read while deciding is handed back, to be read again
//! ([`Prefixed`]). The client side ([`connect_request`], [`RefuseHttpAnswer`])
//! sends the request as Go's `http.Request.Write` does and turns an HTTP
//! answer (gvproxy's 400 or 404 for a wrong path) into an error that says
//! so, where it would otherwise be read as a frame of nonsense length.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The path gvproxy turns into a frame link.
pub const CONNECT_PATH: &str = "/connect";
/// Longest request head accepted before the connection is refused.
pub const MAX_HEAD: usize = 16 * 1024;
/// How long a peer that started an HTTP request may take to finish its head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

const METHODS: &[&[u8]] =
    &[b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];

/// What a new connection turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// Frames from the first byte (our vm-switch, the Go one, gvproxy's
    /// raw transports). The bytes read are the start of the first frame.
    Frames,
    /// `POST /connect`: frames follow the request head. The bytes handed
    /// back are whatever came after the head.
    Connect,
    /// Another HTTP request (`method path`), for the API. The bytes handed
    /// back are everything read, the head included.
    Http { method: String, path: String },
}

#[derive(Debug, thiserror::Error)]
pub enum OpeningError {
    #[error("reading the connection's first bytes failed")]
    Io(#[from] io::Error),
    #[error("the HTTP request head did not end within {} bytes", MAX_HEAD)]
    HeadTooLong,
    #[error("the HTTP request head did not arrive within {} s", HEAD_TIMEOUT.as_secs())]
    HeadTimeout,
    #[error("malformed HTTP request: {0}")]
    BadRequest(String),
    #[error("the connection closed before sending anything")]
    Closed,
}

/// Whether `buf` could still become the start of an HTTP method token.
fn may_be_method(buf: &[u8]) -> bool {
    METHODS.iter().any(|m| m.starts_with(buf) || buf.starts_with(m))
}

fn is_method(buf: &[u8]) -> bool {
    METHODS.iter().any(|m| buf.starts_with(m))
}

/// Reads the opening of a connection and says what it is; the bytes read
/// are returned to be read again (see [`Opening`] for which). Waits as long
/// as the peer is silent before its first byte (a VM may be), but bounds
/// the HTTP head in size and time.
pub async fn read_opening<S: AsyncRead + Unpin>(s: &mut S) -> Result<(Opening, Vec<u8>), OpeningError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    // Enough to tell a method from a length prefix.
    while buf.len() < 8 && may_be_method(&buf) && !is_method(&buf) {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() { Err(OpeningError::Closed) } else { Ok((Opening::Frames, buf)) };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if !is_method(&buf) {
        return Ok((Opening::Frames, buf));
    }
    let head = async {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let method = req.method.unwrap_or_default().to_string();
                    let path = req.path.unwrap_or_default().to_string();
                    if method == "POST" && path == CONNECT_PATH {
                        let body = content_length(req.headers).min(MAX_HEAD);
                        return Ok((head_len, body, Opening::Connect));
                    }
                    return Ok((head_len, 0, Opening::Http { method, path }));
                }
                Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(OpeningError::HeadTooLong),
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(OpeningError::BadRequest(e.to_string())),
            }
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err(OpeningError::BadRequest("the connection closed inside the request head".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let (head_len, body_len, opening) =
        tokio::time::timeout(HEAD_TIMEOUT, head).await.map_err(|_| OpeningError::HeadTimeout)??;
    match opening {
        Opening::Connect => {
            // A body (Go sends none) is not frames: skip it.
            let mut rest = buf.split_off(head_len);
            let mut skip = body_len;
            while skip > 0 {
                if !rest.is_empty() {
                    let k = skip.min(rest.len());
                    rest.drain(..k);
                    skip -= k;
                    continue;
                }
                let n = tokio::time::timeout(HEAD_TIMEOUT, s.read(&mut chunk))
                    .await
                    .map_err(|_| OpeningError::HeadTimeout)??;
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            Ok((Opening::Connect, rest))
        }
        other => Ok((other, buf)),
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> usize {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

/// The request gvisor-tap-vsock's `cmd/vm` writes (Go's
/// `http.Request.Write` of `POST /connect` with no body).
pub fn connect_request() -> Vec<u8> {
    format!("POST {CONNECT_PATH} HTTP/1.1\r\nHost: \r\nUser-Agent: rdnet-vm-switch\r\nContent-Length: 0\r\n\r\n")
        .into_bytes()
}

/// A stream whose first reads return `prefix` (bytes already taken from
/// `inner` while looking at them), then `inner`'s own. Writes go straight
/// to `inner`.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed { prefix, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.pos < me.prefix.len() {
            let n = (me.prefix.len() - me.pos).min(buf.remaining());
            buf.put_slice(&me.prefix[me.pos..me.pos + n]);
            me.pos += n;
            if me.pos == me.prefix.len() {
                me.prefix = Vec::new();
                me.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The read side of a link opened with [`connect_request`]: if the peer
/// answers with HTTP (`HTTP/1.1 400 Bad Request` from gvproxy when the
/// path is wrong, say) instead of frames, the first read fails with an
/// error naming the status line; otherwise it is the stream itself.
#[derive(Debug)]
pub struct RefuseHttpAnswer<R> {
    inner: R,
    /// Bytes read while deciding; `None` once decided.
    pending: Option<Vec<u8>>,
    /// Once decided: the bytes read while deciding, handed on first.
    passed: Vec<u8>,
    passed_pos: usize,
}

impl<R> RefuseHttpAnswer<R> {
    pub fn new(inner: R) -> Self {
        RefuseHttpAnswer { inner, pending: Some(Vec::new()), passed: Vec::new(), passed_pos: 0 }
    }

    /// Looks at nothing: for a link that was not opened with
    /// [`connect_request`], so both kinds have one type.
    pub fn passthrough(inner: R) -> Self {
        RefuseHttpAnswer { inner, pending: None, passed: Vec::new(), passed_pos: 0 }
    }
}

const HTTP_ANSWER: &[u8] = b"HTTP/";

/// Most of an HTTP answer's head that is read to report it.
const MAX_ANSWER: usize = 4096;

fn answer_error(head: &[u8]) -> io::Error {
    let text = String::from_utf8_lossy(head);
    let status = text.lines().next().unwrap_or_default().trim().to_string();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).unwrap_or_default();
    let body = body.chars().take(200).collect::<String>();
    let msg = if body.is_empty() {
        format!("the host answered POST {CONNECT_PATH} with {status:?} instead of frames")
    } else {
        format!("the host answered POST {CONNECT_PATH} with {status:?} ({body}) instead of frames")
    };
    io::Error::new(io::ErrorKind::ConnectionRefused, msg)
}

impl<R: AsyncRead + Unpin> AsyncRead for RefuseHttpAnswer<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            let Some(pending) = me.pending.as_mut() else {
                if me.passed_pos < me.passed.len() {
                    let n = (me.passed.len() - me.passed_pos).min(buf.remaining());
                    buf.put_slice(&me.passed[me.passed_pos..me.passed_pos + n]);
                    me.passed_pos += n;
                    return Poll::Ready(Ok(()));
                }
                return Pin::new(&mut me.inner).poll_read(cx, buf);
            };
            let answer_so_far = pending.starts_with(HTTP_ANSWER) || HTTP_ANSWER.starts_with(pending);
            let head_done = pending.windows(4).any(|w| w == b"\r\n\r\n");
            if !answer_so_far {
                me.passed = std::mem::take(pending);
                me.pending = None;
                continue;
            }
            if pending.starts_with(HTTP_ANSWER) && (head_done || pending.len() >= MAX_ANSWER) {
                return Poll::Ready(Err(answer_error(pending)));
            }
            let mut chunk = [0u8; 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut me.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                if pending.starts_with(HTTP_ANSWER) {
                    return Poll::Ready(Err(answer_error(pending)));
                }
                // EOF inside "HTTP/": hand on what there is, then EOF.
                me.passed = std::mem::take(pending);
                me.pending = None;
                continue;
            }
            pending.extend_from_slice(rb.filled());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, duplex};

    async fn opening_of(bytes: &[u8]) -> Result<(Opening, Vec<u8>), OpeningError> {
        let (mut a, mut b) = duplex(1 << 16);
        a.write_all(bytes).await.unwrap();
        drop(a);
        read_opening(&mut b).await
    }

    #[tokio::test]
    async fn raw_frames_are_frames() {
        // A DHCP-sized frame: length 342, then a broadcast MAC.
        let mut f = vec![0x56, 0x01];
        f.extend_from_slice(&[0xff; 20]);
        let (o, rest) = opening_of(&f).await.unwrap();
        assert_eq!(o, Opening::Frames);
        assert_eq!(rest, f, "every byte read is handed back");
        // "GE" as a length, but not followed by "T ": frames.
        let (o, _) = opening_of(b"GEX\x00\x00\x00\x00\x00\x00").await.unwrap();
        assert_eq!(o, Opening::Frames);
        assert!(matches!(opening_of(b"").await, Err(OpeningError::Closed)));
    }

    #[tokio::test]
    async fn post_connect_becomes_a_frame_link() {
        let mut bytes = connect_request();
        bytes.extend_from_slice(&[0x2a, 0x00, 1, 2, 3]);
        let (o, rest) = opening_of(&bytes).await.unwrap();
        assert_eq!(o, Opening::Connect);
        assert_eq!(rest, [0x2a, 0x00, 1, 2, 3], "frames after the head are kept");
        // As gvisor-tap-vsock's cmd/vm writes it (Go's Request.Write).
        let go = b"POST /connect HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(opening_of(go).await.unwrap(), (Opening::Connect, Vec::new()));
    }

    #[tokio::test]
    async fn a_head_in_pieces_and_a_body_skipped() {
        let (mut a, mut b) = duplex(1 << 16);
        let t = tokio::spawn(async move {
            for piece in [&b"PO"[..], b"ST /conn", b"ect HTTP/1.1\r\nContent-Length: 3\r\n", b"\r\nabc", b"\x05\x00"] {
                a.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            a
        });
        let (o, rest) = read_opening(&mut b).await.unwrap();
        assert_eq!(o, Opening::Connect);
        let _a = t.await.unwrap();
        let mut all = rest;
        while all.len() < 2 {
            let mut x = [0u8; 8];
            let n = b.read(&mut x).await.unwrap();
            all.extend_from_slice(&x[..n]);
        }
        assert_eq!(all, [5, 0]);
    }

    #[tokio::test]
    async fn other_requests_are_http() {
        let req = b"GET /services/forwarder/all HTTP/1.1\r\nHost: x\r\n\r\n";
        let (o, rest) = opening_of(req).await.unwrap();
        assert_eq!(o, Opening::Http { method: "GET".into(), path: "/services/forwarder/all".into() });
        assert_eq!(rest, req);
        let (o, _) = opening_of(b"POST /connect/x HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(matches!(o, Opening::Http { .. }));
    }

    #[tokio::test]
    async fn hostile_heads_are_bounded() {
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert!(matches!(opening_of(&long).await, Err(OpeningError::HeadTooLong)));
        assert!(matches!(opening_of(b"GET \x01\x02 HTTP/1.1\r\n\r\n").await, Err(OpeningError::BadRequest(_))));
        assert!(matches!(opening_of(b"POST /conn").await, Err(OpeningError::BadRequest(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_head_times_out() {
        let (mut a, mut b) = duplex(1 << 16);
        a.write_all(b"POST /connect HTTP/1.1\r\n").await.unwrap();
        assert!(matches!(read_opening(&mut b).await, Err(OpeningError::HeadTimeout)));
        drop(a);
    }

    #[tokio::test]
    async fn prefixed_reads_the_prefix_first() {
        let (mut a, b) = duplex(64);
        a.write_all(b"world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(b"hello ".to_vec(), b);
        let mut s = String::new();
        p.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }

    #[tokio::test]
    async fn an_http_answer_is_an_error_that_names_it() {
        let (mut a, b) = duplex(1 << 16);
        a.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n\r\nbad path").await.unwrap();
        drop(a);
        let mut r = RefuseHttpAnswer::new(b);
        let mut x = [0u8; 16];
        let e = r.read(&mut x).await.unwrap_err();
        assert!(e.to_string().contains("400 Bad Request") && e.to_string().contains("bad path"), "{e}");
    }

    #[tokio::test]
    async fn passthrough_looks_at_nothing() {
        let (mut a, b) = duplex(1 << 16);
        a.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await.unwrap();
        drop(a);
        let mut got = Vec::new();
        RefuseHttpAnswer::passthrough(b).read_to_end(&mut got).await.unwrap();
        assert!(got.starts_with(b"HTTP/1.1 400"));
    }

    #[tokio::test]
    async fn frames_pass_through_untouched() {
        for bytes in [&[0x2a, 0x00, 1, 2, 3][..], b"HTX", b"H"] {
            let (mut a, b) = duplex(1 << 16);
            a.write_all(bytes).await.unwrap();
            drop(a);
            let mut r = RefuseHttpAnswer::new(b);
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, bytes);
        }
    }
}
