//! `tollgate numbers` (issue 15, point 1, the numbers the usage table
//! already holds): seeded traffic with known tokens, models, caching and
//! streaming, and every number asserted exactly.

mod support;

use serde_json::{json, Value};
use support::{client, MockUpstream, Tollgate};

const FT: &str = "ft:gpt-4o-mini-2024-07-18:acme:support:abc123";

/// `n` copies of `word`, space-separated (`sep` = "" for unspaced scripts).
fn text(word: &str, n: usize, sep: &str) -> String {
    vec![word; n].join(sep)
}

async fn send(tg: &Tollgate, team: &str, path: &str, body: Value, headers: &[(&str, &str)]) {
    let mut req = client()
        .post(tg.url(path))
        .header("x-tollgate-team", team)
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200, "{body}");
    let _ = r.bytes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_numbers_are_measured_exactly_on_seeded_traffic() {
    let mock = MockUpstream::start().await;
    // Every request's words counted (the default samples 1%).
    let tg = Tollgate::start(&mock, "[numbers]\nword_sample_rate = 1.0\n").await;
    let chat = |model: &str, stream: bool, prompt: &str| json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}]});
    let english = |n| text("fox", n, " ");
    // Team a. gpt-4o streamed, 1,000 prompt of which 400 cached, 100 out:
    // 600 x $2.50 + 400 x $1.25 + 100 x $10 per M = 3,000,000 nano-USD.
    // 800 English words in, 80 out.
    let answer = english(80);
    send(
        &tg,
        "a",
        "/v1/chat/completions",
        chat("gpt-4o", true, &english(800)),
        &[
            ("x-mock-prompt-tokens", "1000"),
            ("x-mock-cached-tokens", "400"),
            ("x-mock-completion-tokens", "100"),
            ("x-mock-content", &answer),
        ],
    )
    .await;
    // gpt-4o, 1,000 / 300, not streamed: 5,500,000 (batch: 2,750,000).
    // 800 words in, 240 out.
    let answer = english(240);
    send(
        &tg,
        "a",
        "/v1/chat/completions",
        chat("gpt-4o", false, &english(800)),
        &[
            ("x-mock-prompt-tokens", "1000"),
            ("x-mock-completion-tokens", "300"),
            ("x-mock-content", &answer),
        ],
    )
    .await;
    // gpt-4o-mini, 1,000 / 100: 210,000 (batch: 105,000). 750 words in, 75 out.
    let answer = english(75);
    send(
        &tg,
        "a",
        "/v1/chat/completions",
        chat("gpt-4o-mini", false, &english(750)),
        &[
            ("x-mock-prompt-tokens", "1000"),
            ("x-mock-completion-tokens", "100"),
            ("x-mock-content", &answer),
        ],
    )
    .await;
    // Team b. Embeddings, 1,000 tokens at $0.02 per M: 20,000 (batch
    // 10,000), of 800 Chinese characters.
    send(
        &tg,
        "b",
        "/v1/embeddings",
        json!({"model": "text-embedding-3-small", "input": text("你好", 400, "")}),
        &[("x-mock-prompt-tokens", "1000")],
    )
    .await;
    // A fine-tuned gpt-4o-mini, 1,000 / 100 at $0.30 / $1.20: 420,000 (its
    // base: 210,000; batch: 210,000). 400 Russian words in, 40 out.
    let answer = text("привет", 40, " ");
    send(
        &tg,
        "b",
        "/v1/chat/completions",
        chat(FT, false, &text("привет", 400, " ")),
        &[
            ("x-mock-prompt-tokens", "1000"),
            ("x-mock-completion-tokens", "100"),
            ("x-mock-content", &answer),
        ],
    )
    .await;
    tg.wait_rows(5).await;

    support::wait_word_counts(&tg, 3).await;

    let out = support::stdout(&tg.cli(&["numbers", "--since", "1h", "--format", "json"]));
    let n: Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(n["requests"], 5, "{n:#}");
    assert_eq!(n["cost_nano_usd"], 9_150_000);

    // Tokens per word: 3,000 prompt tokens over 2,350 English words, 500
    // completion tokens over 395; 2,000 over 440 Russian words; 1,000 per
    // 800 Chinese characters (embeddings have no completion side).
    assert_eq!(
        n["tokens_per_word"],
        json!([
            {"family": "openai-cl100k", "script": "cjk", "per": "character",
             "prompt": {"samples": 1, "words": 1, "chars": 800, "tokens": 1000, "tokens_per_unit": 1.25}},
            {"family": "openai-o200k", "script": "cyrillic", "per": "word",
             "prompt": {"samples": 1, "words": 400, "chars": 2400, "tokens": 1000, "tokens_per_unit": 2.5},
             "completion": {"samples": 1, "words": 40, "chars": 240, "tokens": 100, "tokens_per_unit": 2.5}},
            {"family": "openai-o200k", "script": "latin", "per": "word",
             "prompt": {"samples": 3, "words": 2350, "chars": 7050, "tokens": 3000, "tokens_per_unit": 1.2766},
             "completion": {"samples": 3, "words": 395, "chars": 1185, "tokens": 500, "tokens_per_unit": 1.2658}},
        ]),
        "{n:#}"
    );

    // Output share, completion tokens per request, answers 40% shorter.
    assert_eq!(
        n["output"],
        json!([
            {"team": "a", "requests": 3, "cost_nano_usd": 8_710_000,
             "output_cost_nano_usd": 4_060_000, "output_share": 0.4661,
             "completion_tokens_p50": 100, "completion_tokens_p90": 300,
             "capped_requests": 0, "capped_share": 0.0,
             "saving_if_answers_40pct_shorter_nano_usd": 1_624_000},
            {"team": "b", "requests": 1, "cost_nano_usd": 420_000,
             "output_cost_nano_usd": 120_000, "output_share": 0.2857,
             "completion_tokens_p50": 100, "completion_tokens_p90": 100,
             "capped_requests": 0, "capped_share": 0.0,
             "saving_if_answers_40pct_shorter_nano_usd": 48_000},
        ])
    );

    // Price per 1k tokens at this traffic's mix, and the top model's
    // traffic (gpt-4o, 8,500,000) on each cheaper model used.
    assert_eq!(
        n["models"]["used"],
        json!([
            {"model": FT, "requests": 1, "tokens": 1100, "cost_nano_usd": 420_000,
             "nano_usd_per_1k_tokens": 381_818, "times_cheapest": 2.0},
            {"model": "gpt-4o", "requests": 2, "tokens": 2400, "cost_nano_usd": 8_500_000,
             "nano_usd_per_1k_tokens": 3_541_666, "times_cheapest": 18.5516},
            {"model": "gpt-4o-mini", "requests": 1, "tokens": 1100, "cost_nano_usd": 210_000,
             "nano_usd_per_1k_tokens": 190_909, "times_cheapest": 1.0},
        ])
    );
    // As gpt-4o-mini: (90,000 + 30,000 + 60,000) + (150,000 + 180,000);
    // as the fine-tune: (180,000 + 60,000 + 120,000) + (300,000 + 360,000).
    assert_eq!(
        n["models"]["top_model"],
        json!({"model": "gpt-4o", "cost_nano_usd": 8_500_000, "on_cheaper_models": [
            {"model": FT, "cost_nano_usd": 1_020_000, "saving_nano_usd": 7_480_000},
            {"model": "gpt-4o-mini", "cost_nano_usd": 510_000, "saving_nano_usd": 7_990_000},
        ]})
    );

    // Generation vs embeddings: 9,130,000 for 4,600 tokens vs 20,000 for 1,000.
    assert_eq!(
        n["chat_vs_embeddings"],
        json!({"generation_nano_usd_per_1k_tokens": 1_984_782,
               "embeddings_nano_usd_per_1k_tokens": 20_000,
               "generation_times_embeddings": 99.2391})
    );

    // Fine-tuned vs base: paid 420,000 where the base charges 210,000.
    assert_eq!(
        n["finetuned"],
        json!([{"model": FT, "base_model": "gpt-4o-mini", "requests": 1,
                "cost_nano_usd": 420_000, "on_base_nano_usd": 210_000,
                "multiple": 2.0, "premium_nano_usd": 210_000}])
    );

    // Caching: 400 of 5,000 prompt tokens, saving 400 x ($2.50 - $1.25).
    assert_eq!(
        n["caching"],
        json!({"prompt_tokens": 5000, "cached_tokens": 400, "cached_share": 0.08,
               "saved_nano_usd": 500_000})
    );

    // No self-hosted model in this traffic.
    assert_eq!(n["selfhosted"], json!([]));

    // Batch: the four non-streamed requests at their batch prices.
    assert_eq!(
        n["batch"],
        json!({"eligible_requests": 4, "eligible_cost_nano_usd": 6_150_000,
               "at_batch_prices_nano_usd": 3_075_000, "saving_nano_usd": 3_075_000})
    );

    // The same counts, live, for the dashboard's tokens-per-word panels.
    let metrics = tg.metrics().await;
    for (name, value) in [
        ("tollgate_words_total", 2350),
        ("tollgate_word_chars_total", 7050),
        ("tollgate_word_tokens_total", 3000),
    ] {
        let labels = [
            ("family", "openai-o200k"),
            ("script", "latin"),
            ("side", "prompt"),
        ];
        assert_eq!(
            support::metric(&metrics, name, &labels),
            Some(value as f64),
            "{name}"
        );
    }

    // One team's view, and the text report.
    let out = support::stdout(&tg.cli(&["numbers", "--team", "b", "--format", "json"]));
    let b: Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(
        (b["requests"].as_u64(), b["cost_nano_usd"].as_u64()),
        (Some(2), Some(440_000))
    );
    let groups: Vec<&str> = b["tokens_per_word"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["script"].as_str())
        .collect();
    assert_eq!(groups, ["cjk", "cyrillic"], "team b's words only");
    let text = support::stdout(&tg.cli(&["numbers"]));
    println!("{text}");
    // The README shows this very output.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .unwrap_or_default();
    let section = readme
        .split("## The numbers, on your traffic\n")
        .nth(1)
        .unwrap_or_default();
    let shown = section.split("```\n").nth(1).unwrap_or_default();
    assert_eq!(shown, text, "README's numbers output is stale");
    assert!(
        text.contains(
            "Fine-tuned ft:gpt-4o-mini-2024-07-18:acme:support:abc123 costs 2.0x gpt-4o-mini "
        ),
        "{text}"
    );
    assert!(
        text.contains("Batch: $0.006150000 of non-streaming spend could have cost $0.003075000"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_at_their_output_cap_and_extra_choices_are_counted() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let chat = |n: u32, stream: bool| {
        json!({"model": "gpt-4o-mini", "n": n, "stream": stream, "max_tokens": 200,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    let capped = ("x-mock-finish-reason", "length");
    // Two choices, stopped at the cap: 1,000 / 200 tokens, of which the
    // output is 200 x $0.60 per M = 120,000 nano-USD, half of it the
    // second choice's.
    send(
        &tg,
        "c",
        "/v1/chat/completions",
        chat(2, false),
        &[
            ("x-mock-prompt-tokens", "1000"),
            ("x-mock-completion-tokens", "200"),
            capped,
        ],
    )
    .await;
    // Streamed, stopped at the cap (the last chunk says so).
    send(
        &tg,
        "c",
        "/v1/chat/completions",
        chat(1, true),
        &[
            ("x-mock-prompt-tokens", "1000"),
            ("x-mock-completion-tokens", "100"),
            capped,
        ],
    )
    .await;
    // An answer that ended by itself.
    send(
        &tg,
        "c",
        "/v1/chat/completions",
        chat(1, false),
        &[
            ("x-mock-prompt-tokens", "1000"),
            ("x-mock-completion-tokens", "100"),
        ],
    )
    .await;
    let rows = tg.wait_rows(3).await;
    let flags: Vec<(bool, i64)> = rows.iter().map(|r| (r.capped, r.choices)).collect();
    assert_eq!(flags, vec![(true, 2), (true, 1), (false, 1)]);

    let out = support::stdout(&tg.cli(&["numbers", "--format", "json"]));
    let n: Value = serde_json::from_str(&out).unwrap_or_default();
    let c = &n["output"][0];
    assert_eq!(
        (c["team"].as_str(), c["requests"].as_u64()),
        (Some("c"), Some(3))
    );
    assert_eq!(
        (c["capped_requests"].as_u64(), c["capped_share"].as_f64()),
        (Some(2), Some(0.6667))
    );
    assert_eq!(
        n["choices"],
        json!({"requests": 1, "choices_per_request": 2.0, "extra_choices_cost_nano_usd": 60_000})
    );
    // The same, live: two answers at their cap, one extra choice; the Batch
    // API would have halved the two non-streamed requests' 270,000 +
    // 210,000 nano-USD (gpt-4o-mini's batch prices are half).
    let metrics = tg.metrics().await;
    let value =
        |name: &str| support::metric(&metrics, name, &[("team", "c"), ("model", "gpt-4o-mini")]);
    assert_eq!(value("tollgate_capped_requests_total"), Some(2.0));
    assert_eq!(value("tollgate_extra_choices_total"), Some(1.0));
    assert_eq!(value("tollgate_batch_saving_usd_total"), Some(0.000_24));
}
