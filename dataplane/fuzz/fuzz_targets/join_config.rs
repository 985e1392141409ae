//! Fuzz `join --config` (`join::config_file::file_args`) with arbitrary file text against a
//! command with every kind of flag `join` has (a value, a repeating value, a number with a
//! range, a value enum, a switch). Checks:
//! * no input panics; a refusal names a line (≥ 1) unless it is about the file as a whole;
//! * what is accepted is only `--long=value` or `--long` for a known flag, and the command
//!   parses it back (the file cannot produce arguments clap would refuse or misread).
#![no_main]

use std::path::Path;

use clap::{Arg, ArgAction, Command};
use libfuzzer_sys::fuzz_target;
use tabbify_dataplane::join::config_file::file_args;

fn cmd() -> Command {
    Command::new("join")
        .arg(Arg::new("name").long("name"))
        .arg(Arg::new("tags").long("tag").action(ArgAction::Append))
        .arg(
            Arg::new("mtu")
                .long("mtu")
                .value_parser(clap::value_parser!(u32).range(1280..=9000)),
        )
        .arg(
            Arg::new("driver")
                .long("driver")
                .value_parser(["uring", "epoll"]),
        )
        .arg(
            Arg::new("ephemeral")
                .long("ephemeral")
                .action(ArgAction::SetTrue),
        )
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let c = cmd();
    match file_args(&c, Path::new("join.toml"), text, |_| false) {
        Err(e) => assert!(e.line >= 1, "{e}"),
        Ok(args) => {
            for a in &args {
                let a = a.to_str().expect("utf-8 in, utf-8 out");
                assert!(a.starts_with("--"), "{a}");
            }
            let mut argv = vec![std::ffi::OsString::from("join")];
            argv.extend(args);
            c.try_get_matches_from(argv)
                .expect("accepted keys parse back");
        }
    }
});
