//! Configuration: TOML file + environment, validated once at start.
//!
//! Owns every default. A bad config fails with the file, the key and the
//! reason; nothing downstream re-validates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::glob::Glob;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub catalog: CatalogConfig,
    pub budget: BudgetConfig,
    pub routing: RoutingConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub shadow: Vec<ShadowConfig>,
    pub numbers: NumbersConfig,
    pub background: BackgroundConfig,
    pub otel: OtelConfig,
    /// `[[alerts]]`: webhooks told when a budget crosses a threshold.
    pub alerts: Vec<AlertConfig>,
}

/// One `[[alerts]]` webhook (SPEC 14): a JSON POST when any budget's spend
/// first crosses each threshold in a period, signed with `secret`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Where to POST (`https://hooks.slack.com/services/...`); never logged.
    pub url: String,
    /// Fractions of the limit (1.0: reached, or a request refused).
    #[serde(default = "default_thresholds")]
    pub thresholds: Vec<f64>,
    /// HMAC-SHA256 key of `x-tollgate-signature` (`"${ALERT_SECRET}"`).
    #[serde(default)]
    pub secret: Option<String>,
}

fn default_thresholds() -> Vec<f64> {
    vec![0.5, 0.8, 1.0]
}

/// OpenTelemetry (SPEC 15): a span per request over OTLP/HTTP, made from
/// its usage row off the request path. Off unless `endpoint` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// The collector's OTLP/HTTP address (`http://collector:4318`); spans
    /// go to `{endpoint}/v1/traces`.
    pub endpoint: Option<String>,
    /// Headers on every export (a vendor's key: `"${OTEL_KEY}"`); never logged.
    pub headers: std::collections::BTreeMap<String, String>,
    /// The spans' `service.name`.
    pub service_name: String,
    /// Spans waiting for export at most; past it new spans are dropped and
    /// counted (`tollgate_otel_spans_total{outcome="dropped"}`).
    pub queue_capacity: usize,
    /// Longest one export waits for the collector, retries included.
    pub timeout_ms: u64,
}

impl Default for OtelConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            headers: Default::default(),
            service_name: "tollgate".into(),
            queue_capacity: 4_096,
            timeout_ms: 5_000,
        }
    }
}

/// Background responses (`background: true`, SPEC 12): billed when they
/// finish, which a client may never come back through tollgate to see.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackgroundConfig {
    /// How often tollgate polls the upstream itself for each response
    /// still pending (OpenAI keeps a background response ~10 minutes).
    pub poll_interval_ms: u64,
    /// A response pending longer than this is reported: logged, counted in
    /// `tollgate_pending_usage_overdue`, listed by `report`.
    pub horizon_secs: u64,
}

impl Default for BackgroundConfig {
    fn default() -> Self {
        Self {
            poll_interval_ms: 30_000,
            horizon_secs: 3_600,
        }
    }
}

/// `tollgate numbers`: what is measured beyond the usage rows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NumbersConfig {
    /// Share of requests (0..=1) whose prompt and answer are counted in
    /// words, off the request path, for tokens per word (0: none).
    pub word_sample_rate: f64,
}

impl Default for NumbersConfig {
    fn default() -> Self {
        Self {
            word_sample_rate: 0.01,
        }
    }
}

/// Shadow pricing: every request for a model matching `models` is also
/// priced as each `price_as` model, same token counts
/// (`tollgate_shadow_cost_usd_total`, `report --shadow`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    pub models: Vec<Glob>,
    pub price_as: Vec<String>,
}

impl Config {
    /// The models `model` is shadow-priced as, in configuration order
    /// (each once, never the model itself).
    pub fn shadows_of<'a>(&'a self, model: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let mut seen: Vec<&str> = Vec::new();
        self.shadow
            .iter()
            .filter(move |s| s.models.iter().any(|g| g.matches(model)))
            .flat_map(|s| s.price_as.iter().map(String::as_str))
            .filter(move |alt| {
                let new = *alt != model && !seen.contains(alt);
                if new {
                    seen.push(alt);
                }
                new
            })
    }
}

