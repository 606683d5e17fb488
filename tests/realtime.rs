//! The Realtime WebSocket through tollgate (issue 22 point 5, SPEC 12):
//! passed through both ways, each `response.done` billed as it passes
//! (text, audio and cached audio apart), the budget checked at open and
//! before each `response.create`.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{MockUpstream, Tollgate};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// gpt-4o-realtime-preview on the mock's usage: 100 text input tokens at
/// $5/M, 100 cached text at $2.50/M, 600 audio at $40/M, 200 cached audio
/// at $2.50/M, 100 text output at $20/M and 400 audio output at $80/M.
const RESPONSE: i64 =
    100 * 5_000 + 100 * 2_500 + 600 * 40_000 + 200 * 2_500 + 100 * 20_000 + 400 * 80_000;

async fn connect(tg: &Tollgate, key: &str, model: &str) -> Result<Socket, u16> {
    let url = format!("ws://{}/v1/realtime?model={model}", tg.addr);
    let mut request = url.into_client_request().unwrap_or_else(|e| panic!("{e}"));
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {key}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

/// The next text event, as JSON.
async fn next(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .unwrap_or_else(|_| panic!("no event within 5 s"));
        match message {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str()).unwrap_or_default()
            }
            Some(Ok(_)) => continue,
            other => panic!("socket ended: {other:?}"),
        }
    }
}

async fn send(socket: &mut Socket, event: Value) {
    socket
        .send(Message::text(event.to_string()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn realtime_rows(tg: &Tollgate, n: usize) -> Vec<support::UsageRow> {
    let mut rows = tg.wait_rows_where(n, |r| r.endpoint == "realtime").await;
    rows.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_response_done_is_billed_as_it_passes_and_a_drop_loses_nothing() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "[auth]\nmode = \"virtual-keys\"\n").await;
    let key = tg.budgeted_key("voice", "10", "monthly").await;
    let mut socket = connect(&tg, &key, "gpt-4o-realtime-preview")
        .await
        .unwrap_or_else(|s| panic!("handshake refused: {s}"));
    let created = next(&mut socket).await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["session"]["id"], "sess_mock_1");
    // Client events go up unchanged.
    send(
        &mut socket,
        json!({"type": "input_audio_buffer.append", "audio": "AAAA"}),
    )
    .await;
    assert_eq!(next(&mut socket).await["of"], "input_audio_buffer.append");

    for n in 1..=2 {
        send(&mut socket, json!({"type": "response.create"})).await;
        assert_eq!(next(&mut socket).await["type"], "response.created");
        let done = next(&mut socket).await;
        assert_eq!(done["type"], "response.done");
        // Billed as it passed, before the socket closes.
        let rows = realtime_rows(&tg, n).await;
        assert_eq!(rows[n - 1].request_id, format!("resp_rt_{n}"));
    }
    let rows = realtime_rows(&tg, 2).await;
    for row in &rows {
        assert_eq!(row.cost_nano_usd, RESPONSE);
        assert_eq!(row.batch_id, "sess_mock_1", "the session's id is kept");
        assert_eq!(
            (row.team.as_str(), row.model.as_str()),
            ("voice", "gpt-4o-realtime-preview")
        );
        let meters: Value = serde_json::from_str(&row.meters).unwrap_or_default();
        assert_eq!(meters["audio_cached_input"], 200, "{meters}");
        assert_eq!(meters["cached_input"], 100, "{meters}");
        assert_eq!(meters["audio_input"], 600, "{meters}");
    }
    // The handshake went up with the upstream's key, never the client's.
    let up = mock
        .requests()
        .into_iter()
        .find(|r| r.path.starts_with("/v1/realtime"))
        .unwrap_or_else(|| panic!("no handshake upstream"));
    assert_eq!(
        up.header("authorization").as_deref(),
        Some("Bearer sk-upstream-secret")
    );

    // A third response, then the client drops without closing: its row stays.
    send(&mut socket, json!({"type": "response.create"})).await;
    let _ = next(&mut socket).await;
    let _ = next(&mut socket).await;
    drop(socket);
    realtime_rows(&tg, 3).await;
    // The holds are released: spent is exactly what was billed.
    let want = 3.0 * RESPONSE as f64 / 1e9;
    tg.wait_metrics(|m| {
        let spent = support::metric(m, "tollgate_budget_spent_usd", &[("team", "voice")]);
        let remaining = support::metric(m, "tollgate_budget_remaining_usd", &[("team", "voice")]);
        match spent.is_some_and(|s| (s - want).abs() < 1e-9)
            && remaining.is_some_and(|r| (r - (10.0 - want)).abs() < 1e-9)
        {
            true => Ok(()),
            false => Err(format!("spent {spent:?}, remaining {remaining:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_is_checked_at_open_and_before_each_response() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "[auth]\nmode = \"virtual-keys\"\n").await;
    // $0.01 cannot cover a response's worst case (4,096 audio tokens at $80/M).
    let tight = tg.budgeted_key("tight", "0.01", "monthly").await;
    let mut socket = connect(&tg, &tight, "gpt-4o-realtime-preview")
        .await
        .unwrap_or_else(|s| panic!("handshake refused: {s}"));
    assert_eq!(next(&mut socket).await["type"], "session.created");
    send(&mut socket, json!({"type": "response.create"})).await;
    let refused = next(&mut socket).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["error"]["code"], "budget_exceeded", "{refused}");
    // It never went up: the next event the client sees answers its next one.
    send(&mut socket, json!({"type": "conversation.item.create"})).await;
    assert_eq!(next(&mut socket).await["of"], "conversation.item.create");
    // A smaller response fits.
    send(
        &mut socket,
        json!({"type": "response.create", "response": {"max_output_tokens": 50}}),
    )
    .await;
    assert_eq!(next(&mut socket).await["type"], "response.created");
    drop(socket);

    // A budgeted team may not open a socket on an unpriced model...
    assert_eq!(
        connect(&tg, &tight, "no-such-realtime-model").await.err(),
        Some(400)
    );
    // ...nor with nothing left.
    let spent = tg.budgeted_key("spent", "0", "monthly").await;
    assert_eq!(
        connect(&tg, &spent, "gpt-4o-realtime-preview").await.err(),
        Some(429)
    );
    // A wrong key never reaches the upstream.
    let before = mock.request_count();
    assert_eq!(
        connect(&tg, "tg-wrong", "gpt-4o-realtime-preview")
            .await
            .err(),
        Some(401)
    );
    assert_eq!(mock.request_count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_talks_realtime_through_tollgate() {
    let Some(python) = support::sdk_python() else {
        return;
    };
    let mock = MockUpstream::start().await;
    let (tg, keys) = support::start_for_sdks(&mock).await;
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/realtime_sdk.py");
    let out = support::run_sdk_script(python, script, &tg, keys).await;
    support::assert_lines(
        &out,
        &[
            "connected: session.created",
            "response.done: resp_rt_1, 1000 in, 500 out",
            "response.done: resp_rt_2, 1000 in, 500 out",
        ],
    );
    let rows = realtime_rows(&tg, 2).await;
    assert!(rows
        .iter()
        .all(|r| r.cost_nano_usd == RESPONSE && r.team == "app"));
}
