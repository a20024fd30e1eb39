//! The coordinator's thin runtime around the pure parts: one manager task
//! and one poller task per project, a dispatcher that starts builds, an
//! executor per running build, and the event feed.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_api::coordinator::{Queue, QueueBuilder, QueueNode, QueuedBuild as QueuedBuildView, RunState};
use flotilla_api::{EventBody, NodeInfo, Timestamp};
use flotilla_node::NodeClient;
use flotilla_node::events::EventBus;
use tokio::sync::{Notify, watch};

use crate::build::{self, Handle};
use crate::git::Mirror;
use crate::sched::{self, NodeView, Priority, Queued};
use crate::store::{Claim, Store, StoreError};

/// How the coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Where mirrors of project repositories are kept.
    pub data_dir: PathBuf,
    /// This coordinator's stable id: the builds it runs carry it, and it
    /// resumes them after a restart.
    pub owner: String,
    /// Builds run at once, whatever room the nodes have.
    pub max_builds: usize,
    /// More nodes to place builds on, beside the one the coordinator was
    /// started with.
    pub fleet: Vec<NodeClient>,
    /// A node that answers nothing for this long is lost: its running
    /// builds are retried on another node (`retried: node lost`).
    pub node_lost_after: Duration,
    /// How long a running build's lease lasts (see [`Coordinator::lease_keeper`]).
    pub lease: Duration,
    /// Log bytes stored per build (see [`crate::store::Store::append_log`]).
    pub max_log_bytes: u64,
    /// Finished runs and manager log rows older than this are deleted
    /// ([`Coordinator::retention_janitor`]).
    pub retention: Duration,
    /// Where to find more nodes: the name table's `nodes/*`.
    pub discovery: Option<Discovery>,
    /// Seals and opens project secrets ([`crate::secrets`]).
    pub secrets: Arc<crate::secrets::SecretBox>,
}

/// Nodes from the name table: each node publishes `nodes/<id>` with its
/// addresses, and the coordinator joins every one it finds, with no
/// configuration of its own.
#[derive(Clone)]
pub struct Discovery {
    pub names: flotilla_names::NamesClient,
    /// Makes the client of a node found at an address (with the fleet's
    /// token and TLS trust); `None` for an address it cannot use.
    pub connect: Connect,
}

/// Makes a node's client from an address in the name table.
pub type Connect = Arc<dyn Fn(&str) -> Option<NodeClient> + Send + Sync>;

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery").finish_non_exhaustive()
    }
}

/// How often the name table is read for nodes.
const DISCOVER_EVERY: Duration = Duration::from_secs(2);

/// A node of the fleet, known by its address (stable across restarts:
/// builds store it).
struct FleetNode {
    name: String,
    client: NodeClient,
    /// The last describe answer and when it came.
    seen: Option<(Instant, Result<NodeInfo, String>)>,
    /// Since when it has not answered.
    down_since: Option<Instant>,
    /// Found in the name table (not configured), and since when its mount
    /// is gone from there.
    discovered: bool,
    missing_since: Option<Instant>,
    /// Since when the describer's ask of it is under way (each ends within
    /// [`DESCRIBE_TIMEOUT`]); see [`Coordinator::describer`].
    asking: Option<Instant>,
}

impl FleetNode {
    /// Since when it has not answered: the call that got nothing, the ask
    /// still waiting (counted only past a healthy node's answer time, so a
    /// slow answer is not silence), or its mount gone from the name table,
    /// whichever came first; `None` while it answers.
    fn silent_since(&self) -> Option<Instant> {
        let waiting = self.asking.filter(|at| at.elapsed() >= ANSWER_WITHIN);
        [self.down_since, self.missing_since, waiting].into_iter().flatten().min()
    }
}

/// The name a node client is known by: its address.
pub fn node_name(client: &NodeClient) -> String {
    client.http().endpoint().to_string()
}

/// The coordinator.
pub struct Coordinator {
    pub store: Store,
    /// The node it was started with (`--node`), if any: builds placed
    /// before nodes were named ran there. A coordinator may have none and
    /// find every node in the name table.
    pub node: Option<NodeClient>,
    pub events: Arc<EventBus>,
    pub config: CoordinatorConfig,
    /// Counters for `/metrics` ([`crate::metrics`]).
    pub metrics: flotilla_node::metrics::Metrics,
    managers: Mutex<HashMap<String, Arc<Notify>>>,
    pollers: Mutex<HashMap<String, Arc<Notify>>>,
    running: Mutex<HashMap<u64, Arc<Handle>>>,
    logs: Mutex<HashMap<u64, watch::Sender<u64>>>,
    /// A cell per project, filled by the first caller (a clone may take
    /// minutes): the map's lock is held only to find the cell, so one
    /// project's clone never stalls another's builds.
    mirrors: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Arc<Mirror>>>>>,
    dispatch: Notify,
    /// Makes the lease keeper look now (a cancel through a peer).
    lease_tick: Notify,
    /// Rung when a node answers for the first time or again after being
    /// lost: the janitor sweeps at once.
    node_back: Notify,
    fleet: tokio::sync::Mutex<Vec<FleetNode>>,
    queue_view: Mutex<Queue>,
    /// When a build of each builder last started.
    moved: Mutex<HashMap<String, Timestamp>>,
}

