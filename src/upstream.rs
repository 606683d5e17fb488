//! The configured upstreams: each a backend (`provider`) at a base URL
//! with its own pooled client, the wire formats it takes and the model
//! globs it serves; chosen by the first glob that matches. Built once at
//! start (part of `app::AppState`), read by `proxy::route` and
//! `proxy::forward`.

use std::time::Duration;

use axum::body::Body;
use http::{HeaderName, HeaderValue, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;
use crate::format::WireFormat;
use crate::glob::Glob;
use crate::provider::{ClientPath, Provider};

/// The pooled HTTP/1.1 client of one upstream.
pub enum UpstreamClient {
    /// `http://` upstreams (local models, internal gateways). Kept apart
    /// because a connection through the TLS-capable connector carries its
    /// TLS state inline even over plain TCP: 1,104 bytes against 32 per
    /// upstream connection, for as long as the connection lives.
    Plain(Client<HttpConnector, Body>),
    /// `https://` upstreams, through rustls with the webpki roots.
    Tls(Client<HttpsConnector<HttpConnector>, Body>),
}

impl UpstreamClient {
    fn new(tls: bool, connect_timeout: Duration) -> UpstreamClient {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        // hyper's client never follows redirects: a proxy hands them back.
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024);
        if !tls {
            return UpstreamClient::Plain(builder.build(http));
        }
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        UpstreamClient::Tls(builder.build(connector))
    }

    pub fn request(&self, request: http::Request<Body>) -> ResponseFuture {
        match self {
            UpstreamClient::Plain(c) => c.request(request),
            UpstreamClient::Tls(c) => c.request(request),
        }
    }
}

pub struct Upstream {
    pub name: String,
    /// Scheme, authority and path prefix (no trailing slash); request paths
    /// below `/v1` are appended to it.
    base: String,
    /// How the provider is addressed (paths, key header, deployments).
    pub provider: Provider,
    /// The server's key in the provider's header (`Authorization: Bearer`,
    /// Azure's `api-key`); sent in virtual-keys mode only.
    pub auth: Option<(HeaderName, HeaderValue)>,
    /// The configured kind: which wire formats it takes.
    kind: crate::config::ProviderKind,
    models: Vec<Glob>,
    pub inject_stream_usage: bool,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub client: UpstreamClient,
    /// `tollgate_upstream_attempts_total{upstream, outcome="ok"}`, held so
    /// the common outcome costs no label lookup.
    pub attempts_ok: prometheus::IntCounter,
}

impl Upstream {
    fn build(
        config: &UpstreamConfig,
        attempts: &prometheus::IntCounterVec,
    ) -> Result<Upstream, String> {
        let base_url = config.effective_base_url();
        let mut base = base_url.trim_end_matches('/');
        match config.kind {
            // Anthropic paths carry their `/v1`; a base URL given with it
            // (as OpenAI-style ones are) must not double it.
            crate::config::ProviderKind::Anthropic => {
                base = base.strip_suffix("/v1").unwrap_or(base);
            }
            // Gemini paths carry their version (`/v1beta`, `/v1`).
            crate::config::ProviderKind::Gemini => {
                for version in ["/v1beta", "/v1"] {
                    base = base.strip_suffix(version).unwrap_or(base);
                }
            }
            _ => {}
        }
        let base = base.to_string();
        let uri: Uri = base
            .parse()
            .map_err(|e| format!("upstreams.{}.base_url: {e}", config.name))?;
        if uri.authority().is_none() || !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(format!(
                "upstreams.{}.base_url: `{}` is not an http(s) URL",
                config.name, base_url
            ));
        }
        let client = UpstreamClient::new(
            uri.scheme_str() == Some("https"),
            Duration::from_millis(config.connect_timeout_ms),
        );
        let provider = Provider::from_config(config);
        let auth = match config.api_key.as_deref().filter(|k| !k.is_empty()) {
            Some(key) => Some(
                provider
                    .auth_header(key)
                    .map_err(|e| format!("upstreams.{}.api_key: {e}", config.name))?,
            ),
            None => None,
        };
        Ok(Upstream {
            name: config.name.clone(),
            base,
            provider,
            auth,
            kind: config.kind,
            models: config.models.clone(),
            inject_stream_usage: config.inject_stream_usage,
            timeout: Duration::from_millis(config.timeout_ms),
            idle_timeout: Duration::from_millis(config.idle_timeout_ms),
            client,
            attempts_ok: attempts.with_label_values(&[config.name.as_str(), "ok"]),
        })
    }

    /// Whether this upstream takes requests in `format`.
    pub fn serves(&self, format: WireFormat) -> bool {
        format.served_by(self.kind)
    }

    fn matches(&self, format: WireFormat, model: &str) -> bool {
        self.serves(format) && self.models.iter().any(|g| g.matches(model))
    }

    /// The upstream URI for a client path (`/v1/chat/completions?x=1`, or
    /// Azure's `/openai/deployments/{d}/...`) naming `model` (may be empty).
    pub fn url_for(&self, path_and_query: &str, model: &str) -> Result<Uri, String> {
        let mut uri = String::with_capacity(self.base.len() + path_and_query.len() + 64);
        uri.push_str(&self.base);
        self.provider
            .upstream_path(&ClientPath::parse(path_and_query), model, &mut uri)?;
        uri.parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())
    }
}

