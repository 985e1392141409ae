//! The mesh PKI for a test, minted by the real `tabbify-mesh-ca` binary: a CA, one
//! coordinator server certificate for the address the coordinator listens on, and client
//! certificates for peers and admins (CN = name).
//!
//! Invariants: everything lives in one temporary directory removed when the [`Pki`]
//! drops; private keys are mode 0600 (the CA helper creates them so and the test checks
//! it); a name is issued at most once per [`Pki`].

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::netns::run_checked;

/// Name (CN) of the coordinator's server certificate.
pub const COORDINATOR_NAME: &str = "coordinator.mesh.test";

/// A CA with a coordinator certificate; issues client certificates on demand.
pub struct Pki {
    dir: tempfile::TempDir,
    binary: PathBuf,
    coordinator: Issued,
}

/// One issued certificate: `cert.pem`, `key.pem` and the CA's `ca.pem` in one directory.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate's CN: the peer's identity for client certificates.
    pub name: String,
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
    /// The mesh CA (PEM).
    pub ca: PathBuf,
}

impl Pki {
    /// `tabbify-mesh-ca init`, then `issue-coordinator --san ADDR` for each of `sans`.
    pub fn new(sans: &[IpAddr]) -> Result<Pki> {
        let binary = crate::bins::tabbify_mesh_ca()?;
        let dir = tempfile::Builder::new()
            .prefix("tbt-pki-")
            .tempdir()
            .context("creating the PKI directory")?;
        let ca_dir = dir.path().join("ca");
        run(&binary, &["init", "--out", path_str(&ca_dir)?])?;
        let out = dir.path().join("coordinator");
        issue_server(&binary, &ca_dir, &out, COORDINATOR_NAME, sans)?;
        let coordinator = Issued::at(COORDINATOR_NAME, &out)?;
        Ok(Pki {
            dir,
            binary,
            coordinator,
        })
    }

    /// The coordinator's server certificate.
    pub fn coordinator(&self) -> &Issued {
        &self.coordinator
    }

    /// The CA certificate (PEM).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca").join("ca.pem")
    }

    /// `tabbify-mesh-ca issue-peer --name NAME`: a client certificate with CN `name`.
    pub fn issue_peer(&self, name: &str) -> Result<Issued> {
        let out = self.dir.path().join("peers").join(name);
        let ca_dir = self.dir.path().join("ca");
        run(
            &self.binary,
            &[
                "issue-peer",
                "--name",
                name,
                "--ca-dir",
                path_str(&ca_dir)?,
                "--out",
                path_str(&out)?,
            ],
        )?;
        Issued::at(name, &out)
    }
}

impl Pki {
    /// A relay's server certificate: `tabbify-mesh-ca issue-coordinator --name NAME`
    /// with `--san` for each of `sans` (a relay's certificate is a server certificate from
    /// the mesh CA, like the coordinator's).
    pub fn issue_relay(&self, name: &str, sans: &[IpAddr]) -> Result<Issued> {
        let out = self.dir.path().join("relays").join(name);
        issue_server(&self.binary, &self.dir.path().join("ca"), &out, name, sans)?;
        Issued::at(name, &out)
    }

    /// `tabbify-mesh-ca issue-admin --name NAME`: a client certificate with CN `name`
    /// carrying the admin role.
    pub fn issue_admin(&self, name: &str) -> Result<Issued> {
        let out = self.dir.path().join("admins").join(name);
        let ca_dir = self.dir.path().join("ca");
        run(
            &self.binary,
            &[
                "issue-admin",
                "--name",
                name,
                "--ca-dir",
                path_str(&ca_dir)?,
                "--out",
                path_str(&out)?,
            ],
        )?;
        Issued::at(name, &out)
    }
}

impl Issued {
    /// The files `tabbify-mesh-ca` wrote to `dir`, checked to exist, key mode 0600.
    fn at(name: &str, dir: &Path) -> Result<Issued> {
        let issued = Issued {
            name: name.to_owned(),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
        };
        for file in [&issued.cert, &issued.key, &issued.ca] {
            ensure!(
                file.is_file(),
                "tabbify-mesh-ca did not write {}",
                file.display()
            );
        }
        let mode = std::fs::metadata(&issued.key)
            .with_context(|| format!("reading {}", issued.key.display()))?
            .permissions()
            .mode()
            & 0o777;
        ensure!(
            mode == 0o600,
            "{} has mode {mode:o}, want 600",
            issued.key.display()
        );
        Ok(issued)
    }
}

fn run(binary: &Path, args: &[&str]) -> Result<()> {
    run_checked(Command::new(binary).args(args))
        .map(drop)
        .with_context(|| format!("tabbify-mesh-ca {}", args.join(" ")))
}

/// `path` as UTF-8 (temporary directories always are).
pub(crate) fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}

/// `tabbify-mesh-ca issue-coordinator --name NAME --san …` into `out`: a server certificate
/// from the mesh CA (the coordinator's, and a relay's).
fn issue_server(
    binary: &Path,
    ca_dir: &Path,
    out: &Path,
    name: &str,
    sans: &[IpAddr],
) -> Result<()> {
    let mut args = vec![
        "issue-coordinator".to_owned(),
        "--name".to_owned(),
        name.to_owned(),
    ];
    for san in sans {
        args.extend(["--san".to_owned(), san.to_string()]);
    }
    args.extend([
        "--ca-dir".to_owned(),
        path_str(ca_dir)?.to_owned(),
        "--out".to_owned(),
        path_str(out)?.to_owned(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(binary, &args)
}
