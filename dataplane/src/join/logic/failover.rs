//! Which coordinator the joiner talks to, among the several it was given.
//!
//! The joiner knows an ordered list of coordinator targets (each `--coordinator` URL, or
//! each address its host name resolves to) and talks to one at a time. When a request or
//! the roster stream to the current target fails, it moves to the next one (round robin,
//! so the one that failed is tried again later) and tries it at once: a dead coordinator
//! costs no backoff. Only once every target has failed in a row does the machine back off
//! (0.5 s doubling to the heartbeat interval), so a joiner whose coordinators are all down
//! does not spin.
//!
//! Invariants: `current < targets` and `targets >= 1`; with one target every failure backs
//! off, exactly as a joiner with one coordinator always did; an open stream
//! ([`Failover::connected`]) starts a new round.

/// The coordinator targets and which one is in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    targets: usize,
    current: usize,
    /// Targets that failed in a row since a stream last opened.
    failed: usize,
}

/// What to do after the current target failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Another target is tried at once.
    Now,
    /// Every target failed in a row: wait for the backoff.
    Backoff,
}

impl Failover {
    /// `targets` coordinator targets (at least one), the first in use.
    pub fn new(targets: usize) -> Self {
        Self {
            targets: targets.max(1),
            current: 0,
            failed: 0,
        }
    }

    /// The target in use (an index into the list the shell holds).
    pub fn current(&self) -> usize {
        self.current
    }

    /// How many targets there are.
    pub fn targets(&self) -> usize {
        self.targets
    }

    /// There is another target to move to.
    pub fn several(&self) -> bool {
        self.targets > 1
    }

    /// The current target failed: move to the next one. Says whether to try it at once
    /// or after the backoff (once every target failed in a row).
    pub fn failed(&mut self) -> Next {
        self.failed += 1;
        self.current = (self.current + 1) % self.targets;
        if self.failed >= self.targets {
            self.failed = 0;
            Next::Backoff
        } else {
            Next::Now
        }
    }

    /// A roster stream opened on the current target: the next failure starts a new round.
    pub fn connected(&mut self) {
        self.failed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_target_always_backs_off() {
        let mut f = Failover::new(1);
        assert_eq!(f.failed(), Next::Backoff);
        assert_eq!(f.failed(), Next::Backoff);
        assert_eq!(f.current(), 0);
        assert!(!f.several());
    }

    #[test]
    fn a_failure_moves_to_the_next_target_at_once_until_all_failed() {
        let mut f = Failover::new(3);
        assert_eq!((f.failed(), f.current()), (Next::Now, 1));
        assert_eq!((f.failed(), f.current()), (Next::Now, 2));
        // Every target failed in a row: back off, starting over with the first.
        assert_eq!((f.failed(), f.current()), (Next::Backoff, 0));
        assert_eq!((f.failed(), f.current()), (Next::Now, 1));
    }

    #[test]
    fn a_stream_that_opens_starts_a_new_round_and_the_failed_target_comes_back_later() {
        let mut f = Failover::new(2);
        assert_eq!((f.failed(), f.current()), (Next::Now, 1));
        f.connected();
        // The second dies too: the first, which failed before, is tried again at once.
        assert_eq!((f.failed(), f.current()), (Next::Now, 0));
        assert_eq!((f.failed(), f.current()), (Next::Backoff, 1));
    }

    #[test]
    fn zero_targets_counts_as_one() {
        assert_eq!(Failover::new(0).targets(), 1);
    }
}
