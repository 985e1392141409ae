//! One bring-up and shutdown path for `tabbify-mesh up` and `tabbify-mesh join`.
//!
//! ```text
//! start:  local destinations into the table (addresses + routed prefixes) ─▶ SIGINT/SIGTERM
//!         flags ─▶ engine (TUN + workers) on the table ─▶ link up, MTU ─▶ addresses (fatal
//!         on error) ─▶ covering routes (fatal on error) ─▶ routes (logged on error)
//!         ─▶ default-route policy rules (fatal on error; `crate::policy`) ─▶ UAPI socket
//! run:    the caller's loop, until `stop_reason()` says a signal came or a worker failed
//! stop:   UAPI socket removed ─▶ policy rules removed ─▶ workers joined, TUN gone with its
//!         last queue ─▶ drops logged
//! ```
//!
//! The signals only set a flag (nothing else runs in a handler); both commands poll it.
//!
//! Failing closed: the table learns this node's addresses before the engine starts, so a
//! decrypted packet for any other destination is dropped from the first packet on
//! (`core::local`). Every route is installed onto the TUN before the UAPI socket exists, so
//! no `wg set` can run before the routes are in place, and the routes stay on the TUN for
//! the interface's life: a prefix whose peer goes away keeps routing into the engine, which
//! drops the packet and answers with an ICMP unreachable (`core::icmp`), instead of falling
//! back to another route in cleartext.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;

use crate::core::local::LocalNets;
use crate::core::net::IpNet;
use crate::core::table::Table;
use crate::driver::{Engine, EngineInfo, EngineOptions, Handshaker};
use crate::policy::{Family, PolicyRoutes};
use crate::sys::link;
use crate::uapi::UapiServer;

/// What to bring up.
#[derive(Clone, Debug)]
pub struct InterfaceSpec {
    /// The engine (the interface name is `engine.interface`).
    pub engine: EngineOptions,
    /// TUN MTU.
    pub mtu: u32,
    /// Addresses to put on the TUN.
    pub addresses: Vec<IpNet>,
    /// Prefixes that must route into the TUN: starting fails if one cannot be installed
    /// (the joiner's mesh prefixes).
    pub covering_routes: Vec<IpNet>,
    /// Prefixes to route into the TUN (a failure is logged).
    pub routes: Vec<IpNet>,
    /// Prefixes this node routes for its peers on purpose (a subnet router): decrypted
    /// packets for them are delivered besides those for `addresses`. Empty by default.
    pub routed: Vec<IpNet>,
    /// Families whose default route goes through the tunnel by policy routing (wg-quick's
    /// fwmark rules, `crate::policy`) with mark `engine.fwmark`; their `/0` prefixes must
    /// not be in `routes`. Empty: no policy rules.
    pub default_route: Vec<Family>,
}

/// Why a running interface should stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT or SIGTERM.
    Signal,
    /// A data-plane worker stopped on its own.
    WorkerFailed,
}

/// A running interface: the engine, its TUN and its UAPI socket.
pub struct Interface {
    name: String,
    engine: Engine,
    uapi: UapiServer,
    policy: Option<PolicyRoutes>,
    signalled: Arc<AtomicBool>,
}

impl Interface {
    /// Installs the stop signals, starts the engine on `table` and configures the link.
    pub fn start(spec: &InterfaceSpec, table: Arc<Table>) -> anyhow::Result<Self> {
        let name = spec.engine.interface.clone();
        let signalled = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, signalled.clone())
                .context("installing signal handlers")?;
        }
        table.set_local(LocalNets::new(
            spec.addresses.iter().map(|a| a.addr()),
            spec.routed.iter().copied(),
        ));
        let engine = Engine::start(&spec.engine, table.clone())
            .with_context(|| format!("starting the engine on {name}"))?;
        engine.info.log(&name);
        link::up(&name, spec.mtu)?;
        for a in &spec.addresses {
            link::add_address(&name, a)?;
        }
        for n in &spec.covering_routes {
            link::add_route(&name, n)
                .with_context(|| format!("routing {n} into {name} (fail-closed route)"))?;
        }
        for n in &spec.routes {
            if let Err(e) = link::add_route(&name, n) {
                tracing::warn!(prefix = %n, error = %e, "route not added");
            }
        }
        let policy = if spec.default_route.is_empty() {
            None
        } else {
            let mark = spec
                .engine
                .fwmark
                .context("a default route through the tunnel needs a fwmark on the sockets")?;
            Some(PolicyRoutes::install(&name, mark, &spec.default_route)?)
        };
        let uapi = crate::device::serve_uapi(&name, table, engine.shared.clone())
            .with_context(|| format!("opening the UAPI socket for {name}"))?;
        Ok(Self {
            name,
            engine,
            uapi,
            policy,
            signalled,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the engine runs with.
    pub fn info(&self) -> &EngineInfo {
        &self.engine.info
    }

    /// The engine's per-worker batch-size histograms.
    pub fn batches(&self) -> Arc<crate::core::batchstats::BatchStats> {
        self.engine.shared.batches.clone()
    }

    /// The engine's drop counters.
    pub fn counters(&self) -> Arc<crate::core::counters::DropCounters> {
        self.engine.shared.counters.clone()
    }

    /// Whether the sockets speak IPv6 (dual-stack).
    pub fn ipv6(&self) -> bool {
        self.engine.shared.udp.ipv6
    }

    /// A handshaker of its own for the control side (initiations to new peers, hole punches).
    pub fn handshaker(&self) -> std::io::Result<Handshaker> {
        self.engine.handshaker().try_clone()
    }

    /// The queue of STUN and relay-control datagrams received on the WireGuard socket
    /// (`core::demux`); answers to [`Handshaker::send_raw`] arrive here.
    pub fn control_queue(&self) -> Arc<crate::core::demux::ControlQueue> {
        self.engine.control_queue()
    }

    /// Why to stop, once there is a reason (a failed worker wins over a signal).
    pub fn stop_reason(&self) -> Option<Stop> {
        if self.engine.failed() {
            Some(Stop::WorkerFailed)
        } else if self.signalled.load(Ordering::Relaxed) {
            Some(Stop::Signal)
        } else {
            None
        }
    }

    /// Removes the UAPI socket and the TUN and logs the packets dropped, by reason.
    pub fn shut_down(self) {
        let drops = self.engine.shared.counters.nonzero();
        let answered = self.engine.shared.counters.unreachable_sent();
        drop(self.uapi);
        if let Some(mut p) = self.policy {
            p.remove();
        }
        self.engine.stop();
        for (reason, n) in drops {
            tracing::info!(reason = reason.name(), count = n, "dropped packets");
        }
        if answered > 0 {
            tracing::info!(
                count = answered,
                "ICMP unreachable answers written to the TUN"
            );
        }
        tracing::info!(interface = %self.name, "interface removed");
    }
}

impl Stop {
    /// The error a command exits with, if any.
    pub fn into_result(self) -> anyhow::Result<()> {
        match self {
            Stop::Signal => Ok(()),
            Stop::WorkerFailed => Err(anyhow::anyhow!(
                "a data-plane worker failed; see the log above"
            )),
        }
    }
}
