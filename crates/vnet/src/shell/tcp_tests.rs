//! The TCP NAT through a whole engine, without root: the test is the VM (a
//! socketpair carrying u16-LE frames) and the host is this process's
//! loopback. Real time, so only behaviour that does not wait on timers:
//! connect-first, RST on refusal, TCP timestamps in the SYN-ACK, a new
//! flow for a 4-tuple right after its close, half-close and resets both
//! ways, back-pressure both ways, `--max-flows`, reordering and
//! retransmission, TIME-WAIT holding no flow, and idle memory going back.
//! The core alone, with a virtual clock and scripted host streams, is
//! tested in `nat::tcp::harness` (long timers included).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::rc::Rc;
use std::time::Duration;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl,
    TcpPacket, TcpRepr, TcpSeqNumber, TcpTimestampRepr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::NetConfig;
use crate::shell::test_vm::{TestVm, run_engine};
use crate::shell::{Engine, EngineConfig};

const GUEST_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x02]);
const GUEST: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 2);
const ALIAS: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 254);

/// A TCP segment the NAT sent the guest.
#[derive(Debug)]
struct Segment {
    src_port: u16,
    dst_port: u16,
    control: TcpControl,
    ack: bool,
    seq: TcpSeqNumber,
    timestamp: Option<TcpTimestampRepr>,
    payload: Vec<u8>,
    ack_number: u32,
    window_len: u16,
    window_scale: Option<u8>,
}

struct Vm(TestVm);

impl Vm {
    fn connect(engine: &Rc<Engine>) -> Vm {
        Vm(TestVm::connect(engine))
    }

    async fn send_tcp(&mut self, dst: SocketAddrV4, src_port: u16, control: TcpControl, seq: u32, ack: Option<u32>) {
        self.send_data(dst, src_port, control, seq, ack, &[]).await;
    }

