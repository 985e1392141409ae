//! The UAPI socket server: `/var/run/wireguard/<iface>.sock`, one accept thread, one short
//! thread per connection, requests handed to a [`UapiHandler`].
//!
//! Socket life cycle: the directory is created with mode 0755 (as wireguard-go does); the
//! socket is bound inside a private 0700 directory, made 0600 and renamed into place, so
//! no one but root can connect even for a moment. An existing socket file is replaced only
//! if nothing answers on it (a stale file from a crashed process); if a live process
//! listens there, starting fails with `AddrInUse`. On drop the accept thread stops and the
//! socket file is removed if it is still ours (same inode).
//!
//! Hostile clients: lines are capped at [`MAX_LINE`] bytes and a `set` at [`MAX_SET_LINES`]
//! lines; malformed input gets an `errno=` answer or closes the connection, never a panic;
//! at most [`MAX_CONNECTIONS`] connections are served at once and an idle connection is
//! closed after [`IDLE_TIMEOUT`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::UnixListener;
use mio::{Events, Interest, Poll, Token, Waker};

use super::{format_get, SetParser, UapiErrno, UapiHandler};

/// Where stock tools look for userspace WireGuard sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Longest accepted request line, in bytes (the longest valid line is under 100).
pub const MAX_LINE: usize = 4096;
/// Most lines in one `set` request (a peer per 3 lines plus one per allowed IP).
pub const MAX_SET_LINES: usize = 1 << 20;
/// Most connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);

