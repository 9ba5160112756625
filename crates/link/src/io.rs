//! Async frame reading and writing over any byte stream.
//!
//! The reader pulls as many bytes as one `read` gives (up to its buffer) and
//! hands out every complete frame in them before reading again, so a busy
//! link costs one syscall per batch, not per frame. The writer collects
//! prefix and frame into one buffer so a batch leaves in one `write`.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{Decoder, FrameError, Framing, encode_frame};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link I/O failed")]
    Io(#[from] io::Error),
    #[error("framing error")]
    Frame(#[from] FrameError),
    #[error("link closed in the middle of a frame")]
    Truncated,
}

pub struct FrameReader<R> {
    inner: R,
    decoder: Decoder,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, decoder: Decoder) -> Self {
        let cap = Self::capacity_for(decoder.max_frame());
        FrameReader { inner, decoder, buf: vec![0; cap].into_boxed_slice(), start: 0, end: 0 }
    }

    /// Makes room for frames of up to `max_frame` bytes, for a link whose
    /// limit may rise later ([`set_max_frame`](Self::set_max_frame)).
    pub fn reserve_for(&mut self, max_frame: usize) {
        let cap = Self::capacity_for(max_frame);
        if cap > self.buf.len() {
            let mut buf = vec![0; cap].into_boxed_slice();
            buf[..self.end - self.start].copy_from_slice(&self.buf[self.start..self.end]);
            self.end -= self.start;
            self.start = 0;
            self.buf = buf;
        }
    }

    /// Changes the largest frame accepted from now on.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.reserve_for(max_frame);
        self.decoder = Decoder::new(self.decoder.framing(), max_frame);
    }

    fn capacity_for(max_frame: usize) -> usize {
        // Room for eight maximal frames: with 64 KiB segments on the link
        // (offload), two per read made the reader wake twice as often as
        // four, and eight moved most (bench/RESULTS.md).
        (max_frame + 8).max(64 * 1024) * 8
    }

    /// True if a complete frame is already buffered (no read needed).
    pub fn has_buffered_frame(&self) -> bool {
        matches!(self.decoder.decode(&self.buf[self.start..self.end]), Ok(Some(_)) | Err(_))
    }

    /// The next frame; `Ok(None)` on a clean end of stream.
    pub async fn next_frame(&mut self) -> Result<Option<&[u8]>, LinkError> {
        Ok(self.next_frame_mut().await?.map(|f| &*f))
    }

    /// Like [`next_frame`](Self::next_frame), but the frame may be changed
    /// in place (it is the reader's buffer, valid until the next call).
    pub async fn next_frame_mut(&mut self) -> Result<Option<&mut [u8]>, LinkError> {
        Ok(self.next_frame_in_batch().await?.map(|(f, _)| f))
    }

    /// Like [`next_frame_mut`](Self::next_frame_mut), with whether more
    /// bytes were already read behind the frame: then it is not the last
    /// of what one read brought, and whatever a receiver would answer it
    /// with can wait for the rest of the batch.
    pub async fn next_frame_in_batch(&mut self) -> Result<Option<(&mut [u8], bool)>, LinkError> {
        loop {
            let found = self.decoder.decode(&self.buf[self.start..self.end])?.map(|(f, used)| (f.len(), used));
            if let Some((len, used)) = found {
                let frame_start = self.start + used - len;
                self.start += used;
                let more = self.start < self.end;
                return Ok(Some((&mut self.buf[frame_start..frame_start + len], more)));
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.end == self.buf.len() {
                // Make room: keep the partial frame at the front.
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = self.inner.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return if self.start == self.end { Ok(None) } else { Err(LinkError::Truncated) };
            }
            self.end += n;
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

pub struct FrameWriter<W> {
    inner: W,
    framing: Framing,
    /// Queued bytes are `buf[..used]`; the rest is scratch kept from
    /// earlier batches, so filling a frame in place never zeroes memory.
    buf: Vec<u8>,
    used: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W, framing: Framing) -> Self {
        FrameWriter { inner, framing, buf: Vec::with_capacity(128 * 1024), used: 0 }
    }

    /// Queues one frame; nothing is written until [`flush`](Self::flush).
    pub fn push(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        self.buf.truncate(self.used);
        encode_frame(self.framing, frame, &mut self.buf)?;
        self.used = self.buf.len();
        Ok(())
    }

    /// Queues a frame of at most `max` bytes that `fill` writes in place
    /// (a read straight from a device, say) and returns the length of;
    /// `Ok(0)` queues nothing. Saves copying the frame from a buffer of
    /// its own.
    pub fn push_with(&mut self, max: usize, fill: impl FnOnce(&mut [u8]) -> io::Result<usize>) -> io::Result<usize> {
        let prefix = self.framing.prefix_len();
        let start = self.used + prefix;
        if self.buf.len() < start + max {
            self.buf.resize(start + max, 0);
        }
        let n = fill(&mut self.buf[start..start + max])?.min(max);
        if n == 0 {
            return Ok(0);
        }
        let mut p = Vec::with_capacity(4);
        self.framing.put_prefix(n, &mut p).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.buf[self.used..start].copy_from_slice(&p);
        self.used = start + n;
        Ok(n)
    }

    pub fn pending(&self) -> usize {
        self.used
    }

    /// Writes what is queued; then tells the stream the writer is done
    /// for now (a quiet stream stops watching for room, see `FdStream`).
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.used > 0 {
            self.inner.write_all(&self.buf[..self.used]).await?;
            self.used = 0;
            self.inner.flush().await?;
        }
        Ok(())
    }

    pub async fn send(&mut self, frame: &[u8]) -> Result<(), LinkError> {
        self.push(frame)?;
        self.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn many_frames_through_a_pipe() {
        let (a, b) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            let mut w = FrameWriter::new(a, Framing::U16Le);
            for i in 0..1000u32 {
                let len = 1 + (i as usize * 37) % 1514;
                w.push(&vec![i as u8; len]).unwrap();
                if i % 7 == 0 {
                    w.flush().await.unwrap();
                }
            }
            w.flush().await.unwrap();
        });
        let mut r = FrameReader::new(b, Decoder::new(Framing::U16Le, 1514));
        for i in 0..1000u32 {
            let f = r.next_frame().await.unwrap().unwrap();
            assert_eq!(f.len(), 1 + (i as usize * 37) % 1514);
            assert!(f.iter().all(|b| *b == i as u8));
        }
        writer.await.unwrap();
        assert!(r.next_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn frames_filled_in_place_mix_with_pushed_ones() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(a, Framing::U16Le);
        w.push(b"first").unwrap();
        assert_eq!(w.push_with(100, |_| Ok(0)).unwrap(), 0, "nothing queued");
        assert!(w.push_with(100, |_| Err(io::ErrorKind::WouldBlock.into())).is_err());
        let n = w
            .push_with(100, |buf| {
                buf[..6].copy_from_slice(b"second");
                Ok(6)
            })
            .unwrap();
        assert_eq!(n, 6);
        w.push(b"third").unwrap();
        assert_eq!(w.pending(), 3 * 2 + 5 + 6 + 5);
        w.flush().await.unwrap();
        assert_eq!(w.pending(), 0);
        // Scratch left from the first batch must not leak into the next.
        w.push(b"4").unwrap();
        w.flush().await.unwrap();
        drop(w);
        let mut r = FrameReader::new(b, Decoder::new(Framing::U16Le, 1514));
        for want in [&b"first"[..], b"second", b"third", b"4"] {
            assert_eq!(r.next_frame().await.unwrap().unwrap(), want);
        }
        assert!(r.next_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn maximal_frames_fit() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(a, Framing::U16Le);
        for _ in 0..5 {
            w.push(&[1u8; 65535]).unwrap();
        }
        let t = tokio::spawn(async move {
            w.flush().await.unwrap();
        });
        let mut r = FrameReader::new(b, Decoder::new(Framing::U16Le, 65535));
        for _ in 0..5 {
            assert_eq!(r.next_frame().await.unwrap().unwrap().len(), 65535);
        }
        t.await.unwrap();
    }

    #[tokio::test]
    async fn bad_prefix_and_truncation_are_errors() {
        let mut r = FrameReader::new(&[0u8, 0, 1, 2][..], Decoder::new(Framing::U16Le, 1514));
        assert!(matches!(r.next_frame().await, Err(LinkError::Frame(FrameError::Empty))));
        let mut r = FrameReader::new(&[0xffu8, 0x7f][..], Decoder::new(Framing::U16Le, 1514));
        assert!(matches!(r.next_frame().await, Err(LinkError::Frame(FrameError::TooLong { .. }))));
        let mut r = FrameReader::new(&[10u8, 0, 1, 2][..], Decoder::new(Framing::U16Le, 1514));
        assert!(matches!(r.next_frame().await, Err(LinkError::Truncated)));
    }
}
