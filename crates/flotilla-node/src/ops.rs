//! Operations: long requests that answer at once with an id.
//!
//! Each operation is written to the store when it starts, at every step and
//! when it ends, and published on the event feed. A client waits with
//! `GET /v1/operations/{id}?wait=DUR`, also across a node restart: at
//! start-up every operation the previous run left `running` is ended as
//! `failed`, naming the step it was interrupted in, so no waiter hangs on
//! work that will never finish.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_api::{ApiError, ErrorCode, EventBody, Operation, OperationKind, OperationState, Step, Timestamp};
use tokio::sync::watch;

use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// How long finished operations are kept.
pub const RETAIN: Duration = Duration::from_secs(24 * 3600);

/// The longest a single `?wait=` may block.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// The registry of operations.
#[derive(Debug)]
pub struct Operations {
    store: Arc<Store>,
    events: Arc<EventBus>,
    metrics: Arc<Metrics>,
    live: Mutex<HashMap<String, watch::Sender<Operation>>>,
}

fn store_err(e: StoreError) -> ApiError {
    ApiError::internal(format!("recording an operation: {}", flotilla_agent::http::error_chain(&e)))
}

impl Operations {
    /// Loads kept operations; those a previous run left running end failed.
    pub fn open(store: Arc<Store>, events: Arc<EventBus>, metrics: Arc<Metrics>) -> Result<Operations, ApiError> {
        let cutoff = Timestamp::now().0.saturating_sub(RETAIN.as_millis() as u64);
        store.prune_operations(cutoff).map_err(store_err)?;
        let mut live = HashMap::new();
        for mut op in store.load_operations().map_err(store_err)? {
            if op.state == OperationState::Running {
                let at = op.steps.last().map(|s| s.name.clone()).unwrap_or_else(|| "start".into());
                op.state = OperationState::Failed;
                op.finished_at = Some(Timestamp::now());
                op.error = Some(
                    ApiError::new(
                        ErrorCode::Internal,
                        format!("the node restarted while this operation was running (after step `{at}`)"),
                    )
                    .with_details(serde_json::json!({ "step": at, "interrupted": true })),
                );
                op.steps.push(Step { name: "interrupted_by_restart".into(), at: Timestamp::now(), detail: None });
                store.put_operation(&op).map_err(store_err)?;
                tracing::warn!(operation = %op.id, kind = op.kind.as_str(), target = %op.target, "operation interrupted by a node restart");
            }
            let (tx, _) = watch::channel(op.clone());
            live.insert(op.id.clone(), tx);
        }
        Ok(Operations { store, events, metrics, live: Mutex::new(live) })
    }

    /// Starts an operation; it is recorded before anything happens.
    pub fn begin(self: &Arc<Self>, kind: OperationKind, target: &str) -> Result<OpHandle, ApiError> {
        let op = Operation {
            id: format!("op-{}", crate::node::new_id()),
            kind,
            state: OperationState::Running,
            target: target.to_string(),
            created_at: Timestamp::now(),
            finished_at: None,
            steps: vec![],
            error: None,
            result: None,
        };
        self.store.put_operation(&op).map_err(store_err)?;
        let id = op.id.clone();
        self.events.publish(EventBody::Operation { operation: Box::new(op.clone()) });
        let (tx, _) = watch::channel(op);
        self.live.lock().expect("operations").insert(id.clone(), tx);
        Ok(OpHandle { ops: self.clone(), id, started: Instant::now() })
    }

    pub fn get(&self, id: &str) -> Result<Operation, ApiError> {
        self.live
            .lock()
            .expect("operations")
            .get(id)
            .map(|tx| tx.borrow().clone())
            .ok_or_else(|| ApiError::not_found(format!("no operation {id:?}")))
    }

    /// The operation once it is done, or as it is when `wait` has passed.
    pub async fn wait(&self, id: &str, wait: Duration) -> Result<Operation, ApiError> {
        let mut rx = {
            let live = self.live.lock().expect("operations");
            live.get(id).ok_or_else(|| ApiError::not_found(format!("no operation {id:?}")))?.subscribe()
        };
        let _ = tokio::time::timeout(wait.min(MAX_WAIT), rx.wait_for(|op| op.state.is_done())).await;
        let op = rx.borrow().clone();
        Ok(op)
    }

    /// Every operation kept, newest first.
    pub fn list(&self) -> Vec<Operation> {
        let mut v: Vec<Operation> =
            self.live.lock().expect("operations").values().map(|tx| tx.borrow().clone()).collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        v
    }

