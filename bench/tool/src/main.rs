//! Load generators for `bench/run`: request/response rate and many held
//! connections. Every loop is bounded by time or count. The connection-rate
//! and latency rows use `bench/load.c` instead: a client that must run at
//! the kernel path's speed for its veth baseline to mean anything.
#![deny(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server: every byte read is written back.
    Server {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// 1-byte ping-pong on one connection; prints round trips per second.
    Rr {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Opens `count` connections, checks an echo on each, holds them for
    /// `hold` seconds (so RSS can be read), then closes; prints how many
    /// echoed correctly.
    Hold {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        count: usize,
        #[arg(long, default_value_t = 5)]
        hold: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Server { listen } => server(listen),
        Cmd::Rr { connect, seconds } => println!("{:.0}", rr(connect, Duration::from_secs(seconds))),
        Cmd::Hold { connect, count, hold } => println!("{}", hold_many(connect, count, Duration::from_secs(hold))),
    }
}

fn server(listen: SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(listen).await.expect("bind");
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
}

fn rr(addr: SocketAddr, dur: Duration) -> f64 {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut b = [0u8; 1];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        for _ in 0..100 {
            if s.write_all(b"x").is_err() || s.read_exact(&mut b).is_err() {
                return n as f64 / start.elapsed().as_secs_f64();
            }
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn hold_many(addr: SocketAddr, count: usize, hold: Duration) -> usize {
    let ok = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut conns = Vec::with_capacity(count);
    for i in 0..count {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(10)) else { continue };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let msg = format!("{i:08}");
        let mut back = [0u8; 8];
        if s.write_all(msg.as_bytes()).is_ok() && s.read_exact(&mut back).is_ok() && back == msg.as_bytes() {
            ok.fetch_add(1, Ordering::Relaxed);
        }
        conns.push(s);
    }
    eprintln!("holding {} connections for {:?}", conns.len(), hold);
    std::thread::sleep(hold);
    stop.store(true, Ordering::Relaxed);
    drop(conns);
    ok.load(Ordering::Relaxed) as usize
}
