//! Exec, detached processes and sessions: output complete and in order
//! with the exit frame last, exit codes, timeouts, heartbeats, dead agents
//! noticed in seconds, re-attach after a dropped connection.

mod common;

use std::time::{Duration, Instant};

use flotilla_api::{ExecRequest, FrameKind, SessionQuery};
use futures_util::{SinkExt, StreamExt};

on_both_backends!(
    exec_streams_output_and_exit_codes,
    timeouts_kill_the_whole_process_group,
    detached_processes_survive_dropped_connections,
    sessions_give_a_terminal,
    a_client_that_goes_away_takes_its_command_with_it,
    halting_the_agent_stops_the_sandbox,
);

fn sh(script: &str) -> ExecRequest {
    ExecRequest { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() }
}

async fn exec_streams_output_and_exit_codes(kind: common::Kind) {
    let env = common::env_for(kind);
    let s = env.sandbox().await;
    let (out, err, st) = env.sh(&s.id, "echo out; echo err >&2; exit 42").await;
    assert_eq!((out.as_str(), err.as_str(), st.code), ("out\n", "err\n", Some(42)));
    let req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "pwd; echo $GREETING; cat".into()],
        env: [("GREETING".to_string(), "hello".to_string())].into(),
        cwd: Some("/tmp".into()),
        stdin: Some("from-stdin".into()),
        ..Default::default()
    };
    let (out, _, st) = env.exec(&s.id, req).await;
    assert_eq!(out, "/tmp\nhello\nfrom-stdin");
    assert!(st.success());
    let (_, _, st) = env.sh(&s.id, "kill -TERM $$").await;
    assert_eq!(st.signal, Some(15));
    // A missing program is a clear 404, not a hang.
    let err = env
        .client
        .sandbox(&s.id)
        .exec(&ExecRequest { argv: vec!["no-such-program".into()], ..Default::default() })
        .await;
    let err = err.err().expect("missing program fails");
    assert!(err.to_string().contains("no-such-program"), "{err}");
}

