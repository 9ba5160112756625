//! A pcap capture of the frames host-switch receives and sends (gvproxy
//! writes `capture.pcap` in debug mode; so do we).
//!
//! How this works: recording a frame only copies it, with its pcap record
//! header, into a chunk in memory on the engine thread; a full chunk (or
//! one older than [`HANDOFF_AFTER`], checked on each frame and on the
//! engine's tick) goes to a writer thread over a bounded
//! channel, and the writer thread does the file I/O. The packet path never
//! waits on the disk: when the writer falls behind and the channel is full,
//! the chunk is dropped and counted. The file is capped at a size
//! (`--capture-max-bytes`); the frame that would cross the cap stops the
//! capture, with one log line saying so. A write error also stops it (once
//! logged); the network goes on either way.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The cap when none is given: a few hundred MiB fit any laptop's disk.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// A chunk is handed to the writer once this big...
const CHUNK: usize = 256 * 1024;
/// ...or this old, so the file stays readable while host-switch runs (the
/// engine also ticks [`Capture::hand_off_if_due`] this often when quiet).
pub const HANDOFF_AFTER: Duration = Duration::from_secs(1);
/// Chunks waiting for the writer: 4 MiB of frames.
const QUEUE: usize = 16;
const PCAP_HEADER: usize = 24;
const RECORD_HEADER: usize = 16;

pub struct Capture {
    tx: Option<SyncSender<Vec<u8>>>,
    writer: Option<JoinHandle<()>>,
    chunk: Vec<u8>,
    chunk_started: Instant,
    snaplen: u32,
    /// Bytes of the file so far, counting chunks handed to the writer.
    size: u64,
    max_bytes: u64,
    /// Frames lost because the writer fell behind.
    dropped_frames: u64,
    chunk_frames: u64,
}

impl Capture {
    /// Creates (truncates) `path`, writes the pcap header and starts the
    /// writer thread. The file will not grow beyond `max_bytes`.
    pub fn create(path: &Path, snaplen: u32, max_bytes: u64) -> std::io::Result<Self> {
        let mut out = BufWriter::with_capacity(CHUNK, File::create(path)?);
        out.write_all(&0xa1b2_c3d4u32.to_le_bytes())?; // magic, microsecond stamps
        out.write_all(&2u16.to_le_bytes())?;
        out.write_all(&4u16.to_le_bytes())?;
        out.write_all(&0i32.to_le_bytes())?; // GMT offset
        out.write_all(&0u32.to_le_bytes())?; // accuracy
        out.write_all(&snaplen.to_le_bytes())?;
        out.write_all(&1u32.to_le_bytes())?; // LINKTYPE_ETHERNET
        out.flush()?;
        let (tx, rx) = sync_channel(QUEUE);
        let display = path.display().to_string();
        let writer = std::thread::Builder::new().name("pcap".into()).spawn(move || write_chunks(out, rx, &display))?;
        Ok(Capture {
            tx: Some(tx),
            writer: Some(writer),
            chunk: Vec::with_capacity(CHUNK + 64 * 1024),
            chunk_started: Instant::now(),
            snaplen,
            size: PCAP_HEADER as u64,
            max_bytes,
            dropped_frames: 0,
            chunk_frames: 0,
        })
    }

    /// Copies one frame into the capture (cheap: no I/O here).
    pub fn record(&mut self, frame: &[u8]) {
        if self.tx.is_none() {
            return;
        }
        let caplen = frame.len().min(self.snaplen as usize);
        let record = (RECORD_HEADER + caplen) as u64;
        if self.size + (self.chunk.len() as u64) + record > self.max_bytes {
            self.hand_off();
            tracing::info!(
                "packet capture reached its cap of {} bytes (--capture-max-bytes): capturing stops",
                self.max_bytes
            );
            self.stop();
            return;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.chunk.extend_from_slice(&(now.as_secs() as u32).to_le_bytes());
        self.chunk.extend_from_slice(&now.subsec_micros().to_le_bytes());
        self.chunk.extend_from_slice(&(caplen as u32).to_le_bytes());
        self.chunk.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        self.chunk.extend_from_slice(&frame[..caplen]);
        self.chunk_frames += 1;
        if self.chunk.len() >= CHUNK || self.chunk_started.elapsed() >= HANDOFF_AFTER {
            self.hand_off();
        }
    }

    /// Whether frames are still being captured.
    pub fn is_running(&self) -> bool {
        self.tx.is_some()
    }

    /// Hands the chunk to the writer if it has waited long enough.
    pub fn hand_off_if_due(&mut self) {
        if self.chunk_started.elapsed() >= HANDOFF_AFTER {
            self.hand_off();
        }
    }

    /// Frames lost so far because the disk did not keep up.
    pub fn dropped_frames(&self) -> u64 {
        self.dropped_frames
    }

    fn hand_off(&mut self) {
        self.chunk_started = Instant::now();
        if self.chunk.is_empty() {
            return;
        }
        let Some(tx) = &self.tx else { return };
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK + 64 * 1024));
        let len = chunk.len() as u64;
        match tx.try_send(chunk) {
            Ok(()) => self.size += len,
            Err(TrySendError::Full(_)) => {
                if self.dropped_frames == 0 {
                    tracing::warn!("packet capture: the disk does not keep up; frames are left out");
                }
                self.dropped_frames += self.chunk_frames;
            }
            // The writer stopped (a write error, logged there).
            Err(TrySendError::Disconnected(_)) => self.tx = None,
        }
        self.chunk_frames = 0;
    }

    /// Stops capturing: what is queued is written, the file is closed.
    fn stop(&mut self) {
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.hand_off();
        self.stop();
    }
}

fn write_chunks(mut out: BufWriter<File>, rx: Receiver<Vec<u8>>, path: &str) {
    for chunk in rx {
        if let Err(e) = out.write_all(&chunk).and_then(|()| out.flush()) {
            tracing::warn!(path, error = %e, "writing the packet capture failed; capturing stops");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("rdnet-cap-{name}-{}.pcap", std::process::id()))
    }

    #[test]
    fn header_and_records() {
        let path = temp("records");
        let mut c = Capture::create(&path, 65535, DEFAULT_MAX_BYTES).unwrap();
        c.record(&[1u8; 60]);
        c.record(&[2u8; 1514]);
        drop(c);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..4], &0xa1b2_c3d4u32.to_le_bytes());
        assert_eq!(bytes.len(), 24 + 16 + 60 + 16 + 1514);
        assert_eq!(u32::from_le_bytes(bytes[24 + 8..24 + 12].try_into().unwrap()), 60);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn the_file_stays_within_its_cap() {
        let path = temp("cap");
        let cap = 100_000;
        let mut c = Capture::create(&path, 65535, cap).unwrap();
        for _ in 0..1000 {
            c.record(&[3u8; 1514]);
        }
        drop(c);
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= cap, "{len} > {cap}");
        // Whole records only: as many as fit.
        assert_eq!(len, 24 + 65 * (16 + 1514));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_capture_that_cannot_be_written_stops_quietly() {
        if !Path::new("/dev/full").exists() {
            return;
        }
        // /dev/full takes nothing: the header write fails at once.
        assert!(Capture::create(Path::new("/dev/full"), 65535, DEFAULT_MAX_BYTES).is_err());
    }
}