    async fn send_data(
        &mut self,
        dst: SocketAddrV4,
        src_port: u16,
        control: TcpControl,
        seq: u32,
        ack: Option<u32>,
        payload: &[u8],
    ) {
        let tcp = TcpRepr {
            src_port,
            dst_port: dst.port(),
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: 64_000,
            window_scale: if control == TcpControl::Syn { Some(7) } else { None },
            max_seg_size: if control == TcpControl::Syn { Some(1460) } else { None },
            sack_permitted: false,
            sack_ranges: [None; 3],
            // As Linux sends them: what lets it reuse its TIME-WAIT ports.
            timestamp: Some(TcpTimestampRepr::new(1000 + seq, 0)),
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: GUEST,
            dst_addr: *dst.ip(),
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut frame = Vec::new();
        rdnet_wire::frame::ipv4(&mut frame, GUEST_MAC, self.0.gateway_mac, &ip, |buf| {
            tcp.emit(
                &mut TcpPacket::new_unchecked(buf),
                &IpAddress::Ipv4(GUEST),
                &IpAddress::Ipv4(*dst.ip()),
                &ChecksumCapabilities::default(),
            )
        });
        self.0.send_frame(&frame).await;
    }

    /// The next TCP segment to the guest (other frames skipped), if one
    /// comes within 5 s.
    async fn recv_tcp(&mut self) -> Option<Segment> {
        self.recv_tcp_within(Duration::from_secs(5)).await
    }

    async fn recv_tcp_within(&mut self, wait: Duration) -> Option<Segment> {
        self.0
            .recv_within(wait, |frame| {
                let eth = EthernetFrame::new_checked(frame).ok()?;
                if eth.ethertype() != EthernetProtocol::Ipv4 {
                    return None;
                }
                let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
                if ip.next_header() != IpProtocol::Tcp || ip.dst_addr() != GUEST {
                    return None;
                }
                let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
                assert!(tcp.verify_checksum(&IpAddress::Ipv4(ip.src_addr()), &IpAddress::Ipv4(GUEST)));
                let repr = TcpRepr::parse(
                    &tcp,
                    &IpAddress::Ipv4(ip.src_addr()),
                    &IpAddress::Ipv4(GUEST),
                    &ChecksumCapabilities::default(),
                )
                .ok()?;
                Some(Segment {
                    src_port: repr.src_port,
                    dst_port: repr.dst_port,
                    control: repr.control,
                    ack: repr.ack_number.is_some(),
                    seq: repr.seq_number,
                    timestamp: repr.timestamp,
                    payload: repr.payload.to_vec(),
                    ack_number: repr.ack_number.map_or(0, |a| a.0 as u32),
                    window_len: repr.window_len,
                    window_scale: repr.window_scale,
                })
            })
            .await
    }
}

fn run(test: impl AsyncFnOnce(Rc<Engine>)) {
    run_with(EngineConfig::default(), test);
}

fn run_with(config: EngineConfig, test: impl AsyncFnOnce(Rc<Engine>)) {
    run_engine(NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap(), config, test);
}

#[test]
fn connect_first_then_a_syn_ack_with_timestamps_and_a_rst_for_a_closed_port() {
    run(async |engine| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut vm = Vm::connect(&engine);

        vm.send_tcp(SocketAddrV4::new(ALIAS, port), 40_000, TcpControl::Syn, 100, None).await;
        let syn_ack = vm.recv_tcp().await.expect("a SYN-ACK");
        assert_eq!((syn_ack.control, syn_ack.ack), (TcpControl::Syn, true), "{syn_ack:?}");
        assert_eq!((syn_ack.src_port, syn_ack.dst_port), (port, 40_000));
        // Connect first: the host side was there before the guest heard back.
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        let Ok(Ok(_host)) = accepted else { panic!("no host connection behind the SYN-ACK") };
        // Our SYN-ACK echoes the guest's timestamp, so its kernel may
        // reuse the port from TIME-WAIT (issue 15's falling connection rate).
        let ts = syn_ack.timestamp.expect("a timestamp option in the SYN-ACK");
        assert_eq!(ts.tsecr, 1100);

        // The guest completes the handshake; the flow is established.
        vm.send_tcp(SocketAddrV4::new(ALIAS, port), 40_000, TcpControl::None, 101, Some(syn_ack.seq.0 as u32 + 1))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!((engine.tcp.borrow().len(), engine.tcp.borrow().connecting()), (1, 0));

        // A port nobody listens on: RST at once, and no flow kept.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        vm.send_tcp(SocketAddrV4::new(ALIAS, closed), 40_001, TcpControl::Syn, 500, None).await;
        let rst = vm.recv_tcp().await.expect("a RST");
        assert_eq!((rst.control, rst.src_port, rst.dst_port), (TcpControl::Rst, closed, 40_001), "{rst:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(engine.tcp.borrow().len(), 1);
    });
}

#[test]
fn a_guest_that_closed_first_gets_a_new_flow_for_the_same_4_tuple_at_once() {
    run(async |engine| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = SocketAddrV4::new(ALIAS, listener.local_addr().unwrap().port());
        let mut vm = Vm::connect(&engine);
        let mut seq = 1000u32;
        for round in 0..3 {
            vm.send_tcp(dst, 40_100, TcpControl::Syn, seq, None).await;
            let syn_ack = vm.recv_tcp().await.unwrap_or_else(|| panic!("no SYN-ACK in round {round}"));
            assert_eq!((syn_ack.control, syn_ack.ack), (TcpControl::Syn, true), "round {round}: {syn_ack:?}");
            let (mut host, _) = listener.accept().await.unwrap();
            let ours = syn_ack.seq.0 as u32 + 1;
            // Established, then the guest closes first (FIN), as a guest
            // left in TIME-WAIT does.
            vm.send_tcp(dst, 40_100, TcpControl::None, seq + 1, Some(ours)).await;
            vm.send_tcp(dst, 40_100, TcpControl::Fin, seq + 1, Some(ours)).await;
            // The host sees EOF and closes too; the NAT sends its FIN.
            let mut buf = [0u8; 1];
            assert_eq!(host.read(&mut buf).await.unwrap(), 0, "round {round}: no EOF on the host side");
            drop(host);
            // (After the ACK of the guest's FIN, maybe in a segment of its own.)
            let mut fin = vm.recv_tcp().await.unwrap_or_else(|| panic!("nothing in round {round}"));
            if fin.control == TcpControl::None {
                fin = vm.recv_tcp().await.unwrap_or_else(|| panic!("no FIN in round {round}"));
            }
            assert_eq!(fin.control, TcpControl::Fin, "round {round}: {fin:?}");
            vm.send_tcp(dst, 40_100, TcpControl::None, seq + 2, Some(fin.seq.0 as u32 + 1)).await;
            // The guest reuses its port at once, with a higher sequence
            // number, as Linux does from TIME-WAIT.
            seq += 100_000;
        }
    });
}

