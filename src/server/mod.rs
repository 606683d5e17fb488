//! The HTTP surface: router, health and metrics endpoints, graceful shutdown.
//!
//! Layer order, outermost first (each request passes them top to bottom):
//! 1. axum's router: `/healthz`, `/readyz`, `/metrics` answer directly and
//!    need no key; `/admin/*` needs the admin token (`admin`); every `/v1/*`
//!    path goes to the proxy; anything else is an OpenAI-shaped 404.
//! 2. `proxy::handle`: request id, then the stages admit (auth, path) ->
//!    route (body facts, upstream, model policies) -> reserve (budget) ->
//!    forward (fallbacks) -> settle (price, metrics, usage row; a stream's
//!    when it ends).
//!
//! Shutdown (SIGTERM/SIGINT): stop accepting, let in-flight requests finish
//! for up to `server.drain_timeout_ms` (streams cut after that are still
//! billed), then drain the usage writer and exit 0.

pub mod admin;
pub mod connections;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::app::{AppState, RequestIds};
use crate::auth::{AuthPolicy, Directory};
use crate::budget::Ledger;
use crate::config::{AuthMode, Config, Durability};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::pricing::Catalog;
use crate::proxy;
use crate::store::spool::Spool;
use crate::store::{Store, UsageWriter, WriterConfig};
use crate::upstream::Upstreams;
use connections::Phase;

pub fn router(proxy: Arc<proxy::Proxy>) -> Router {
    let state = proxy.app.clone();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(admin::routes())
        // `/v1` and everything below it, dispatched here rather than by a
        // `/v1/{*rest}` route: a wildcard route captures the rest of the path
        // into a parameter map on every request, which the proxy never reads.
        .fallback(move |req: Request| proxy_or_not_found(proxy.clone(), req))
        .with_state(state)
}

async fn proxy_or_not_found(state: Arc<proxy::Proxy>, req: Request) -> Response {
    let path = req.uri().path();
    // OpenAI style, Azure's (`AzureOpenAI(azure_endpoint=tollgate)`),
    // Gemini's (`/v1beta/models/...`) and Bedrock's (`/model/{id}/converse`).
    if path == "/v1"
        || path.starts_with("/v1/")
        || path.starts_with("/openai/")
        || path.starts_with("/v1beta/")
        || path.starts_with("/model/")
    {
        proxy::handle(state, req).await
    } else {
        not_found(req).await
    }
}

async fn healthz() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
}

/// Ready when the database answers and usage rows reach it: 503 (with the
/// reason) while writes fail or the SQLite file was moved or deleted.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if let Err(e) = state.store.check_file() {
        return not_ready(&e.to_string());
    }
    if let Some(problem) = state.usage.problem() {
        return not_ready(&problem);
    }
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => {
            // Retention behind is said, not refused: the replica serves.
            let lag = state.metrics.retention_lag.get();
            let body = match lag {
                0 => r#"{"status":"ready"}"#.to_string(),
                _ => serde_json::json!({"status": "ready", "retention_behind_seconds": lag})
                    .to_string(),
            };
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Ok(Err(e)) => not_ready(&e.to_string()),
        Err(_) => not_ready("database did not answer within 2 s"),
    }
}

fn not_ready(reason: &str) -> Response {
    let body = serde_json::json!({"status": "unavailable", "reason": reason}).to_string();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.queue_depth.set(state.usage.depth() as i64);
    state.metrics.publish_budgets(&state.ledger.all());
    let limited = state.limits.names().len();
    state
        .metrics
        .rate_limits
        .set(i64::try_from(limited).unwrap_or(i64::MAX));
    let catalog = state.catalog.load();
    state
        .metrics
        .publish_selfhosted(&state.gpu.readings(|model| {
            catalog
                .resolve(model)
                .price
                .and_then(|p| p.gpu.as_deref().cloned())
        }));
    match state.metrics.render() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::Internal(e).into_response(),
    }
}

async fn not_found(req: Request) -> Response {
    ApiError::NotFound {
        path: req.uri().path().to_string(),
    }
    .into_response()
}

/// Loads the catalog the config names (or the bundled one), with
/// `catalog.extra`'s rows added.
pub fn load_catalog(config: &Config) -> anyhow::Result<Catalog> {
    let multiple = config.catalog.finetune_multiple;
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("catalog {}: {e}", path.display()))
    };
    let (base, base_name) = match &config.catalog.path {
        Some(path) => (
            std::borrow::Cow::Owned(read(path)?),
            path.display().to_string(),
        ),
        None => (
            std::borrow::Cow::Borrowed(crate::pricing::catalog::BUNDLED),
            "bundled catalog".to_string(),
        ),
    };
    match &config.catalog.extra {
        None => Catalog::parse(&base, multiple).map_err(|e| anyhow::anyhow!("{base_name}: {e}")),
        Some(extra) => Catalog::parse_with_extra(&base, &read(extra)?, multiple)
            .map_err(|e| anyhow::anyhow!("{base_name} + {}: {e}", extra.display())),
    }
}

