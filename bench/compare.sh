#!/usr/bin/env bash
# Compares two tollgate binaries on bench/run.sh's saturation scenario in one
# run: both serve at once (SQLite, metrics, a budgeted virtual key) against
# the same mock upstream, and oha loads them in alternating rounds, so a
# shared VM's drift hits both alike. Prints CPU per request, req/s and peak
# RSS per round and the medians, as markdown.
#
#   bash bench/compare.sh OLD_BIN NEW_BIN [ROUNDS]     (BENCH_DURATION=10s)
#
# OLD_EXTRA / NEW_EXTRA: TOML appended to that server's config (one binary
# against itself with a feature off, e.g. NEW_EXTRA=$'[numbers]\nword_sample_rate = 0').
#
# NEW_LEVELS=1: the new server's key also meets every level of SPEC 14 (a
# key budget, the end user's, the tag's, rpm and tpm on team and key, all
# too large to bind); both servers get the end-user and tag headers.
#
# Build the old binary from a worktree of the commit to compare with, e.g.
#   git worktree add /tmp/base <commit> && (cd /tmp/base && cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$1 NEW=$2 ROUNDS=${3:-5}
DUR=${BENCH_DURATION:-10s}
cargo build --release --locked --examples 2>&1 | tail -1
command -v oha >/dev/null || cargo install oha --locked --version 1.16.0
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "not up: $1" >&2; return 1; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

MOCK=$(free_port)
target/release/examples/bench_mock "127.0.0.1:$MOCK" >/dev/null & PIDS+=($!)
start() { # $1 = binary, $2 = name, $3 = extra TOML; prints "port pid key"
  local port dir
  port=$(free_port); dir=$WORK/$2; mkdir -p "$dir"
  cat > "$dir/tollgate.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[auth]
mode = "virtual-keys"
[database]
url = "sqlite://$dir/tollgate.db"
[[upstreams]]
name = "mock"
base_url = "http://127.0.0.1:$MOCK/v1"
api_key = "sk-bench"
$3
TOML
  TOLLGATE_LOG=warn "$1" serve --config "$dir/tollgate.toml" 2>"$dir/log" &
  local pid=$!
  wait_http "http://127.0.0.1:$port/healthz" >&2
  "$1" teams create bench --budget-usd 1000000 --period monthly --config "$dir/tollgate.toml" >/dev/null
  local key id cfg="--config $dir/tollgate.toml"
  read -r id key < <("$1" keys create --team bench --format json $cfg 2>/dev/null \
    | python3 -c 'import json,sys; k=json.load(sys.stdin); print(k["id"], k["key"])')
  if [ "$2" = new ] && [ -n "${NEW_LEVELS:-}" ]; then
    "$1" keys set-budget "$id" --budget-usd 1000000 --period monthly $cfg >/dev/null
    "$1" end-users set-budget --team bench bench-user --budget-usd 1000000 $cfg >/dev/null
    "$1" tags set-budget bench-tag --budget-usd 1000000 $cfg >/dev/null
    "$1" teams set-limits bench --rpm 1000000000 --tpm 1000000000000 $cfg >/dev/null
    "$1" keys set-limits "$id" --rpm 1000000000 --tpm 1000000000000 $cfg >/dev/null
  fi
  echo "$port $pid $key"
}
read -r OLD_PORT OLD_PID OLD_KEY < <(start "$OLD" old "${OLD_EXTRA:-}"); PIDS+=("$OLD_PID")
read -r NEW_PORT NEW_PID NEW_KEY < <(start "$NEW" new "${NEW_EXTRA:-}"); PIDS+=("$NEW_PID")
sleep 0.7   # both servers load their new key within 500 ms
echo '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello in one short sentence."}], "max_tokens": 64}' > "$WORK/chat.json"

run() { # name port key pid -> "req/s cpu_us_per_request"
  local t0 t1
  t0=$(ticks "$4")
  oha --no-tui --output-format json -m POST -H "content-type: application/json" \
      -H "authorization: Bearer $3" -H "x-tollgate-end-user: bench-user" \
      -H "x-tollgate-tags: bench-tag" -D "$WORK/chat.json" -z "$DUR" -c 64 \
      "http://127.0.0.1:$2/v1/chat/completions" > "$WORK/$1.json"
  t1=$(ticks "$4")
  python3 - "$WORK/$1.json" "$((t1 - t0))" "$(getconf CLK_TCK)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ok = r["statusCodeDistribution"].get("200", 0)
secs = r["summary"]["total"]
print(f'{ok / secs:.0f} {int(sys.argv[2]) / int(sys.argv[3]) / max(ok, 1) * 1e6:.1f}')
PY
}

echo "Two tollgates against one mock, saturation (64 connections, $DUR per run), rounds alternating old/new."
echo
echo "| round | old req/s | new req/s | old CPU/request | new CPU/request | new / old CPU |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: |"
OLD_CPU=(); NEW_CPU=()
for r in $(seq 1 "$ROUNDS"); do
  read -r o_rps o_cpu < <(run "old_$r" "$OLD_PORT" "$OLD_KEY" "$OLD_PID")
  read -r n_rps n_cpu < <(run "new_$r" "$NEW_PORT" "$NEW_KEY" "$NEW_PID")
  OLD_CPU+=("$o_cpu"); NEW_CPU+=("$n_cpu")
  echo "| $r | $o_rps | $n_rps | $o_cpu µs | $n_cpu µs | $(python3 -c "print(f'{$n_cpu / $o_cpu:.3f}')") |"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
MO=$(median "${OLD_CPU[@]}"); MN=$(median "${NEW_CPU[@]}")
echo
echo "Median CPU per request: old $MO µs, new $MN µs, new / old **$(python3 -c "print(f'{$MN / $MO:.3f}')")**."
echo "Peak RSS: old $(awk '/VmHWM/{print $2}' "/proc/$OLD_PID/status") KiB, new $(awk '/VmHWM/{print $2}' "/proc/$NEW_PID/status") KiB."
# Spans by outcome, when a server exports them ([otel] in OLD_EXTRA / NEW_EXTRA).
for side in old:$OLD_PORT new:$NEW_PORT; do
  spans=$(curl -s "http://127.0.0.1:${side#*:}/metrics" | awk '/^tollgate_otel_spans_total/ {printf "%s %s, ", $1, $2}')
  [ -n "$spans" ] && echo "OpenTelemetry spans, ${side%%:*}: ${spans%, }."
done
true
