#!/usr/bin/env bash
# HTTP load test of the product-request guard: one release `warden` on loopback with the
# embedded store, one tenant installed, then `wrk` against `/api/tenant` (a valid tenant JWT on
# every request) and against `/healthz` (no authentication) for comparison.
#
#   scripts/bench-http.sh                 # builds target/release/warden if missing
#   DURATION=10s CONNECTIONS=32 THREADS=1 PORT=18088 scripts/bench-http.sh
#   RUST_LOG=info scripts/bench-http.sh   # with the per-request access log (to a temp file)
#
# Needs wrk (apt-get install -y wrk), curl, openssl. Loopback only; each wrk run is bounded by
# DURATION; the server is killed on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
PORT=${PORT:-18088}
BIN=${WARDEN_BIN:-target/release/warden}
LOG_LEVEL=${RUST_LOG:-warn}

for tool in wrk curl openssl; do
    command -v "$tool" >/dev/null || { echo "bench-http: $tool is required (apt-get install -y $tool)" >&2; exit 1; }
done
if [ ! -x "$BIN" ]; then
    cargo build --release --bin warden
fi

work=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# Legacy install auth: the first install is unsigned, so no install-key server is needed. The
# guard measured below is the same in both modes.
env -u WARDEN_REDIS_URL \
    WARDEN_BIND="127.0.0.1:$PORT" \
    WARDEN_BASE_URL="https://warden.example.com" \
    WARDEN_DATA_DIR="$work/data" \
    WARDEN_INSTALL_AUTH=legacy \
    RUST_LOG="$LOG_LEVEL" \
    "$BIN" >"$work/warden.log" 2>&1 &
server_pid=$!

base="http://127.0.0.1:$PORT"
for _ in $(seq 1 100); do
    curl -fsS "$base/readyz" >/dev/null 2>&1 && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/warden.log" >&2; exit 1; }
    sleep 0.1
done
curl -fsS "$base/readyz" >/dev/null || { echo "bench-http: warden not ready within 10 s" >&2; cat "$work/warden.log" >&2; exit 1; }

client_key="bench-$(date +%s)"
secret="bench-secret-$(openssl rand -hex 16)"
status=$(curl -sS -o /dev/null -w '%{http_code}' -X POST "$base/installed" -H 'content-type: application/json' \
    --data "{\"clientKey\":\"$client_key\",\"sharedSecret\":\"$secret\",\"baseUrl\":\"https://bench.atlassian.net\",\"productType\":\"jira\",\"eventType\":\"installed\"}")
[ "$status" = 204 ] || { echo "bench-http: install answered $status" >&2; cat "$work/warden.log" >&2; exit 1; }

# An HS256 product token for GET /api/tenant, valid for an hour; the qsh from warden itself.
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
qsh=$("$BIN" jwt canonical GET /api/tenant | awk '/^qsh:/ {print $2}')
now=$(date +%s)
header=$(printf '%s' '{"alg":"HS256","typ":"JWT"}' | b64url)
claims=$(printf '{"iss":"%s","sub":"557058:bench-user","iat":%d,"exp":%d,"qsh":"%s"}' "$client_key" "$now" $((now + 3600)) "$qsh" | b64url)
signature=$(printf '%s' "$header.$claims" | openssl dgst -sha256 -hmac "$secret" -binary | b64url)
token="$header.$claims.$signature"

status=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: JWT $token" "$base/api/tenant")
[ "$status" = 200 ] || { echo "bench-http: /api/tenant answered $status to the benchmark token" >&2; exit 1; }

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); RUST_LOG=$LOG_LEVEL"
echo "== wrk -t$THREADS -c$CONNECTIONS -d$DURATION /api/tenant (JWT verified on every request)"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -H "Authorization: JWT $token" "$base/api/tenant" | tee "$work/wrk-tenant.txt"
if grep -q 'Non-2xx' "$work/wrk-tenant.txt"; then
    echo "bench-http: some /api/tenant answers were not 2xx: the figures above are not valid" >&2
    exit 1
fi
echo "== wrk -t$THREADS -c$CONNECTIONS -d$DURATION /healthz (no authentication)"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$base/healthz"

# The token must still pass after the runs.
status=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: JWT $token" "$base/api/tenant")
[ "$status" = 200 ] || { echo "bench-http: /api/tenant answered $status after the run" >&2; exit 1; }
