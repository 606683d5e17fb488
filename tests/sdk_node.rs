//! End to end with the official `openai` Node package as the client (chat,
//! streaming, its error classes). `.ci/run` installs it with `npm ci` in
//! tests/e2e/node; skips locally (with a notice) when it is not installed,
//! in CI it must run.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::{start_for_sdks, MockUpstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_node_sdk_works_unchanged() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/node");
    if !dir.join("node_modules/openai").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run npm ci in tests/e2e/node"
        );
        eprintln!(
            "skipped: run `npm ci --prefix tests/e2e/node` to install the openai Node package"
        );
        return;
    }
    let mock = MockUpstream::start().await;
    let (tg, keys) = start_for_sdks(&mock).await;
    let before = tg.wait_rows(1).await.len();
    let base = tg.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(dir.join("sdk.mjs"))
            .env("TOLLGATE_BASE_URL", base)
            .env("TG_KEY", keys.key)
            .env("TG_KEY_RESTRICTED", keys.restricted)
            .env("TG_KEY_BROKE", keys.broke)
            .output()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("run node: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("6 passed, 0 failed"), "{stdout}");
    let rows = tg.wait_rows(before + 5).await;
    let statuses: Vec<i64> = rows[before..].iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 200, 200, 403, 429]);
}
