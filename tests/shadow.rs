//! Shadow pricing (issue 15, point 2): requests for the models a
//! `[[shadow]]` rule matches are also priced as each alternative, with the
//! same token counts, into `tollgate_shadow_cost_usd_total`; `report
//! --shadow MODEL` prices every stored request again as MODEL.

mod support;

use serde_json::{json, Value};
use support::{metric, post_chat, MockUpstream, Tollgate};

/// The issue's own example rule.
const SHADOW: &str = r#"
[[shadow]]
models = ["gpt-4*", "o3*"]
price_as = ["gpt-4o-mini", "gpt-5-mini"]
"#;

/// 1,000 prompt / 100 completion tokens on every request. At catalog
/// prices (USD per M in / out): gpt-4o $2.50 / $10 = 3,500,000 nano-USD;
/// o3 $2 / $8 = 2,800,000; gpt-4o-mini $0.15 / $0.60 = 210,000;
/// gpt-5-mini $0.25 / $2 = 450,000.
const TOKENS: [(&str, &str); 2] = [
    ("x-mock-prompt-tokens", "1000"),
    ("x-mock-completion-tokens", "100"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_requests_are_priced_as_each_alternative_exactly() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, SHADOW).await;
    for (model, stream) in [
        ("gpt-4o", false),
        ("gpt-4o", true),
        ("o3", false),
        ("gpt-4o-mini", false),
        ("gpt-3.5-turbo", false),
    ] {
        let mut body = support::chat_body(model);
        body["stream"] = json!(stream);
        let r = post_chat(&tg, "sk-client", &body, &TOKENS).await;
        assert_eq!(r.status(), 200, "{model}");
        let _ = r.bytes().await;
    }
    tg.wait_rows(5).await;

    let m = tg.metrics().await;
    let shadow = |model: &str, as_model: &str| {
        metric(
            &m,
            "tollgate_shadow_cost_usd_total",
            &[
                ("team", "default"),
                ("model", model),
                ("shadow_model", as_model),
            ],
        )
    };
    let usd = |nano: u64| nano as f64 / 1e9;
    assert_eq!(shadow("gpt-4o", "gpt-4o-mini"), Some(usd(2 * 210_000)));
    assert_eq!(shadow("gpt-4o", "gpt-5-mini"), Some(usd(2 * 450_000)));
    assert_eq!(shadow("o3", "gpt-4o-mini"), Some(usd(210_000)));
    assert_eq!(shadow("o3", "gpt-5-mini"), Some(usd(450_000)));
    // A model is never its own shadow; a model no rule matches has none.
    assert_eq!(shadow("gpt-4o-mini", "gpt-5-mini"), Some(usd(450_000)));
    assert_eq!(shadow("gpt-4o-mini", "gpt-4o-mini"), None);
    assert!(!m.contains("model=\"gpt-3.5-turbo\",shadow_model"), "{m}");
    // What was charged is unchanged.
    assert_eq!(
        metric(
            &m,
            "tollgate_cost_usd_total",
            &[("team", "default"), ("model", "gpt-4o")]
        ),
        Some(usd(2 * 3_500_000))
    );

    // The report prices every stored request again, exactly.
    let out = support::stdout(&tg.cli(&["report", "--shadow", "gpt-5-mini", "--format", "json"]));
    let report: Value = serde_json::from_str(&out).unwrap_or_default();
    let line = |model: &str| {
        report["rows"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["model"] == model))
            .map(|r| {
                (
                    r["requests"].as_u64().unwrap_or(0),
                    r["cost_nano_usd"].as_u64().unwrap_or(0),
                    r["shadow_cost_nano_usd"].as_u64().unwrap_or(0),
                )
            })
    };
    assert_eq!(report["shadow_model"], "gpt-5-mini");
    assert_eq!(line("gpt-4o"), Some((2, 7_000_000, 900_000)), "{report}");
    assert_eq!(line("o3"), Some((1, 2_800_000, 450_000)));
    assert_eq!(line("gpt-4o-mini"), Some((1, 210_000, 450_000)));
    // gpt-3.5-turbo at $0.50 / $1.50: 650,000 charged.
    assert_eq!(line("gpt-3.5-turbo"), Some((1, 650_000, 450_000)));
    assert_eq!(report["total_cost_nano_usd"], 10_660_000);
    assert_eq!(report["total_shadow_cost_nano_usd"], 2_250_000);
    assert_eq!(report["total_saving_nano_usd"], "8410000");

    // A model the catalog cannot price is refused by name.
    let out = tg.cli(&["report", "--shadow", "no-such-model"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-model"));
}

#[test]
fn a_shadow_rule_without_alternatives_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        "[[shadow]]\nmodels = [\"gpt-4*\"]\nprice_as = []\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new(support::server_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shadow[0]"));
}
