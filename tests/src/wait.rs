//! Polling with deadlines: the only way the harness waits for something to happen.
//!
//! A condition is polled with a short, growing pause between tries until it holds or the
//! deadline passes; the error then says what was awaited and the last reason it failed.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

/// Polls `probe` until it returns `Ok(Some(value))`, for at most `timeout`.
///
/// `Ok(None)` means "not yet"; `Err` also means "not yet", and is kept as the reason shown
/// if the deadline passes, unless it was made with [`fatal`]: that ends the wait at once
/// (e.g. the process being waited for has exited). `what` names the condition.
pub fn until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    let mut last_error = None;
    loop {
        match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) if error.is::<Fatal>() => {
                return Err(error.context(format!("while waiting for {what}")));
            }
            Err(error) => last_error = Some(error),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(match last_error {
                Some(error) => {
                    error.context(format!("timed out after {timeout:?} waiting for {what}"))
                }
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// An error that ends a wait at once instead of being retried.
#[derive(Debug)]
pub struct Fatal(anyhow::Error);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Fatal {}

/// Marks `error` as [`Fatal`] for [`until`].
pub fn fatal(error: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Fatal(error))
}

/// Polls `condition` until it is true, for at most `timeout`.
pub fn until_true(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> Result<()> {
    until(what, timeout, || Ok(condition().then_some(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_ready() {
        let mut tries = 0;
        let value = until("third try", Duration::from_secs(5), || {
            tries += 1;
            Ok((tries == 3).then_some(tries))
        })
        .unwrap();
        assert_eq!(value, 3);
    }

    #[test]
    fn stops_at_once_on_a_fatal_error() {
        let mut tries = 0;
        let error = until::<()>("anything", Duration::from_secs(60), || {
            tries += 1;
            Err(fatal(anyhow!("process exited")))
        })
        .unwrap_err();
        assert_eq!(tries, 1);
        assert!(format!("{error:#}").contains("process exited"));
    }

    #[test]
    fn times_out_with_the_last_error() {
        let error =
            until::<()>("never", Duration::from_millis(30), || Err(anyhow!("nope"))).unwrap_err();
        let text = format!("{error:#}");
        assert!(text.contains("waiting for never"), "{text}");
        assert!(text.contains("nope"), "{text}");
    }
}
