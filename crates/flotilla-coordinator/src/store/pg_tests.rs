//! The store suite on a throwaway PostgreSQL, and two coordinators racing on one.
//!
//! Each test starts its own server ([`Postgres::start`], about a second),
//! stopped when the test ends, failing or not.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flotilla_api::coordinator::{Change, ChangeKind};
use flotilla_testkit::postgres::Postgres;

use super::postgres::PgConn;
use super::*;
use crate::pm::{self, ChangeNotice, Event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_suite() {
    let pg = Postgres::start();
    let url = pg.create_database("suite");
    // Made (its first connection opened) and dropped in async code, the
    // rest on blocking threads: the synchronous client must be fine in both.
    super::tests::suite(Store::postgres(&url, 4).unwrap()).await;
}

/// Values go in by the column's type and come back as they went in.
#[test]
fn values_round_trip_by_column_type() {
    let pg = Postgres::start();
    let url = pg.create_database("values");
    let mut c = PgConn::connect(&url).unwrap();
    c.batch(
        "CREATE TABLE v (i8 BIGINT, i4 INTEGER, i2 SMALLINT, b BOOLEAN, t TEXT, vc VARCHAR(8), bp CHAR(3), by BYTEA,
         n NUMERIC)",
    )
    .unwrap();
    let ins = "INSERT INTO v (i8, i4, i2, b, t, vc, bp, by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
    let row = vec![
        Value::Int(1 << 40),
        Value::Int(-7),
        Value::Int(300),
        Value::Int(1),
        Value::Text("héllo".into()),
        Value::Text("short".into()),
        Value::Text("abc".into()),
        Value::Blob(vec![0, 255, 10]),
    ];
    assert_eq!(c.execute(ins, &row).unwrap(), 1);
    assert_eq!(
        c.execute(
            ins,
            &[Value::Null, Value::Null, Value::Null, Value::Null, Value::Null, Value::Null, Value::Null, Value::Null]
        )
        .unwrap(),
        1
    );
    let got = c.query("SELECT i8, i4, i2, b, t, vc, bp, by FROM v ORDER BY i8 NULLS LAST", &[]).unwrap();
    assert_eq!(got[0], row);
    assert_eq!(got[1], vec![Value::Null; 8]);
    // An integer as text where the server wants text; the same statement
    // twice (prepared once).
    for _ in 0..2 {
        let r = c.query("SELECT t FROM v WHERE $1::TEXT = '42' AND t IS NOT NULL", &[Value::Int(42)]).unwrap();
        assert_eq!(r, vec![vec![Value::Text("héllo".into())]]);
    }
    // Narrowing is checked.
    let e = c.execute(
        ins,
        &[
            Value::Null,
            Value::Int(1 << 40),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ],
    );
    assert!(matches!(e, Err(SqlError::Postgres(_))), "{e:?}");
    let e = c.execute(
        ins,
        &[
            Value::Text("x".into()),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ],
    );
    assert!(matches!(&e, Err(SqlError::Postgres(m)) if m.contains("cannot send text as int8")), "{e:?}");
    // A type the store does not read is an error naming the column.
    c.execute("INSERT INTO v (n) VALUES (1.5)", &[]).unwrap();
    let e = c.query("SELECT n FROM v WHERE n IS NOT NULL", &[]);
    assert!(matches!(&e, Err(SqlError::Type(m)) if m.contains("column n") && m.contains("numeric")), "{e:?}");
    // COUNT(*) is BIGINT, length() INTEGER.
    let r = c.query("SELECT COUNT(*), length('abc') FROM v", &[]).unwrap();
    assert_eq!(r, vec![vec![Value::Int(3), Value::Int(3)]]);
}

