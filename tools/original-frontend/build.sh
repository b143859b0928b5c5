#!/usr/bin/env bash
# Build the prepared frontend for a Visionyard API on HOST:PORT. NEXT_PUBLIC_API_URL is inlined at
# build time (the WebSocket URL is derived from it), so rebuild when the API port changes.
# Usage: tools/original-frontend/build.sh PORT [HOST]   (FRONTEND_DIR default: tools/original-frontend/.work/frontend)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PORT=${1:?usage: build.sh PORT [HOST]}
HOST=${2:-127.0.0.1}
cd "${FRONTEND_DIR:-$HERE/.work/frontend}"
export NEXT_PUBLIC_API_URL="http://${HOST}:${PORT}/api/v1" NEXT_TELEMETRY_DISABLED=1
echo "building with NEXT_PUBLIC_API_URL=$NEXT_PUBLIC_API_URL"
npx next build
echo "$NEXT_PUBLIC_API_URL" > .built-for
