#!/usr/bin/env bash
# Serve the built frontend in the foreground on 127.0.0.1:FPORT (default 3300).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "${FRONTEND_DIR:-$HERE/.work/frontend}"
echo "frontend built for $(cat .built-for 2>/dev/null || echo '?'); serving http://127.0.0.1:${1:-3300}"
export NEXT_TELEMETRY_DISABLED=1
exec npx next start -p "${1:-3300}" -H 127.0.0.1