/// A running UAPI server; dropping it stops the server and removes the socket.
#[derive(Debug)]
pub struct UapiServer {
    path: PathBuf,
    inode: (u64, u64),
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl UapiServer {
    /// Serves `handler` on `/var/run/wireguard/<iface>.sock`.
    ///
    /// `iface` must be a valid interface name (1-15 bytes, no `/`, whitespace, `.`/`..`).
    pub fn bind<H: UapiHandler>(iface: &str, handler: Arc<H>) -> io::Result<Self> {
        validate_iface(iface)?;
        let dir = Path::new(SOCKET_DIR);
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        Self::bind_at(&dir.join(format!("{iface}.sock")), handler)
    }

    /// Serves `handler` on the socket at `path` (its directory must exist).
    pub fn bind_at<H: UapiHandler>(path: &Path, handler: Arc<H>) -> io::Result<Self> {
        let listener = bind_private(path)?;
        let meta = std::fs::symlink_metadata(path)?;
        let inode = (meta.dev(), meta.ino());
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let thread = std::thread::Builder::new()
            .name(format!("uapi-{name}"))
            .spawn(move || accept_loop(poll, listener, handler))?;
        tracing::info!(path = %path.display(), "UAPI listening");
        Ok(Self {
            path: path.to_owned(),
            inode,
            waker,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        if self.waker.wake().is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn validate_iface(iface: &str) -> io::Result<()> {
    let ok = !iface.is_empty()
        && iface.len() <= 15
        && iface != "."
        && iface != ".."
        && iface
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':' && b != b'%');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{iface}` is not a valid interface name (1-15 printable bytes, no `/`)"),
        ))
    }
}

/// Binds a listener at `path` with mode 0600, replacing only a stale socket.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is served by a running process", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing stale UAPI socket");
                std::fs::remove_file(path)?;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{} exists and is not a usable socket: {e}", path.display()),
                ))
            }
        }
    }
    let parent = path.parent().unwrap_or(Path::new("."));
    let file = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "socket path has no file name")
    })?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let private = parent.join(format!(
        ".{}-{}-{nonce}",
        file.to_string_lossy(),
        std::process::id()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let tmp = private.join(file);
    let result = UnixListener::bind(&tmp).and_then(|listener| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    result
}

fn accept_loop<H: UapiHandler>(mut poll: Poll, mut listener: UnixListener, handler: Arc<H>) {
    if let Err(e) = poll
        .registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
    {
        tracing::error!(error = %e, "UAPI: cannot poll the listener");
        return;
    }
    let active = Arc::new(AtomicUsize::new(0));
    let mut events = Events::with_capacity(8);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "UAPI: poll failed");
            return;
        }
        for ev in events.iter() {
            if ev.token() == WAKER {
                return;
            }
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    let stream = UnixStream::from(stream);
                    if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                        active.fetch_sub(1, Ordering::AcqRel);
                        tracing::warn!("UAPI: too many connections, closing one");
                        continue;
                    }
                    let handler = Arc::clone(&handler);
                    let active2 = Arc::clone(&active);
                    let spawned =
                        std::thread::Builder::new()
                            .name("uapi-conn".into())
                            .spawn(move || {
                                if let Err(e) = serve(stream, &*handler) {
                                    tracing::debug!(error = %e, "UAPI connection ended");
                                }
                                active2.fetch_sub(1, Ordering::AcqRel);
                            });
                    if let Err(e) = spawned {
                        active.fetch_sub(1, Ordering::AcqRel);
                        tracing::warn!(error = %e, "UAPI: cannot spawn a connection thread");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "UAPI: accept failed");
                    break;
                }
            }
        }
    }
}

/// Serves requests on one connection until the client closes it or misbehaves.
pub(crate) fn serve(stream: UnixStream, handler: &dyn UapiHandlerDyn) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(128);
    loop {
        match read_line(&mut reader, &mut line)? {
            Line::Eof => return Ok(()),
            Line::TooLong => {
                writer.write_all(UapiErrno::Invalid.response().as_bytes())?;
                return Ok(());
            }
            Line::Ok => {}
        }
        match line.as_slice() {
            b"get=1" => {
                match read_line(&mut reader, &mut line)? {
                    Line::Ok if line.is_empty() => {}
                    Line::Eof => return Ok(()),
                    _ => {
                        writer.write_all(UapiErrno::Invalid.response().as_bytes())?;
                        return Ok(());
                    }
                }
                writer.write_all(format_get(&handler.get_dyn()).as_bytes())?;
            }
            b"set=1" => {
                let mut parser = SetParser::new();
                let mut failed = None;
                let mut count = 0usize;
                loop {
                    match read_line(&mut reader, &mut line)? {
                        Line::Eof => return Ok(()),
                        Line::TooLong => {
                            writer.write_all(UapiErrno::Invalid.response().as_bytes())?;
                            return Ok(());
                        }
                        Line::Ok if line.is_empty() => break,
                        Line::Ok => {}
                    }
                    count += 1;
                    if failed.is_some() {
                        continue;
                    }
                    if count > MAX_SET_LINES {
                        failed = Some(UapiErrno::Invalid);
                        tracing::warn!("UAPI set: more than {MAX_SET_LINES} lines");
                        continue;
                    }
                    let text = match std::str::from_utf8(&line) {
                        Ok(t) => t,
                        Err(_) => {
                            failed = Some(UapiErrno::Invalid);
                            continue;
                        }
                    };
                    if let Err(e) = parser.line(text) {
                        tracing::warn!(error = %e, "UAPI set rejected");
                        failed = Some(e.errno);
                    }
                }
                let result = match failed {
                    Some(errno) => Err(errno),
                    None => handler.set_dyn(parser.finish()),
                };
                match result {
                    Ok(()) => writer.write_all(b"errno=0\n\n")?,
                    Err(errno) => writer.write_all(errno.response().as_bytes())?,
                }
            }
            other => {
                // wireguard-go closes the connection on an unknown operation.
                tracing::debug!(op = %String::from_utf8_lossy(other), "UAPI: unknown operation");
                return Ok(());
            }
        }
        writer.flush()?;
    }
}

/// Object-safe view of [`UapiHandler`] so `serve` is compiled once.
pub(crate) trait UapiHandlerDyn {
    fn get_dyn(&self) -> super::DeviceStatus;
    fn set_dyn(&self, update: super::DeviceUpdate) -> Result<(), UapiErrno>;
}

impl<H: UapiHandler> UapiHandlerDyn for H {
    fn get_dyn(&self) -> super::DeviceStatus {
        self.get()
    }
    fn set_dyn(&self, update: super::DeviceUpdate) -> Result<(), UapiErrno> {
        self.set(update)
    }
}

enum Line {
    Ok,
    Eof,
    TooLong,
}

/// Reads one `\n`-terminated line into `out` (without the `\n`), at most [`MAX_LINE`]
/// bytes. A partial last line before EOF counts as EOF.
fn read_line(r: &mut impl BufRead, out: &mut Vec<u8>) -> io::Result<Line> {
    out.clear();
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(Line::Eof);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(pos) => (pos, true),
            None => (buf.len(), false),
        };
        if out.len() + take > MAX_LINE {
            return Ok(Line::TooLong);
        }
        out.extend_from_slice(&buf[..take]);
        r.consume(take + usize::from(done));
        if done {
            return Ok(Line::Ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uapi::{DeviceStatus, DeviceUpdate};
    use std::io::Read;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        sets: Mutex<Vec<DeviceUpdate>>,
    }

    impl UapiHandler for Recorder {
        fn get(&self) -> DeviceStatus {
            DeviceStatus {
                listen_port: 4242,
                ..Default::default()
            }
        }
        fn set(&self, update: DeviceUpdate) -> Result<(), UapiErrno> {
            let port = update.listen_port;
            self.sets.lock().unwrap().push(update);
            if port == Some(1) {
                Err(UapiErrno::PortInUse)
            } else {
                Ok(())
            }
        }
    }

    fn exchange(server_path: &Path, request: &[u8]) -> String {
        let mut s = UnixStream::connect(server_path).unwrap();
        s.write_all(request).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_several_requests_per_connection_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t0.sock");
        let h = Arc::new(Recorder::default());
        let server = UapiServer::bind_at(&path, Arc::clone(&h)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let out = exchange(
            &path,
            b"get=1\n\nset=1\nlisten_port=7\n\nset=1\nlisten_port=1\n\nget=1\n\n",
        );
        assert_eq!(
            out,
            "listen_port=4242\nerrno=0\n\nerrno=0\n\nerrno=-98\n\nlisten_port=4242\nerrno=0\n\n"
        );
        assert_eq!(h.sets.lock().unwrap().len(), 2);

        // A bad line: EINVAL, the handler is not called, the connection keeps working.
        let out = exchange(&path, b"set=1\nlisten_port=x\nfwmark=1\n\nget=1\n\n");
        assert_eq!(out, "errno=-22\n\nlisten_port=4242\nerrno=0\n\n");
        assert_eq!(h.sets.lock().unwrap().len(), 2);

        // Binary garbage and overlong lines never panic the server.
        let out = exchange(&path, b"set=1\n\xff\xfe=\x00\n\n");
        assert_eq!(out, "errno=-22\n\n");
        let mut long = b"set=1\nlisten_port=".to_vec();
        long.extend(std::iter::repeat_n(b'1', MAX_LINE + 10));
        long.extend(b"\n\n");
        assert_eq!(exchange(&path, &long), "errno=-22\n\n");
        assert_eq!(exchange(&path, b"get=1\nx\n"), "errno=-22\n\n");
        assert_eq!(exchange(&path, b"hello\n"), "");
        assert_eq!(
            exchange(&path, b"set=1\nlisten_port=5"),
            "",
            "EOF mid-request"
        );

        // Still serving after all that.
        assert_eq!(
            exchange(&path, b"get=1\n\n"),
            "listen_port=4242\nerrno=0\n\n"
        );
        drop(server);
        assert!(!path.exists(), "socket removed on drop");
    }

    #[test]
    fn refuses_a_live_socket_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t1.sock");
        let h = Arc::new(Recorder::default());
        let first = UapiServer::bind_at(&path, Arc::clone(&h)).unwrap();
        let err = UapiServer::bind_at(&path, Arc::clone(&h)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(first);

        // A stale socket file (bound, then its listener closed).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let second = UapiServer::bind_at(&path, Arc::clone(&h)).unwrap();
        assert_eq!(
            exchange(&path, b"get=1\n\n"),
            "listen_port=4242\nerrno=0\n\n"
        );
        drop(second);

        // A regular file is not a socket: refuse rather than delete it.
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(UapiServer::bind_at(&path, h).is_err());
        assert!(path.exists());
    }

    #[test]
    fn interface_names_are_checked() {
        for bad in ["", "a/b", "..", ".", "sixteen-chars-xx", "sp ace"] {
            assert!(validate_iface(bad).is_err(), "{bad:?}");
        }
        for good in ["wg0", "tabbify0", "fifteen-chars-x"] {
            assert!(validate_iface(good).is_ok(), "{good:?}");
        }
    }
}
