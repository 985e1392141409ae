//! Load generator for measuring the relay (relay/README.md, relay/measure.sh): one process
//! receives, one sends, each a real relay session over mTLS with a proven WireGuard key and
//! a UDP socket bound by BIND; the sender pushes relay frames with UDP GSO, the receiver
//! counts them with UDP GRO.
//!
//! relay_load recv --relay ADDR --certs DIR --name NAME --seconds N
//!     prints `key HEX` once bound, then `bytes B seconds S gbps G` at the end
//! relay_load send --relay ADDR --certs DIR --name NAME --peer HEX --seconds N [--size 1400]
//!
//! `--stream` (on both): frames go over the TLS stream instead of UDP (the receiver's session
//! is stream-only).
//!
//! DIR holds `ca.pem` and NAME/cert.pem, NAME/key.pem (as `tabbify-mesh-ca issue-peer` writes).

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use boringtun::x25519::{PublicKey, StaticSecret};
use rand_core::OsRng;
use tabbify_engine::sys::udp as sys;
use tabbify_relay::client::{self, RelayClient};
use tabbify_relay::proto;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn need(args: &[String], name: &str) -> Result<String> {
    arg(args, name).with_context(|| format!("missing {name}"))
}

fn poll(fd: i32, events: libc::c_short, ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) };
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let relay: SocketAddr = need(&args, "--relay")?.parse()?;
    let dir = std::path::PathBuf::from(need(&args, "--certs")?);
    let name = need(&args, "--name")?;
    let seconds: u64 = need(&args, "--seconds")?.parse()?;
    let stream = args.iter().any(|a| a == "--stream");
    let ca = std::fs::read_to_string(dir.join("ca.pem"))?;
    let cert = std::fs::read_to_string(dir.join(&name).join("cert.pem"))?;
    let key = std::fs::read_to_string(dir.join(&name).join("key.pem"))?;
    let cfg = client::Config {
        server: relay.to_string(),
        server_name: relay.ip().to_string(),
        tls: tabbify_api::tls::client_config(&ca, Some((&cert, &key)))?,
        proxy: None,
        stream_only: stream,
        fwmark: None,
    };
    let secret = StaticSecret::random_from_rng(OsRng);
    let public = PublicKey::from(&secret).to_bytes();
    let mut c = RelayClient::connect(&cfg, &secret.to_bytes()).await?;
    let (fds, _, feat) = sys::open_reuseport(0, 1, true, None)?;
    let fd = fds[0].as_raw_fd();
    let mut buf = vec![0u8; 65_536];
    // BIND until BIND_ACK.
    let bind = c.bind_datagram();
    let mut bound = false;
    for _ in 0..50 {
        let _ = sys::send(fd, &bind, relay, None, feat.ipv6);
        poll(fd, libc::POLLIN, 100);
        if let Ok((n, _, _)) = sys::recv(fd, &mut buf) {
            if proto::Control::parse(&buf[..n]).is_ok() {
                bound = true;
                break;
            }
        }
    }
    if !bound {
        bail!("no BIND_ACK from the relay");
    }
    match mode.as_str() {
        "recv" if stream => {
            println!("key {}", hex::encode(public));
            std::io::stdout().flush()?;
            let mut bytes = 0u64;
            let mut first: Option<Instant> = None;
            let mut last = Instant::now();
            let wait = Duration::from_secs(seconds + 30);
            while let Ok(Some(ev)) = tokio::time::timeout(
                if first.is_some() {
                    Duration::from_secs(2)
                } else {
                    wait
                },
                c.recv(),
            )
            .await
            {
                if let client::Event::Frame(f) = ev {
                    bytes += f.len() as u64;
                    last = Instant::now();
                    first.get_or_insert(last);
                }
            }
            let secs = first.map(|f| (last - f).as_secs_f64()).unwrap_or(0.0);
            let gbps = if secs > 0.0 {
                bytes as f64 * 8.0 / secs / 1e9
            } else {
                0.0
            };
            println!("bytes {bytes} seconds {secs:.3} gbps {gbps:.3}");
        }
        "send" if stream => {
            let size: usize = arg(&args, "--size")
                .map(|s| s.parse())
                .transpose()?
                .unwrap_or(1400);
            let peer: [u8; 32] = hex::decode(need(&args, "--peer")?)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("--peer: 32 bytes hex"))?;
            let dst = c.lookup(&peer).await?.context("peer has no session")?;
            let mut frame = vec![4u8, 0, 0, 0];
            frame.resize(size, 0xAB);
            proto::wg_to_frame(&mut frame, dst)?;
            let end = Instant::now() + Duration::from_secs(seconds);
            let mut sent = 0u64;
            while Instant::now() < end {
                for _ in 0..64 {
                    c.send_frame(&frame).await?;
                }
                sent += 64 * size as u64;
            }
            println!("sent {sent}");
        }
        "recv" => {
            println!("key {}", hex::encode(public));
            std::io::stdout().flush()?;
            let mut bytes = 0u64;
            let mut first: Option<Instant> = None;
            let mut last = Instant::now();
            let end_idle = Duration::from_secs(2);
            let start = Instant::now();
            loop {
                poll(fd, libc::POLLIN, 200);
                loop {
                    match sys::recv(fd, &mut buf) {
                        Ok((n, _, _)) if n > 0 && buf[0] >= 0xE1 && buf[0] <= 0xE4 => {
                            bytes += n as u64;
                            last = Instant::now();
                            first.get_or_insert(last);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                let now = Instant::now();
                let done = match first {
                    Some(_) => now - last > end_idle,
                    None => now - start > Duration::from_secs(seconds + 30),
                };
                if done {
                    break;
                }
            }
            let secs = first.map(|f| (last - f).as_secs_f64()).unwrap_or(0.0);
            let gbps = if secs > 0.0 {
                bytes as f64 * 8.0 / secs / 1e9
            } else {
                0.0
            };
            println!("bytes {bytes} seconds {secs:.3} gbps {gbps:.3}");
        }
        "send" => {
            let size: usize = arg(&args, "--size")
                .map(|s| s.parse())
                .transpose()?
                .unwrap_or(1400);
            let peer: [u8; 32] = hex::decode(need(&args, "--peer")?)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("--peer: 32 bytes hex"))?;
            let dst = c.lookup(&peer).await?.context("peer has no session")?;
            let segs = if feat.gso {
                64usize.min(65_000 / size)
            } else {
                1
            };
            let mut frame = vec![4u8, 0, 0, 0];
            frame.resize(size, 0xAB);
            proto::wg_to_frame(&mut frame, dst)?;
            let batch: Vec<u8> = frame.repeat(segs);
            let seg = (segs > 1).then_some(size as u16);
            let end = Instant::now() + Duration::from_secs(seconds);
            let mut sent = 0u64;
            let mut keep = Instant::now();
            while Instant::now() < end {
                match sys::send(fd, &batch, relay, seg, feat.ipv6) {
                    Ok(_) => sent += batch.len() as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        poll(fd, libc::POLLOUT, 10)
                    }
                    Err(e) => bail!("send: {e}"),
                }
                if keep.elapsed() > Duration::from_secs(5) {
                    let _ = sys::send(fd, &bind, relay, None, feat.ipv6);
                    keep = Instant::now();
                }
            }
            println!("sent {sent}");
        }
        _ => bail!("usage: relay_load recv|send ..."),
    }
    Ok(())
}
