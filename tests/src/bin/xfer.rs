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
        _ => bail!("usage: tabbify-xfer recv PORT | tabbify-xfer send ADDR:PORT BYTES SEED"),
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
