//! Azure OpenAI as a backend: deployment paths
//! (`{base_url}/openai/deployments/{d}/chat/completions?api-version=V`),
//! which deployment a client's model names, what model a deployment stands
//! for in the catalog, and the `api-version` sent. The key goes up as
//! `api-key` (`Provider::auth_header`). Never reads bodies.

use super::ClientPath;
use crate::config::UpstreamConfig;

/// Sent when an Azure upstream's config names no `api_version` and the
/// client's request carries none either: the current GA version.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

/// The path prefix of Azure-style client requests.
pub const AZURE_DEPLOYMENTS: &str = "/openai/deployments/";

pub struct Azure {
    api_version: Option<String>,
    /// Deployment name -> catalog model, as configured.
    deployments: Vec<(String, String)>,
}

impl Azure {
    pub fn new(api_version: Option<String>, deployments: Vec<(String, String)>) -> Azure {
        Azure {
            api_version,
            deployments,
        }
    }

    pub fn from_config(config: &UpstreamConfig) -> Azure {
        let deployments = config
            .deployments
            .iter()
            .map(|(d, m)| (d.clone(), m.clone()))
            .collect();
        Azure::new(config.api_version.clone(), deployments)
    }

    /// The catalog model a deployment name stands for (else the name).
    pub fn catalog_model<'a>(&'a self, name: &'a str) -> &'a str {
        self.deployments
            .iter()
            .find(|(d, _)| d == name)
            .map_or(name, |(_, m)| m.as_str())
    }

    /// The deployment a client's model names: the deployment itself, else
    /// the first deployment serving that model, else the name as given
    /// (deployments are often named after their model).
    fn deployment_for<'a>(&'a self, model: &'a str) -> &'a str {
        if self.deployments.iter().any(|(d, _)| d == model) {
            return model;
        }
        self.deployments
            .iter()
            .find(|(_, m)| m == model)
            .map_or(model, |(d, _)| d.as_str())
    }

    /// Appends the deployment path and `api-version` (the configured one,
    /// else the client's, else GA; the client's other query pairs kept).
    /// Refuses a deployment name that is not one (letters, digits, `-`,
    /// `_` and `.`), which the upstream might normalise into another path.
    pub fn upstream_path(
        &self,
        client: &ClientPath<'_>,
        model: &str,
        out: &mut String,
    ) -> Result<(), String> {
        let deployment = client
            .deployment
            .unwrap_or_else(|| self.deployment_for(model));
        let well_formed = deployment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && deployment != "."
            && deployment != "..";
        if !well_formed {
            return Err(format!(
                "`{}` is not an Azure deployment name (letters, digits, '-', '_', '.')",
                deployment.chars().take(64).collect::<String>()
            ));
        }
        if deployment.is_empty() {
            out.push_str("/openai");
        } else {
            out.push_str(AZURE_DEPLOYMENTS);
            out.push_str(deployment);
        }
        out.push_str(client.operation);
        // The configured version wins; else the client's; else GA.
        let mut client_version = None;
        let mut rest = Vec::new();
        for pair in client.query.unwrap_or("").split('&') {
            match pair.strip_prefix("api-version=") {
                Some(v) => client_version = Some(v),
                None if !pair.is_empty() => rest.push(pair),
                None => {}
            }
        }
        let version = self
            .api_version
            .as_deref()
            .or(client_version)
            .unwrap_or(DEFAULT_AZURE_API_VERSION);
        out.push_str("?api-version=");
        out.push_str(version);
        for pair in rest {
            out.push('&');
            out.push_str(pair);
        }
        Ok(())
    }
}