/// How long a node's describe answer is trusted.
const DESCRIBE_EVERY: Duration = Duration::from_secs(2);
/// How long a describe may take before the node counts as not answering.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the describer looks for nodes whose answer is stale.
const DESCRIBE_TICK: Duration = Duration::from_millis(250);

/// A describe unanswered for this long counts toward a node's silence
/// (a healthy node answers in milliseconds).
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// Queued builds one scheduling pass looks at (the oldest first).
const QUEUE_LIMIT: u64 = 10_000;

fn spec_need(spec: &str) -> Result<sched::Need, String> {
    serde_json::from_str::<build::BuildSpec>(spec).map_err(|e| format!("the stored build spec is damaged: {e}"))?.need()
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").field("owner", &self.config.owner).finish()
    }
}

impl Coordinator {
    pub fn new(store: Store, node: Option<NodeClient>, config: CoordinatorConfig) -> Arc<Coordinator> {
        let mut fleet: Vec<FleetNode> = Vec::new();
        for c in node.iter().chain(&config.fleet) {
            let name = node_name(c);
            if !fleet.iter().any(|n| n.name == name) {
                fleet.push(FleetNode {
                    name,
                    client: c.clone(),
                    seen: None,
                    down_since: None,
                    discovered: false,
                    missing_since: None,
                    asking: None,
                });
            }
        }
        Arc::new(Coordinator {
            store,
            node,
            events: Arc::new(EventBus::new()),
            metrics: crate::metrics::new(),
            config,
            managers: Mutex::new(HashMap::new()),
            pollers: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            logs: Mutex::new(HashMap::new()),
            mirrors: Mutex::new(HashMap::new()),
            dispatch: Notify::new(),
            lease_tick: Notify::new(),
            node_back: Notify::new(),
            fleet: tokio::sync::Mutex::new(fleet),
            queue_view: Mutex::new(Queue {
                at: Timestamp::now(),
                nodes: Vec::new(),
                waiting: Vec::new(),
                builders: Vec::new(),
            }),
            moved: Mutex::new(HashMap::new()),
        })
    }

