//! End to end with the official `openai` Node package as the client (chat,
//! streaming, its error classes). `.ci/run` installs it with `npm ci` in
//! tests/e2e/node; skips locally (with a notice) when it is not installed,
//! in CI it must run.

mod support;

use std::path::PathBuf;

use support::{run_sdk_script, start_for_sdks, MockUpstream};

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
    let stdout = run_sdk_script(PathBuf::from("node"), dir.join("sdk.mjs"), &tg, keys).await;
    assert!(stdout.contains("6 passed, 0 failed"), "{stdout}");
    let rows = tg.wait_rows(before + 5).await;
    let statuses: Vec<i64> = rows[before..].iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 200, 200, 403, 429]);
}
