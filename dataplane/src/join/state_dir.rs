//! The joiner's state directory: the node key and the apps this node hosts.
//!
//! * `node.key` — the WireGuard private key, base64, created once with mode 0600 (the
//!   directory 0700) and never sent anywhere. A key file that others can read is refused,
//!   as ssh refuses a loose private key. It is written to a temporary file, fsynced,
//!   hard-linked into place (never replacing an existing key) and the directory fsynced,
//!   so a crash leaves no key or a whole one; an empty or partial key (left by an older
//!   version's crash) is refused with a message naming the file. A key rotation replaces
//!   it atomically (temp file, fsync, rename, directory fsync).
//! * `node.key.next` — during a key rotation, the new private key, written (temp file 0600,
//!   fsync, rename, directory fsync) *before* the coordinator is asked to accept it, and
//!   promoted to `node.key` (same atomic replace) only after it did. A crash at any point
//!   leaves the accepted key on disk: before the answer, both keys are kept and the next
//!   rotation attempt (at start or later) repeats the same request with the same new key,
//!   which the coordinator answers idempotently. `node.key.next` is deleted only when the
//!   coordinator refused it for good or after promotion.
//! * `node.key.since` — Unix seconds when `node.key` was created or rotated in (the key's
//!   age for `--key-max-age`); a missing file means the key file's modification time.
//! * `apps.json` — the app UUIDs hosted here, so a restart advertises them again. Written
//!   to a temporary file, synced and renamed, so a crash leaves the old or the new list.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use uuid::Uuid;

