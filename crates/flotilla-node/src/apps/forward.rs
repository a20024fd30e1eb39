//! Host ports forwarded to an instance's ports.
//!
//! Each accepted connection is carried to the port inside the instance's
//! current sandbox through its agent (`GET /tcp`, `Upgrade: tcp`), the same
//! path on every backend. While the app is down a connection is closed at
//! once; the listener stays, so the address never changes across restarts.

use std::sync::{Arc, Weak};

use super::Instance;
use crate::node::{Backend, Node};

pub(super) async fn serve<B: Backend>(
    listener: Arc<tokio::net::TcpListener>,
    port: u16,
    inst: Arc<Instance>,
    node: Weak<Node<B>>,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let sandbox = inst.live.lock().expect("live").sandbox.clone();
        let node = node.clone();
        tokio::spawn(async move {
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
