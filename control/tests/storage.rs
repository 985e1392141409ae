//! The coordinator's storage engines with real databases: the same store semantics on
//! SQLite and on a PostgreSQL server the test starts itself (Debian `postgresql`; the
//! test fails naming the package when it is missing); a `state.log` written by the line-log
//! coordinator imported once; migrations applied once by coordinators starting together;
//! and the binary killed with SIGKILL while acknowledged writes run, on both engines —
//! after a restart every acknowledged write is there.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../tests/src/postgres.rs"]
mod postgres;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use common::Client;
use serde_json::json;
use tabbify_control::storage::{self, Database, Statement, Value};
use tabbify_control::store::{
    IdentityRecord, Store, StoreError, StoredPolicy, TokenRecord, IMPORTED_LOG_FILE, LOG_FILE,
};

const COORD_BIN: &str = env!("CARGO_BIN_EXE_tabbify-mesh-coordinator");

/// A state log written by the line-log coordinator (`Store::open` + `put_*` of the
/// version before the databases, then a crash mid-append), byte for byte.
const LEGACY_LOG: &str = include_str!("data/state.log");

fn token(uses: u32) -> TokenRecord {
    TokenRecord {
        tags: vec!["node".into(), "ops".into()],
        name: Some("n".into()),
        expires_at: 1_000,
        max_uses: 3,
        uses,
        identity: Some("bound".into()),
        created_at: 10,
    }
}

fn ident(key: &str, tags: &[&str]) -> IdentityRecord {
    IdentityRecord {
        key: Some(key.into()),
        key_since: 5,
        display_name: format!("name of {key}"),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..IdentityRecord::default()
    }
}

