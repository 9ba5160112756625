//! Transports for platforms other than Linux and Windows (e.g. macOS): no
//! platform stream kinds; vsock, Hyper-V sockets, named pipes and inherited
//! descriptors are reported as unsupported rather than silently ignored.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::endpoint::Endpoint;

/// No platform stream kinds yet: an empty enum, so values cannot exist.
pub enum SysStream {}
pub enum SysListener {}

pub async fn dial(ep: &Endpoint) -> io::Result<SysStream> {
    Err(io::Error::new(io::ErrorKind::Unsupported, format!("{ep} is not supported on this platform yet")))
}

pub async fn listen(ep: &Endpoint) -> io::Result<SysListener> {
    Err(io::Error::new(io::ErrorKind::Unsupported, format!("{ep} is not supported on this platform yet")))
}

impl SysListener {
    pub async fn accept(&self) -> io::Result<(crate::LinkStream, String)> {
        match *self {}
    }
}

impl AsyncRead for SysStream {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match *self.get_mut() {}
    }
}

impl AsyncWrite for SysStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        match *self.get_mut() {}
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match *self.get_mut() {}
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match *self.get_mut() {}
    }
}
