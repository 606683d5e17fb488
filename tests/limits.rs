//! Bounded by construction (issue 12, point 2): header, body and idle
//! timeouts; a low open-file limit under a slowloris; the memory one idle
//! connection and one stream nobody reads cost.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{base_config, client, MockUpstream, Tollgate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FAST_TIMEOUTS: &str =
    "header_timeout_ms = 1000\nbody_timeout_ms = 1000\nidle_timeout_ms = 1200\n";

async fn start(mock: &MockUpstream, setup: &str) -> Tollgate {
    start_with_timeouts(mock, setup, FAST_TIMEOUTS).await
}

async fn start_with_timeouts(mock: &MockUpstream, setup: &str, timeouts: &str) -> Tollgate {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config =
        base_config(mock, dir.path()).replace("[server]\n", &format!("[server]\n{timeouts}"));
    Tollgate::start_in_shell(dir, &config, setup).await
}

/// True when the server closes `stream` (EOF or reset) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_under_a_low_fd_limit_cannot_starve_normal_requests() {
    let mock = MockUpstream::start().await;
    // 256 descriptors in all (soft and hard): today's 1024 at a smaller scale.
    let tg = start(&mock, "ulimit -n 256").await;
    let mut stalled = Vec::new();
    for _ in 0..400 {
        let mut s = TcpStream::connect(tg.addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = s
            .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-")
            .await;
        stalled.push(s);
    }
    // Half a header each: they hold every descriptor until the header
    // timeout (1 s) closes them; a normal request gets through after it.
    let started = Instant::now();
    let r = client()
        .post(tg.url("/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("normal request failed: {e}"));
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let mut closed = 0;
    for s in &mut stalled {
        if closed_within(s, Duration::from_secs(5)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, stalled.len(), "every stalled connection is closed");
    // Running out of descriptors was said in the log, not silently endured.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !tg
        .log()
        .iter()
        .any(|l| l.contains("cannot accept connections"))
    {
        assert!(
            Instant::now() < deadline,
            "no accept error logged: {:?}",
            tg.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fd_soft_limit_is_raised_to_the_hard_limit() {
    let mock = MockUpstream::start().await;
    let tg = start(&mock, "ulimit -Sn 300; ulimit -Hn 2000").await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", tg.pid())).unwrap_or_default();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .to_string();
    let numbers: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.parse::<u64>().is_ok())
        .collect();
    assert_eq!(numbers, ["2000", "2000"], "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let mock = MockUpstream::start().await;
    let timeouts = "header_timeout_ms = 500\nidle_timeout_ms = 3000\n";
    let tg = start_with_timeouts(&mock, "", timeouts).await;
    let mut s = TcpStream::connect(tg.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap_or(0);
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive past the header timeout (0.5 s): idle is not a half header.
    assert!(!closed_within(&mut s, Duration::from_millis(1_500)).await);
    // Closed by the idle timeout (3 s).
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_gets_408() {
    let mock = MockUpstream::start().await;
    let tg = start(&mock, "").await;
    let mut s = TcpStream::connect(tg.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(mock.request_count(), 0);
}

/// Memory: 200 idle connections and 20 streams whose clients stop reading.
/// The streams are cut after the idle timeout and billed as disconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_unread_streams_cost_bounded_memory() {
    let mock = MockUpstream::start().await;
    // jemalloc returns freed pages at once, so RSS is what is in use.
    let tg = start(
        &mock,
        "export _RJEM_MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0",
    )
    .await;
    // Warm up the allocator and the first connection's buffers.
    let r = client()
        .get(tg.url("/healthz"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let base = tg.rss_kib();
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            TcpStream::connect(tg.addr)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_idle = tg.rss_kib().saturating_sub(base) as f64 / 200.0;
    println!("idle connection: {per_idle:.1} KiB");
    assert!(per_idle < 64.0, "{per_idle} KiB per idle connection");
    drop(idle);

    let body = json!({"model": "gpt-4o-mini", "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    // 13,000 events of 1 KB: more than the socket buffers on both sides hold.
    let word = format!("{} ", "x".repeat(1000));
    let before = tg.rss_kib();
    let mut streams = Vec::new();
    for _ in 0..20 {
        // A small receive window, as a slow client far away has: the
        // stream blocks after a few hundred KB instead of tens of MB.
        let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
        socket
            .set_recv_buffer_size(16 * 1024)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut s = socket
            .connect(tg.addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\nx-mock-content: {word}\r\nx-mock-repeat: 13000\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        streams.push(s);
    }
    // Every stream is now blocked on a client that reads nothing.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let per_stream = tg.rss_kib().saturating_sub(before) as f64 / 20.0;
    println!("unread stream: {per_stream:.1} KiB");
    // Measured 0.5-1 MiB (hyper's buffers, the meter's, the text kept for
    // an estimate); the bound leaves room for allocator noise.
    assert!(per_stream < 2048.0, "{per_stream} KiB per unread stream");
    // After the idle timeout (1.5 s without the client reading) each is
    // cut and billed as a disconnect (499) for what was generated, while
    // the clients still hold their sockets.
    let rows = tg.wait_rows(20).await;
    drop(streams);
    let cut: Vec<_> = rows.iter().filter(|r| r.stream).collect();
    assert_eq!(cut.len(), 20);
    assert!(cut
        .iter()
        .all(|r| r.status == 499 && r.completion_tokens > 0));
}
