//! Locating the binaries the harness runs that are built from this workspace.
//!
//! Lookup order for a binary `NAME`: the environment variable given by the caller (e.g.
//! `TABBIFY_MESH_BIN`), then the cargo profile directory that holds the running
//! executable (test executables live in `target/<profile>/deps/`, binaries in
//! `target/<profile>/`), then `target/{debug,release}` under `CARGO_TARGET_DIR` and under
//! the workspace root.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Finds the workspace binary `name`; `env_var` overrides the search; `build_hint` says
/// how to build it and ends up in the error when it is nowhere.
pub fn locate(name: &str, env_var: &str, build_hint: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{env_var}={} is not a file", path.display());
    }
    let candidates = candidates(name);
    if let Some(found) = candidates.iter().find(|path| path.is_file()) {
        return Ok(found.clone());
    }
    bail!(
        "binary `{name}` not found (looked in {}): build it with `{build_hint}` or set {env_var}",
        candidates
            .iter()
            .map(|path| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `tabbify-mesh`, our WireGuard data plane (`TABBIFY_MESH_BIN` overrides).
pub fn tabbify_mesh() -> Result<PathBuf> {
    locate(
        "tabbify-mesh",
        "TABBIFY_MESH_BIN",
        "cargo build -p tabbify-dataplane --bin tabbify-mesh",
    )
}

/// `tabbify-xfer`, the SHA-256-checked TCP sender/receiver of this package
/// (`TABBIFY_XFER_BIN` overrides).
pub fn tabbify_xfer() -> Result<PathBuf> {
    locate(
        "tabbify-xfer",
        "TABBIFY_XFER_BIN",
        "cargo build -p tabbify-tests --bin tabbify-xfer",
    )
}

/// `tabbify-mesh-ca`, the CA helper (`TABBIFY_MESH_CA_BIN` overrides).
pub fn tabbify_mesh_ca() -> Result<PathBuf> {
    locate(
        "tabbify-mesh-ca",
        "TABBIFY_MESH_CA_BIN",
        "cargo build -p tabbify-control --bin tabbify-mesh-ca",
    )
}

/// `tabbify-mesh-coordinator`, the control plane (`TABBIFY_MESH_COORDINATOR_BIN` overrides).
pub fn tabbify_mesh_coordinator() -> Result<PathBuf> {
    locate(
        "tabbify-mesh-coordinator",
        "TABBIFY_MESH_COORDINATOR_BIN",
        "cargo build -p tabbify-control --bin tabbify-mesh-coordinator",
    )
}

/// `tabbify-mesh-relay`, the relay (`TABBIFY_MESH_RELAY_BIN` overrides).
pub fn tabbify_mesh_relay() -> Result<PathBuf> {
    locate(
        "tabbify-mesh-relay",
        "TABBIFY_MESH_RELAY_BIN",
        "cargo build -p tabbify-relay --bin tabbify-mesh-relay",
    )
}

/// `tabbify-node`, the public edge (`TABBIFY_NODE_BIN` overrides).
pub fn tabbify_node() -> Result<PathBuf> {
    locate(
        "tabbify-node",
        "TABBIFY_NODE_BIN",
        "cargo build -p tabbify-edge --bin tabbify-node",
    )
}

/// `tabbify-testapp`, the app runner stand-in of this package (`TABBIFY_TESTAPP_BIN`
/// overrides).
pub fn tabbify_testapp() -> Result<PathBuf> {
    locate(
        "tabbify-testapp",
        "TABBIFY_TESTAPP_BIN",
        "cargo build -p tabbify-tests --bin tabbify-testapp",
    )
}

fn candidates(name: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            if dir.file_name().is_some_and(|n| n == "deps") {
                dirs.extend(dir.parent().map(Path::to_path_buf));
            }
            dirs.push(dir.to_path_buf());
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target_dirs = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([workspace.join("target")]);
    for target in target_dirs {
        dirs.push(target.join("debug"));
        dirs.push(target.join("release"));
    }
    let mut seen = Vec::new();
    for dir in dirs {
        let path = dir.join(name);
        if !seen.contains(&path) {
            seen.push(path);
        }
    }
    seen
}
