//! The link's frame codecs over arbitrary bytes: `Decoder` (u16-LE and
//! u32-BE) and `FrameReader` fed in fuzzer-chosen chunks must agree, never
//! panic, never return a frame longer than the maximum, and stop at the
//! first framing error.
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use rdnet_link::codec::{Decoder, Framing};
use rdnet_link::{FrameReader, LinkError};
use tokio::io::{AsyncRead, ReadBuf};

/// Hands out the stream in chunks of `chunk` bytes (a slow link).
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// Frames the decoder finds in `data`, and whether it ended in an error.
fn decode_all(d: &Decoder, mut data: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut frames = Vec::new();
    loop {
        match d.decode(data) {
            Ok(Some((frame, used))) => {
                assert!(!frame.is_empty() && frame.len() <= d.max_frame());
                assert!(used <= data.len() && used == frame.len() + d.framing().prefix_len());
                frames.push(frame.to_vec());
                data = &data[used..];
            }
            Ok(None) => return (frames, false),
            Err(_) => return (frames, true),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&ctl, data)) = input.split_first() else { return };
    let framing = if ctl & 1 == 0 { Framing::U16Le } else { Framing::U32Be };
    let max = [1514, 9014, 65535][usize::from(ctl >> 1) % 3];
    let chunk = usize::from(ctl >> 3).max(1);
    let d = Decoder::new(framing, max);
    let (frames, failed) = decode_all(&d, data);

    let mut reader = FrameReader::new(Chunked { data, chunk }, d);
    let mut got = Vec::new();
    let end = futures::executor::block_on(async {
        loop {
            match reader.next_frame().await {
                Ok(Some(f)) => got.push(f.to_vec()),
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    assert_eq!(got, frames, "FrameReader and Decoder disagree");
    match end {
        Ok(()) => assert!(!failed),
        Err(LinkError::Truncated) => assert!(!failed),
        Err(_) => assert!(failed),
    }
});
