//! End to end with the official `openai` Python SDK as the client (sync and
//! async, streaming and not, embeddings, raw responses, its exception classes).
//! `.ci/run` installs it into `.venv`; `TOLLGATE_TEST_PYTHON` may name another
//! interpreter. Skips locally (with a notice) when neither exists; in CI it
//! must run.

mod support;

use std::path::PathBuf;

use support::{run_sdk_script, start_for_sdks, MockUpstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_works_unchanged() {
    let Some(python) = support::sdk_python() else {
        return;
    };
    let mock = MockUpstream::start().await;
    let (tg, keys) = start_for_sdks(&mock).await;
    let before = tg.wait_rows(1).await.len(); // the key probe
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/openai_sdk.py");
    let stdout = run_sdk_script(python, script, &tg, keys).await;
    assert!(stdout.contains("12 passed, 0 failed"), "{stdout}");
    // Every attributed SDK call left exactly one usage row (the unknown key's
    // 401 is attributed to no team and leaves none).
    let rows = tg.wait_rows(before + 11).await;
    let statuses: Vec<i64> = rows[before..].iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        vec![200, 200, 200, 200, 200, 429, 400, 200, 200, 403, 429]
    );
    // The flex request: priced as served, its tier recorded.
    let flex = &rows[before + 1];
    assert_eq!(
        (flex.model.as_str(), flex.cost_nano_usd),
        ("o3", 18_000_000)
    );
    assert_eq!(flex.service_tier.as_deref(), Some("flex"));
    // The tollgate key never went upstream; the upstream's own key did.
    assert!(mock
        .requests()
        .iter()
        .all(|r| r.header("authorization").as_deref() == Some("Bearer sk-upstream-secret")));
}
