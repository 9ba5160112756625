//! Logging set-up shared by the binaries.
//!
//! Logs go to the `-logfile` path, opened for append, or to stderr.
//! `/dev/stdout` and `/dev/stderr` mean the inherited descriptors themselves
//! (opening the path fails under systemd, where stdout is a socket). A log file that cannot be opened or stops accepting writes
//! (disk full, revoked permissions) must not stop the program: the writer
//! reports the problem once on stderr and from then on drops what it cannot
//! write, so networking goes on.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the log ends up on stdout or stderr (so a fatal error printed
/// on stderr as well would show twice).
static LOGS_TO_STD_STREAM: AtomicBool = AtomicBool::new(true);

/// Libraries whose debug output is per packet or per poll; `-debug` is
/// about our own decisions, so they stay at info (RUST_LOG overrides).
const QUIET_LIBRARIES: &[&str] =
    &["smoltcp", "hyper", "hyper_util", "h2", "mio", "netlink_proto", "netlink_sys", "rtnetlink", "zbus", "tracing"];

pub(crate) fn logs_to_std_stream() -> bool {
    LOGS_TO_STD_STREAM.load(Ordering::Relaxed)
}

/// The filter `-debug` (or not) selects when RUST_LOG is unset.
fn default_filter(debug: bool) -> String {
    let mut directives = String::from(if debug { "debug" } else { "info" });
    if debug {
        for lib in QUIET_LIBRARIES {
            directives.push_str(&format!(",{lib}=info"));
        }
    }
    directives
}
use std::sync::{Arc, Mutex};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    pub logfile: Option<PathBuf>,
    pub debug: bool,
}

/// Installs the global subscriber. `RUST_LOG` overrides the level.
pub fn init_logging(opts: &LogOptions) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter(opts.debug)));
    let writer = LogWriter::open(opts.logfile.as_deref());
    LOGS_TO_STD_STREAM.store(writer.inner.file.is_none(), Ordering::Relaxed);
    let ansi = opts.logfile.is_none() && io::IsTerminal::is_terminal(&io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

/// A log destination that never fails its caller.
#[derive(Clone)]
pub struct LogWriter {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None`: the inherited stderr or stdout (see `stdout`).
    file: Option<Mutex<File>>,
    stdout: bool,
    path: Option<PathBuf>,
    reported: AtomicBool,
}

impl LogWriter {
    pub fn open(path: Option<&Path>) -> Self {
        let stdout = path == Some(Path::new("/dev/stdout"));
        let std_stream = stdout || path == Some(Path::new("/dev/stderr"));
        let file =
            path.filter(|_| !std_stream).and_then(|p| match OpenOptions::new().create(true).append(true).open(p) {
                Ok(f) => Some(Mutex::new(f)),
                Err(e) => {
                    eprintln!("cannot open log file {}: {e}; logging to stderr", p.display());
                    None
                }
            });
        LogWriter {
            inner: Arc::new(Inner {
                file,
                stdout,
                path: path.map(Path::to_path_buf),
                reported: AtomicBool::new(false),
            }),
        }
    }

    fn write_all_logged(&self, buf: &[u8]) {
        let Some(file) = &self.inner.file else {
            let _ = if self.inner.stdout { io::stdout().lock().write_all(buf) } else { io::stderr().write_all(buf) };
            return;
        };
        let result = match file.lock() {
            Ok(mut f) => f.write_all(buf),
            Err(_) => Ok(()),
        };
        if let Err(e) = result
            && !self.inner.reported.swap(true, Ordering::Relaxed)
        {
            let path = self.inner.path.as_deref().unwrap_or(Path::new("?"));
            eprintln!("writing log file {} failed: {e}; further log lines that fail are dropped", path.display());
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all_logged(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disk_is_survived() {
        // /dev/full fails every write with ENOSPC.
        if !Path::new("/dev/full").exists() {
            return;
        }
        let mut w = LogWriter::open(Some(Path::new("/dev/full")));
        assert_eq!(w.write(b"line\n").unwrap(), 5);
        assert!(w.inner.reported.load(Ordering::Relaxed));
        assert_eq!(w.write(b"again\n").unwrap(), 6);
    }

    #[test]
    fn std_streams_are_the_inherited_descriptors() {
        for p in ["/dev/stdout", "/dev/stderr"] {
            let w = LogWriter::open(Some(Path::new(p)));
            assert!(w.inner.file.is_none(), "{p} is not opened by path");
            assert_eq!(w.inner.stdout, p == "/dev/stdout");
        }
    }

    #[test]
    fn debug_leaves_per_packet_libraries_at_info() {
        assert_eq!(default_filter(false), "info");
        let f = default_filter(true);
        assert!(f.starts_with("debug,") && f.contains("smoltcp=info"), "{f}");
        EnvFilter::new(f);
    }

    #[test]
    fn appends() {
        let dir = std::env::temp_dir().join(format!("rdnet-log-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("x.log");
        std::fs::write(&path, "first\n").unwrap();
        let mut w = LogWriter::open(Some(&path));
        w.write_all(b"second\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first\nsecond\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