pub struct Upstreams(Vec<Upstream>);

impl Upstreams {
    pub fn build(
        configs: &[UpstreamConfig],
        attempts: &prometheus::IntCounterVec,
    ) -> Result<Upstreams, String> {
        configs
            .iter()
            .map(|c| Upstream::build(c, attempts))
            .collect::<Result<_, _>>()
            .map(Upstreams)
    }

    /// The first upstream taking `format` whose globs match the model.
    pub fn for_model(&self, model: &str, format: WireFormat) -> Option<&Upstream> {
        self.0.iter().find(|u| u.matches(format, model))
    }

    /// The next upstream after `after` serving the model (a fallback).
    pub fn next_matching(
        &self,
        model: &str,
        format: WireFormat,
        after: &Upstream,
    ) -> Option<&Upstream> {
        let start = self.0.iter().position(|u| std::ptr::eq(u, after))? + 1;
        self.0[start..].iter().find(|u| u.matches(format, model))
    }

    /// Where a request in `format` that names no model goes (`/v1/models`,
    /// files, ...): for OpenAI's format the first upstream of all.
    pub fn first_for(&self, format: WireFormat) -> Option<&Upstream> {
        if format.any_upstream_for_no_model() {
            return self.0.first();
        }
        self.0.iter().find(|u| u.serves(format))
    }

    pub fn by_name(&self, name: &str) -> Option<&Upstream> {
        self.0.iter().find(|u| u.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(base: &str) -> Upstream {
        let mut config = UpstreamConfig::openai_default();
        config.base_url = base.to_string();
        let attempts = prometheus::IntCounterVec::new(
            prometheus::Opts::new("attempts", "test"),
            &["upstream", "outcome"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Upstream::build(&config, &attempts).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn client_paths_map_below_the_base_url() {
        let u = upstream("http://127.0.0.1:9/v1/");
        assert_eq!(
            u.url_for("/v1/chat/completions?x=1&y=2", "gpt-4o")
                .map(|u| u.to_string())
                .unwrap_or_default(),
            "http://127.0.0.1:9/v1/chat/completions?x=1&y=2"
        );
        assert!(matches!(u.client, UpstreamClient::Plain(_)));
        let u = upstream("https://example.com/openai/v1");
        assert!(matches!(u.client, UpstreamClient::Tls(_)));
        assert_eq!(
            u.url_for("/v1/models", "")
                .map(|u| u.to_string())
                .unwrap_or_default(),
            "https://example.com/openai/v1/models"
        );
        let u = upstream("http://localhost:8000");
        assert_eq!(
            u.url_for("/v1/embeddings", "m")
                .map(|u| u.to_string())
                .unwrap_or_default(),
            "http://localhost:8000/embeddings"
        );
    }
}
