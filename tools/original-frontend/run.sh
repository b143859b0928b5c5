#!/usr/bin/env bash
# Check issue 12's "Done when" in one command: start `visionyard up` (this checkout's .venv), build the
# original frontend for it if needed, serve it, drive it in headless Chromium (drive.py), run the
# original e2e inference script, stop everything started here.
# First time: make install; apt-get install -y chromium fonts-noto-cjk; then
#   tools/original-frontend/run.sh ORIGINAL_GIT_DIR        (a clone of pink-haribo/mvp-vision-ai-platform)
# Env: FH_PORT (API port, 8765), FH_EMAIL/FH_PASSWORD (else the admin login `up` prints), FH_SHIM
# (drive.py --shim). Output under tools/original-frontend/.work/: run-HHMM.log, last-run.json, shots/.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
W=$HERE/.work
SRC=${1:?usage: run.sh ORIGINAL_GIT_DIR [drive.py args]}; shift
PORT=${FH_PORT:-8765}
API="http://127.0.0.1:$PORT/api/v1"
mkdir -p "$W"
exec > >(tee "$W/run-$(date -u +%H%M).log") 2>&1
[ -d "$W/frontend/node_modules" ] || "$HERE/prepare.sh" "$SRC" || exit 2
[ -x "$W/venv/bin/python" ] || { python3 -m venv "$W/venv" && "$W/venv/bin/pip" install -q -r "$HERE/requirements.txt"; } || exit 2
[ -d "$W/data/heldout-flat" ] || "$ROOT/.venv/bin/python" "$HERE/make_dataset.py" || exit 2
[ "$(cat "$W/frontend/.built-for" 2>/dev/null)" = "$API" ] || "$HERE/build.sh" "$PORT" > "$W/build.log" 2>&1 || { tail "$W/build.log"; exit 2; }
DATA=$(mktemp -d)
setsid "$ROOT/.venv/bin/visionyard" up --data-dir "$DATA" --api-port "$PORT" > "$W/up.log" 2>&1 & UP=$!
setsid "$HERE/serve.sh" > "$W/serve.log" 2>&1 & SERVE=$!
cleanup() { kill -INT "$UP" 2>/dev/null; for i in $(seq 1 30); do kill -0 "$UP" 2>/dev/null || break; sleep 1; done
            kill -TERM -- "-$UP" "-$SERVE" 2>/dev/null; rm -rf "$DATA"; }
trap cleanup EXIT
for i in $(seq 1 180); do curl -fsS -o /dev/null "http://127.0.0.1:$PORT/health" 2>/dev/null && break; sleep 1; done
for i in $(seq 1 60); do curl -fsS -o /dev/null http://127.0.0.1:3300/ 2>/dev/null && break; sleep 1; done
LOGIN=$(grep -m1 "admin login:" "$W/up.log" | sed -E 's/.*admin login:[[:space:]]+([^ ]+) \/ ([^ ]+).*/\1 \2/')
EMAIL=${FH_EMAIL:-${LOGIN%% *}}; PASSWORD=${FH_PASSWORD:-${LOGIN#* }}
echo "== $(date -u +%FT%TZ) $(git -C "$ROOT" log --oneline -1 | cut -c1-90); admin login $EMAIL"
SHIM=(); [ -n "${FH_SHIM:-}" ] && SHIM=(--shim "$FH_SHIM")
"$W/venv/bin/python" "$HERE/drive.py" --api "$API" --email="$EMAIL" --password="$PASSWORD" --keep-going \
  --shots "$W/shots" --report "$W/last-run.json" --images "$W/data/heldout-flat" --dataset "$W/data/digits.zip" "${SHIM[@]}" "$@"
DRIVE=$?
FH_EMAIL=$EMAIL FH_PASSWORD=$PASSWORD "$HERE/e2e.sh" "$SRC" "$API"
E2E=$?
echo "== drive rc=$DRIVE, e2e rc=$E2E"
[ $DRIVE -eq 0 ] && [ $E2E -eq 0 ]
