//! Simulation tests of the engine core: WireGuard's timers and the data path under loss,
//! duplication, reordering, delay and NAT rebinding, on the mock clock. Every test prints
//! its seed; `TABBIFY_SIM_SEED=<seed>` replays it. Timer assertions allow the timer
//! thread's granularity: boringtun caches the time at each `update_timers` call, made
//! every `TICK` (250 ms).

use std::time::Duration;

use mock_instant::MockClock;
use tabbify_engine::core::counters::DropReason;
use tabbify_engine::driver::timers::TICK;
use tabbify_sim::sim::{seed, Sent};
use tabbify_sim::{Block, Impairments, Kind, NodeOptions, Origin, Sim};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
/// WireGuard whitepaper §6.1 (and boringtun's constants).
const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);

fn two_nodes(seed: u64, imp: Impairments) -> (Sim, usize, usize) {
    let mut sim = Sim::new(seed, imp);
    let a = sim.add_node(NodeOptions::default());
    let b = sim.add_node(NodeOptions::default());
    sim.connect(a, b, None, None);
    (sim, a, b)
}

fn sends<'a>(sim: &'a Sim, node: usize, kind: Kind) -> impl Iterator<Item = &'a Sent> + 'a {
    sim.trace()
        .iter()
        .filter(move |s| s.node == node && s.kind == kind)
}

/// mock_instant 0.3 keeps its clock per thread: a simulation on one thread never moves
/// another's clock (the design relies on it; enabling mock_instant's `sync` breaks it).
#[test]
fn sim_clock_is_per_thread() {
    let here = MockClock::time();
    let there = std::thread::spawn(|| {
        MockClock::advance(Duration::from_secs(3600));
        MockClock::time()
    })
    .join()
    .expect("thread");
    assert_eq!(there, Duration::from_secs(3600));
    assert_eq!(MockClock::time(), here);
}

/// One seed, one history: two runs of a lossy, reordering scenario from the same seed send
/// the same datagrams at the same times with the same fates.
#[test]
fn sim_same_seed_same_history() {
    let seed = seed("sim_same_seed_same_history");
    let run = move || {
        let imp = Impairments {
            loss: 0.2,
            duplicate: 0.1,
            jitter: 30 * MS,
            reorder: 0.1,
            reorder_delay: 50 * MS,
            ..Impairments::CLEAN
        };
        let (mut sim, a, b) = two_nodes(seed, imp);
        for _ in 0..200 {
            sim.send(a, b, 100);
            sim.send(b, a, 60);
            sim.advance(50 * MS);
        }
        sim.advance(5 * SEC);
        let r = sim.finish();
        let trace: Vec<_> = sim
            .trace()
            .iter()
            .map(|s| (s.at, s.node, s.to, s.kind, s.bytes.len(), s.fate))
            .collect();
        (trace, r.delivered, r.losses)
    };
    // Fresh threads: each run's clock starts at zero.
    let first = std::thread::spawn(run).join().expect("first run");
    let second = std::thread::spawn(run).join().expect("second run");
    assert!(
        first.0.len() >= 10,
        "too little happened: {}",
        first.0.len()
    );
    assert_eq!(first, second);
}

/// Handshakes complete under 30% loss (each way, independently per datagram, plus
/// duplication and reordering) within REKEY_ATTEMPT_TIME, in each of 40 independent runs, and the packet that started it is delivered or its loss is counted.
#[test]
fn sim_handshake_completes_under_30_percent_loss() {
    let seed = seed("sim_handshake_completes_under_30_percent_loss");
    let imp = Impairments {
        loss: 0.3,
        duplicate: 0.05,
        jitter: 20 * MS,
        reorder: 0.05,
        reorder_delay: 40 * MS,
        ..Impairments::CLEAN
    };
    const TRIALS: u64 = 40;
    let mut lost_datagrams = 0;
    let mut inits = 0;
    for trial in 0..TRIALS {
        let (mut sim, a, b) = two_nodes(seed.wrapping_add(trial), imp);
        // A sends 10 packets a second. The handshake is complete when A has the session
        // and B has confirmed it with a data packet from A (a responder cannot send before
        // that, whitepaper §5.4.7), so traffic must flow for B to get one.
        let mut at = None;
        while sim.now() < REKEY_ATTEMPT_TIME {
            sim.send(a, b, 100);
            sim.advance(100 * MS);
            if sim.session_age(a, b).is_some() && sim.session_age(b, a).is_some() {
                at = Some(sim.now());
                break;
            }
        }
        let at = at.unwrap_or_else(|| {
            panic!("trial {trial}: no session after {REKEY_ATTEMPT_TIME:?} at 30% loss")
        });
        // After the handshake, traffic flows (with 30% of it lost).
        for _ in 0..50 {
            sim.send(a, b, 100);
            sim.advance(20 * MS);
        }
        sim.advance(SEC);
        let r = sim.finish();
        r.check();
        assert!(r.delivered > 0, "trial {trial}: nothing delivered: {r}");
        assert!(r.loss("net_loss") > 0 || r.delivered == r.sent, "{r}");
        lost_datagrams += sim.trace().iter().filter(|s| s.fate.is_err()).count();
        inits += sends(&sim, a, Kind::Init).count() + sends(&sim, b, Kind::Init).count();
        eprintln!("trial {trial}: both sessions at {at:?}; {r}");
    }
    assert!(lost_datagrams > 0, "30% loss lost nothing");
    assert!(
        inits as u64 >= TRIALS,
        "{inits} initiations over {TRIALS} trials"
    );
}

