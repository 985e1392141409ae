//! Polling with deadlines: the only way the harness waits for something to happen.
//!
//! A condition is polled with a short, growing pause between tries until it holds or the
//! deadline passes; the error then says what was awaited and the last reason it failed.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

/// Polls `probe` until it returns `Ok(Some(value))`, for at most `timeout`.
///
/// `Ok(None)` means "not yet"; `Err` also means "not yet", and is kept as the reason shown
/// if the deadline passes. `what` names the condition in that error.
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
    fn times_out_with_the_last_error() {
        let error =
            until::<()>("never", Duration::from_millis(30), || Err(anyhow!("nope"))).unwrap_err();
        let text = format!("{error:#}");
        assert!(text.contains("waiting for never"), "{text}");
        assert!(text.contains("nope"), "{text}");
    }
}
