//! The io_uring driver: one ring per worker (`SINGLE_ISSUER` + `DEFER_TASKRUN`: completions
//! are processed only when the worker enters the kernel, so a loop turn sees a whole batch).
//!
//! Receiving is multishot: one `READ_MULTISHOT` on the worker's TUN queue and one multishot
//! `RECVMSG` on its UDP socket, each drawing buffers from its own provided-buffer ring
//! ([`BufRing`]), so a packet costs one completion and no re-arm, and only one poll waiter
//! sits on each fd (several single-shot reads in flight would all be woken for every
//! packet). Both fds are registered files (the multishot TUN read alone uses the plain fd:
//! the kernel answers EBADFD for it on a registered TUN file). Each turn's results are submitted together, in
//! the same `io_uring_enter` that waits for the next turn: one GSO `SENDMSG` per send slot,
//! one `WRITE` per (coalesced) TUN packet.
//!
//! Buffer ownership (the rule every `unsafe` push below relies on): a buffer, iovec,
//! msghdr, address or control area referenced by a submitted entry belongs to the kernel
//! until that entry's completion is reaped. They all live in heap allocations made at start
//! that never move or shrink while the worker runs. A provided buffer belongs to the kernel
//! from the moment its ring entry is published until a completion names it (its buffer id
//! in the CQE flags); the worker then uses it and hands it back to its ring in the same
//! turn. A send slot is reused only after
//! [`TxBatch::complete`](crate::core::batch::TxBatch::complete) on its completion; a TUN
//! write batch is refilled only when its in-flight write count is back to zero. On the way
//! out every operation is cancelled and its completion awaited before any of that memory is
//! freed (it is leaked instead if the kernel does not answer in time).

use std::alloc::{self, Layout};
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, CancelBuilder, Fixed, RecvMsgOut};
use io_uring::{cqueue, opcode, types, IoUring};

use crate::core::batchstats::BatchOp;
use crate::core::counters::DropReason;
use crate::core::pipeline::Pipeline;
use crate::core::rxsink::RxSink;
use crate::driver::{Shared, WorkerSpec};
use crate::sys::udp::{self, RawAddr};

/// TUN read buffers in the provided-buffer ring (a power of two).
pub const TUN_BUFS: u16 = 16;
/// UDP receive buffers in the provided-buffer ring (a power of two).
pub const UDP_BUFS: u16 = 32;
/// Send slots (each one GSO send of up to 64 KiB).
pub const TX_SLOTS: usize = 64;
/// Size of each TUN read buffer: a 64 KiB super-packet plus virtio header.
pub const RX_BUF: usize = 65_536 + 64;
/// Size of each UDP receive buffer: a 64 KiB GRO batch plus the multishot header, the
/// source address and the control area.
const UDP_BUF: usize = 65_536 + 256;
/// Control area reserved per multishot receive (a `UDP_GRO` cmsg needs 20 bytes).
const UDP_CONTROL: usize = 64;
const RING_ENTRIES: u32 = 512;

const TUN_GROUP: u16 = 0;
const UDP_GROUP: u16 = 1;
/// Registered-file slots.
const TUN_FILE: Fixed = Fixed(0);
const UDP_FILE: Fixed = Fixed(1);

/// What a submission is, carried in its 64-bit user data: the kind in the top byte, the
/// slot (send slot, or write index and batch) in the 56 bits below. Every completion is
/// decoded through [`Op::decode`]; nothing else reads the bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// The multishot READ on the TUN.
    TunRead,
    /// The multishot RECVMSG on the UDP socket.
    UdpRecv,
    /// A SENDMSG (or its stand-in NOP) of send slot `slot`.
    UdpSend {
        /// The [`TxBatch`] slot it sends.
        slot: usize,
    },
    /// A TUN WRITE of one packet of write batch `batch` (0 or 1).
    TunWrite {
        /// Which of the two alternating write batches.
        batch: usize,
    },
    /// The cancel-everything request at shutdown.
    Cancel,
}