/// The initiator rekeys at REKEY_AFTER_TIME while it sends: a new initiation 120 s after
/// the session was established (within a timer tick or two), a new session, no packet
/// lost across the switch on a clean path; the responder never initiates.
#[test]
fn sim_rekey_at_rekey_after_time() {
    let seed = seed("sim_rekey_at_rekey_after_time");
    let (mut sim, a, b) = two_nodes(seed, Impairments::CLEAN);
    // A initiates; B starts sending once it has the session (had it sent first, both
    // would initiate and either might end up the initiator).
    sim.send(a, b, 100);
    let established = sim
        .advance_until(SEC, MS, |s| s.session_age(a, b).is_some())
        .expect("handshake on a clean path");
    sim.advance_until(SEC, MS, |s| s.session_age(b, a).is_some())
        .expect("B confirms");
    for _ in 0..2_600 {
        sim.send(a, b, 200);
        sim.send(b, a, 80);
        sim.advance(100 * MS);
    }
    sim.advance(SEC);
    let inits: Vec<Duration> = sends(&sim, a, Kind::Init).map(|s| s.at).collect();
    assert!(inits.len() >= 3, "initiations at {inits:?}");
    // The first session's keys were made at `established`; boringtun stamps it with the
    // time of its last timer tick, so the rekey falls within a tick either side of 120 s.
    let first = established + REKEY_AFTER_TIME;
    let rekey = inits[1];
    assert!(
        rekey + TICK >= first && rekey <= first + 2 * TICK,
        "rekey at {rekey:?}, session established at {established:?}"
    );
    // And again 120 s after the second session.
    let second = inits[2];
    assert!(
        second >= rekey + REKEY_AFTER_TIME - TICK && second <= rekey + REKEY_AFTER_TIME + 3 * TICK,
        "second rekey at {second:?} after the first at {rekey:?}"
    );
    assert_eq!(
        sends(&sim, b, Kind::Init).count(),
        0,
        "the responder initiated"
    );
    assert!(sim.session_age(a, b).expect("session") < REKEY_AFTER_TIME);
    let r = sim.finish();
    r.check();
    assert_eq!(r.delivered, r.sent, "a clean path lost packets: {r}");
}

