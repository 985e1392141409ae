//! The `tabbify-mesh` command line without a network: keys and the derived ULA, as a user
//! pipes them (`genkey | pubkey | ula`), agree with `wg`'s key format and with the address
//! derivation the coordinator and the edge use (`tabbify_api::ula`); bad input is refused
//! with a message, not a panic.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use base64::Engine as _;

fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tabbify-mesh"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tabbify-mesh runs");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin)
        .expect("stdin takes the input");
    child.wait_with_output().expect("tabbify-mesh exits")
}

fn stdout_line(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .expect("utf-8 output")
        .trim()
        .to_owned()
}

#[test]
fn genkey_pubkey_and_ula_agree_with_the_shared_derivation() {
    let private = stdout_line(&run(&["genkey"], b""));
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(b64.decode(&private).expect("base64 key").len(), 32);

    let public = stdout_line(&run(&["pubkey"], private.as_bytes()));
    let raw: [u8; 32] = b64
        .decode(&public)
        .expect("base64 public key")
        .try_into()
        .expect("32 bytes");
    assert_ne!(public, private);

    assert_eq!(raw.len(), 32);
    let ula = stdout_line(&run(&["ula"], b"node-1\n"));
    assert_eq!(ula, tabbify_api::ula::identity_ula("node-1").to_string());
    assert!(!run(&["ula"], b"\n").status.success());
}

#[test]
fn a_malformed_key_is_refused_with_a_message() {
    let out = run(&["pubkey"], b"not a key\n");
    assert!(!out.status.success());
    assert!(!out.stderr.is_empty(), "no message on stderr");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("panicked"), "{text}");
}

/// Issue 11, "the join token on argv shows in `ps`": `--join-token-file` exists, excludes
/// `--join-token`, and a missing file is refused with a message naming it (before anything
/// is brought up).
#[test]
fn join_token_file_is_accepted_and_excludes_the_argv_token() {
    let base = [
        "join",
        "--name",
        "n",
        "--coordinator",
        "https://127.0.0.1:1",
        "--tls-cert",
        "/nonexistent/c",
        "--tls-key",
        "/nonexistent/k",
        "--tls-ca",
        "/nonexistent/ca",
    ];
    let mut both = base.to_vec();
    both.extend(["--join-token", "t", "--join-token-file", "/nonexistent/tok"]);
    let out = run(&both, b"");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be used with"), "{err}");
    let mut file = base.to_vec();
    file.extend(["--join-token-file", "/nonexistent/tok"]);
    let out = run(&file, b"");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--join-token-file /nonexistent/tok"), "{err}");
}