async fn timeouts_kill_the_whole_process_group(kind: common::Kind) {
    let env = common::env_for(kind);
    let s = env.sandbox().await;
    let started = Instant::now();
    let req = ExecRequest { timeout_ms: Some(300), ..sh("sleep 60 & sleep 60; echo never") };
    let (out, _, st) = env.exec(&s.id, req).await;
    assert!(st.timed_out && st.signal == Some(9), "{st:?}");
    assert!(!out.contains("never"));
    assert!(started.elapsed() < Duration::from_secs(30));
    let left = env.ok(&s.id, "ps -e -o comm= | grep -c '^sleep$' || true").await;
    assert_eq!(left.trim(), "0", "the background child survived the timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabytes_arrive_complete_and_in_order_even_to_a_slow_reader() {
    let env = common::env();
    let s = env.sandbox().await;
    // ~100 MB of numbered lines on stdout, with markers on stderr.
    let n: u64 = 12_500_000;
    let mut stream = env.client.sandbox(&s.id).exec(&sh(&format!("seq 1 {n}; echo done >&2"))).await.unwrap();
    let (mut next, mut partial, mut bytes, mut frames) = (1u64, Vec::new(), 0u64, 0u64);
    let mut exit = None;
    while let Some(f) = stream.next().await.unwrap() {
        match f.kind {
            FrameKind::Stdout => {
                assert!(exit.is_none(), "output after the exit frame");
                frames += 1;
                if frames < 200 {
                    // A slow reader at first: the process must wait, not lose output.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                bytes += f.payload.len() as u64;
                partial.extend_from_slice(&f.payload);
                let last_nl = partial.iter().rposition(|&b| b == b'\n');
                if let Some(i) = last_nl {
                    for line in partial[..i].split(|&b| b == b'\n') {
                        let v: u64 = std::str::from_utf8(line).unwrap().parse().unwrap();
                        assert_eq!(v, next, "lines out of order");
                        next += 1;
                    }
                    partial.drain(..=i);
                }
            }
            FrameKind::Stderr => assert_eq!(&f.payload[..], b"done\n"),
            FrameKind::Exit => exit = f.as_exit(),
            FrameKind::Heartbeat => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(next, n + 1, "missing lines");
    assert!(bytes > 100_000_000, "{bytes} bytes");
    assert!(exit.expect("exit frame").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_carry_heartbeats_and_a_hung_agent_is_noticed() {
    let env = common::env();
    let s = env.sandbox().await;
    let mut stream = env.client.sandbox(&s.id).exec(&sh("sleep 5")).await.unwrap();
    let mut beats = 0;
    while let Some(f) = stream.next().await.unwrap() {
        if f.kind == FrameKind::Heartbeat {
            beats += 1;
        }
    }
    assert!(beats >= 2, "{beats} heartbeats in a 5 s idle exec");

    // Freeze the agent: the stream must fail within seconds, not hang.
    let pid = common::agent_pid(&s);
    let mut stream = env.client.sandbox(&s.id).exec(&sh("sleep 120")).await.unwrap();
    std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap();
    let started = Instant::now();
    let r = loop {
        match stream.next().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    std::process::Command::new("kill").args(["-CONT", &pid.to_string()]).status().unwrap();
    assert!(r.is_err(), "a frozen agent went unnoticed: {r:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "noticed only after {:?}", started.elapsed());

    // Kill it: the node notices the death and marks the sandbox failed;
    // stop and rm still work, twice.
    std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    let client = env.client.clone();
    let id = s.id.clone();
    common::eventually(Duration::from_secs(10), "sandbox marked failed", || {
        let c = client.clone();
        let id = id.clone();
        async move { (c.get(&id).await.ok()?.state == flotilla_api::SandboxState::Failed).then_some(()) }
    })
    .await;
    assert!(env.client.get(&s.id).await.unwrap().error.unwrap().contains("killed by signal 9"));
    env.client.action(&s.id, "stop").await.unwrap();
    env.client.action(&s.id, "stop").await.unwrap();
    env.client.delete(&s.id).await.unwrap();
}

async fn detached_processes_survive_dropped_connections(kind: common::Kind) {
    let env = common::env_for(kind);
    let s = env.sandbox().await;
    let agent = env.client.sandbox(&s.id);
    let p = agent.exec_detached(&sh("for i in $(seq 1 40); do echo $i; sleep 0.05; done; exit 3")).await.unwrap();

    // Read a little, then drop the connection mid-stream.
    let (mut first, _) = agent.output(&p.id, 0, true).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        let f = first.next().await.unwrap().unwrap();
        if f.kind == FrameKind::Stdout {
            got.extend_from_slice(&f.payload);
        }
    }
    let offset = first.offset;
    drop(first);

    // Re-attach from where we were: nothing lost, nothing repeated.
    let (mut second, start) = agent.output(&p.id, offset, true).await.unwrap();
    assert_eq!(start, 0);
    let mut code = None;
    while let Some(f) = second.next().await.unwrap() {
        match f.kind {
            FrameKind::Stdout => got.extend_from_slice(&f.payload),
            FrameKind::Exit => code = f.as_exit().unwrap().code,
            _ => {}
        }
    }
    let expected: String = (1..=40).map(|i| format!("{i}\n")).collect();
    assert_eq!(String::from_utf8(got).unwrap(), expected);
    assert_eq!(code, Some(3));
    let info = agent.process(&p.id).await.unwrap();
    assert_eq!(info.exit.unwrap().code, Some(3));

    // stdin and signals for a detached process.
    let cat = agent.exec_detached(&ExecRequest { argv: vec!["cat".into()], ..Default::default() }).await.unwrap();
    agent.stdin(&cat.id, bytes::Bytes::from_static(b"piped"), true).await.unwrap();
    let (mut out, _) = agent.output(&cat.id, 0, true).await.unwrap();
    let mut text = Vec::new();
    let status = flotilla_agent::client::drain_exec(&mut out, &mut text, &mut std::io::sink()).await.unwrap();
    assert_eq!((text.as_slice(), status.code), (&b"piped"[..], Some(0)));
    let sleeper = agent.exec_detached(&sh("sleep 600")).await.unwrap();
    agent.signal(&sleeper.id, "KILL").await.unwrap();
    let (mut out, _) = agent.output(&sleeper.id, 0, true).await.unwrap();
    let status =
        flotilla_agent::client::drain_exec(&mut out, &mut std::io::sink(), &mut std::io::sink()).await.unwrap();
    assert_eq!(status.signal, Some(9));
    assert_eq!(agent.processes().await.unwrap().len(), 3);
}

async fn sessions_give_a_terminal(kind: common::Kind) {
    use tokio_tungstenite::tungstenite::Message;
    let env = common::env_for(kind);
    let s = env.sandbox().await;
    let q = SessionQuery { cols: Some(100), rows: Some(30), ..Default::default() };
    let ws = env.client.sandbox(&s.id).session(&q).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let input = flotilla_api::Frame::new(FrameKind::Stdin, &b"tty; stty size; exit 7\n"[..]);
    tx.send(Message::Binary(input.to_bytes())).await.unwrap();
    let mut out = Vec::new();
    let code = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(Message::Binary(b))) = rx.next().await {
            for f in flotilla_api::frame::decode_all(&b).unwrap() {
                match f.kind {
                    FrameKind::Stdout => out.extend_from_slice(&f.payload),
                    FrameKind::Exit => return f.as_exit().unwrap().code,
                    _ => {}
                }
            }
        }
        None
    })
    .await
    .expect("session ended");
    let text = String::from_utf8_lossy(&out);
    assert_eq!(code, Some(7), "{text}");
    assert!(text.contains("/dev/pts/0") && text.contains("30 100"), "{text}");
}

async fn a_client_that_goes_away_takes_its_command_with_it(kind: common::Kind) {
    let env = common::env_for(kind);
    let s = env.sandbox().await;
    let stream = env.client.sandbox(&s.id).exec(&sh("sleep 600 & sleep 600")).await.unwrap();
    env.ok(&s.id, "while ! pgrep -x sleep >/dev/null; do sleep 0.01; done").await;
    drop(stream);
    // Noticed at the next write at the latest (a heartbeat, every 2 s).
    let left = env
        .ok(
            &s.id,
            "for i in $(seq 100); do pgrep -x sleep >/dev/null || break; sleep 0.1; done; pgrep -c -x sleep || true",
        )
        .await;
    assert_eq!(left.trim(), "0", "commands outlived their client");
}

async fn halting_the_agent_stops_the_sandbox(kind: common::Kind) {
    let env = common::env_for(kind);
    let s = env.sandbox().await;
    env.client.sandbox(&s.id).halt().await.unwrap();
    let client = env.client.clone();
    let id = s.id.clone();
    let after = common::eventually(Duration::from_secs(10), "the sandbox to stop", || {
        let c = client.clone();
        let id = id.clone();
        async move { c.get(&id).await.ok().filter(|s| s.state != flotilla_api::SandboxState::Running) }
    })
    .await;
    assert_eq!(after.state, flotilla_api::SandboxState::Stopped, "{after:?}");
    assert!(after.error.is_none());
    env.client.action(&s.id, "start").await.unwrap();
}