/// With every handshake message blocked after the first handshake, no rekey can happen:
/// data flows until the session is REJECT_AFTER_TIME old, then both ends drop it — the
/// receiver refuses its data, the sender stops encrypting with it and queues instead.
/// The initiator's attempt to rekey starts at REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT -
/// REKEY_TIMEOUT (it receives data) and is counted as blocked.
#[test]
fn sim_session_expires_at_reject_after_time() {
    let seed = seed("sim_session_expires_at_reject_after_time");
    let (mut sim, a, b) = two_nodes(seed, Impairments::CLEAN);
    // A initiates; B, the responder, streams to A (a responder never rekeys on send).
    sim.send(a, b, 100);
    let established = sim
        .advance_until(SEC, MS, |s| {
            s.session_age(a, b).is_some() && s.session_age(b, a).is_some()
        })
        .expect("handshake on a clean path");
    sim.net.impairments.block = Block::Handshakes;
    let mut last_alive = Duration::ZERO;
    let mut first_dead = None;
    let mut early_copy = None;
    while sim.now() < established + REJECT_AFTER_TIME + 10 * SEC {
        let seq = sim.send(b, a, 100);
        sim.advance(100 * MS);
        let now = sim.now();
        if early_copy.is_none() && now > established + 100 * SEC {
            early_copy = sends(&sim, b, Kind::Data).last().map(|s| s.bytes.clone());
        }
        if sim.delivered(b, seq) {
            last_alive = now;
        } else if first_dead.is_none() {
            first_dead = Some(now);
        }
    }
    let first_dead = first_dead.expect("the session never expired");
    assert!(
        last_alive + TICK >= established + REJECT_AFTER_TIME - 2 * TICK,
        "data stopped at {last_alive:?}, established at {established:?}"
    );
    assert!(
        first_dead >= established + REJECT_AFTER_TIME - TICK
            && first_dead <= established + REJECT_AFTER_TIME + 3 * TICK,
        "first undelivered packet at {first_dead:?}, established at {established:?}"
    );
    assert!(
        last_alive < first_dead,
        "data delivered after expiry at {last_alive:?}"
    );
    assert_eq!(sim.session_age(a, b), None);
    assert_eq!(sim.session_age(b, a), None);
    // After expiry B sends no data: its packets wait for a handshake that cannot happen.
    let b_data_after = sends(&sim, b, Kind::Data)
        .filter(|s| s.at > established + REJECT_AFTER_TIME + 2 * TICK)
        .count();
    assert_eq!(b_data_after, 0);
    // A tried to rekey from REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT on.
    let a_rekey = sends(&sim, a, Kind::Init)
        .map(|s| s.at)
        .find(|t| *t > established)
        .expect("A never tried to rekey");
    let want = established + REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT;
    assert!(
        a_rekey + TICK >= want && a_rekey <= want + 2 * TICK,
        "A's rekey at {a_rekey:?}, want {want:?}"
    );
    assert!(sends(&sim, a, Kind::Init).all(|s| s.at <= established || s.fate.is_err()));
    // A datagram of the old session arriving now is refused and counted.
    let old = early_copy.expect("a data datagram from B");
    let from = sim.net.public(b);
    let drops = sim.inject(a, from, &old);
    assert_eq!(
        drops,
        vec![(DropReason::Protocol, 1)],
        "old-session datagram"
    );
    let r = sim.finish();
    r.check();
    assert!(r.loss("wg_queue") > 0, "B's packets after expiry: {r}");
    assert!(r.loss("net_blocked") == 0, "no data is blocked: {r}");
}

/// Persistent keepalive: an idle peer with `persistent_keepalive = 25` sends a keepalive
/// every 25 s (within a timer tick); the peer without it sends none of its own.
#[test]
fn sim_persistent_keepalive_fires_at_interval() {
    let seed = seed("sim_persistent_keepalive_fires_at_interval");
    let mut sim = Sim::new(seed, Impairments::CLEAN);
    let a = sim.add_node(NodeOptions { nat: true });
    let b = sim.add_node(NodeOptions::default());
    sim.connect(a, b, Some(25), None);
    sim.send(a, b, 100);
    sim.advance(150 * SEC);
    let ka: Vec<Duration> = sim
        .trace()
        .iter()
        .filter(|s| s.node == a && s.kind == Kind::Keepalive && s.origin == Origin::Timer)
        .map(|s| s.at)
        .collect();
    assert!(
        (5..=7).contains(&ka.len()),
        "{} persistent keepalives in 150 s: {ka:?}",
        ka.len()
    );
    for w in ka.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap + TICK >= 25 * SEC && gap <= 25 * SEC + 2 * TICK,
            "keepalive gap {gap:?} in {ka:?}"
        );
    }
    // B answers A's one data packet with one passive keepalive (KEEPALIVE_TIMEOUT), and
    // sends nothing for A's keepalives.
    let b_ka: Vec<Duration> = sends(&sim, b, Kind::Keepalive).map(|s| s.at).collect();
    assert!(b_ka.len() <= 1, "B keepalives at {b_ka:?}");
    // Every keepalive reached B authenticated: nothing dropped there.
    assert!(sim.drops(b).is_empty(), "B drops: {:?}", sim.drops(b));
    sim.finish().check();
}