    /// Starts every task: a manager and a poller per project, the
    /// dispatcher, and executors for the builds this coordinator was
    /// running when it stopped.
    pub async fn start(self: &Arc<Self>) -> Result<(), StoreError> {
        for p in self.store.projects().await? {
            if p.status == flotilla_api::coordinator::ProjectStatus::Enabled {
                self.watch_project(&p.name);
            }
        }
        for project in self.store.projects_with_work().await? {
            self.wake_manager(&project);
        }
        for id in self.store.running(&self.config.owner).await? {
            tracing::info!(build = id, "resuming a build that was running at the last stop");
            self.spawn_executor(id);
        }
        let me = self.clone();
        tokio::spawn(async move { me.lease_keeper().await });
        if let Some(notes) = self.store.listen() {
            let me = self.clone();
            tokio::spawn(async move { me.hear_peers(notes).await });
        }
        let me = self.clone();
        tokio::spawn(async move { me.retention_janitor().await });
        let me = self.clone();
        tokio::spawn(async move { me.describer().await });
        let me = self.clone();
        tokio::spawn(async move { me.dispatcher().await });
        if let Some(d) = self.config.discovery.clone() {
            let me = self.clone();
            tokio::spawn(async move { me.discover(d).await });
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                build::janitor_pass(&me).await;
                // A node that comes back is swept at once: what ran there
                // for builds retried elsewhere stops now, not a minute on.
                tokio::select! {
                    () = tokio::time::sleep(build::JANITOR_EVERY) => {}
                    () = me.node_back.notified() => {}
                }
            }
        });
        Ok(())
    }

    /// Starts the manager and poller tasks of a project, each unless it
    /// runs already (a poller ends when its project is removed; adding the
    /// project again starts a new one).
    pub fn watch_project(self: &Arc<Self>, project: &str) {
        let manager = {
            let mut m = self.managers.lock().expect("managers");
            match m.get(project) {
                Some(_) => None,
                None => {
                    let n = Arc::new(Notify::new());
                    m.insert(project.to_string(), n.clone());
                    Some(n)
                }
            }
        };
        if let Some(notify) = manager {
            let me = self.clone();
            let name = project.to_string();
            tokio::spawn(async move { crate::driver::manage(me, name, notify).await });
        }
        let poller = {
            let mut p = self.pollers.lock().expect("pollers");
            match p.get(project) {
                Some(_) => None,
                None => {
                    let n = Arc::new(Notify::new());
                    p.insert(project.to_string(), n.clone());
                    Some(n)
                }
            }
        };
        if let Some(poke) = poller {
            let me = self.clone();
            let name = project.to_string();
            tokio::spawn(async move {
                crate::poller::poll_loop(me.clone(), name.clone(), poke.clone()).await;
                let mut p = me.pollers.lock().expect("pollers");
                if p.get(&name).is_some_and(|n| Arc::ptr_eq(n, &poke)) {
                    p.remove(&name);
                }
            });
        }
        self.wake_manager(project);
    }

    /// Wakes a project's manager now. Wake-ups coalesce: many notices
    /// while a step runs make one more step.
    pub fn wake_manager(&self, project: &str) {
        if let Some(n) = self.managers.lock().expect("managers").get(project) {
            n.notify_one();
        }
    }

    /// Makes a project's poller fetch now (a webhook arrived).
    pub fn wake_poller(&self, project: &str) {
        if let Some(n) = self.pollers.lock().expect("pollers").get(project) {
            n.notify_one();
        }
    }

    pub fn wake_dispatcher(&self) {
        self.dispatch.notify_one();
    }

    /// The project's mirror (cloned on first use).
    pub async fn mirror(&self, project: &str) -> Result<Arc<Mirror>, Box<dyn std::error::Error + Send + Sync>> {
        let cell = self.mirrors.lock().expect("mirrors").entry(project.to_string()).or_default().clone();
        let m = cell
            .get_or_try_init(|| async {
                let p = self.store.project(project).await?.ok_or_else(|| format!("project {project} not found"))?;
                let dir = self.config.data_dir.join("repos").join(format!("{project}.git"));
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Arc::new(Mirror::open_or_clone(&dir, &p.repo).await?))
            })
            .await?;
        Ok(m.clone())
    }

    /// Forgets a mirror (the project was removed or re-added).
    pub async fn drop_mirror(&self, project: &str) {
        self.mirrors.lock().expect("mirrors").remove(project);
    }

    /// Places queued builds with the scheduler's pure core and starts
    /// them; woken by run creation, retries and finished builds, and every
    /// second as a backstop.
    async fn dispatcher(self: Arc<Self>) {
        loop {
            if let Err(e) = self.dispatch_pass().await {
                crate::metrics::store_retry(&self.metrics, "dispatcher");
                tracing::error!(error = %crate::error_chain(&e), "a scheduling pass failed");
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.dispatch.notified()).await;
        }
    }

    /// Asks every node of the fleet `GET /v1/node` every
    /// [`DESCRIBE_EVERY`], each ask in a task of its own, for ever: callers
    /// read the answers ([`Coordinator::describe_fleet`]) and never wait on
    /// a node, so one cut off the network (which answers nothing, not even
    /// a refusal, for [`DESCRIBE_TIMEOUT`]) holds up no one.
    async fn describer(self: Arc<Self>) {
        loop {
            let due: Vec<(String, NodeClient, Instant)> = {
                let mut fleet = self.fleet.lock().await;
                fleet
                    .iter_mut()
                    .filter(|n| n.asking.is_none())
                    .filter(|n| n.seen.as_ref().is_none_or(|(at, _)| at.elapsed() >= DESCRIBE_EVERY))
                    .map(|n| {
                        let now = Instant::now();
                        n.asking = Some(now);
                        (n.name.clone(), n.client.clone(), now)
                    })
                    .collect()
            };
            for (name, client, started) in due {
                let me = self.clone();
                tokio::spawn(async move {
                    let info = match tokio::time::timeout(DESCRIBE_TIMEOUT, client.info()).await {
                        Ok(r) => r.map_err(|e| crate::error_chain(&e)),
                        Err(_) => Err(format!("no answer within {}s", DESCRIBE_TIMEOUT.as_secs())),
                    };
                    me.described(&name, started, info).await;
                });
            }
            tokio::time::sleep(DESCRIBE_TICK).await;
        }
    }

    /// Records a describe answer (or its failure) of the ask that started
    /// at `started`.
    async fn described(&self, name: &str, started: Instant, info: Result<NodeInfo, String>) {
        let mut fleet = self.fleet.lock().await;
        let Some(n) = fleet.iter_mut().find(|n| n.name == name) else { return };
        n.asking = None;
        let first = n.seen.is_none();
        let mut changed = first;
        match &info {
            Ok(_) => {
                if n.down_since.take().is_some() {
                    tracing::info!(node = %n.name, "a node answers again");
                    self.node_back.notify_one();
                    changed = true;
                } else if first {
                    // The janitor's first look at this node.
                    self.node_back.notify_one();
                }
            }
            Err(e) => {
                if n.down_since.is_none() {
                    tracing::warn!(node = %n.name, error = %e, "a node does not answer");
                    changed = true;
                }
                // Silent since the ask that got nothing began.
                n.down_since.get_or_insert(started);
            }
        }
        n.seen = Some((Instant::now(), info));
        drop(fleet);
        if changed {
            self.wake_dispatcher();
        }
    }

    /// Every node of the fleet as last described (at most
    /// [`DESCRIBE_EVERY`] old, by [`Coordinator::describer`]); no node is
    /// asked here.
    pub async fn describe_fleet(&self) -> Vec<(String, NodeClient, Result<NodeInfo, String>)> {
        let fleet = self.fleet.lock().await;
        fleet
            .iter()
            .map(|n| {
                // A silent node takes no build on the strength of an
                // older answer.
                let info = match (&n.missing_since, n.silent_since(), &n.seen) {
                    (Some(_), _, _) => Err("its mount in the name table expired".to_string()),
                    (None, Some(since), _) => Err(format!(
                        "it has not answered for {}",
                        flotilla_api::units::format_duration(since.elapsed())
                    )),
                    (None, None, Some((_, info))) => info.clone(),
                    (None, None, None) => Err("not described yet".to_string()),
                };
                (n.name.clone(), n.client.clone(), info)
            })
            .collect()
    }

    /// Reads `nodes/*` from the name table for ever, joining new nodes and
    /// marking discovered ones whose mount expired.
    async fn discover(self: Arc<Self>, d: Discovery) {
        let mut failing = false;
        loop {
            match d.names.glob("nodes/*").await {
                Ok(entries) => {
                    failing = false;
                    self.found(entries, &*d.connect).await;
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %crate::error_chain(&e), "reading nodes/* from the name table failed");
                }
                Err(_) => {}
            }
            tokio::time::sleep(DISCOVER_EVERY).await;
        }
    }

    async fn found(
        &self,
        entries: Vec<flotilla_api::names::MountEntry>,
        connect: &(dyn Fn(&str) -> Option<NodeClient> + Send + Sync),
    ) {
        let mut fleet = self.fleet.lock().await;
        let mut present: Vec<String> = Vec::new();
        for e in entries {
            let urls: Vec<&str> = e.servers.iter().map(|s| s.server.as_str()).collect();
            // Named by address, without the certificate pin it may carry.
            let addr = |u: &str| flotilla_agent::http::split_pin(u).0.to_string();
            if let Some(n) = fleet.iter().find(|n| urls.iter().any(|u| addr(u) == n.name)) {
                present.push(n.name.clone());
                continue;
            }
            // A socket on this machine needs no TLS; else the node's TLS address.
            let local = |u: &&&str| u.strip_prefix("unix://").is_some_and(|p| std::path::Path::new(p).exists());
            let pick = urls.iter().find(local).or_else(|| urls.iter().find(|u| u.starts_with("https://")));
            let Some(url) = pick else { continue };
            let Some(client) = connect(url) else { continue };
            let name = addr(url);
            tracing::info!(node = %e.name, address = %name, "a node joined the fleet from the name table");
            present.push(name.clone());
            fleet.push(FleetNode {
                name,
                client,
                seen: None,
                down_since: None,
                discovered: true,
                missing_since: None,
                asking: None,
            });
        }
        for n in fleet.iter_mut().filter(|n| n.discovered) {
            if present.contains(&n.name) {
                if n.missing_since.take().is_some() {
                    tracing::info!(node = %n.name, "a node's mount is back in the name table");
                    self.node_back.notify_one();
                }
            } else if n.missing_since.is_none() {
                tracing::warn!(node = %n.name, "a node's mount in the name table expired");
                n.missing_since = Some(Instant::now());
            }
        }
        drop(fleet);
        self.wake_dispatcher();
    }

    /// The client of the node named `name` (the one the coordinator was
    /// started with when `None`: builds placed before nodes were named).
    pub async fn node_for(&self, name: Option<&str>) -> Option<NodeClient> {
        let Some(name) = name else { return self.node.clone() };
        self.fleet.lock().await.iter().find(|n| n.name == name).map(|n| n.client.clone())
    }

    /// A call to the node named `name` got no answer: it counts as down
    /// from now unless it already did (its next describe answer clears
    /// that). Returns how long it has been down or missing from the table.
    pub async fn node_failed(&self, name: &str) -> Option<Duration> {
        if let Some(n) = self.fleet.lock().await.iter_mut().find(|n| n.name == name) {
            n.down_since.get_or_insert_with(Instant::now);
        }
        self.node_down_for(name).await
    }

    /// How many nodes of the fleet are up, silent (not answering, not yet
    /// lost) and lost, for `/metrics`.
    pub async fn fleet_states(&self) -> [(&'static str, u64); 3] {
        let fleet = self.fleet.lock().await;
        let mut n = [("up", 0), ("silent", 0), ("lost", 0)];
        for f in fleet.iter() {
            let i = match f.silent_since().map(|t| t.elapsed()) {
                None if matches!(f.seen, Some((_, Ok(_)))) => 0,
                Some(d) if d >= self.config.node_lost_after => 2,
                _ => 1,
            };
            n[i].1 += 1;
        }
        n
    }

    /// How long the node named `name` has not answered: since the ask
    /// that got nothing, or the one still waiting for its answer, began;
    /// `None` while it answers.
    pub async fn node_down_for(&self, name: &str) -> Option<Duration> {
        let fleet = self.fleet.lock().await;
        fleet.iter().find(|n| n.name == name)?.silent_since().map(|t| t.elapsed())
    }

    /// One scheduling pass: a snapshot of the node and what runs on it, the
    /// queue, [`sched::place`], then a claim and an executor per placement
    /// while `max_builds` allows; every build left waiting keeps its reason
    /// for `GET /v1/queue`.
    async fn dispatch_pass(self: &Arc<Self>) -> Result<(), StoreError> {
        let queued = self.store.queue(QUEUE_LIMIT).await?;
        let described = self.describe_fleet().await;
        let load = self.store.running_load(&self.config.owner).await?;
        let primary = self.node.as_ref().map(node_name).unwrap_or_default();
        let mut nodes: Vec<NodeView> = described
            .iter()
            .filter_map(|(name, _, info)| info.as_ref().ok().map(|i| sched::view_of(name, i)))
            .collect();
        // Fair shares count every coordinator's running builds (the
        // store's), so a project busy elsewhere waits its turn here too.
        let counts: BTreeMap<String, u64> = self.store.running_per_project().await?.into_iter().collect();
        let mut running_on: HashMap<usize, u64> = HashMap::new();
        // What our running builds hold per node: the node's own count of
        // its sandboxes' limits misses builds whose sandbox is not made yet
        // and builders without limits, so the larger of the two counts.
        let mut ours: Vec<NodeView> = nodes.clone();
        for v in &mut ours {
            (v.used_millicpus, v.used_memory_bytes) = (0, 0);
        }
        for (_, node, spec) in &load {
            let on = node.as_deref().unwrap_or(&primary);
            let Some(i) = nodes.iter().position(|v| v.name == on) else { continue };
            *running_on.entry(i).or_default() += 1;
            if let Ok(need) = spec_need(spec) {
                ours[i].take(&need);
            }
        }
        for (v, o) in nodes.iter_mut().zip(&ours) {
            v.used_millicpus = v.used_millicpus.max(o.used_millicpus);
            v.used_memory_bytes = v.used_memory_bytes.max(o.used_memory_bytes);
        }
        let mut queue = Vec::with_capacity(queued.len());
        let mut damaged = Vec::new();
        for b in &queued {
            match spec_need(&b.spec) {
                Ok(need) => queue.push(Queued {
                    id: b.id,
                    project: b.project.clone(),
                    priority: Priority::of_kind(&b.kind),
                    order: b.run,
                    need,
                }),
                Err(e) => damaged.push((b.id, e)),
            }
        }
        let needs: HashMap<u64, &sched::Need> = queue.iter().map(|q| (q.id, &q.need)).collect();
        let before = nodes.clone();
        let plan = sched::place(&mut nodes, &queue, &counts);
        let mut room = self.config.max_builds.saturating_sub(self.running.lock().expect("running").len());
        let mut reasons: HashMap<u64, String> = plan.waiting.into_iter().map(|w| (w.build, w.reason)).collect();
        // A spec the scheduler cannot read goes to the executor, which
        // fails the build saying why.
        let starts = damaged.iter().map(|(id, _)| (*id, 0)).chain(plan.placements.iter().map(|p| (p.build, p.node)));
        for (id, i) in starts {
            let Some(node) = nodes.get(i) else {
                reasons.insert(id, "no node answers".into());
                continue;
            };
            if room == 0 {
                let max = self.config.max_builds;
                reasons.insert(id, format!("the coordinator runs at most {max} builds at once (--max-builds)"));
                continue;
            }
            let reserve = needs.get(&id).map(|need| crate::store::Reservation {
                millicpus: need.millicpus,
                memory_bytes: need.memory_bytes,
                node_millicpus: node.millicpus,
                node_memory_bytes: node.memory_bytes,
            });
            let lease = Timestamp::now().plus(self.config.lease);
            match self.store.claim_within(id, &self.config.owner, &node.name, reserve, lease).await {
                Ok(Claim::Claimed) => {
                    room -= 1;
                    *running_on.entry(i).or_default() += 1;
                    if let Some(b) = queued.iter().find(|b| b.id == id) {
                        let waited = Timestamp::now().0.saturating_sub(b.created_at);
                        crate::metrics::queue_wait(&self.metrics, &b.kind, Duration::from_millis(waited));
                        self.moved.lock().expect("moved").insert(b.builder.clone(), Timestamp::now());
                    }
                    self.build_changed(id).await;
                    self.spawn_executor(id);
                }
                Ok(Claim::Taken) => {}
                Ok(Claim::Full { used_millicpus, used_memory_bytes }) => {
                    // Another coordinator on this store took the room first.
                    reasons.insert(
                        id,
                        format!(
                            "node {} is full: builds of every coordinator hold {} CPUs and {} there",
                            node.name,
                            used_millicpus as f64 / 1000.0,
                            flotilla_api::units::format_size(used_memory_bytes)
                        ),
                    );
                }
                Err(e) => tracing::error!(build = id, error = %crate::error_chain(&e), "claiming a build failed"),
            }
        }
        if nodes.is_empty()
            && let Some((name, _, Err(e))) = described.first()
        {
            for r in reasons.values_mut() {
                *r = format!("no node answers ({name}: {e})");
            }
        }
        let waiting: Vec<QueuedBuildView> = queued
            .iter()
            .filter_map(|b| {
                reasons.remove(&b.id).map(|reason| QueuedBuildView {
                    build: b.id,
                    run: b.run,
                    project: b.project.clone(),
                    builder: b.builder.clone(),
                    priority: match Priority::of_kind(&b.kind) {
                        Priority::Interactive => "interactive",
                        Priority::Try => "try",
                        Priority::PostSubmit => "post_submit",
                    }
                    .into(),
                    queued_at: Timestamp(b.created_at),
                    reason,
                })
            })
            .collect();
        let mut shown: Vec<QueueNode> = before
            .iter()
            .enumerate()
            .map(|(i, v)| QueueNode {
                name: v.name.clone(),
                up: true,
                error: None,
                platform: format!("{}-{}", sched::go_os(&v.os), sched::go_arch(&v.arch)),
                millicpus: v.millicpus,
                memory_bytes: v.memory_bytes,
                used_millicpus: nodes[i].used_millicpus,
                used_memory_bytes: nodes[i].used_memory_bytes,
                running: running_on.get(&i).copied().unwrap_or(0),
            })
            .collect();
        for (name, _, info) in &described {
            if let Err(e) = info {
                shown.push(QueueNode {
                    name: name.clone(),
                    up: false,
                    error: Some(e.clone()),
                    platform: String::new(),
                    millicpus: 0,
                    memory_bytes: 0,
                    used_millicpus: 0,
                    used_memory_bytes: 0,
                    running: load.iter().filter(|(_, n, _)| n.as_deref().unwrap_or(&primary) == name).count() as u64,
                });
            }
        }
        let mut per: BTreeMap<&str, QueueBuilder> = BTreeMap::new();
        for w in &waiting {
            let e = per.entry(w.builder.as_str()).or_insert_with(|| QueueBuilder {
                builder: w.builder.clone(),
                waiting: 0,
                oldest: w.queued_at,
                newest: w.queued_at,
                last_moved: None,
            });
            e.waiting += 1;
            e.oldest = e.oldest.min(w.queued_at);
            e.newest = e.newest.max(w.queued_at);
        }
        let moved = self.moved.lock().expect("moved").clone();
        let builders = per
            .into_values()
            .map(|mut b| {
                b.last_moved = moved.get(&b.builder).copied();
                b
            })
            .collect();
        *self.queue_view.lock().expect("queue") = Queue { at: Timestamp::now(), nodes: shown, waiting, builders };
        Ok(())
    }

    /// What the last scheduling pass saw and left waiting.
    pub fn queue(&self) -> Queue {
        self.queue_view.lock().expect("queue").clone()
    }

    fn spawn_executor(self: &Arc<Self>, id: u64) {
        let handle = Arc::new(Handle::default());
        {
            let mut r = self.running.lock().expect("running");
            if r.contains_key(&id) {
                return;
            }
            r.insert(id, handle.clone());
        }
        let me = self.clone();
        tokio::spawn(async move { build::execute(me, id, handle).await });
    }

    /// Keeps this coordinator's builds leased and takes over lapsed ones
    /// (Nomad's and Buildkite's "lost agent", with the store as referee).
    ///
    /// Every third of [`CoordinatorConfig::lease`] (at most a second):
    /// 1. the builds whose executors run here are renewed, and only those:
    ///    a build this coordinator owns in the store but no longer runs
    ///    (its executor stopped on a store error) lapses and is adopted
    ///    like any other, by a peer or by this coordinator itself;
    /// 2. an executor whose build was adopted elsewhere meanwhile (this
    ///    coordinator hung or lost the database past its lease) is told to
    ///    stop; the store refuses its writes anyway (fencing);
    /// 3. a cancel asked for through any coordinator reaches the executor;
    /// 4. running builds whose lease lapsed are adopted, each by exactly
    ///    one coordinator, and resumed from their stored offset;
    /// 5. projects added through another coordinator get their manager
    ///    and poller here too;
    /// 6. the manager of every project with events or outbox rows waiting
    ///    is woken: what a coordinator put in a box and died before
    ///    stepping on is taken up by its peers within a second (their
    ///    pollers see nothing new, so nothing else would wake them).
    ///
    /// Times are the coordinators' wall clocks: they must agree to well
    /// within a lease (NTP does).
    pub async fn lease_keeper(self: Arc<Self>) {
        // Often enough that a lapse is seen within a second of it.
        let every = (self.config.lease / 3).min(Duration::from_secs(1));
        loop {
            let now = Timestamp::now();
            let until = now.plus(self.config.lease);
            let mine: Vec<u64> = self.running.lock().expect("running").keys().copied().collect();
            match self.store.renew_leases(&self.config.owner, mine, until).await {
                Ok(renewed) => {
                    let r = self.running.lock().expect("running");
                    for x in renewed {
                        let Some(h) = r.get(&x.id) else { continue };
                        if !x.held {
                            h.fenced.notify_one();
                        } else if x.cancel_requested {
                            h.cancel.notify_one();
                        }
                    }
                }
                Err(e) => {
                    crate::metrics::store_retry(&self.metrics, "lease");
                    let e = crate::error_chain(&e);
                    tracing::warn!(error = %e, "renewing build leases failed");
                }
            }
            match self.store.adopt_lapsed(&self.config.owner, now, until, 100).await {
                Ok(adopted) => {
                    for (id, was) in adopted {
                        self.metrics.add("flotilla_coordinator_lease_adoptions_total", &[], 1.0);
                        tracing::warn!(build = id, from = ?was, "adopted a build whose lease lapsed");
                        self.build_changed(id).await;
                        self.spawn_executor(id);
                    }
                }
                Err(e) => {
                    crate::metrics::store_retry(&self.metrics, "lease");
                    tracing::warn!(error = %crate::error_chain(&e), "adopting lapsed builds failed")
                }
            }
            if let Ok(waiting) = self.store.projects_with_work().await {
                for project in waiting {
                    self.wake_manager(&project);
                }
            }
            if let Ok(projects) = self.store.projects().await {
                for p in projects {
                    let watched = self.pollers.lock().expect("pollers").contains_key(&p.name);
                    if p.status == flotilla_api::coordinator::ProjectStatus::Enabled && !watched {
                        self.watch_project(&p.name);
                    }
                }
            }
            let _ = tokio::time::timeout(every, self.lease_tick.notified()).await;
        }
    }

    /// Acts on what peers on the same PostgreSQL just committed
    /// ([`crate::store::Store::listen`]): their events wake the project's
    /// manager, queued builds or freed room the dispatcher, a cancel the
    /// lease keeper (which delivers it). The lease keeper's once-a-second
    /// look stays the backstop for whatever a lost connection missed.
    async fn hear_peers(self: Arc<Self>, mut notes: tokio::sync::mpsc::UnboundedReceiver<String>) {
        use crate::store::{NOTE_BOX, NOTE_CANCEL, NOTE_QUEUE};
        while let Some(note) = notes.recv().await {
            if let Some(project) = note.strip_prefix(NOTE_BOX) {
                self.wake_manager(project);
            } else if note == NOTE_QUEUE {
                self.wake_dispatcher();
            } else if note == NOTE_CANCEL {
                self.lease_tick.notify_one();
            } else if note.is_empty() {
                self.wake_dispatcher();
                self.lease_tick.notify_one();
            }
        }
    }

    /// Deletes what is older than [`CoordinatorConfig::retention`] at start
    /// and every hour, 100 runs per transaction so no pass holds the store
    /// for long. Several coordinators may run it at once: each deletion
    /// is idempotent.
    pub async fn retention_janitor(self: Arc<Self>) {
        loop {
            let Some(cutoff) = Timestamp::now().0.checked_sub(self.config.retention.as_millis() as u64) else {
                return; // a retention longer than the epoch: nothing ever goes
            };
            let mut total = crate::store::Purged::default();
            loop {
                match self.store.purge_before(Timestamp(cutoff), 100).await {
                    Ok(p) if p == crate::store::Purged::default() => break,
                    Ok(p) => {
                        total.runs += p.runs;
                        total.builds += p.builds;
                        total.pm_log += p.pm_log;
                        total.try_patches += p.try_patches;
                    }
                    Err(e) => {
                        tracing::warn!(error = %crate::error_chain(&e), "retention: deleting old runs failed");
                        break;
                    }
                }
                tokio::task::yield_now().await;
            }
            if total != crate::store::Purged::default() {
                tracing::info!(
                    runs = total.runs,
                    builds = total.builds,
                    pm_log = total.pm_log,
                    try_patches = total.try_patches,
                    "retention: deleted what is older than --retention"
                );
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }

    /// An executor ended: room for the next build.
    pub async fn build_done(&self, id: u64) {
        self.running.lock().expect("running").remove(&id);
        self.logs.lock().expect("logs").remove(&id);
        self.wake_dispatcher();
    }

    /// Asks running builds to stop (their executors record the end).
    pub fn cancel_running(&self, ids: &[u64]) {
        let r = self.running.lock().expect("running");
        for id in ids {
            if let Some(h) = r.get(id) {
                h.cancel.notify_one();
            }
        }
    }

    /// Records a timeline entry and publishes the build.
    pub async fn timeline(&self, id: u64, event: &str, detail: Option<String>) -> Result<(), StoreError> {
        self.store.timeline(id, event, detail).await?;
        self.build_changed(id).await;
        Ok(())
    }

    /// Publishes a build's change: the build with its newest timeline
    /// entry only (see [`crate::store::Store::build_change`]).
    pub async fn build_changed(&self, id: u64) {
        if let Ok(Some(b)) = self.store.build_change(id).await {
            self.events.publish(EventBody::Build { build: Box::new(b) });
        }
    }

    pub async fn run_changed(&self, run_id: u64) {
        if let Ok(Some(r)) = self.store.run(run_id).await {
            self.events.publish(EventBody::Run { run: Box::new(r) });
        }
    }

    /// A build's run finished: publish it and wake its manager (the
    /// `run_finished` event is already in the box).
    pub async fn run_finished(&self, build: u64) {
        if let Ok(Some(b)) = self.store.build(build).await {
            self.run_changed(b.run_id).await;
            self.wake_manager(&b.project);
        }
    }

    /// New log bytes were stored for `id`: wake its followers.
    pub fn log_appended(&self, id: u64) {
        let logs = self.logs.lock().expect("logs");
        if let Some(tx) = logs.get(&id) {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// A receiver that changes whenever `id`'s log grows.
    pub fn log_watch(&self, id: u64) -> watch::Receiver<u64> {
        let mut logs = self.logs.lock().expect("logs");
        logs.entry(id).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// Cancels a run or a build: queued builds end at once, running ones
    /// are stopped by their executors.
    pub async fn cancel(&self, run: Option<u64>, build: Option<u64>) -> Result<(), StoreError> {
        let flagged = self.store.cancel(run, build).await?;
        self.cancel_running(&flagged);
        let run_id = match (run, build) {
            (Some(r), _) => Some(r),
            (None, Some(b)) => self.store.build(b).await?.map(|b| b.run_id),
            (None, None) => None,
        };
        if let Some(r) = run_id
            && let Some(run) = self.store.run(r).await?
        {
            for b in &run.builds {
                self.build_changed(b.id).await;
            }
            if run.state.is_final() {
                self.wake_manager(&run.project);
            }
            self.events.publish(EventBody::Run { run: Box::new(run) });
        }
        Ok(())
    }

    /// Retries every failed or canceled latest build of a run (or one
    /// build), each as a new attempt.
    pub async fn retry(&self, run: Option<u64>, build: Option<u64>) -> Result<Vec<u64>, StoreError> {
        let targets: Vec<u64> = match (run, build) {
            (_, Some(b)) => vec![b],
            (Some(r), None) => {
                let run = self.store.run(r).await?.ok_or_else(|| StoreError::NotFound(format!("run {r}")))?;
                let latest: Vec<u64> = run
                    .builds
                    .iter()
                    .filter(|b| matches!(b.state, RunState::Failed | RunState::Canceled))
                    .filter(|b| !run.builds.iter().any(|o| o.retry_of == Some(b.id)))
                    .map(|b| b.id)
                    .collect();
                if latest.is_empty() {
                    return Err(StoreError::Invalid(format!("run {r} has no failed or canceled build to retry")));
                }
                latest
            }
            (None, None) => Vec::new(),
        };
        let mut new = Vec::new();
        for b in targets {
            new.push(self.store.retry(b, "retried by hand").await?);
        }
        if let Some(first) = new.first()
            && let Ok(Some(b)) = self.store.build(*first).await
        {
            self.run_changed(b.run_id).await;
        }
        self.wake_dispatcher();
        Ok(new)
    }
}
