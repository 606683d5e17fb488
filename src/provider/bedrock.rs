//! AWS Bedrock as a backend: the regional endpoint, and the server's
//! credentials, either a Bedrock API key (sent as `Authorization: Bearer`,
//! see `Provider::auth_header`) or AWS access keys that sign each request
//! with SigV4 (service `bedrock`), through the AWS SDK's own `aws-sigv4`.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;

use crate::config::UpstreamConfig;

/// The service name Bedrock Runtime is signed for.
const SERVICE: &str = "bedrock";

pub struct Bedrock {
    region: String,
    /// Set when the upstream signs with AWS access keys.
    identity: Option<Identity>,
}

impl Bedrock {
    pub fn from_config(config: &UpstreamConfig) -> Bedrock {
        let identity = match (&config.aws_access_key_id, &config.aws_secret_access_key) {
            (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => Some(
                Credentials::new(
                    id,
                    secret,
                    config.aws_session_token.clone().filter(|t| !t.is_empty()),
                    None,
                    "tollgate-config",
                )
                .into(),
            ),
            _ => None,
        };
        Bedrock {
            region: config.region.clone().unwrap_or_default(),
            identity,
        }
    }

    /// Whether requests are signed (AWS access keys, not an API key).
    pub fn signs(&self) -> bool {
        self.identity.is_some()
    }

    /// Signs `request` in place with SigV4: `authorization`, `x-amz-date`
    /// and (with a session token) `x-amz-security-token`. `body` is the
    /// exact payload sent; `None` for a body streamed through unread
    /// (signed as `UNSIGNED-PAYLOAD`). The headers signed are the ones the
    /// request carries now, so this runs last, on the request as it goes.
    pub fn sign<B>(
        &self,
        request: &mut http::Request<B>,
        body: Option<&[u8]>,
    ) -> Result<(), String> {
        let Some(identity) = &self.identity else {
            return Ok(());
        };
        let params = v4::SigningParams::builder()
            .identity(identity)
            .region(&self.region)
            .name(SERVICE)
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| e.to_string())?
            .into();
        let uri = request.uri().to_string();
        let headers: Vec<(&str, &str)> = request
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
            .collect();
        let body = match body {
            Some(bytes) => SignableBody::Bytes(bytes),
            None => SignableBody::UnsignedPayload,
        };
        let signable =
            SignableRequest::new(request.method().as_str(), &uri, headers.into_iter(), body)
                .map_err(|e| e.to_string())?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| e.to_string())?
            .into_parts();
        instructions.apply_to_request_http1x(request);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_signed_for_bedrock_in_the_region() {
        let mut config = UpstreamConfig::openai_default();
        config.kind = crate::config::ProviderKind::Bedrock;
        config.region = Some("us-west-2".into());
        config.aws_access_key_id = Some("AKIDEXAMPLE".into());
        config.aws_secret_access_key = Some("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into());
        config.aws_session_token = Some("session".into());
        let b = Bedrock::from_config(&config);
        let mut req = http::Request::post(
            "https://bedrock-runtime.us-west-2.amazonaws.com/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse",
        )
        .header("content-type", "application/json")
        .body(())
        .unwrap_or_else(|e| panic!("{e}"));
        b.sign(&mut req, Some(b"{}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
                && auth.contains("/us-west-2/bedrock/aws4_request")
                && auth.contains("SignedHeaders=")
                && auth.contains("host"),
            "{auth}"
        );
        assert!(req.headers().contains_key("x-amz-date"));
        assert_eq!(
            req.headers()
                .get("x-amz-security-token")
                .and_then(|v| v.to_str().ok()),
            Some("session")
        );
        // An API-key upstream signs nothing.
        config.aws_access_key_id = None;
        config.aws_secret_access_key = None;
        assert!(!Bedrock::from_config(&config).signs());
    }
}
