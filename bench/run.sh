#!/usr/bin/env bash
# tollgate benchmark: builds in release mode and measures, side by side in one
# run against the same fast mock upstream (bench/mock_upstream.rs):
#   (A) direct to the mock, (B) a bare forwarder (bench/forwarder.rs),
#   (C) tollgate (SQLite, metrics, a budgeted virtual key),
#   (D) optionally the LiteLLM proxy (--litellm; no database).
# Load: oha (cargo install oha) for request/response scenarios, and
# bench/streams.rs for streams (time to first byte, batching, memory).
# Writes bench/RESULTS.md. Loopback only; every run is bounded in time.
#
#   bash bench/run.sh [--litellm]    BENCH_DURATION=10s, BENCH_ROUNDS=3 by default
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DUR=${BENCH_DURATION:-10s}
ROUNDS=${BENCH_ROUNDS:-3}
LITELLM=0
[ "${1:-}" = "--litellm" ] && LITELLM=1

cargo build --release --locked --bin tollgate --examples 2>&1 | tail -1
command -v oha >/dev/null || cargo install oha --locked --version 1.16.0
BIN=$ROOT/target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "not up: $1" >&2; return 1; }

MOCK=$(free_port); FWD=$(free_port); TG=$(free_port)
"$BIN/examples/bench_mock" "127.0.0.1:$MOCK" >/dev/null & PIDS+=($!)
"$BIN/examples/bench_forwarder" "127.0.0.1:$FWD" "http://127.0.0.1:$MOCK" >/dev/null & FWD_PID=$!; PIDS+=($!)

start_tollgate() { # $1 = port, $2 = data dir; prints the pid
  mkdir -p "$2"
  cat > "$2/tollgate.toml" <<TOML
[server]
listen = "127.0.0.1:$1"
[auth]
mode = "virtual-keys"
[database]
url = "sqlite://$2/tollgate.db"
[[upstreams]]
name = "mock"
base_url = "http://127.0.0.1:$MOCK/v1"
api_key = "sk-bench"
TOML
  TOLLGATE_LOG=warn "$BIN/tollgate" serve --config "$2/tollgate.toml" 2>"$2/log" & echo $!
}
mkdir -p "$WORK/tg"
start_tollgate "$TG" "$WORK/tg" > "$WORK/tg.pid"; TG_PID=$(cat "$WORK/tg.pid"); PIDS+=("$TG_PID")
wait_http "http://127.0.0.1:$TG/healthz"
"$BIN/tollgate" teams create bench --budget-usd 1000000 --period monthly --config "$WORK/tg/tollgate.toml" >/dev/null
KEY=$("$BIN/tollgate" keys create --team bench --config "$WORK/tg/tollgate.toml" 2>/dev/null | head -1)
sleep 0.7   # the running server loads the new key within 500 ms

LITELLM_URL=""
if [ "$LITELLM" = 1 ]; then
  VENV=$ROOT/bench/.venv-litellm
  [ -x "$VENV/bin/litellm" ] || { python3 -m venv "$VENV"; "$VENV/bin/pip" install -q 'litellm[proxy]==1.79.0'; }
  LL=$(free_port)
  cat > "$WORK/litellm.yaml" <<YAML
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:$MOCK/v1
      api_key: sk-bench
YAML
  "$VENV/bin/litellm" --config "$WORK/litellm.yaml" --port "$LL" >"$WORK/litellm.log" 2>&1 & LL_PID=$!; PIDS+=($!)
  wait_http "http://127.0.0.1:$LL/health/liveliness" && LITELLM_URL="http://127.0.0.1:$LL/v1/chat/completions"
fi

