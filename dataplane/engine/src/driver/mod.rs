//! Drivers: the loops that move packet batches between the kernel (`sys`) and the `core`.
//!
//! [`start`] spawns one worker thread per queue, pinned to its own core, each owning one
//! TUN queue fd and one `SO_REUSEPORT` UDP socket, plus the timer thread. Workers run the
//! io_uring driver ([`uring`]) unless it is unavailable or `--driver epoll` asks for the
//! portable one ([`epoll`]); both run the same [`crate::core::pipeline::Pipeline`].

pub mod epoll;
pub mod timers;
#[allow(unsafe_code)]
pub mod uring;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use boringtun::noise::TunnResult;

use crate::core::batchstats::BatchStats;
use crate::core::counters::DropCounters;
use crate::core::demux::ControlQueue;
use crate::core::path;
use crate::core::peer::Peer;
use crate::core::table::Table;
use crate::sys::tun::{Offloads, Tun};
use crate::sys::udp::{self, UdpFeatures};

/// Which loop drives the workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    /// io_uring: batched submissions, one ring per worker.
    Uring,
    /// epoll via mio: the portable fallback.
    Epoll,
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Uring => "io_uring",
            Self::Epoll => "epoll",
        })
    }
}

/// What every worker of a device shares (all read-only or atomic).
#[derive(Clone)]
pub struct Shared {
    /// The peer/route table.
    pub table: Arc<Table>,
    /// Drop counters.
    pub counters: Arc<DropCounters>,
    /// Per-worker batch-size histograms (each worker writes its own cells).
    pub batches: Arc<BatchStats>,
    /// Set to stop every thread.
    pub stop: Arc<AtomicBool>,
    /// TUN reads/writes carry a virtio header.
    pub vnet: bool,
    /// The TUN takes USO super-datagrams (`GSO_UDP_L4`) on writes.
    pub uso: bool,
    /// UDP features in force.
    pub udp: UdpFeatures,
    /// The engine clock's epoch: [`Shared::now_secs`] counts from here.
    pub epoch: Instant,
    /// STUN and relay-control datagrams for the control side (see `core::demux`).
    pub control: Arc<ControlQueue>,
    /// The firewall mark on the UDP sockets, if any.
    pub fwmark: Option<u32>,
}

impl Shared {
    /// The engine clock: whole seconds since the device started (monotonic). Workers hand
    /// it to the sans-IO pipeline once per batch (connection-tracking timeouts).
    #[inline]
    pub fn now_secs(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }
}

/// One worker's own fds and core.
pub struct WorkerSpec {
    /// Worker number.
    pub id: usize,
    /// Its TUN queue.
    pub tun: OwnedFd,
    /// Its UDP socket.
    pub udp: OwnedFd,
    /// The core to pin to.
    pub core: Option<core_affinity::CoreId>,
}

/// How to start the engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Interface name.
    pub interface: String,
    /// Worker threads (0 = one per available core).
    pub threads: usize,
    /// Forced driver, or `None` to try io_uring first.
    pub driver: Option<DriverKind>,
    /// Ask for TUN and UDP offloads.
    pub offloads: bool,
    /// UDP listen port (0 = pick one).
    pub listen_port: u16,
    /// Pin worker `i` to the `i`-th core of the process's affinity mask (otherwise the
    /// scheduler places workers).
    pub pin: bool,
    /// `SO_MARK` on every UDP socket (the encrypted datagrams carry this firewall mark, so
    /// policy routing can keep them off the tunnel; needs CAP_NET_ADMIN). `None`: no mark.
    pub fwmark: Option<u32>,
}

/// What the engine ended up with.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    /// Driver in use.
    pub driver: DriverKind,
    /// Worker threads.
    pub threads: usize,
    /// TUN offloads accepted.
    pub tun: Offloads,
    /// UDP features.
    pub udp: UdpFeatures,
    /// Bound UDP port.
    pub listen_port: u16,
    /// Workers pinned to cores.
    pub pinned: bool,
}

impl EngineInfo {
    /// Logs what is in force (the driver and offloads the kernel accepted), once at start.
    pub fn log(&self, interface: &str) {
        tracing::info!(
            interface,
            driver = %self.driver,
            threads = self.threads,
            tun_offloads = %self.tun,
            udp_gso = self.udp.gso,
            udp_gro = self.udp.gro,
            listen_port = self.listen_port,
            pinned = self.pinned,
            "engine started"
        );
    }
}

/// A running engine: worker threads and the timer thread.
pub struct Engine {
    /// What is in force.
    pub info: EngineInfo,
    /// Shared state (table, counters, stop flag).
    pub shared: Shared,
    threads: Vec<JoinHandle<()>>,
    handshaker: Handshaker,
}

