//! The io_uring driver: one ring per worker (`SINGLE_ISSUER` + `DEFER_TASKRUN`: completions
//! are processed only when the worker enters the kernel, so a loop turn sees a whole batch),
//! several reads always in flight on the worker's TUN queue and several `RECVMSG`s on its
//! UDP socket, and each turn's results submitted together: one GSO `SENDMSG` per send slot,
//! one `WRITE` per (coalesced) TUN packet, all in one `io_uring_enter`.
//!
//! Buffer ownership (the rule every `unsafe` push below relies on): a buffer, iovec,
//! msghdr, address or control area referenced by a submitted entry belongs to the kernel
//! until that entry's completion is reaped. They all live in boxed slices allocated at start
//! that never move or shrink while the worker runs; TUN read and receive slots are re-armed
//! only from their own completion; a send slot is reused only after
//! [`TxBatch::complete`](crate::core::batch::TxBatch::complete) on its completion; a TUN
//! write batch is refilled only when its in-flight write count is back to zero.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use io_uring::{opcode, types, IoUring};

use crate::core::counters::DropReason;
use crate::core::pipeline::Pipeline;
use crate::core::rxsink::RxSink;
use crate::driver::{Shared, WorkerSpec};
use crate::sys::udp::{self, RawAddr};

/// TUN reads kept in flight.
pub const TUN_READS: usize = 8;
/// UDP receives kept in flight.
pub const UDP_RECVS: usize = 16;
/// Send slots (each one GSO send of up to 64 KiB).
pub const TX_SLOTS: usize = 64;
/// Size of each TUN read / UDP receive buffer: a 64 KiB super-packet plus virtio header.
pub const RX_BUF: usize = 65_536 + 64;
const RING_ENTRIES: u32 = 256;

const KIND_TUN_READ: u64 = 1;
const KIND_UDP_RECV: u64 = 2;
const KIND_UDP_SEND: u64 = 3;
const KIND_TUN_WRITE: u64 = 4;

#[inline]
fn ud(kind: u64, i: usize) -> u64 {
    (kind << 56) | i as u64
}

/// Whether an io_uring can be created here (seccomp and `kernel.io_uring_disabled` refuse).
pub fn available() -> bool {
    IoUring::new(4).is_ok()
}

struct RecvSlot {
    buf: Box<[u8]>,
    addr: RawAddr,
    iov: libc::iovec,
    control: [u8; 64],
    msg: libc::msghdr,
}

struct SendMeta {
    addr: RawAddr,
    iov: libc::iovec,
    control: [u8; udp::CMSG_SPACE],
    msg: libc::msghdr,
}

