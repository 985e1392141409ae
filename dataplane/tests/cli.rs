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

/// Runs `tabbify-mesh args` with `stdin`, its stdout's reader gone before it writes (a
/// `| head -c0` that has exited): the reading end is closed before the input is sent.
fn run_reader_gone(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tabbify-mesh"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_BACKTRACE")
        .spawn()
        .expect("tabbify-mesh runs");
    drop(child.stdout.take());
    let mut input = child.stdin.take().expect("stdin is piped");
    input.write_all(stdin).expect("stdin takes the input");
    drop(input);
    child.wait_with_output().expect("tabbify-mesh exits")
}

/// Issue 16, CLI hygiene: the key commands into a closed pipe exit 0 without a word, as
/// every other command does (pubkey wrote with `writeln!` and reported "Broken pipe").
#[test]
fn key_commands_exit_quietly_when_the_reader_is_gone() {
    let private = stdout_line(&run(&["genkey"], b""));
    for (args, input) in [
        (&["genkey"][..], &b""[..]),
        (&["pubkey"][..], private.as_bytes()),
        (&["ula"][..], &b"node-1\n"[..]),
    ] {
        let out = run_reader_gone(args, input);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "{args:?} into a closed pipe: {:?}, stderr: {stderr}",
            out.status
        );
    }
    // A real error is still one: a bad key into a closed pipe fails with its message.
    let out = run_reader_gone(&["pubkey"], b"not a key\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("private key on stdin"));
}

/// A join.toml for the tests below, in a temporary directory.
fn join_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("join.toml");
    std::fs::write(&path, text).expect("the file is written");
    let p = path.to_str().expect("utf-8 path").to_owned();
    (dir, p)
}

fn stderr_of(out: &Output) -> String {
    assert!(!out.status.success(), "join must stop before bring-up");
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!e.contains("panicked"), "{e}");
    e
}

/// Issue 16, join.toml: the file's keys are the flags (kebab or snake case), the command
/// line overrides them, and a typo or a bad value is refused naming the file, the line and
/// the key. Each case stops at a check `join` makes before bringing anything up.
#[test]
fn join_config_file_keys_are_the_flags_and_the_command_line_wins() {
    // The file's value is used: mtu 100 is refused, so the file was read.
    let (_d, path) = join_file(
        "# a joiner\nname = \"web-1\"\ncoordinator = [\"https://127.0.0.1:1\"]\nmtu = 100\n",
    );
    let e = stderr_of(&run(&["join", "--config", &path], b""));
    assert!(e.contains("--mtu 100 is out of range"), "{e}");
    // The command line beats the file: with --mtu 1300 the next check speaks (mTLS files).
    let e = stderr_of(&run(&["join", "--config", &path, "--mtu", "1300"], b""));
    assert!(e.contains("mTLS needs --tls-cert"), "{e}");
    // A switch, snake case.
    let (_d2, path2) = join_file(
        "name = \"web-1\"\ncoordinator = \"https://127.0.0.1:1\"\ninsecure_no_mtls = true\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tabbify-mesh"))
        .args(["join", "--config", &path2])
        .env_remove("TABBIFY_ALLOW_INSECURE")
        .output()
        .expect("runs");
    let e = stderr_of(&out);
    assert!(e.contains("needs TABBIFY_ALLOW_INSECURE=1"), "{e}");
    // `name` is required by clap; the file satisfies it (no "required" error above), and
    // without the file it is missing.
    let e = stderr_of(&run(&["join", "--config", "/dev/null"], b""));
    assert!(e.contains("--name"), "{e}");
}

#[test]
fn join_config_file_errors_name_file_line_and_key() {
    let (_d, path) = join_file("name = \"web-1\"\n\nlisten-prot = 51821\n");
    let e = stderr_of(&run(&["join", "--config", &path], b""));
    assert!(
        e.contains(&format!("{path}:3:1: key `listen-prot`: unknown key")),
        "{e}"
    );
    let (_d, path) = join_file("name = \"web-1\"\ndriver = \"dpdk\"\n");
    let e = stderr_of(&run(&["join", "--config", &path], b""));
    assert!(e.contains(&format!("{path}:2:")), "{e}");
    assert!(e.contains("key `driver`") && e.contains("dpdk"), "{e}");
    // A value given on the command line does not excuse a bad one in the file.
    let e = stderr_of(&run(
        &[
            "join", "--config", &path, "--name", "x", "--driver", "epoll",
        ],
        b"",
    ));
    assert!(e.contains("key `driver`"), "{e}");
    let e = stderr_of(&run(&["join", "--config", "/nonexistent/join.toml"], b""));
    assert!(e.contains("/nonexistent/join.toml: cannot read"), "{e}");
}