/// Fallbacks (SPEC 10): which failures send a request on to the next
/// upstream whose `models` match, and how many upstreams one request may try.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub fallback_on: Vec<FallbackOn>,
    pub max_attempts: u16,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            fallback_on: [429, 500, 502, 503, 504]
                .map(FallbackOn::Status)
                .into_iter()
                .chain(["connect", "timeout"].map(|e| FallbackOn::Error(e.into())))
                .collect(),
            max_attempts: 3,
        }
    }
}

/// An HTTP status, or `"connect"` (the upstream refused or could not be
/// reached) or `"timeout"` (no response headers within `timeout_ms`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum FallbackOn {
    Status(u16),
    Error(String),
}

impl RoutingConfig {
    pub fn retries_status(&self, status: u16) -> bool {
        self.fallback_on.contains(&FallbackOn::Status(status))
    }

    pub fn retries_error(&self, error: &str) -> bool {
        self.fallback_on
            .iter()
            .any(|f| matches!(f, FallbackOn::Error(e) if e == error))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Built-in tool calls a budget reservation covers when the request
    /// sets no `max_tool_calls`.
    pub tool_call_allowance: u64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            tool_call_allowance: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    pub admin_token: Option<String>,
    /// How long a SIGTERM waits for in-flight requests before cutting them
    /// (their usage is still recorded).
    pub drain_timeout_ms: u64,
    /// A client must send a request's whole header within this long of its
    /// first byte; a connection that does not is closed.
    pub header_timeout_ms: u64,
    /// A metered request's whole body must arrive within this long; a body
    /// streamed through to the upstream may not pause longer than this.
    pub body_timeout_ms: u64,
    /// A keep-alive connection idle this long is closed, and so is one whose
    /// client stopped reading a response for this long.
    pub idle_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    /// Rows per insert transaction.
    pub batch_size: usize,
    /// Longest a usage row waits in memory before it is written.
    pub flush_interval_ms: u64,
    /// Rows the writer keeps in memory; past it (a database outage) rows go
    /// to the spool on local disk, never the request blocked.
    pub queue_capacity: usize,
    /// What survives a crash (`kill -9`, OOM): see `Durability`.
    pub durability: Durability,
    /// Directory of the spool: rows the database could not take yet, and with
    /// `durability = "spool"` every row until it is in the database.
    /// Default: next to the SQLite file (`<file>-spool`), else `./tollgate-spool`.
    pub spool_path: Option<PathBuf>,
    /// The spool's size cap in bytes; past it rows are dropped and counted.
    pub spool_max_bytes: u64,
    /// How long a budgeted request waits for Postgres to grant a budget
    /// lease before it is refused with 503 (fail fast, fail closed).
    pub lease_timeout_ms: u64,
    /// Usage rows older than this many days are deleted (rollups kept);
    /// unset: kept forever (SPEC 15).
    pub retention_days: Option<u32>,
}

/// What a crash of the process can lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Rows are written in batches; a crash loses at most the rows of one
    /// flush interval (those not yet in a transaction).
    Batch,
    /// Every row is appended to the spool file before its response
    /// completes (group commit): a crash loses only responses not yet completed.
    Spool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// Clients send `Bearer tg-...`; the key names the team.
    VirtualKeys,
    /// Clients send their provider key; the team comes from `x-tollgate-team`.
    Passthrough,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Unset: `virtual-keys` when any team or key exists or any upstream has
    /// an `api_key`, else `passthrough` (see `server::auth_mode`).
    pub mode: Option<AuthMode>,
    /// `/v1/*` paths (`[METHOD ]GLOB`) a team with a budget may use although
    /// tollgate cannot price them; every other unmetered path is refused to
    /// such a team (403 `endpoint_not_metered`).
    pub allow_unmetered: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: None,
            allow_unmetered: vec![
                "GET /v1/models*".into(),
                "/v1/files*".into(),
                // A stored response's input items, and deleting it, are free
                // (polling and cancelling are metered: `proxy::background`).
                "GET /v1/responses/*/input_items".into(),
                "DELETE /v1/responses/*".into(),
                // Anthropic's token counting is free.
                "POST /v1/messages/count_tokens".into(),
                // So is Gemini's, and listing its models.
                "POST /v1beta/models/*:countTokens".into(),
                "POST /v1/models/*:countTokens".into(),
                "GET /v1beta/models*".into(),
            ],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnpricedPolicy {
    Allow,
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    pub path: Option<PathBuf>,
    /// Rows added to the catalog in use (the bundled one, or `path`): a
    /// self-hosted model, a negotiated price, without copying the rest.
    pub extra: Option<PathBuf>,
    pub finetune_multiple: f64,
    pub unpriced: UnpricedPolicy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// The wire format and addressing the provider speaks (SPEC 10).
    #[serde(default)]
    pub kind: ProviderKind,
    /// Required, except for `kind = "bedrock"` (default
    /// `https://bedrock-runtime.{region}.amazonaws.com`).
    #[serde(default)]
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<String>,
    /// Bedrock: the AWS region (SigV4's, and the default base URL's).
    #[serde(default)]
    pub region: Option<String>,
    /// Bedrock: AWS credentials to sign with (SigV4), instead of `api_key`.
    #[serde(default)]
    pub aws_access_key_id: Option<String>,
    #[serde(default)]
    pub aws_secret_access_key: Option<String>,
    #[serde(default)]
    pub aws_session_token: Option<String>,
    /// Azure: the `api-version` query parameter sent up.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Azure: deployment name -> catalog model.
    #[serde(default)]
    pub deployments: std::collections::BTreeMap<String, String>,
    #[serde(default = "default_models")]
    pub models: Vec<Glob>,
    #[serde(default = "default_true")]
    pub inject_stream_usage: bool,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
}

impl UpstreamConfig {
    /// `base_url`, or Bedrock's regional endpoint when it is not set.
    pub fn effective_base_url(&self) -> String {
        match (self.kind, self.base_url.is_empty(), self.region.as_deref()) {
            (ProviderKind::Bedrock, true, Some(region)) => {
                format!("https://bedrock-runtime.{region}.amazonaws.com")
            }
            _ => self.base_url.clone(),
        }
    }
}

/// `[[upstreams]] kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI and every OpenAI-compatible API.
    #[default]
    Openai,
    /// Azure OpenAI: deployment paths, `api-key`, `api-version`.
    Azure,
    /// Anthropic's Messages API.
    Anthropic,
    /// Google's Gemini API: `x-goog-api-key`, `/v1beta/models/{model}:{op}`.
    Gemini,
    /// AWS Bedrock Runtime: `/model/{id}/converse`, a Bedrock API key
    /// (Bearer) or SigV4 with AWS credentials.
    Bedrock,
}

