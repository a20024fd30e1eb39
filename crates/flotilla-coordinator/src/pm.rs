//! The project manager's pure core (seed 003, LUCI CV's `prjmanager`).
//!
//! [`step`] takes the project's state and the events listed from its box
//! and returns the new state, the actions to carry out and the reasons for
//! the project log. It does no I/O, reads no clock and never fails: the
//! [`driver`](crate::driver) loads, calls it and commits the result in one
//! transaction that checks the state's `eversion`.
//!
//! Superseded events are dropped before the handlers run
//! ([`prepare`]): only the newest config update and one poke count, and of
//! several notices of one change only its highest version. Every listed
//! event is consumed, used or not, so the box never grows with stale ones.
//!
//! Handlers run in a fixed order so a batch means the same thing however
//! its events interleaved: config, then changes, then runs created, then
//! runs finished, then the poke.

use std::collections::BTreeMap;

use flotilla_api::coordinator::{Change, ChangeKind, RunState};
use serde::{Deserialize, Serialize};

/// What the manager remembers between steps. Small on purpose: only the
/// changes in flight (waiting for a run, or with a run not yet finished).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The config in force (the watched branch's `flotilla.toml`).
    #[serde(default)]
    pub config: Option<ConfigRef>,
    /// Changes in flight, by change id.
    #[serde(default)]
    pub changes: BTreeMap<String, InFlight>,
}

/// The parts of the project config the manager decides with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRef {
    pub hash: String,
    /// Watched branches (never empty: the project's branch by default).
    pub branches: Vec<String>,
    pub try_enabled: bool,
}

/// A change the manager has asked a run for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub change: Change,
    /// Hash of the `flotilla.toml` at the change's revision: its builders.
    pub config_hash: String,
    /// Set once the run exists.
    #[serde(default)]
    pub run: Option<u64>,
}

/// A notice that a change exists, with the config at its revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeNotice {
    pub change: Change,
    pub config_hash: String,
}

/// What notifiers put in a project's event box.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// New or updated changes (the poller, a webhook, `try`).
    ChangesUpdated { changes: Vec<ChangeNotice> },
    /// The run asked for by `op_id` exists (run creation sends this in its
    /// own transaction).
    RunCreated { change_id: String, run_id: u64 },
    /// A run reached a final state.
    RunFinished { run_id: u64, state: RunState },
    /// Look again (after a refused run creation, at start-up, by hand).
    Poke,
    /// The project config changed.
    UpdateConfig { config: ConfigRef },
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::ChangesUpdated { .. } => "changes_updated",
            Event::RunCreated { .. } => "run_created",
            Event::RunFinished { .. } => "run_finished",
            Event::Poke => "poke",
            Event::UpdateConfig { .. } => "update_config",
        }
    }
}

/// An event as listed from the box: its idempotent id and body.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub id: String,
    pub event: Event,
}

/// A side effect, recorded in the outbox in the step's transaction and
/// carried out after the commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Create the run for `change`, idempotently by `op_id`, only if the
    /// project is still enabled with config `project_config` in force.
    CreateRun { op_id: String, change: Change, config_hash: String, project_config: String },
}

/// What a step decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub state: State,
    pub actions: Vec<Action>,
    /// Ids of every listed event: all are popped in the transaction.
    pub consumed: Vec<String>,
    /// For the project log.
    pub reasons: Vec<String>,
    /// The config hash to write to the offload record, when it changed.
    pub new_config: Option<String>,
}

impl Outcome {
    /// Whether the step changed anything worth a transaction beyond popping
    /// events (the driver still commits to pop them).
    pub fn is_noop(&self) -> bool {
        self.actions.is_empty() && self.new_config.is_none()
    }
}

/// The operation id of a change's run: the same change at the same version
/// never gets a second run, however often it is announced.
pub fn op_id(change: &Change) -> String {
    format!("{}@v{}", change.id, change.version)
}

/// The events that still count after superseded ones are dropped.
#[derive(Debug, Default)]
struct Prepared {
    config: Option<ConfigRef>,
    /// In the order they were first announced (a push's commits oldest
    /// first), so runs are created, and numbered, in that order.
    changes: Vec<ChangeNotice>,
    created: Vec<(String, u64)>,
    finished: Vec<(u64, RunState)>,
    poke: bool,
    dropped: usize,
}