/// Opens a flow from the guest's `port` to `dst`: returns the host's side,
/// the next sequence numbers (the guest's, the NAT's) and the NAT's window
/// scale.
async fn establish(
    vm: &mut Vm,
    listener: &tokio::net::TcpListener,
    dst: SocketAddrV4,
    port: u16,
) -> (tokio::net::TcpStream, u32, u32, u8) {
    vm.send_tcp(dst, port, TcpControl::Syn, 7000, None).await;
    let syn_ack = vm.recv_tcp().await.expect("a SYN-ACK");
    assert_eq!(syn_ack.control, TcpControl::Syn, "{syn_ack:?}");
    let (host, _) = listener.accept().await.unwrap();
    let theirs = syn_ack.seq.0 as u32 + 1;
    vm.send_tcp(dst, port, TcpControl::None, 7001, Some(theirs)).await;
    (host, 7001, theirs, syn_ack.window_scale.unwrap_or(0))
}

#[test]
fn half_close_both_ways_delivers_everything_before_each_fin() {
    run(async |engine| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = SocketAddrV4::new(ALIAS, listener.local_addr().unwrap().port());
        let mut vm = Vm::connect(&engine);
        let (mut host, seq, theirs, _) = establish(&mut vm, &listener, dst, 40_200).await;
        // Guest → host, then the guest's FIN: the host reads it all, then EOF.
        vm.send_data(dst, 40_200, TcpControl::Fin, seq, Some(theirs), b"hello").await;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), host.read_to_end(&mut got)).await.unwrap().unwrap();
        assert_eq!(got, b"hello");
        // The other way still works: host → guest, then the host's FIN.
        host.write_all(b"world").await.unwrap();
        host.shutdown().await.unwrap();
        let mut data = Vec::new();
        let mut fin = false;
        while !fin {
            let seg = vm.recv_tcp().await.expect("the host's data and FIN");
            data.extend_from_slice(&seg.payload);
            fin = seg.control == TcpControl::Fin;
        }
        assert_eq!(data, b"world");
    });
}

#[test]
fn resets_cross_both_ways() {
    run(async |engine| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = SocketAddrV4::new(ALIAS, listener.local_addr().unwrap().port());
        let mut vm = Vm::connect(&engine);
        // A guest RST aborts the host connection (a reset, not an EOF).
        let (mut host, seq, theirs, _) = establish(&mut vm, &listener, dst, 40_300).await;
        vm.send_tcp(dst, 40_300, TcpControl::Rst, seq, Some(theirs)).await;
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), host.read(&mut buf)).await.unwrap();
        assert_eq!(read.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset));
        // A host reset reaches the guest as a RST.
        let (host, ..) = establish(&mut vm, &listener, dst, 40_301).await;
        socket2::SockRef::from(&host).set_linger(Some(Duration::ZERO)).unwrap();
        drop(host);
        let rst = vm.recv_tcp().await.expect("a RST");
        assert_eq!((rst.control, rst.dst_port), (TcpControl::Rst, 40_301), "{rst:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(engine.tcp.borrow().len(), 0, "both flows are gone");
    });
}

