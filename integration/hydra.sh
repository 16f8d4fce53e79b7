# integration/hydra.sh — sourced by integration/testbed: Ory Hydra (Apache-2.0), a real OAuth 2.0
# authorization server, for shardgate's upstream OAUTHBEARER tests. Built from the Go module proxy
# like Consul (first time ~2-3 min on 2 cores), run in its --dev mode with an in-memory SQLite
# store, JWT access tokens signed RS256 and lasting HYDRA_TOKEN_TTL. The brokers' OAUTH listener
# (oauth_port) checks those tokens against Hydra's JWKS with Kafka's own
# OAuthBearerValidatorCallbackHandler; shardgate asks Hydra's token endpoint for them with the
# client-credentials grant as client $OAUTH_CLIENT_ID.

HYDRA_VERSION="2.3.0"
HYDRA_HOME="$CACHE/hydra-$HYDRA_VERSION"
HYDRA_BIN="$HYDRA_HOME/hydra"
HYDRA_RUN_DIR="$RUN_DIR/hydra"
# Public (token endpoint, JWKS) and admin (client registration) HTTP ports.
HYDRA_PUBLIC_PORT=28444
HYDRA_ADMIN_PORT=28445
HYDRA_ISSUER="http://127.0.0.1:$HYDRA_PUBLIC_PORT"
HYDRA_TOKEN_URL="$HYDRA_ISSUER/oauth2/token"
HYDRA_JWKS_URL="$HYDRA_ISSUER/.well-known/jwks.json"
# Short, so a test sees shardgate fetch new tokens and the broker end sessions with them.
HYDRA_TOKEN_TTL=30s
OAUTH_CLIENT_ID="shardgate-upstream"
OAUTH_CLIENT_SECRET="shardgate-oauth-client-secret"
# The brokers expect it in the tokens' `aud`; Hydra puts it there when the request asks.
OAUTH_AUDIENCE="kafka"

# OAUTH listener of node n (19892..19894): SASL_SSL with OAUTHBEARER only, tokens from Hydra.
oauth_port() { echo $((19891 + $1)); }

hydra_pidfile() { echo "$HYDRA_RUN_DIR/hydra.pid"; }
hydra_running() { pid_alive "$(hydra_pidfile)" "$HYDRA_BIN serve"; }
hydra_ready() { curl -sf -m 2 "http://127.0.0.1:$HYDRA_ADMIN_PORT/health/ready" >/dev/null; }

# Hydra's module has a local replace (./internal/httpclient, a nested module the proxy serves
# on its own and leaves out of hydra's zip): dropped, so the published hydra-client-go is used.
install_hydra() {
  local json mod src="$HYDRA_HOME/src" blog="$TOOLS_LOG_DIR/hydra-build.log" t0
  if [[ -x "$HYDRA_BIN" ]]; then return 0; fi
  command -v go >/dev/null || die "go not found"
  command -v gcc >/dev/null || die "gcc not found (Hydra's SQLite store is cgo)"
  t0="$(now)"
  mkdir -p "$HYDRA_HOME" "$TOOLS_LOG_DIR"
  log "downloading github.com/ory/hydra/v2@v$HYDRA_VERSION from the Go module proxy"
  json="$(cd "$HYDRA_HOME" && go_env go mod download -json "github.com/ory/hydra/v2@v$HYDRA_VERSION" 2>&1)" ||
    die "go mod download github.com/ory/hydra/v2@v$HYDRA_VERSION failed: $json"
  mod="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")"
  [[ -n "$mod" && -f "$mod/go.mod" ]] || die "no module directory in the go mod download output: $json"
  grep -q 'Apache License' "$mod/LICENSE" || die "Hydra $HYDRA_VERSION is not Apache-2.0"
  rm -rf "$src" "$HYDRA_BIN.tmp"
  cp -r "$mod" "$src"
  chmod -R u+w "$src"
  (cd "$src" && go_env go mod edit -dropreplace=github.com/ory/hydra-client-go/v2) ||
    die "go mod edit -dropreplace failed"
  log "building Hydra $HYDRA_VERSION (niced; minutes; log: $blog)"
  (cd "$src" && go_env nice -n 10 env GOFLAGS="-modcacherw -mod=mod" GONOSUMDB=github.com/ory/hydra-client-go \
    go build -trimpath -tags sqlite,sqlite_omit_load_extension -o "$HYDRA_BIN.tmp" .) >"$blog" 2>&1 || {
    tail -n 30 "$blog" >&2
    die "go build of Hydra failed (log: $blog)"
  }
  "$HYDRA_BIN.tmp" version >/dev/null || die "$HYDRA_BIN.tmp version failed"
  mv -f "$HYDRA_BIN.tmp" "$HYDRA_BIN"
  cp -f "$mod/LICENSE" "$HYDRA_HOME/LICENSE"
  rm -rf "$src"
  log "Hydra $HYDRA_VERSION built in $(elapsed_since "$t0")s ($HYDRA_BIN)"
}

