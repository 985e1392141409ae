//! `tabbify-xfer`: a TCP sender and receiver that both print the SHA-256 of the bytes they
//! moved, so a test can prove a transfer through a tunnel arrived intact.
//!
//! ```text
//! tabbify-xfer recv PORT                 # listen on [::]:PORT (IPv4 too), accept one
//!                                        # connection, read to EOF, print
//!                                        # "RECEIVED <bytes> <sha256>", close
//! tabbify-xfer send ADDR:PORT BYTES SEED # send BYTES pseudo-random bytes derived from
//!                                        # SEED, half-close, wait for the receiver to
//!                                        # close, print "SENT <bytes> <sha256>"
//! ```
//! `recv` prints "LISTENING <port>" once it accepts connections.
//!
//! UDP, to prove datagrams keep their boundaries and bytes through a tunnel:
//! ```text
//! tabbify-xfer udp-recv PORT COUNT       # bind [::]:PORT with an 8 MiB receive buffer,
//!                                        # receive until COUNT datagrams or 3 s of
//!                                        # silence; print "UDP-RECEIVED <good> <bad> <dup>"
//! tabbify-xfer udp-send ADDR:PORT COUNT  # send COUNT numbered datagrams in bursts of 64
//!                                        # (2 ms apart), sizes mostly 1372 bytes with
//!                                        # every 7th shorter; print "UDP-SENT <count>"
//! ```
//! Every datagram's size and content follow from its number, so the receiver checks each
//! one alone.

use std::io::{Read, Write};
use std::net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

const CHUNK: usize = 256 * 1024;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["recv", port] => receive(port.parse().with_context(|| format!("bad port {port:?}"))?),
        ["send", addr, bytes, seed] => send(
            addr.parse()
                .with_context(|| format!("bad address {addr:?}"))?,
            bytes
                .parse()
                .with_context(|| format!("bad byte count {bytes:?}"))?,
            seed.parse().with_context(|| format!("bad seed {seed:?}"))?,
        ),
        ["udp-recv", port, count] => udp_receive(
            port.parse().with_context(|| format!("bad port {port:?}"))?,
            count.parse().with_context(|| format!("bad count {count:?}"))?,
        ),
        ["udp-send", addr, count] => udp_send(
            addr.parse()
                .with_context(|| format!("bad address {addr:?}"))?,
            count.parse().with_context(|| format!("bad count {count:?}"))?,
        ),
        _ => bail!(
            "usage: tabbify-xfer recv PORT | send ADDR:PORT BYTES SEED | udp-recv PORT COUNT | udp-send ADDR:PORT COUNT"
        ),
    }
}

fn receive(port: u16) -> Result<()> {
    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding [::]:{port}"))?;
    println!("LISTENING {port}");
    std::io::stdout().flush()?;
    let (mut stream, peer) = listener.accept().context("accepting")?;
    eprintln!("connection from {peer}");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total: u64 = 0;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error).context(format!("reading after {total} bytes")),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    println!("RECEIVED {total} {}", hex::encode(hasher.finalize()));
    std::io::stdout().flush()?;
    Ok(())
}

fn send(addr: SocketAddr, bytes: u64, seed: u64) -> Result<()> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let mut hasher = Sha256::new();
    let mut state = seed | 1;
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            // xorshift64*: cheap, deterministic, and never repeats within a transfer.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        stream
            .write_all(&buf[..n])
            .with_context(|| format!("writing after {} bytes", bytes - left))?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write).context("half-closing")?;
    // The receiver closes only after reading everything: EOF here means it has all bytes.
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .context("waiting for the receiver to close")?;
    println!("SENT {bytes} {}", hex::encode(hasher.finalize()));
    std::io::stdout().flush()?;
    Ok(())
}

/// Size of datagram `seq`: 1372 bytes (fills a 1420 MTU over IPv6), every 7th shorter.
fn udp_size(seq: u32) -> usize {
    if seq % 7 == 6 {
        8 + (seq as usize * 37) % 1000
    } else {
        1372
    }
}

/// Datagram `seq`: its number, then bytes derived from it.
fn udp_datagram(seq: u32, buf: &mut [u8]) -> usize {
    let n = udp_size(seq);
    buf[..4].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in buf[4..n].iter_mut().enumerate() {
        *b = (seq as usize).wrapping_mul(131).wrapping_add(i) as u8;
    }
    n
}

fn udp_receive(port: u16, count: u32) -> Result<()> {
    let sock = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding [::]:{port}"))?;
    let size: libc::c_int = 8 << 20;
    // SAFETY: `size` outlives the call and its length is passed with it; the fd is open.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
    println!("LISTENING {port}");
    std::io::stdout().flush()?;
    let mut seen = vec![false; count as usize];
    let (mut good, mut bad, mut dup) = (0u32, 0u32, 0u32);
    let mut buf = vec![0u8; 65536];
    let mut want = vec![0u8; 65536];
    // The first datagram may take a while (handshake); silence counts only after it.
    let mut started = false;
    while good < count {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if started {
                    break;
                }
                continue;
            }
            Err(e) => return Err(e).context("receiving"),
        };
        started = true;
        let seq = buf
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        match seq {
            Some(seq)
                if seq < count && udp_datagram(seq, &mut want) == n && buf[..n] == want[..n] =>
            {
                if std::mem::replace(&mut seen[seq as usize], true) {
                    dup += 1;
                } else {
                    good += 1;
                }
            }
            _ => bad += 1,
        }
    }
    println!("UDP-RECEIVED {good} {bad} {dup}");
    Ok(())
}

fn udp_send(addr: SocketAddr, count: u32) -> Result<()> {
    let bind: SocketAddr = if addr.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(bind)?;
    sock.connect(addr)
        .with_context(|| format!("connecting to {addr}"))?;
    let mut buf = vec![0u8; 2048];
    for seq in 0..count {
        let n = udp_datagram(seq, &mut buf);
        loop {
            match sock.send(&buf[..n]) {
                Ok(_) => break,
                // A full TUN queue or a not-yet-resolved route: try again shortly.
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOBUFS)
                        || e.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => return Err(e).context(format!("sending datagram {seq}")),
            }
        }
        if seq % 64 == 63 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    println!("UDP-SENT {count}");
    Ok(())
}