/// Passive keepalive: a peer that received data and has sent nothing back for
/// KEEPALIVE_TIMEOUT sends one keepalive, so the sender learns the path still works.
/// (boringtun measures the timeout from the receiver's last send, the whitepaper's §6.5
/// from the receipt; either way the keepalive comes within KEEPALIVE_TIMEOUT of the data.)
#[test]
fn sim_passive_keepalive_after_keepalive_timeout() {
    let seed = seed("sim_passive_keepalive_after_keepalive_timeout");
    let (mut sim, a, b) = two_nodes(seed, Impairments::CLEAN);
    sim.send(a, b, 100);
    sim.advance(30 * SEC);
    sim.send(b, a, 100);
    sim.advance(SEC);
    let at = sim.now();
    let seq = sim.send(a, b, 100);
    sim.advance(30 * SEC);
    assert!(sim.delivered(a, seq));
    let ka: Vec<Duration> = sends(&sim, b, Kind::Keepalive)
        .filter(|s| s.at > at)
        .map(|s| s.at)
        .collect();
    assert_eq!(ka.len(), 1, "B's keepalives after {at:?}: {ka:?}");
    assert!(
        ka[0] <= at + KEEPALIVE_TIMEOUT + 2 * TICK,
        "keepalive at {:?} for data sent at {at:?}",
        ka[0]
    );
    assert_eq!(sends(&sim, a, Kind::Init).count(), 1, "a second handshake");
    sim.finish().check();
}

/// NAT rebinding: A, behind a NAT, gets a new public port mid-session. B follows A's
/// first authenticated datagram from the new address (WireGuard roaming, whitepaper §2.1);
/// B's datagrams to the old mapping are lost and counted until then. Twice: once while A
/// sends, once while A is idle and only its persistent keepalive speaks.
#[test]
fn sim_nat_rebinding_roams_endpoint() {
    let seed = seed("sim_nat_rebinding_roams_endpoint");
    let imp = Impairments {
        jitter: 10 * MS,
        ..Impairments::CLEAN
    };
    let mut sim = Sim::new(seed, imp);
    let a = sim.add_node(NodeOptions { nat: true });
    let b = sim.add_node(NodeOptions::default());
    sim.connect(a, b, Some(10), None);
    let old = sim.net.public(a);
    // A initiates alone (see `sim_simultaneous_start_is_counted` for both at once).
    sim.send(a, b, 120);
    sim.advance_until(SEC, MS, |s| s.session_age(b, a).is_some())
        .expect("handshake on a clean path");
    for _ in 0..100 {
        sim.send(a, b, 120);
        sim.send(b, a, 120);
        sim.advance(100 * MS);
    }
    assert_eq!(sim.endpoint(b, a), Some(old));
    // Phase 1: rebinding while both send.
    let new = sim.net.rebind(a);
    let at = sim.now();
    let mut b_seqs = Vec::new();
    for _ in 0..100 {
        sim.send(a, b, 120);
        b_seqs.push((sim.now(), sim.send(b, a, 120)));
        sim.advance(100 * MS);
    }
    assert_eq!(sim.endpoint(b, a), Some(new));
    let moved = sends(&sim, b, Kind::Data)
        .find(|s| s.at >= at && s.to == new)
        .map(|s| s.at)
        .expect("B never sent to A's new address");
    assert!(
        moved <= at + 200 * MS,
        "B followed at {moved:?}, rebinding at {at:?}"
    );
    // Everything B sent after it followed arrived.
    for (t, seq) in &b_seqs {
        if *t > moved {
            assert!(sim.delivered(b, *seq), "B's packet {seq} at {t:?} lost");
        }
    }
    let stale_1 = sim.report().loss("net_nat_stale");
    assert!(
        stale_1 >= 1,
        "nothing went to the old mapping: {}",
        sim.report()
    );

    // Phase 2: A idle; only its persistent keepalive (10 s) tells B where it went.
    let new2 = sim.net.rebind(a);
    let at2 = sim.now();
    for _ in 0..150 {
        sim.send(b, a, 120);
        sim.advance(100 * MS);
    }
    assert_eq!(sim.endpoint(b, a), Some(new2));
    let moved2 = sends(&sim, b, Kind::Data)
        .find(|s| s.at >= at2 && s.to == new2)
        .map(|s| s.at)
        .expect("B never sent to A's second address");
    assert!(
        moved2 <= at2 + 10 * SEC + 2 * TICK,
        "B followed at {moved2:?}, rebinding at {at2:?}"
    );
    sim.advance(SEC);
    let r = sim.finish();
    r.check();
    assert!(r.loss("net_nat_stale") > stale_1, "{r}");
    // Only the stale mapping lost anything.
    assert_eq!(r.lost(), r.loss("net_nat_stale"), "{r}");
}

