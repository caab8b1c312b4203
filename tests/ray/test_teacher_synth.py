"""synth with every model call going to an OpenAI-compatible HTTP teacher (a fake server on
127.0.0.1): brainstorm, examples, judge and reviser through Ray Data actor pools, failed calls kept as
error rows that the counts show, the cost accounted, the API key nowhere in the run directory or the
Ray logs; and an
unreachable teacher stopping the run at once with its URL."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from speed_ray.cli import main
from speed_ray.io.schemas import (
    EXAMPLES,
    GENERATIONS,
    JUDGMENTS,
    PREFERENCE_PAIRS,
    TASKS,
    read_manifest,
    read_stage,
)
from tests.conftest import TEST_API_KEY_ENV
from tests.fakes import FakeTeacher

ROLES = ("engine", "brainstormer", "judge", "reviser")


def overrides(tmp_path, url: str) -> list[str]:
    out = [
        f"run.output_dir={tmp_path}",
        "run.name=teacher",
        "synth.num_topics=20",
        "synth.shard_rows=4",
        "synth.sampling.samples_per_prompt=2",
    ]
    for role in ROLES:
        out += [
            f"synth.{role}.kind=openai",
            f"synth.{role}.model=teacher-model",
            f"synth.{role}.base_url={url}",
            f"synth.{role}.api_key_env={TEST_API_KEY_ENV}",
            f"synth.{role}.num_cpus=0.25",
            f"synth.{role}.batch_size=8",
            f"synth.{role}.max_retries=1",
            f"synth.{role}.price_per_million_input_tokens=5",
            f"synth.{role}.price_per_million_output_tokens=15",
        ]
    return out


def empty_config(tmp_path) -> str:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return str(path)


def errors(table) -> int:
    return table.num_rows - table["error"].null_count


@pytest.mark.faults
def test_synth_through_an_http_teacher(tmp_path, ray_session, capsys, fault_record):
    with FakeTeacher(fail_every=7) as teacher:
        assert main(["synth", empty_config(tmp_path), *overrides(tmp_path, teacher.url)]) == 0
        assert main(["report", empty_config(tmp_path), *overrides(tmp_path, teacher.url)]) == 0
    run = tmp_path / "teacher" / "synth"
    tasks = read_stage(run / "tasks", TASKS)
    gens = read_stage(run / "generations", GENERATIONS)
    judgments = read_stage(run / "judgments", JUDGMENTS)
    drafts = read_stage(run / "drafts", GENERATIONS)
    revisions = read_stage(run / "revisions", GENERATIONS)

    # every row is there once; failed calls are error rows, and the manifests count them
    assert tasks.num_rows == 20 and len(set(tasks["id"].to_pylist())) == 20
    assert gens.num_rows == 2 * tasks["error"].null_count
    for step, table in (
        ("tasks", tasks),
        ("generations", gens),
        ("judgments", judgments),
        ("revisions", revisions),
    ):
        failed = [e for e in table["error"].to_pylist() if e]
        assert all(e.startswith("http 400 after 1 attempt") for e in failed), step
        assert read_manifest(run / step)["accounting"]["errors"] == len(failed), step
    assert errors(gens) > 0  # some calls did fail: seeds are hashes, 1 in 7 of them is a multiple of 7

    # judge: best 1, worst 0 for every verdict that came back
    pairs = read_stage(run / "pairs", PREFERENCE_PAIRS).to_pylist()
    assert len(pairs) >= judgments["error"].null_count > 0
    by_id = {(r["id"], r["sample"]): r["raw"] for r in gens.to_pylist()}
    judged = [p for p in pairs if p["reason"].startswith("judge: ")]
    assert len(judged) == judgments["error"].null_count
    assert all(
        p["chosen"] == [{"role": "assistant", "content": by_id[(p["id"], 1)]}]
        and p["rejected"] == [{"role": "assistant", "content": by_id[(p["id"], 0)]}]
        for p in judged
    )

    # reviser: each draft once; a revised row carries the teacher's text
    assert sorted(revisions["prompt_id"].to_pylist()) == sorted(drafts["id"].to_pylist())
    examples = read_stage(run / "examples", EXAMPLES).to_pylist()
    revised = {r["prompt_id"] for r in revisions.to_pylist() if r["error"] is None}
    assert {e["id"] for e in examples if e["round"] == "revision"} == revised
    assert all(e["query"].startswith("revised ") for e in examples if e["round"] == "revision")

    # accounting: calls = HTTP requests made (400s are not retried; STS needs no brainstorm call)
    calls = sum(
        read_manifest(run / s)["accounting"]["calls"]
        for s in ("tasks", "generations", "judgments", "revisions")
    )
    assert calls == teacher.requests
    acc = read_manifest(run / "generations")["accounting"]
    answered = len({r["id"] for r in gens.to_pylist() if r["error"] is None})  # a 400 reports no usage
    assert (acc["input_tokens"], acc["output_tokens"]) == (100 * answered, 40 * answered)
    assert acc["cost_usd"] == round((acc["input_tokens"] * 5 + acc["output_tokens"] * 15) / 1e6, 4)
    report = (tmp_path / "teacher" / "report.md").read_text()
    assert f"teacher (HTTP) use: {calls} calls" in report and "45000 calls / 32000000 tokens" in report
    assert "![synthesis steps](synth.png)" in report and (tmp_path / "teacher" / "synth.png").is_file()

    # the key reached the server, and no file of the run, no log of the Ray session (driver, actors,
    # tasks, runtime env agent) and nothing printed holds it
    key = os.environ[TEST_API_KEY_ENV]
    assert teacher.auth == {f"Bearer {key}"}
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    searched = [p for root in (tmp_path / "teacher", logs) for p in root.rglob("*") if p.is_file()]
    assert len([p for p in searched if p.is_relative_to(logs)]) > 10  # the workers' logs are there
    hits = [p for p in searched if key.encode() in p.read_bytes()]
    printed = capsys.readouterr().err
    fault_record(
        "an API key planted in the environment (synth with 4 teacher roles, then report)",
        files_searched=len(searched),
        ray_logs_searched=len([p for p in searched if p.is_relative_to(logs)]),
        files_holding_the_key=len(hits),
        printed_lines_holding_the_key=sum(key in line for line in printed.splitlines()),
    )
    assert hits == [] and key not in printed


def test_an_unreachable_teacher_stops_the_run_with_its_url(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    assert main(["synth", empty_config(tmp_path), *overrides(tmp_path, url)]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach {url}/models: connection refused" in err and "Traceback" not in err


def test_an_empty_taxonomy_file_stops_the_run_with_its_name(tmp_path, capsys):
    topics = tmp_path / "topics.txt"
    topics.write_text("# only a comment\n\n")
    args = ["synth", empty_config(tmp_path), f"run.output_dir={tmp_path}", f"synth.taxonomy.path={topics}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"speed-ray: error: {topics}: no topics" in err and "Traceback" not in err
