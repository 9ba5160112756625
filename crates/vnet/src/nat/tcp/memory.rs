//! A TCP flow's buffer memory: which bytes are about to be written, so they
//! are committed first ([`crate::sys::LazyRegion`]), and when the memory may
//! be given back.
//!
//! How this works. A flow's region holds its receive buffer (guest → host)
//! and then its transmit buffer (host → guest), both smoltcp ring buffers.
//! Two writers touch them, and each is told apart here before it writes:
//!
//! - *A host read*, into the free space that smoltcp's `send` offers in the
//!   transmit buffer. Where that space is not committed yet, the read goes
//!   to a small buffer on the stack first ([`HostRead::Probe`]) and only the
//!   bytes that arrived are committed and copied in, so a connection whose
//!   host is silent commits nothing however often its task is woken. Where
//!   it is committed (data is flowing), the read goes straight into the
//!   buffer, committing ahead [`READ_AHEAD`] bytes or as many as the host
//!   has sent since the last release when that is more (growth by doubling,
//!   as a `Vec` grows): a bulk flow soon reads as much per call as with no
//!   commits at all. Growth follows bytes that arrived, not commits: a read
//!   that finds nothing leaves the next one as large as it was.
//! - *smoltcp*, placing a guest segment's payload into the receive ring.
//!   That ring maps sequence numbers onto positions linearly: the byte with
//!   sequence number S sits at (S − origin) mod capacity, where origin is the
//!   guest's first data byte (its ISN + 1), because the ring starts at
//!   position 0 and reading moves the read position and smoltcp's
//!   `remote_seq_no` forward together (the capacity, a power of two, divides
//!   2^32, so this survives sequence wrap-around). smoltcp writes only inside
//!   its receive window, which never reaches past rcv_nxt + free space
//!   (rcv_nxt = origin + bytes taken out + bytes queued). So before a segment
//!   goes to smoltcp, the part of it inside that span is committed.
//!
//! A refused commit is returned to the flow, which resets the connection
//! (and counts it): the process never dies for want of memory.
//!
//! *Giving memory back.* When both buffers are empty for a while the flow
//! calls [`FlowMemory::release`], unless out-of-order guest data waits past
//! rcv_nxt: smoltcp keeps it in the free part of the ring, and a release
//! would turn it into zeros. The furthest in-window data end seen tells.

use smoltcp::wire::{TcpPacket, TcpSeqNumber};

use crate::sys::{CommitError, LazyRegion};

/// The least a host read into committed memory may fill (and commit) at once.
pub const READ_AHEAD: usize = 64 * 1024;
/// The most a probing host read takes (the stack buffer's size).
pub const PROBE: usize = crate::sys::CHUNK;

/// How to make a host read into the transmit buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRead {
    /// Straight into the first `n` bytes of the offered slice (committed).
    Direct(usize),
    /// Into a stack buffer of at most [`PROBE`] bytes, then
    /// [`FlowMemory::commit_probe`] and a copy: nothing is committed here yet.
    Probe,
}

pub struct FlowMemory {
    region: LazyRegion,
    rx_len: usize,
    /// The guest's first data byte (ISN + 1), once its SYN was accepted.
    origin: Option<u32>,
    /// Bytes taken out of the receive buffer (mod 2^32).
    taken: u32,
    /// The end of the furthest guest data seen inside the window.
    furthest: Option<u32>,
    /// Written since the last release.
    dirty: bool,
    /// Bytes host reads brought since the last release (saturating).
    from_host: usize,
}

impl FlowMemory {
    /// Takes charge of `region`, already split at `rx_len` into the receive
    /// and transmit buffers (whose contract, [`LazyRegion`]'s, stays with
    /// the caller: this value owns the region and must outlive them).
    /// `None` unless `rx_len` is a power of two inside the region (the
    /// sequence mapping needs one).
    pub fn new(region: LazyRegion, rx_len: usize) -> Option<FlowMemory> {
        if !rx_len.is_power_of_two() || rx_len > 1 << 31 || rx_len > region.len() {
            return None;
        }
        Some(FlowMemory { region, rx_len, origin: None, taken: 0, furthest: None, dirty: false, from_host: 0 })
    }

