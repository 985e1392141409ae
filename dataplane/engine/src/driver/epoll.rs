//! The portable driver: one `mio` (epoll) loop per worker over the same TUN queue and UDP
//! socket the io_uring driver would use, running the same [`Pipeline`]. Chosen with
//! `--driver epoll`, or automatically when io_uring cannot be set up (seccomp,
//! `kernel.io_uring_disabled`).
//!
//! mio is edge-triggered: a readable fd is drained to `EAGAIN`. Reads are taken in batches
//! of [`BATCH`]; after each batch the encrypted datagrams go out as GSO `sendmsg` calls and
//! decrypted packets (and the ICMP answers to TUN reads no peer covers) as TUN `write`
//! calls, synchronously, so every buffer is free again before the next batch. Each batch's
//! size goes into the worker's own histogram (`core::batchstats`).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::core::batchstats::{BatchOp, WorkerBatches};
use crate::core::counters::DropReason;
use crate::core::pipeline::Pipeline;
use crate::core::rxsink::RxSink;
use crate::driver::{Shared, WorkerSpec};
use crate::sys::{fd, udp};

/// Reads handled before the results are flushed.
pub const BATCH: usize = 64;

const TUN: Token = Token(0);
const UDP: Token = Token(1);

/// Runs one worker until the device stops.
pub fn run(spec: WorkerSpec, shared: Shared) -> io::Result<()> {
    let WorkerSpec {
        id, tun, udp: sock, ..
    } = spec;
    let batches = shared.batches.clone();
    let mine = batches.worker(id);
    let mut poll = Poll::new()?;
    let tun_fd = tun.as_raw_fd();
    let udp_fd = sock.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&tun_fd), TUN, Interest::READABLE)?;
    poll.registry()
        .register(&mut SourceFd(&udp_fd), UDP, Interest::READABLE)?;
    let mut pipe = Pipeline::new(
        shared.counters.clone(),
        shared.vnet,
        shared.udp.gso,
        BATCH + 4,
    );
    pipe.set_control(shared.control.clone());
    let mut out = RxSink::with_default_sizes(shared.vnet, shared.uso);
    let mut events = Events::with_capacity(8);
    let mut rbuf = vec![0u8; 65_536 + 16];
    let mut tun_ready = true;
    let mut udp_ready = true;
    while !shared.stop.load(Ordering::Relaxed) {
        if !tun_ready && !udp_ready {
            match poll.poll(&mut events, Some(Duration::from_millis(500))) {
                Ok(()) => {}
                // A signal (SIGTERM on the way, a profiler) interrupts the wait: not an error.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                match ev.token() {
                    TUN => tun_ready = true,
                    UDP => udp_ready = true,
                    _ => {}
                }
            }
        }
        let snap = shared.table.load();
        pipe.tick(Instant::now());
        pipe.set_now(shared.now_secs());
        pipe.set_now_ns(crate::core::path::mono_ns());
        if tun_ready {
            let mut reads = 0;
            for _ in 0..BATCH {
                match fd::read(tun_fd, &mut rbuf) {
                    Ok(n) => {
                        reads += 1;
                        if pipe.on_tun(&snap, &mut rbuf[..n]).is_err() {
                            flush_tx(&mut pipe, udp_fd, &shared, mine);
                            let _ = pipe.on_tun(&snap, &mut rbuf[..n]);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        tun_ready = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            mine.record(BatchOp::TunRead, reads);
            flush_tx(&mut pipe, udp_fd, &shared, mine);
        }
        if udp_ready {
            let mut recvs = 0;
            for _ in 0..BATCH {
                match udp::recv(udp_fd, &mut rbuf) {
                    Ok((n, Some(src), seg)) => {
                        recvs += 1;
                        if pipe.on_udp(&snap, src, &rbuf[..n], seg, &mut out).is_err() {
                            flush_tx(&mut pipe, udp_fd, &shared, mine);
                        }
                    }
                    Ok((_, None, _)) => shared.counters.add(DropReason::MalformedOuter),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        udp_ready = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // ICMP errors surface on the next receive (ECONNREFUSED …): not fatal.
                    Err(_) => shared.counters.add(DropReason::Io),
                }
            }
            mine.record(BatchOp::UdpRecv, recvs);
            flush_tx(&mut pipe, udp_fd, &shared, mine);
        }
        if pipe.has_replies() {
            pipe.drain_replies(&mut out);
        }
        if !out.is_empty() {
            let counters = &shared.counters;
            out.for_each(|b| {
                if fd::write(tun_fd, b).is_err() {
                    counters.add(DropReason::Io);
                }
            });
            out.clear();
        }
    }
    Ok(())
}

fn flush_tx(pipe: &mut Pipeline, udp_fd: i32, shared: &Shared, mine: &WorkerBatches) {
    let counters = &shared.counters;
    let gso = shared.udp.gso;
    let ipv6 = shared.udp.ipv6;
    let mut datagrams = 0;
    pipe.tx.send_all(|slot| {
        datagrams += slot.segments.max(1);
        let seg = (gso && slot.segments > 1).then_some(slot.segment as u16);
        if udp::send(udp_fd, &slot.buf[..slot.len], slot.dst, seg, ipv6).is_err() {
            counters.add(DropReason::Io);
        }
    });
    mine.record(BatchOp::UdpSend, datagrams);
}
