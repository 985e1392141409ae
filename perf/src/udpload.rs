//! The suite's UDP load generator: a sender that offers more than any tunnel here can
//! carry, and a receiver that counts what the tunnel delivered.
//!
//! iperf3 `-u -b 0` sends one datagram per system call from one thread; on a 2-core
//! machine that shares its cores with both tunnel daemons it cannot offer much more than
//! the plain veth's 2 Gbit/s, and every cycle it spends is taken from the daemons. This
//! sender hands the kernel [`SEGMENTS`] datagrams per `sendmmsg` message with UDP GSO
//! (`UDP_SEGMENT`, one super-datagram the kernel or the TUN's offload splits) and
//! [`BATCH`] messages per system call. Where the route's device cannot take GSO (a TUN
//! without checksum offload makes the kernel refuse it with `EIO`), it falls back to
//! `sendmmsg` of single datagrams, [`BATCH`] × [`SEGMENTS`] per call, and says so in its
//! result (`gso: false`).
//!
//! The receiver reads with `UDP_GRO` and `recvmmsg` (a tunnel that writes super-packets
//! to its TUN is read a super-packet at a time) and counts datagrams and payload bytes.
//! Every datagram starts with its sequence number (u64, little endian), so the receiver
//! also counts duplicates and datagrams from outside the run (malformed: too short),
//! which are dropped from the count, never trusted.
//!
//! Invariants: the figure is payload bits received ÷ the sender's sending time (what
//! iperf3's "receiver" figure is too); both ends run as hidden subcommands of this
//! binary inside the namespaces (`udp-sink`, `udp-blast`) and print one JSON line each
//! after [`RESULT_TAG`]; both stop by themselves (the sender after `--seconds`, the
//! receiver [`IDLE_STOP`] after the last datagram or at its deadline).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tabbify_tests::{Netns, Process};

/// UDP payload per datagram: fills a 1420-byte tunnel MTU over IPv4 (1420 − 20 − 8), as
/// the iperf3 test's `-l 1392`.
pub const PAYLOAD: usize = 1392;
/// Datagrams per GSO super-datagram (47 × 1392 = 65,424 bytes, under the 65,507 limit).
pub const SEGMENTS: usize = 47;
/// Messages per `sendmmsg` / `recvmmsg`.
pub const BATCH: usize = 8;
/// The port the receiver listens on inside the server's namespace.
pub const PORT: u16 = 5202;
/// The receiver stops this long after the last datagram once the sender is done.
pub const IDLE_STOP: Duration = Duration::from_secs(1);
/// Marks the JSON result line of either end in its log.
pub const RESULT_TAG: &str = "udpload-result: ";
/// Receive buffer per `recvmmsg` message: one GRO super-packet at most.
const RECV_BUF: usize = 65_536;

/// `udp-blast`: the sender.
#[derive(Debug, clap::Args)]
pub struct BlastArgs {
    /// Where to send (the receiver's tunnel address and port).
    #[arg(long)]
    pub to: SocketAddr,
    /// Seconds to send for.
    #[arg(long)]
    pub seconds: u32,
    /// Do not try UDP GSO (single datagrams in `sendmmsg` batches only).
    #[arg(long)]
    pub no_gso: bool,
    /// Payload Gbit/s to offer at most (0: as fast as the kernel takes them).
    #[arg(long, default_value_t = 0.0)]
    pub offer_gbps: f64,
}

/// `udp-sink`: the receiver.
#[derive(Debug, clap::Args)]
pub struct SinkArgs {
    /// Address and port to listen on.
    #[arg(long)]
    pub bind: SocketAddr,
    /// Stop at the latest this many seconds after start, datagrams or not.
    #[arg(long)]
    pub deadline: u32,
}

