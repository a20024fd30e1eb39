//! The store's suite, run on SQLite here and on a throwaway PostgreSQL in
//! `tests/postgres.rs` (through [`suite`]).

use flotilla_api::coordinator::{BuildFailure, Change, ChangeKind, RunState};

use super::*;
use crate::pm::{self, ChangeNotice, ConfigRef, Event};

fn change(sha: &str) -> Change {
    Change {
        id: format!("main@{sha}"),
        kind: ChangeKind::Branch,
        rev: sha.into(),
        branch: Some("main".into()),
        subject: "s".into(),
        version: 1,
    }
}

fn builds(names: &[&str]) -> Vec<NewBuild> {
    names.iter().map(|n| NewBuild { builder: n.to_string(), spec: "{}".into() }).collect()
}

/// Takes one manager step and commits it; returns the outbox ids.
async fn step_once(s: &Store, project: &str) -> (pm::Outcome, Option<(u64, Vec<u64>)>) {
    let (state, ev, events) = s.load(project).await.unwrap();
    let out = pm::step(&state, &events, "main");
    let committed = s.commit_step(project, ev, &out).await.unwrap();
    (out, committed)
}

/// Everything the coordinator relies on its store for.
pub async fn suite(s: Store) {
    let p = s
        .add_project(NewProject {
            name: "demo".into(),
            repo: "/src/demo".into(),
            branch: "main".into(),
            poll_interval_ms: 10_000,
            webhook_secret: Some("sekrit".into()),
        })
        .await
        .unwrap();
    assert_eq!(p.eversion, 0);
    assert!(p.webhook);
    assert!(matches!(
        s.add_project(NewProject {
            name: "demo".into(),
            repo: "x".into(),
            branch: "main".into(),
            poll_interval_ms: 1,
            webhook_secret: None
        })
        .await,
        Err(StoreError::Exists(_))
    ));

    // Secrets: sealed bytes in, names out, bounded, gone with the project
    // (checked at the end).
    s.put_secret("demo", "B_TOKEN", vec![1, 2, 3], 2).await.unwrap();
    s.put_secret("demo", "A_TOKEN", vec![4], 2).await.unwrap();
    s.put_secret("demo", "A_TOKEN", vec![5, 0, 255], 2).await.unwrap();
    assert!(matches!(s.put_secret("demo", "C_TOKEN", vec![6], 2).await, Err(StoreError::Invalid(_))));
    assert!(matches!(s.put_secret("nope", "A_TOKEN", vec![6], 2).await, Err(StoreError::NotFound(_))));
    let names: Vec<String> = s.secret_names("demo").await.unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["A_TOKEN", "B_TOKEN"]);
    let sealed = s.sealed_secrets("demo", vec!["A_TOKEN".into(), "MISSING".into()]).await.unwrap();
    assert_eq!(sealed, [("A_TOKEN".to_string(), vec![5, 0, 255])]);
    assert!(s.delete_secret("demo", "B_TOKEN").await.unwrap());
    assert!(!s.delete_secret("demo", "B_TOKEN").await.unwrap());

    // Events are idempotent by id while they wait.
    let cfg = Event::UpdateConfig {
        config: ConfigRef { hash: "h1".into(), branches: vec!["main".into()], try_enabled: true },
    };
    assert!(s.send("demo", "cfg:h1", &cfg).await.unwrap());
    assert!(!s.send("demo", "cfg:h1", &cfg).await.unwrap());
    let notice =
        Event::ChangesUpdated { changes: vec![ChangeNotice { change: change("aaa"), config_hash: "h1".into() }] };
    assert!(s.send("demo", "c:aaa", &notice).await.unwrap());

    // A step that lost the race commits nothing.
    let (state, ev, events) = s.load("demo").await.unwrap();
    assert_eq!(events.len(), 2);
    let out = pm::step(&state, &events, "main");
    let (ev2, ids) = s.commit_step("demo", ev, &out).await.unwrap().expect("first commit");
    assert_eq!(ev2, 1);
    assert_eq!(ids.len(), 1);
    assert_eq!(s.commit_step("demo", ev, &out).await.unwrap(), None, "a stale eversion must not commit");
    let (_, _, left) = s.load("demo").await.unwrap();
    assert!(left.is_empty(), "consumed events are popped");
    assert_eq!(s.project("demo").await.unwrap().unwrap().config_hash.as_deref(), Some("h1"));
    assert_eq!(s.project_log("demo", 10).await.unwrap().len(), 1);

    // The outbox holds the action until run creation carries it out, once.
    let outbox = s.outbox("demo").await.unwrap();
    assert_eq!(outbox.len(), 1);
    let (oid, action) = outbox[0].clone();
    let run = match s.create_run(oid, "demo", &action, builds(&["linux-amd64", "linux-386"]), None).await.unwrap() {
        Created::Run(id) => id,
        other => panic!("{other:?}"),
    };
    assert!(s.outbox("demo").await.unwrap().is_empty());
    // The same operation again (a crash before the outbox row was gone, a
    // second coordinator) finds the run instead of making another.
    assert_eq!(s.create_run(oid, "demo", &action, builds(&["x"]), None).await.unwrap(), Created::Existing(run));
    let (o, _) = step_once(&s, "demo").await;
    assert_eq!(o.state.changes["main@aaa"].run, Some(run));

    // Run creation re-checks the offload record.
    let Action::CreateRun { op_id, change: ch, config_hash, .. } = action.clone();
    let stale =
        Action::CreateRun { op_id: format!("{op_id}-x"), change: ch, config_hash, project_config: "old".into() };
    assert!(matches!(s.create_run(999, "demo", &stale, builds(&["a"]), None).await.unwrap(), Created::Refused(_)));
    let (_, _, ev) = s.load("demo").await.unwrap();
    assert!(ev.iter().any(|l| l.event == Event::Poke), "a refusal pokes the manager");
    step_once(&s, "demo").await;

    // Builds: claimed once, logs stored with their offsets.
    let queued = s.queue(10).await.unwrap();
    assert_eq!(queued.len(), 2);
    assert_eq!((queued[0].project.as_str(), queued[0].kind.as_str()), ("demo", "branch"));
    let b = queued[0].id;
    assert!(s.claim(b, "me", "n").await.unwrap());
    let load = s.running_load("me").await.unwrap();
    assert_eq!(load.len(), 1);
    assert_eq!((load[0].0.as_str(), load[0].1.as_deref()), ("demo", Some("n")));
    assert!(!s.claim(b, "other", "n").await.unwrap(), "a build is claimed once");
    assert_eq!(s.running("me").await.unwrap(), vec![b]);
    // Fair shares see every coordinator's builds, not only one's.
    assert!(s.running_load("other").await.unwrap().is_empty());
    assert_eq!(s.running_per_project().await.unwrap(), vec![("demo".to_string(), 1)]);
    s.begin_step(b, 0, "test").await.unwrap();
    assert!(s.append_log(b, "me", 0, b"hello ".to_vec(), u64::MAX).await.unwrap());
    assert!(
        !s.append_log(b, "me", 0, b"hello ".to_vec(), u64::MAX).await.unwrap(),
        "the same bytes are never stored twice"
    );
    assert!(s.append_log(b, "me", 6, b"world\n".to_vec(), u64::MAX).await.unwrap());
    s.begin_step(b, 1, "second").await.unwrap();
    assert!(s.append_log(b, "me", 0, b"two\n".to_vec(), u64::MAX).await.unwrap());
    let log = s.log(b, 0, 1 << 20).await.unwrap().unwrap();
    assert_eq!(log.data, b"hello world\ntwo\n");
    assert_eq!(log.total, 16);
    assert!(!log.done);
    assert_eq!(s.log(b, 8, 3).await.unwrap().unwrap().data, b"rld");
    assert_eq!(s.tail(b, 1).await.unwrap(), ["two"]);
    let w = s.work(b).await.unwrap().unwrap();
    assert_eq!((w.step_index, w.proc_offset, w.log_bytes), (1, 4, 16));
    s.timeline(b, "start_step", Some("test".into())).await.unwrap();

    // Leases: renewed by the owner; once lapsed, adopted by a peer, after
    // which the old owner's renewals, log writes and finish are refused.
    let now = Timestamp::now();
    let soon = now.plus(std::time::Duration::from_secs(30));
    let r = s.renew_leases("me", vec![b], soon).await.unwrap();
    assert_eq!(r, [Renewed { id: b, held: true, cancel_requested: false }]);
    assert!(s.adopt_lapsed("peer", now, soon, 10).await.unwrap().is_empty(), "a live lease is not adopted");
    let later = soon.plus(std::time::Duration::from_secs(1));
    let adopted = s.adopt_lapsed("peer", later, later.plus(std::time::Duration::from_secs(30)), 10).await.unwrap();
    assert_eq!(adopted, [(b, Some("me".to_string()))]);
    assert!(s.adopt_lapsed("third", later, later, 10).await.unwrap().is_empty(), "adopted once");
    assert!(!s.renew_leases("me", vec![b], soon).await.unwrap()[0].held, "adopted: no longer ours");
    assert!(
        matches!(s.append_log(b, "me", 4, b"late\n".to_vec(), u64::MAX).await, Err(StoreError::Fenced(x)) if x == b)
    );
    assert!(matches!(
        s.finish_build_as(b, Some("me"), RunState::Passed, None).await,
        Err(StoreError::Fenced(x)) if x == b
    ));
    assert!(s.build(b).await.unwrap().unwrap().timeline.iter().any(|t| t.event == "adopted"));
    assert_eq!(s.work(b).await.unwrap().unwrap().owner.as_deref(), Some("peer"));
    // The new owner goes on where the old one stopped; a cancel asked for
    // anywhere reaches it with its next renewal.
    assert!(s.append_log(b, "peer", 4, b"more\n".to_vec(), u64::MAX).await.unwrap());
    // The per-build cap: what fits, then a line saying where the log was
    // cut; past it only the offset moves (the step is never held back).
    let total = s.log(b, 0, 0).await.unwrap().unwrap().total;
    let cap = total + 4;
    assert!(s.append_log(b, "peer", 9, b"0123456789".to_vec(), cap).await.unwrap());
    assert!(s.append_log(b, "peer", 19, b"abc".to_vec(), cap).await.unwrap());
    let log = s.log(b, total, 1 << 20).await.unwrap().unwrap();
    let text = String::from_utf8(log.data).unwrap();
    assert!(text.starts_with("0123\n[flotilla: the log is cut here"), "{text}");
    assert!(!text.contains("abc") && !text.contains("45"), "{text}");
    assert_eq!(s.work(b).await.unwrap().unwrap().proc_offset, 22);
    assert!(s.build(b).await.unwrap().unwrap().timeline.iter().any(|t| t.event == "log_cut"));
    // A build's change event carries its newest timeline entry only.
    let change = s.build_change(b).await.unwrap().unwrap();
    let whole = s.build(b).await.unwrap().unwrap();
    assert!(whole.timeline.len() > 1);
    assert_eq!(change.timeline.as_slice(), &whole.timeline[whole.timeline.len() - 1..]);
    assert_eq!((change.state, change.log_bytes), (whole.state, whole.log_bytes));
    s.cancel(None, Some(b)).await.unwrap();
    assert!(s.renew_leases("peer", vec![b], soon).await.unwrap()[0].cancel_requested);
    s.execute_for_test("UPDATE builds SET cancel_requested = 0, owner = 'me' WHERE id = $1", b).await;

    // The run ends with its last build, and the manager hears of it.
    let fail = BuildFailure { step: "test".into(), message: "exit 1".into(), last_lines: vec!["two".into()] };
    assert_eq!(s.finish_build(b, RunState::Failed, Some(fail.clone())).await.unwrap(), None);
    let other = queued[1].id;
    let flagged = s.cancel(Some(run), None).await.unwrap();
    assert!(flagged.is_empty(), "the other build was queued: canceled at once");
    let r = s.run(run).await.unwrap().unwrap();
    assert_eq!(r.state, RunState::Failed);
    assert_eq!(r.builds.iter().find(|x| x.id == other).unwrap().state, RunState::Canceled);
    assert_eq!(r.builds.iter().find(|x| x.id == b).unwrap().failure.as_ref(), Some(&fail));
    let (o, _) = step_once(&s, "demo").await;
    assert!(o.state.changes.is_empty(), "{:?}", o.reasons);

    // A retry is a new attempt and reopens the run.
    let again = s.retry(b, "by hand").await.unwrap();
    assert!(matches!(s.retry(b, "again").await, Err(StoreError::Invalid(_))));
    let r = s.run(run).await.unwrap().unwrap();
    assert_eq!(r.state, RunState::Running);
    let nb = s.build(again).await.unwrap().unwrap();
    assert_eq!((nb.attempt, nb.retry_of, nb.retry_reason.as_deref()), (2, Some(b), Some("by hand")));
    assert!(s.build(b).await.unwrap().unwrap().timeline.iter().any(|t| t.event == "retried"));
    let listed = s.runs(Some("demo".into()), 10, None).await.unwrap();
    assert_eq!(listed[0].builds.len(), 2, "ls shows the latest attempt of each builder");
    assert!(s.claim(again, "me", "n").await.unwrap());
    assert_eq!(s.finish_build(again, RunState::Passed, None).await.unwrap(), Some(RunState::Canceled));
    assert!(s.finish_build(again, RunState::Failed, None).await.unwrap().is_none(), "a final build stays final");

    // Removal: no new runs.
    s.remove_project("demo").await.unwrap();
    let (_, _, _) = s.load("demo").await.unwrap();
    assert_eq!(s.project("demo").await.unwrap().unwrap().status, flotilla_api::coordinator::ProjectStatus::Removed);
    assert!(matches!(s.remove_project("demo").await, Err(StoreError::NotFound(_))));
    assert!(s.secret_names("demo").await.unwrap().is_empty(), "secrets go with their project");
    // Regression: a change waiting for a run of a removed project looped
    // (refuse → poke → the same action → refuse …): refused without a poke.
    let (_, _, before) = s.load("demo").await.unwrap();
    assert!(matches!(s.create_run(998, "demo", &action, builds(&["a"]), None).await.unwrap(), Created::Refused(_)));
    let (_, _, after) = s.load("demo").await.unwrap();
    assert_eq!(after.len(), before.len(), "no poke for a removed project");

    // Added again: a fresh manager state whose eversion (and log) go on.
    let before = s.project_log("demo", 1).await.unwrap()[0].eversion;
    let again = s
        .add_project(NewProject {
            name: "demo".into(),
            repo: "/src/other".into(),
            branch: "trunk".into(),
            poll_interval_ms: 1000,
            webhook_secret: None,
        })
        .await
        .unwrap();
    assert_eq!((again.repo.as_str(), again.webhook, again.eversion), ("/src/other", false, before));
    s.send("demo", "p", &Event::Poke).await.unwrap();
    let (o, committed) = step_once(&s, "demo").await;
    assert!(o.state.changes.is_empty());
    assert_eq!(committed.unwrap().0, before + 1);

    // Retention: finished runs older than the cutoff go with their builds,
    // logs and timelines, a bounded batch per call; nothing newer goes.
    assert_eq!(s.purge_before(Timestamp(1), 10).await.unwrap(), Purged::default(), "nothing is that old");
    let cutoff = Timestamp::now().plus(std::time::Duration::from_secs(1));
    let mut runs_gone = 0;
    loop {
        let p = s.purge_before(cutoff, 1).await.unwrap();
        assert!(p.runs <= 1, "a batch is bounded: {p:?}");
        if p == Purged::default() {
            break;
        }
        runs_gone += p.runs;
    }
    assert!(runs_gone >= 1);
    assert!(s.run(run).await.unwrap().is_none());
    assert!(s.log(b, 0, 10).await.unwrap().is_none());
    assert!(s.project_log("demo", 100).await.unwrap().is_empty(), "the manager's old log rows go too");
}

#[tokio::test]
async fn sqlite_suite() {
    let dir = tempfile::tempdir().unwrap();
    suite(Store::sqlite(&dir.path().join("c.db")).unwrap()).await;
}

#[test]
fn log_chunks_are_compressed_when_that_saves_and_read_back_exact() {
    let text: Vec<u8> = (0..20_000).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
    let (stored, enc) = super::encode_chunk(text.clone());
    assert_eq!(enc, super::ENC_ZSTD);
    assert!(stored.len() < text.len() / 4, "{} of {}", stored.len(), text.len());
    assert_eq!(super::decode_chunk(stored, Some(enc)).unwrap(), text);
    // Bytes that do not compress are kept as they are, and so are a
    // chunk stored before chunks had an encoding.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    let (stored, enc) = super::encode_chunk(noise.clone());
    assert_eq!(enc, 0);
    assert!(stored == noise, "incompressible bytes are kept as they are");
    assert_eq!(super::decode_chunk(noise.clone(), None).unwrap(), noise);
    assert!(super::decode_chunk(b"not zstd".to_vec(), Some(super::ENC_ZSTD)).is_err());
}
