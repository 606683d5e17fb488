//! AWS Bedrock Runtime through tollgate (SPEC 11): the README's "AWS
//! Bedrock" snippet as written (the mock's address as its `base_url`), the
//! mock speaking Converse JSON, event-stream frames and Bedrock's errors,
//! exact costs with cache reads and writes, Anthropic bodies on `/invoke*`,
//! SigV4 signing with access keys, and the official `boto3` client.

mod support;

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::HeaderValue;
use bytes::BytesMut;
use serde_json::{json, Value};
use support::{client, MockUpstream, Tollgate};

const SERVER_KEY: &str = "ABSK-upstream-secret";
const MODEL: &str = "us.anthropic.claude-sonnet-4-5-20250929-v1:0";
/// The model id as boto3 puts it in the path.
const MODEL_IN_PATH: &str = "us.anthropic.claude-sonnet-4-5-20250929-v1%3A0";

fn bedrock_snippet(mock: &MockUpstream) -> String {
    let snippet = support::readme_toml("AWS Bedrock");
    assert!(snippet.contains("kind = \"bedrock\""), "{snippet}");
    snippet
        .replace(
            "kind = \"bedrock\"",
            &format!("kind = \"bedrock\"\nbase_url = \"http://{}\"", mock.addr),
        )
        .replace("${AWS_BEARER_TOKEN_BEDROCK}", SERVER_KEY)
}

struct Bedrock {
    tg: Tollgate,
    key: String,
    broke: String,
}

async fn start_with(upstreams: &str) -> Bedrock {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = support::config_around(dir.path(), upstreams);
    let (tg, key, broke) = support::start_app_and_broke(dir, &config).await;
    Bedrock { tg, key, broke }
}

async fn start(mock: &MockUpstream) -> Bedrock {
    start_with(&bedrock_snippet(mock)).await
}

fn converse_body() -> Value {
    json!({"messages": [{"role": "user", "content": [{"text": "Hello, Bedrock"}]}],
           "inferenceConfig": {"maxTokens": 1024}})
}

fn anthropic_body() -> Value {
    json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 1024,
           "messages": [{"role": "user", "content": "Hello, Claude"}]})
}

/// A request as boto3 sends it with `AWS_BEARER_TOKEN_BEDROCK`.
fn call(
    tg: &Tollgate,
    op: &str,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    let mut req = client()
        .post(tg.url(&format!("/model/{MODEL_IN_PATH}/{op}")))
        .header("authorization", format!("Bearer {key}"))
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req
}

/// 1,000 uncached input, 2,000 cache reads, 400 cache writes, 200 output on
/// us.anthropic.claude-sonnet-4-5 ($3.30 / $16.50 per M, reads $0.33,
/// writes $4.125): 3,300,000 + 660,000 + 1,650,000 + 3,300,000 nano-USD.
const EVERY_KIND: [(&str, &str); 4] = [
    ("x-mock-prompt-tokens", "1000"),
    ("x-mock-cached-tokens", "2000"),
    ("x-mock-cache-write-5m", "400"),
    ("x-mock-completion-tokens", "200"),
];
const EVERY_KIND_COST: i64 = 8_910_000;