/// Drops superseded events (LUCI's `PrepareMutation`): the last config
/// update listed wins, pokes collapse to one, and per change only the
/// highest version counts.
fn prepare(events: &[Listed]) -> Prepared {
    let mut p = Prepared::default();
    for l in events {
        match &l.event {
            Event::UpdateConfig { config } => {
                if p.config.replace(config.clone()).is_some() {
                    p.dropped += 1;
                }
            }
            Event::Poke => {
                if p.poke {
                    p.dropped += 1;
                }
                p.poke = true;
            }
            Event::ChangesUpdated { changes } => {
                for n in changes {
                    match p.changes.iter_mut().find(|o| o.change.id == n.change.id) {
                        Some(old) => {
                            p.dropped += 1;
                            if old.change.version < n.change.version {
                                *old = n.clone();
                            }
                        }
                        None => p.changes.push(n.clone()),
                    }
                }
            }
            Event::RunCreated { change_id, run_id } => p.created.push((change_id.clone(), *run_id)),
            Event::RunFinished { run_id, state } => p.finished.push((*run_id, *state)),
        }
    }
    p
}

/// One step of the project manager. `default_branch` is the branch given
/// at `project add`, watched while no config names branches.
pub fn step(state: &State, events: &[Listed], default_branch: &str) -> Outcome {
    let prepared = prepare(events);
    let mut next = state.clone();
    let mut actions = Vec::new();
    let mut reasons = Vec::new();
    let mut new_config = None;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for l in events {
        *counts.entry(l.event.name()).or_default() += 1;
    }
    reasons.push(format!(
        "events: {}{}",
        counts.iter().map(|(k, v)| format!("{k}×{v}")).collect::<Vec<_>>().join(" "),
        if prepared.dropped > 0 { format!(" ({} superseded)", prepared.dropped) } else { String::new() }
    ));

    // Config first: the changes of this batch are judged by it.
    if let Some(c) = prepared.config
        && next.config.as_ref() != Some(&c)
    {
        reasons.push(format!(
            "config {} → {} (branches {:?}, try {})",
            next.config.as_ref().map_or("none", |o| o.hash.as_str()),
            c.hash,
            c.branches,
            c.try_enabled
        ));
        new_config = Some(c.hash.clone());
        next.config = Some(c);
    }
    let (branches, try_enabled, project_config) = match &next.config {
        Some(c) => (c.branches.clone(), c.try_enabled, c.hash.clone()),
        None => (vec![default_branch.to_string()], true, String::new()),
    };

    for notice in prepared.changes {
        let id = notice.change.id.clone();
        let c = &notice.change;
        match next.changes.get(&id) {
            Some(f) if f.change.version >= c.version => {
                reasons.push(format!("{id}: v{} already in flight", c.version));
                continue;
            }
            Some(_) | None => {}
        }
        let wanted = match c.kind {
            ChangeKind::Branch => c.branch.as_ref().is_some_and(|b| branches.contains(b)),
            ChangeKind::Try => try_enabled,
        };
        if !wanted {
            reasons.push(match c.kind {
                ChangeKind::Branch => format!("{id}: branch {:?} is not watched", c.branch.as_deref().unwrap_or("")),
                ChangeKind::Try => format!("{id}: try is disabled in flotilla.toml"),
            });
            continue;
        }
        reasons.push(format!("{id}: v{} of {} → create run", c.version, short(&c.rev)));
        actions.push(Action::CreateRun {
            op_id: op_id(c),
            change: c.clone(),
            config_hash: notice.config_hash.clone(),
            project_config: project_config.clone(),
        });
        next.changes.insert(id, InFlight { change: c.clone(), config_hash: notice.config_hash, run: None });
    }

    for (change_id, run_id) in prepared.created {
        match next.changes.get_mut(&change_id) {
            Some(f) => {
                f.run = Some(run_id);
                reasons.push(format!("{change_id}: run {run_id} created"));
            }
            // Finished (and forgotten) before we heard it was created, or
            // replaced by a newer version: nothing to track.
            None => reasons.push(format!("{change_id}: run {run_id} created, change no longer in flight")),
        }
    }

    for (run_id, st) in prepared.finished {
        let done: Vec<String> =
            next.changes.iter().filter(|(_, f)| f.run == Some(run_id)).map(|(id, _)| id.clone()).collect();
        for id in &done {
            next.changes.remove(id);
        }
        reasons.push(format!("run {run_id} {}: {}", st.as_str(), if done.is_empty() { "not tracked" } else { "done" }));
    }

    if prepared.poke {
        // Ask again for every change still without a run: creation is
        // idempotent by op id, so one that did happen is found, not redone.
        let waiting: Vec<&InFlight> = next.changes.values().filter(|f| f.run.is_none()).collect();
        reasons.push(format!("poke: {} change(s) waiting for a run", waiting.len()));
        for f in waiting {
            let action = Action::CreateRun {
                op_id: op_id(&f.change),
                change: f.change.clone(),
                config_hash: f.config_hash.clone(),
                project_config: project_config.clone(),
            };
            if !actions.contains(&action) {
                actions.push(action);
            }
        }
    }

    Outcome { state: next, actions, consumed: events.iter().map(|l| l.id.clone()).collect(), reasons, new_config }
}