/// Serialisation failures and deadlocks are conflicts to retry; other
/// errors carry the SQLSTATE and the server's message, and the
/// transaction can be rolled back and the connection reused.
#[test]
fn errors_are_mapped() {
    let pg = Postgres::start();
    let url = pg.create_database("errors");
    let mut c = PgConn::connect(&url).unwrap();
    for code in ["40001", "40P01"] {
        let e = c.execute(&format!("DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '{code}'; END $$"), &[]);
        assert!(matches!(e, Err(SqlError::Conflict)), "{code}: {e:?}");
    }
    c.batch("CREATE TABLE u (k TEXT PRIMARY KEY)").unwrap();
    c.begin().unwrap();
    c.execute("INSERT INTO u (k) VALUES ($1)", &["a".into()]).unwrap();
    let e = c.execute("INSERT INTO u (k) VALUES ($1)", &["a".into()]);
    assert!(matches!(&e, Err(SqlError::Postgres(m)) if m.starts_with("23505") && m.contains("u_pkey")), "{e:?}");
    c.rollback().unwrap();
    assert_eq!(c.query("SELECT COUNT(*) FROM u", &[]).unwrap(), vec![vec![Value::Int(0)]]);
}

/// A failed connection names where it went, never the password.
#[test]
fn connect_errors_name_the_server_not_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let Err(SqlError::Postgres(m)) = PgConn::connect(&format!("postgres://flo:hunter2@127.0.0.1:{port}/db")) else {
        panic!("connected to a closed port")
    };
    assert!(m.contains(&format!("127.0.0.1:{port}")), "{m}");
    assert!(!m.contains("hunter2"), "{m}");
    let Err(SqlError::Postgres(m)) =
        PgConn::connect(&format!("host=127.0.0.1 port={port} user=flo password=hunter2 dbname=db"))
    else {
        panic!("connected to a closed port")
    };
    assert!(m.contains(&format!("127.0.0.1:{port}")) && !m.contains("hunter2"), "{m}");
    let Err(SqlError::Postgres(m)) = PgConn::connect("postgres://flo:hunter2@127.0.0.1:notaport/db") else {
        panic!("parsed a bad port")
    };
    assert!(!m.contains("hunter2"), "{m}");
}

/// A server that takes TLS only: `verify-full` with its CA connects and
/// the session is encrypted; a client that trusts another CA, a name the
/// certificate does not hold, or a plain connection is refused, saying why.
#[test]
fn tls_to_postgres_is_verified_as_sslmode_asks() {
    let pki = flotilla_testkit::pki::Pki::new();
    let pg = Postgres::start_tls_on("127.0.0.1", &pki);
    pg.create_database("tls");
    let url = pg.url_verified("tls");
    let mut c = PgConn::connect(&url).unwrap();
    let ssl = c.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).unwrap();
    assert_eq!(ssl, vec![vec![Value::Int(1)]], "the session is encrypted");
    // The store's own LISTEN connection and pool go the same way.
    let store = Store::postgres(&url, 2).unwrap();
    assert!(store.listen().is_some());

    let other = flotilla_testkit::pki::Pki::new();
    let wrong_ca = format!("{}?sslmode=verify-full&sslrootcert={}", pg.url_of("tls"), other.ca().display());
    let Err(SqlError::Postgres(m)) = PgConn::connect(&wrong_ca) else { panic!("trusted a stranger's CA") };
    assert!(m.contains("certificate") && m.contains("127.0.0.1"), "{m}");

    // The certificate names 127.0.0.1, not localhost: verify-full refuses
    // the name, verify-ca takes the chain alone.
    let by_name = |mode: &str| {
        format!("postgres://postgres@localhost:{}/tls?sslmode={mode}&sslrootcert={}", pg.port(), pki.ca().display())
    };
    let Err(SqlError::Postgres(m)) = PgConn::connect(&by_name("verify-full")) else {
        panic!("verify-full took a certificate for another name")
    };
    assert!(m.contains("certificate"), "{m}");
    PgConn::connect(&by_name("verify-ca")).unwrap();

    let Err(SqlError::Postgres(m)) = PgConn::connect(&format!("{}?sslmode=disable", pg.url_of("tls"))) else {
        panic!("a plain connection got past hostssl")
    };
    assert!(m.contains("pg_hba.conf") || m.contains("encryption"), "{m}");
}

