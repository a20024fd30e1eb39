//! The command line itself: global options (`--home`, `--node`, `--json`,
//! …) work before or after the subcommand, as in git and docker.

mod common;

use std::process::{Command, Output};

use flotilla_api::{ProcessInfo, Sandbox};

fn flotilla(args: &[&str]) -> Output {
    let out =
        Command::new(common::BIN).args(args).env_remove("FLOTILLA_HOME").env_remove("FLOTILLA_NODE").output().unwrap();
    assert!(
        out.status.success(),
        "flotilla {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_options_go_before_or_after_the_subcommand() {
    let env = common::env();
    let s = env.sandbox().await;
    let home = env.node.home().to_str().unwrap().to_string();
    let node = format!("unix://{}", env.node.socket().display());
    let (h, id) = (home.as_str(), s.id.as_str());

    // The same listing, whichever level each option is given at.
    for args in [
        vec!["--home", h, "sandbox", "ls", "--json"],
        vec!["sandbox", "ls", "--home", h, "--json"],
        vec!["--json", "sandbox", "ls", "--home", h],
        vec!["--home", h, "--json", "sandbox", "ls"],
        vec!["sandbox", "--home", h, "ls", "--json"],
        vec!["sandbox", "--json", "list", "--home", h],
        vec!["--node", &node, "sandbox", "ls", "--json"],
        vec!["sandbox", "ls", "--json", "--node", &node],
    ] {
        let listed: Vec<Sandbox> = serde_json::from_slice(&flotilla(&args).stdout)
            .unwrap_or_else(|e| panic!("flotilla {}: not a JSON listing: {e}", args.join(" ")));
        assert!(listed.iter().any(|l| l.id == s.id), "flotilla {}: {listed:?}", args.join(" "));
    }
    // Without --json, a table.
    let table = String::from_utf8(flotilla(&["--home", h, "sandbox", "ls"]).stdout).unwrap();
    assert!(table.contains(id) && !table.trim_start().starts_with('['), "{table}");

    // Other commands and groups take them too.
    let shown: Sandbox =
        serde_json::from_slice(&flotilla(&["--home", h, "--json", "sandbox", "show", id]).stdout).unwrap();
    assert_eq!(shown.id, s.id);
    let p: ProcessInfo = serde_json::from_slice(
        &flotilla(&["--json", "--home", h, "sandbox", "exec", id, "--detach", "--", "true"]).stdout,
    )
    .unwrap();
    let procs: Vec<ProcessInfo> =
        serde_json::from_slice(&flotilla(&["--home", h, "sandbox", "ps", id, "--json"]).stdout).unwrap();
    assert!(procs.iter().any(|q| q.id == p.id));
    for args in [
        vec!["--home", h, "--json", "info"],
        vec!["info", "--json", "--home", h],
        vec!["--home", h, "--json", "image", "ls"],
        vec!["--home", h, "operation", "ls", "--json"],
        vec!["--json", "op", "ls", "--home", h],
    ] {
        let out = flotilla(&args);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("flotilla {}: not JSON: {e}", args.join(" ")));
    }

    // $FLOTILLA_HOME still works, and a flag overrides it wherever it is.
    let out = Command::new(common::BIN).args(["sandbox", "ls", "--json"]).env("FLOTILLA_HOME", h).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(common::BIN)
        .args(["--home", h, "sandbox", "ls", "--json"])
        .env("FLOTILLA_HOME", "/no/such/home")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A wrong --home is used (and named) whichever side it is on.
    for args in [["--home", "/no/such/home", "sandbox", "ls"], ["sandbox", "ls", "--home", "/no/such/home"]] {
        let out = Command::new(common::BIN).args(args).output().unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/home/node.sock"), "{out:?}");
    }
}
