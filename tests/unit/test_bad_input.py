"""Bad input: a bad row in a data file, a mistyped model name or a model folder without weights is
exit status 2 and one line naming the file, the line (or row), the field and what was expected, at
config validation, before Ray starts: through ``speed-ray`` and through the jobs/*.py entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speed_ray import cli
from speed_ray.io.data import DataError
from tests.conftest import REPO

OK = [{"id": "a", "text": "A tool to resize images."}, {"id": "b", "text": "A music player."}]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def beir(folder: Path, corpus=None, queries=None, qrels=None) -> Path:
    (folder / "qrels").mkdir(parents=True)
    jsonl(folder / "corpus.jsonl", corpus or [{"_id": "d1", "title": "", "text": "doc"}])
    jsonl(folder / "queries.jsonl", queries or [{"_id": "q1", "text": "query"}])
    (folder / "qrels" / "test.tsv").write_text(qrels or "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return folder


def corpus_null_text(t: Path):
    path = jsonl(t / "corpus.jsonl", [*OK, {"id": "c", "text": None}])
    return [
        "embed.data.source=corpus",
        f"embed.data.path={path}",
    ], f"{path}:3: text: expected a non-empty string, got null"


def corpus_not_json(t: Path):
    path = jsonl(t / "corpus.jsonl", [OK[0], "", '{"id": "b", "text": "x"'])
    return ["embed.data.source=corpus", f"embed.data.path={path}"], f"{path}:3: not valid JSON"


def pairs_wrong_columns(t: Path):
    path = t / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"query": "q", "document": "d"}]), path)
    return (
        ["embed.data.source=pairs", f"embed.data.path={path}"],
        f"{path}:1: missing keys ['anchor', 'positive'] (expected ['anchor', 'positive'])",
    )


def pairs_null_anchor(t: Path):
    path = jsonl(t / "pairs.jsonl", [{"anchor": "a", "positive": "p"}, {"anchor": None, "positive": "p"}])
    return [
        "embed.data.source=pairs",
        f"embed.data.path={path}",
    ], f"{path}:2: anchor: expected a non-empty string, got null"


def pairs_number_positive(t: Path):
    path = jsonl(t / "pairs.jsonl", [{"anchor": "a", "positive": 3}])
    return [
        "embed.data.source=pairs",
        f"embed.data.path={path}",
    ], f"{path}:1: positive: expected a string, got int 3"


def beir_corpus_without_id(t: Path):
    folder = beir(t / "beir", corpus=[{"id": "d1", "text": "doc"}])
    return (
        [f"eval.retrieval.path={folder}"],
        f"{folder / 'corpus.jsonl'}:1: missing keys ['_id'] (expected ['_id', 'text'])",
    )


def beir_query_null_text(t: Path):
    folder = beir(t / "beir", queries=[{"_id": "q1", "text": "x"}, {"_id": "q2", "text": None}])
    return (
        [f"eval.retrieval.path={folder}"],
        f"{folder / 'queries.jsonl'}:2: text: expected a non-empty string, got null",
    )


def beir_qrels_bad_score(t: Path):
    folder = beir(t / "beir", qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\thigh\n")
    return (
        [f"eval.retrieval.path={folder}"],
        f"{folder / 'qrels' / 'test.tsv'}:3: score: expected an integer, got 'high'",
    )


def knn_without_label_field(t: Path):
    path = jsonl(t / "l.jsonl", [{"text": "t", "label": "games"}])
    return (
        [f"eval.knn.path={path}", "eval.knn.label_field=section"],
        f"{path}:1: missing keys ['section'] (expected ['text', 'section'])",
    )


def clustering_empty_text(t: Path):
    path = jsonl(t / "l.jsonl", [{"text": "t", "label": "x"}, {"text": "", "label": "y"}])
    return [f"eval.clustering.path={path}"], f'{path}:2: text: expected a non-empty string, got ""'


def knn_row_not_an_object(t: Path):
    path = jsonl(t / "l.jsonl", [{"text": "t", "label": "x"}, [1, 2]])
    return [f"eval.knn.path={path}"], f"{path}:2: expected a JSON object, got a list [1, 2]"


def align_seed_null_completion(t: Path):
    prompt = [{"role": "user", "content": "Write a query."}]
    path = jsonl(
        t / "seed.jsonl", [{"messages": prompt, "completion": "{}"}, {"messages": prompt, "completion": None}]
    )
    return [
        f"align.seed_data={path}"
    ], f"align.seed_data: {path}:2: completion: expected a non-empty string, got null"


def model_typo(t: Path):
    return (
        ["embed.model=all-minilm-l6v2"],
        "embed.model: unknown model 'all-minilm-l6v2'; did you mean all-minilm-l6-v2?",
    )


def eval_model_typo(t: Path):
    return (
        ["eval.models=[base, tiny-bret, bm25]"],
        "eval.models[1]: unknown model 'tiny-bret'; did you mean tiny-bert?",
    )


def engine_model_typo(t: Path):  # the hub's spelling of a built-in: no org, so not a hub name
    return (
        ["synth.engine.model=SmolLM2-135M-Instruct"],
        "synth.engine.model: unknown model 'SmolLM2-135M-Instruct'; did you mean smollm2-135m-instruct?",
    )


def folder_without_weights(t: Path):
    (t / "m").mkdir()
    (t / "m" / "config.json").write_text("{}")
    return ["embed.model=" + str(t / "m")], f"embed.model: model folder {t / 'm'}: no weights in"


def folder_without_config(t: Path):
    (t / "m").mkdir()
    (t / "m" / "model.safetensors").write_bytes(b"")
    return ["embed.model=" + str(t / "m")], f"embed.model: model folder {t / 'm'}: no config.json"


def pairs_folder_of_nothing(t: Path):
    (t / "pairs").mkdir()
    (t / "pairs" / "notes.txt").write_text("not a dataset")
    return (
        ["embed.data.source=pairs", f"embed.data.path={t / 'pairs'}"],
        f"embed.data.path: {t / 'pairs'}: a folder, but neither a finished speed-ray step",
    )


# case -> the stage (and so the job script) that reads what it names
CASES = {
    corpus_null_text: "embed",
    corpus_not_json: "embed",
    pairs_wrong_columns: "embed",
    pairs_null_anchor: "embed",
    pairs_number_positive: "embed",
    pairs_folder_of_nothing: "embed",
    beir_corpus_without_id: "eval",
    beir_query_null_text: "eval",
    beir_qrels_bad_score: "eval",
    knn_without_label_field: "eval",
    clustering_empty_text: "eval",
    knn_row_not_an_object: "eval",
    align_seed_null_completion: "align",
    model_typo: "embed",
    eval_model_typo: "eval",
    engine_model_typo: "synth",
    folder_without_weights: "embed",
    folder_without_config: "embed",
}
JOBS = {
    "embed": "jobs/embed.py",
    "eval": "jobs/evaluate.py",
    "align": "jobs/align.py",
    "synth": "jobs/synth.py",
}


def config(tmp_path: Path) -> Path:
    """A config that reads no data of its own (no retrieval folder), runs under tmp_path."""
    path = tmp_path / "c.yaml"
    path.write_text(f"run: {{output_dir: {tmp_path / 'runs'}}}\neval:\n  retrieval: {{path: null}}\n")
    return path


def one_error_line(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("speed-ray: error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input_through_the_cli(case, tmp_path, capsys):
    overrides, expected = case(tmp_path)
    assert cli.main([CASES[case], str(config(tmp_path)), *overrides]) == 2
    one_error_line(capsys.readouterr().err, expected)
    assert not (tmp_path / "runs").exists()  # failed before anything ran


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input_through_a_job(case, tmp_path):
    overrides, expected = case(tmp_path)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, JOBS[CASES[case]], "--config", str(config(tmp_path)), *overrides],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    one_error_line(r.stderr, expected)
    assert not (tmp_path / "runs").exists()  # before Ray: nothing ran, not even the config was saved


def test_a_bad_row_found_during_a_stage_is_exit_2_too(tmp_path, capsys, monkeypatch):
    """A file that changed after validation: the stage's reader raises DataError; still one line."""

    def stage(cfg):
        raise DataError(f"{tmp_path}/corpus.jsonl:7: text: expected a non-empty string, got null")

    monkeypatch.setattr(cli, "run_stages", stage)
    assert cli.main(["embed", str(config(tmp_path))]) == 2
    one_error_line(capsys.readouterr().err, "corpus.jsonl:7: text: expected a non-empty string")