/// Coordinators starting at once on an empty database all get the schema
/// (`CREATE … IF NOT EXISTS` racing another session's uncommitted CREATE).
#[test]
fn stores_started_at_once_share_one_schema() {
    let pg = Postgres::start();
    let url = pg.create_database("schema_race");
    let n = 4;
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                Store::postgres(&url, 1).map(|_| ())
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
}

const PROJECT: &str = "race";
const SENDERS: usize = 4;
const CHANGES: usize = 100;
/// Long enough for a loaded CI machine; the test takes about a second.
const RACE_DEADLINE: Duration = Duration::from_secs(40);

fn sha(i: usize) -> String {
    format!("{i:040x}")
}

fn notice(i: usize) -> Event {
    Event::ChangesUpdated {
        changes: vec![ChangeNotice {
            change: Change {
                id: format!("main@{}", sha(i)),
                kind: ChangeKind::Branch,
                rev: sha(i),
                branch: Some("main".into()),
                subject: format!("change {i}"),
                version: 1,
            },
            config_hash: "h1".into(),
        }],
    }
}

/// What one coordinator saw.
#[derive(Debug, Default)]
struct Tally {
    commits: usize,
    /// `commit_step` found the eversion moved: another step won.
    lost: usize,
    created: usize,
    existing: usize,
    /// `SqlError::Conflict` (deadlock, serialisation failure), retried.
    conflicts: usize,
}

/// Retries a store call that hit a conflict; any other error fails the test.
fn conflict<T>(what: &str, r: Result<T, StoreError>, tally: &mut Tally) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(StoreError::Sql(SqlError::Conflict)) => {
            tally.conflicts += 1;
            None
        }
        Err(e) => panic!("{what}: {e:?} ({})", chain(&e)),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// One coordinator's driver: load, step, commit, carry out the outbox (its
