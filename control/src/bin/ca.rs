//! `tabbify-mesh-ca`: mints the mesh CA and its certificates.
//!
//! ```text
//! tabbify-mesh-ca init --out DIR [--name NAME] [--days N] [--force]
//! tabbify-mesh-ca issue-peer --name NAME --ca-dir DIR --out DIR [--days N] [--force]
//! tabbify-mesh-ca issue-admin --name NAME --ca-dir DIR --out DIR [--days N] [--force]
//! tabbify-mesh-ca issue-coordinator --name HOST [--san NAME_OR_IP]... --ca-dir DIR --out DIR [--days N] [--force]
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tabbify_control::ca::{Ca, Validity, CA_VALIDITY_DAYS, LEAF_VALIDITY_DAYS};

#[derive(Parser)]
#[command(
    name = "tabbify-mesh-ca",
    about = "Mints the mesh CA and peer/coordinator certificates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new CA: DIR/ca.pem and DIR/ca.key (mode 0600).
    Init {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "tabbify-mesh-ca")]
        name: String,
        /// Lifetime in days.
        #[arg(long, default_value_t = CA_VALIDITY_DAYS)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a peer client certificate (CN = NAME): OUT/cert.pem, OUT/key.pem, OUT/ca.pem.
    IssuePeer {
        /// The peer's name; it becomes the certificate's CN and the peer's identity.
        #[arg(long)]
        name: String,
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in days.
        #[arg(long, default_value_t = LEAF_VALIDITY_DAYS)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue an admin client certificate (CN = NAME, carrying the admin role
    /// urn:tabbify:role:admin): OUT/cert.pem, OUT/key.pem, OUT/ca.pem.
    IssueAdmin {
        /// The admin's name; it becomes the certificate's CN (named in audit lines).
        #[arg(long)]
        name: String,
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in days.
        #[arg(long, default_value_t = LEAF_VALIDITY_DAYS)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a coordinator server certificate: OUT/cert.pem, OUT/key.pem, OUT/ca.pem.
    IssueCoordinator {
        /// Host name (CN and first subject alternative name).
        #[arg(long)]
        name: String,
        /// Extra subject alternative names: DNS names or IP addresses.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in days.
        #[arg(long, default_value_t = LEAF_VALIDITY_DAYS)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> std::process::ExitCode {
    tabbify_api::cli::install();
    tabbify_api::cli::finish("tabbify-mesh-ca", run())
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Init {
            out,
            name,
            days,
            force,
        } => {
            let ca = Ca::generate(&name, Validity::days_from_now(days))?;
            ca.write(&out, force)?;
            println!("CA written to {}", out.display());
        }
        Command::IssuePeer {
            name,
            ca_dir,
            out,
            days,
            force,
        } => {
            let ca = Ca::load(&ca_dir)
                .with_context(|| format!("loading CA from {}", ca_dir.display()))?;
            let issued = ca.issue_peer(&name, Validity::days_from_now(days))?;
            ca.write_issued(&issued, &out, force)?;
            println!("peer certificate for {name} written to {}", out.display());
        }
        Command::IssueAdmin {
            name,
            ca_dir,
            out,
            days,
            force,
        } => {
            let ca = Ca::load(&ca_dir)
                .with_context(|| format!("loading CA from {}", ca_dir.display()))?;
            let issued = ca.issue_admin(&name, Validity::days_from_now(days))?;
            ca.write_issued(&issued, &out, force)?;
            println!("admin certificate for {name} written to {}", out.display());
        }
        Command::IssueCoordinator {
            name,
            sans,
            ca_dir,
            out,
            days,
            force,
        } => {
            let ca = Ca::load(&ca_dir)
                .with_context(|| format!("loading CA from {}", ca_dir.display()))?;
            let issued = ca.issue_coordinator(&name, &sans, Validity::days_from_now(days))?;
            ca.write_issued(&issued, &out, force)?;
            println!(
                "coordinator certificate for {name} written to {}",
                out.display()
            );
        }
    }
    Ok(())
}
