//! Fuzz the coordinator's change-log entries (`storage::Change`, the JSON body of a
//! `change_log` row another coordinator wrote to the shared database): any bytes parse or
//! are refused, never a panic; a parsed entry serializes back to an equal one, and turning
//! it into SQL statements either succeeds or refuses a value that does not fit a column
//! (never a panic, never a statement without its parameters). Member rows (`Member`,
//! `RemoveMember`, `StaleMember`, `ExpireMember`), as a malicious coordinator on the same
//! database could write them, are put into a roster: never a panic. The same bytes as a
//! `members.body` parse or are refused, and a parsed body round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabbify_control::members::MemberRow;
use tabbify_control::policy::Policy;
use tabbify_control::registry::{Limits, Registry};
use tabbify_control::storage::{self, Change, Engine, Statement, StorageError, Value};

#[derive(Debug, Default)]
struct Recorder(Vec<Statement>);

impl Engine for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn transaction(&mut self, statements: &[Statement]) -> Result<(), StorageError> {
        self.0.extend_from_slice(statements);
        Ok(())
    }
    fn query(&mut self, _: &str, _: &[Value]) -> Result<Vec<Vec<Value>>, StorageError> {
        Ok(Vec::new())
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(row) = MemberRow::from_body(text, 1, false) {
            let again = MemberRow::from_body(&row.body(), 1, false).ok();
            assert_eq!(again, Some(row), "a member body does not round-trip");
        }
    }
    let Ok(changes) = serde_json::from_slice::<Vec<Change>>(data) else {
        return;
    };
    let again: Vec<Change> =
        serde_json::from_str(&serde_json::to_string(&changes).unwrap()).unwrap();
    assert_eq!(again, changes, "a change log entry does not round-trip");
    let mut rec = Recorder::default();
    if storage::commit(&mut rec, &changes).is_ok() {
        for s in &rec.0 {
            let placeholders = (1..=s.params.len()).all(|i| s.sql.contains(&format!("?{i}")));
            assert!(placeholders, "statement without its parameters: {}", s.sql);
        }
    }
    let Ok(policy) = Policy::compile(Default::default()) else {
        return;
    };
    let mut roster = Registry::new(std::sync::Arc::new(policy), 1, Limits::default());
    roster.set_coalescing(false);
    for c in &changes {
        match c {
            Change::Member(row) => {
                roster.apply_member(row);
            }
            Change::RemoveMember(id, reason) => {
                roster.remove(id, reason);
            }
            Change::StaleMember(id, _) => roster.mark_stale(id),
            _ => {}
        }
    }
});
