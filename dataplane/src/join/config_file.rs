//! `join --config FILE` (default [`DEFAULT_PATH`] when it exists): the `join` flags as a
//! TOML file.
//!
//! The mapping is generic over clap's model of the `join` subcommand, so a new flag gets a
//! key without code here:
//! * a key is a flag's long name without `--` (`listen-port`, or `listen_port`: `_` is
//!   read as `-`); `tag`, `endpoint`, `stun`, `relay` and `coordinator` take an array
//!   (or one string) because their flags repeat;
//! * a switch (`ephemeral`, `force-relay`, …) takes `true` or `false`;
//! * a value is a string, an integer or a float, checked by the flag's own parser;
//! * the file's keys become arguments placed before the command line's, and a key whose
//!   flag was given on the command line or by its environment variable is skipped: command
//!   line beats environment beats file beats the built-in default.
//!
//! This module owns the file → arguments translation ([`file_args`], sans IO: text in,
//! arguments out) and its errors ([`FileError`]).
//!
//! Invariants:
//! * every refusal names the file, the line and column (from toml's spans) and the key;
//!   nothing in a file that is refused is used;
//! * unknown keys, tables, nested arrays, dates, `--help`/`--version`/`--config` keys are
//!   refused, never ignored (a typo must not silently fall back to a default);
//! * a produced argument is always `--long=value` (or `--long` for a switch), so a value
//!   that starts with `-` can never be read as another flag.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::ArgAction;
use toml::de::{DeTable, DeValue};

/// Where `join` looks for its file when `--config` is not given (used only if it exists).
pub const DEFAULT_PATH: &str = "/etc/tabbify/join.toml";

/// Keys that are flags of `join` but never come from the file.
const NOT_IN_FILE: [&str; 3] = ["help", "version", "config"];

/// A refused file: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line (0: the file as a whole, e.g. unreadable).
    pub line: usize,
    /// 1-based column (0 with line 0).
    pub column: usize,
    /// The key concerned, if any.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if let Some(k) = &self.key {
            write!(f, ": key `{k}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for FileError {}

/// 1-based line and column of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

/// Reads `path` and translates it with [`file_args`].
pub fn load(
    cmd: &clap::Command,
    path: &Path,
    given: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, FileError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError {
        path: path.to_owned(),
        line: 0,
        column: 0,
        key: None,
        message: format!("cannot read: {e}"),
    })?;
    file_args(cmd, path, &text, given)
}

