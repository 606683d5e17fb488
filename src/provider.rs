//! Provider kinds (SPEC 10): how each provider is addressed. A kind owns the
//! upstream path of a request (OpenAI's `/v1` paths; Azure's deployment
//! paths and `api-version` in `azure`, Bedrock's signing in `bedrock`), the header the server's key goes up in, what a
//! deployment name stands for in the catalog, and the `provider` a usage
//! row names. It never reads bodies: usage belongs to the wire format
//! (`usage`: OpenAI's, which Azure and every OpenAI-compatible API share,
//! and Anthropic's Messages).

pub mod azure;
pub mod bedrock;

pub use azure::{Azure, AZURE_DEPLOYMENTS, DEFAULT_AZURE_API_VERSION};

use http::{HeaderName, HeaderValue};

use crate::config::{ProviderKind, UpstreamConfig};

pub enum Provider {
    /// OpenAI and every OpenAI-compatible API: `{base_url}/chat/completions`,
    /// `Authorization: Bearer`.
    OpenAi,
    /// Azure OpenAI: `{base_url}/openai/deployments/{d}/chat/completions
    /// ?api-version=V`, `api-key`.
    Azure(Azure),
    /// Anthropic: `{base_url}/v1/messages`, `x-api-key`. Its OpenAI-style
    /// paths (`/v1/chat/completions`) are Anthropic's OpenAI compatibility
    /// layer and go up the same way.
    Anthropic,
    /// Google's Gemini API: `{base_url}/v1beta/models/{model}:{op}`,
    /// `x-goog-api-key`. Client paths go up as they came (less a `key`
    /// query parameter, which `proxy` removes with the other credentials).
    Gemini,
    /// AWS Bedrock Runtime: `{base_url}/model/{id}/{op}` as the client sent
    /// it, a Bedrock API key as `Authorization: Bearer` or a SigV4 signature.
    Bedrock(Box<bedrock::Bedrock>),
}

/// A client's request path in either style it may come in.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientPath<'a> {
    /// The whole path, without its query.
    pub path: &'a str,
    /// Azure style (`/openai/deployments/{d}/...`): the deployment named.
    pub deployment: Option<&'a str>,
    /// What follows `/v1` or the deployment: `/chat/completions`.
    pub operation: &'a str,
    pub query: Option<&'a str>,
}

impl<'a> ClientPath<'a> {
    pub fn parse(path_and_query: &'a str) -> ClientPath<'a> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        if let Some(rest) = path.strip_prefix(AZURE_DEPLOYMENTS) {
            let (deployment, operation) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            return ClientPath {
                path,
                deployment: Some(deployment),
                operation,
                query,
            };
        }
        ClientPath {
            path,
            deployment: None,
            operation: path.strip_prefix("/v1").unwrap_or(path),
            query,
        }
    }
}

impl Provider {
    pub fn from_config(config: &UpstreamConfig) -> Provider {
        match config.kind {
            ProviderKind::Azure => Provider::Azure(Azure::from_config(config)),
            ProviderKind::Anthropic => Provider::Anthropic,
            ProviderKind::Gemini => Provider::Gemini,
            ProviderKind::Bedrock => {
                Provider::Bedrock(Box::new(bedrock::Bedrock::from_config(config)))
            }
            ProviderKind::Openai => Provider::OpenAi,
        }
    }