    /// The guest's SYN (sequence number `syn_seq`) was accepted by smoltcp.
    pub fn set_origin(&mut self, syn_seq: TcpSeqNumber) {
        self.origin.get_or_insert((syn_seq.0 as u32).wrapping_add(1));
    }

    pub fn has_origin(&self) -> bool {
        self.origin.is_some()
    }

    /// Before smoltcp sees a guest segment: commits what its payload may be
    /// written to. `recv_queue`: the socket's queued received bytes.
    pub fn before_guest_segment(&mut self, seg: &TcpPacket<&[u8]>, recv_queue: usize) -> Result<(), CommitError> {
        let len = seg.payload().len();
        if len == 0 {
            return Ok(());
        }
        // Data of a segment that carries SYN starts after it.
        let seq = (seg.seq_number().0 as u32).wrapping_add(u32::from(seg.syn()));
        self.before_guest_data(seq, len, recv_queue)
    }

    /// How much of a guest segment's data fits the receive buffer's free
    /// space: `None` when all of it does (or it has none), else how many
    /// of its first bytes. A guest never sends past the window it was
    /// given, which is never more than that space; smoltcp, though, checks
    /// a segment that comes before it sent anything after its SYN-ACK
    /// against that SYN-ACK's unscaled 65535 shifted by the window scale
    /// (4 MiB for our 2 MiB buffer), takes data up to there, and cannot
    /// place all of it: its assembler then counts bytes the ring never got,
    /// and the host is sent whatever the ring held there. So the part past
    /// the buffer is cut off before smoltcp sees the segment.
    pub fn room_for(&self, seg: &TcpPacket<&[u8]>, recv_queue: usize) -> Option<usize> {
        let len = seg.payload().len();
        let origin = self.origin?;
        let free = self.rx_len.saturating_sub(recv_queue) as i64;
        // A zero window's probes are smoltcp's to answer (it takes none of
        // their data).
        if len == 0 || free == 0 {
            return None;
        }
        let seq = (seg.seq_number().0 as u32).wrapping_add(u32::from(seg.syn()));
        let rel = i64::from(seq.wrapping_sub(self.rcv_nxt(origin, recv_queue)) as i32);
        (rel + len as i64 > free).then(|| (free - rel).clamp(0, len as i64) as usize)
    }

    /// `len` bytes from sequence number `seq` are about to reach smoltcp.
    fn before_guest_data(&mut self, seq: u32, len: usize, recv_queue: usize) -> Result<(), CommitError> {
        self.dirty = true;
        let Some(origin) = self.origin else {
            // smoltcp writes no data before it accepted a SYN; should it,
            // the whole receive buffer is ready.
            self.region.wrote(0, self.rx_len);
            return self.region.commit(0, self.rx_len);
        };
        let rcv_nxt = self.rcv_nxt(origin, recv_queue);
        let free = self.rx_len.saturating_sub(recv_queue) as i64;
        // The segment relative to rcv_nxt, clipped to the window [0, free).
        let rel = i64::from(seq.wrapping_sub(rcv_nxt) as i32);
        let (lo, hi) = (rel.max(0), (rel + len as i64).min(free));
        if lo >= hi {
            return Ok(());
        }
        let end = rcv_nxt.wrapping_add(hi as u32);
        if self.furthest.is_none_or(|f| (end.wrapping_sub(f) as i32) > 0) {
            self.furthest = Some(end);
        }
        let pos = rcv_nxt.wrapping_add(lo as u32).wrapping_sub(origin) as usize % self.rx_len;
        let n = (hi - lo) as usize;
        let first = n.min(self.rx_len - pos);
        // The receive buffer starts the region: ring positions are offsets.
        self.region.wrote(pos, first);
        self.region.wrote(0, n - first);
        self.region.commit(pos, first)?;
        self.region.commit(0, n - first)
    }

