#!/usr/bin/env bash
# The quickstart submitted as a Ray job to a local head, the way a cluster runs it: `make test-job`,
# and CI after `make test`. Starts a head with `ray start --head`, submits jobs/pipeline.py with
# `ray job submit`, waits for SUCCEEDED, checks the run's outputs, and stops the head (also on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"         # the head, and so the job's `python`, use the project's venv
export RAY_ADDRESS=http://127.0.0.1:8275    # the job API of the head started below
# Ray 2.5x+ turns token authentication on for `ray start`; the job CLI sends the token (kept by
# `ray start` under ~/.ray) only in token mode.
export RAY_AUTH_MODE=token
OUT=$(mktemp -d)
ID="speed-ray-check-$(date +%s)"
TIMEOUT_S=${TIMEOUT_S:-3600}

# `ray stop` at the end stops every Ray process of this user on the machine, as it always does.
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --port 6390 --dashboard-port 8275 --num-cpus 2 --disable-usage-stats \
    --include-dashboard true --dashboard-host 127.0.0.1

ray job submit --no-wait --submission-id "$ID" --working-dir . --runtime-env cluster/runtime_env.yaml -- \
    python jobs/pipeline.py --config configs/quickstart.yaml \
    run.ray_address=auto run.output_dir="$OUT" run.upload_to="file://$OUT/bucket"

status=PENDING
deadline=$((SECONDS + TIMEOUT_S))
while [[ $SECONDS -lt $deadline ]]; do
    # `ray job status` ends with "Job '<id>' succeeded" (or failed, stopped, "is currently running")
    status=$(ray job status "$ID" 2>&1 | grep -oiE "succeeded|failed|stopped|running|pending" | tail -1 | tr a-z A-Z || true)
    [[ $status == SUCCEEDED || $status == FAILED || $status == STOPPED ]] && break
    sleep 15
done
ray job logs "$ID" | tail -n 25
if [[ $status != SUCCEEDED ]]; then
    echo "check_local_job: job $ID ended $status (expected SUCCEEDED)" >&2
    exit 1
fi

# The outputs a run promises: every stage's manifest, rows, a trained model scored, the report, and
# the same files in the object store (run.upload_to; a file:// bucket here, s3:// or gs:// on a cloud).
python - "$OUT/quickstart" "$OUT/bucket/quickstart" <<'PY'
import json, sys
from pathlib import Path

run, bucket = Path(sys.argv[1]), Path(sys.argv[2])
files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
assert files(run) == files(bucket), set(files(run)) ^ set(files(bucket))
for stage in ("synth/examples", "embed/model", "eval"):
    assert (run / stage / "_manifest.json").is_file(), f"{run / stage}: no _manifest.json"
rows = json.loads((run / "synth/examples/_manifest.json").read_text())["num_rows"]
scores = json.loads((run / "eval/_manifest.json").read_text())["scores"]
assert rows > 0 and {"base", "trained"} <= set(scores), (rows, list(scores))
assert (run / "report.md").is_file() and (run / "report.html").is_file()
ndcg = {m: round(s["DebianPackageRetrieval"]["ndcg_at_10"], 4) for m, s in scores.items()}
print(f"check_local_job: SUCCEEDED; {rows} synthetic rows; nDCG@10 {ndcg}; {len(files(run))} files uploaded")
PY