use crate::config::{self, Key};

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating it 0700 if missing) the directory.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating the state directory {}", dir.display()))?;
        }
        if !dir.is_dir() {
            bail!("state directory {} is not a directory", dir.display());
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The node's private key: read, or generated and stored on first use.
    pub fn node_key(&self) -> anyhow::Result<Key> {
        let path = self.dir.join("node.key");
        match fs::metadata(&path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    bail!(
                        "{} is readable by others (mode {mode:o}); run `chmod 600 {}`",
                        path.display(),
                        path.display()
                    );
                }
                let text = fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                if text.trim().is_empty() {
                    bail!(
                        "node key file {} is empty (an interrupted first start of an older \
                         version leaves it so); remove it to generate a new key",
                        path.display()
                    );
                }
                Key::from_base64(text.trim()).with_context(|| {
                    format!(
                        "node key file {} does not hold a complete base64 WireGuard key; \
                         restore it, or remove it to generate a new key",
                        path.display()
                    )
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = config::generate_private_key();
                let text = format!("{}\n", key.to_base64());
                if !self.create_once(&path, text.as_bytes())? {
                    // Another joiner on this state directory made it first: use its key.
                    return self.node_key();
                }
                self.write_atomic("node.key.since", unix_now().to_string().as_bytes())?;
                tracing::info!(path = %path.display(), "generated the node key");
                Ok(key)
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// When `node.key` was created or rotated in, Unix seconds.
    pub fn key_since(&self) -> anyhow::Result<u64> {
        let path = self.dir.join("node.key.since");
        match fs::read_to_string(&path) {
            Ok(t) => t
                .trim()
                .parse()
                .with_context(|| format!("{} is not a Unix time", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = self.dir.join("node.key");
                let modified = fs::metadata(&key)
                    .and_then(|m| m.modified())
                    .with_context(|| format!("reading {}", key.display()))?;
                Ok(modified
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()))
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The pending rotation's new key, if a rotation was started and not settled.
    pub fn next_key(&self) -> anyhow::Result<Option<Key>> {
        let path = self.dir.join("node.key.next");
        match fs::read_to_string(&path) {
            Ok(t) => Key::from_base64(t.trim())
                .map(Some)
                .with_context(|| format!("rotation key in {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The pending rotation's key, or a fresh one recorded durably as pending.
    pub fn begin_rotation(&self) -> anyhow::Result<Key> {
        if let Some(k) = self.next_key()? {
            return Ok(k);
        }
        let key = config::generate_private_key();
        self.write_atomic("node.key.next", format!("{}\n", key.to_base64()).as_bytes())?;
        Ok(key)
    }

    /// The coordinator accepted the pending key: it becomes `node.key`.
    pub fn finish_rotation(&self, key: &Key) -> anyhow::Result<()> {
        self.write_atomic("node.key", format!("{}\n", key.to_base64()).as_bytes())?;
        self.write_atomic("node.key.since", unix_now().to_string().as_bytes())?;
        self.remove("node.key.next")
    }

    /// The coordinator refused the pending key for good: forget it.
    pub fn abandon_rotation(&self) -> anyhow::Result<()> {
        self.remove("node.key.next")
    }

    fn remove(&self, name: &str) -> anyhow::Result<()> {
        let path = self.dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }

    /// Writes `name` whole or not at all: a 0600 temporary file, fsync, rename, fsync of
    /// the directory.
    fn write_atomic(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        self.sync_dir()
    }

    /// Creates `path` holding `bytes`, mode 0600, never visible partly written: a temporary
    /// file is written and fsynced, then hard-linked to `path` (which fails if `path`
    /// exists, so a key is never replaced), then the directory is fsynced. `false` when
    /// `path` already existed.
    fn create_once(&self, path: &Path, bytes: &[u8]) -> anyhow::Result<bool> {
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let written = (|| -> anyhow::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(bytes)
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", tmp.display()))
        })();
        let linked = written.and_then(|()| match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
        });
        let _ = fs::remove_file(&tmp);
        let created = linked?;
        self.sync_dir()?;
        Ok(created)
    }

    /// Makes renames and links in the directory durable.
    fn sync_dir(&self) -> anyhow::Result<()> {
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", self.dir.display()))
    }

    /// The hosted apps recorded here (empty if none).
    pub fn apps(&self) -> anyhow::Result<Vec<Uuid>> {
        let path = self.dir.join("apps.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a JSON list of app UUIDs", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Records the hosted apps (atomically).
    pub fn set_apps(&self, apps: &[Uuid]) -> anyhow::Result<()> {
        let path = self.dir.join("apps.json");
        let tmp = self.dir.join("apps.json.tmp");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec(apps)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        self.sync_dir()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_made_once_and_kept_private() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(&d.path().join("state")).unwrap();
        let k1 = s.node_key().unwrap();
        let k2 = s.node_key().unwrap();
        assert_eq!(k1.0, k2.0);
        let path = d.path().join("state/node.key");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(d.path().join("state"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = s.node_key().unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn bad_key_file_says_where() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let path = d.path().join("node.key");
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(b"nope\n")
            .unwrap();
        let e = format!("{:#}", s.node_key().unwrap_err());
        assert!(e.contains("node.key"), "{e}");
    }

    /// Issue 11, "`node.key` is created empty and then written": a key file left empty or
    /// partial by a crash is refused with a message naming the file, and a fresh key is
    /// never visible half written (no temporary file is left behind either).
    #[test]
    fn node_key_empty_or_partial_from_a_crash_is_refused_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let path = d.path().join("node.key");
        let key = s.node_key().unwrap();
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(
            names,
            vec!["node.key".to_owned(), "node.key.since".to_owned()]
        );
        let whole = fs::read_to_string(&path).unwrap();
        assert_eq!(whole.trim(), key.to_base64());
        for (content, says) in [("", "is empty"), (&whole[..20], "complete base64")] {
            fs::write(&path, content).unwrap();
            let e = format!("{:#}", s.node_key().unwrap_err());
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn a_rotation_keeps_the_pending_key_until_it_is_settled() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let old = s.node_key().unwrap();
        assert!(s.key_since().unwrap() > 0);
        assert!(s.next_key().unwrap().is_none());
        let next = s.begin_rotation().unwrap();
        // A crash now: the old key is still node.key, the new one is kept and reused.
        let s = StateDir::open(d.path()).unwrap();
        assert_eq!(s.node_key().unwrap().0, old.0);
        assert_eq!(s.begin_rotation().unwrap().0, next.0);
        let mode = fs::metadata(d.path().join("node.key.next"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        s.finish_rotation(&next).unwrap();
        assert_eq!(s.node_key().unwrap().0, next.0);
        assert!(s.next_key().unwrap().is_none());
        // A refused rotation forgets the pending key and keeps node.key.
        let other = s.begin_rotation().unwrap();
        assert_ne!(other.0, next.0);
        s.abandon_rotation().unwrap();
        assert!(s.next_key().unwrap().is_none());
        assert_eq!(s.node_key().unwrap().0, next.0);
        let leftovers: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn apps_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        assert!(s.apps().unwrap().is_empty());
        let a = vec![Uuid::new_v4(), Uuid::new_v4()];
        s.set_apps(&a).unwrap();
        assert_eq!(s.apps().unwrap(), a);
        fs::write(d.path().join("apps.json"), b"{").unwrap();
        assert!(s.apps().is_err());
    }
}