    fn rcv_nxt(&self, origin: u32, recv_queue: usize) -> u32 {
        origin.wrapping_add(self.taken).wrapping_add(recv_queue as u32)
    }

    /// How a host read into `buf`, a slice of the transmit buffer that
    /// smoltcp's `send` offers, is to be made; for a direct read, commits
    /// what it may fill first.
    pub fn before_host_read(&mut self, buf: &[u8]) -> Result<HostRead, CommitError> {
        let Some(offset) = self.region.offset_of(buf.as_ptr()) else { return Ok(HostRead::Direct(buf.len())) };
        if buf.is_empty() || !self.region.is_committed_at(offset) {
            return Ok(HostRead::Probe);
        }
        let n = buf.len().min(READ_AHEAD.max(self.from_host));
        self.region.commit(offset, n)?;
        self.dirty = true;
        Ok(HostRead::Direct(n))
    }

    /// A direct host read filled `filled`, the start of the slice it was
    /// given.
    pub fn read_from_host(&mut self, filled: &[u8]) {
        self.from_host = self.from_host.saturating_add(filled.len());
        if let Some(offset) = self.region.offset_of(filled.as_ptr()) {
            self.region.wrote(offset, filled.len());
        }
    }

    /// A probing read brought `n` bytes: commits the start of `buf` for
    /// them (the caller then copies them in).
    pub fn commit_probe(&mut self, buf: &[u8], n: usize) -> Result<(), CommitError> {
        let Some(offset) = self.region.offset_of(buf.as_ptr()) else { return Ok(()) };
        self.dirty = true;
        let n = n.min(buf.len());
        self.region.commit(offset, n)?;
        self.read_from_host(&buf[..n]);
        Ok(())
    }

    /// `n` bytes were taken out of the receive buffer.
    pub fn taken(&mut self, n: usize) {
        self.taken = self.taken.wrapping_add(n as u32);
    }

    /// Whether the memory can be given back: something was written since
    /// the last release, both buffers are empty and no out-of-order data
    /// waits in the receive ring.
    pub fn releasable(&self, recv_queue: usize, send_queue: usize) -> bool {
        if !self.dirty || recv_queue != 0 || send_queue != 0 {
            return false;
        }
        match (self.origin, self.furthest) {
            (Some(origin), Some(f)) => (f.wrapping_sub(self.rcv_nxt(origin, 0)) as i32) <= 0,
            _ => true,
        }
    }

    /// Gives the memory back (see [`LazyRegion::release`]).
    pub fn release(&mut self) {
        self.region.release();
        self.dirty = false;
        self.from_host = 0;
    }

    /// Bytes committed now.
    pub fn committed(&self) -> usize {
        self.region.committed()
    }

    /// See [`LazyRegion::unreported_writes`].
    #[cfg(test)]
    pub fn unreported_writes(&self) -> Vec<usize> {
        self.region.unreported_writes()
    }
}

/// How many ended flows' regions [`RegionPool`] keeps.
pub const POOL_REGIONS: usize = 16;
/// The most a kept region may hold on to: one that held more is released
/// first (so the pool pins at most `POOL_REGIONS` × this much memory). A
/// connection that moved a few bytes each way counts about 96 KiB here
/// (a chunk each way, and a host read's [`READ_AHEAD`]), though it wrote
/// only a page or two of it.
pub const POOL_KEEP: usize = 8 * crate::sys::CHUNK;

/// The regions of flows that ended, for the next flows: a short connection
/// then costs no `mmap`, no `munmap` (with its TLB flush) and, where the
/// pages stay (see [`LazyRegion::recycle`]), no page faults. Those were
/// about a sixth of host-switch's CPU per connection (issue 18).
#[derive(Default)]
pub struct RegionPool {
    spare: Vec<LazyRegion>,
}

impl RegionPool {
    /// A region of `len` bytes: a kept one if it has the size, else new.
    pub fn take(&mut self, len: usize) -> Option<LazyRegion> {
        match self.spare.pop() {
            Some(region) if region.len() == len => Some(region),
            _ => LazyRegion::new(len),
        }
    }

