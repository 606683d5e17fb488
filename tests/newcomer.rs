//! What a first-time user runs into (issue 12, point 6): errors that name
//! the database, a listen address that may be a hostname, warnings for a
//! half-configured server, admin errors in JSON, logs fit for files, and CLI
//! commands that leave no stray databases behind.

mod support;

use std::process::Command;

use serde_json::Value;
use support::{base_config, client, stdout, MockUpstream, Tollgate, BIN, PASSTHROUGH_AUTH};

fn run_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("TOLLGATE_LOG", "warn")
        .env_remove("TOLLGATE_DATABASE_URL")
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn cli_commands_in_the_wrong_directory_create_no_database() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for args in [
        &["keys", "list"][..],
        &["teams", "list"],
        &["report"],
        &["keys", "revoke", "key_x"],
    ] {
        let out = run_in(dir.path(), args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("tollgate.db") && err.contains("does not exist"),
            "{args:?}: {err}"
        );
        assert!(
            !dir.path().join("tollgate.db").exists(),
            "{args:?} made a database"
        );
    }
    // Creating the first team is the start of a setup: it makes the database.
    stdout(&run_in(dir.path(), &["teams", "create", "search"]));
    assert!(dir.path().join("tollgate.db").exists());
    stdout(&run_in(
        dir.path(),
        &["keys", "create", "--team", "search", "--name", "ci-bot"],
    ));
    let list = stdout(&run_in(dir.path(), &["keys", "list"]));
    assert!(list.lines().next().unwrap_or("").contains("name"), "{list}");
    assert!(list.contains("ci-bot"), "{list}");
}

#[test]
fn database_errors_name_the_database_but_never_a_password() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(BIN)
        .args(["teams", "list"])
        .current_dir(dir.path())
        .env(
            "TOLLGATE_DATABASE_URL",
            "postgres://app:hunter2@127.0.0.1:1/tollgate",
        )
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("127.0.0.1:1/tollgate"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn help_shows_the_budget_period_default() {
    let out = run_in(std::path::Path::new("."), &["teams", "create", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("default: monthly"), "{help}");
}

#[test]
fn listen_takes_a_hostname_or_says_what_it_wants() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("t.toml");
    std::fs::write(&path, "[server]\nlisten = \"8080\"\n").unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("IP:port") && err.contains("server.listen"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostname_listen_address_works_and_logs_are_plain_and_honest() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // virtual-keys with an upstream that has no key; RUST_LOG instead of
    // TOLLGATE_LOG; a hostname to listen on.
    let config = base_config(&mock, dir.path())
        .replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"localhost:0\"\nadmin_token = \"adm\"",
        )
        .replace("api_key = \"sk-upstream-secret\"\n", "")
        .replace(PASSTHROUGH_AUTH, "[auth]\nmode = \"virtual-keys\"\n");
    let tg = Tollgate::start_in_shell(
        dir,
        &config,
        "unset TOLLGATE_LOG; export RUST_LOG=tollgate=debug",
    )
    .await;
    let r = client()
        .get(tg.url("/healthz"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let log = tg.log();
    assert_eq!(
        log.iter().filter(|l| l.contains("listening")).count(),
        1,
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("DEBUG")),
        "RUST_LOG honoured: {log:?}"
    );
    assert!(
        log.iter().all(|l| !l.contains('\u{1b}')),
        "no colour codes in a pipe"
    );
    assert!(
        log.iter().any(|l| l.contains("has no api_key")),
        "warned about the keyless upstream: {log:?}"
    );
    // Admin errors are JSON in OpenAI's shape, axum's own too.
    for (method, path, status) in [
        (reqwest::Method::GET, "/admin/usage?by=bogus", 400),
        (reqwest::Method::PATCH, "/admin/teams", 405),
        (reqwest::Method::GET, "/admin/nothing-here", 404),
    ] {
        let r = client()
            .request(method.clone(), tg.url(path))
            .bearer_auth("adm")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), status, "{method} {path}");
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(v["error"]["message"].is_string(), "{method} {path}: {v}");
        assert!(v["error"]["code"].is_string(), "{method} {path}: {v}");
    }
}