/// Runs one worker until the device stops.
pub fn run(spec: WorkerSpec, shared: Shared) -> io::Result<()> {
    let mut ring = match IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
    {
        Ok(r) => r,
        Err(_) => IoUring::new(RING_ENTRIES)?,
    };
    let tun_fd = spec.tun.as_raw_fd();
    let udp_fd = spec.udp.as_raw_fd();
    let mut pipe = Pipeline::new(
        shared.counters.clone(),
        shared.vnet,
        shared.udp.gso,
        TX_SLOTS,
    );

    let mut tun_bufs: Box<[Box<[u8]>]> = (0..TUN_READS)
        .map(|_| vec![0u8; RX_BUF].into_boxed_slice())
        .collect();
    // SAFETY: msghdr and iovec are plain C structs; all-zero is a valid empty value, and the
    // pointers are filled in below once the slots sit at their final heap addresses.
    let zero_msg: libc::msghdr = unsafe { std::mem::zeroed() };
    let zero_iov = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut recvs: Box<[RecvSlot]> = (0..UDP_RECVS)
        .map(|_| RecvSlot {
            buf: vec![0u8; RX_BUF].into_boxed_slice(),
            addr: RawAddr::default(),
            iov: zero_iov,
            control: [0; 64],
            msg: zero_msg,
        })
        .collect();
    let mut sends: Box<[SendMeta]> = (0..TX_SLOTS)
        .map(|_| SendMeta {
            addr: RawAddr::default(),
            iov: zero_iov,
            control: [0; udp::CMSG_SPACE],
            msg: zero_msg,
        })
        .collect();
    // Two TUN write batches: one filling while the other's writes are in flight.
    let mut outs = [
        RxSink::new(shared.vnet, 32, 1 << 21),
        RxSink::new(shared.vnet, 32, 1 << 21),
    ];
    let mut fill = 0usize;
    let mut writes_in_flight = [0usize; 2];

    for i in 0..TUN_READS {
        arm_tun_read(&mut ring, tun_fd, &mut tun_bufs[i], i)?;
    }
    for (i, slot) in recvs.iter_mut().enumerate() {
        arm_recv(&mut ring, udp_fd, slot, i)?;
    }

    let ts = types::Timespec::new().sec(0).nsec(500_000_000);
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(RING_ENTRIES as usize * 2);
    while !shared.stop.load(Ordering::Relaxed) {
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        cqes.clear();
        cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        if cqes.is_empty() {
            continue;
        }
        let snap = shared.table.load();
        for &(data, res) in &cqes {
            let kind = data >> 56;
            let i = (data & 0x00ff_ffff_ffff_ffff) as usize;
            match kind {
                KIND_TUN_READ => {
                    if res > 0 {
                        let n = (res as usize).min(RX_BUF);
                        if pipe.on_tun(&snap, &mut tun_bufs[i][..n]).is_err() {
                            shared.counters.add(DropReason::NoBuffer);
                        }
                    } else if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
                        shared.counters.add(DropReason::Io);
                        if res == -libc::EBADF {
                            return Err(io::Error::from_raw_os_error(-res));
                        }
                    }
                    arm_tun_read(&mut ring, tun_fd, &mut tun_bufs[i], i)?;
                }
                KIND_UDP_RECV => {
                    let slot = &mut recvs[i];
                    if res > 0 {
                        let n = (res as usize).min(RX_BUF);
                        let clen = slot.msg.msg_controllen.min(slot.control.len());
                        let seg = udp::read_gro_cmsg(&slot.control[..clen]);
                        match slot.addr.to_socket_addr() {
                            Some(src) => {
                                if pipe
                                    .on_udp(&snap, src, &slot.buf[..n], seg, &mut outs[fill])
                                    .is_err()
                                {
                                    shared.counters.add(DropReason::NoBuffer);
                                }
                            }
                            None => shared.counters.add(DropReason::MalformedOuter),
                        }
                    } else if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
                        shared.counters.add(DropReason::Io);
                    }
                    arm_recv(&mut ring, udp_fd, slot, i)?;
                }
                KIND_UDP_SEND => {
                    if res < 0 {
                        shared.counters.add(DropReason::Io);
                    }
                    pipe.tx.complete(i);
                }
                KIND_TUN_WRITE => {
                    if res < 0 {
                        shared.counters.add(DropReason::Io);
                    }
                    let b = i & 1;
                    writes_in_flight[b] = writes_in_flight[b].saturating_sub(1);
                    if writes_in_flight[b] == 0 && b != fill {
                        outs[b].clear();
                    }
                }
                _ => {}
            }
        }
        // Submit this turn's sends: one SENDMSG (GSO when several datagrams) per slot.
        let gso = shared.udp.gso;
        let ipv6 = shared.udp.ipv6;
        let mut push_err = None;
        pipe.tx.drain(|i, slot| {
            let m = &mut sends[i];
            let Some((addr, alen)) = RawAddr::new(slot.dst, ipv6) else {
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
            let e = opcode::SendMsg::new(types::Fd(udp_fd), &m.msg)
                .build()
                .user_data(ud(KIND_UDP_SEND, i));
            // SAFETY: the entry points at `sends[i]` and `slot.buf`, both heap storage that
            // stays put; slot `i` is InFlight until its completion calls `complete(i)`.
            if let Err(err) = unsafe { push(&mut ring, &e) } {
                push_err = Some(err);
            }
        });
        if let Some(e) = push_err {
            return Err(e);
        }
        // Submit this turn's TUN writes if the other batch has drained.
        let other = fill ^ 1;
        if !outs[fill].is_empty() && writes_in_flight[other] == 0 {
            outs[other].clear();
            let mut k = 0usize;
            let mut push_err = None;
            outs[fill].for_each(|pkt| {
                let e = opcode::Write::new(types::Fd(tun_fd), pkt.as_ptr(), pkt.len() as u32)
                    .build()
                    .user_data(ud(KIND_TUN_WRITE, (k << 1) | fill));
                k += 1;
                // SAFETY: `pkt` lives in `outs[fill]`'s arenas, which are not cleared or
                // refilled until `writes_in_flight[fill]` returns to zero.
                match unsafe { push(&mut ring, &e) } {
                    Ok(()) => writes_in_flight[fill] += 1,
                    Err(err) => push_err = Some(err),
                }
            });
            if let Some(e) = push_err {
                return Err(e);
            }
            fill = other;
        }
    }
    Ok(())
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

fn arm_tun_read(ring: &mut IoUring, fd: i32, buf: &mut [u8], i: usize) -> io::Result<()> {
    let e = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32)
        .build()
        .user_data(ud(KIND_TUN_READ, i));
    // SAFETY: `buf` is one of the worker's boxed read buffers; it is re-armed only from its
    // own completion, so the kernel is its only user until then.
    unsafe { push(ring, &e) }
}

fn arm_recv(ring: &mut IoUring, fd: i32, slot: &mut RecvSlot, i: usize) -> io::Result<()> {
    slot.iov.iov_base = slot.buf.as_mut_ptr() as *mut libc::c_void;
    slot.iov.iov_len = slot.buf.len();
    slot.msg.msg_name = &mut slot.addr as *mut RawAddr as *mut libc::c_void;
    slot.msg.msg_namelen = RawAddr::capacity();
    slot.msg.msg_iov = &mut slot.iov;
    slot.msg.msg_iovlen = 1;
    slot.msg.msg_control = slot.control.as_mut_ptr() as *mut libc::c_void;
    slot.msg.msg_controllen = slot.control.len() as _;
    let e = opcode::RecvMsg::new(types::Fd(fd), &mut slot.msg)
        .build()
        .user_data(ud(KIND_UDP_RECV, i));
    // SAFETY: the slot lives in a boxed slice that never moves; it is re-armed only from its
    // own completion.
    unsafe { push(ring, &e) }
}