    /// Keeps `memory`'s region for a next flow, if there is room.
    ///
    /// # Safety
    ///
    /// As [`LazyRegion::recycle`]: the buffers the region was split into
    /// (the flow's smoltcp socket) are gone.
    #[allow(unsafe_code)]
    pub unsafe fn give_back(&mut self, memory: FlowMemory) {
        let mut region = memory.region;
        if self.spare.len() >= POOL_REGIONS {
            return;
        }
        if region.committed() > POOL_KEEP {
            region.release();
        }
        // SAFETY: the caller's contract.
        unsafe { region.recycle() };
        self.spare.push(region);
    }

    /// Regions kept now.
    pub fn len(&self) -> usize {
        self.spare.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spare.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::CHUNK;
    use smoltcp::iface::{Config, Interface, SocketSet};
    use smoltcp::phy::{ChecksumCapabilities, Device, DeviceCapabilities, Medium, RxToken, TxToken};
    use smoltcp::socket::tcp;
    use smoltcp::time::Instant;
    use smoltcp::wire::{
        HardwareAddress, IpAddress, IpCidr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl, TcpRepr,
    };

    const US: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
    const GUEST: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);
    const RX: usize = 4 * CHUNK;

    /// One packet in, whatever smoltcp sends out.
    #[derive(Default)]
    struct Wire {
        rx: Option<Vec<u8>>,
        tx: Vec<Vec<u8>>,
    }
    struct Rx(Vec<u8>);
    struct Tx<'a>(&'a mut Vec<Vec<u8>>);
    impl RxToken for Rx {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&self.0)
        }
    }
    impl TxToken for Tx<'_> {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            let mut buf = vec![0; len];
            let r = f(&mut buf);
            self.0.push(buf);
            r
        }
    }
    impl Device for Wire {
        type RxToken<'a> = Rx;
        type TxToken<'a> = Tx<'a>;
        fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
            let rx = self.rx.take()?;
            Some((Rx(rx), Tx(&mut self.tx)))
        }
        fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
            Some(Tx(&mut self.tx))
        }
        fn capabilities(&self) -> DeviceCapabilities {
            let mut caps = DeviceCapabilities::default();
            caps.medium = Medium::Ip;
            caps.max_transmission_unit = 1500;
            caps
        }
    }

    fn segment(seq: u32, ack: Option<u32>, control: TcpControl, payload: &[u8]) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: 1234,
            dst_port: 80,
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: 65535,
            window_scale: None,
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: GUEST,
            dst_addr: US,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0; 20 + tcp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
        tcp.emit(&mut TcpPacket::new_unchecked(&mut buf[20..]), &IpAddress::Ipv4(GUEST), &IpAddress::Ipv4(US), &caps);
        buf
    }

    struct Rig {
        iface: Interface,
        wire: Wire,
        sockets: SocketSet<'static>,
        handle: smoltcp::iface::SocketHandle,
        memory: FlowMemory,
        now: i64,
    }

    impl Rig {
        fn new() -> Rig {
            let (memory, rx, tx) = flow_memory(RX, 4 * CHUNK).unwrap();
            let mut wire = Wire::default();
            let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut wire, Instant::from_millis(0));
            iface.update_ip_addrs(|a| a.push(IpCidr::new(IpAddress::Ipv4(US), 24)).unwrap());
            let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
            socket.set_ack_delay(None);
            socket.listen(80).unwrap();
            let mut sockets = SocketSet::new(Vec::new());
            let handle = sockets.add(socket);
            Rig { iface, wire, sockets, handle, memory, now: 0 }
        }

        fn socket(&mut self) -> &mut tcp::Socket<'static> {
            self.sockets.get_mut(self.handle)
        }

        /// Hands one guest packet to smoltcp the way `tcp.rs` does:
        /// commit first, learn the origin once the SYN is taken.
        fn feed(&mut self, packet: Vec<u8>) {
            let queued = self.socket().recv_queue();
            let ip = Ipv4Packet::new_checked(&packet[..]).unwrap();
            let seg = TcpPacket::new_checked(ip.payload()).unwrap();
            self.memory.before_guest_segment(&seg, queued).unwrap();
            let syn = seg.syn().then(|| seg.seq_number());
            self.wire.rx = Some(packet.clone());
            self.now += 1;
            self.iface.poll(Instant::from_millis(self.now), &mut self.wire, &mut self.sockets);
            if let Some(seq) = syn
                && !matches!(self.socket().state(), tcp::State::Listen | tcp::State::SynSent | tcp::State::Closed)
            {
                self.memory.set_origin(seq);
            }
        }

        fn take(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            while self.socket().recv_queue() > 0 {
                let got = self.socket().recv(|b| (b.len(), b.to_vec())).unwrap();
                self.memory.taken(got.len());
                out.extend(got);
            }
            out
        }
    }

    /// A region split into the two buffers, as `tcp.rs` makes one.
    #[allow(unsafe_code)]
    fn flow_memory(rx: usize, tx: usize) -> Option<(FlowMemory, &'static mut [u8], &'static mut [u8])> {
        let mut region = crate::sys::LazyRegion::new(rx + tx)?;
        // SAFETY: every test binds the three together and uses the slices
        // only while the `FlowMemory` (which owns the region) lives.
        let (a, b) = unsafe { region.split(rx) }?;
        Some((FlowMemory::new(region, rx)?, a, b))
    }

    fn pattern(from: usize, n: usize) -> Vec<u8> {
        (from..from + n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// smoltcp driven through a handshake, data in and out of order across
    /// the ring's wrap and a sequence-number wrap, a release and more data:
    /// in debug builds every byte smoltcp or a "host read" writes must have
    /// been committed first (an unpredicted write is a SIGSEGV), and what
    /// comes out is what went in.
    #[test]
    fn commits_what_smoltcp_writes_and_releases_only_when_safe() {
        // On Windows an unforeseen write is committed by the fault handler
        // and counted instead of crashing: none may happen here either.
        let faults = crate::sys::fault_commits_on_this_thread();
        let mut rig = Rig::new();
        // An ISN just below the 2^32 wrap.
        let isn = u32::MAX - 5000;
        rig.feed(segment(isn, None, TcpControl::Syn, &[]));
        let synack = rig.wire.tx.pop().expect("SYN-ACK");
        let ours = TcpPacket::new_checked(&synack[20..]).unwrap().seq_number().0 as u32;
        assert!(rig.memory.has_origin());
        let mut seq = isn.wrapping_add(1);
        let ack = Some(ours.wrapping_add(1));
        rig.feed(segment(seq, ack, TcpControl::None, &[]));
        assert_eq!(rig.socket().state(), tcp::State::Established);
        assert_eq!(rig.memory.committed(), 0, "a handshake commits nothing");

        // A little data: one chunk.
        let data = pattern(0, 100);
        rig.feed(segment(seq, ack, TcpControl::Psh, &data));
        seq = seq.wrapping_add(100);
        assert_eq!(rig.take(), data);
        assert_eq!(rig.memory.committed(), CHUNK);

        // Several ring lengths in 1400-byte segments, with one segment
        // held back and sent after its successor (out of order) each round.
        let mut sent = 100;
        let mut got = Vec::new();
        for round in 0..16 {
            let a = pattern(sent, 1400);
            let b = pattern(sent + 1400, 1400);
            rig.feed(segment(seq.wrapping_add(1400), ack, TcpControl::Psh, &b));
            assert!(!rig.memory.releasable(0, 0), "out-of-order data waits (round {round})");
            rig.feed(segment(seq, ack, TcpControl::Psh, &a));
            seq = seq.wrapping_add(2800);
            sent += 2800;
            for i in 0..8 {
                let c = pattern(sent, 1400);
                rig.feed(segment(seq, ack, TcpControl::Psh, &c));
                seq = seq.wrapping_add(1400);
                sent += 1400;
                if (round + i) % 3 == 0 {
                    got.extend(rig.take());
                }
            }
            got.extend(rig.take());
        }
        assert_eq!(got, pattern(100, sent - 100));
        assert!(sent > 3 * RX, "the ring wrapped");

        // Host → guest: a "host read" into what `send` offers.
        let out = pattern(0, 3000);
        let Rig { sockets, handle, memory, .. } = &mut rig;
        let socket = sockets.get_mut::<tcp::Socket>(*handle);
        // Nothing committed in the transmit buffer: the first read probes
        // (and commits only what arrived), the next goes straight in.
        let before = memory.committed();
        let n = socket
            .send(|buf| {
                assert_eq!(memory.before_host_read(buf).unwrap(), HostRead::Probe);
                let n = 1000;
                memory.commit_probe(buf, n).unwrap();
                buf[..n].copy_from_slice(&out[..n]);
                (n, n)
            })
            .unwrap();
        assert_eq!(n, 1000);
        assert_eq!(memory.committed(), before + CHUNK);
        let n = socket
            .send(|buf| {
                let HostRead::Direct(room) = memory.before_host_read(buf).unwrap() else { panic!("a probe again") };
                let n = room.min(2000);
                buf[..n].copy_from_slice(&out[1000..1000 + n]);
                memory.read_from_host(&buf[..n]);
                (n, n)
            })
            .unwrap();
        assert_eq!(n, 2000);
        rig.now += 1;
        rig.iface.poll(Instant::from_millis(rig.now), &mut rig.wire, &mut rig.sockets);
        assert!(rig.wire.tx.iter().any(|p| p.len() > 40), "data went out");
        assert_eq!(rig.memory.unreported_writes(), Vec::<usize>::new(), "chunks a recycle would not zero");

        // Nothing queued and everything in order: the memory goes back, and
        // data afterwards is committed again.
        let acked = ours.wrapping_add(1 + 3000);
        rig.feed(segment(seq, Some(acked), TcpControl::None, &[]));
        assert_eq!(rig.socket().send_queue(), 0);
        assert!(rig.memory.releasable(0, 0));
        rig.memory.release();
        assert_eq!(rig.memory.committed(), 0);
        let last = pattern(7, 5000);
        rig.feed(segment(seq, Some(acked), TcpControl::Psh, &last[..1400]));
        rig.feed(segment(seq.wrapping_add(1400), Some(acked), TcpControl::Psh, &last[1400..2800]));
        assert_eq!(rig.take(), last[..2800]);
        assert!(rig.memory.committed() <= 2 * CHUNK, "{}", rig.memory.committed());
        assert_eq!(rig.memory.unreported_writes(), Vec::<usize>::new());
        assert_eq!(crate::sys::fault_commits_on_this_thread(), faults, "writes nobody committed first");
    }

    /// A host that sent a byte and then nothing, its flow woken again and
    /// again (each wake-up tries a read that finds nothing): what is
    /// committed stays what one read ahead needs. It used to double with
    /// every empty read, up to the whole transmit buffer (commit charge on
    /// Windows; a `madvise` and a 128 KiB memset per short connection when
    /// the pool took the region back).
    #[test]
    fn empty_host_reads_do_not_grow_the_commit() {
        const TX: usize = 2048 * 1024;
        let (mut m, _rx, tx) = flow_memory(RX, TX).unwrap();
        assert_eq!(m.before_host_read(tx).unwrap(), HostRead::Probe);
        m.commit_probe(tx, 1).unwrap();
        tx[0] = 1;
        let mut committed = Vec::new();
        for _ in 0..8 {
            assert_eq!(m.before_host_read(&tx[1..]).unwrap(), HostRead::Direct(READ_AHEAD));
            committed.push(m.committed());
        }
        assert!(committed.iter().all(|c| *c == READ_AHEAD + CHUNK), "{committed:?}");

        // Data that does arrive lets reads grow, doubling.
        m.read_from_host(&tx[1..1 + READ_AHEAD]);
        assert_eq!(m.before_host_read(&tx[1..]).unwrap(), HostRead::Direct(READ_AHEAD + 1));
        m.read_from_host(&tx[1..READ_AHEAD + 2]);
        assert_eq!(m.before_host_read(&tx[1..]).unwrap(), HostRead::Direct(2 * READ_AHEAD + 2));
        // A release starts over.
        m.release();
        assert_eq!(m.before_host_read(tx).unwrap(), HostRead::Probe);
        m.commit_probe(tx, 1).unwrap();
        assert_eq!(m.before_host_read(&tx[1..]).unwrap(), HostRead::Direct(READ_AHEAD));
    }

    #[test]
    fn out_of_window_data_commits_nothing() {
        let (mut m, _rx, _tx) = flow_memory(RX, CHUNK).unwrap();
        m.set_origin(TcpSeqNumber(999));
        // Before rcv_nxt (an old retransmission) and far past the window.
        m.before_guest_data(900, 50, 0).unwrap();
        m.before_guest_data(1000 + RX as u32, 50, 0).unwrap();
        assert_eq!(m.committed(), 0);
        // Straddling rcv_nxt: only the new part; straddling the ring's end: both ends.
        m.before_guest_data(990, 20, 0).unwrap();
        assert_eq!(m.committed(), CHUNK);
        m.taken(RX - 10);
        m.before_guest_data(1000 + RX as u32 - 10, 20, 0).unwrap();
        assert_eq!(m.committed(), 2 * CHUNK, "last chunk and first chunk");
        assert!(flow_memory(3 * CHUNK, CHUNK).is_none(), "the ring must be a power of two");
    }

    /// An ended flow's region serves the next flow as new (nothing counted
    /// as committed, splittable again, its writes still needing a commit:
    /// debug builds decommit it), a region that held much is released first,
    /// and the pool stays bounded.
    #[test]
    #[allow(unsafe_code)]
    fn the_pool_hands_ended_regions_to_the_next_flows() {
        let mut pool = RegionPool::default();
        let len = RX + 4 * CHUNK;
        let mut region = pool.take(len).unwrap();
        // SAFETY (every split here): the slices are dropped before the
        // region goes back to the pool.
        let (a, _) = unsafe { region.split(RX) }.unwrap();
        let first = a.as_ptr();
        region.commit(0, 2 * CHUNK).unwrap();
        a[..2 * CHUNK].fill(7);
        // SAFETY: `a` is not used again.
        unsafe { pool.give_back(FlowMemory::new(region, RX).unwrap()) };
        assert_eq!(pool.len(), 1);

        let mut again = pool.take(len).unwrap();
        assert_eq!(again.committed(), 0);
        let (a, _) = unsafe { again.split(RX) }.unwrap();
        assert_eq!(a.as_ptr(), first, "the same region");
        again.commit(0, 2 * CHUNK).unwrap();
        assert!(a[..2 * CHUNK].iter().all(|b| *b == 0), "the last flow's bytes are gone");
        a[0] = 1;
        assert!(pool.is_empty());
        // A region of another size is not handed out for this one.
        unsafe { pool.give_back(FlowMemory::new(again, RX).unwrap()) };
        assert_ne!(pool.take(2 * len).unwrap().len(), len);
        assert!(pool.is_empty());

        // Beyond POOL_KEEP: released before it is kept; beyond POOL_REGIONS: freed.
        let regions: Vec<_> = (0..POOL_REGIONS + 3).map(|_| pool.take(len).unwrap()).collect();
        for mut r in regions {
            let _ = unsafe { r.split(RX) }.unwrap();
            r.commit(0, len).unwrap();
            unsafe { pool.give_back(FlowMemory::new(r, RX).unwrap()) };
        }
        assert_eq!(pool.len(), POOL_REGIONS);
        assert!(pool.spare.iter().all(|r| r.committed() == 0));
    }
}
