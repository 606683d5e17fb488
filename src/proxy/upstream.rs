//! Upstream selection: configured providers, each with its own pooled
//! client, chosen by the first model glob that matches.

use std::time::Duration;

use http::HeaderValue;

use crate::config::UpstreamConfig;
use crate::glob::Glob;

pub struct Upstream {
    pub name: String,
    /// Parsed once; request paths below `/v1` are appended to its path.
    base_url: reqwest::Url,
    /// `Bearer <api_key>`, sent when the client sends no Authorization.
    pub authorization: Option<HeaderValue>,
    models: Vec<Glob>,
    pub inject_stream_usage: bool,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub client: reqwest::Client,
}

impl Upstream {
    fn build(config: &UpstreamConfig) -> Result<Upstream, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            // A proxy hands a redirect back to its client; it never follows one.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("upstream `{}`: {e}", config.name))?;
        let authorization = match config.api_key.as_deref().filter(|k| !k.is_empty()) {
            Some(key) => Some(
                HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    format!(
                        "upstreams.{}.api_key: not a valid header value",
                        config.name
                    )
                })?,
            ),
            None => None,
        };
        Ok(Upstream {
            name: config.name.clone(),
            base_url: reqwest::Url::parse(config.base_url.trim_end_matches('/'))
                .map_err(|e| format!("upstreams.{}.base_url: {e}", config.name))?,
            authorization,
            models: config.models.clone(),
            inject_stream_usage: config.inject_stream_usage,
            timeout: Duration::from_millis(config.timeout_ms),
            idle_timeout: Duration::from_millis(config.idle_timeout_ms),
            client,
        })
    }

    /// The upstream URL for a client path (`/v1/chat/completions?x=1`),
    /// without re-parsing the scheme and host on every request.
    pub fn url_for(&self, path_and_query: &str) -> reqwest::Url {
        let rest = path_and_query.strip_prefix("/v1").unwrap_or(path_and_query);
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut url = self.base_url.clone();
        let base_path = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base_path}{path}"));
        url.set_query(query);
        url
    }
}

pub struct Upstreams(Vec<Upstream>);

impl Upstreams {
    pub fn build(configs: &[UpstreamConfig]) -> Result<Upstreams, String> {
        configs
            .iter()
            .map(Upstream::build)
            .collect::<Result<_, _>>()
            .map(Upstreams)
    }

    /// The first upstream whose globs match the model.
    pub fn for_model(&self, model: &str) -> Option<&Upstream> {
        self.0
            .iter()
            .find(|u| u.models.iter().any(|g| g.matches(model)))
    }

    pub fn by_name(&self, name: &str) -> Option<&Upstream> {
        self.0.iter().find(|u| u.name == name)
    }

    /// Where requests without a model (`/v1/models`, files, ...) go.
    pub fn default_upstream(&self) -> Option<&Upstream> {
        self.0.first()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(base: &str) -> Upstream {
        let mut config = UpstreamConfig::openai_default();
        config.base_url = base.to_string();
        Upstream::build(&config).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn client_paths_map_below_the_base_url() {
        let u = upstream("http://127.0.0.1:9/v1/");
        assert_eq!(
            u.url_for("/v1/chat/completions?x=1&y=2").as_str(),
            "http://127.0.0.1:9/v1/chat/completions?x=1&y=2"
        );
        let u = upstream("https://example.com/openai/v1");
        assert_eq!(
            u.url_for("/v1/models").as_str(),
            "https://example.com/openai/v1/models"
        );
        let u = upstream("http://localhost:8000");
        assert_eq!(
            u.url_for("/v1/embeddings").as_str(),
            "http://localhost:8000/embeddings"
        );
    }
}