wait_http "http://127.0.0.1:$FWD/v1/chat/completions" || true
python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
msg = [{"role": "user", "content": "Say hello in one short sentence."}]
json.dump({"model": "gpt-4o-mini", "messages": msg, "max_tokens": 64}, open(f"{w}/chat.json", "w"))
big = ("The quick brown fox jumps over the lazy dog. " * 2400)[:100_000]
json.dump({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": big}], "max_tokens": 64}, open(f"{w}/big.json", "w"))
PY

A="http://127.0.0.1:$MOCK/v1/chat/completions"
B="http://127.0.0.1:$FWD/v1/chat/completions"
C="http://127.0.0.1:$TG/v1/chat/completions"
oha_run() { # name url body extra-args...
  local name=$1 url=$2 body=$3; shift 3
  oha --no-tui --output-format json -m POST -H "content-type: application/json" \
      -H "authorization: Bearer $KEY" -D "$body" "$@" "$url" > "$WORK/$name.json"
}

# Sample tollgate's writer queue depth while the saturation runs go.
( while kill -0 "$TG_PID" 2>/dev/null; do
    curl -s "http://127.0.0.1:$TG/metrics" | awk '/^tollgate_usage_write_queue_depth /{print $2}'; sleep 0.2
  done > "$WORK/queue_depth.txt" ) & PIDS+=($!)

echo "== saturation, 64 connections, $DUR each"
# CPU time (user + system, clock ticks) the proxy process spent in its run:
# CPU per request is steadier than throughput on a shared 2-core machine.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
oha_run sat_A "$A" "$WORK/chat.json" -z "$DUR" -c 64
# B and C alternate for ROUNDS rounds: on a shared VM one pair can be off by
# 20%; the report takes the median.
for r in $(seq 1 "$ROUNDS"); do
  t0=$(ticks "$FWD_PID"); oha_run "sat_B_$r" "$B" "$WORK/chat.json" -z "$DUR" -c 64; t1=$(ticks "$FWD_PID")
  t2=$(ticks "$TG_PID"); oha_run "sat_C_$r" "$C" "$WORK/chat.json" -z "$DUR" -c 64; t3=$(ticks "$TG_PID")
  echo "{\"B\": $((t1 - t0)), \"C\": $((t3 - t2)), \"hz\": $(getconf CLK_TCK)}" > "$WORK/cpu_$r.json"
done
if [ -n "$LITELLM_URL" ]; then
  oha_run sat_D "$LITELLM_URL" "$WORK/chat.json" -z "$DUR" -c 64
  # LiteLLM is done: stop it so its background work cannot disturb later runs.
  kill "$LL_PID" 2>/dev/null || true; wait "$LL_PID" 2>/dev/null || true
fi
sleep 2   # let tollgate's writer finish the saturation backlog first
echo "== fixed rate 2000 req/s, $DUR each"
for r in $(seq 1 "$ROUNDS"); do
  for p in A B C; do oha_run "rate_${p}_$r" "${!p}" "$WORK/chat.json" -z "$DUR" -c 64 -q 2000; done
done
echo "== large prompts (100 KB), upstream with and without usage"
oha_run big_usage "$C" "$WORK/big.json" -n 400 -c 8
oha_run big_omit "$C" "$WORK/big.json" -n 400 -c 8 -H "x-mock-usage: omit"
oha_run big_direct "$A" "$WORK/big.json" -n 400 -c 8
echo "== streams: 64 concurrent, 50 chunks 10 ms apart (steady arrivals, then a burst)"
# Steady arrivals: one new stream per ms, all 64 open together. Then a burst:
# all 64 at the same instant, which on 2 cores measures queueing as well.
for p in A B C; do "$BIN/examples/bench_streams" "${!p}" "$KEY" 64 50 10 warm 64 > "$WORK/stream_$p.json"; done
for p in A B C; do "$BIN/examples/bench_streams" "${!p}" "$KEY" 64 50 10 > "$WORK/streamburst_$p.json"; done
sleep 1   # let the writer flush the last rows before counting them
curl -s "http://127.0.0.1:$TG/metrics" > "$WORK/metrics_after.txt"
sqlite3_count=$("$BIN/tollgate" report --by team --since 1h --format json --config "$WORK/tg/tollgate.toml")
echo "$sqlite3_count" > "$WORK/report.json"

echo "== 1000 concurrent streams on a fresh tollgate (peak RSS)"
TG2=$(free_port)
start_tollgate "$TG2" "$WORK/tg2" > "$WORK/tg2.pid"; TG2_PID=$(cat "$WORK/tg2.pid"); PIDS+=("$TG2_PID")
wait_http "http://127.0.0.1:$TG2/healthz"
"$BIN/tollgate" teams create bench --budget-usd 1000000 --period monthly --config "$WORK/tg2/tollgate.toml" >/dev/null
KEY2=$("$BIN/tollgate" keys create --team bench --config "$WORK/tg2/tollgate.toml" 2>/dev/null | head -1)
sleep 0.7
IDLE_RSS=$(awk '/VmRSS/{print $2}' "/proc/$TG2_PID/status")
"$BIN/examples/bench_streams" "http://127.0.0.1:$TG2/v1/chat/completions" "$KEY2" 1000 50 20 cold > "$WORK/streams1000.json"
PEAK_RSS=$(awk '/VmHWM/{print $2}' "/proc/$TG2_PID/status")
# The same load through a fresh bare forwarder: the HTTP stack's own share.
FWD2=$(free_port)
"$BIN/examples/bench_forwarder" "127.0.0.1:$FWD2" "http://127.0.0.1:$MOCK" >/dev/null & FWD2_PID=$!; PIDS+=("$FWD2_PID")
wait_http "http://127.0.0.1:$FWD2/v1/chat/completions" || true
FWD_IDLE=$(awk '/VmRSS/{print $2}' "/proc/$FWD2_PID/status")
"$BIN/examples/bench_streams" "http://127.0.0.1:$FWD2/v1/chat/completions" "" 1000 50 20 cold > "$WORK/streams1000_fwd.json"
FWD_PEAK=$(awk '/VmHWM/{print $2}' "/proc/$FWD2_PID/status")
echo "{\"idle_rss_kb\": $IDLE_RSS, \"peak_rss_kb\": $PEAK_RSS, \"fwd_idle_rss_kb\": $FWD_IDLE, \"fwd_peak_rss_kb\": $FWD_PEAK}" > "$WORK/rss.json"

python3 bench/report.py "$WORK" "$DUR" "$ROUNDS" > bench/RESULTS.md
echo "wrote bench/RESULTS.md (raw results in $WORK)"