    /// Forgets finished operations older than [`RETAIN`].
    pub fn prune(&self) {
        let cutoff = Timestamp::now().0.saturating_sub(RETAIN.as_millis() as u64);
        let _ = self.store.prune_operations(cutoff);
        self.live.lock().expect("operations").retain(|_, tx| {
            let op = tx.borrow();
            !op.state.is_done() || op.created_at.0 >= cutoff
        });
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Operation)) {
        let live = self.live.lock().expect("operations");
        let Some(tx) = live.get(id) else { return };
        let mut op = tx.borrow().clone();
        if op.state.is_done() {
            return;
        }
        f(&mut op);
        if let Err(e) = self.store.put_operation(&op) {
            tracing::error!(operation = %id, error = %flotilla_agent::http::error_chain(&e), "recording an operation failed");
        }
        self.events.publish(EventBody::Operation { operation: Box::new(op.clone()) });
        tx.send_replace(op);
    }
}

/// The running side of one operation. Dropping it without finishing ends
/// the operation as failed (a panic or a forgotten path never leaves a
/// waiter hanging).
#[derive(Debug)]
pub struct OpHandle {
    ops: Arc<Operations>,
    id: String,
    started: Instant,
}

impl OpHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The operation as it is now.
    pub fn snapshot(&self) -> Operation {
        self.ops.get(&self.id).expect("a live operation is kept")
    }

    pub fn step(&self, name: &str, detail: Option<String>) {
        let step = Step { name: name.into(), at: Timestamp::now(), detail };
        self.ops.update(&self.id, |op| op.steps.push(step));
    }

    pub fn succeed(self, result: serde_json::Value) {
        self.finish(OperationState::Succeeded, None, Some(result));
    }

    /// Ends the operation failed. When the error does not name its step,
    /// the last step reached is recorded as the one that failed.
    pub fn fail(self, mut err: ApiError) {
        let last = self.snapshot().steps.last().map(|s| s.name.clone());
        let details = err.details.get_or_insert_with(|| serde_json::json!({}));
        if let (Some(map), Some(last)) = (details.as_object_mut(), last)
            && !map.contains_key("step")
        {
            map.insert("step".into(), serde_json::Value::String(last));
        }
        self.finish(OperationState::Failed, Some(err), None);
    }

    fn finish(&self, state: OperationState, error: Option<ApiError>, result: Option<serde_json::Value>) {
        let mut kind = None;
        self.ops.update(&self.id, |op| {
            op.state = state;
            op.finished_at = Some(Timestamp::now());
            op.error = error;
            op.result = result;
            kind = Some(op.kind);
        });
        if let Some(kind) = kind {
            self.ops.metrics.operation_finished(kind.as_str(), state.as_str(), self.started.elapsed());
        }
    }
}

impl Drop for OpHandle {
    fn drop(&mut self) {
        // No-op when already finished (update ignores done operations).
        self.finish(
            OperationState::Failed,
            Some(ApiError::internal("the operation was abandoned without a result (a node bug)")),
            None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(dir: &std::path::Path) -> Arc<Operations> {
        let store = Arc::new(Store::open(&dir.join("node.db")).unwrap());
        Arc::new(Operations::open(store, Arc::new(EventBus::new()), Arc::new(Metrics::default())).unwrap())
    }

    #[tokio::test]
    async fn wait_returns_when_done_and_failure_names_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let ops = ops(dir.path());
        let h = ops.begin(OperationKind::CreateSandbox, "sb1").unwrap();
        let id = h.id().to_string();
        let waiter = {
            let ops = ops.clone();
            let id = id.clone();
            tokio::spawn(async move { ops.wait(&id, Duration::from_secs(30)).await.unwrap() })
        };
        h.step("created", None);
        h.fail(ApiError::internal("boom"));
        let op = waiter.await.unwrap();
        assert_eq!(op.state, OperationState::Failed);
        let err = op.error.unwrap();
        assert_eq!(err.details.unwrap()["step"], "created");
        // A wait on a done operation answers at once.
        let again = ops.wait(&id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(again.state, OperationState::Failed);
    }

    #[tokio::test]
    async fn running_operations_end_failed_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (done, interrupted) = {
            let ops = ops(dir.path());
            let a = ops.begin(OperationKind::CreateSandbox, "a").unwrap();
            let done = a.id().to_string();
            a.succeed(serde_json::json!({"ok": true}));
            let b = ops.begin(OperationKind::ImportImage, "img:1").unwrap();
            b.step("unpacking", None);
            // The node dies: the handle never finishes.
            let interrupted = b.id().to_string();
            std::mem::forget(b);
            (done, interrupted)
        };
        let ops = ops(dir.path());
        assert_eq!(ops.get(&done).unwrap().state, OperationState::Succeeded);
        let op = ops.wait(&interrupted, Duration::from_secs(1)).await.unwrap();
        assert_eq!(op.state, OperationState::Failed);
        let err = op.error.unwrap();
        assert!(err.message.contains("restarted"), "{}", err.message);
        assert_eq!(err.details.unwrap()["step"], "unpacking");
    }

    #[tokio::test]
    async fn a_dropped_handle_fails_its_operation() {
        let dir = tempfile::tempdir().unwrap();
        let ops = ops(dir.path());
        let id = ops.begin(OperationKind::WorkspaceGit, "x").unwrap().id().to_string();
        assert_eq!(ops.get(&id).unwrap().state, OperationState::Failed);
    }
}