/// The frames of an event stream: (`:event-type`, payload JSON).
fn frames(bytes: &[u8]) -> Vec<(String, Value)> {
    let mut buf = BytesMut::from(bytes);
    let mut decoder = MessageFrameDecoder::new();
    let mut out = Vec::new();
    while let Ok(DecodedFrame::Complete(m)) = decoder.decode_frame(&mut buf) {
        let kind = m
            .headers()
            .iter()
            .find(|h| h.name().as_str() == ":event-type")
            .and_then(|h| match h.value() {
                HeaderValue::String(s) => Some(s.as_str().to_string()),
                _ => None,
            })
            .unwrap_or_default();
        out.push((
            kind,
            serde_json::from_slice(m.payload()).unwrap_or_default(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converse_is_priced_exactly_streamed_or_not() {
    let mock = MockUpstream::start().await;
    let b = start(&mock).await;

    let r = call(&b.tg, "converse", &b.key, &converse_body(), &EVERY_KIND)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("x-tollgate-cost-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.008910000")
    );
    let row = b.tg.row(&support::request_id(&r)).await;
    assert_eq!(
        (
            row.endpoint.as_str(),
            row.provider.as_str(),
            row.model.as_str(),
            row.stream
        ),
        ("converse", "bedrock", MODEL, false)
    );
    assert_eq!(
        (
            row.prompt_tokens,
            row.cached_tokens,
            row.cache_write_tokens,
            row.completion_tokens
        ),
        (3_400, 2_000, 400, 200)
    );
    assert_eq!(row.cost_nano_usd, EVERY_KIND_COST);
    let up = mock.last();
    assert_eq!(up.path, format!("/model/{MODEL_IN_PATH}/converse"));
    assert_eq!(
        up.header("authorization").as_deref(),
        Some(format!("Bearer {SERVER_KEY}").as_str())
    );

    // ConverseStream: the frames reach the client whole; `metadata` counts.
    let r = call(
        &b.tg,
        "converse-stream",
        &b.key,
        &converse_body(),
        &EVERY_KIND,
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/vnd.amazon.eventstream")
    );
    let id = support::request_id(&r);
    let bytes = r.bytes().await.unwrap_or_default();
    let got = frames(&bytes);
    let kinds: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "messageStart",
            "contentBlockDelta",
            "contentBlockDelta",
            "contentBlockDelta",
            "contentBlockDelta",
            "contentBlockStop",
            "messageStop",
            "metadata"
        ]
    );
    let text: String = got
        .iter()
        .filter_map(|(_, v)| v["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "Hello from the mock");
    let row = b.tg.row(&id).await;
    assert!(row.stream);
    assert_eq!((row.status, row.cost_nano_usd), (200, EVERY_KIND_COST));
    assert_eq!(row.token_source, "upstream");
    for r in mock.requests() {
        for (name, value) in &r.headers {
            assert!(
                !value.to_str().unwrap_or("").contains("tg-"),
                "{name} carried the client's key"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_with_an_anthropic_body_is_priced_as_messages() {
    let mock = MockUpstream::start().await;
    let b = start(&mock).await;
    let r = call(&b.tg, "invoke", &b.key, &anthropic_body(), &EVERY_KIND)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let row = b.tg.row(&support::request_id(&r)).await;
    assert_eq!(
        (row.endpoint.as_str(), row.model.as_str()),
        ("messages", MODEL)
    );
    assert_eq!(row.cost_nano_usd, EVERY_KIND_COST);

    // The stream: Anthropic's events, base64 inside `chunk` frames.
    let r = call(
        &b.tg,
        "invoke-with-response-stream",
        &b.key,
        &anthropic_body(),
        &EVERY_KIND,
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let id = support::request_id(&r);
    let bytes = r.bytes().await.unwrap_or_default();
    assert!(frames(&bytes).iter().all(|(k, _)| k == "chunk"));
    let row = b.tg.row(&id).await;
    assert!(row.stream);
    assert_eq!((row.status, row.cost_nano_usd), (200, EVERY_KIND_COST));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_early_is_billed_for_what_it_delivered() {
    let mock = MockUpstream::start().await;
    let b = start(&mock).await;
    for behaviour in [("x-mock-stream-error", "1"), ("x-mock-cut-after", "1")] {
        let r = call(
            &b.tg,
            "converse-stream",
            &b.key,
            &converse_body(),
            &[behaviour],
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), 200);
        let id = support::request_id(&r);
        let _ = r.bytes().await;
        let row = b.tg.row(&id).await;
        assert_eq!(row.token_source, "estimated", "{behaviour:?}");
        // "Hello, Bedrock" and the role counted for the prompt, the one
        // delta delivered ("Hello ") for the output, at list prices.
        assert!(
            row.prompt_tokens > 0 && row.completion_tokens > 0,
            "{row:?}"
        );
        assert!(row.cost_nano_usd > 0, "{row:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_keys_sign_every_request_with_sigv4() {
    let mock = MockUpstream::start().await;
    let upstream = format!(
        "[[upstreams]]\nname = \"bedrock\"\nkind = \"bedrock\"\nregion = \"us-west-2\"\nbase_url = \"http://{}\"\naws_access_key_id = \"AKIDEXAMPLE\"\naws_secret_access_key = \"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY\"\naws_session_token = \"session-token\"\nmodels = [\"*\"]\n",
        mock.addr
    );
    let b = start_with(&upstream).await;
    for op in ["converse", "converse-stream"] {
        let r = call(&b.tg, op, &b.key, &converse_body(), &EVERY_KIND)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
        let up = mock.last();
        let auth = up.header("authorization").unwrap_or_default();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
                && auth.contains("/us-west-2/bedrock/aws4_request")
                && auth.contains("host;"),
            "{auth}"
        );
        assert!(up.header("x-amz-date").is_some());
        assert_eq!(
            up.header("x-amz-security-token").as_deref(),
            Some("session-token")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_back_in_bedrocks_shape_and_nothing_goes_up() {
    let mock = MockUpstream::start().await;
    let b = start(&mock).await;
    let before = mock.request_count();
    let error_type = |r: &reqwest::Response| {
        r.headers()
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };

    let r = call(&b.tg, "converse", "tg-wrong", &converse_body(), &[])
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 401);
    assert_eq!(error_type(&r), "AccessDeniedException");

    let r = call(&b.tg, "converse", &b.broke, &converse_body(), &[])
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 429);
    assert_eq!(error_type(&r), "ThrottlingException");
    let e: Value = r.json().await.unwrap_or_default();
    assert_eq!(e["code"], "budget_exceeded");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(mock.request_count(), before);

    // The upstream's own errors reach the client unchanged.
    let r = call(
        &b.tg,
        "converse",
        &b.key,
        &converse_body(),
        &[("x-mock-status", "429")],
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 429);
    assert_eq!(error_type(&r), "ThrottlingException");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_bedrock_runtime_works_with_tollgate_as_its_endpoint() {
    let Some(python) = support::sdk_python() else {
        return;
    };
    let mock = MockUpstream::start().await;
    let b = start(&mock).await;
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/bedrock_sdk.py");
    let stdout = support::run_script(
        python,
        script,
        &[
            ("TOLLGATE_ENDPOINT", b.tg.url("")),
            ("TG_KEY", b.key.clone()),
            ("TG_KEY_BROKE", b.broke.clone()),
        ],
    )
    .await;
    support::assert_lines(
        &stdout,
        &[
            "converse Hello from the mock 1000 2000 400 200",
            "converse_stream Hello from the mock 200",
            "invoke_model Hello from the mock 1000",
            "broke ThrottlingException 429",
            "wrong key AccessDeniedException 401",
        ],
    );
    let rows =
        b.tg.wait_rows_where(3, |r| {
            r.provider == "bedrock" && r.status == 200 && r.endpoint != "models"
        })
        .await;
    let costs: Vec<(&str, bool, i64)> = rows
        .iter()
        .map(|r| (r.endpoint.as_str(), r.stream, r.cost_nano_usd))
        .collect();
    assert_eq!(
        costs,
        vec![
            ("converse", false, EVERY_KIND_COST),
            ("converse", true, EVERY_KIND_COST),
            ("messages", false, EVERY_KIND_COST)
        ]
    );
}