impl Op {
    const KIND_SHIFT: u32 = 56;
    const SLOT_MASK: u64 = (1 << Self::KIND_SHIFT) - 1;

    /// The user data for this op. A TUN write also carries its packet's index `k`, so
    /// that no two in-flight writes share user data (useful when tracing).
    fn encode(self, k: usize) -> u64 {
        let (kind, slot) = match self {
            Op::TunRead => (1, 0),
            Op::UdpRecv => (2, 0),
            Op::UdpSend { slot } => (3, slot as u64),
            Op::TunWrite { batch } => (4, ((k as u64) << 1) | (batch as u64 & 1)),
            Op::Cancel => (5, 0),
        };
        (kind << Self::KIND_SHIFT) | (slot & Self::SLOT_MASK)
    }

    /// The op a completion belongs to; `None` for user data this driver never submits.
    fn decode(data: u64) -> Option<Op> {
        let slot = (data & Self::SLOT_MASK) as usize;
        Some(match data >> Self::KIND_SHIFT {
            1 => Op::TunRead,
            2 => Op::UdpRecv,
            3 => Op::UdpSend { slot },
            4 => Op::TunWrite { batch: slot & 1 },
            5 => Op::Cancel,
            _ => return None,
        })
    }
}

/// Whether an io_uring with what this driver needs can be created here: seccomp and
/// `kernel.io_uring_disabled` refuse the ring; `READ_MULTISHOT` (Linux 6.7) also implies
/// multishot `RECVMSG` and provided-buffer rings.
pub fn available() -> bool {
    let Ok(ring) = IoUring::new(4) else {
        return false;
    };
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).is_ok()
        && probe.is_supported(opcode::ReadMulti::CODE)
        && probe.is_supported(opcode::RecvMsg::CODE)
        && probe.is_supported(opcode::SendMsg::CODE)
        && probe.is_supported(opcode::Write::CODE)
}

/// Completion errors of a receive that mean it can never work on this fd: the worker stops
/// (re-arming would spin).
/// A failed multishot receive: ends that only need a re-arm are ignored, fatal errors stop
/// the worker, anything else is counted.
fn receive_error(shared: &Shared, res: i32) -> io::Result<()> {
    match -res {
        libc::ENOBUFS | libc::EAGAIN | libc::EINTR | libc::ECANCELED => Ok(()),
        e if fatal(e) => Err(io::Error::from_raw_os_error(e)),
        _ => {
            shared.counters.add(DropReason::Io);
            Ok(())
        }
    }
}

fn fatal(errno: i32) -> bool {
    matches!(
        errno,
        libc::EBADF | libc::EBADFD | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOTSOCK
    )
}

/// A provided-buffer ring: `count` buffers of `size` bytes and the ring of entries through
/// which they are handed to the kernel (`IORING_REGISTER_PBUF_RING`). The worker writes
/// entries at its local tail and publishes the tail once per turn.
struct BufRing {
    entries: NonNull<BufRingEntry>,
    entries_layout: Layout,
    bufs: NonNull<u8>,
    bufs_layout: Layout,
    size: usize,
    count: u16,
    tail: u16,
    group: u16,
}

impl BufRing {
    /// Allocates the ring (page-aligned, as the kernel requires) and the buffers, with every
    /// buffer already in the ring (published on [`BufRing::register`]).
    fn new(count: u16, size: usize, group: u16) -> io::Result<Self> {
        if !count.is_power_of_two() {
            return Err(io::Error::other("buffer ring size must be a power of two"));
        }
        let n = usize::from(count);
        let entries_layout =
            Layout::from_size_align((n * std::mem::size_of::<BufRingEntry>()).max(4096), 4096)
                .map_err(io::Error::other)?;
        let bufs_layout = Layout::from_size_align(n * size, 4096).map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size.
        let entries = NonNull::new(unsafe { alloc::alloc_zeroed(entries_layout) })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?
            .cast::<BufRingEntry>();
        // SAFETY: as above.
        let bufs = match NonNull::new(unsafe { alloc::alloc_zeroed(bufs_layout) }) {
            Some(b) => b,
            None => {
                // SAFETY: allocated just above with this layout.
                unsafe { alloc::dealloc(entries.as_ptr().cast(), entries_layout) };
                return Err(io::ErrorKind::OutOfMemory.into());
            }
        };
        let mut ring = Self {
            entries,
            entries_layout,
            bufs,
            bufs_layout,
            size,
            count,
            tail: 0,
            group,
        };
        for bid in 0..count {
            ring.provide(bid);
        }
        Ok(ring)
    }