/// What the sender reports.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct BlastResult {
    /// Datagrams the kernel accepted.
    pub datagrams: u64,
    /// System calls made.
    pub calls: u64,
    /// Calls refused with `ENOBUFS` / `EAGAIN` (the sender outran the device queue).
    pub refused: u64,
    /// Seconds spent sending.
    pub seconds: f64,
    /// Whether UDP GSO was used.
    pub gso: bool,
}

/// What the receiver reports.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkResult {
    /// Distinct datagrams of this run received.
    pub datagrams: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Datagrams received again (same sequence number).
    pub duplicates: u64,
    /// Datagrams too short to carry a sequence number (not ours): dropped from the count.
    pub malformed: u64,
    /// `recvmmsg` messages that were GRO super-packets (more than one datagram).
    pub coalesced: u64,
}

/// One measurement's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// Payload Gbit/s delivered: received bytes × 8 ÷ the sender's seconds.
    pub delivered_gbps: f64,
    /// Payload Gbit/s the sender offered.
    pub offered_gbps: f64,
    /// Datagrams sent and not received.
    pub lost: u64,
    /// The sender's report.
    pub blast: BlastResult,
    /// The receiver's report.
    pub sink: SinkResult,
}

/// Counts the datagrams of one received message: `len` bytes that are `segment`-sized
/// datagrams back to back (the last may be shorter), as `UDP_GRO` delivers them
/// (`segment` = `len` for a single datagram). Pure; the receiver's only parser.
pub fn count_message(buf: &[u8], segment: usize, seen: &mut Seen, out: &mut SinkResult) {
    let segment = if segment == 0 {
        buf.len().max(1)
    } else {
        segment
    };
    let mut datagrams = 0;
    for datagram in buf.chunks(segment) {
        datagrams += 1;
        let Some(seq) = datagram.get(..8) else {
            out.malformed += 1;
            continue;
        };
        let seq = u64::from_le_bytes(seq.try_into().unwrap_or_default());
        let Some(fresh) = seen.insert(seq) else {
            out.malformed += 1;
            continue;
        };
        if fresh {
            out.datagrams += 1;
            out.bytes += datagram.len() as u64;
        } else {
            out.duplicates += 1;
        }
    }
    if datagrams > 1 {
        out.coalesced += 1;
    }
}

/// The sequence numbers received so far: a bitmap, since the sender numbers from 0.
#[derive(Debug, Default)]
pub struct Seen {
    bits: Vec<u64>,
}

impl Seen {
    /// Highest sequence number accepted (2^28: 32 MiB of bitmap, 6 minutes at 10 Gbit/s).
    pub const MAX: u64 = 1 << 28;

    /// Marks `seq`; `Some(true)` if it is new, `Some(false)` if seen before, `None` if it
    /// is beyond [`Seen::MAX`] (not a datagram of this run).
    pub fn insert(&mut self, seq: u64) -> Option<bool> {
        if seq >= Self::MAX {
            return None;
        }
        let word = (seq / 64) as usize;
        if word >= self.bits.len() {
            self.bits.resize((word + 1).next_power_of_two(), 0);
        }
        let bit = 1u64 << (seq % 64);
        let fresh = self.bits[word] & bit == 0;
        self.bits[word] |= bit;
        Some(fresh)
    }
}

