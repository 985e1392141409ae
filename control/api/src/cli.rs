//! Command-line hygiene shared by the five programs (tabbify-mesh, tabbify-mesh-coordinator,
//! tabbify-mesh-ca, tabbify-node, tabbify-mesh-relay).
//!
//! * [`install`]: output piped into a reader that stops early (`| head`) ends the program
//!   quietly with status 0 instead of a "failed printing to stdout" panic. Status 0, not
//!   141 (death by SIGPIPE): the reader chose to stop, nothing failed on our side, and a
//!   script under `set -o pipefail` doing `tabbify-mesh peers | head -1` must not fail for
//!   it. SIGPIPE itself stays ignored (Rust's default), so a daemon writing to a closed
//!   socket gets an error it can handle, never a silent death.
//! * [`finish`]: an error is one line, `program: message: cause: cause`, and no backtrace
//!   (the `Debug` form `fn main() -> Result` prints adds "Caused by" blocks and, with
//!   `RUST_BACKTRACE` set, a backtrace). Real panics keep Rust's default report, whose
//!   backtrace shows only when `RUST_BACKTRACE` is set.
//!
//! Invariant: only a panic of `print!`/`println!` on a stdout whose reader is gone is
//! turned into a quiet exit; every other panic goes to the default hook unchanged.

use std::error::Error;
use std::process::ExitCode;

/// Installs the panic hook that ends the program quietly (status 0) when stdout's reader
/// went away. Call first thing in `main`.
pub fn install() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if is_stdout_broken_pipe(msg) {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// Whether a panic message is std's report of a print to a stdout without a reader.
fn is_stdout_broken_pipe(msg: &str) -> bool {
    msg.starts_with("failed printing to stdout")
        && (msg.contains("Broken pipe") || msg.contains("os error 32"))
}

/// The exit of `main`: success, or the error on one line prefixed by `program`.
pub fn finish<E>(program: &str, r: Result<(), E>) -> ExitCode
where
    E: AsRef<dyn Error + Send + Sync + 'static>,
{
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {}", one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes joined with `": "` (anyhow's `{:#}`), newlines flattened.
pub fn one_line(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        // anyhow's context wrappers repeat nothing, but io errors wrapped by hand often
        // carry their cause's text already.
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrap(&'static str, Option<Box<dyn Error + Send + Sync>>);
    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    #[test]
    fn an_error_and_its_causes_fit_one_line() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such\nfile");
        let e = Wrap("reading /etc/x", Some(Box::new(io)));
        assert_eq!(one_line(&e), "reading /etc/x: no such file");
    }

    #[test]
    fn only_a_print_to_a_closed_stdout_is_quiet() {
        assert!(is_stdout_broken_pipe(
            "failed printing to stdout: Broken pipe (os error 32)"
        ));
        assert!(!is_stdout_broken_pipe(
            "failed printing to stderr: Broken pipe (os error 32)"
        ));
        assert!(!is_stdout_broken_pipe("index out of bounds"));
    }
}
