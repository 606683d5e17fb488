//! tollgate as Prometheus and Grafana see it, checked with the real tools:
//! `promtool` lints a live /metrics and the alert rules, and a real
//! Prometheus scrapes a tollgate that served traffic and evaluates every
//! PromQL expression of the Grafana dashboard and of the alert rules.
//!
//! Needs Debian's `prometheus` package (`.ci/run` installs it); skips locally
//! with a notice when it is missing, fails in CI.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{chat_body, client, MockUpstream, Tollgate};

fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every `expr` in the dashboard's panel targets.
fn dashboard_exprs() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(repo("config/grafana/tollgate-dashboard.json")).unwrap_or_default();
    let dash: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("dashboard JSON: {e}"));
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((
                    panel["title"].as_str().unwrap_or("").to_string(),
                    expr.to_string(),
                ));
            }
        }
    }
    out
}

/// Grafana's variables as a person with "All" selected would have them.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
        .replace("$team", ".*")
        .replace("$model", ".*")
}

async fn generate_traffic(tg: &Tollgate) {
    let c = client();
    let send = |team: &'static str, body: Value, extra: Option<(&'static str, &'static str)>| {
        let c = c.clone();
        let url = tg.url(if body.get("input").is_some() {
            "/v1/embeddings"
        } else {
            "/v1/chat/completions"
        });
        async move {
            let mut req = c.post(url).header("x-tollgate-team", team).json(&body);
            if let Some((k, v)) = extra {
                req = req.header(k, v);
            }
            let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
            let status = resp.status().as_u16();
            let _ = resp.bytes().await;
            status
        }
    };
    for _ in 0..5 {
        assert_eq!(send("search", chat_body("gpt-4o-mini"), None).await, 200);
    }
    let mut stream = chat_body("gpt-4o");
    stream["stream"] = json!(true);
    assert_eq!(send("search", stream, None).await, 200);
    assert_eq!(
        send(
            "search",
            json!({"model": "text-embedding-3-small", "input": "hi"}),
            None
        )
        .await,
        200
    );
    assert_eq!(
        send("ml", chat_body("ft:gpt-4o-mini-2024-07-18:acme::x1"), None).await,
        200
    );
    assert_eq!(send("ml", chat_body("my-local-llama"), None).await, 200);
    assert_eq!(
        send(
            "search",
            chat_body("gpt-4o"),
            Some(("x-mock-status", "500"))
        )
        .await,
        500
    );
    assert_eq!(send("broke", chat_body("gpt-4o"), None).await, 429);
    // What you pay for: cached tokens, a tier without a table, usage the
    // upstream did not report, and a request beyond its reservation.
    let cached = ("x-mock-cached-tokens", "6");
    assert_eq!(
        send("search", chat_body("gpt-4o-mini"), Some(cached)).await,
        200
    );
    let flex = ("x-mock-service-tier", "flex");
    assert_eq!(send("search", chat_body("gpt-4o"), Some(flex)).await, 200);
    let omit = ("x-mock-usage", "omit");
    assert_eq!(send("ml", chat_body("gpt-4o-mini"), Some(omit)).await, 200);
    // Reserved for one web search (max_tool_calls), served three.
    let r = client()
        .post(tg.url("/v1/responses"))
        .header("x-tollgate-team", "search")
        .header("x-mock-output-items", "web_search_call,web_search_call,web_search_call")
        .json(&json!({"model": "gpt-5", "input": "news?", "tools": [{"type": "web_search"}], "max_tool_calls": 1, "max_output_tokens": 5}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    // The numbers: an answer at its cap, two choices, a Chinese answer
    // (tokens per character), a self-hosted model.
    let capped = ("x-mock-finish-reason", "length");
    assert_eq!(
        send("ml", chat_body("gpt-4o-mini"), Some(capped)).await,
        200
    );
    let mut two = chat_body("gpt-4o-mini");
    two["n"] = json!(2);
    assert_eq!(send("search", two, None).await, 200);
    let chinese = ("x-mock-content", "你好，世界");
    assert_eq!(send("ml", chat_body("gpt-4o"), Some(chinese)).await, 200);
    assert_eq!(send("ml", chat_body("llama-gpu"), None).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_and_every_dashboard_and_alert_query_works() {
    let (Some(promtool), Some(prometheus)) = (tool("promtool"), tool("prometheus")) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install Debian's prometheus package"
        );
        eprintln!("skipped: promtool/prometheus not installed (apt-get install prometheus)");
        return;
    };
    let mock = MockUpstream::start().await;
    // A shadow rule, so the shadow-pricing panel has data; every request's
    // words counted; a self-hosted model added to the bundled catalog.
    let catalog_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let catalog = catalog_dir.path().join("extra.toml");
    std::fs::write(
        &catalog,
        "[models.\"llama-gpu\"]\ngpu_usd_per_hour = 2.5\nmin_tokens_per_second = 50\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let tg = Tollgate::start(
        &mock,
        &format!(
            "[auth]\nmode = \"passthrough\"\n\n[[shadow]]\nmodels = [\"gpt-4o*\"]\nprice_as = [\"gpt-4o-mini\"]\n\n\
             [numbers]\nword_sample_rate = 1.0\n\n[catalog]\nextra = \"{}\"\n",
            catalog.display()
        ),
    )
    .await;
    for args in [
        vec![
            "teams",
            "create",
            "search",
            "--budget-usd",
            "10",
            "--period",
            "monthly",
        ],
        vec!["teams", "create", "ml"],
        vec![
            "teams",
            "create",
            "broke",
            "--budget-usd",
            "0.000001",
            "--period",
            "daily",
        ],
    ] {
        let out = tg.cli(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Budgets reach the running server within its 500 ms refresh.
    tokio::time::sleep(Duration::from_millis(700)).await;
    generate_traffic(&tg).await;

    // promtool lints the live exposition.
    let metrics = tg.metrics().await;
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool: {e}"));
    if let Some(mut stdin) = check.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(metrics.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let out = check.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let alerts = repo("config/prometheus/alerts.yml");
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&alerts)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A real Prometheus, configured from the shipped prometheus.yml.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let shipped = std::fs::read_to_string(repo("config/prometheus.yml")).unwrap_or_default();
    let config = shipped
        .replace("tollgate:8080", &tg.addr.to_string())
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        .replace("/etc/prometheus/alerts.yml", &alerts.display().to_string());
    assert_ne!(config, shipped);
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(&promtool)
        .args(["check", "config"])
        .arg(&config_path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let _prom = KillOnDrop(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("prometheus: {e}")),
    );
    let api = format!("http://127.0.0.1:{port}");
    let c = client();
    let query = |q: String| {
        let (c, api) = (c.clone(), api.clone());
        async move {
            let resp = c
                .get(format!("{api}/api/v1/query"))
                .query(&[("query", q.as_str())])
                .send()
                .await;
            match resp {
                Ok(r) => r.json::<Value>().await.unwrap_or_default(),
                Err(_) => Value::Null,
            }
        }
    };
    // Wait until Prometheus has scraped tollgate a few times.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = query("count_over_time(up{job=\"tollgate\"}[1m])".into()).await;
        let scrapes = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
        if scrapes >= 4.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped tollgate: {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // More refused requests now that Prometheus watches: alerts see increases.
    for _ in 0..2 {
        let r = client()
            .post(tg.url("/v1/chat/completions"))
            .header("x-tollgate-team", "broke")
            .json(&chat_body("gpt-4o"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), 429);
    }
    let up = query("up{job=\"tollgate\"}".into()).await;
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");

    // Every dashboard query parses and returns data.
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 20, "only {} dashboard queries", exprs.len());
    let mut empty = Vec::new();
    for (title, expr) in &exprs {
        let q = substitute(expr);
        let v = query(q.clone()).await;
        assert_eq!(v["status"], "success", "{title}: `{q}` failed: {v}");
        if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
            empty.push(format!("{title}: {q}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );
    println!("{} dashboard queries returned data", exprs.len());

    // Every alert rule is loaded, evaluates cleanly, and its query parses;
    // the budget-rejection alert fires for the team that was refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rules = loop {
        let v: Value = c
            .get(format!("{api}/api/v1/rules"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .json()
            .await
            .unwrap_or_default();
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = !rules.is_empty()
            && rules.iter().all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            });
        let broke_firing = rules
            .iter()
            .filter(|r| r["name"] == "TollgateBudgetRejections")
            .flat_map(|r| r["alerts"].as_array().cloned().unwrap_or_default())
            .any(|a| a["labels"]["team"] == "broke" && a["state"] == "firing");
        if evaluated && broke_firing {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "rules never evaluated or the rejection alert never fired: {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(rules.len(), 8);
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
        let q = rule["query"].as_str().unwrap_or_default().to_string();
        let v = query(q.clone()).await;
        assert_eq!(v["status"], "success", "alert `{q}`: {v}");
    }
    println!(
        "{} alert rules evaluated; TollgateBudgetRejections fired for team broke",
        rules.len()
    );
}
