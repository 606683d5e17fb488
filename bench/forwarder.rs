//! The physical floor: a bare pass-through forwarder with no accounting, on
//! the same HTTP stack as tollgate (axum server, hyper-util pooled client),
//! bodies streamed both ways.
//! `cargo run --release --example bench_forwarder -- LISTEN UPSTREAM`.

/// The same allocator as tollgate, so the comparison measures accounting, not malloc.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};

#[derive(Clone)]
struct Upstream {
    base: String,
    client: Client<HttpConnector, Body>,
}

async fn forward(State(up): State<Upstream>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match format!("{}{}", up.base, path).parse() {
        Ok(uri) => uri,
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    parts.headers.remove("host");
    match up.client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(Body::new),
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let base = args
        .next()
        .ok_or("usage: bench_forwarder LISTEN UPSTREAM_BASE_URL")?;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(1024)
        .build(http);
    let app = Router::new()
        .fallback(forward)
        .with_state(Upstream { base, client });
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("bench forwarder listening on {}", listener.local_addr()?);
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}