fn short(rev: &str) -> &str {
    &rev[..rev.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(branch: &str, sha: &str) -> ChangeNotice {
        ChangeNotice {
            change: Change {
                id: format!("{branch}@{sha}"),
                kind: ChangeKind::Branch,
                rev: sha.into(),
                branch: Some(branch.into()),
                subject: String::new(),
                version: 1,
            },
            config_hash: "c1".into(),
        }
    }

    fn trying(n: u64, sha: &str, version: u64) -> ChangeNotice {
        ChangeNotice {
            change: Change {
                id: format!("try-{n}"),
                kind: ChangeKind::Try,
                rev: sha.into(),
                branch: None,
                subject: String::new(),
                version,
            },
            config_hash: "c1".into(),
        }
    }

    fn ev(id: &str, event: Event) -> Listed {
        Listed { id: id.into(), event }
    }

    fn config(hash: &str, branches: &[&str], try_enabled: bool) -> Event {
        Event::UpdateConfig {
            config: ConfigRef {
                hash: hash.into(),
                branches: branches.iter().map(|b| b.to_string()).collect(),
                try_enabled,
            },
        }
    }

    fn created_ops(o: &Outcome) -> Vec<String> {
        o.actions
            .iter()
            .map(|a| match a {
                Action::CreateRun { op_id, .. } => op_id.clone(),
            })
            .collect()
    }

    #[test]
    fn a_commit_becomes_a_run_and_leaves_when_it_finishes() {
        let s = State::default();
        let o = step(&s, &[ev("e1", Event::ChangesUpdated { changes: vec![commit("main", "aaa")] })], "main");
        assert_eq!(created_ops(&o), ["main@aaa@v1"]);
        assert_eq!(o.consumed, ["e1"]);
        assert!(o.state.changes["main@aaa"].run.is_none());

        let o2 = step(&o.state, &[ev("e2", Event::RunCreated { change_id: "main@aaa".into(), run_id: 7 })], "main");
        assert!(o2.actions.is_empty());
        assert_eq!(o2.state.changes["main@aaa"].run, Some(7));

        let o3 = step(&o2.state, &[ev("e3", Event::RunFinished { run_id: 7, state: RunState::Passed })], "main");
        assert!(o3.state.changes.is_empty());
        assert!(o3.actions.is_empty());
    }

    #[test]
    fn a_change_already_in_flight_is_not_asked_for_twice() {
        let s =
            step(&State::default(), &[ev("e1", Event::ChangesUpdated { changes: vec![commit("main", "a")] })], "main")
                .state;
        let o = step(&s, &[ev("e2", Event::ChangesUpdated { changes: vec![commit("main", "a")] })], "main");
        assert!(o.actions.is_empty());
        assert_eq!(o.consumed, ["e2"]);
    }

    #[test]
    fn only_the_highest_version_of_a_change_counts() {
        let o = step(
            &State::default(),
            &[
                ev("e1", Event::ChangesUpdated { changes: vec![trying(1, "x", 2)] }),
                ev("e2", Event::ChangesUpdated { changes: vec![trying(1, "y", 1)] }),
                ev("e3", Event::ChangesUpdated { changes: vec![trying(1, "z", 3)] }),
            ],
            "main",
        );
        assert_eq!(created_ops(&o), ["try-1@v3"]);
        assert_eq!(o.state.changes["try-1"].change.rev, "z");
        assert_eq!(o.consumed.len(), 3);
        assert!(o.reasons[0].contains("2 superseded"), "{:?}", o.reasons);
        // A newer version later replaces the one in flight.
        let o2 = step(&o.state, &[ev("e4", Event::ChangesUpdated { changes: vec![trying(1, "w", 4)] })], "main");
        assert_eq!(created_ops(&o2), ["try-1@v4"]);
    }

    #[test]
    fn the_newest_config_wins_and_decides_the_batch() {
        let o = step(
            &State::default(),
            &[
                ev("c1", config("h1", &["main"], true)),
                ev("x", Event::ChangesUpdated { changes: vec![commit("dev", "d1"), commit("main", "m1")] }),
                ev("c2", config("h2", &["dev"], false)),
                ev("t", Event::ChangesUpdated { changes: vec![trying(1, "t", 1)] }),
            ],
            "main",
        );
        assert_eq!(o.new_config.as_deref(), Some("h2"));
        assert_eq!(created_ops(&o), ["dev@d1@v1"], "{:?}", o.reasons);
        assert!(o.reasons.iter().any(|r| r.contains("not watched")));
        assert!(o.reasons.iter().any(|r| r.contains("try is disabled")));
        match &o.actions[0] {
            Action::CreateRun { project_config, .. } => assert_eq!(project_config, "h2"),
        }
        // The same config again is no change.
        let o2 = step(&o.state, &[ev("c3", config("h2", &["dev"], false))], "main");
        assert!(o2.new_config.is_none());
        assert!(o2.is_noop());
    }

    /// Regression: runs were created in SHA order (a map keyed by change
    /// id), so a push's runs were numbered out of commit order.
    #[test]
    fn a_pushs_runs_are_created_in_commit_order() {
        let shas = ["f3", "0a", "c7", "19", "e2"];
        let o = step(
            &State::default(),
            &[ev("x", Event::ChangesUpdated { changes: shas.iter().map(|s| commit("main", s)).collect() })],
            "main",
        );
        let want: Vec<String> = shas.iter().map(|s| format!("main@{s}@v1")).collect();
        assert_eq!(created_ops(&o), want);
    }

    #[test]
    fn without_a_config_the_default_branch_is_watched() {
        let o = step(
            &State::default(),
            &[ev("x", Event::ChangesUpdated { changes: vec![commit("trunk", "a"), commit("other", "b")] })],
            "trunk",
        );
        assert_eq!(created_ops(&o), ["trunk@a@v1"]);
    }

    #[test]
    fn a_poke_asks_again_for_changes_without_a_run_and_pokes_collapse() {
        let s = step(
            &State::default(),
            &[ev("x", Event::ChangesUpdated { changes: vec![commit("main", "a"), commit("main", "b")] })],
            "main",
        )
        .state;
        let s = step(&s, &[ev("y", Event::RunCreated { change_id: "main@a".into(), run_id: 1 })], "main").state;
        let o = step(&s, &[ev("p1", Event::Poke), ev("p2", Event::Poke)], "main");
        assert_eq!(created_ops(&o), ["main@b@v1"]);
        assert_eq!(o.consumed, ["p1", "p2"]);
        assert!(o.reasons[0].contains("1 superseded"));
    }

    #[test]
    fn run_created_and_finished_in_one_batch() {
        let s =
            step(&State::default(), &[ev("x", Event::ChangesUpdated { changes: vec![commit("main", "a")] })], "main")
                .state;
        // Listed finished-first: handlers still apply created before finished.
        let o = step(
            &s,
            &[
                ev("f", Event::RunFinished { run_id: 3, state: RunState::Failed }),
                ev("c", Event::RunCreated { change_id: "main@a".into(), run_id: 3 }),
            ],
            "main",
        );
        assert!(o.state.changes.is_empty(), "{:?}", o.state);
    }

    #[test]
    fn a_run_created_for_a_forgotten_change_is_harmless() {
        let o =
            step(&State::default(), &[ev("c", Event::RunCreated { change_id: "main@zz".into(), run_id: 9 })], "main");
        assert!(o.state.changes.is_empty());
        assert!(o.actions.is_empty());
    }

    #[test]
    fn a_step_is_deterministic_and_does_not_touch_its_input() {
        let s = State::default();
        let events = [
            ev("c1", config("h1", &["main"], true)),
            ev("x", Event::ChangesUpdated { changes: vec![commit("main", "a"), trying(2, "t", 1)] }),
        ];
        let a = step(&s, &events, "main");
        let b = step(&s, &events, "main");
        assert_eq!(a, b);
        assert_eq!(s, State::default());
        // State survives its JSON round trip (it is stored as JSON).
        let back: State = serde_json::from_str(&serde_json::to_string(&a.state).unwrap()).unwrap();
        assert_eq!(back, a.state);
    }
}