/// Runs the proxy until SIGTERM/SIGINT, then drains and flushes.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    // Parsed on a thread of its own: the parser's ~1 MB of scratch then
    // leaves with that thread's allocator cache instead of staying resident
    // in the main thread's arena for the life of the process (measured with
    // the bundled catalog: +0.4 MB RSS instead of +1.4 MB).
    let catalog = std::thread::scope(|s| s.spawn(|| load_catalog(&config)).join());
    let catalog = Arc::new(catalog.map_err(|_| anyhow::anyhow!("catalog loader panicked"))??);
    let metrics = Arc::new(Metrics::new()?);
    metrics.publish_catalog(&catalog);
    let upstreams = Upstreams::build(&config.effective_upstreams(), &metrics.upstream_attempts)
        .map_err(anyhow::Error::msg)?;
    let store = Store::open(&config.database.url).await?;
    let ledger = match store.shared() {
        Some(_) => Ledger::new_shared(),
        None => Ledger::new(),
    };
    store.probe_write().await.map_err(|e| {
        anyhow::anyhow!(
            "database {} cannot be written: {e}",
            crate::store::describe_url(&config.database.url)
        )
    })?;
    let spool_dir = config.spool_dir();
    let spool = Spool::open(
        &spool_dir,
        config.database.spool_max_bytes,
        store.node().map(str::to_string),
    )
    .map_err(|e| anyhow::anyhow!("{e} (database.spool_path)"))?;
    tracing::debug!(
        spool = %spool_dir.display(),
        durability = ?config.database.durability,
        "usage writer"
    );
    if spool.needs_replay() {
        tracing::warn!(
            spool = %spool_dir.display(),
            bytes = spool.bytes(),
            "usage rows from an earlier run are in the spool; replaying them"
        );
    }
    let telemetry = crate::telemetry::Telemetry::start(&config.otel, &metrics)
        .map_err(anyhow::Error::msg)?
        .map(Arc::new);
    let (usage, writer) = UsageWriter::spawn(
        store.clone(),
        metrics.clone(),
        ledger.clone(),
        spool,
        WriterConfig {
            batch_size: config.database.batch_size,
            flush_interval: Duration::from_millis(config.database.flush_interval_ms),
            capacity: config.database.queue_capacity,
            durable: config.database.durability == Durability::Spool,
            observer: telemetry
                .clone()
                .map(|t| t as Arc<dyn crate::store::writer::WrittenRows>),
        },
    );
    // The tokenizers are not loaded here: each costs tens of MB and most
    // traffic carries upstream usage. They load on first need, off the reactor.

    let addr = config.listen_addr().map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (server.listen): {e}"))?;
    let local = listener.local_addr()?;
    let fd_limit = connections::raise_fd_limit();
    let limits = connections::Limits {
        header: Duration::from_millis(config.server.header_timeout_ms),
        idle: Duration::from_millis(config.server.idle_timeout_ms),
    };
    let drain = Duration::from_millis(config.server.drain_timeout_ms);
    let upstream_configs = config.effective_upstreams();
    let has_key =
        |u: &crate::config::UpstreamConfig| u.api_key.as_deref().is_some_and(|k| !k.is_empty());
    let has_accounts = !store.teams().await?.is_empty() || !store.keys().await?.is_empty();
    let auth = AuthPolicy::new(
        &config.auth,
        upstream_configs.iter().any(has_key),
        has_accounts,
    );
    let auth_mode = auth.mode();
    for u in &upstream_configs {
        match auth_mode {
            AuthMode::VirtualKeys if !has_key(u) => tracing::warn!(
                upstream = %u.name,
                "virtual-keys mode, but this upstream has no api_key: its requests go without provider credentials"
            ),
            AuthMode::Passthrough if has_key(u) => tracing::warn!(
                upstream = %u.name,
                "passthrough mode: this upstream's api_key is never sent (clients bring their own key)"
            ),
            _ => {}
        }
    }
    let (words, word_counter) = crate::words::WordSampler::spawn(
        config.numbers.word_sample_rate,
        store.clone(),
        metrics.clone(),
        Duration::from_millis(config.database.flush_interval_ms.max(1000)),
    );
    let otel_timeout = Duration::from_millis(config.otel.timeout_ms);
    let state = Arc::new(AppState {
        config,
        catalog: arc_swap::ArcSwap::new(catalog),
        metrics,
        upstreams,
        usage,
        store: store.clone(),
        request_ids: RequestIds::new(),
        auth,
        directory: Directory::default(),
        ledger,
        limits: crate::limits::RateLimiter::new(store.shared().is_some()),
        words,
        gpu: Default::default(),
    });
    state.refresh().await?;
    tracing::info!(?auth_mode, keys = state.directory.key_count(), "auth");
    // Keys revoked and budgets changed by another process apply within 1 s.
    let refresher = {
        let weak = Arc::downgrade(&state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let Some(state) = weak.upgrade() else { break };
                if let Err(e) = state.refresh().await {
                    tracing::warn!(error = %e, "refreshing keys and budgets failed");
                }
            }
        })
    };
    let reloader = tokio::spawn(reload_catalog(Arc::downgrade(&state)));
    let retention = crate::store::retention::spawn(
        state.store.clone(),
        state.metrics.clone(),
        state.config.database.retention_days,
    );
    let alerts = crate::alerts::spawn(
        &state.config.alerts,
        state.ledger.clone(),
        state.store.clone(),
        state.metrics.clone(),
        reqwest::Client::new(),
    );
    let proxy = Arc::new(proxy::Proxy::new(state.clone()));
    let sweeper = crate::proxy::spawn_sweeper(
        Arc::downgrade(&proxy),
        Duration::from_millis(state.config.background.poll_interval_ms),
    );
    let app = router(proxy);
    drop(state);
    tracing::info!(?fd_limit, "open-file limit");
    // The one "listening" line, on stderr for people and scripts (tests
    // read the port from it).
    eprintln!("tollgate listening on {local}");

    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Serving);
    let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
    let acceptor = tokio::spawn(connections::accept_loop(
        listener, app, limits, phase_rx, alive_tx,
    ));
    shutdown_signal().await;
    let _ = phase_tx.send(Phase::Draining);
    let _ = acceptor.await;
    if tokio::time::timeout(drain, alive_rx.recv()).await.is_err() {
        tracing::warn!("drain timeout: cutting in-flight requests");
        let _ = phase_tx.send(Phase::Cutting);
        let _ = tokio::time::timeout(Duration::from_secs(5), alive_rx.recv()).await;
    }
    refresher.abort();
    reloader.abort();
    retention.abort();
    if let Some(alerts) = alerts {
        alerts.abort();
    }
    sweeper.abort();
    // Every sink is gone once the server and its connections are: the
    // writer drains the queue and ends.
    if tokio::time::timeout(Duration::from_secs(60), writer.finish())
        .await
        .is_err()
    {
        tracing::error!("usage writer did not finish within 60 s");
    }
    // Every row is written and told: the spans still queued go now.
    if let Some(telemetry) = telemetry {
        let sent = tokio::task::spawn_blocking(move || telemetry.shutdown(otel_timeout));
        let _ = tokio::time::timeout(otel_timeout + Duration::from_secs(1), sent).await;
    }
    // The sampler went with the state: the counting thread writes its last
    // counts and ends.
    if let Some(counter) = word_counter {
        let joined = tokio::task::spawn_blocking(move || counter.join());
        if tokio::time::timeout(Duration::from_secs(10), joined)
            .await
            .is_err()
        {
            tracing::warn!("word counts not written within 10 s");
        }
    }
    if let Some(pg) = store.shared() {
        // Every row is written: this replica's leases hold nothing more.
        if let Err(e) = crate::budget::lease::release_node(pg).await {
            tracing::warn!(error = %e, "could not return budget leases");
        }
    }
    store.close().await;
    eprintln!("tollgate stopped");
    Ok(())
}

