//! The TUN device: one file descriptor per queue (`IFF_MULTI_QUEUE`), optionally with a
//! `virtio_net_hdr` in front of every packet (`IFF_VNET_HDR`) and segmentation offloads
//! (`TUNSETOFFLOAD`).
//!
//! With offloads on, reads may be TSO/USO super-packets (up to 64 KiB) that the engine splits,
//! and writes may be coalesced TCP super-packets that the kernel segments or delivers as one.
//! What the kernel accepted is detected at open and reported in [`Offloads`]: TSO needs CSUM,
//! USO4 needs USO6 (a refusal is `EINVAL`), so each set is tried from the richest down.
//!
//! The interface exists while at least one queue is open: dropping the [`Tun`] removes it
//! together with its addresses and routes.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// Size of the `virtio_net_hdr` that precedes every packet when [`Offloads::vnet_hdr`] is set
/// (one definition, with the header's layout in `core::offload::vnet`).
pub use crate::core::offload::VNET_HDR_LEN;

/// What the kernel accepted for this TUN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Packets carry a 10-byte `virtio_net_hdr` prefix.
    pub vnet_hdr: bool,
    /// Checksum offload (partial checksums to complete).
    pub csum: bool,
    /// TCP segmentation offload (IPv4 and IPv6 super-packets).
    pub tso: bool,
    /// UDP segmentation offload (IPv4 and IPv6 super-datagrams).
    pub uso: bool,
}

impl std::fmt::Display for Offloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.vnet_hdr {
            return f.write_str("none");
        }
        let mut parts = vec!["vnet_hdr"];
        if self.csum {
            parts.push("csum");
        }
        if self.tso {
            parts.push("tso4+tso6");
        }
        if self.uso {
            parts.push("uso4+uso6");
        }
        f.write_str(&parts.join(","))
    }
}

/// An open multi-queue TUN interface.
#[derive(Debug)]
pub struct Tun {
    name: String,
    queues: Vec<OwnedFd>,
    offloads: Offloads,
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tun {
    /// Creates (or attaches to) the TUN `name` with `queues` queues. With `offloads`, asks
    /// for `IFF_VNET_HDR` and the richest offload set the kernel accepts.
    pub fn open(name: &str, queues: usize, offloads: bool) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name `{name}` must be 1-15 bytes"),
            ));
        }
        let cname = CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
        let mut fds = Vec::with_capacity(queues.max(1));
        let mut flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE;
        if offloads {
            flags |= IFF_VNET_HDR;
        }
        let mut result = Offloads::default();
        for q in 0..queues.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")?;
            let fd: OwnedFd = file.into();
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags,
                _pad: [0; 22],
            };
            for (dst, src) in req.name.iter_mut().zip(cname.as_bytes()) {
                *dst = *src as libc::c_char;
            }
            // SAFETY: `req` is a properly sized, initialised `struct ifreq` prefix (name + flags +
            // padding to 40 bytes) that lives across the call; the fd is open.
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            if offloads {
                let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
                // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid.
                let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
                if q == 0 {
                    result = negotiate(fd.as_raw_fd());
                } else {
                    set_offload(fd.as_raw_fd(), offload_bits(result))?;
                }
            }
            fds.push(fd);
        }
        Ok(Self {
            name: name.to_string(),
            queues: fds,
            offloads: result,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the kernel accepted.
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// The raw fd of queue `i`.
    pub fn queue_fd(&self, i: usize) -> RawFd {
        self.queues[i].as_raw_fd()
    }

    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Takes the queue fds out (each worker owns one); the interface lives while any is open.
    pub fn into_queues(self) -> Vec<OwnedFd> {
        self.queues
    }
}

fn offload_bits(o: Offloads) -> libc::c_uint {
    let mut bits = 0;
    if o.csum {
        bits |= TUN_F_CSUM;
    }
    if o.tso {
        bits |= TUN_F_TSO4 | TUN_F_TSO6;
    }
    if o.uso {
        bits |= TUN_F_USO4 | TUN_F_USO6;
    }
    bits
}

fn set_offload(fd: RawFd, bits: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int); the fd is open.
    let rc = unsafe { libc::ioctl(fd, TUNSETOFFLOAD, bits as libc::c_ulong) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Tries the offload sets from the richest down and returns the first the kernel accepts.
fn negotiate(fd: RawFd) -> Offloads {
    let candidates = [
        Offloads {
            vnet_hdr: true,
            csum: true,
            tso: true,
            uso: true,
        },
        Offloads {
            vnet_hdr: true,
            csum: true,
            tso: true,
            uso: false,
        },
        Offloads {
            vnet_hdr: true,
            csum: true,
            tso: false,
            uso: false,
        },
    ];
    for c in candidates {
        if set_offload(fd, offload_bits(c)).is_ok() {
            return c;
        }
    }
    Offloads {
        vnet_hdr: true,
        ..Offloads::default()
    }
}

/// Duplicates an fd (for a second owner such as the timer thread).
pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an fd we hold returns a new fd or -1.
    let nfd = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if nfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `nfd` is a freshly created fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(nfd) })
}

/// Releases ownership of an fd into a raw number (used by drivers that own fds by number).
pub fn into_raw(fd: OwnedFd) -> RawFd {
    fd.into_raw_fd()
}