    /// Registers the ring with `ring` and publishes every buffer.
    fn register(&self, ring: &IoUring) -> io::Result<()> {
        self.publish();
        // SAFETY: the entries stay allocated until `self` drops, which the driver orders
        // after the io_uring is closed or every operation using the group has completed.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.entries.as_ptr() as u64,
                self.count,
                self.group,
                0,
            )
        }
    }

    /// Puts buffer `bid` back at the local tail (visible to the kernel on `publish`).
    fn provide(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.count - 1));
        // SAFETY: `slot < count`, inside the entries allocation; the kernel only reads
        // entries between its head and the published tail, and this one is past the tail.
        let e = unsafe { &mut *self.entries.as_ptr().add(slot) };
        // SAFETY: `bid < count`, so the offset stays inside the buffers allocation.
        let addr = unsafe { self.bufs.as_ptr().add(usize::from(bid) * self.size) };
        e.set_addr(addr as u64);
        e.set_len(self.size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every provided buffer visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field overlays the first entry's reserved bytes, inside the
        // allocation and 2-byte aligned; the kernel reads it with acquire ordering.
        let tail = unsafe { &*(BufRingEntry::tail(self.entries.as_ptr()) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    /// Where buffer `bid`'s first `len` bytes are (`len` capped at the buffer size), or
    /// `None` for an id the ring never had.
    fn span(&self, bid: u16, len: usize) -> Option<(*mut u8, usize)> {
        if bid >= self.count {
            return None;
        }
        // SAFETY: `bid < count`, so the offset stays inside the buffers allocation.
        let p = unsafe { self.bufs.as_ptr().add(usize::from(bid) * self.size) };
        Some((p, len.min(self.size)))
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; the driver drops a ring only when
        // the kernel no longer uses it (see the module docs).
        unsafe {
            alloc::dealloc(self.entries.as_ptr().cast(), self.entries_layout);
            alloc::dealloc(self.bufs.as_ptr(), self.bufs_layout);
        }
    }
}

struct SendMeta {
    addr: RawAddr,
    iov: libc::iovec,
    control: [u8; udp::CMSG_SPACE],
    msg: libc::msghdr,
}

/// Runs one worker until the device stops.
pub fn run(spec: WorkerSpec, shared: Shared) -> io::Result<()> {
    let tun_ring = BufRing::new(TUN_BUFS, RX_BUF, TUN_GROUP)?;
    let udp_ring = BufRing::new(UDP_BUFS, UDP_BUF, UDP_GROUP)?;
    let mut pipe = Pipeline::new(
        shared.counters.clone(),
        shared.vnet,
        shared.udp.gso,
        TX_SLOTS,
    );
    pipe.set_control(shared.control.clone());
    // SAFETY: msghdr is a plain C struct; all-zero is a valid empty value.
    let zero_msg: libc::msghdr = unsafe { std::mem::zeroed() };
    let zero_iov = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut sends: Box<[SendMeta]> = (0..TX_SLOTS)
        .map(|_| SendMeta {
            addr: RawAddr::default(),
            iov: zero_iov,
            control: [0; udp::CMSG_SPACE],
            msg: zero_msg,
        })
        .collect();
    // The multishot receive reads only the name and control lengths from its msghdr.
    let mut recv_msg: Box<libc::msghdr> = Box::new(zero_msg);
    recv_msg.msg_namelen = RawAddr::capacity();
    recv_msg.msg_controllen = UDP_CONTROL as _;
    // Two TUN write batches: one filling while the other's writes are in flight.
    let mut outs = [
        RxSink::with_default_sizes(shared.vnet, shared.uso),
        RxSink::with_default_sizes(shared.vnet, shared.uso),
    ];
    // Declared after every buffer it may use, so it is closed before they are freed.
    let ring = match IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
    {
        Ok(r) => r,
        Err(_) => IoUring::new(RING_ENTRIES)?,
    };
    ring.submitter()
        .register_files(&[spec.tun.as_raw_fd(), spec.udp.as_raw_fd()])?;
    tun_ring.register(&ring)?;
    udp_ring.register(&ring)?;
    let mut w = Worker {
        id: spec.id,
        ring,
        tun_fd: spec.tun.as_raw_fd(),
        tun_ring,
        udp_ring,
        recv_msg,
        tun_armed: false,
        udp_armed: false,
        sends_in_flight: 0,
        writes_in_flight: [0; 2],
        deferred: Vec::with_capacity(RING_ENTRIES as usize * 2),
    };
    let r = w.run(&shared, &mut pipe, &mut sends, &mut outs);
    if !w.shutdown(&mut pipe) {
        // The kernel did not give everything back in time: leak the memory it may still
        // write rather than free it under its feet.
        tracing::warn!("io_uring operations outstanding at exit; leaking their buffers");
        std::mem::forget(pipe);
        std::mem::forget(sends);
        std::mem::forget(outs);
        std::mem::forget(w);
    }
    r
}

/// The ring and what the kernel may be using.
struct Worker {
    /// The worker number (its cells in `Shared::batches`).
    id: usize,
    ring: IoUring,
    tun_fd: i32,
    tun_ring: BufRing,
    udp_ring: BufRing,
    recv_msg: Box<libc::msghdr>,
    tun_armed: bool,
    udp_armed: bool,
    sends_in_flight: usize,
    writes_in_flight: [usize; 2],
    /// Completions reaped early (by [`Worker::flush_sends`]) for the next turn.
    deferred: Vec<(u64, i32, u32)>,
}

impl Worker {
    fn run(
        &mut self,
        shared: &Shared,
        pipe: &mut Pipeline,
        sends: &mut [SendMeta],
        outs: &mut [RxSink; 2],
    ) -> io::Result<()> {
        let mut fill = 0usize;
        let ts = types::Timespec::new().sec(0).nsec(500_000_000);
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(RING_ENTRIES as usize * 2);
        while !shared.stop.load(Ordering::Relaxed) {
            self.arm()?;
            let want = usize::from(self.deferred.is_empty());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(want, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            cqes.clear();
            cqes.append(&mut self.deferred);
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            if cqes.is_empty() {
                continue;
            }
            // Send and write completions first: they free slots this turn's reads may need.
            for &(data, res, _) in &cqes {
                match Op::decode(data) {
                    Some(Op::UdpSend { slot }) => {
                        if res < 0 {
                            shared.counters.add(DropReason::Io);
                        }
                        self.sends_in_flight = self.sends_in_flight.saturating_sub(1);
                        pipe.tx.complete(slot);
                    }
                    Some(Op::TunWrite { batch: b }) => {
                        if res < 0 {
                            shared.counters.add(DropReason::Io);
                        }
                        self.writes_in_flight[b] = self.writes_in_flight[b].saturating_sub(1);
                        if self.writes_in_flight[b] == 0 && b != fill {
                            outs[b].clear();
                        }
                    }
                    _ => {}
                }
            }
            let snap = shared.table.load();
            pipe.tick(Instant::now());
            pipe.set_now(shared.now_secs());
            pipe.set_now_ns(crate::core::path::mono_ns());
            let (mut reads, mut recvs) = (0, 0);
            for &(data, res, flags) in &cqes {
                match Op::decode(data) {
                    Some(Op::TunRead) => {
                        reads += usize::from(res > 0);
                        if !cqueue::more(flags) {
                            self.tun_armed = false;
                        }
                        self.on_tun_read(shared, pipe, sends, &snap, res, flags)?;
                    }
                    Some(Op::UdpRecv) => {
                        recvs += usize::from(res > 0);
                        if !cqueue::more(flags) {
                            self.udp_armed = false;
                        }
                        self.on_udp_recv(shared, pipe, &snap, res, flags, &mut outs[fill])?;
                    }
                    _ => {}
                }
            }
            let mine = shared.batches.worker(self.id);
            mine.record(BatchOp::TunRead, reads);
            mine.record(BatchOp::UdpRecv, recvs);
            self.tun_ring.publish();
            self.udp_ring.publish();
            self.push_sends(shared, pipe, sends)?;
            // ICMP answers to TUN reads no peer covers go out with this turn's TUN writes.
            if pipe.has_replies() {
                pipe.drain_replies(&mut outs[fill]);
            }
            // This turn's TUN writes go out once the other batch has drained.
            let other = fill ^ 1;
            if !outs[fill].is_empty() && self.writes_in_flight[other] == 0 {
                outs[other].clear();
                self.push_writes(&mut outs[fill], fill)?;
                fill = other;
            }
        }
        Ok(())
    }

    /// Re-arms the multishot receives that ended (buffer ring ran dry, an error).
    fn arm(&mut self) -> io::Result<()> {
        if !self.tun_armed {
            // Length 0: each read takes a whole provided buffer (the kernel refuses others).
            // On the plain fd: the kernel refuses a multishot read on a registered TUN file
            // (EBADFD, "not pollable").
            let e = opcode::ReadMulti::new(types::Fd(self.tun_fd), 0, TUN_GROUP)
                .build()
                .user_data(Op::TunRead.encode(0));
            // SAFETY: the read writes only into provided buffers of `tun_ring`, which
            // outlives every operation (module docs).
            unsafe { push(&mut self.ring, &e) }?;
            self.tun_armed = true;
        }
        if !self.udp_armed {
            let e = opcode::RecvMsgMulti::new(UDP_FILE, &*self.recv_msg, UDP_GROUP)
                .build()
                .user_data(Op::UdpRecv.encode(0));
            // SAFETY: `recv_msg` is boxed and lives as long as the worker; the receive
            // writes only into provided buffers of `udp_ring`.
            unsafe { push(&mut self.ring, &e) }?;
            self.udp_armed = true;
        }
        Ok(())
    }

    fn on_tun_read(
        &mut self,
        shared: &Shared,
        pipe: &mut Pipeline,
        sends: &mut [SendMeta],
        snap: &crate::core::table::Snapshot,
        res: i32,
        flags: u32,
    ) -> io::Result<()> {
        if res < 0 {
            return receive_error(shared, res);
        }
        let Some(bid) = cqueue::buffer_select(flags) else {
            return Ok(());
        };
        if let Some((p, len)) = self.tun_ring.span(bid, res as usize) {
            // SAFETY: the completion names `bid`, so the kernel is done with that buffer
            // and nothing else refers to it; it is provided again below, after this last use.
            let buf = unsafe { std::slice::from_raw_parts_mut(p, len) };
            if pipe.on_tun(snap, buf).is_err() {
                // Every send slot is taken: hand the filled ones to the kernel, take back
                // what completes, and try once more.
                self.flush_sends(shared, pipe, sends)?;
                if pipe.on_tun(snap, buf).is_err() {
                    shared.counters.add(DropReason::NoBuffer);
                }
            }
        }
        self.tun_ring.provide(bid);
        Ok(())
    }

    fn on_udp_recv(
        &mut self,
        shared: &Shared,
        pipe: &mut Pipeline,
        snap: &crate::core::table::Snapshot,
        res: i32,
        flags: u32,
        sink: &mut RxSink,
    ) -> io::Result<()> {
        if res < 0 {
            return receive_error(shared, res);
        }
        let Some(bid) = cqueue::buffer_select(flags) else {
            return Ok(());
        };
        if let Some((p, len)) = self.udp_ring.span(bid, res as usize) {
            // SAFETY: the completion names `bid`, so the kernel is done with that buffer;
            // it is provided again below, after this last use.
            let buf = unsafe { std::slice::from_raw_parts(p, len) };
            match RecvMsgOut::parse(buf, &self.recv_msg) {
                Ok(m) if !m.is_payload_truncated() => {
                    let seg = udp::read_gro_cmsg(m.control_data());
                    match RawAddr::from_bytes(m.name_data()).to_socket_addr() {
                        Some(src) => {
                            if pipe.on_udp(snap, src, m.payload_data(), seg, sink).is_err() {
                                shared.counters.add(DropReason::NoBuffer);
                            }
                        }
                        None => shared.counters.add(DropReason::MalformedOuter),
                    }
                }
                _ => shared.counters.add(DropReason::MalformedOuter),
            }
        }
        self.udp_ring.provide(bid);
        Ok(())
    }

    /// Queues one SENDMSG (GSO when several datagrams) per filled send slot.
    fn push_sends(
        &mut self,
        shared: &Shared,
        pipe: &mut Pipeline,
        sends: &mut [SendMeta],
    ) -> io::Result<()> {
        let gso = shared.udp.gso;
        let ipv6 = shared.udp.ipv6;
        let mut push_err = None;
        let ring = &mut self.ring;
        let in_flight = &mut self.sends_in_flight;
        let mut datagrams = 0;
        pipe.tx.drain(|i, slot| {
            datagrams += slot.segments.max(1);
            let m = &mut sends[i];
            let Some((addr, alen)) = RawAddr::new(slot.dst, ipv6) else {
                // Not sent: its slot must still come back, so complete it with a no-op.
                let e = opcode::Nop::new()
                    .build()
                    .user_data(Op::UdpSend { slot: i }.encode(0));
                // SAFETY: a no-op references no memory.
                match unsafe { push(ring, &e) } {
                    Ok(()) => *in_flight += 1,
                    Err(err) => push_err = Some(err),
                }
                return;
            };
            m.addr = addr;
            m.iov.iov_base = slot.buf.as_ptr() as *mut libc::c_void;
            m.iov.iov_len = slot.len;
            m.msg.msg_name = &mut m.addr as *mut RawAddr as *mut libc::c_void;
            m.msg.msg_namelen = alen;
            m.msg.msg_iov = &mut m.iov;
            m.msg.msg_iovlen = 1;
            if gso && slot.segments > 1 {
                let clen = udp::write_gso_cmsg(&mut m.control, slot.segment as u16);
                m.msg.msg_control = m.control.as_mut_ptr() as *mut libc::c_void;
                m.msg.msg_controllen = clen as _;
            } else {
                m.msg.msg_control = std::ptr::null_mut();
                m.msg.msg_controllen = 0;
            }
            let e = opcode::SendMsg::new(UDP_FILE, &m.msg)
                .build()
                .user_data(Op::UdpSend { slot: i }.encode(0));
            // SAFETY: the entry points at `sends[i]` and `slot.buf`, both heap storage that
            // stays put; slot `i` is InFlight until its completion calls `complete(i)`.
            match unsafe { push(ring, &e) } {
                Ok(()) => *in_flight += 1,
                Err(err) => push_err = Some(err),
            }
        });
        shared
            .batches
            .worker(self.id)
            .record(BatchOp::UdpSend, datagrams);
        match push_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends what is filled now and takes back the send slots whose completions arrive;
    /// other completions stay in the ring for the next turn.
    fn flush_sends(
        &mut self,
        shared: &Shared,
        pipe: &mut Pipeline,
        sends: &mut [SendMeta],
    ) -> io::Result<()> {
        self.push_sends(shared, pipe, sends)?;
        let want = self.sends_in_flight.min(1);
        match self.ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        // Send completions free their slots now; anything else waits for the next turn.
        for c in self.ring.completion() {
            let (data, res, flags) = (c.user_data(), c.result(), c.flags());
            if let Some(Op::UdpSend { slot }) = Op::decode(data) {
                if res < 0 {
                    shared.counters.add(DropReason::Io);
                }
                self.sends_in_flight = self.sends_in_flight.saturating_sub(1);
                pipe.tx.complete(slot);
            } else {
                self.deferred.push((data, res, flags));
            }
        }
        Ok(())
    }

    /// Queues one WRITE per packet of `out` (batch `b`).
    fn push_writes(&mut self, out: &mut RxSink, b: usize) -> io::Result<()> {
        let mut k = 0usize;
        let mut push_err = None;
        let ring = &mut self.ring;
        let in_flight = &mut self.writes_in_flight[b];
        out.for_each(|pkt| {
            let e = opcode::Write::new(TUN_FILE, pkt.as_ptr(), pkt.len() as u32)
                .build()
                .user_data(Op::TunWrite { batch: b }.encode(k));
            k += 1;
            // SAFETY: `pkt` lives in `out`'s arenas, which are not cleared or refilled
            // until `writes_in_flight[b]` returns to zero.
            match unsafe { push(ring, &e) } {
                Ok(()) => *in_flight += 1,
                Err(err) => push_err = Some(err),
            }
        });
        match push_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Cancels every operation and waits (bounded) until the kernel has returned every
    /// buffer. Returns whether it did.
    fn shutdown(&mut self, pipe: &mut Pipeline) -> bool {
        let e = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(Op::Cancel.encode(0));
        // SAFETY: a cancel request references no memory of ours.
        if unsafe { push(&mut self.ring, &e) }.is_err() {
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let ts = types::Timespec::new().nsec(50_000_000);
        loop {
            if !self.tun_armed
                && !self.udp_armed
                && self.sends_in_flight == 0
                && self.writes_in_flight == [0, 0]
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(_) => return false,
            }
            for c in self.ring.completion() {
                match Op::decode(c.user_data()) {
                    Some(Op::TunRead) if !cqueue::more(c.flags()) => self.tun_armed = false,
                    Some(Op::UdpRecv) if !cqueue::more(c.flags()) => self.udp_armed = false,
                    Some(Op::UdpSend { slot }) => {
                        self.sends_in_flight = self.sends_in_flight.saturating_sub(1);
                        pipe.tx.complete(slot);
                    }
                    Some(Op::TunWrite { batch: b }) => {
                        self.writes_in_flight[b] = self.writes_in_flight[b].saturating_sub(1);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Pushes one entry, submitting first if the submission queue is full.
///
/// # Safety
/// Everything the entry points to must stay valid until its completion is reaped.
unsafe fn push(ring: &mut IoUring, e: &io_uring::squeue::Entry) -> io::Result<()> {
    // SAFETY: forwarded from the caller's contract.
    if unsafe { ring.submission().push(e) }.is_err() {
        ring.submit()?;
        // SAFETY: as above.
        unsafe { ring.submission().push(e) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Op;

    #[test]
    fn user_data_round_trips_every_op() {
        for op in [
            Op::TunRead,
            Op::UdpRecv,
            Op::UdpSend { slot: 0 },
            Op::UdpSend { slot: 63 },
            Op::TunWrite { batch: 0 },
            Op::TunWrite { batch: 1 },
            Op::Cancel,
        ] {
            for k in [0, 1, 4095] {
                assert_eq!(Op::decode(op.encode(k)), Some(op), "{op:?} k={k}");
            }
        }
        assert_eq!(Op::decode(0), None);
        assert_eq!(Op::decode(9 << 56), None);
    }
}
