//! Streaming load: opens N concurrent streaming chat requests and reports
//! time to first byte, total time, and how many body frames arrived per SSE
//! event (1.0 = every chunk forwarded on its own, never batched).
//! `cargo run --release --example bench_streams -- URL KEY N CHUNKS DELAY_MS [warm|cold] [SPREAD_MS]`
//! Runs a one-chunk warm-up round first unless `cold`; prints one JSON object
//! for the measured round. With SPREAD_MS the N streams start evenly spread
//! over that many milliseconds (steady arrivals); without, all at once (a
//! burst, which measures queueing as much as latency).

use std::time::{Duration, Instant};

use futures_util::StreamExt;

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = args
        .first()
        .cloned()
        .ok_or("usage: URL KEY N CHUNKS DELAY_MS")?;
    let key = args.get(1).cloned().unwrap_or_default();
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100);
    let chunks: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(50);
    let delay: u64 = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(10);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(n)
        .timeout(Duration::from_secs(300))
        .build()?;
    let body = serde_json::json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 64,
        "messages": [{"role": "user", "content": "Say hello"}]});
    // Warm-up round (one chunk per stream) so connection pools on every hop
    // are open: the measured round is about streaming, not TCP handshakes.
    let warm = args.get(5).is_none_or(|a| a != "cold");
    let spread = Duration::from_millis(args.get(6).and_then(|a| a.parse().ok()).unwrap_or(0));
    let rounds: &[(u64, u64, bool)] = if warm {
        &[(1, 0, false), (chunks, delay, true)]
    } else {
        &[(chunks, delay, true)]
    };
    let mut result = None;
    for &(chunks, delay, measured) in rounds {
        let spread = if measured { spread } else { Duration::ZERO };
        result = Some(round(&client, &url, &key, &body, n, chunks, delay, spread).await);
    }
    println!("{}", result.unwrap_or_default());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn round(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &serde_json::Value,
    n: usize,
    chunks: u64,
    delay: u64,
    spread: Duration,
) -> serde_json::Value {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let start_at = started + spread.mul_f64(i as f64 / n as f64);
        let (client, url, key, body) = (
            client.clone(),
            url.to_string(),
            key.to_string(),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start_at.into()).await;
            let t = Instant::now();
            let resp = client
                .post(url)
                .bearer_auth(key)
                .header("x-mock-chunks", chunks.to_string())
                .header("x-mock-chunk-delay-ms", delay.to_string())
                .json(&body)
                .send()
                .await?;
            let mut stream = resp.bytes_stream();
            let (mut ttfb, mut frames, mut events) = (None, 0u64, 0u64);
            while let Some(frame) = stream.next().await {
                let frame = frame?;
                ttfb.get_or_insert_with(|| t.elapsed());
                frames += 1;
                events += frame.windows(2).filter(|w| w == b"\n\n").count() as u64;
            }
            Ok::<_, reqwest::Error>((ttfb.unwrap_or_default(), t.elapsed(), frames, events))
        }));
    }
    let (mut ttfb, mut total, mut frames, mut events, mut errors) =
        (Vec::new(), Vec::new(), 0, 0, 0);
    for t in tasks {
        match t.await {
            Ok(Ok((a, b, f, e))) => {
                ttfb.push(a.as_secs_f64() * 1e3);
                total.push(b.as_secs_f64() * 1e3);
                frames += f;
                events += e;
            }
            _ => errors += 1,
        }
    }
    ttfb.sort_by(f64::total_cmp);
    total.sort_by(f64::total_cmp);
    serde_json::json!({
        "streams": n, "errors": errors, "wall_ms": started.elapsed().as_secs_f64() * 1e3,
        "ttfb_p50_ms": pct(&ttfb, 0.5), "ttfb_p99_ms": pct(&ttfb, 0.99),
        "total_p50_ms": pct(&total, 0.5), "total_p99_ms": pct(&total, 0.99),
        "frames_per_event": if events > 0 { frames as f64 / events as f64 } else { f64::NAN },
    })
}