impl Engine {
    /// Opens the TUN and sockets and starts every thread.
    pub fn start(opts: &EngineOptions, table: Arc<Table>) -> io::Result<Self> {
        // Read the affinity mask before any pinning: it is the calling thread's own.
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let threads = if opts.threads == 0 {
            cores.len().max(1)
        } else {
            opts.threads
        };
        let tun = Tun::open(&opts.interface, threads, opts.offloads)?;
        let tun_offloads = tun.offloads();
        let (socks, port, udp_features) =
            udp::open_reuseport(opts.listen_port, threads, opts.offloads, opts.fwmark)?;
        table.set_listen_port(port);
        let driver = match opts.driver {
            Some(d) => d,
            None => {
                if uring::available() {
                    DriverKind::Uring
                } else {
                    DriverKind::Epoll
                }
            }
        };
        if driver == DriverKind::Uring && !uring::available() {
            return Err(io::Error::other(
                "io_uring is not available here (seccomp or kernel.io_uring_disabled); use --driver epoll",
            ));
        }
        let shared = Shared {
            table: table.clone(),
            counters: Arc::new(DropCounters::default()),
            batches: Arc::new(BatchStats::new(threads)),
            stop: Arc::new(AtomicBool::new(false)),
            vnet: tun_offloads.vnet_hdr,
            uso: tun_offloads.vnet_hdr && tun_offloads.uso,
            udp: udp_features,
            epoch: Instant::now(),
            control: Arc::new(ControlQueue::default()),
            fwmark: opts.fwmark,
        };
        let timer_sock = crate::sys::tun::dup(socks[0].as_raw_fd())?;
        let ctl_sock = crate::sys::tun::dup(socks[0].as_raw_fd())?;
        let mut handles = Vec::new();
        for (id, (tunq, sock)) in tun.into_queues().into_iter().zip(socks).enumerate() {
            let spec = WorkerSpec {
                id,
                tun: tunq,
                udp: sock,
                core: (opts.pin && !cores.is_empty()).then(|| cores[id % cores.len()]),
            };
            let sh = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("tabbify-w{id}"))
                .spawn(move || {
                    if let Some(c) = spec.core {
                        core_affinity::set_for_current(c);
                    }
                    let id = spec.id;
                    let r = match driver {
                        DriverKind::Uring => uring::run(spec, sh.clone()),
                        DriverKind::Epoll => epoll::run(spec, sh.clone()),
                    };
                    if let Err(e) = r {
                        tracing::error!(worker = id, error = %e, "worker stopped");
                        sh.stop.store(true, Ordering::Relaxed);
                    }
                })?;
            handles.push(h);
        }
        let sh = shared.clone();
        handles.push(
            std::thread::Builder::new()
                .name("tabbify-timers".into())
                .spawn(move || {
                    timers::run(sh.table, timer_sock, sh.udp.ipv6, sh.counters, sh.stop)
                })?,
        );
        Ok(Self {
            info: EngineInfo {
                driver,
                threads,
                tun: tun_offloads,
                udp: udp_features,
                listen_port: port,
                pinned: opts.pin && !cores.is_empty(),
            },
            shared,
            threads: handles,
            handshaker: Handshaker {
                sock: ctl_sock,
                ipv6: udp_features.ipv6,
            },
        })
    }

    /// Sends handshake initiations on behalf of the control side.
    pub fn handshaker(&self) -> &Handshaker {
        &self.handshaker
    }

    /// The queue of STUN and relay-control datagrams the workers received on the
    /// WireGuard socket (see `core::demux`); the control side drains it.
    pub fn control_queue(&self) -> Arc<ControlQueue> {
        self.shared.control.clone()
    }

    /// Whether a worker stopped on its own (a fatal error).
    pub fn failed(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    /// Stops every thread and waits for them; the TUN goes away with the last queue fd.
    pub fn stop(self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for h in self.threads {
            let _ = h.join();
        }
    }
}

/// Sends handshake initiations from the listen port outside the workers (hole punching,
/// proactive handshakes with new peers). Owns a dup of a worker's socket.
pub struct Handshaker {
    sock: OwnedFd,
    ipv6: bool,
}

impl Handshaker {
    /// Another handle on the same socket (for a task that outlives a borrow).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            sock: crate::sys::tun::dup(self.sock.as_raw_fd())?,
            ipv6: self.ipv6,
        })
    }

    /// Sends `bytes` to `dst` from the WireGuard listen port (STUN Binding requests, relay
    /// control): the answer comes back to the listen port, on any worker's socket, and
    /// reaches the control side through [`Engine::control_queue`].
    pub fn send_raw(&self, dst: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        udp::send(self.sock.as_raw_fd(), bytes, dst, None, self.ipv6)?;
        Ok(())
    }

    /// Sends a fresh handshake initiation to `peer` where its sends go now: through its
    /// relay when its path is `Relay` and it has a relay route (the header rewritten, see
    /// `core::path`), else to its direct endpoint. Returns false when there is nowhere to
    /// send or the session had nothing to send.
    pub fn initiate(&self, peer: &Peer) -> io::Result<bool> {
        let mut buf = [0u8; 256];
        let mut st = peer.lock();
        let Some(to) = path::target(st.endpoint, st.path, st.relay) else {
            return Ok(false);
        };
        let n = match st.tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return Ok(false),
        };
        drop(st);
        if let Some(h) = to.handle() {
            path::rewrite(&mut buf[..n], h);
        }
        udp::send(self.sock.as_raw_fd(), &buf[..n], to.addr(), None, self.ipv6)?;
        peer.stats.add_tx(n);
        Ok(true)
    }

    /// Sends one direct probe to `peer` straight at `dst`, a direct candidate, whatever
    /// its path, without changing its endpoint, path or relay route
    /// ([`path::probe_datagram`]): a ping inside the session when one exists, else a
    /// handshake initiation. The peer answers a ping that arrived directly with a pong
    /// straight back, and an initiation with a response the same way; only such an answer,
    /// received directly, upgrades this side to `Direct` (unless pinned). The peer's own
    /// path is not changed by our probe: it upgrades when its probes are answered (see
    /// `core::path`). Returns false when the session had nothing to send.
    pub fn probe_direct(&self, peer: &Peer, dst: SocketAddr) -> io::Result<bool> {
        let mut buf = [0u8; 256];
        let mut st = peer.lock();
        let Some(n) = path::probe_datagram(&mut st, &mut buf) else {
            return Ok(false);
        };
        drop(st);
        udp::send(self.sock.as_raw_fd(), &buf[..n], dst, None, self.ipv6)?;
        peer.stats.add_tx(n);
        Ok(true)
    }
}
