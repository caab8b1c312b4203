#!/usr/bin/env bash
# The quickstart submitted as a Ray job to a local head, the way a cluster runs it: `make test-job`,
# and CI after `make test`. Starts a head with `ray start --head`, runs the README's own `ray job
# submit` command line (read from README.md, so the README cannot drift from what is tested), which
# waits for the job and exits 1 if it failed, checks the run's outputs, and stops the head (also on
# failure).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"         # the head, and so the job's `python`, use the project's venv
export RAY_ADDRESS=http://127.0.0.1:8275    # the job API of the head started below
# Ray 2.5x+ turns token authentication on for `ray start`; the job CLI sends the token (kept by
# `ray start` under ~/.ray) only in token mode.
export RAY_AUTH_MODE=token
OUT=$(mktemp -d)
TIMEOUT_S=${TIMEOUT_S:-3600}
# The first command of the README's "Running on a cluster" section, continuation lines joined.
SUBMIT=$(python - <<'PY'
import re
text = open("README.md").read()
m = re.search(r"^ray job submit --working-dir \. .*?configs/quickstart\.yaml[^\n]*$", text, re.S | re.M)
assert m, "README.md: no `ray job submit --working-dir . ... configs/quickstart.yaml` command"
print(m.group(0).replace("\\\n", " "))
PY
)
echo "check_local_job: $SUBMIT"

# `ray stop` at the end stops every Ray process of this user on the machine, as it always does.
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --port 6390 --dashboard-port 8275 --num-cpus 2 --disable-usage-stats \
    --include-dashboard true --dashboard-host 127.0.0.1

# As written, plus this check's own output folder and bucket (later overrides win).
if ! timeout "$TIMEOUT_S" bash -c "$SUBMIT run.output_dir=$OUT run.upload_to=file://$OUT/bucket" >"$OUT/job.log" 2>&1; then
    tail -n 40 "$OUT/job.log"
    echo "check_local_job: the job failed or ran past ${TIMEOUT_S}s (expected it to succeed)" >&2
    exit 1
fi
tail -n 25 "$OUT/job.log"

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
# The quickstart's training (synthetic rows and Debian crop pairs, the scored documents excluded) is
# seeded and gives the same scores run after run, about a point above the base: a run that does not
# improve on the base has broken training or data.
assert ndcg["trained"] > ndcg["base"], f"the trained model scores no better than its base: {ndcg}"
print(f"check_local_job: SUCCEEDED; {rows} synthetic rows; nDCG@10 {ndcg}; {len(files(run))} files uploaded")
PY
