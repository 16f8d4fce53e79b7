# bench/prefetch_targets.sh — sourced by the bench/prefetch-* scripts (after they set `work`
# and `delay`): builds the release binary, starts a 1-broker testbed without its shardgate,
# with delay > 0 a delaying relay in front of Kafka (bench/delay_relay.py, D ms each way),
# and three shardgates in front of it (or the relay) that differ only in prefetch.mode:
#   direct          Kafka itself (through the relay when there is one)
#   prefetch-off    127.0.0.1:29189, mode "off" (nothing read before it is asked)
#   sequential      127.0.0.1:29187, mode "sequential" (each connection's queue read ahead)
#   predictive      127.0.0.1:29188, mode "predictive", the default
# PREFETCH_EXTRA (environment): TOML lines added to every instance's [prefetch] table (tuning
# experiments, e.g. PREFETCH_EXTRA='horizon_ms = 3000'). BENCH_LOG: the instances' log filter
# (default warn; e.g. BENCH_LOG=warn,shardgate::proxy::fetch=debug traces each fetch).
# Sets `targets` and `admins` (name → address / admin port), `pid_of`, `upstream`; defines
# `counter ADMIN_PORT METRIC` (sum over its series), `cpu_s PID` and `embed_cpu_s PID`. Stops everything on exit.
target_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
cargo build --release --quiet --bins
bin="$target_dir/release/shardgate"
integration/testbed install >/dev/null
integration/testbed down >/dev/null 2>&1 || true
rm -rf "$work"; mkdir -p "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  integration/testbed down >/dev/null 2>&1 || true
}
trap cleanup EXIT
integration/testbed up --brokers 1 --no-proxy >/dev/null

upstream="127.0.0.1:19092"
if [[ $delay != 0 ]]; then
  "$VENV/bin/python" bench/delay_relay.py --delay-ms "$delay" "$(far_relay_port 1):$(far_port 1)" \
    >"$work/relay.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do grep -qs "relay ready" "$work/relay.log" && break; sleep 0.1; done
  upstream="127.0.0.1:$(far_relay_port 1)"
fi

declare -A pid_of
start_instance() { # NAME PORT ADMIN_PORT MODE
  cat >"$work/$1.toml" <<TOML
[listener]
bind = "127.0.0.1:$2"
advertised = "127.0.0.1:$2"
node_id = 0

[upstream]
bootstrap = ["$upstream"]

[admin]
bind = "127.0.0.1:$3"

[store]
path = "$work/$1-data"

[prefetch]
mode = "$4"
${PREFETCH_EXTRA:-}
TOML
  SHARDGATE_LOG="${BENCH_LOG:-warn}" "$bin" run --config "$work/$1.toml" >"$work/$1.log" 2>&1 &
  pids+=($!)
  pid_of[$1]=$!
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$3/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "shardgate $1 did not become ready (log: $work/$1.log)"
}
start_instance predictive 29188 29288 predictive
start_instance sequential 29187 29287 sequential
start_instance prefetch-off 29189 29289 off
declare -A targets=([direct]="$upstream" [prefetch-off]="127.0.0.1:29189" [sequential]="127.0.0.1:29187" [predictive]="127.0.0.1:29188")
declare -A admins=([prefetch-off]=29289 [sequential]=29287 [predictive]=29288)
counter() { # ADMIN_PORT NAME
  curl -fs "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 {s += $2} END {print s + 0}'
}
cpu_s() { # PID: user + system CPU seconds
  awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"
}
embed_cpu_s() { # PID: user + system CPU seconds of its sampling and embedding threads
  # (sg-sample, sg-embed-N: all the content work, off the request path)
  local t sum=0
  for t in /proc/"$1"/task/*; do
    case "$(cat "$t/comm" 2>/dev/null)" in
      sg-sample | sg-embed-*)
        sum=$(awk -v s="$sum" -v hz="$(getconf CLK_TCK)" \
          '{sub(/^.*\) /, ""); print s + ($12 + $13) / hz}' "$t/stat") ;;
    esac
  done
  echo "$sum"
}