/// Three nodes (one behind a NAT that rebinds) in a full mesh over a bad path — loss,
/// duplication, jitter, reordering — each sending to each: every packet delivered is
/// byte-identical to the one sent and delivered once, and sent = delivered + losses
/// counted by reason, none of them silent; duplicates are refused as replays.
#[test]
fn sim_every_packet_delivered_intact_or_counted() {
    let seed = seed("sim_every_packet_delivered_intact_or_counted");
    let imp = Impairments {
        loss: 0.1,
        duplicate: 0.05,
        delay: 15 * MS,
        jitter: 30 * MS,
        reorder: 0.05,
        reorder_delay: 80 * MS,
        block: Block::Nothing,
    };
    let mut sim = Sim::new(seed, imp);
    let n0 = sim.add_node(NodeOptions { nat: true });
    let n1 = sim.add_node(NodeOptions::default());
    let n2 = sim.add_node(NodeOptions::default());
    sim.connect(n0, n1, Some(15), None);
    sim.connect(n0, n2, Some(15), None);
    sim.connect(n1, n2, None, None);
    let nodes = [n0, n1, n2];
    // 200 s at 20 packets a second each way: past REKEY_AFTER_TIME, so sessions rekey
    // under the same faults.
    const STEPS: u32 = 4_000;
    for step in 0..STEPS {
        for &x in &nodes {
            for &y in &nodes {
                if x != y {
                    sim.send(x, y, 14 + (step as usize * 37 + x * 11 + y) % 600);
                }
            }
        }
        if step == STEPS / 2 {
            sim.net.rebind(n0);
        }
        sim.advance(50 * MS);
    }
    sim.advance(10 * SEC);
    let r = sim.finish();
    r.check();
    assert_eq!(r.sent, 6 * u64::from(STEPS));
    assert!(r.delivered * 10 >= r.sent * 8, "too few delivered: {r}");
    assert!(r.loss("net_loss") > 0, "{r}");
    // Duplicated datagrams reached a receiver and were refused as replays.
    let replays: u64 = nodes
        .iter()
        .map(|&n| sim.drop_count(n, DropReason::Replay))
        .sum();
    assert!(replays > 0, "no duplicate was refused");
    assert_eq!(r.loss("net_in_flight"), 0, "{r}");
}

/// Both ends send their first packet at the same instant, so both initiate. The
/// handshakes cross (each side's queue flush after answering the other's initiation starts
/// yet another one, as boringtun's `decapsulate(None)` does without a current session),
/// settle on one session within a few round trips, and any packet lost on the way is
/// counted, not silent.
#[test]
fn sim_simultaneous_start_is_counted() {
    let seed = seed("sim_simultaneous_start_is_counted");
    let (mut sim, a, b) = two_nodes(seed, Impairments::CLEAN);
    for _ in 0..100 {
        sim.send(a, b, 100);
        sim.send(b, a, 100);
        sim.advance(100 * MS);
    }
    sim.advance(SEC);
    assert!(sim.session_age(a, b).is_some() && sim.session_age(b, a).is_some());
    let inits = sends(&sim, a, Kind::Init).count() + sends(&sim, b, Kind::Init).count();
    let r = sim.finish();
    eprintln!(
        "{inits} initiations; drops A {:?} B {:?}",
        sim.drops(a),
        sim.drops(b)
    );
    r.check();
    // Settled: nothing lost after the first second.
    assert!(r.lost() <= 4, "{r}");
}

/// With the path down, an initiator retries its handshake every REKEY_TIMEOUT and gives up
/// after REKEY_ATTEMPT_TIME, discarding the packet it queued (counted as `wg_queue`).
#[test]
fn sim_handshake_retries_then_gives_up() {
    let seed = seed("sim_handshake_retries_then_gives_up");
    let imp = Impairments {
        block: Block::Everything,
        ..Impairments::CLEAN
    };
    let (mut sim, a, b) = two_nodes(seed, imp);
    sim.send(a, b, 100);
    sim.advance(150 * SEC);
    let inits: Vec<Duration> = sends(&sim, a, Kind::Init).map(|s| s.at).collect();
    for w in inits.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap + TICK >= REKEY_TIMEOUT && gap <= REKEY_TIMEOUT + 2 * TICK,
            "retry gap {gap:?} in {inits:?}"
        );
    }
    let last = *inits.last().expect("no initiation");
    assert!(
        last < REKEY_ATTEMPT_TIME && last + REKEY_TIMEOUT + 2 * TICK >= REKEY_ATTEMPT_TIME,
        "last initiation at {last:?}: {inits:?}"
    );
    assert_eq!(sends(&sim, b, Kind::Init).count(), 0);
    let r = sim.finish();
    r.check();
    assert_eq!(r.loss("wg_queue"), 1, "{r}");
}