#[test]
fn max_flows_refuses_further_syns_with_a_rst() {
    run_with(EngineConfig { max_tcp_flows: 2, ..EngineConfig::default() }, async |engine| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = SocketAddrV4::new(ALIAS, listener.local_addr().unwrap().port());
        let mut vm = Vm::connect(&engine);
        let _a = establish(&mut vm, &listener, dst, 40_400).await;
        // Half-open counts too: this one never completes its handshake.
        vm.send_tcp(dst, 40_401, TcpControl::Syn, 1, None).await;
        assert_eq!(vm.recv_tcp().await.map(|s| s.control), Some(TcpControl::Syn));
        vm.send_tcp(dst, 40_402, TcpControl::Syn, 1, None).await;
        let rst = vm.recv_tcp().await.expect("a RST");
        assert_eq!((rst.control, rst.dst_port), (TcpControl::Rst, 40_402), "{rst:?}");
        assert_eq!((engine.tcp.borrow().len(), engine.tcp.borrow().stats().refused_syns), (2, 1));
    });
}

#[test]
fn a_host_that_does_not_read_closes_the_guests_window() {
    run(async |engine| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = SocketAddrV4::new(ALIAS, listener.local_addr().unwrap().port());
        let mut vm = Vm::connect(&engine);
        // The host accepts and never reads.
        let (_host, mut seq, theirs, shift) = establish(&mut vm, &listener, dst, 40_500).await;
        let chunk = [0x5a; 1400];
        let (mut acked, mut window) = (seq, 64_000usize);
        let mut sent = 0usize;
        loop {
            // Fill what the window allows, then see what was acknowledged.
            while (seq.wrapping_sub(acked) as usize) + chunk.len() <= window {
                vm.send_data(dst, 40_500, TcpControl::None, seq, Some(theirs), &chunk).await;
                seq = seq.wrapping_add(chunk.len() as u32);
                sent += chunk.len();
            }
            let mut progressed = false;
            while let Some(ack) = vm.recv_tcp_within(Duration::from_millis(200)).await {
                acked = ack.ack_number;
                window = usize::from(ack.window_len) << shift;
                progressed = true;
            }
            if window < chunk.len() {
                break;
            }
            assert!(progressed, "no ACK after {sent} bytes");
            assert!(sent < 64 << 20, "the window never closed after {sent} bytes");
        }
        // Everything acknowledged is held: the NAT's buffer and the host's socket.
        assert!(sent >= 2 << 20, "closed after only {sent} bytes");
        assert_eq!(engine.tcp.borrow().len(), 1);
    });
}

#[test]
fn a_guest_that_does_not_acknowledge_stops_the_host_reads() {
    run(async |engine| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = SocketAddrV4::new(ALIAS, listener.local_addr().unwrap().port());
        let mut vm = Vm::connect(&engine);
        // The guest's window: 64 000 << 7 bytes, and it never acknowledges.
        let (mut host, ..) = establish(&mut vm, &listener, dst, 40_600).await;
        let block = vec![0xa5u8; 1 << 20];
        let mut written = 0usize;
        let writing = async {
            loop {
                host.write_all(&block).await.unwrap();
                written += block.len();
            }
        };
        // The host's writes stall: the NAT stopped reading its socket.
        let _ = tokio::time::timeout(Duration::from_secs(2), writing).await;
        let mut to_guest = 0usize;
        while let Some(seg) = vm.recv_tcp_within(Duration::from_millis(200)).await {
            to_guest += seg.payload.len();
        }
        // What the host wrote is held by its socket, the NAT's 2 MiB send
        // buffer and the guest's window; no more was read, nothing dropped.
        eprintln!("host wrote {written} bytes, {to_guest} reached the guest");
        assert!(written < 32 << 20, "the host wrote {written} bytes unhindered");
        assert!(to_guest <= 64_000 << 7, "{to_guest} bytes sent beyond the guest's window");
        assert!(to_guest > 0, "nothing reached the guest");
    });
}