fn udp_socket(addr: &SocketAddr) -> Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the result is checked before it is wrapped.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_INET*, SOCK_DGRAM)");
    }
    // SAFETY: fd is a fresh descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt_int(fd: &OwnedFd, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: value outlives the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *std::ptr::from_mut(&mut storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 =
                unsafe { &mut *std::ptr::from_mut(&mut storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The sender (`udp-blast`), run inside the client's namespace.
pub fn blast(args: &BlastArgs) -> Result<()> {
    let result = send_for(
        args.to,
        Duration::from_secs(u64::from(args.seconds)),
        !args.no_gso,
        args.offer_gbps,
    )?;
    println!("{RESULT_TAG}{}", serde_json::to_string(&result)?);
    Ok(())
}

/// Sends for `duration`; with `offer_gbps` > 0 paced to that payload rate (a batch, then a
/// sleep while ahead of the rate), so a sender that outruns the tunnel does not also burn
/// the CPU the tunnel's daemons need on datagrams the TUN's queue drops anyway.
fn send_for(
    to: SocketAddr,
    duration: Duration,
    try_gso: bool,
    offer_gbps: f64,
) -> Result<BlastResult> {
    let fd = udp_socket(&to)?;
    let (addr, addr_len) = sockaddr(&to);
    // SAFETY: addr/addr_len describe a valid sockaddr for this family.
    if unsafe { libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast(), addr_len) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("connect {to}"));
    }
    // A large send buffer keeps several batches in flight.
    let _ = setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 8 << 20);
    let mut gso =
        try_gso && setsockopt_int(&fd, libc::SOL_UDP, libc::UDP_SEGMENT, PAYLOAD as i32).is_ok();
    let mut result = BlastResult::default();
    let mut buf = vec![0u8; BATCH * SEGMENTS * PAYLOAD];
    let mut seq: u64 = 0;
    let start = Instant::now();
    let bytes_per_sec = offer_gbps * 1e9 / 8.0;
    while start.elapsed() < duration {
        if bytes_per_sec > 0.0 {
            let due =
                Duration::from_secs_f64(result.datagrams as f64 * PAYLOAD as f64 / bytes_per_sec);
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        for datagram in buf.chunks_mut(PAYLOAD) {
            datagram[..8].copy_from_slice(&seq.to_le_bytes());
            seq += 1;
        }
        let per_msg = if gso { SEGMENTS * PAYLOAD } else { PAYLOAD };
        let mut iovs: Vec<libc::iovec> = buf
            .chunks_mut(per_msg)
            .map(|chunk| libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data; all-zero is valid (no name, no control).
                let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
                msg.msg_hdr.msg_iov = std::ptr::from_mut(iov);
                msg.msg_hdr.msg_iovlen = 1;
                msg
            })
            .collect();
        let mut sent_msgs = 0;
        while sent_msgs < msgs.len() {
            // SAFETY: msgs[sent_msgs..] point at iovecs into buf, all alive for the call.
            let n = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    msgs[sent_msgs..].as_mut_ptr(),
                    (msgs.len() - sent_msgs) as u32,
                    0,
                )
            };
            result.calls += 1;
            if n < 0 {
                let error = std::io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::ENOBUFS | libc::EAGAIN) => {
                        result.refused += 1;
                        // The rest of this batch is dropped, as a full queue would.
                        break;
                    }
                    // The route's device cannot take GSO (no checksum offload): fall back
                    // to single datagrams for the rest of the run.
                    Some(libc::EIO | libc::EINVAL) if gso && result.datagrams == 0 => {
                        gso = false;
                        let _ = setsockopt_int(&fd, libc::SOL_UDP, libc::UDP_SEGMENT, 0);
                        break;
                    }
                    _ => return Err(error).context("sendmmsg"),
                }
            }
            let n = n as usize;
            result.datagrams += msgs[sent_msgs..sent_msgs + n]
                .iter()
                .map(|m| (m.msg_len as usize).div_ceil(PAYLOAD) as u64)
                .sum::<u64>();
            sent_msgs += n;
        }
    }
    result.seconds = start.elapsed().as_secs_f64();
    result.gso = gso;
    Ok(result)
}

/// The receiver (`udp-sink`), run inside the server's namespace.
pub fn sink(args: &SinkArgs) -> Result<()> {
    let fd = udp_socket(&args.bind)?;
    let (addr, addr_len) = sockaddr(&args.bind);
    // SAFETY: addr/addr_len describe a valid sockaddr for this family.
    if unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast(), addr_len) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("bind {}", args.bind));
    }
    let _ = setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20);
    // Without UDP_GRO every datagram is its own message: slower, still counted.
    let _ = setsockopt_int(&fd, libc::SOL_UDP, libc::UDP_GRO, 1);
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: timeout outlives the call and its size is passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    println!("udp-sink listening on {}", args.bind);
    let result = receive(&fd, Duration::from_secs(u64::from(args.deadline)))?;
    println!("{RESULT_TAG}{}", serde_json::to_string(&result)?);
    Ok(())
}

