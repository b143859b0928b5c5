#!/usr/bin/env bash
# Run the original platform's tests/e2e/test_inference_e2e.py (taken unchanged from ORIGINAL_GIT_DIR at
# dd57f0e into .work/, never into this repository) against a Visionyard API.
# Usage: tools/original-frontend/e2e.sh ORIGINAL_GIT_DIR API_URL [JOB_ID]
#   Without JOB_ID, prep_e2e.py trains one first (login with FH_EMAIL/FH_PASSWORD if set).
#   The script's arguments: --api-url, --job-id (argparse type=int), --images, --pretrained, --timeout.
#   It reads: GET /training/jobs/{id} -> model_name, best_checkpoint_path; upload-images -> s3_prefix,
#   inference_session_id, total_files, uploaded_files[{original_filename, unique_filename}]; POST
#   inference/jobs {…, input_data.image_paths_s3: <s3_prefix string>} -> id, status; jobs/detail/{id} ->
#   status, total_images, total_inference_time_ms, avg_inference_time_ms (formatted :.1f, so never null);
#   jobs/{id}/results -> total_count, results[{image_name, inference_time_ms, predictions|predicted_boxes}].
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
W=$HERE/.work
SRC=${1:?usage: e2e.sh ORIGINAL_GIT_DIR API_URL [JOB_ID]}
API=${2:?usage: e2e.sh ORIGINAL_GIT_DIR API_URL [JOB_ID]}
JOB=${3:-}
mkdir -p "$W"
git -C "$SRC" show dd57f0e:platform/backend/tests/e2e/test_inference_e2e.py > "$W/test_inference_e2e.py"
if [ -z "$JOB" ]; then
  JOB=$("$W/venv/bin/python" "$HERE/prep_e2e.py" "$API" --email="${FH_EMAIL:-}" --password="${FH_PASSWORD:-}" | tail -1) || { echo "prep failed"; exit 2; }
fi
# one held-out image per class (file names start with label<d>-)
IMAGES=$(ls "$W"/data/heldout-flat/*.png | awk -F/ '{split($NF,a,"-"); if (!seen[a[1]]++) print}' | head -5)
echo "== trained checkpoint (job $JOB) =="
"$W/venv/bin/python" "$W/test_inference_e2e.py" --api-url "$API" --job-id "$JOB" --images $IMAGES --timeout 120
RC=$?
echo "e2e rc=$RC (--pretrained is refused by design: the built-in trainers ship no pretrained weights)"
exit $RC