/// Packets a node queued while it had no session must leave once it has one. Here A
/// queues packets while its initiation is blocked; then B initiates, A answers, and B's
/// keepalive confirms that session to A (A is its responder). A sends new packets on it at
/// once, but its queued ones stay in boringtun's queue until A's own handshake completes —
/// here never, as B's responses are lost — and are discarded when that handshake gives up
/// after REKEY_ATTEMPT_TIME. `Pipeline::on_udp` flushes boringtun's queue only after
/// handshake messages, not after the data packet that confirms a session.
///
/// Ignored: it fails today. The fix is a `decapsulate(None, &[], ..)` flush after a data
/// run that confirmed a session, in `core/pipeline.rs`.
#[test]
#[ignore = "reproduces a pipeline bug: queued packets wait for the node's own handshake"]
fn sim_queued_packets_leave_when_session_confirmed() {
    let seed = seed("sim_queued_packets_leave_when_session_confirmed");
    let imp = Impairments {
        block: Block::Handshakes,
        ..Impairments::CLEAN
    };
    let (mut sim, a, b) = two_nodes(seed, imp);
    let queued: Vec<u64> = (0..10).map(|_| sim.send(a, b, 100)).collect();
    sim.advance(SEC);
    sim.net.impairments.block = Block::ResponsesFrom(b);
    sim.send(b, a, 100);
    let confirmed = sim
        .advance_until(SEC, MS, |s| s.session_age(a, b).is_some())
        .expect("B's handshake confirms a session at A");
    sim.advance(SEC);
    let fresh = sim.send(a, b, 100);
    sim.advance(100 * MS);
    assert!(
        sim.delivered(a, fresh),
        "A cannot send on the confirmed session"
    );
    let waiting: Vec<u64> = queued
        .iter()
        .copied()
        .filter(|seq| !sim.delivered(a, *seq))
        .collect();
    assert!(
        waiting.is_empty(),
        "A's queued packets {waiting:?} still wait 1 s after the session was confirmed at \
         {confirmed:?}: {}",
        sim.report()
    );
}

/// A responder must not send data on a session until the initiator has confirmed it
/// (whitepaper §5.4.7): if the response was lost, the initiator never has those keys. Here
/// every response from B is lost while A retries its initiation every REKEY_TIMEOUT, so B
/// holds eight unconfirmed responder sessions; then B sends a packet. It must wait for a
/// handshake (queued, B initiates, A answers), not go out under keys A never got.
///
/// Ignored: it fails with boringtun 0.7.1. `Tunn::current` starts at 0 and sessions live in
/// an 8-slot ring at `local_index % 8`; B's eighth local index (`index << 8 | 8`) lands in
/// slot 0, so `encapsulate` takes that unconfirmed session for the current one and A
/// refuses every packet (`NoCurrentSession`, counted as `Protocol`) until a handshake
/// completes. The same aliasing hits any node whose `current` slot is reused by a newer
/// unconfirmed session, e.g. after crossed handshakes under loss.
#[test]
#[ignore = "reproduces a boringtun 0.7.1 bug: an unconfirmed responder session becomes current"]
fn sim_unconfirmed_responder_session_not_used() {
    let seed = seed("sim_unconfirmed_responder_session_not_used");
    let (mut sim, a, b) = two_nodes(seed, Impairments::CLEAN);
    sim.net.impairments.block = Block::ResponsesFrom(b);
    sim.send(a, b, 100);
    sim.advance(8 * REKEY_TIMEOUT);
    assert!(sends(&sim, b, Kind::Response).count() >= 8);
    sim.net.impairments.block = Block::Nothing;
    let before = sim.drop_count(a, DropReason::Protocol);
    let seq = sim.send(b, a, 100);
    sim.advance(SEC);
    assert_eq!(
        sim.drop_count(a, DropReason::Protocol),
        before,
        "A refused B's data: B used a session A never completed"
    );
    assert!(sim.delivered(b, seq), "{}", sim.report());
}