fn default_models() -> Vec<Glob> {
    vec![Glob::new("*")]
}
fn default_true() -> bool {
    true
}
fn default_connect_timeout() -> u64 {
    5_000
}
fn default_timeout() -> u64 {
    600_000
}
fn default_idle_timeout() -> u64 {
    120_000
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 10 * 1024 * 1024,
            admin_token: None,
            drain_timeout_ms: 30_000,
            header_timeout_ms: 10_000,
            body_timeout_ms: 60_000,
            idle_timeout_ms: 120_000,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://tollgate.db".into(),
            batch_size: 4096,
            flush_interval_ms: 25,
            queue_capacity: 65_536,
            durability: Durability::Batch,
            spool_path: None,
            spool_max_bytes: 1 << 30,
            lease_timeout_ms: 1_000,
            retention_days: None,
        }
    }
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            path: None,
            extra: None,
            finetune_multiple: 6.0,
            unpriced: UnpricedPolicy::Allow,
        }
    }
}

impl UpstreamConfig {
    pub fn openai_default() -> Self {
        Self {
            name: "openai".into(),
            kind: ProviderKind::Openai,
            base_url: "https://api.openai.com/v1".into(),
            api_key: std::env::var("OPENAI_API_KEY")
                .ok()
                .filter(|k| !k.is_empty()),
            region: None,
            aws_access_key_id: None,
            aws_secret_access_key: None,
            aws_session_token: None,
            api_version: None,
            deployments: Default::default(),
            models: default_models(),
            inject_stream_usage: true,
            connect_timeout_ms: default_connect_timeout(),
            timeout_ms: default_timeout(),
            idle_timeout_ms: default_idle_timeout(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: String, reason: String },
    #[error("{file}: invalid TOML: {reason}")]
    Syntax { file: String, reason: String },
    #[error("{file}: key `{key}`: {reason}")]
    Key {
        file: String,
        key: String,
        reason: String,
    },
}

impl Config {
    /// Finds the config file (`--config`, `TOLLGATE_CONFIG`, `./tollgate.toml`,
    /// else built-in defaults), then applies the environment overrides.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let env_path = std::env::var_os("TOLLGATE_CONFIG").map(PathBuf::from);
        let path = explicit.map(Path::to_path_buf).or(env_path).or_else(|| {
            let local = PathBuf::from("tollgate.toml");
            local.exists().then_some(local)
        });
        let mut config = match &path {
            Some(path) => {
                let file = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                    file: file.clone(),
                    reason: e.to_string(),
                })?;
                Config::parse(&text, &file)?
            }
            None => Config::default(),
        };
        config.apply_env();
        let origin = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<defaults>".into());
        config.validate(&origin)?;
        Ok(config)
    }

    /// Parses TOML text, replacing `${VAR}` in every string from the environment.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.into(),
            reason: e.message().to_string(),
        })?;
        substitute_env(&mut value);
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Key {
                file: file.into(),
                key,
                reason: e.into_inner().to_string(),
            }
        })?;
        config.validate(file)?;
        Ok(config)
    }

    fn apply_env(&mut self) {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(listen) = var("TOLLGATE_LISTEN") {
            self.server.listen = listen;
        }
        if let Some(url) = var("TOLLGATE_DATABASE_URL") {
            self.database.url = url;
        }
        if let Some(token) = var("TOLLGATE_ADMIN_TOKEN") {
            self.server.admin_token = Some(token);
        }
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| ConfigError::Key {
            file: file.into(),
            key: key.into(),
            reason,
        };
        if let Err(reason) = listen_parts(&self.server.listen) {
            return Err(bad("server.listen", reason));
        }
        if self.server.max_body_bytes == 0 {
            return Err(bad("server.max_body_bytes", "must be > 0".into()));
        }
        for (key, ms) in [
            ("server.header_timeout_ms", self.server.header_timeout_ms),
            ("server.body_timeout_ms", self.server.body_timeout_ms),
            ("server.idle_timeout_ms", self.server.idle_timeout_ms),
            ("database.lease_timeout_ms", self.database.lease_timeout_ms),
            ("otel.timeout_ms", self.otel.timeout_ms),
        ] {
            if ms == 0 {
                return Err(bad(key, "must be > 0".into()));
            }
        }
        if self.database.spool_max_bytes == 0 {
            return Err(bad("database.spool_max_bytes", "must be > 0".into()));
        }
        let url = &self.database.url;
        if !["sqlite:", "postgres://", "postgresql://"]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            return Err(bad(
                "database.url",
                format!("`{url}`: use sqlite://PATH or postgres://USER@HOST/DB"),
            ));
        }
        if self.sqlite_path().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(bad(
                "database.url",
                format!("`{url}` names no file: use sqlite://PATH, e.g. sqlite://tollgate.db"),
            ));
        }
        if self.database.batch_size == 0 || self.database.queue_capacity == 0 {
            return Err(bad(
                "database",
                "batch_size and queue_capacity must be > 0".into(),
            ));
        }
        if self.database.retention_days == Some(0) {
            return Err(bad(
                "database.retention_days",
                "must be at least 1 (leave it out to keep usage rows forever)".into(),
            ));
        }
        if let Some(endpoint) = &self.otel.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(bad(
                    "otel.endpoint",
                    format!("`{endpoint}`: use the collector's OTLP/HTTP address, e.g. http://collector:4318"),
                ));
            }
        }
        for (i, a) in self.alerts.iter().enumerate() {
            if !(a.url.starts_with("http://") || a.url.starts_with("https://")) {
                return Err(bad(
                    &format!("alerts[{i}].url"),
                    "must be an http:// or https:// URL".into(),
                ));
            }
            if a.thresholds.is_empty()
                || a.thresholds
                    .iter()
                    .any(|t| !(t.is_finite() && *t > 0.0 && *t <= 10.0))
            {
                return Err(bad(
                    &format!("alerts[{i}].thresholds"),
                    format!(
                        "{:?}: fractions of the limit, each above 0 and at most 10",
                        a.thresholds
                    ),
                ));
            }
        }
        if self.otel.queue_capacity == 0 {
            return Err(bad("otel.queue_capacity", "must be > 0".into()));
        }
        let m = self.catalog.finetune_multiple;
        if !(m.is_finite() && m > 0.0) {
            return Err(bad(
                "catalog.finetune_multiple",
                format!("{m} is not a positive number"),
            ));
        }
        for (i, f) in self.routing.fallback_on.iter().enumerate() {
            let ok = match f {
                FallbackOn::Status(s) => (400..=599).contains(s),
                FallbackOn::Error(e) => matches!(e.as_str(), "connect" | "timeout"),
            };
            if !ok {
                return Err(bad(
                    &format!("routing.fallback_on[{i}]"),
                    format!("{f:?} is neither an HTTP error status (400-599) nor \"connect\" or \"timeout\""),
                ));
            }
        }
        if self.routing.max_attempts == 0 {
            return Err(bad(
                "routing.max_attempts",
                "must be at least 1 (1: no fallback)".into(),
            ));
        }
        let rate = self.numbers.word_sample_rate;
        if !(0.0..=1.0).contains(&rate) {
            return Err(bad(
                "numbers.word_sample_rate",
                format!("{rate} is not a share between 0 and 1"),
            ));
        }
        for (i, s) in self.shadow.iter().enumerate() {
            if s.models.is_empty() || s.price_as.is_empty() {
                return Err(bad(
                    &format!("shadow[{i}]"),
                    "needs `models` (globs) and `price_as` (catalog models)".into(),
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = |k: &str| format!("upstreams[{i}].{k}");
            if u.name.is_empty() {
                return Err(bad(&key("name"), "must not be empty".into()));
            }
            if !names.insert(u.name.as_str()) {
                return Err(bad(
                    &key("name"),
                    format!("duplicate upstream `{}`", u.name),
                ));
            }
            if u.kind != ProviderKind::Azure
                && (u.api_version.is_some() || !u.deployments.is_empty())
            {
                return Err(bad(
                    &key("api_version"),
                    "api_version and deployments apply to kind = \"azure\" only".into(),
                ));
            }
            let bedrock = u.kind == ProviderKind::Bedrock;
            let region = u.region.as_deref().filter(|r| !r.is_empty());
            if bedrock && region.is_none() {
                return Err(bad(
                    &key("region"),
                    "kind = \"bedrock\" needs its AWS region (e.g. \"us-east-1\")".into(),
                ));
            }
            if !bedrock
                && (u.region.is_some()
                    || u.aws_access_key_id.is_some()
                    || u.aws_secret_access_key.is_some()
                    || u.aws_session_token.is_some())
            {
                return Err(bad(
                    &key("region"),
                    "region and aws_* credentials apply to kind = \"bedrock\" only".into(),
                ));
            }
            if u.aws_access_key_id.is_some() != u.aws_secret_access_key.is_some() {
                return Err(bad(
                    &key("aws_secret_access_key"),
                    "aws_access_key_id and aws_secret_access_key go together".into(),
                ));
            }
            let base_url = u.effective_base_url();
            match reqwest::Url::parse(&base_url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                _ => {
                    return Err(bad(
                        &key("base_url"),
                        format!("`{base_url}` is not an http(s) URL"),
                    ))
                }
            }
            if u.timeout_ms == 0 || u.idle_timeout_ms == 0 || u.connect_timeout_ms == 0 {
                return Err(bad(&key("timeout_ms"), "timeouts must be > 0".into()));
            }
        }
        Ok(())
    }

    /// The SQLite file `database.url` names (`None` for Postgres).
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        sqlite_path(&self.database.url)
    }

    /// Where the spool lives: `database.spool_path`, else next to the SQLite
    /// file, else `./tollgate-spool`.
    pub fn spool_dir(&self) -> PathBuf {
        if let Some(p) = &self.database.spool_path {
            return p.clone();
        }
        match self.sqlite_path() {
            Some(db) if db.to_str() != Some(":memory:") => {
                let mut name = db.file_name().unwrap_or_default().to_os_string();
                name.push("-spool");
                db.with_file_name(name)
            }
            _ => PathBuf::from("tollgate-spool"),
        }
    }

    /// The address to listen on: `IP:port`, or `host:port` resolved now.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        let listen = &self.server.listen;
        if let Ok(addr) = listen.parse::<SocketAddr>() {
            return Ok(addr);
        }
        let (host, port) = listen_parts(listen)?;
        use std::net::ToSocketAddrs;
        (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("server.listen `{listen}`: cannot resolve `{host}`: {e}"))?
            .next()
            .ok_or_else(|| format!("server.listen `{listen}`: `{host}` has no address"))
    }

    /// Upstreams in routing order; the built-in OpenAI one when none are configured.
    pub fn effective_upstreams(&self) -> Vec<UpstreamConfig> {
        if self.upstreams.is_empty() {
            vec![UpstreamConfig::openai_default()]
        } else {
            self.upstreams.clone()
        }
    }
}

