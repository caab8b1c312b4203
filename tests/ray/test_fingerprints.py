"""A finished run of synth (an HTTP teacher: a local fake), embed (a tiny BERT), eval and report, then
the same command with another ``embed.learning_rate``: the log names embed as stale and the key that
changed; synth is skipped (no call reaches the teacher, no shard changes), embed is trained again,
eval scores the new model again and keeps the base's score, and the report is written anew."""

from __future__ import annotations

from speed_ray.cli import main
from speed_ray.io.schemas import read_manifest
from tests.conftest import TEST_API_KEY_ENV
from tests.fakes import FakeTeacher

SYNTH_STEPS = ("tasks", "generations", "pairs", "drafts", "examples")


def args(tmp_path, beir, url: str) -> list[str]:
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    engine = ["kind=openai", "model=teacher", f"base_url={url}", f"api_key_env={TEST_API_KEY_ENV}"]
    return [
        "run",
        str(config),
        f"run.output_dir={tmp_path}",
        "run.name=fp",
        "run.stages=[synth, embed, eval, report]",
        *[f"synth.engine.{s}" for s in (*engine, "num_cpus=0.25", "max_retries=1", "batch_size=8")],
        "synth.num_topics=8",
        "synth.sampling.samples_per_prompt=1",
        "synth.dedup.enabled=false",
        "embed.model=tiny-bert",
        "embed.pooling=cls",
        "embed.steps=2",
        "embed.batch_size=2",
        "embed.resources.workers=1",
        f"eval.retrieval.path={beir}",
        "eval.batch_size=16",
    ]


def test_a_changed_learning_rate_redoes_embed_eval_and_report_only(
    tmp_path, beir_tiny, model_cache, ray_session, capsys
):
    run = tmp_path / "fp"
    with FakeTeacher() as teacher:
        assert main(args(tmp_path, beir_tiny, teacher.url)) == 0
        capsys.readouterr()
        calls = teacher.requests
        shards = {p: p.read_bytes() for p in (run / "synth").rglob("*.parquet")}
        before = {
            "embed": read_manifest(run / "embed/model"),
            "eval": read_manifest(run / "eval"),
            "report": (run / "report.md").stat().st_mtime_ns,
        }
        base_result = next((run / "eval/results/speed-ray__base").glob("*/DebianPackageRetrieval.json"))
        base_stamp = base_result.stat().st_mtime_ns

        assert main([*args(tmp_path, beir_tiny, teacher.url), "embed.learning_rate=1e-4"]) == 0
        err = capsys.readouterr().err

        # synth: every step skipped, no call to the teacher, every shard as it was
        for name in SYNTH_STEPS:
            assert f"synth/{name}: already finished, skipped" in err, name
        assert teacher.requests == calls
        assert {p: p.read_bytes() for p in (run / "synth").rglob("*.parquet")} == shards

    # embed: stale, the changed key named, trained again with the new value
    assert "embed: stale: embed.learning_rate 2e-05 -> 0.0001; redoing it and the steps after it" in err
    embed = read_manifest(run / "embed/model")
    assert embed["fingerprint"]["config"]["embed.learning_rate"] == 0.0001
    assert embed["history"] != before["embed"]["history"]

    # eval: the trained model scored again (its input, the embed output, changed); the base kept
    assert "eval: trained: DebianPackageRetrieval: stale: input embed " in err
    assert "eval: base: DebianPackageRetrieval: unchanged since it was scored, kept" in err
    assert base_result.stat().st_mtime_ns == base_stamp
    ev = read_manifest(run / "eval")
    assert ev["scores"]["base"] == before["eval"]["scores"]["base"]
    assert ev["fingerprint"] != before["eval"]["fingerprint"]

    # report: rendered again from the new manifests
    assert (run / "report.md").stat().st_mtime_ns != before["report"]
    trained = ev["scores"]["trained"]["DebianPackageRetrieval"]["ndcg_at_10"]
    assert f"| trained | {trained:.4f} ± " in (run / "report.md").read_text()
