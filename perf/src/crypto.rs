//! The crypto bound: how many Gbit/s one core moves through WireGuard's cipher alone.
//!
//! Two boringtun `Tunn`s complete a handshake in memory, then one thread seals 1420-byte
//! IPv4 packets on one (`Tunn::encapsulate`: ChaCha20-Poly1305 seal plus the 32-byte
//! header) and opens each on the other (`Tunn::decapsulate`: replay check and open). The
//! bytes of inner packets moved per second of that one thread is the bound: a tunnel's two
//! daemons must seal every byte once and open it once, so no implementation can move more
//! than this per core of their combined CPU (everything else they do, system calls, copies,
//! checksums, only lowers it). The rate is per second of the thread's own CPU time, so
//! neighbours on a shared machine stay out of it. No sockets; `duration` bounds the loop.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// Inner packet size: a full packet at the suite's tunnel MTU.
pub const PACKET: usize = 1420;

/// A fresh static key pair.
pub fn keypair() -> (StaticSecret, PublicKey) {
    let secret = StaticSecret::from(rand::random::<[u8; 32]>());
    let public = PublicKey::from(&secret);
    (secret, public)
}

/// Two `Tunn`s with an established session (initiator, responder).
pub fn established_pair() -> Result<(Tunn, Tunn)> {
    static INDEX: AtomicU32 = AtomicU32::new(1);
    let (a_secret, a_public) = keypair();
    let (b_secret, b_public) = keypair();
    let index = INDEX.fetch_add(2, Ordering::Relaxed);
    let mut a = Tunn::new(a_secret, b_public, None, None, index, None);
    let mut b = Tunn::new(b_secret, a_public, None, None, index + 1, None);
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let init = match a.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(init) => init.to_vec(),
        other => bail!("handshake initiation: {other:?}"),
    };
    let response = match b.decapsulate(None, &init, &mut out) {
        TunnResult::WriteToNetwork(response) => response.to_vec(),
        other => bail!("handshake response: {other:?}"),
    };
    let keepalive = match a.decapsulate(None, &response, &mut buf) {
        TunnResult::WriteToNetwork(keepalive) => keepalive.to_vec(),
        other => bail!("initiator taking the response: {other:?}"),
    };
    match b.decapsulate(None, &keepalive, &mut out) {
        TunnResult::Done => Ok((a, b)),
        other => bail!("responder taking the first data message: {other:?}"),
    }
}

/// A `len`-byte IPv4/UDP packet with a valid header (boringtun reads the IP header of
/// what it decrypts).
pub fn ipv4_packet(len: usize) -> Vec<u8> {
    let mut packet = vec![0u8; len];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    packet[8] = 64;
    packet[9] = 17;
    packet[12..16].copy_from_slice(&[10, 0, 0, 1]);
    packet[16..20].copy_from_slice(&[10, 0, 0, 2]);
    packet
}

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_time() -> Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        bail!(
            "clock_gettime(CLOCK_THREAD_CPUTIME_ID): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    ))
}

/// Seals and opens [`PACKET`]-byte packets on the calling thread for about `duration` of
/// wall time; returns the inner Gbit/s per second of the thread's own CPU time. Dividing by
/// CPU time rather than wall time keeps neighbours on a shared machine out of the figure
/// (the time they take the core from this thread is not counted), so it reads as "per
/// core" the way the suite's per-daemon-core figures do.
pub fn bound(duration: Duration) -> Result<f64> {
    let (mut a, mut b) = established_pair()?;
    let packet = ipv4_packet(PACKET);
    let mut sealed = vec![0u8; PACKET + 64];
    let mut opened = vec![0u8; PACKET + 64];
    let start = Instant::now();
    let cpu_start = thread_cpu_time()?;
    let mut packets: u64 = 0;
    loop {
        for _ in 0..64 {
            let datagram = match a.encapsulate(&packet, &mut sealed) {
                TunnResult::WriteToNetwork(datagram) => datagram,
                other => bail!("encapsulate: {other:?}"),
            };
            match b.decapsulate(None, datagram, &mut opened) {
                TunnResult::WriteToTunnelV4(inner, _) if inner.len() == PACKET => {}
                other => bail!("decapsulate: {other:?}"),
            }
            packets += 1;
        }
        if start.elapsed() >= duration {
            let cpu = (thread_cpu_time()? - cpu_start).as_secs_f64();
            if cpu <= 0.0 {
                bail!("no CPU time charged to the measuring thread");
            }
            return Ok(packets as f64 * PACKET as f64 * 8.0 / cpu / 1e9);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_positive_rate_through_a_real_session() {
        let gbps = bound(Duration::from_millis(10)).unwrap();
        assert!(gbps > 0.0, "{gbps}");
    }

    #[test]
    fn a_tampered_datagram_does_not_count() {
        // The bound only counts packets the responder authenticated: a flipped bit in the
        // ciphertext must fail to open (an attacker on the path gains nothing).
        let (mut a, mut b) = established_pair().unwrap();
        let packet = ipv4_packet(PACKET);
        let mut sealed = vec![0u8; PACKET + 64];
        let mut opened = vec![0u8; PACKET + 64];
        let TunnResult::WriteToNetwork(datagram) = a.encapsulate(&packet, &mut sealed) else {
            panic!("no datagram");
        };
        let mut datagram = datagram.to_vec();
        datagram[40] ^= 1;
        assert!(matches!(
            b.decapsulate(None, &datagram, &mut opened),
            TunnResult::Err(_)
        ));
    }
}
