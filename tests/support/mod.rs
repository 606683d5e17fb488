//! Test support: the mock upstream and a real `tollgate serve` process on a
//! random loopback port, with helpers to read its database and metrics.
#![allow(dead_code)]

pub mod mock;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Row;

pub use mock::MockUpstream;

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// The server binary the tests start: `TOLLGATE_TEST_BIN` (e.g. a release
/// build, to measure at realistic speed), else the test build's own.
pub fn server_bin() -> String {
    std::env::var("TOLLGATE_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// The base config's auth table. Explicit passthrough: the upstream has an
/// `api_key`, which without it would make the server `virtual-keys`; in
/// passthrough that key is never sent upstream.
pub const PASSTHROUGH_AUTH: &str = "[auth]\nmode = \"passthrough\"\n";

/// The config every test starts from: one upstream, the mock.
pub fn base_config(mock: &MockUpstream, dir: &std::path::Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[database]
url = "sqlite://{db}"
flush_interval_ms = 20

{PASSTHROUGH_AUTH}
[[upstreams]]
name = "mock"
base_url = "{base}"
api_key = "sk-upstream-secret"
timeout_ms = 5000
idle_timeout_ms = 5000
"#,
        db = dir.join("tollgate.db").display(),
        base = mock.base_url(),
    )
}

pub struct Tollgate {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Tollgate {
    /// Starts tollgate against the mock with the base config plus `extra`
    /// TOML; an `[auth]` table in `extra` replaces the base's passthrough.
    pub async fn start(mock: &MockUpstream, extra: &str) -> Tollgate {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mut base = base_config(mock, dir.path());
        if extra.contains("[auth]") {
            base = base.replace(PASSTHROUGH_AUTH, "");
        }
        let config = format!("{base}\n{extra}\n");
        Tollgate::start_with_config(dir, &config).await
    }

    pub async fn start_with_config(dir: tempfile::TempDir, config: &str) -> Tollgate {
        Tollgate::start_in_shell(dir, config, "").await
    }

    /// Starts `tollgate serve` through `sh -c "SETUP; exec tollgate ..."`,
    /// e.g. with `ulimit -n 256` as the setup.
    pub async fn start_in_shell(dir: tempfile::TempDir, config: &str, setup: &str) -> Tollgate {
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, config).unwrap_or_else(|e| panic!("write config: {e}"));
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("{setup}\nexec \"$0\" serve --config \"$1\""))
            .arg(server_bin())
            .arg(&path)
            .current_dir(dir.path())
            .env("TOLLGATE_LOG", "warn")
            .env_remove("TOLLGATE_LISTEN")
            .env_remove("TOLLGATE_DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn tollgate: {e}"));
        let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("tollgate listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
                if let Ok(mut l) = log2.lock() {
                    l.push(line);
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| {
                panic!(
                    "tollgate did not start: {:?}",
                    log.lock().map(|l| l.clone())
                )
            });
        Tollgate {
            addr: addr.parse().unwrap_or_else(|e| panic!("addr {addr}: {e}")),
            dir,
            child,
            log,
        }
    }

    /// Runs a `tollgate` subcommand against this server's config and database.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("tollgate.toml"))
            .env("TOLLGATE_LOG", "warn")
            .env_remove("TOLLGATE_DATABASE_URL")
            .output()
            .unwrap_or_else(|e| panic!("run tollgate {args:?}: {e}"))
    }

    /// A new virtual key of `team`, made with the CLI (the running server
    /// knows it within its 500 ms refresh: `wait_for_key`).
    pub fn new_key(&self, team: &str) -> String {
        stdout(&self.cli(&["keys", "create", "--team", team]))
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// Stops this server (SIGTERM) and starts a new one on the same config and database.
    pub async fn restart(mut self) -> Tollgate {
        let code = self.terminate();
        assert_eq!(code, Some(0));
        let config =
            std::fs::read_to_string(self.dir.path().join("tollgate.toml")).unwrap_or_default();
        let dir = std::mem::replace(
            &mut self.dir,
            tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")),
        );
        Tollgate::start_with_config(dir, &config).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident memory in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Open file descriptors of the server.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("tollgate.db")
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub async fn db(&self) -> sqlx::SqlitePool {
        sqlx::SqlitePool::connect(&format!("sqlite://{}", self.db_path().display()))
            .await
            .unwrap_or_else(|e| panic!("open db: {e}"))
    }

    /// Waits until the usage table holds `n` rows, then returns them (oldest first).
    pub async fn wait_rows(&self, n: usize) -> Vec<UsageRow> {
        self.wait_rows_where(n, |_| true).await
    }

    /// Waits until exactly `n` usage rows satisfy `pred`; returns those rows.
    /// Creates `team` with a budget of `usd` per `period` and returns a
    /// key of it the server already knows.
    pub async fn budgeted_key(&self, team: &str, usd: &str, period: &str) -> String {
        stdout(&self.cli(&[
            "teams",
            "create",
            team,
            "--budget-usd",
            usd,
            "--period",
            period,
        ]));
        let key = self.new_key(team);
        wait_for_key(self, &key).await;
        key
    }

    /// The usage row of request `id`, once written.
    pub async fn row(&self, id: &str) -> UsageRow {
        let id = id.to_string();
        self.wait_rows_where(1, |r| r.request_id == id)
            .await
            .remove(0)
    }

    pub async fn wait_rows_where(
        &self,
        n: usize,
        pred: impl Fn(&UsageRow) -> bool,
    ) -> Vec<UsageRow> {
        let pool = self.db().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rows: Vec<UsageRow> = fetch_rows(&pool).await.into_iter().filter(&pred).collect();
            if rows.len() >= n || Instant::now() > deadline {
                pool.close().await;
                assert_eq!(
                    rows.len(),
                    n,
                    "matching usage rows: {:#?}",
                    &rows[..rows.len().min(5)]
                );
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits (10 s at most) until `/metrics` reads as `ready` wants; each
    /// try's failure says what was seen.
    pub async fn wait_metrics(&self, ready: impl Fn(&str) -> Result<(), String>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let seen = ready(&self.metrics().await);
            match seen {
                Ok(()) => return,
                Err(why) => assert!(std::time::Instant::now() < deadline, "{why}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap_or_else(|e| panic!("metrics: {e}"))
            .text()
            .await
            .unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the process to exit; returns its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub request_id: String,
    pub team: String,
    pub key_id: Option<String>,
    pub model: String,
    pub base_model: String,
    pub upstream: String,
    pub endpoint: String,
    pub stream: bool,
    pub status: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cost_nano_usd: i64,
    pub token_source: String,
    pub latency_ms: i64,
    pub end_user: Option<String>,
    pub created_at: String,
    pub service_tier: Option<String>,
    pub reasoning_tokens: i64,
    pub audio_prompt_tokens: i64,
    pub audio_completion_tokens: i64,
    pub cache_write_tokens: i64,
    pub image_tokens: i64,
    pub tool_calls: i64,
    pub provider: String,
    pub cost_breakdown: String,
    /// The `meters` column: every billed meter apart.
    pub meters: String,
    pub attempts: i64,
    pub choices: i64,
    pub capped: bool,
    /// The batch of a result line's row ('' for every other row).
    pub batch_id: String,
}

async fn fetch_rows(pool: &sqlx::SqlitePool) -> Vec<UsageRow> {
    let rows = match sqlx::query("SELECT * FROM usage ORDER BY id")
        .fetch_all(pool)
        .await
    {
        Ok(rows) => rows,
        Err(_) => return Vec::new(),
    };
    rows.iter()
        .map(|r| UsageRow {
            request_id: r.get("request_id"),
            team: r.get("team"),
            key_id: r.get("key_id"),
            model: r.get("model"),
            base_model: r.get("base_model"),
            upstream: r.get("upstream"),
            endpoint: r.get("endpoint"),
            stream: r.get::<i64, _>("stream") != 0,
            status: r.get("status"),
            prompt_tokens: r.get("prompt_tokens"),
            completion_tokens: r.get("completion_tokens"),
            cached_tokens: r.get("cached_tokens"),
            cost_nano_usd: r.get("cost_nano_usd"),
            token_source: r.get("token_source"),
            latency_ms: r.get("latency_ms"),
            end_user: r.get("end_user"),
            created_at: r.get("created_at"),
            service_tier: r.try_get("service_tier").unwrap_or(None),
            reasoning_tokens: r.try_get("reasoning_tokens").unwrap_or(0),
            audio_prompt_tokens: r.try_get("audio_prompt_tokens").unwrap_or(0),
            audio_completion_tokens: r.try_get("audio_completion_tokens").unwrap_or(0),
            cache_write_tokens: r.try_get("cache_write_tokens").unwrap_or(0),
            image_tokens: r.try_get("image_tokens").unwrap_or(0),
            tool_calls: r.try_get("tool_calls").unwrap_or(0),
            provider: r.try_get("provider").unwrap_or_default(),
            cost_breakdown: r.try_get("cost_breakdown").unwrap_or_default(),
            meters: r.try_get("meters").unwrap_or_default(),
            attempts: r.try_get("attempts").unwrap_or(1),
            choices: r.try_get("choices").unwrap_or(1),
            capped: r.try_get::<i64, _>("capped").unwrap_or(0) != 0,
            batch_id: r.try_get("batch_id").unwrap_or_default(),
        })
        .collect()
}

/// The value of one sample in Prometheus text output, e.g.
/// `metric(&text, "tollgate_cost_usd_total", &[("team", "t")])`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, rest) = match series.split_once('{') {
                Some((n, r)) => (n, r.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
            all.then(|| value.parse().ok()).flatten()
        })
}

/// Waits for the word-counting thread's flush (`numbers.word_sample_rate`):
/// `tollgate numbers` shows at least `groups` family/script groups, which
/// it returns (`tokens_per_word`).
pub async fn wait_word_counts(tg: &Tollgate, groups: usize) -> serde_json::Value {
    for _ in 0..100 {
        let n: serde_json::Value =
            serde_json::from_str(&stdout(&tg.cli(&["numbers", "--format", "json"])))
                .unwrap_or_default();
        if n["tokens_per_word"].as_array().map_or(0, Vec::len) >= groups {
            return n["tokens_per_word"].clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("word counts never reached {groups} groups");
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_else(|e| panic!("client: {e}"))
}

/// POSTs `body` to tollgate's chat endpoint with a bearer key and extra
/// headers (`x-mock-*` steer the mock).
pub async fn post_chat(
    tg: &Tollgate,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client()
        .post(tg.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.unwrap_or_else(|e| panic!("{e}"))
}

/// A request in Anthropic's shape (`x-api-key`, `anthropic-version`) to
/// `url`, with `headers` (the mock's `x-mock-*` among them).
pub fn messages(
    url: String,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    let mut req = client()
        .post(url)
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req
}

pub fn chat_body(model: &str) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello"}],
    })
}

/// Keys made by the CLI for the SDK end-to-end tests.
pub struct SdkKeys {
    /// Team `app` ($10 monthly), every model.
    pub key: String,
    /// Team `app`, `gpt-4o-mini*` only.
    pub restricted: String,
    /// Team `broke`, whose budget ($0.000001) covers no request.
    pub broke: String,
}

/// A tollgate in `virtual-keys` mode with teams and keys for SDK clients.
pub async fn start_for_sdks(mock: &MockUpstream) -> (Tollgate, SdkKeys) {
    let tg = Tollgate::start(mock, "[auth]\nmode = \"virtual-keys\"\n").await;
    let run = |args: &[&str]| {
        let out = tg.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    run(&[
        "teams",
        "create",
        "app",
        "--budget-usd",
        "10",
        "--period",
        "monthly",
    ]);
    run(&[
        "teams",
        "create",
        "broke",
        "--budget-usd",
        "0.000001",
        "--period",
        "daily",
    ]);
    let keys = SdkKeys {
        key: run(&["keys", "create", "--team", "app"]),
        restricted: run(&[
            "keys",
            "create",
            "--team",
            "app",
            "--models",
            "gpt-4o-mini*",
        ]),
        broke: run(&["keys", "create", "--team", "broke"]),
    };
    // The running server loads new keys within its 500 ms refresh.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client()
            .get(tg.url("/v1/models"))
            .bearer_auth(&keys.broke)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if r == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "keys never became valid");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (tg, keys)
}

/// Runs an SDK script (`program script`) against `tg` with the keys in its
/// environment; asserts it exited 0 and returns its stdout.
pub async fn run_sdk_script(
    program: PathBuf,
    script: PathBuf,
    tg: &Tollgate,
    keys: SdkKeys,
) -> String {
    let env = [
        ("TOLLGATE_BASE_URL", tg.url("/v1")),
        ("TG_KEY", keys.key),
        ("TG_KEY_RESTRICTED", keys.restricted),
        ("TG_KEY_BROKE", keys.broke),
    ];
    run_script(program, script, &env).await
}

/// Runs `program script` with `env` off the test's runtime threads;
/// asserts it exited 0 and returns its stdout.
pub async fn run_script(program: PathBuf, script: PathBuf, env: &[(&str, String)]) -> String {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&program)
            .arg(script)
            .envs(env)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Starts tollgate with `config` and a team `app` with $10 a month, and
/// returns a key of that team the server already knows.
pub async fn start_with_budgeted_key(dir: tempfile::TempDir, config: &str) -> (Tollgate, String) {
    let tg = Tollgate::start_with_config(dir, config).await;
    let key = tg.budgeted_key("app", "10", "monthly").await;
    (tg, key)
}

/// A command's stdout, after asserting it succeeded.
pub fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Waits until a running server knows a key made by the CLI (its refresh
/// runs every 500 ms), probing with `/v1/models`, which costs nothing.
pub async fn wait_for_key(tg: &Tollgate, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = client()
            .get(tg.url("/v1/models"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if r.status() != 401 {
            return;
        }
        assert!(Instant::now() < deadline, "key never became valid");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` tollgates sharing `db` (replicas) in virtual-keys mode, each with
/// `extra` TOML appended to its config.
pub async fn replicas(mock: &MockUpstream, db: &PgDb, n: usize, extra: &str) -> Vec<Tollgate> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let config = format!(
            "{}\n[auth]\nmode = \"virtual-keys\"\n{extra}",
            config_with_database(mock, dir.path(), &db.url).replace(PASSTHROUGH_AUTH, "")
        );
        out.push(Tollgate::start_with_config(dir, &config).await);
    }
    out
}

/// A fresh Postgres database for one test, dropped again by `drop_db`.
/// None (with a notice) when TOLLGATE_TEST_POSTGRES_URL is not set; in CI it
/// is set and these tests must run.
pub struct PgDb {
    pub url: String,
    admin_url: String,
    name: String,
}

impl PgDb {
    pub async fn create(test: &str) -> Option<PgDb> {
        let Ok(admin_url) = std::env::var("TOLLGATE_TEST_POSTGRES_URL") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: CI must set TOLLGATE_TEST_POSTGRES_URL (.ci/run does)"
            );
            eprintln!("SKIPPED {test}: TOLLGATE_TEST_POSTGRES_URL is not set");
            return None;
        };
        let mut bytes = [0u8; 6];
        getrandom::getrandom(&mut bytes).unwrap_or_else(|e| panic!("{e}"));
        let name = format!(
            "tg_{}_{}",
            test.chars().take(20).collect::<String>(),
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let admin = sqlx::PgPool::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("connect {admin_url}: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        admin.close().await;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(b, _)| b);
        Some(PgDb {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        })
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.url))
    }

    pub async fn drop_db(self) {
        if let Ok(admin) = sqlx::PgPool::connect(&self.admin_url).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

/// Sends `request` (the raw bytes of an HTTP/1.1 request) over a new
/// connection and returns the status code and body of the answer. For paths
/// an HTTP client library would normalise (`/v1/../admin`).
pub async fn raw_request(addr: SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .write_all(request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `base_config` with its SQLite url swapped for `url`.
pub fn config_with_database(mock: &MockUpstream, dir: &std::path::Path, url: &str) -> String {
    let sqlite = format!("url = \"sqlite://{}\"", dir.join("tollgate.db").display());
    base_config(mock, dir).replace(&sqlite, &format!("url = \"{url}\""))
}

/// The Python with the official SDKs (`tests/e2e/requirements.txt`):
/// `TOLLGATE_TEST_PYTHON`, else the repo's `.venv`. `None` (the test is
/// skipped) only outside CI.
pub fn sdk_python() -> Option<PathBuf> {
    let python = std::env::var_os("TOLLGATE_TEST_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
            venv.exists().then_some(venv)
        });
    if python.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide the SDK venv"
        );
        eprintln!(
            "skipped: no .venv with the SDKs (run .ci/run once, or set TOLLGATE_TEST_PYTHON)"
        );
    }
    python
}

/// The first ```toml block of the README section headed `## {heading}`,
/// as written: the tests run the snippets users copy.
pub fn readme_toml(heading: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .unwrap_or_else(|e| panic!("{e}"));
    let at = readme
        .find(&format!("## {heading}\n"))
        .unwrap_or_else(|| panic!("no README section {heading:?}"));
    let section = &readme[at..];
    let start = section
        .find("```toml\n")
        .unwrap_or_else(|| panic!("no toml block in {heading:?}"))
        + 8;
    section[start..start + section[start..].find("```").unwrap_or(0)].to_string()
}

/// The README's `heading` snippet as written, the mock standing in for
/// the provider's `host` and `key_var` (`${...}`) filled with `key`, in a
/// config around it.
pub fn readme_config(
    heading: &str,
    mock: &MockUpstream,
    dir: &std::path::Path,
    host: &str,
    (key_var, key): (&str, &str),
) -> String {
    let snippet = readme_toml(heading);
    assert!(snippet.contains(host), "{snippet}");
    let snippet = snippet
        .replace(host, &format!("http://{}", mock.addr))
        .replace(key_var, key);
    config_around(dir, &snippet)
}

/// Asserts that a script printed each of `lines` as a whole line.
pub fn assert_lines(stdout: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            stdout.lines().any(|l| l == *line),
            "{line:?} not in\n{stdout}"
        );
    }
}

/// The id tollgate gave a request (`x-tollgate-request-id`).
pub fn request_id(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-tollgate-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Starts tollgate with `config`, a team `app` with $10 a month and a team
/// `broke` with a micro-dollar a day; returns a key of each.
pub async fn start_app_and_broke(
    dir: tempfile::TempDir,
    config: &str,
) -> (Tollgate, String, String) {
    let (tg, key) = start_with_budgeted_key(dir, config).await;
    let broke = tg.budgeted_key("broke", "0.000001", "daily").await;
    (tg, key, broke)
}

/// A config around `upstreams` (TOML): SQLite in `dir`, virtual keys.
pub fn config_around(dir: &std::path::Path, upstreams: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[database]\nurl = \"sqlite://{db}\"\nflush_interval_ms = 20\n\n[auth]\nmode = \"virtual-keys\"\n\n{upstreams}",
        db = dir.join("tollgate.db").display(),
    )
}

/// Asserts that every report the rollups answer (`Store::report`) equals
/// the same report read from the rows (`Store::report_rows`), since each of
/// `since`; returns the total cost since the first.
pub async fn assert_rollups_match_rows(
    store: &tollgate::store::Store,
    since: &[chrono::DateTime<chrono::Utc>],
) -> i64 {
    use tollgate::store::ReportBy;
    let mut total = None;
    for &t in since {
        for by in [
            ReportBy::Team,
            ReportBy::Model,
            ReportBy::Key,
            ReportBy::Day,
            ReportBy::Component,
            ReportBy::Provider,
            ReportBy::Tier,
        ] {
            let fast = store.report(by, t).await.unwrap_or_else(|e| panic!("{e}"));
            let mut rows = store
                .report_rows(by, t, None)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            rows.sort_by(|a, b| a.group.cmp(&b.group));
            assert_eq!(fast, rows, "report --by {by:?} since {t}");
            if by == ReportBy::Team && total.is_none() {
                total = Some(fast.iter().map(|r| r.cost_nano_usd).sum());
            }
        }
    }
    total.unwrap_or(0)
}

/// A usage row of `team` and `model` at `created_at` with nothing counted
/// yet: tests set what they need and write it with `Store::insert_usage`.
pub fn usage_record(
    request_id: &str,
    team: &str,
    model: &str,
    created_at: chrono::DateTime<chrono::Utc>,
) -> tollgate::store::UsageRecord {
    tollgate::store::UsageRecord::plain(request_id, team, model, created_at)
}
