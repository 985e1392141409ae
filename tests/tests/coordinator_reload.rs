//! Issue 16, `systemctl reload tabbify-mesh-coordinator` = SIGHUP to the coordinator the test
//! started. Two members follow its roster stream (SSE) in their own namespaces.
//! * A policy file that no longer lets them reach each other, then SIGHUP: the change
//!   arrives on the open streams (each member's peer list empties, the policy revision
//!   moves) and neither joiner lost its stream (still connected, no re-registration).
//! * A broken policy file (an attacker with write access to a neighbouring file, or a
//!   typo), then SIGHUP: refused and logged; the policy in force stays.
//! * The same policy file again: no new revision (an API change is not overwritten).
//! * A rotated server certificate (a new one from the mesh CA written over the files),
//!   then SIGHUP: a new TLS connection is served the new certificate, while the members'
//!   streams opened before stay up.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tabbify_tests::prereq::{require, Tool};
use tabbify_tests::{JoinSpec, Testbed};

const SETTLE: Duration = Duration::from_secs(30);

/// The SHA-256 fingerprint of the certificate the coordinator serves a new connection.
fn served_fingerprint(bed: &Testbed, admin: &tabbify_tests::pki::Issued) -> Result<String> {
    let script = format!(
        "openssl s_client -connect {} -CAfile {} -cert {} -key {} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256",
        bed.coordinator.addr(),
        admin.ca.display(),
        admin.cert.display(),
        admin.key.display()
    );
    let out = bed.coordinator.netns().run("sh", &["-c", &script])?;
    ensure!(out.contains("Fingerprint="), "openssl: {out}");
    Ok(out.trim().to_owned())
}

fn file_fingerprint(bed: &Testbed, cert: &std::path::Path) -> Result<String> {
    let out = bed.coordinator.netns().run(
        "openssl",
        &[
            "x509",
            "-noout",
            "-fingerprint",
            "-sha256",
            "-in",
            &cert.display().to_string(),
        ],
    )?;
    Ok(out.trim().to_owned())
}

fn policy_revision(bed: &Testbed) -> Result<u64> {
    let v = bed.admin.expect_ok("GET", "/v1/policy", None)?;
    v["revision"]
        .as_u64()
        .with_context(|| format!("no revision in {v}"))
}

#[test]
fn sighup_reloads_policy_and_certificate_without_dropping_streams() -> Result<()> {
    require(&[Tool::Iproute2, Tool::Curl])?;
    ensure!(
        std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_ok(),
        "openssl is missing; install it with: apt-get install openssl"
    );
    let open = json!({
        "tags": ["node"],
        "allow": [{"src": ["tag:node"], "dst": ["tag:node"]}],
    });
    let mut bed = Testbed::start(open, 3)?;
    let (a_ns, _) = bed.host()?;
    let (b_ns, _) = bed.host()?;
    let mut a = bed.join(&a_ns, JoinSpec::new("reload-a", &["node"], None))?;
    let mut b = bed.join(&b_ns, JoinSpec::new("reload-b", &["node"], None))?;
    let before = a.wait_peer_names(&["reload-b"], SETTLE)?;
    b.wait_peer_names(&["reload-a"], SETTLE)?;
    let rev0 = policy_revision(&bed)?;

    // A policy that separates them, read on SIGHUP.
    let closed = json!({"tags": ["node"], "allow": []});
    std::fs::write(bed.coordinator.policy_file(), serde_json::to_vec(&closed)?)?;
    bed.coordinator.signal(libc::SIGHUP)?;
    a.wait_status("peer list emptied by the reloaded policy", SETTLE, |s| {
        s.peers.is_empty()
    })?;
    b.wait_status("peer list emptied by the reloaded policy", SETTLE, |s| {
        s.peers.is_empty()
    })?;
    let rev1 = policy_revision(&bed)?;
    ensure!(rev1 > rev0, "policy revision {rev0} → {rev1}");
    let after = a.status()?;
    ensure!(
        after.coordinator.connected && after.peer_id == before.peer_id,
        "a lost its stream or its identity: {}",
        after.summary()
    );

    // A broken file: refused, the policy in force stays.
    std::fs::write(
        bed.coordinator.policy_file(),
        b"{ \"tags\": [\"node\"], \"allow\": ",
    )?;
    bed.coordinator.signal(libc::SIGHUP)?;
    tabbify_tests::wait::until_true("the refusal logged", SETTLE, || {
        bed.coordinator
            .logs()
            .contains("reload: policy kept as it was")
    })?;
    ensure!(
        policy_revision(&bed)? == rev1,
        "a broken file changed the policy"
    );

    // The same policy again: no new revision.
    std::fs::write(bed.coordinator.policy_file(), serde_json::to_vec(&closed)?)?;
    bed.coordinator.signal(libc::SIGHUP)?;
    tabbify_tests::wait::until_true("the unchanged file logged", SETTLE, || {
        bed.coordinator
            .logs()
            .contains("reload: policy file unchanged")
    })?;
    ensure!(
        policy_revision(&bed)? == rev1,
        "an unchanged file made a revision"
    );

    // A rotated certificate: new connections get it, open streams stay.
    let admin = bed.pki.issue_admin("reload-admin")?;
    let old = served_fingerprint(&bed, &admin)?;
    let server = bed.pki.coordinator().clone();
    ensure!(
        old == file_fingerprint(&bed, &server.cert)?,
        "served {old}, file has another"
    );
    let fresh = bed
        .pki
        .issue_relay("coordinator-rotated", &[bed.coordinator.addr().ip()])?;
    std::fs::copy(&fresh.cert, &server.cert)?;
    std::fs::copy(&fresh.key, &server.key)?;
    let want = file_fingerprint(&bed, &server.cert)?;
    ensure!(want != old, "the new certificate is the old one");
    bed.coordinator.signal(libc::SIGHUP)?;
    tabbify_tests::wait::until("the rotated certificate served", SETTLE, || {
        let got = served_fingerprint(&bed, &admin)?;
        Ok((got == want).then_some(()))
    })?;
    // The API still answers over the new certificate, and the members kept their streams.
    ensure!(policy_revision(&bed)? == rev1, "policy after the rotation");
    for j in [&a, &b] {
        let s = j.status()?;
        ensure!(
            s.coordinator.connected,
            "{} disconnected: {}",
            j.name(),
            s.summary()
        );
    }
    a.stop()?;
    b.stop()?;
    Ok(())
}