fn sorted_tokens(s: &Store) -> Vec<(String, TokenRecord)> {
    let mut v: Vec<_> = s.tokens().map(|(h, t)| (h.clone(), t.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The store's semantics, against whatever `open` opens (the same database each call).
fn store_semantics(open: &dyn Fn() -> Store) {
    let mut s = open();
    assert!(s.identities().is_empty() && s.tokens().next().is_none());
    s.put_token("t1".into(), token(0)).unwrap();
    s.use_token("t1").unwrap();
    s.use_token("t1").unwrap();
    s.put_token(
        "t2".into(),
        TokenRecord {
            identity: None,
            name: None,
            ..token(0)
        },
    )
    .unwrap();
    s.put_token(
        "t3".into(),
        TokenRecord {
            expires_at: 50,
            ..token(0)
        },
    )
    .unwrap();
    s.delete_token("t2").unwrap();
    // Unicode, quotes and SQL metacharacters are data.
    let odd = "o'brien\"; DROP TABLE tokens; --ü";
    let mut r = ident("K1", &["node"]);
    r.display_name = odd.into();
    s.put_identity(odd, r).unwrap();
    let mut n1 = ident("A1", &["node", "ops"]);
    s.put_identity("n1", n1.clone()).unwrap();
    n1.set_key(Some("A2".into()), 20);
    s.put_identity("n1", n1.clone()).unwrap();
    n1.set_key(Some("A3".into()), 30);
    n1.revoked_at = Some(40);
    s.put_identity("n1", n1.clone()).unwrap();
    let mut n2 = ident("B1", &[]);
    n2.set_key(None, 50);
    s.put_identity("n2", n2).unwrap();
    // An admission and its token use: one transaction.
    s.admit("n3", ident("C1", &["node"]), Some("t1")).unwrap();
    s.set_policy(StoredPolicy {
        revision: 1,
        file_hash: "h1".into(),
        document: common::policy(),
    })
    .unwrap();
    s.set_policy(StoredPolicy {
        revision: 2,
        file_hash: "h2".into(),
        document: common::policy(),
    })
    .unwrap();

    // Attacks the store refuses before writing: another identity's current or retired key.
    assert!(matches!(
        s.put_identity("mallory", ident("A3", &[])),
        Err(StoreError::KeyBound { .. })
    ));
    assert!(matches!(
        s.put_identity("mallory", ident("A1", &[])),
        Err(StoreError::KeyBound { .. })
    ));
    assert!(matches!(
        s.put_identity("mallory", ident("B1", &[])),
        Err(StoreError::KeyBound { .. })
    ));
    let before_tokens = sorted_tokens(&s);
    let before_ids = s.identities().clone();
    drop(s);

    let mut s = open();
    assert_eq!(sorted_tokens(&s), before_tokens);
    assert_eq!(s.identities(), &before_ids);
    let t1 = s.token("t1").unwrap();
    assert_eq!((t1.uses, t1.identity.as_deref()), (3, Some("bound")));
    assert_eq!(s.owner_of_key("C1"), Some("n3"));
    assert!(s.token("t2").is_none());
    let n1r = s.identity("n1").unwrap();
    assert_eq!(n1r.key.as_deref(), Some("A3"));
    assert_eq!(n1r.past_keys, vec!["A1".to_string(), "A2".to_string()]);
    assert_eq!((n1r.key_since, n1r.revoked_at), (30, Some(40)));
    assert_eq!(n1r.tags, vec!["node".to_string(), "ops".to_string()]);
    assert_eq!(s.identity(odd).unwrap().display_name, odd);
    assert_eq!(s.identity("n2").unwrap().key, None);
    assert_eq!(s.owner_of_key("B1"), Some("n2"));
    assert_eq!(s.owner_of_key("A1"), Some("n1"));
    assert!(s.identity("mallory").is_none());
    let p = s.policy().unwrap();
    assert_eq!((p.revision, p.file_hash.as_str()), (2, "h2"));
    assert_eq!(p.document, common::policy());

    // Re-admission: the revocation lifted, the key cleared, the old keys stay bound.
    let mut n1 = s.identity("n1").unwrap().clone();
    n1.revoked_at = None;
    n1.set_key(None, 60);
    s.put_identity("n1", n1).unwrap();
    s.prune_tokens(100).unwrap();
    assert!(s.token("t3").is_none() && s.token("t1").is_some());
    drop(s);

    let s = open();
    let n1r = s.identity("n1").unwrap();
    assert_eq!((n1r.key.as_deref(), n1r.revoked_at), (None, None));
    assert_eq!(n1r.past_keys.len(), 3);
    assert_eq!(s.owner_of_key("A3"), Some("n1"));
    assert!(s.token("t3").is_none() && s.token("t1").is_some());
}

/// What a tampering or buggy writer cannot do at the database level: bind a key to a
/// second identity, or store a second policy row.
fn database_refuses_a_second_owner(db: &Database) {
    let mut s = Store::open_database(db, None, 1).unwrap();
    s.put_identity("owner", ident("KEY", &[])).unwrap();
    drop(s);
    let mut engine = db.open(1).unwrap();
    let steal = [
        Statement {
            must_change: false,
            sql: "INSERT INTO identities (identity, key_since, display_name, tags) \
                  VALUES ('mallory', 0, 'm', '[]')",
            params: vec![],
        },
        Statement {
            must_change: false,
            sql: "INSERT INTO identity_keys (key, identity, seq) VALUES (?1, ?2, ?3)",
            params: vec![
                Value::Text("KEY".into()),
                Value::Text("mallory".into()),
                Value::NullInt,
            ],
        },
    ];
    assert!(engine.transaction(&steal).is_err());
    let second_policy = [Statement {
        must_change: false,
        sql: "INSERT INTO policy (id, revision, file_hash, document) VALUES (2, 1, 'x', '{}')",
        params: vec![],
    }];
    assert!(engine.transaction(&second_policy).is_err());
    drop(engine);
    let s = Store::open_database(db, None, 2).unwrap();
    // The failed transaction left nothing behind, not even its first statement.
    assert!(s.identity("mallory").is_none());
    assert_eq!(s.owner_of_key("KEY"), Some("owner"));
}

/// The attacker: a member row claiming a mesh IPv4 another member holds (a coordinator
/// that allocated it without seeing the other's commit) is refused by the database
/// (`member_ipv4.ipv4` is a primary key); a removed member frees its address.
fn database_refuses_a_shared_ipv4(db: &Database) {
    use tabbify_control::members::MemberRow;
    let key = |n: u8| base64_key(n);
    let row = |name: &str, n: u8, ipv4: &str| MemberRow {
        peer_id: tabbify_control::ula::identity_peer_id(name),
        identity: name.into(),
        key: key(n),
        display_name: name.into(),
        tags: vec![],
        endpoints: vec![],
        wg_listen_port: 51820,
        reflexive: "192.0.2.1:51820".parse().unwrap(),
        hosted_app_ulas: vec![],
        mapped: vec![],
        nat: Default::default(),
        home_relay: None,
        last_seen: 10,
        stale: false,
        ephemeral: false,
        ipv4: Some(ipv4.parse().unwrap()),
        ads: Default::default(),
        concentrator: false,
    };
    let mut s = Store::open_database(db, None, 1).unwrap();
    s.put_identity("v4a", ident(&key(1), &[])).unwrap();
    s.put_identity("v4b", ident(&key(2), &[])).unwrap();
    s.commit_changes(vec![storage::Change::Member(row("v4a", 1, "100.64.1.1"))])
        .unwrap();
    let e = s
        .commit_changes(vec![storage::Change::Member(row("v4b", 2, "100.64.1.1"))])
        .unwrap_err();
    assert!(
        format!("{e}").contains("conflict") || format!("{e:?}").contains("Conflict"),
        "{e:?}"
    );
    s.commit_changes(vec![storage::Change::Member(row("v4b", 2, "100.64.1.2"))])
        .unwrap();
    // Moving b onto a's address still fails; once a is removed it succeeds.
    assert!(s
        .commit_changes(vec![storage::Change::Member(row("v4b", 2, "100.64.1.1"))])
        .is_err());
    s.commit_changes(vec![storage::Change::RemoveMember(
        tabbify_control::ula::identity_peer_id("v4a"),
        "left".into(),
    )])
    .unwrap();
    s.commit_changes(vec![storage::Change::Member(row("v4b", 2, "100.64.1.1"))])
        .unwrap();
}

fn base64_key(n: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

fn pg() -> postgres::Postgres {
    postgres::Postgres::start().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn store_semantics_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    store_semantics(&|| Store::open(&path, 1).unwrap());
    let dir = tempfile::tempdir().unwrap();
    database_refuses_a_second_owner(&Database::Sqlite(dir.path().to_owned()));
    let dir = tempfile::tempdir().unwrap();
    database_refuses_a_shared_ipv4(&Database::Sqlite(dir.path().to_owned()));
}

#[test]
fn store_semantics_on_postgres() {
    let pg = pg();
    let db = Database::Postgres(pg.create_database("semantics").unwrap());
    store_semantics(&|| Store::open_database(&db, None, 1).unwrap());
    // Over the unix socket (how coordinators in other network namespaces reach it).
    pg.create_database("tamper").unwrap();
    let db = Database::Postgres(pg.socket_url("tamper"));
    database_refuses_a_second_owner(&db);
    let db = Database::Postgres(pg.create_database("ipv4").unwrap());
    database_refuses_a_shared_ipv4(&db);
}

/// Coordinators starting together against one empty database: the migrations run once
/// (under the advisory lock), every one of them starts.
#[test]
fn concurrent_starts_migrate_postgres_once() {
    let pg = pg();
    let url = pg.create_database("race").unwrap();
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let db = Database::Postgres(url.clone());
            std::thread::spawn(move || Store::open_database(&db, None, 1).map(drop))
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    let rows = pg
        .psql("race", "SELECT count(*) FROM schema_migrations")
        .unwrap();
    assert_eq!(rows, storage::migrate::MIGRATIONS.len().to_string());
    // A schema newer than this coordinator knows is refused, not written to.
    pg.psql(
        "race",
        "INSERT INTO schema_migrations VALUES (999, 'from the future', 0)",
    )
    .unwrap();
    let err = Store::open_database(&Database::Postgres(url), None, 1).unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");
}

/// What the legacy log in `data/state.log` holds (written by the line-log store).
fn check_legacy_import(s: &Store) {
    let a = s.identity("old-a").unwrap();
    assert_eq!(a.key.as_deref(), Some("S0V5T2xkQQ=="));
    assert_eq!(a.tags, vec!["node".to_string()]);
    assert!(s.is_key_revoked("S0V5R29uZQ=="));
    let n1 = s.identity("node-1").unwrap();
    assert_eq!(n1.key.as_deref(), Some("S2V5MUI="));
    assert_eq!(n1.past_keys, vec!["S2V5MQ==".to_string()]);
    assert_eq!(n1.key_since, 1_700_000_300);
    let n2 = s.identity("node-2").unwrap();
    assert_eq!(n2.revoked_at, Some(1_700_000_500));
    assert_eq!(n2.display_name, "Two");
    let n3 = s.identity("node-3").unwrap();
    assert_eq!(n3.key, None);
    assert_eq!(s.owner_of_key("S2V5Mw=="), Some("node-3"));
    let a_tok = s.token(&"aa".repeat(32)).unwrap();
    assert_eq!((a_tok.uses, a_tok.name.as_deref()), (0, Some("named")));
    let b_tok = s.token(&"bb".repeat(32)).unwrap();
    assert_eq!((b_tok.uses, b_tok.identity.as_deref()), (2, Some("node-2")));
    assert!(s.token(&"cc".repeat(32)).is_none());
    let p = s.policy().unwrap();
    assert_eq!((p.revision, p.file_hash.as_str()), (4, "def456"));
}

fn legacy_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(LOG_FILE), LEGACY_LOG).unwrap();
    dir
}

#[test]
fn a_state_log_from_the_line_log_coordinator_is_imported_once_into_sqlite() {
    let dir = legacy_dir();
    let mut s = Store::open(dir.path(), 1).unwrap();
    check_legacy_import(&s);
    assert!(!dir.path().join(LOG_FILE).exists());
    assert_eq!(
        std::fs::read_to_string(dir.path().join(IMPORTED_LOG_FILE)).unwrap(),
        LEGACY_LOG,
        "the log is kept, unchanged, as a backup"
    );
    s.use_token(&"aa".repeat(32)).unwrap();
    drop(s);
    let s = Store::open(dir.path(), 2).unwrap();
    check_legacy_import(&Store::replay(&LEGACY_LOG.lines().collect::<Vec<_>>()).unwrap());
    assert_eq!(
        s.token(&"aa".repeat(32)).unwrap().uses,
        1,
        "not imported again"
    );
}

#[test]
fn a_state_log_is_imported_once_into_postgres() {
    let pg = pg();
    let db = Database::Postgres(pg.create_database("import").unwrap());
    let dir = legacy_dir();
    let s = Store::open_database(&db, Some(dir.path()), 1).unwrap();
    check_legacy_import(&s);
    assert!(dir.path().join(IMPORTED_LOG_FILE).exists());
    drop(s);
    check_legacy_import(&Store::open_database(&db, None, 2).unwrap());
    // Another coordinator's leftover log beside a database with state: refused.
    let other = legacy_dir();
    let fresh = Database::Postgres(pg.create_database("import2").unwrap());
    let mut s = Store::open_database(&fresh, None, 1).unwrap();
    s.put_token("x".into(), token(0)).unwrap();
    drop(s);
    assert!(matches!(
        Store::open_database(&fresh, Some(other.path()), 2),
        Err(StoreError::ImportConflict { .. })
    ));
    assert!(other.path().join(LOG_FILE).exists());
}

/// A coordinator child process, killed (SIGKILL, by its PID) when dropped.
struct Child9 {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Child9 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_coordinator(state: &Path, database: Option<&str>) -> Child9 {
    let policy = state.with_extension("policy.json");
    std::fs::write(&policy, serde_json::to_vec(&common::policy()).unwrap()).unwrap();
    let mut cmd = Command::new(COORD_BIN);
    cmd.args([
        "--bind",
        "127.0.0.1:0",
        "--insecure-no-mtls",
        "--admin",
        "admin",
    ])
    .args(["--stun-bind", "off", "--policy-file"])
    .arg(&policy)
    .arg("--state-dir")
    .arg(state)
    .env("TABBIFY_ALLOW_INSECURE", "1")
    .env("RUST_LOG", "warn")
    .env_remove(storage::DATABASE_URL_ENV)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(url) = database {
        cmd.args(["--database", url]);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("coordinator did not start: {line:?}"))
        .parse()
        .unwrap();
    Child9 { child, addr }
}

#[derive(Default)]
struct Acked {
    tokens: BTreeSet<String>,
    revoked: BTreeSet<String>,
}

/// Rounds of: writers mint tokens and revoke identities as fast as the coordinator
/// answers; once enough are acknowledged the coordinator gets SIGKILL mid-stream; it is
/// restarted on the same state and must hold every acknowledged write.
async fn acknowledged_writes_survive_kill_9(state: PathBuf, database: Option<String>) {
    let acked = Arc::new(Mutex::new(Acked::default()));
    for round in 0..3 {
        let mut coord = start_coordinator(&state, database.as_deref());
        let admin = Client::plain(coord.addr, Some("admin"));
        let target = acked.lock().unwrap().tokens.len() + 60;
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (admin, acked) = (admin.clone(), acked.clone());
                tokio::spawn(async move {
                    for i in 0.. {
                        let body = json!({"tags": ["node"], "ttl_secs": 3600, "max_uses": 1});
                        let Ok((200, v)) =
                            admin.call("POST", "/v1/tokens", Some(v_bytes(&body))).await
                        else {
                            return;
                        };
                        let id = v["token_id"].as_str().unwrap().to_owned();
                        acked.lock().unwrap().tokens.insert(id);
                        let cn = format!("r{round}-w{w}-{i}");
                        let Ok((200, _)) = admin
                            .call("DELETE", &format!("/v1/identities/{cn}"), None)
                            .await
                        else {
                            return;
                        };
                        acked.lock().unwrap().revoked.insert(cn);
                    }
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + common::WAIT * 6;
        while acked.lock().unwrap().tokens.len() < target {
            assert!(std::time::Instant::now() < deadline, "writes too slow");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // SIGKILL while the writers are still writing.
        coord.child.kill().unwrap();
        coord.child.wait().unwrap();
        for w in writers {
            w.await.unwrap();
        }
    }
    let coord = start_coordinator(&state, database.as_deref());
    let admin = Client::plain(coord.addr, Some("admin"));
    let (st, list) = admin.get("/v1/tokens").await;
    assert_eq!(st, 200, "{list}");
    let stored: BTreeSet<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token_id"].as_str().unwrap().to_owned())
        .collect();
    let (st, revs) = admin.get("/v1/revocations").await;
    assert_eq!(st, 200, "{revs}");
    let revoked: BTreeSet<String> = revs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["identity"].as_str().map(str::to_owned))
        .collect();
    let acked = acked.lock().unwrap();
    assert!(acked.tokens.len() >= 180, "{}", acked.tokens.len());
    let lost: Vec<_> = acked.tokens.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged tokens lost: {lost:?}");
    let lost: Vec<_> = acked.revoked.difference(&revoked).collect();
    assert!(lost.is_empty(), "acknowledged revocations lost: {lost:?}");
}

fn v_bytes(v: &serde_json::Value) -> bytes::Bytes {
    bytes::Bytes::from(serde_json::to_vec(v).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_every_acknowledged_write_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    acknowledged_writes_survive_kill_9(state.clone(), None).await;
    assert!(state.join(storage::SQLITE_FILE).exists());
    assert!(!state.join(LOG_FILE).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keeps_every_acknowledged_write_across_kill_9() {
    let pg = pg();
    let url = pg.create_database("kill9").unwrap();
    let dir = tempfile::tempdir().unwrap();
    acknowledged_writes_survive_kill_9(dir.path().join("state"), Some(url)).await;
    // Nothing went to SQLite.
    assert!(!dir.path().join("state").join(storage::SQLITE_FILE).exists());
}

/// `--database` takes PostgreSQL URLs only, and a database that cannot be reached stops
/// the start with an error instead of falling back to anything.
#[test]
fn a_bad_or_unreachable_database_refuses_to_start() {
    assert!(Database::from_url("sqlite:///x").is_err());
    assert_eq!(Database::from_url(" ").unwrap(), None);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let db = Database::from_url(&format!("postgres://u:secret@127.0.0.1:{port}/x"))
        .unwrap()
        .unwrap();
    assert!(!format!("{db:?}").contains("secret"));
    let err = Store::open_database(&db, None, 1).unwrap_err().to_string();
    assert!(!err.contains("secret"), "{err}");
}

/// Two coordinators on one PostgreSQL database (slice 2 of issue 14, store-level): what an
/// admin changes on one — the policy, a revocation, a token — is in force on the other
/// through the change log and LISTEN/NOTIFY, without a restart: the other's SSE streams
/// get the `policy` event and the revoked peer's `peer_remove`, and a token minted on one
/// admits a member on the other. A member of the mesh cannot use the other coordinator to
/// get around a revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_on_one_postgres_follow_each_others_changes() {
    use common::{key_for, register_body, Harness, Pki};
    use tabbify_control::api::SseEvent;
    let pg = pg();
    let url = pg.create_database("follow").unwrap();
    let pki = Pki::new();
    let db = Database::Postgres(url);
    let a = Harness::start_with_pki(pki.clone(), |c| c.database = Some(db.clone())).await;
    let b = Harness::start_with_pki(pki, |c| c.database = Some(db.clone())).await;
    let _fa = tabbify_control::follow::spawn(&a.coord).unwrap().unwrap();
    let _fb = tabbify_control::follow::spawn(&b.coord).unwrap().unwrap();

    // A token minted on A admits a member on B (once B has caught up: within a second).
    let token = a.token(&["node"]).await;
    let n1 = b.client("n1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let (st, v) = n1
            .post(
                "/v1/mesh/register",
                register_body("n1", &key_for("n1"), &["node"], &token),
            )
            .await;
        if st == 200 {
            break;
        }
        assert_eq!(st, 401, "{v}");
        assert!(
            std::time::Instant::now() < deadline,
            "token minted on A unknown to B after 1 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Its use is counted on both: the single-use token is spent for A too.
    let n9 = a.client("n9");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let (st, v) = n9
            .post(
                "/v1/mesh/register",
                register_body("n9", &key_for("n9"), &["node"], &token),
            )
            .await;
        assert_ne!(
            st, 200,
            "a spent single-use token admitted a second member on A: {v}"
        );
        if v["code"] == "token_used" {
            break;
        }
        // Before A caught up: the database's compare-and-set refused the second use.
        assert!(
            v["code"] == "token_invalid" || v["code"] == "conflict",
            "{v}"
        );
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // A supervisor on B streams; the policy changed on A reaches it.
    let s1 = b.join("s1", &["supervisor"]).await;
    let mut stream = s1.client.stream(None).await;
    let (_, first) = stream.next_event().await;
    assert!(matches!(first, SseEvent::Snapshot(_)), "{first:?}");
    let mut doc = common::policy();
    doc.tags.push("added-on-a".into());
    let (st, v) = a
        .admin()
        .put("/v1/policy", serde_json::to_value(&doc).unwrap())
        .await;
    assert_eq!(st, 200, "{v}");
    let revision = v["revision"].as_u64().unwrap();
    let started = std::time::Instant::now();
    loop {
        let (_, ev) = stream.next_event().await;
        if let SseEvent::Policy(p) = ev {
            assert_eq!(p.policy_revision, revision);
            break;
        }
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "policy reached B's stream after {:?}",
        started.elapsed()
    );
    let (_, p) = b.admin().get("/v1/policy").await;
    assert_eq!(p["revision"].as_u64(), Some(revision));
    assert!(p["policy"]["tags"].to_string().contains("added-on-a"));

    // n1 (registered on B) is revoked on A: it leaves B's rosters and B refuses it.
    let (st, v) = a.admin().delete("/v1/identities/n1").await;
    assert_eq!(st, 200, "{v}");
    let n1_id = tabbify_control::ula::identity_peer_id("n1");
    loop {
        let (_, ev) = stream.next_event().await;
        if let SseEvent::PeerRemove(r) = ev {
            assert_eq!(
                (r.peer_id.as_str(), r.reason.as_str()),
                (n1_id.as_str(), "revoked")
            );
            break;
        }
    }
    let (st, v) = n1
        .post(
            "/v1/mesh/register",
            register_body("n1", &key_for("n1"), &["node"], ""),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (403, Some("revoked")), "{v}");
    // And a third coordinator started now reads all of it at start.
    let c = Harness::start_with_pki(a.pki.clone(), |c| c.database = Some(db.clone())).await;
    let (_, p) = c.admin().get("/v1/policy").await;
    assert_eq!(p["revision"].as_u64(), Some(revision));
    let (st, _) = c
        .client("n1")
        .post(
            "/v1/mesh/register",
            register_body("n1", &key_for("n1"), &["node"], ""),
        )
        .await;
    assert_eq!(st, 403);
}

/// Two coordinators writing from stale views of one PostgreSQL database: the database's
/// compare-and-set refuses the second spend of a single-use token, and a key admitted
/// on one can neither be bound to another identity by the other nor dropped from its
/// identity by a stale rewrite. The attacker here is a member racing two coordinators.
#[test]
fn stale_coordinators_cannot_double_spend_a_token_or_move_a_key() {
    let pg = pg();
    let db = Database::Postgres(pg.create_database("race2").unwrap());
    let mut a = Store::open_database(&db, None, 1).unwrap();
    a.put_token(
        "single".into(),
        TokenRecord {
            max_uses: 1,
            ..token(0)
        },
    )
    .unwrap();
    let mut b = Store::open_database(&db, None, 1).unwrap();
    assert_eq!(b.token("single").unwrap().uses, 0);
    a.admit("m1", ident("KA", &[]), Some("single")).unwrap();
    // B has not caught up: it believes the token unused and the key free.
    let err = b.admit("m2", ident("KB", &[]), Some("single")).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Storage(storage::StorageError::Conflict { .. })
        ),
        "{err}"
    );
    assert!(
        b.identity("m2").is_none(),
        "a refused admission is not applied"
    );
    let err = b.put_identity("m2", ident("KA", &[])).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Storage(storage::StorageError::Conflict { .. })
        ),
        "{err}"
    );
    // Both believe the policy is at revision 1; only one can write revision 2.
    let policy = |revision| StoredPolicy {
        revision,
        file_hash: "f".into(),
        document: common::policy(),
    };
    a.replace_policy(policy(1), None).unwrap();
    b.catch_up().unwrap();
    a.replace_policy(policy(2), Some(1)).unwrap();
    let err = b.replace_policy(policy(2), Some(1)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Storage(storage::StorageError::Conflict { .. })
        ),
        "{err}"
    );
    assert!(
        a.replace_policy(policy(3), None).is_err(),
        "a policy is stored already"
    );
    // A stale rewrite of m1 (B never saw KA) keeps KA bound to m1.
    b.put_identity("m1", ident("KC", &[])).unwrap();
    // After catching up, B sees A's changes and refuses locally too.
    let seen = b.catch_up().unwrap();
    assert!(!seen.is_empty());
    assert_eq!(b.token("single").unwrap().uses, 1);
    assert_eq!(b.owner_of_key("KA"), Some("m1"));
    drop((a, b));
    let fresh = Store::open_database(&db, None, 2).unwrap();
    let m1 = fresh.identity("m1").unwrap();
    assert_eq!(m1.key.as_deref(), Some("KC"));
    assert!(m1.past_keys.contains(&"KA".to_string()), "{m1:?}");
    assert_eq!(fresh.owner_of_key("KA"), Some("m1"));
    assert!(fresh.identity("m2").is_none());
    assert_eq!(fresh.token("single").unwrap().uses, 1);
}

/// Commit rate of each engine, for the report (ignored: a measurement, not a check).
/// `cargo nextest run -p tabbify-control --test storage --run-ignored only commit_rate
/// --no-capture`. The test cluster runs with `fsync=off`, so its figure is the
/// round trips' cost, not a durable server's.
#[test]
#[ignore]
fn commit_rate() {
    fn run(name: &str, mut s: Store) {
        let n = 500;
        let started = std::time::Instant::now();
        for i in 0..n {
            s.put_token(format!("rate-{i}"), token(0)).unwrap();
        }
        let e = started.elapsed();
        println!(
            "{name}: {n} token commits in {e:?}: {:.0} commits/s, {:.2} ms each",
            n as f64 / e.as_secs_f64(),
            e.as_secs_f64() * 1000.0 / n as f64
        );
    }
    let dir = tempfile::tempdir().unwrap();
    run(
        "sqlite (synchronous=FULL, ext4)",
        Store::open(dir.path(), 1).unwrap(),
    );
    let pg = pg();
    let db = Database::Postgres(pg.create_database("rate").unwrap());
    run(
        "postgres (loopback TCP, fsync=off, change log on)",
        Store::open_database(&db, None, 1).unwrap(),
    );
}

/// The database goes away and comes back: writes meanwhile fail and change nothing, the
/// connection is re-established by itself, and a second store following the change log
/// catches up with what was written after the outage.
#[test]
fn a_postgres_outage_fails_writes_and_the_store_reconnects() {
    let mut pg = pg();
    let db = Database::Postgres(pg.create_database("outage").unwrap());
    let mut a = Store::open_database(&db, None, 1).unwrap();
    let mut b = Store::open_database(&db, None, 1).unwrap();
    a.put_token("before".into(), token(0)).unwrap();
    pg.stop().unwrap();
    assert!(a.put_token("during".into(), token(0)).is_err());
    assert!(a.token("during").is_none(), "a failed write is not applied");
    pg.start_server().unwrap();
    // The first request may find the old connection broken; the store reconnects.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(e) = a.put_token("after".into(), token(0)) {
        assert!(std::time::Instant::now() < deadline, "no reconnect: {e}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match b.catch_up() {
            Ok(_) if b.token("after").is_some() => break,
            r => assert!(std::time::Instant::now() < deadline, "{r:?}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(b.token("before").is_some() && b.token("during").is_none());
    drop((a, b));
    let s = Store::open_database(&db, None, 2).unwrap();
    assert!(s.token("after").is_some() && s.token("during").is_none());
}

/// The fuzz target's seed (`control/fuzz/corpus/change_log`) parses, round-trips, and
/// becomes statements with their parameters; a value too large for a column is refused.
#[test]
fn change_log_entries_round_trip_and_become_statements() {
    #[derive(Debug, Default)]
    struct Recorder(Vec<Statement>);
    impl storage::Engine for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn transaction(&mut self, s: &[Statement]) -> Result<(), storage::StorageError> {
            self.0.extend_from_slice(s);
            Ok(())
        }
        fn query(
            &mut self,
            _: &str,
            _: &[Value],
        ) -> Result<Vec<Vec<Value>>, storage::StorageError> {
            Ok(Vec::new())
        }
    }
    let seed = include_str!("../fuzz/corpus/change_log/seed.json");
    let changes: Vec<storage::Change> = serde_json::from_str(seed).unwrap();
    assert_eq!(changes.len(), 9);
    let again: Vec<storage::Change> =
        serde_json::from_str(&serde_json::to_string(&changes).unwrap()).unwrap();
    assert_eq!(again, changes);
    let mut rec = Recorder::default();
    storage::commit(&mut rec, &changes).unwrap();
    for s in &rec.0 {
        assert!(
            (1..=s.params.len()).all(|i| s.sql.contains(&format!("?{i}"))),
            "{}",
            s.sql
        );
    }
    let huge = vec![storage::Change::PruneTokens(u64::MAX)];
    assert!(storage::commit(&mut Recorder::default(), &huge).is_err());
}

/// A coordinator whose PostgreSQL goes away keeps answering reads and unchanged
/// heartbeats, refuses writes (a heartbeat that changes the member is one) with 503
/// `unavailable` (nothing changes), and takes writes again once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_without_its_database_serves_reads_and_refuses_writes_with_503() {
    use common::Harness;
    let mut pg = pg();
    let db = Database::Postgres(pg.create_database("down").unwrap());
    let h = Harness::start_with(|c| c.database = Some(db.clone())).await;
    let n1 = h.join("n1", &["node"]).await;
    let body = json!({"tags": ["node"], "ttl_secs": 60, "max_uses": 1});
    let (_, before) = h.admin().get("/v1/tokens").await;
    let stop = tokio::task::spawn_blocking(move || {
        pg.stop().unwrap();
        pg
    });
    let mut pg = stop.await.unwrap();
    let (st, v) = h.admin().post("/v1/tokens", body.clone()).await;
    assert_eq!((st, v["code"].as_str()), (503, Some("unavailable")), "{v}");
    let (st, v) = h.admin().get("/v1/tokens").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v, before, "the refused token was not kept");
    let (st, v) = h.admin().get("/v1/policy").await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = n1
        .heartbeat(json!({"endpoints": ["127.0.0.1:51820"]}))
        .await;
    assert_eq!(st, 200, "unchanged heartbeats need no database: {v}");
    // A heartbeat that changes the member is a write.
    let (st, v) = n1.heartbeat(json!({"endpoints": []})).await;
    assert_eq!((st, v["code"].as_str()), (503, Some("unavailable")), "{v}");
    let start = tokio::task::spawn_blocking(move || {
        pg.start_server().unwrap();
        pg
    });
    let _pg = start.await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (st, v) = h.admin().post("/v1/tokens", body.clone()).await;
        if st == 200 {
            break;
        }
        assert_eq!(st, 503, "{v}");
        assert!(std::time::Instant::now() < deadline, "writes not back: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
