//! Host ports forwarded to an instance's ports.
//!
//! Each accepted connection is carried to the port inside the instance's
//! current sandbox through its agent (`GET /tcp`, `Upgrade: tcp`), the same
//! path on every backend. While the app is down a connection is closed at
//! once; the listener stays, so the address never changes across restarts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use super::Instance;
use crate::node::{Backend, Node};

pub(super) async fn serve<B: Backend>(
    listener: Arc<tokio::net::TcpListener>,
    port: u16,
    inst: Arc<Instance>,
    node: Weak<Node<B>>,
    open: Arc<AtomicUsize>,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let sandbox = inst.live.lock().expect("live").sandbox.clone();
        let node = node.clone();
        let open = Open::count(&open);
        tokio::spawn(async move {
            let _open = open;
            let (Some(sandbox), Some(node)) = (sandbox, node.upgrade()) else { return };
            let Ok(agent) = node.agent(&sandbox).await else { return };
            drop(node);
            let mut upstream = match agent.connect_tcp(port).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(port, error = %e, "forwarded connection refused inside the sandbox");
                    return;
                }
            };
            let _ = conn.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
        });
    }
}

/// One forwarded connection, counted while it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn count(n: &Arc<AtomicUsize>) -> Open {
        n.fetch_add(1, Ordering::SeqCst);
        Open(n.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