def test_model_spec_rule(hub_cache):
    from speed_ray.io.models import spec_problem

    for good in ("all-minilm-l6-v2", "tiny-bert", "run:align/senior"):
        assert spec_problem(good) is None
    assert spec_problem("./nowhere") == "model folder ./nowhere not found"
    assert "did you mean" not in spec_problem("zzzz")  # no close name: the built-ins are listed
    assert "tiny-llama" in spec_problem("zzzz")
    # offline (the suite's HF_HUB_OFFLINE=1), a hub id passes when the local Hugging Face cache holds
    # it, a bare legacy id (no org) too; tests/unit/test_hub_models.py has the rest
    assert spec_problem("bert-base-uncased") is not None
    assert spec_problem("BAAI/bge-small-en-v1.5") is not None
    hub_cache("bert-base-uncased")
    hub_cache("BAAI/bge-small-en-v1.5")
    assert spec_problem("bert-base-uncased") is None
    assert spec_problem("BAAI/bge-small-en-v1.5") is None
    typo = spec_problem("bert-base-uncsed")
    assert "unknown model 'bert-base-uncsed'; did you mean bert-base-uncased?" in typo


def test_experiment_variant_names_are_eval_models(tmp_path):
    from speed_ray.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "experiment:\n  variants: {crops: {embed.steps: 2}}\neval:\n  models: [base, crops, tfidf]\n"
    )
    assert load_config(path, ["eval.retrieval.path=null"]).eval.models == ["base", "crops", "tfidf"]


def test_sound_data_is_read_once_per_process(tmp_path, monkeypatch):
    from speed_ray.config import load_config
    from speed_ray.io import data

    path = jsonl(tmp_path / "corpus.jsonl", OK)
    args = ["embed.data.source=corpus", f"embed.data.path={path}", "eval.retrieval.path=null"]
    load_config(None, args)
    calls = []
    monkeypatch.setattr(data, "iter_corpus", lambda p: calls.append(p) or [])
    load_config(None, args)  # e.g. the run's saved config, loaded again to compare
    assert calls == []
    jsonl(path, [*OK, {"id": "c", "text": "changed"}])
    os.utime(path, ns=(1, 1))  # a changed file is read again
    load_config(None, args)
    assert calls == [path]