# Starts Hydra (in-memory store: everything is registered again at each start) and registers
# shardgate's OAuth client.
start_hydra() {
  [[ -x "$HYDRA_BIN" ]] || die "Hydra is not installed; run '$0 install --oauth'"
  if hydra_running; then
    log "hydra already running (pid $(<"$(hydra_pidfile)"))"
    return 0
  fi
  local p
  for p in "$HYDRA_PUBLIC_PORT" "$HYDRA_ADMIN_PORT"; do
    port_in_use "$p" && die "port 127.0.0.1:$p is already in use by a process the testbed did not start"
  done
  mkdir -p "$HYDRA_RUN_DIR"
  rm -f "$(hydra_pidfile)"
  log "starting hydra $HYDRA_VERSION on $HYDRA_ISSUER (admin 127.0.0.1:$HYDRA_ADMIN_PORT)"
  # shellcheck disable=SC2016 # $$ and $@ belong to the inner bash
  setsid nohup env DSN=memory URLS_SELF_ISSUER="$HYDRA_ISSUER" STRATEGIES_ACCESS_TOKEN=jwt \
    SECRETS_SYSTEM="shardgate-testbed-hydra-system-secret" TTL_ACCESS_TOKEN="$HYDRA_TOKEN_TTL" \
    SERVE_PUBLIC_HOST=127.0.0.1 SERVE_PUBLIC_PORT="$HYDRA_PUBLIC_PORT" \
    SERVE_ADMIN_HOST=127.0.0.1 SERVE_ADMIN_PORT="$HYDRA_ADMIN_PORT" LOG_LEVEL=warn \
    bash -c 'echo $$ >"$0"; exec "$@"' "$(hydra_pidfile)" "$HYDRA_BIN" serve all --dev \
    >>"$HYDRA_RUN_DIR/hydra.log" 2>&1 </dev/null &
  wait_until 10 "hydra pid file" test -s "$(hydra_pidfile)" || die "hydra did not start"
  wait_until 30 "hydra ready" hydra_ready || {
    tail -n 20 "$HYDRA_RUN_DIR/hydra.log" >&2
    die "hydra not ready after 30 s (log: $HYDRA_RUN_DIR/hydra.log)"
  }
  curl -sf -m 10 -X POST "http://127.0.0.1:$HYDRA_ADMIN_PORT/admin/clients" \
    -H 'Content-Type: application/json' \
    -d "{\"client_id\":\"$OAUTH_CLIENT_ID\",\"client_secret\":\"$OAUTH_CLIENT_SECRET\",\"grant_types\":[\"client_credentials\"],\"audience\":[\"$OAUTH_AUDIENCE\"],\"token_endpoint_auth_method\":\"client_secret_basic\",\"access_token_strategy\":\"jwt\"}" \
    >/dev/null || die "registering OAuth client $OAUTH_CLIENT_ID in hydra failed"
  # The first token makes Hydra create its signing key, so the brokers find it in the JWKS.
  curl -sf -m 10 -u "$OAUTH_CLIENT_ID:$OAUTH_CLIENT_SECRET" -d grant_type=client_credentials -d audience="$OAUTH_AUDIENCE" \
    "$HYDRA_TOKEN_URL" >/dev/null || die "hydra issues no token for $OAUTH_CLIENT_ID"
  log "hydra ready (client $OAUTH_CLIENT_ID registered)"
}

stop_hydra() {
  stop_pids "${TESTBED_STOP_TIMEOUT:-20}" "$(hydra_pidfile):$HYDRA_BIN serve"
  rm -f "$(hydra_pidfile)"
}

# The brokers' OAUTH listener settings (server.properties lines), when Hydra runs.
hydra_broker_properties() {
  cat <<EOF
# OAUTH: OAUTHBEARER over TLS, JWTs signed by the testbed's Hydra, checked against its JWKS by
# Kafka's own validator (upstream OAUTHBEARER tests). Sessions end after 10 s (KIP-368) or
# with the token, whichever is first.
listener.name.oauth.sasl.enabled.mechanisms=OAUTHBEARER
listener.name.oauth.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;
listener.name.oauth.oauthbearer.sasl.server.callback.handler.class=org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler
listener.name.oauth.oauthbearer.sasl.oauthbearer.jwks.endpoint.url=$HYDRA_JWKS_URL
# Kafka 4.1's default validator (DefaultJwtValidator) checks claims only, not signatures,
# unless built with a key resolver: BrokerJwtValidator verifies them against the JWKS (a
# forged signature was accepted without this line; the oauth test provokes exactly that).
listener.name.oauth.oauthbearer.sasl.oauthbearer.jwt.validator.class=org.apache.kafka.common.security.oauthbearer.BrokerJwtValidator
sasl.oauthbearer.jwt.validator.class=org.apache.kafka.common.security.oauthbearer.BrokerJwtValidator
sasl.oauthbearer.jwks.endpoint.url=$HYDRA_JWKS_URL
sasl.oauthbearer.expected.issuer=$HYDRA_ISSUER
sasl.oauthbearer.expected.audience=$OAUTH_AUDIENCE
listener.name.oauth.oauthbearer.sasl.oauthbearer.expected.issuer=$HYDRA_ISSUER
listener.name.oauth.oauthbearer.sasl.oauthbearer.expected.audience=$OAUTH_AUDIENCE
listener.name.oauth.connections.max.reauth.ms=10000
EOF
}
