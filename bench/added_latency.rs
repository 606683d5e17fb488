//! Added latency of a non-streaming chat request through tollgate versus
//! straight to the same mock upstream, measured side by side in one run:
//! requests alternate between three paths (in rotating order) so all see the
//! same machine:
//! direct, tollgate with a key of a team without a budget, and tollgate with
//! a key of a budgeted team (reservation + settlement on the path).
//!
//!     cargo build --release && cargo run --release --example added_latency -- 1000
//!
//! Prints medians and p99s of both paths and their difference.

#[path = "../tests/support/mock.rs"]
mod mock;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let mock = mock::MockUpstream::start().await;
    let dir = tempfile::tempdir()?;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nmode = \"virtual-keys\"\n[database]\nurl = \"sqlite://{}\"\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\n",
        dir.path().join("bench.db").display(),
        mock.base_url()
    );
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, config)?;
    let bin = std::env::var("TOLLGATE_BIN").unwrap_or_else(|_| "target/release/tollgate".into());
    let cli = |args: &[&str]| -> Result<String, Box<dyn std::error::Error>> {
        let out = Command::new(&bin)
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .output()?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).to_string().into());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    };
    cli(&["teams", "create", "free"])?;
    cli(&[
        "teams",
        "create",
        "budgeted",
        "--budget-usd",
        "1000000",
        "--period",
        "monthly",
    ])?;
    let free_key = cli(&["keys", "create", "--team", "free"])?;
    let budget_key = cli(&["keys", "create", "--team", "budgeted"])?;
    let mut child = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("TOLLGATE_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().ok_or("tollgate exited")??;
        if let Some(a) = line.strip_prefix("tollgate listening on ") {
            break a.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()?;
    let body = serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]});
    let direct_url = format!("{}/chat/completions", mock.base_url());
    let proxy_url = format!("http://{addr}/v1/chat/completions");
    let send = |url: String, key: String| {
        let (client, body) = (client.clone(), body.clone());
        async move {
            let t = Instant::now();
            let r = client.post(url).bearer_auth(key).json(&body).send().await?;
            let status = r.status();
            r.bytes().await?;
            if !status.is_success() {
                return Err(format!("status {status}").into());
            }
            Ok::<_, Box<dyn std::error::Error>>(t.elapsed())
        }
    };
    // Warm up every path (connection pools, key refresh, SQLite).
    std::thread::sleep(Duration::from_millis(600));
    for _ in 0..100 {
        send(direct_url.clone(), String::new()).await?;
        send(proxy_url.clone(), free_key.clone()).await?;
        send(proxy_url.clone(), budget_key.clone()).await?;
    }
    let mut paths = [
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    ];
    // The order rotates every round: a request right after another proxied
    // one pays for the previous one's background work, so a fixed order
    // would bias whichever path comes second.
    let targets = [
        (direct_url.clone(), String::new()),
        (proxy_url.clone(), free_key.clone()),
        (proxy_url.clone(), budget_key.clone()),
    ];
    for i in 0..n {
        for k in 0..3 {
            let p = (i + k) % 3;
            let (url, key) = &targets[p];
            paths[p].push(send(url.clone(), key.clone()).await?);
        }
    }
    for p in paths.iter_mut() {
        p.sort();
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p50 = |p: &[Duration]| us(percentile(p, 0.5));
    let p99 = |p: &[Duration]| us(percentile(p, 0.99));
    println!("requests per path: {n} (sequential, alternating in rotating order)");
    for (name, p) in [
        ("direct", &paths[0]),
        ("tollgate, no budget", &paths[1]),
        ("tollgate, budgeted", &paths[2]),
    ] {
        println!("{name:<22} p50 {:8.1} us  p99 {:8.1} us", p50(p), p99(p));
    }
    println!(
        "added by tollgate      p50 {:8.1} us  p99 {:8.1} us",
        p50(&paths[1]) - p50(&paths[0]),
        p99(&paths[1]) - p99(&paths[0])
    );
    println!(
        "added by budget check  p50 {:8.1} us  p99 {:8.1} us",
        p50(&paths[2]) - p50(&paths[1]),
        p99(&paths[2]) - p99(&paths[1])
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    Ok(())
}