/// own rows and the other's, on purpose), until the senders are done and
/// nothing is left.
async fn coordinate(
    s: Store,
    name: &'static str,
    senders_left: Arc<AtomicUsize>,
    both: Arc<tokio::sync::Barrier>,
) -> Tally {
    let mut t = Tally::default();
    let deadline = Instant::now() + RACE_DEADLINE;

    // Contention for certain, not by luck: both load the same eversion
    // before either commits; exactly one of the two commits.
    let (state, ev, events) = loop {
        let loaded = s.load(PROJECT).await.unwrap();
        if !loaded.2.is_empty() {
            break loaded;
        }
        assert!(Instant::now() < deadline, "{name}: no event arrived");
        tokio::task::yield_now().await;
    };
    both.wait().await;
    let out = pm::step(&state, &events, "main");
    match conflict(name, s.commit_step(PROJECT, ev, &out).await, &mut t) {
        Some(Some(_)) => t.commits += 1,
        Some(None) => t.lost += 1,
        None => {}
    }

    loop {
        assert!(Instant::now() < deadline, "{name}: not done after {RACE_DEADLINE:?}: {t:?}");
        // Read before the box: every event of a finished sender is in it.
        let senders_done = senders_left.load(Ordering::SeqCst) == 0;
        let (state, ev, events) = s.load(PROJECT).await.unwrap();
        if !events.is_empty() {
            let out = pm::step(&state, &events, "main");
            match conflict(name, s.commit_step(PROJECT, ev, &out).await, &mut t) {
                Some(Some(_)) => t.commits += 1,
                Some(None) => t.lost += 1,
                None => {}
            }
        }
        let outbox = s.outbox(PROJECT).await.unwrap();
        for (id, action) in &outbox {
            let build = vec![NewBuild { builder: "linux-amd64".into(), spec: "{}".into() }];
            match conflict(name, s.create_run(*id, PROJECT, action, build, None).await, &mut t) {
                Some(Created::Run(_)) => t.created += 1,
                Some(Created::Existing(_)) => t.existing += 1,
                Some(Created::Refused(why)) => panic!("{name}: run creation refused: {why}"),
                None => {}
            }
        }
        // Done only after a round that found nothing: whatever the other
        // coordinator still has in flight, it finishes itself.
        if senders_done && events.is_empty() && outbox.is_empty() {
            return t;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_never_lose_an_event_or_create_a_run_twice() {
    let started = Instant::now();
    let pg = Postgres::start();
    let url = pg.create_database("race");
    // Two pools, as two coordinator processes would have.
    let a = Store::postgres(&url, 4).unwrap();
    let b = Store::postgres(&url, 4).unwrap();
    race_project(&a).await;

    // Each change is announced twice, by two different senders (a poller
    // and a webhook, on either coordinator); pokes in between.
    let senders_left = Arc::new(AtomicUsize::new(SENDERS));
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let store = if s % 2 == 0 { a.clone() } else { b.clone() };
        let left = senders_left.clone();
        senders.push(tokio::spawn(async move {
            for i in (0..CHANGES).filter(|i| i % SENDERS == s || (i + 1) % SENDERS == s) {
                assert!(store.send(PROJECT, &format!("c:{}:{s}", sha(i)), &notice(i)).await.unwrap());
                if i % 10 == s {
                    store.send(PROJECT, &format!("poke:{s}:{i}"), &Event::Poke).await.unwrap();
                }
            }
            left.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    let both = Arc::new(tokio::sync::Barrier::new(2));
    let ca = tokio::spawn(coordinate(a.clone(), "a", senders_left.clone(), both.clone()));
    let cb = tokio::spawn(coordinate(b.clone(), "b", senders_left.clone(), both));
    for s in senders {
        s.await.unwrap();
    }
    let (ta, tb) = (ca.await.unwrap(), cb.await.unwrap());

    // Exactly one run per change.
    let runs = a.runs(Some(PROJECT.into()), 1000, None).await.unwrap();
    assert_eq!(runs.len(), CHANGES, "a: {ta:?}, b: {tb:?}");
    let by_change: BTreeMap<String, u64> = runs.iter().map(|r| (r.change.id.clone(), r.id)).collect();
    assert_eq!(by_change.len(), CHANGES, "a change got two runs");
    let want: BTreeSet<String> = (0..CHANGES).map(|i| format!("main@{}", sha(i))).collect();
    assert_eq!(by_change.keys().cloned().collect::<BTreeSet<_>>(), want);
    assert!(runs.iter().all(|r| r.builds.len() == 1), "one build per run");
    assert_eq!(ta.created + tb.created, CHANGES, "a: {ta:?}, b: {tb:?}");

    // The manager heard of every run, and nothing is left over.
    let (state, eversion, events) = a.load(PROJECT).await.unwrap();
    assert!(events.is_empty(), "{events:?}");
    assert!(a.outbox(PROJECT).await.unwrap().is_empty());
    let tracked: BTreeMap<String, Option<u64>> = state.changes.iter().map(|(k, f)| (k.clone(), f.run)).collect();
    assert_eq!(tracked, by_change.iter().map(|(k, v)| (k.clone(), Some(*v))).collect::<BTreeMap<_, _>>());

    // One log row per committed step, no gap.
    let log = a.project_log(PROJECT, 100_000).await.unwrap();
    let mut versions: Vec<u64> = log.iter().map(|l| l.eversion).collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=eversion).collect::<Vec<_>>());
    assert_eq!((ta.commits + tb.commits) as u64, eversion, "a: {ta:?}, b: {tb:?}");

    assert!(ta.lost + tb.lost >= 1, "the coordinators never raced: a: {ta:?}, b: {tb:?}");
    eprintln!("a: {ta:?}\nb: {tb:?}\neversion {eversion}, {:?}", started.elapsed());
}

/// Two builds of a run finishing at the same moment, from two connections:
/// the run finishes every time (each finish once saw the other build still
/// running, and neither finished the run, before the run's row was locked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_finishing_at_once_finish_their_run() {
    const RUNS: usize = 30;
    let pg = Postgres::start();
    let url = pg.create_database("finish_race");
    let (a, b) = (Store::postgres(&url, 4).unwrap(), Store::postgres(&url, 4).unwrap());
    let runs = two_build_runs(&a, RUNS).await;
    assert_eq!(runs.len(), RUNS);
    for q in a.queue(1000).await.unwrap() {
        assert!(a.claim(q.id, "me", "n").await.unwrap());
    }
    for run in &runs {
        let ids: Vec<u64> = a.run(*run).await.unwrap().unwrap().builds.iter().map(|b| b.id).collect();
        let (x, y) = tokio::join!(
            a.finish_build(ids[0], RunState::Passed, None),
            b.finish_build(ids[1], RunState::Passed, None)
        );
        let finished = [x.unwrap(), y.unwrap()];
        assert_eq!(finished.iter().flatten().count(), 1, "run {run}: exactly one finish ends the run: {finished:?}");
        assert_eq!(a.run(*run).await.unwrap().unwrap().state, RunState::Passed, "run {run}");
    }
}

/// `n` runs of two queued builds (`one`, `two`) each in project PROJECT.
async fn two_build_runs(a: &Store, n: usize) -> Vec<u64> {
    race_project(a).await;
    let cfg = Event::UpdateConfig {
        config: pm::ConfigRef { hash: "h1".into(), branches: vec!["main".into()], try_enabled: true },
    };
    a.send(PROJECT, "cfg:h1", &cfg).await.unwrap();
    for i in 0..n {
        a.send(PROJECT, &format!("c:{i}"), &notice(i)).await.unwrap();
    }
    let (state, ev, events) = a.load(PROJECT).await.unwrap();
    let out = pm::step(&state, &events, "main");
    a.commit_step(PROJECT, ev, &out).await.unwrap().expect("committed");
    let mut runs = Vec::new();
    for (oid, action) in a.outbox(PROJECT).await.unwrap() {
        let builds = ["one", "two"].map(|n| NewBuild { builder: n.into(), spec: "{}".into() }).to_vec();
        match a.create_run(oid, PROJECT, &action, builds, None).await.unwrap() {
            Created::Run(id) => runs.push(id),
            other => panic!("{other:?}"),
        }
    }
    runs
}

/// Two coordinators on one database claim builds for the same node at
/// the same moment, with room for one: exactly one gets it, every time,
/// and a finished build gives its room back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_never_take_a_nodes_last_room_twice() {
    const ROUNDS: usize = 30;
    let pg = Postgres::start();
    let url = pg.create_database("last_slot");
    let (a, b) = (Store::postgres(&url, 4).unwrap(), Store::postgres(&url, 4).unwrap());
    let runs = two_build_runs(&a, ROUNDS).await;
    let room = Reservation { millicpus: 1000, memory_bytes: 1 << 30, node_millicpus: 1500, node_memory_bytes: 4 << 30 };
    for run in &runs {
        let ids: Vec<u64> = a.run(*run).await.unwrap().unwrap().builds.iter().map(|b| b.id).collect();
        let (x, y) = tokio::join!(
            a.claim_within(ids[0], "a", "node-1", Some(room), lease()),
            b.claim_within(ids[1], "b", "node-1", Some(room), lease())
        );
        let claims = [x.unwrap(), y.unwrap()];
        assert_eq!(claims.iter().filter(|c| **c == Claim::Claimed).count(), 1, "run {run}: {claims:?}");
        let (won, lost) = if claims[0] == Claim::Claimed { (ids[0], ids[1]) } else { (ids[1], ids[0]) };
        assert_eq!(
            a.claim_within(lost, "a", "node-1", Some(room), lease()).await.unwrap(),
            Claim::Full { used_millicpus: 1000, used_memory_bytes: 1 << 30 }
        );
        a.finish_build(won, RunState::Passed, None).await.unwrap();
        assert_eq!(
            b.claim_within(lost, "b", "node-1", Some(room), lease()).await.unwrap(),
            Claim::Claimed,
            "room given back"
        );
        a.finish_build(lost, RunState::Passed, None).await.unwrap();
    }
}

fn lease() -> Timestamp {
    Timestamp::now().plus(Duration::from_secs(60))
}

/// Three coordinators adopt the lapsed builds of a fourth at the same
/// moment: each build is adopted exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_build_is_adopted_by_exactly_one_peer() {
    let pg = Postgres::start();
    let url = pg.create_database("adopt");
    let stores: Vec<Store> = (0..3).map(|_| Store::postgres(&url, 2).unwrap()).collect();
    let runs = two_build_runs(&stores[0], 10).await;
    let mut ids = Vec::new();
    for run in &runs {
        for b in stores[0].run(*run).await.unwrap().unwrap().builds {
            let past = Timestamp::now();
            assert_eq!(stores[0].claim_within(b.id, "dead", "n", None, past).await.unwrap(), Claim::Claimed);
            ids.push(b.id);
        }
    }
    let after = Timestamp::now().plus(Duration::from_millis(5));
    let (x, y, z) = tokio::join!(
        stores[0].adopt_lapsed("a", after, lease(), 100),
        stores[1].adopt_lapsed("b", after, lease(), 100),
        stores[2].adopt_lapsed("c", after, lease(), 100),
    );
    let mut all: Vec<u64> = [x.unwrap(), y.unwrap(), z.unwrap()]
        .concat()
        .into_iter()
        .map(|(id, was)| {
            assert_eq!(was.as_deref(), Some("dead"));
            id
        })
        .collect();
    all.sort();
    assert_eq!(all, ids, "every lapsed build adopted exactly once");
}

/// Adds PROJECT, the project the races run in.
async fn race_project(a: &Store) {
    a.add_project(NewProject {
        name: PROJECT.into(),
        repo: "/src/race".into(),
        branch: "main".into(),
        poll_interval_ms: 10_000,
        webhook_secret: None,
    })
    .await
    .unwrap();
}

/// What one coordinator commits reaches another's `listen` as it commits:
/// events for a project, queued builds, a cancel; a listener whose
/// connection is cut is back with an empty note (look at everything).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_hear_what_another_coordinator_commits() {
    let pg = Postgres::start();
    let url = format!("{}?application_name=listener", pg.create_database("notes"));
    let (a, b) = (Store::postgres(&url, 2).unwrap(), Store::postgres(&pg.url_of("notes"), 2).unwrap());
    let mut notes = a.listen().expect("PostgreSQL listens");
    let next = |notes: &mut tokio::sync::mpsc::UnboundedReceiver<String>| {
        let got = notes.try_recv();
        got.ok()
    };
    let hear = async |notes: &mut tokio::sync::mpsc::UnboundedReceiver<String>, want: &str| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, notes.recv()).await {
                Ok(Some(n)) if n == want => return,
                Ok(Some(_)) => {}
                other => panic!("no note {want:?}: {other:?}"),
            }
        }
    };
    hear(&mut notes, "").await;
    let runs = two_build_runs(&b, 1).await;
    hear(&mut notes, &format!("{NOTE_BOX}{PROJECT}")).await;
    hear(&mut notes, NOTE_QUEUE).await;
    let build = b.run(runs[0]).await.unwrap().unwrap().builds[0].id;
    assert!(b.claim(build, "me", "n").await.unwrap());
    while next(&mut notes).is_some() {}
    b.cancel(None, Some(build)).await.unwrap();
    hear(&mut notes, NOTE_CANCEL).await;
    // Its connection cut: it comes back, says so, and hears on.
    assert!(pg.cut_connections("listener") >= 1);
    hear(&mut notes, "").await;
    b.finish_build(build, RunState::Canceled, None).await.unwrap();
    hear(&mut notes, NOTE_QUEUE).await;
}