/// Re-reads the catalog files (`catalog.path`, `catalog.extra`) on SIGHUP
/// and when one changes (checked every 2 s), and swaps the catalog in whole: requests in flight
/// keep the catalog they started with, none fails. A file that does not
/// load is logged and the catalog in use stays.
async fn reload_catalog(state: std::sync::Weak<AppState>) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let paths: Vec<std::path::PathBuf> = state.upgrade().map_or_else(Vec::new, |s| {
        let c = &s.config.catalog;
        c.path.iter().chain(c.extra.iter()).cloned().collect()
    });
    let stamp = || {
        paths
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect::<Vec<_>>()
    };
    let mut seen = stamp();
    loop {
        #[cfg(unix)]
        let signal = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signal = std::future::pending::<()>();
        let why = tokio::select! {
            _ = signal => "SIGHUP",
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                let now = stamp();
                if now == seen {
                    continue;
                }
                seen = now;
                "the file changed"
            }
        };
        let Some(state) = state.upgrade() else { break };
        match load_catalog(&state.config) {
            Ok(catalog) => {
                let models = catalog.len();
                let catalog = Arc::new(catalog);
                state.metrics.publish_catalog(&catalog);
                state.catalog.store(catalog);
                tracing::info!(models, reason = why, "catalog reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, reason = why, "catalog not reloaded; the one in use stays")
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received: draining");
}
