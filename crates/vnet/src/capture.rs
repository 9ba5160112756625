//! A pcap capture of the frames host-switch receives and sends (gvproxy
//! writes `capture.pcap` in debug mode; so do we).
//!
//! Writing is best effort: the first failure is logged and capturing stops,
//! the network goes on.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Capture {
    out: Option<BufWriter<File>>,
    snaplen: u32,
}

impl Capture {
    /// Creates (truncates) `path` and writes the pcap header.
    pub fn create(path: &Path, snaplen: u32) -> std::io::Result<Self> {
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(&0xa1b2_c3d4u32.to_le_bytes())?; // magic, microsecond stamps
        out.write_all(&2u16.to_le_bytes())?;
        out.write_all(&4u16.to_le_bytes())?;
        out.write_all(&0i32.to_le_bytes())?; // GMT offset
        out.write_all(&0u32.to_le_bytes())?; // accuracy
        out.write_all(&snaplen.to_le_bytes())?;
        out.write_all(&1u32.to_le_bytes())?; // LINKTYPE_ETHERNET
        out.flush()?;
        Ok(Capture { out: Some(out), snaplen })
    }

    pub fn record(&mut self, frame: &[u8]) {
        let Some(out) = self.out.as_mut() else { return };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let caplen = frame.len().min(self.snaplen as usize);
        let result = (|| {
            out.write_all(&(now.as_secs() as u32).to_le_bytes())?;
            out.write_all(&now.subsec_micros().to_le_bytes())?;
            out.write_all(&(caplen as u32).to_le_bytes())?;
            out.write_all(&(frame.len() as u32).to_le_bytes())?;
            out.write_all(&frame[..caplen])?;
            // Debug aid: readable while host-switch runs.
            out.flush()
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, "packet capture failed; capturing stops");
            self.out = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_records() {
        let path = std::env::temp_dir().join(format!("rdnet-cap-{}.pcap", std::process::id()));
        let mut c = Capture::create(&path, 65535).unwrap();
        c.record(&[1u8; 60]);
        c.record(&[2u8; 1514]);
        drop(c);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..4], &0xa1b2_c3d4u32.to_le_bytes());
        assert_eq!(bytes.len(), 24 + 16 + 60 + 16 + 1514);
        assert_eq!(u32::from_le_bytes(bytes[24 + 8..24 + 12].try_into().unwrap()), 60);
        let _ = std::fs::remove_file(&path);
    }
}
