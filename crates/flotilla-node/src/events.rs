//! The node's event feed (`GET /v1/events`).
//!
//! Every sandbox change, operation step, image change and janitor reap is
//! published here. Events carry ids that only grow, also across restarts
//! (the first id of a run is the start time in milliseconds times 1000), so
//! a client that lost its connection resumes with `Last-Event-ID` and gets
//! exactly the events it missed, as long as they are still in the ring; if
//! they are not, it gets a `reset` event telling it to re-list.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use flotilla_api::{EventBody, NodeEvent, Timestamp};
use tokio::sync::broadcast;

/// How many past events are kept for resuming clients.
pub const RING: usize = 4096;

/// The feed. Publishing never blocks: a subscriber that falls more than
/// [`RING`] events behind is told to re-list.
#[derive(Debug)]
pub struct EventBus {
    inner: Mutex<Ring>,
    tx: broadcast::Sender<Arc<NodeEvent>>,
}

#[derive(Debug)]
struct Ring {
    next_id: u64,
    events: VecDeque<Arc<NodeEvent>>,
}

/// What a new subscriber gets: the events it missed, then the live feed.
#[derive(Debug)]
pub struct Subscription {
    pub replay: Vec<Arc<NodeEvent>>,
    pub live: broadcast::Receiver<Arc<NodeEvent>>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new()
    }
}

impl EventBus {
    pub fn new() -> EventBus {
        let (tx, _) = broadcast::channel(RING);
        let first = Timestamp::now().0.saturating_mul(1000);
        EventBus { inner: Mutex::new(Ring { next_id: first, events: VecDeque::with_capacity(RING) }), tx }
    }

    /// Publishes an event and returns its id.
    pub fn publish(&self, body: EventBody) -> u64 {
        // The id is taken and the event sent under one lock, so the ring and
        // the live feed see events in id order and a subscriber joining
        // concurrently neither misses nor repeats one.
        let mut ring = self.inner.lock().expect("event ring");
        let id = ring.next_id;
        ring.next_id += 1;
        let ev = Arc::new(NodeEvent { id, at: Timestamp::now(), body });
        if ring.events.len() == RING {
            ring.events.pop_front();
        }
        ring.events.push_back(ev.clone());
        let _ = self.tx.send(ev);
        id
    }

    /// Subscribes; with `after`, first replays the kept events newer than it
    /// (or a `reset` when some of them are gone).
    pub fn subscribe(&self, after: Option<u64>) -> Subscription {
        let ring = self.inner.lock().expect("event ring");
        let live = self.tx.subscribe();
        let mut replay = Vec::new();
        if let Some(after) = after {
            let oldest = ring.events.front().map(|e| e.id).unwrap_or(ring.next_id);
            if after + 1 < oldest {
                replay.push(Arc::new(NodeEvent {
                    id: oldest.saturating_sub(1),
                    at: Timestamp::now(),
                    body: EventBody::Reset {
                        reason: format!("events after {after} are no longer kept (oldest is {oldest}); re-list"),
                    },
                }));
            }
            replay.extend(ring.events.iter().filter(|e| e.id > after).cloned());
        }
        Subscription { replay, live }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(n: usize) -> EventBody {
        EventBody::Reaped { what: "test".into(), target: n.to_string(), reason: String::new() }
    }

    #[tokio::test]
    async fn resume_replays_exactly_what_was_missed() {
        let bus = EventBus::new();
        let ids: Vec<u64> = (0..5).map(|n| bus.publish(body(n))).collect();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
        let mut sub = bus.subscribe(Some(ids[2]));
        assert_eq!(sub.replay.iter().map(|e| e.id).collect::<Vec<_>>(), vec![ids[3], ids[4]]);
        let next = bus.publish(body(5));
        assert_eq!(sub.live.recv().await.unwrap().id, next);
    }

    #[test]
    fn resuming_past_the_ring_says_reset() {
        let bus = EventBus::new();
        let first = bus.publish(body(0));
        for n in 1..RING + 10 {
            bus.publish(body(n));
        }
        let sub = bus.subscribe(Some(first));
        assert!(matches!(sub.replay[0].body, EventBody::Reset { .. }));
        assert_eq!(sub.replay.len(), RING + 1);
    }

    #[test]
    fn ids_grow_across_restarts() {
        let a = EventBus::new().publish(body(0));
        // A restart happens at a later millisecond: wait for the clock to
        // tick (a few iterations at most), not a fixed pause.
        let started = Timestamp::now();
        while Timestamp::now() == started {
            std::hint::spin_loop();
        }
        let b = EventBus::new().publish(body(0));
        assert!(b > a);
    }
}