fn receive(fd: &OwnedFd, deadline: Duration) -> Result<SinkResult> {
    const CONTROL: usize = 64;
    let mut result = SinkResult::default();
    let mut seen = Seen::default();
    let mut bufs = vec![0u8; BATCH * RECV_BUF];
    let mut controls = vec![0u8; BATCH * CONTROL];
    let start = Instant::now();
    let mut last = None::<Instant>;
    loop {
        if start.elapsed() > deadline || last.is_some_and(|t: Instant| t.elapsed() > IDLE_STOP) {
            return Ok(result);
        }
        let mut iovs: Vec<libc::iovec> = bufs
            .chunks_mut(RECV_BUF)
            .map(|chunk| libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(controls.chunks_mut(CONTROL))
            .map(|(iov, control)| {
                // SAFETY: mmsghdr is plain data; all-zero is valid.
                let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
                msg.msg_hdr.msg_iov = std::ptr::from_mut(iov);
                msg.msg_hdr.msg_iovlen = 1;
                msg.msg_hdr.msg_control = control.as_mut_ptr().cast();
                msg.msg_hdr.msg_controllen = CONTROL as _;
                msg
            })
            .collect();
        // SAFETY: msgs point at iovecs and control areas into bufs/controls, alive for
        // the call; the timeout is SO_RCVTIMEO.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                _ => return Err(error).context("recvmmsg"),
            }
        }
        last = Some(Instant::now());
        for (i, msg) in msgs.iter().take(n as usize).enumerate() {
            let len = msg.msg_len as usize;
            let segment = gro_segment(&msg.msg_hdr).unwrap_or(len);
            count_message(
                &bufs[i * RECV_BUF..i * RECV_BUF + len],
                segment,
                &mut seen,
                &mut result,
            );
        }
    }
}

/// The `UDP_GRO` control message's segment size, if the kernel coalesced.
fn gro_segment(hdr: &libc::msghdr) -> Option<usize> {
    // SAFETY: the CMSG_* walk stays within msg_control/msg_controllen as recvmmsg set them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                return usize::try_from(data.read_unaligned()).ok();
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    None
}

/// Runs the receiver in `server` and the sender in `client` for `seconds`; the delivered
/// rate is the payload the receiver counted over the sender's sending time.
pub fn measure(
    client: &Netns,
    server: &Netns,
    server_addr: IpAddr,
    seconds: u32,
    offer_gbps: f64,
) -> Result<Outcome> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let exe = exe.to_str().context("non-UTF-8 executable path")?;
    let bind = SocketAddr::new(server_addr, PORT).to_string();
    let deadline = (seconds + 15).to_string();
    let mut sink = server.spawn(
        "udp-sink",
        exe,
        &["udp-sink", "--bind", &bind, "--deadline", &deadline],
    )?;
    sink.wait_for_log("udp-sink listening", Duration::from_secs(10))?;
    let secs = seconds.to_string();
    let offer = offer_gbps.to_string();
    let mut blaster = client.spawn(
        "udp-blast",
        exe,
        &[
            "udp-blast",
            "--to",
            &bind,
            "--seconds",
            &secs,
            "--offer-gbps",
            &offer,
        ],
    )?;
    let status = blaster.wait_exit(Duration::from_secs(u64::from(seconds) + 20))?;
    if !status.success() {
        bail!("udp-blast failed ({status}):\n{}", blaster.logs());
    }
    let blast: BlastResult = result_line(&blaster)?;
    let status = sink.wait_exit(Duration::from_secs(u64::from(seconds) + 20))?;
    if !status.success() {
        bail!("udp-sink failed ({status}):\n{}", sink.logs());
    }
    let sink: SinkResult = result_line(&sink)?;
    Ok(outcome(blast, sink))
}