/// Translates the file's `text` into arguments of `cmd` (the `join` subcommand), each
/// `--long=value` or `--long`. `given(id)` says whether the flag with that clap id was
/// already given (command line or environment); its key is then skipped (checked all the
/// same). `path` only names the file in errors.
pub fn file_args(
    cmd: &clap::Command,
    path: &Path,
    text: &str,
    given: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, FileError> {
    let err = |at: usize, key: Option<&str>, message: String| {
        let (line, column) = line_col(text, at);
        FileError {
            path: path.to_owned(),
            line,
            column,
            key: key.map(str::to_owned),
            message,
        }
    };
    let table = DeTable::parse(text).map_err(|e| {
        err(
            e.span().map_or(0, |s| s.start),
            None,
            format!("not valid TOML: {}", e.message().trim()),
        )
    })?;
    let mut out = Vec::new();
    // In the file's order, so the first refusal is the first bad line.
    let mut entries: Vec<_> = table.get_ref().iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    for (key, value) in entries {
        let name = key.get_ref().as_ref();
        let at = key.span().start;
        let long = name.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
            .filter(|a| !NOT_IN_FILE.contains(&long.as_str()) && !a.is_hide_set())
            .ok_or_else(|| {
                err(
                    at,
                    Some(name),
                    format!("unknown key (`{}` has no --{long})", cmd.get_name()),
                )
            })?;
        let strings =
            values(arg, value.get_ref()).map_err(|m| err(value.span().start, Some(name), m))?;
        let switch = matches!(arg.get_action(), ArgAction::SetTrue);
        if !switch {
            // The flag's own parser, alone (no required or conflicting flags around it).
            let probe = clap::Command::new("join").no_binary_name(true).arg(
                clap::Arg::new(arg.get_id().clone())
                    .allow_hyphen_values(true)
                    .value_parser(arg.get_value_parser().clone()),
            );
            for s in &strings {
                probe
                    .clone()
                    .try_get_matches_from([s])
                    .map_err(|e| err(value.span().start, Some(name), clap_message(&e)))?;
            }
        }
        if given(arg.get_id().as_str()) {
            continue;
        }
        for s in strings {
            if switch {
                if s == "true" {
                    out.push(OsString::from(format!("--{long}")));
                }
            } else {
                out.push(OsString::from(format!("--{long}={s}")));
            }
        }
    }
    Ok(out)
}

/// The value's strings for `arg` (a switch: `"true"`/`"false"`).
fn values(arg: &clap::Arg, v: &DeValue<'_>) -> Result<Vec<String>, String> {
    let repeats = matches!(arg.get_action(), ArgAction::Append);
    match (arg.get_action(), v) {
        (ArgAction::SetTrue, DeValue::Boolean(b)) => return Ok(vec![b.to_string()]),
        (ArgAction::SetTrue, _) => return Err("expected true or false".into()),
        // A flag whose value is `true|false` (`--snat`, `--accept-routes`): a TOML boolean
        // is that value. Any other flag refuses one (`name = true` is a mistake, not "true").
        (ArgAction::Set, DeValue::Boolean(b)) if takes_bool(arg) => return Ok(vec![b.to_string()]),
        (_, DeValue::Boolean(_)) => {
            return Err("expected a value, not true/false (this flag takes a value)".into())
        }
        _ => {}
    }
    match v {
        DeValue::Array(items) if repeats => items
            .iter()
            .map(|i| scalar(i.get_ref()))
            .collect::<Result<Vec<_>, _>>(),
        DeValue::Array(_) => {
            Err("expected one value, not an array (this flag does not repeat)".into())
        }
        v => scalar(v).map(|s| vec![s]),
    }
}

/// The flag's value is exactly `true` or `false` (clap's bool value parser).
fn takes_bool(arg: &clap::Arg) -> bool {
    let values = arg.get_possible_values();
    !values.is_empty()
        && values
            .iter()
            .all(|v| matches!(v.get_name(), "true" | "false"))
}

/// A string, integer or float as the command line would spell it.
fn scalar(v: &DeValue<'_>) -> Result<String, String> {
    match v {
        DeValue::String(s) => Ok(s.to_string()),
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .map(|n| n.to_string())
            .map_err(|_| format!("integer {i} out of range")),
        DeValue::Float(f) => Ok(f.as_str().to_owned()),
        DeValue::Boolean(_) => Err("expected a value, not true/false".into()),
        DeValue::Datetime(_) => Err("expected a string or a number, not a date".into()),
        DeValue::Array(_) => Err("expected a string or a number, not a nested array".into()),
        DeValue::Table(_) => Err("expected a string or a number, not a table".into()),
    }
}

/// clap's message for a refused value, on one line without its `error: ` prefix and tips.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("invalid value");
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    /// A command with the kinds of flags `join` has.
    fn cmd() -> Command {
        Command::new("join")
            .arg(Arg::new("name").long("name"))
            .arg(Arg::new("tags").long("tag").action(ArgAction::Append))
            .arg(
                Arg::new("listen_port")
                    .long("listen-port")
                    .value_parser(clap::value_parser!(u16)),
            )
            .arg(
                Arg::new("ephemeral")
                    .long("ephemeral")
                    .action(ArgAction::SetTrue),
            )
            .arg(
                Arg::new("driver")
                    .long("driver")
                    .value_parser(["uring", "epoll"]),
            )
            .arg(
                Arg::new("snat")
                    .long("snat")
                    .value_parser(clap::value_parser!(bool)),
            )
            .arg(
                Arg::new("config")
                    .long("config")
                    .value_parser(clap::value_parser!(PathBuf)),
            )
    }

    fn args(text: &str) -> Result<Vec<String>, FileError> {
        file_args(&cmd(), Path::new("/etc/tabbify/join.toml"), text, |_| false).map(|v| {
            v.into_iter()
                .map(|s| s.into_string().expect("utf-8"))
                .collect()
        })
    }

    #[test]
    fn every_kind_of_key_becomes_an_argument() {
        let a = args(
            "name = \"web-1\"\ntag = [\"web\", \"prod\"]\nlisten_port = 51821\nephemeral = true\ndriver = \"epoll\"\n",
        )
        .expect("valid");
        assert_eq!(
            a,
            [
                "--name=web-1",
                "--tag=web",
                "--tag=prod",
                "--listen-port=51821",
                "--ephemeral",
                "--driver=epoll"
            ]
        );
        assert!(args("ephemeral = false").expect("valid").is_empty());
        // A flag whose value is true|false takes a TOML boolean (and the string still works).
        assert_eq!(args("snat = false").expect("valid"), ["--snat=false"]);
        assert_eq!(args("snat = \"true\"").expect("valid"), ["--snat=true"]);
        assert_eq!(args("tag = \"one\"").expect("valid"), ["--tag=one"]);
    }

    #[test]
    fn a_flag_given_on_the_command_line_skips_its_key() {
        let a = file_args(
            &cmd(),
            Path::new("f"),
            "name = \"file\"\ntag = [\"a\"]\n",
            |id| id == "name",
        )
        .expect("valid");
        assert_eq!(a, [OsString::from("--tag=a")]);
        // Still checked: a bad value is refused even when the command line overrides it.
        assert!(file_args(&cmd(), Path::new("f"), "listen-port = 99999", |_| true).is_err());
    }

    #[test]
    fn an_unknown_key_names_file_line_and_key() {
        let e = args("name = \"a\"\n\nlisten-prot = 1\n").expect_err("typo");
        assert_eq!(e.line, 3);
        assert_eq!(e.column, 1);
        assert_eq!(e.key.as_deref(), Some("listen-prot"));
        let s = e.to_string();
        assert!(
            s.starts_with("/etc/tabbify/join.toml:3:1: key `listen-prot`: unknown key"),
            "{s}"
        );
    }

    #[test]
    fn a_bad_value_names_file_line_and_key() {
        let e = args("name = \"a\"\nlisten-port = 70000\n").expect_err("out of range");
        assert_eq!((e.line, e.key.as_deref()), (2, Some("listen-port")));
        assert!(e.message.contains("70000"), "{e}");
        let e = args("driver = \"dpdk\"").expect_err("not a driver");
        assert_eq!((e.line, e.key.as_deref()), (1, Some("driver")));
        for bad in [
            "ephemeral = \"yes\"",
            "name = true",
            "name = [\"a\", \"b\"]",
            "tag = [[\"a\"]]",
            "name = 1979-05-27",
            "[name]\nx = 1",
        ] {
            let e = args(bad).expect_err(bad);
            assert!(e.key.is_some(), "{bad}: {e}");
            assert!(e.line >= 1, "{bad}: {e}");
        }
    }

    #[test]
    fn the_file_cannot_smuggle_flags_or_itself() {
        // A value that looks like a flag stays the value of its key.
        assert_eq!(
            args("name = \"--ephemeral\"").expect("valid"),
            ["--name=--ephemeral"]
        );
        for k in [
            "config = \"/tmp/other.toml\"",
            "help = true",
            "version = true",
        ] {
            assert!(args(k).is_err(), "{k}");
        }
    }

    #[test]
    fn broken_toml_is_refused_with_its_position() {
        let e = args("name = \"a\"\nlisten-port = \n").expect_err("no value");
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.starts_with("not valid TOML"), "{e}");
        let e = args("name = \"a\"\nname = \"b\"\n").expect_err("duplicate");
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
