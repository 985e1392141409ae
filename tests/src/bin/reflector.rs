//! `tabbify-reflector`: tells a client the source address it saw, the way a STUN server
//! does, but in plain text, so the NAT lab can check each router kind without depending
//! on the STUN code under test.
//!
//! Usage: `tabbify-reflector [--udp ADDR:PORT]… [--tcp ADDR:PORT]…`
//! * every UDP datagram received on a `--udp` socket is answered, from that socket, with
//!   `SEEN <source ip:port> AT <local ip:port>` (the request's content is ignored; at most
//!   one reply per datagram, so it cannot amplify);
//! * every TCP connection accepted on a `--tcp` listener gets the same line, newline
//!   terminated, and is closed.
//!
//! It prints `ready` on stdout once every socket is bound, and runs until killed.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs an ADDR:PORT"))?;
        let addr: SocketAddr = value
            .parse()
            .with_context(|| format!("{flag} {value}: not an ADDR:PORT"))?;
        match flag.as_str() {
            "--udp" => udp.push(UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?),
            "--tcp" => {
                tcp.push(TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?)
            }
            _ => bail!("unknown flag {flag}; usage: tabbify-reflector [--udp A:P]… [--tcp A:P]…"),
        }
    }
    if udp.is_empty() && tcp.is_empty() {
        bail!("nothing to serve; usage: tabbify-reflector [--udp A:P]… [--tcp A:P]…");
    }
    let mut threads = Vec::new();
    for socket in udp {
        threads.push(std::thread::spawn(move || serve_udp(&socket)));
    }
    for listener in tcp {
        threads.push(std::thread::spawn(move || serve_tcp(&listener)));
    }
    println!("ready");
    std::io::stdout().flush()?;
    for thread in threads {
        match thread.join() {
            Ok(result) => result?,
            Err(_) => bail!("a reflector thread panicked"),
        }
    }
    Ok(())
}

fn serve_udp(socket: &UdpSocket) -> Result<()> {
    let local = socket.local_addr()?;
    let mut buf = [0u8; 2048];
    loop {
        let (_, source) = socket.recv_from(&mut buf).context("udp recv")?;
        let reply = format!("SEEN {source} AT {local}");
        // A send error (e.g. the client's route went away) is not the reflector's failure.
        if let Err(error) = socket.send_to(reply.as_bytes(), source) {
            eprintln!("reply to {source}: {error}");
        }
    }
}

fn serve_tcp(listener: &TcpListener) -> Result<()> {
    let local = listener.local_addr()?;
    loop {
        let (mut stream, peer) = listener.accept().context("tcp accept")?;
        if let Err(error) = writeln!(stream, "SEEN {peer} AT {local}") {
            eprintln!("reply to {peer}: {error}");
        }
    }
}
