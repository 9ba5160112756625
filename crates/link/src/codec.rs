//! Frame codecs for byte-stream links.
//!
//! A stream link carries Ethernet frames each preceded by its length: u16
//! little-endian ("stdio"/"hyperkit", the default between vm-switch and
//! host-switch) or u32 big-endian ("qemu"). A zero length or one above the
//! negotiated maximum cannot be resynchronised from, so it is a protocol error
//! that ends the connection. Decoding works on whatever bytes one `read`
//! returned, so a single syscall can yield many frames.

use std::str::FromStr;

/// The largest frame a u16 prefix can describe.
pub const MAX_U16_FRAME: usize = u16::MAX as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// u16 little-endian length prefix (gvproxy "stdio"/"hyperkit").
    U16Le,
    /// u32 big-endian length prefix (gvproxy "qemu").
    U32Be,
}

impl Framing {
    pub fn prefix_len(self) -> usize {
        match self {
            Framing::U16Le => 2,
            Framing::U32Be => 4,
        }
    }

    /// Writes the length prefix for a frame of `len` bytes.
    pub fn put_prefix(self, len: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
        match self {
            Framing::U16Le => {
                let l = u16::try_from(len).map_err(|_| FrameError::TooLong { len, max: MAX_U16_FRAME })?;
                out.extend_from_slice(&l.to_le_bytes());
            }
            Framing::U32Be => {
                let l = u32::try_from(len).map_err(|_| FrameError::TooLong { len, max: u32::MAX as usize })?;
                out.extend_from_slice(&l.to_be_bytes());
            }
        }
        Ok(())
    }

    fn read_prefix(self, bytes: &[u8]) -> usize {
        match self {
            Framing::U16Le => u16::from_le_bytes([bytes[0], bytes[1]]) as usize,
            Framing::U32Be => u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize,
        }
    }
}

impl FromStr for Framing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "u16le" | "stdio" | "hyperkit" => Ok(Framing::U16Le),
            "u32be" | "qemu" => Ok(Framing::U32Be),
            _ => Err(format!("unknown framing {s:?} (expected u16le or u32be)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("zero-length frame")]
    Empty,
    #[error("frame length {len} exceeds the maximum {max}")]
    TooLong { len: usize, max: usize },
}

/// Appends one framed frame (prefix and payload) to `out`.
pub fn encode_frame(framing: Framing, frame: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if frame.is_empty() {
        return Err(FrameError::Empty);
    }
    framing.put_prefix(frame.len(), out)?;
    out.extend_from_slice(frame);
    Ok(())
}

/// Splits a stream into frames.
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    framing: Framing,
    max_frame: usize,
}

impl Decoder {
    pub fn new(framing: Framing, max_frame: usize) -> Self {
        Decoder { framing, max_frame }
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Returns the first complete frame in `buf` and the number of bytes it
    /// used (prefix included), `Ok(None)` if more bytes are needed.
    pub fn decode<'a>(&self, buf: &'a [u8]) -> Result<Option<(&'a [u8], usize)>, FrameError> {
        let p = self.framing.prefix_len();
        if buf.len() < p {
            return Ok(None);
        }
        let len = self.framing.read_prefix(buf);
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_frame {
            return Err(FrameError::TooLong { len, max: self.max_frame });
        }
        match buf.get(p..p + len) {
            Some(frame) => Ok(Some((frame, p + len))),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_framings() {
        for framing in [Framing::U16Le, Framing::U32Be] {
            let mut buf = Vec::new();
            encode_frame(framing, b"hello", &mut buf).unwrap();
            encode_frame(framing, &[7u8; 1500], &mut buf).unwrap();
            let d = Decoder::new(framing, 65535);
            let (f1, n1) = d.decode(&buf).unwrap().unwrap();
            assert_eq!(f1, b"hello");
            let (f2, n2) = d.decode(&buf[n1..]).unwrap().unwrap();
            assert_eq!(f2.len(), 1500);
            assert_eq!(n1 + n2, buf.len());
        }
    }

    #[test]
    fn prefix_byte_order() {
        let mut buf = Vec::new();
        encode_frame(Framing::U16Le, &[0u8; 0x0102], &mut buf).unwrap();
        assert_eq!(&buf[..2], &[0x02, 0x01]);
        buf.clear();
        encode_frame(Framing::U32Be, &[0u8; 0x0102], &mut buf).unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0x01, 0x02]);
    }

    #[test]
    fn partial_input_waits() {
        let mut buf = Vec::new();
        encode_frame(Framing::U16Le, b"abcdef", &mut buf).unwrap();
        let d = Decoder::new(Framing::U16Le, 1514);
        for cut in 0..buf.len() {
            assert_eq!(d.decode(&buf[..cut]).unwrap(), None);
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        let d = Decoder::new(Framing::U16Le, 1514);
        assert_eq!(d.decode(&[0, 0, 1]), Err(FrameError::Empty));
        assert_eq!(d.decode(&[0xff, 0xff]), Err(FrameError::TooLong { len: 65535, max: 1514 }));
        let mut out = Vec::new();
        assert_eq!(encode_frame(Framing::U16Le, &[], &mut out), Err(FrameError::Empty));
        assert!(encode_frame(Framing::U16Le, &vec![0; 70000], &mut out).is_err());
    }

    #[test]
    fn never_panics_on_noise() {
        let d = Decoder::new(Framing::U32Be, 65535);
        let mut x: u32 = 12345;
        for _ in 0..10_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let len = (x % 9) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 4 * 8)) as u8).collect();
            let _ = d.decode(&bytes);
        }
    }
}