    /// The `provider` of this upstream's usage rows; `openai` defers to the
    /// catalog row (`deepseek`, `gemini`, ... behind OpenAI-compatible APIs).
    pub fn name(&self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Azure(_) => "azure",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
            Provider::Bedrock(_) => "bedrock",
        }
    }

    /// The header carrying the server's key.
    pub fn auth_header(&self, key: &str) -> Result<(HeaderName, HeaderValue), String> {
        let (name, value) = match self {
            Provider::OpenAi | Provider::Bedrock(_) => {
                (http::header::AUTHORIZATION, format!("Bearer {key}"))
            }
            Provider::Azure(_) => (HeaderName::from_static("api-key"), key.to_string()),
            Provider::Anthropic => (HeaderName::from_static("x-api-key"), key.to_string()),
            Provider::Gemini => (HeaderName::from_static("x-goog-api-key"), key.to_string()),
        };
        let mut value =
            HeaderValue::from_str(&value).map_err(|_| "not a valid header value".to_string())?;
        value.set_sensitive(true);
        Ok((name, value))
    }

    /// Signs a request as it goes up, where the backend signs (Bedrock with
    /// AWS access keys); `body`: the exact payload, `None` when streamed.
    pub fn sign<B>(
        &self,
        request: &mut http::Request<B>,
        body: Option<&[u8]>,
    ) -> Result<(), String> {
        match self {
            Provider::Bedrock(b) => b.sign(request, body),
            _ => Ok(()),
        }
    }

    /// The catalog model a client's model or deployment name stands for.
    pub fn catalog_model<'a>(&'a self, name: &'a str) -> &'a str {
        match self {
            Provider::Azure(a) => a.catalog_model(name),
            Provider::OpenAi | Provider::Anthropic | Provider::Gemini | Provider::Bedrock(_) => {
                name
            }
        }
    }

    /// Appends to `out` (the upstream's base URL) the path and query for a
    /// client request naming `model` (empty when the request names none).
    /// Refuses a deployment name that is not one (Azure allows letters,
    /// digits, `-`, `_` and `.`): a model such as `../../x` would otherwise
    /// become a path the upstream may normalise into another endpoint,
    /// reached with the server's key.
    pub fn upstream_path(
        &self,
        client: &ClientPath<'_>,
        model: &str,
        out: &mut String,
    ) -> Result<(), String> {
        match self {
            // The base URL is the API's root (`https://api.anthropic.com`):
            // the version segment is part of every path.
            Provider::Anthropic => {
                out.push_str("/v1");
                out.push_str(client.operation);
                if let Some(q) = client.query {
                    out.push('?');
                    out.push_str(q);
                }
            }
            // The base URL is the API's root, as for Anthropic.
            Provider::Gemini | Provider::Bedrock(_) => {
                out.push_str(client.path);
                if let Some(q) = client.query {
                    out.push('?');
                    out.push_str(q);
                }
            }
            Provider::OpenAi => {
                out.push_str(client.operation);
                if let Some(q) = client.query {
                    out.push('?');
                    out.push_str(q);
                }
            }
            Provider::Azure(azure) => azure.upstream_path(client, model, out)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Provider {
        fn path(&self, client: &ClientPath<'_>, model: &str) -> String {
            let mut out = String::new();
            match self.upstream_path(client, model, &mut out) {
                Ok(()) => out,
                Err(e) => format!("refused: {e}"),
            }
        }
    }

    fn azure(version: Option<&str>) -> Provider {
        Provider::Azure(Azure::new(
            version.map(str::to_string),
            vec![
                ("prod-4o".into(), "gpt-4o".into()),
                ("prod-mini".into(), "gpt-4o-mini".into()),
            ],
        ))
    }

    #[test]
    fn client_paths_parse_in_both_styles() {
        assert_eq!(
            ClientPath::parse("/v1/chat/completions?x=1"),
            ClientPath {
                path: "/v1/chat/completions",
                deployment: None,
                operation: "/chat/completions",
                query: Some("x=1")
            }
        );
        assert_eq!(
            ClientPath::parse(
                "/openai/deployments/prod-4o/chat/completions?api-version=2024-06-01"
            ),
            ClientPath {
                path: "/openai/deployments/prod-4o/chat/completions",
                deployment: Some("prod-4o"),
                operation: "/chat/completions",
                query: Some("api-version=2024-06-01")
            }
        );
    }

    #[test]
    fn azure_paths_name_the_deployment_and_the_version() {
        let a = azure(Some("2024-10-21"));
        let openai_style = ClientPath::parse("/v1/chat/completions");
        // A deployment name, a model a deployment serves, a model none does.
        assert_eq!(
            a.path(&openai_style, "prod-4o"),
            "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            a.path(&openai_style, "gpt-4o-mini"),
            "/openai/deployments/prod-mini/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            a.path(&openai_style, "gpt-4.1"),
            "/openai/deployments/gpt-4.1/chat/completions?api-version=2024-10-21"
        );
        // The configured version replaces the client's; other parameters stay.
        let azure_style =
            ClientPath::parse("/openai/deployments/prod-4o/embeddings?api-version=2023-05-15&x=1");
        assert_eq!(
            a.path(&azure_style, ""),
            "/openai/deployments/prod-4o/embeddings?api-version=2024-10-21&x=1"
        );
        // Without one configured, the client's; without either, GA.
        assert_eq!(
            azure(None).path(&azure_style, ""),
            "/openai/deployments/prod-4o/embeddings?api-version=2023-05-15&x=1"
        );
        assert_eq!(
            azure(None).path(&openai_style, "prod-4o"),
            format!("/openai/deployments/prod-4o/chat/completions?api-version={DEFAULT_AZURE_API_VERSION}")
        );
    }

    #[test]
    fn a_model_that_is_no_deployment_name_never_becomes_a_path() {
        let a = azure(None);
        let openai_style = ClientPath::parse("/v1/chat/completions");
        for model in [
            "../../openai/models",
            "..",
            ".",
            "a/b",
            "x?y=1",
            "x#y",
            "x y",
            "é",
        ] {
            assert!(
                a.path(&openai_style, model).starts_with("refused: "),
                "{model}"
            );
        }
        assert_eq!(
            a.path(&openai_style, "gpt-4.1_mini-2"),
            format!("/openai/deployments/gpt-4.1_mini-2/chat/completions?api-version={DEFAULT_AZURE_API_VERSION}")
        );
        // OpenAI-style upstreams never put the model in the path.
        assert_eq!(
            Provider::OpenAi.path(&openai_style, "../x"),
            "/chat/completions"
        );
    }

    #[test]
    fn deployments_map_to_catalog_models_and_keys_to_their_header() {
        let a = azure(None);
        assert_eq!(a.catalog_model("prod-4o"), "gpt-4o");
        assert_eq!(a.catalog_model("gpt-4o"), "gpt-4o");
        assert_eq!(Provider::OpenAi.catalog_model("prod-4o"), "prod-4o");
        let (name, value) = a.auth_header("az-secret").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (name.as_str(), value.to_str().ok()),
            ("api-key", Some("az-secret"))
        );
        let (name, value) = Provider::OpenAi
            .auth_header("sk-x")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (name.as_str(), value.to_str().ok()),
            ("authorization", Some("Bearer sk-x"))
        );
    }

    #[test]
    fn openai_paths_drop_v1_and_keep_the_query() {
        let p = ClientPath::parse("/v1/chat/completions?x=1&y=2");
        assert_eq!(
            Provider::OpenAi.path(&p, "gpt-4o"),
            "/chat/completions?x=1&y=2"
        );
    }
}