#[test]
fn out_of_order_guest_data_reaches_the_host_in_order_and_unacknowledged_data_is_sent_again() {
    run(async |engine| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = SocketAddrV4::new(ALIAS, listener.local_addr().unwrap().port());
        let mut vm = Vm::connect(&engine);
        let (mut host, seq, theirs, _) = establish(&mut vm, &listener, dst, 40_700).await;
        // The second half first, then the first.
        vm.send_data(dst, 40_700, TcpControl::None, seq + 5, Some(theirs), b"world").await;
        vm.send_data(dst, 40_700, TcpControl::None, seq, Some(theirs), b"hello").await;
        let mut got = [0u8; 10];
        tokio::time::timeout(Duration::from_secs(5), host.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(&got, b"helloworld");
        // Host data the guest does not acknowledge comes again, same bytes
        // at the same sequence number, once the retransmission timer fires.
        host.write_all(b"ping").await.unwrap();
        let mut first = vm.recv_tcp().await.expect("the host's data");
        while first.payload.is_empty() {
            first = vm.recv_tcp().await.expect("the host's data");
        }
        assert_eq!(first.payload, b"ping");
        let again = loop {
            let seg = vm.recv_tcp().await.expect("a retransmission");
            if !seg.payload.is_empty() {
                break seg;
            }
        };
        assert_eq!((again.seq, &again.payload[..]), (first.seq, &b"ping"[..]));
    });
}

#[test]
fn time_wait_holds_no_flow() {
    run(async |engine| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = SocketAddrV4::new(ALIAS, listener.local_addr().unwrap().port());
        let mut vm = Vm::connect(&engine);
        let (host, seq, ..) = establish(&mut vm, &listener, dst, 40_800).await;
        // The host closes first, so the NAT's socket is the one that ends
        // in TIME-WAIT once the guest's FIN is acknowledged.
        drop(host);
        let fin = loop {
            let seg = vm.recv_tcp().await.expect("the NAT's FIN");
            if seg.control == TcpControl::Fin {
                break seg;
            }
        };
        vm.send_tcp(dst, 40_800, TcpControl::Fin, seq, Some(fin.seq.0 as u32 + 1)).await;
        let ack = vm.recv_tcp().await.expect("the ACK of the guest's FIN");
        assert_eq!(ack.ack_number, seq + 1, "{ack:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(engine.tcp.borrow().len(), 0, "a flow in TIME-WAIT was kept");
    });
}

#[test]
fn an_idle_flow_gives_its_buffer_memory_back() {
    run(async |engine| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = SocketAddrV4::new(ALIAS, listener.local_addr().unwrap().port());
        let mut vm = Vm::connect(&engine);
        let (mut host, mut seq, theirs, _) = establish(&mut vm, &listener, dst, 40_900).await;
        let chunk = [0x33u8; 1400];
        for _ in 0..32 {
            vm.send_data(dst, 40_900, TcpControl::None, seq, Some(theirs), &chunk).await;
            seq += chunk.len() as u32;
        }
        let mut got = vec![0u8; 32 * chunk.len()];
        tokio::time::timeout(Duration::from_secs(5), host.read_exact(&mut got)).await.unwrap().unwrap();
        assert!(engine.tcp.borrow().committed() > 0, "the data went through uncommitted memory");
        // Both buffers empty for IDLE_RELEASE: the memory goes back; the
        // flow stays.
        tokio::time::sleep(crate::nat::tcp::IDLE_RELEASE + Duration::from_millis(500)).await;
        assert_eq!((engine.tcp.borrow().committed(), engine.tcp.borrow().len()), (0, 1));
    });
}

/// Keepalive (a host peer that vanishes is noticed) is turned on once a
/// flow has lived a second, not at connect: most connections end sooner
/// and spare the system calls (issue 18). A silent flow gets it too.
#[test]
fn a_host_connection_gets_keepalive_once_it_has_lived_a_second() {
    fn timer(port: u16) -> String {
        // Our connecting socket: the one whose peer is the listener.
        let out = std::process::Command::new("ss")
            .args(["-tnoH", "state", "established", "dst", &format!("127.0.0.1:{port}")])
            .output()
            .expect("ss (iproute2)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    run(async |engine| {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dst = SocketAddrV4::new(ALIAS, port);
        let mut vm = Vm::connect(&engine);
        let (_host, ..) = establish(&mut vm, &listener, dst, 41_000).await;
        let young = timer(port);
        assert!(!young.is_empty() && !young.contains("keepalive"), "{young}");
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let old = timer(port);
        assert!(old.contains("keepalive"), "{old}");
    });
}
