//! rdnet-vm-agent: the test VM's command runner, and two small vsock and
//! unix-socket tools the VM tests use inside the guest.
//!
//! How this works. `serve PORT` listens on AF_VSOCK (any CID) port PORT; the
//! test on this side reaches it through the VMM's hybrid-vsock socket
//! (`CONNECT PORT`, `tests/e2e/src/vm.rs`). Each connection carries one
//! request and one answer, both length-prefixed, because the VMM does not
//! pass a half-close on (so "read until EOF" cannot end a request). The
//! request is a little-endian u32 length, then NUL-separated fields: a time
//! limit in milliseconds, then the program and its arguments. The agent
//! runs the program in its own process group, with stdin empty and stdout
//! and stderr captured (at most [`MAX_OUTPUT`] bytes each), kills the whole
//! group at the time limit (status 124, as coreutils' `timeout`), and
//! answers with the status (an i32; 128 + N for a signal N) and the two
//! outputs, each u32-length-prefixed. Every connection gets its own thread,
//! so a long command does not hold up the others. A program that leaves
//! children behind must redirect their output, or the answer waits for
//! them up to a second after the program itself exits.
//!
//! `dial CID PORT [DATA]` connects to vsock CID:PORT and reports whether it
//! could (exit 0) or the error (exit 1): it shows from which network
//! namespace the guest can reach the host. With DATA it then writes DATA,
//! half-closes (`shutdown(SHUT_WR)`), prints the first answer that comes
//! back (one read), and only then closes: how the transport carries a
//! half-close. `unix-send PATH DATA` writes DATA to the
//! unix socket PATH, half-closes, and prints the answer (wsl-proxy's
//! control socket takes one JSON object per connection).

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

/// Largest request accepted (a shell script and its arguments).
const MAX_REQUEST: usize = 1 << 20;
/// Most bytes of stdout and of stderr kept per command.
const MAX_OUTPUT: usize = 4 << 20;
/// How long a request may take to arrive.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// After the program exits, how long to wait for children still holding
/// its output pipes.
const PIPE_GRACE: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match strs.as_slice() {
        ["serve", port] => port.parse().map_err(|_| bad("bad port")).and_then(serve),
        ["dial", cid, port, data @ ..] if data.len() <= 1 => match (cid.parse(), port.parse()) {
            (Ok(cid), Ok(port)) => return dial(cid, port, data.first().copied()),
            _ => Err(bad("bad CID or port")),
        },
        ["unix-send", path, data] => unix_send(path, data),
        _ => Err(bad("usage: rdnet-vm-agent serve PORT | dial CID PORT [DATA] | unix-send PATH DATA")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rdnet-vm-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

fn serve(port: u32) -> io::Result<()> {
    let listener = Socket::new(Domain::VSOCK, Type::STREAM, None)?;
    listener.bind(&SockAddr::vsock(libc::VMADDR_CID_ANY, port))?;
    listener.listen(16)?;
    eprintln!("rdnet-vm-agent: listening on vsock port {port}");
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                thread::spawn(move || {
                    if let Err(e) = handle(conn) {
                        eprintln!("rdnet-vm-agent: request failed: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("rdnet-vm-agent: accept: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn handle(mut conn: Socket) -> io::Result<()> {
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut len = [0u8; 4];
    conn.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_REQUEST {
        return Err(bad("request too large"));
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    let fields: Vec<String> = body.split(|b| *b == 0).map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    let (status, out, err) = match fields.split_first() {
        Some((limit, argv)) if !argv.is_empty() => match limit.parse::<u64>() {
            Ok(ms) => run(argv, Duration::from_millis(ms)),
            Err(_) => (2, Vec::new(), b"rdnet-vm-agent: bad time limit\n".to_vec()),
        },
        _ => (2, Vec::new(), b"rdnet-vm-agent: empty request\n".to_vec()),
    };
    let mut answer = Vec::with_capacity(12 + out.len() + err.len());
    answer.extend_from_slice(&status.to_le_bytes());
    for part in [&out, &err] {
        answer.extend_from_slice(&(part.len() as u32).to_le_bytes());
        answer.extend_from_slice(part);
    }
    conn.write_all(&answer)?;
    conn.flush()
}

/// Runs `argv` for at most `limit`; returns the status and both outputs.
fn run(argv: &[String], limit: Duration) -> (i32, Vec<u8>, Vec<u8>) {
    let spawned = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return (127, Vec::new(), format!("rdnet-vm-agent: {}: {e}\n", argv[0]).into_bytes()),
    };
    let (tx, rx) = mpsc::channel();
    for (i, pipe) in [child.stdout.take().map(box_read), child.stderr.take().map(box_read)].into_iter().enumerate() {
        let Some(mut pipe) = pipe else { continue };
        let tx = tx.clone();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut pipe).take(MAX_OUTPUT as u64).read_to_end(&mut buf);
            // Drain the rest so the writer never blocks on a full pipe.
            let _ = io::copy(&mut pipe, &mut io::sink());
            let _ = tx.send((i, buf));
        });
    }
    drop(tx);
    let deadline = Instant::now() + limit;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                break 124;
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => return (125, Vec::new(), format!("rdnet-vm-agent: wait: {e}\n").into_bytes()),
        }
    };
    let mut outputs = [Vec::new(), Vec::new()];
    let grace = Instant::now() + PIPE_GRACE;
    for _ in 0..2 {
        match rx.recv_timeout(grace.saturating_duration_since(Instant::now())) {
            Ok((i, buf)) => outputs[i] = buf,
            Err(_) => break,
        }
    }
    let [out, mut err] = outputs;
    if timed_out {
        err.extend_from_slice(format!("rdnet-vm-agent: timed out after {limit:?}\n").as_bytes());
    }
    (status, out, err)
}

fn box_read<R: Read + Send + 'static>(r: R) -> Box<dyn Read + Send> {
    Box::new(r)
}

fn dial(cid: u32, port: u32, data: Option<&str>) -> ExitCode {
    let attempt =
        Socket::new(Domain::VSOCK, Type::STREAM, None).and_then(|s| s.connect(&SockAddr::vsock(cid, port)).map(|()| s));
    let mut s = match attempt {
        Ok(s) => s,
        Err(e) => {
            println!("cannot connect to vsock {cid}:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("connected to vsock {cid}:{port}");
    let Some(data) = data else { return ExitCode::SUCCESS };
    let exchange = (|| {
        s.write_all(data.as_bytes())?;
        s.shutdown(std::net::Shutdown::Write)?;
        s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        let mut answer = vec![0u8; 4096];
        let n = s.read(&mut answer)?;
        answer.truncate(n);
        Ok::<_, io::Error>(answer)
    })();
    match exchange {
        Ok(answer) => {
            println!("answer: {}", String::from_utf8_lossy(&answer));
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("exchange failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn unix_send(path: &str, data: &str) -> io::Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    s.write_all(data.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    io::stdout().write_all(&answer)
}