fn outcome(blast: BlastResult, sink: SinkResult) -> Outcome {
    let seconds = blast.seconds.max(1e-9);
    Outcome {
        delivered_gbps: sink.bytes as f64 * 8.0 / seconds / 1e9,
        offered_gbps: blast.datagrams as f64 * PAYLOAD as f64 * 8.0 / seconds / 1e9,
        lost: blast.datagrams.saturating_sub(sink.datagrams),
        blast,
        sink,
    }
}

fn result_line<T: serde::de::DeserializeOwned>(process: &Process) -> Result<T> {
    let log = process.logs();
    let line = log
        .lines()
        .find_map(|l| l.split_once(RESULT_TAG).map(|(_, json)| json))
        .with_context(|| format!("{} printed no result:\n{log}", process.label()))?;
    serde_json::from_str(line).with_context(|| format!("parsing {}'s result", process.label()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(seq: u64, len: usize) -> Vec<u8> {
        let mut d = vec![0xa5; len];
        d[..8].copy_from_slice(&seq.to_le_bytes());
        d
    }

    #[test]
    fn counts_coalesced_duplicate_and_foreign_datagrams() {
        let mut seen = Seen::default();
        let mut out = SinkResult::default();
        // A GRO super-packet: three full datagrams and a short last one.
        let mut gro = Vec::new();
        for seq in 0..3 {
            gro.extend(datagram(seq, PAYLOAD));
        }
        gro.extend(datagram(3, 100));
        count_message(&gro, PAYLOAD, &mut seen, &mut out);
        assert_eq!(
            (out.datagrams, out.bytes, out.coalesced),
            (4, 3 * PAYLOAD as u64 + 100, 1)
        );
        // The same datagram again (a replay the tunnel should have dropped) is not counted.
        count_message(&datagram(2, PAYLOAD), PAYLOAD, &mut seen, &mut out);
        assert_eq!((out.datagrams, out.duplicates), (4, 1));
        // An attacker's short datagram to the port carries no sequence number.
        count_message(&[1, 2, 3], 0, &mut seen, &mut out);
        assert_eq!((out.datagrams, out.malformed), (4, 1));
        // A sequence number no sender of this run reaches is not counted either.
        count_message(&datagram(u64::MAX, PAYLOAD), PAYLOAD, &mut seen, &mut out);
        assert_eq!((out.datagrams, out.malformed), (4, 2));
        // An empty datagram and a segment size of 0 never panic.
        count_message(&[], 0, &mut seen, &mut out);
        count_message(&[], PAYLOAD, &mut seen, &mut out);
        assert_eq!(out.datagrams, 4);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_count_more_than_they_hold() {
        let mut seen = Seen::default();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 3000) as usize;
            let segment = ((state >> 16) % 1500) as usize;
            let buf: Vec<u8> = (0..len).map(|i| (state >> (i % 56)) as u8).collect();
            let mut out = SinkResult::default();
            count_message(&buf, segment, &mut seen, &mut out);
            assert!(out.bytes <= len as u64);
        }
    }

    #[test]
    fn delivered_is_received_payload_over_sending_time() {
        let blast = BlastResult {
            datagrams: 1_000_000,
            seconds: 2.0,
            ..BlastResult::default()
        };
        let sink = SinkResult {
            datagrams: 500_000,
            bytes: 500_000 * PAYLOAD as u64,
            ..SinkResult::default()
        };
        let o = outcome(blast, sink);
        assert!((o.delivered_gbps - 500_000.0 * 1392.0 * 8.0 / 2.0 / 1e9).abs() < 1e-9);
        assert!((o.offered_gbps - 2.0 * o.delivered_gbps).abs() < 1e-9);
        assert_eq!(o.lost, 500_000);
    }
}