/// The SQLite file of a `sqlite:` URL, without its `?options`.
pub fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or("");
    Some(PathBuf::from(path))
}

/// `host:port` or `IP:port` (`[v6]:port`), checked without resolving.
fn listen_parts(listen: &str) -> Result<(&str, u16), String> {
    let bad = || {
        format!(
            "`{listen}` is not IP:port or host:port (e.g. 127.0.0.1:8080, 0.0.0.0:8080, localhost:8080)"
        )
    };
    if listen.parse::<SocketAddr>().is_ok() {
        let (host, port) = listen.rsplit_once(':').ok_or_else(bad)?;
        return Ok((host, port.parse().map_err(|_| bad())?));
    }
    let (host, port) = listen.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let valid_host = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    if valid_host {
        Ok((host, port))
    } else {
        Err(bad())
    }
}

/// Replaces `${VAR}` in every string value; an unset variable becomes "".
fn substitute_env(value: &mut toml::Value) {
    match value {
        toml::Value::String(s) if s.contains("${") => *s = expand(s),
        toml::Value::Array(items) => items.iter_mut().for_each(substitute_env),
        toml::Value::Table(table) => table.iter_mut().for_each(|(_, v)| substitute_env(v)),
        _ => {}
    }
}

fn expand(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                out.push_str(&std::env::var(&after[..end]).unwrap_or_default());
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n", "t.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("t.toml"), "{err}");
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = Config::parse("[server]\nmax_body_bytes = \"big\"\n", "t.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("server.max_body_bytes"), "{err}");
    }

    #[test]
    fn env_vars_are_expanded_and_unset_ones_are_empty() {
        std::env::set_var("TOLLGATE_TEST_EXPAND", "sk-123");
        assert_eq!(expand("Bearer ${TOLLGATE_TEST_EXPAND}!"), "Bearer sk-123!");
        assert_eq!(expand("${TOLLGATE_TEST_SURELY_UNSET}"), "");
        assert_eq!(expand("${unterminated"), "${unterminated");
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../config/tollgate.example.toml");
        let config = Config::parse(text, "tollgate.example.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.upstreams.len(), 1);
        assert_eq!(config.catalog.finetune_multiple, 6.0);
    }

    #[test]
    fn bad_upstream_url_is_rejected() {
        let err = Config::parse(
            "[[upstreams]]\nname = \"x\"\nbase_url = \"ftp://nope\"\n",
            "t.toml",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("upstreams[0].base_url"), "{err}");
    }
}
