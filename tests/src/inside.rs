//! Running async test code inside a namespace, in this process: a dedicated thread enters
//! the namespace with `setns(2)` and drives a current-thread tokio runtime to completion.
//!
//! Why a thread and not `ip netns exec curl …`: the edge and app checks need clients that
//! `curl` cannot be (a WebSocket echo, a streamed 64 MiB body generated and hashed on the
//! fly, raw header lines, reading part of an event stream while the server holds it open),
//! and the edge crate's `testkit` helpers already are those clients. They only need their
//! sockets to be created inside the namespace.
//!
//! Why this is sound: the network namespace is a per-thread attribute, and `setns` with
//! `CLONE_NEWNET` is allowed in a multi-threaded process; it changes only the calling
//! thread. A socket belongs to the namespace it was created in, for its whole life. The
//! runtime here runs every task on the entered thread, and any thread it starts (tokio's
//! blocking pool) is cloned from it and inherits the namespace. The thread is never
//! returned to a pool: it ends with the closure, so no other code runs in the namespace by
//! accident, and the caller's threads are untouched.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsRawFd;

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::Netns;

/// Runs `make()`'s future to completion on a new thread inside `netns`, with a
/// current-thread tokio runtime (timers and I/O enabled); returns its output.
///
/// A panic inside is re-raised in the caller, so assertions behave as in the test itself.
pub fn block_on<T, Fut>(netns: &Netns, make: impl FnOnce() -> Fut + Send) -> Result<T>
where
    Fut: Future<Output = Result<T>>,
    T: Send,
{
    let path = format!("/run/netns/{}", netns.name());
    let handle = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name(format!("in-{}", netns.name()))
            .spawn_scoped(scope, move || -> Result<T> {
                enter(&handle).with_context(|| format!("entering {}", netns.name()))?;
                drop(handle);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting a runtime inside the namespace")?;
                runtime.block_on(make())
            })
            .context("spawning the namespace thread")?;
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread into the network namespace `handle` refers to.
fn enter(handle: &File) -> Result<()> {
    // SAFETY: setns(2) takes a file descriptor we own (kept open by `handle` for the whole
    // call) and a flag; it touches no memory of ours and affects only the calling thread's
    // network namespace.
    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The network namespace inode of the calling thread (`/proc/thread-self/ns/net`), to
/// check which namespace code runs in.
pub fn current_netns_id() -> Result<String> {
    std::fs::read_link("/proc/thread-self/ns/net")
        .map(|target| target.to_string_lossy().into_owned())
        .map_err(|error| anyhow!("reading /proc/thread-self/ns/net: {error}"))
}
