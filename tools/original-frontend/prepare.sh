#!/usr/bin/env bash
# Export the original platform's frontend (pink-haribo/mvp-vision-ai-platform, platform/frontend at
# dd57f0e) from a local clone of that repository, apply the three build-only fixes listed in
# shared/frontend-contract.md and install its npm packages. Nothing of it is kept in this repository.
# Usage: tools/original-frontend/prepare.sh ORIGINAL_GIT_DIR [DEST]   (DEST default: tools/original-frontend/.work/frontend)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=${1:?usage: prepare.sh ORIGINAL_GIT_DIR [DEST]}
DEST=${2:-$HERE/.work/frontend}
COMMIT=dd57f0e      # the frontend the contract was written against
UTILS_FROM=6746a3e  # the next commit: adds the lib/utils/ the root .gitignore swallowed at dd57f0e
rm -rf "$DEST" && mkdir -p "$DEST"
TMP=$(mktemp -d)
git -C "$SRC" archive "$COMMIT" platform/frontend | tar -x -C "$TMP"
git -C "$SRC" archive "$UTILS_FROM" platform/frontend/lib/utils | tar -x -C "$TMP"
cp -a "$TMP/platform/frontend/." "$DEST/"
rm -rf "$TMP"
# build-only fix 2: components import "@/components/ui/Badge" but the file is badge.tsx
cp "$DEST/components/ui/badge.tsx" "$DEST/components/ui/Badge.tsx"
# build-only fix 3: six existing TypeScript errors stop `next build`
python3 - "$DEST/next.config.js" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
marker = "  reactStrictMode: true,\n"
assert marker in text, "next.config.js changed: add ignoreBuildErrors/ignoreDuringBuilds by hand"
text = text.replace(marker, marker + "  typescript: { ignoreBuildErrors: true },\n  eslint: { ignoreDuringBuilds: true },\n", 1)
open(path, "w").write(text)
PY
[ "${SKIP_NPM:-}" = 1 ] || (cd "$DEST" && npm ci --no-audit --no-fund)
echo "prepared $DEST (dd57f0e + lib/utils from $UTILS_FROM + Badge.tsx + ignoreBuildErrors)"
