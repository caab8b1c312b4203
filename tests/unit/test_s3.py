"""Object storage for real: moto's S3 server on a local port, reached through pyarrow's own S3
filesystem, with the endpoint and the credentials given by the environment alone (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...), as on a cluster. Runs upload to ``run.upload_to: s3://...``; the embed
stage reads its pairs or corpus file from ``s3://...``."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import time
import urllib.request
from pathlib import Path

import pytest

from speed_ray.cli import main
from speed_ray.config import load_config
from speed_ray.io.data import iter_corpus, iter_pairs, locate_input
from speed_ray.io.fingerprint import path_hash
from speed_ray.io.settings import ConfigError
from tests.conftest import DEBIAN


@pytest.fixture(scope="module")
def moto_url():
    """moto's S3 server on a free local port, for this module."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class Bucket:
    """A bucket on the local server, and boto3 to see what landed in it."""

    def __init__(self, client, name: str) -> None:
        self.client, self.name = client, name
        client.create_bucket(Bucket=name)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def body(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def put(self, local: Path, key: str) -> str:
        self.client.put_object(Bucket=self.name, Key=key, Body=local.read_bytes())
        return f"s3://{self.name}/{key}"


BUCKETS = itertools.count()


@pytest.fixture
def s3(moto_url, monkeypatch, no_proxy) -> Bucket:
    """A fresh bucket on the local server; the environment alone points pyarrow (and boto3) at it."""
    import boto3

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return Bucket(boto3.client("s3"), f"bucket-{next(BUCKETS)}")


def report_run(tmp_path, *overrides: str) -> list[str]:
    """The cheapest run through the CLI: the report stage of a run that has no other output."""
    return [
        "report",
        "configs/quickstart.yaml",
        f"run.output_dir={tmp_path}",
        f"eval.retrieval.path={DEBIAN / 'retrieval'}",
        *overrides,
    ]


def test_a_run_uploads_its_config_and_report_to_s3(tmp_path, s3):
    assert main(report_run(tmp_path, f"run.upload_to=s3://{s3.name}/runs/")) == 0
    run = tmp_path / "quickstart"
    assert s3.keys() == [
        "runs/",  # pyarrow's folder markers, from the check that the prefix is writable before any stage
        "runs/quickstart/",
        "runs/quickstart/config.yaml",
        "runs/quickstart/report.html",
        "runs/quickstart/report.md",
    ]
    for name in ("config.yaml", "report.md", "report.html"):
        assert s3.body(f"runs/quickstart/{name}") == (run / name).read_bytes()
    # nothing of the store's address or credentials is saved with the run
    saved = (run / "config.yaml").read_text()
    assert f"upload_to: s3://{s3.name}/runs/\n" in saved
    assert "127.0.0.1" not in saved and "testing" not in saved


def _reset_auth(moto_url: str, count: str) -> None:
    """moto checks credentials against its IAM after ``count`` requests (``inf``: never)."""
    url, plain = f"{moto_url}/moto-api/reset-auth", {"Content-Type": "text/plain"}  # not a form
    urllib.request.urlopen(urllib.request.Request(url, count.encode(), plain)).close()


@pytest.mark.parametrize("fault", ["missing bucket", "unknown access key"])
def test_an_unwritable_upload_to_exits_2_before_any_stage_runs(tmp_path, s3, moto_url, capsys, fault):
    bucket = "no-such-bucket" if fault == "missing bucket" else s3.name
    if fault == "unknown access key":
        _reset_auth(moto_url, "0")
    try:
        assert main(report_run(tmp_path, f"run.upload_to=s3://{bucket}/runs")) == 2
    finally:
        _reset_auth(moto_url, "inf")
    err = capsys.readouterr().err
    why = {"missing bucket": "Bucket 'no-such-bucket' not found", "unknown access key": "ACCESS_DENIED"}
    assert err.startswith(
        f"speed-ray: error: run.upload_to: cannot write to s3://{bucket}/runs/quickstart: "
    ), err
    assert why[fault] in err and err.count("\n") == 1, err
    assert not (tmp_path / "quickstart" / "report.md").exists()  # the report stage never ran
    assert s3.keys() == []


def pairs_rows(n: int) -> list[dict]:
    """A user's pairs in the sentence-transformers convention, some with hard negatives."""
    rows = []
    for i in range(n):
        row = {"anchor": f"tool number {i} for files", "positive": f"A program that handles files, v{i}."}
        row["negative_1"] = f"An unrelated game, level {i}." if i % 3 else None
        row["negative_2"] = f"A font of style {i}." if i % 3 == 2 else None
        rows.append(row)
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    """``rows`` as parquet, JSONL or gzipped JSONL, by ``path``'s name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(text, mtime=0) if path.suffix == ".gz" else text)
    return path


CORPUS = [{"id": str(i), "text": f"Document {i}. It has two sentences."} for i in range(5)]


@pytest.mark.parametrize(
    ("name", "rows", "reader"),
    [
        ("pairs.parquet", pairs_rows(10), iter_pairs),
        ("pairs.jsonl", pairs_rows(10), iter_pairs),
        ("corpus.jsonl.gz", CORPUS, iter_corpus),
    ],
)
def test_a_file_on_s3_reads_and_hashes_as_its_local_copy(tmp_path, s3, name, rows, reader):
    local = write(tmp_path / name, rows)
    uri = s3.put(local, f"data/{name}")
    remote = list(reader(locate_input(uri)))
    assert remote == list(reader(local)) and len(remote) == len(rows)
    assert path_hash(uri) == path_hash(local) is not None  # the fingerprint of the embed step's input


def embed_overrides(tmp_path, uri: str, *extra: str) -> list[str]:
    return [
        f"run.output_dir={tmp_path}",
        f"eval.retrieval.path={DEBIAN / 'retrieval'}",
        "embed.data.source=pairs",
        f"embed.data.path={uri}",
        *extra,
    ]


def test_bad_s3_input_is_a_config_error_naming_the_key_and_the_uri(tmp_path, s3, moto_url):
    write(tmp_path / "bad.jsonl", [{"anchor": "a", "positive": "b"}, {"anchor": "a"}])
    bad = s3.put(tmp_path / "bad.jsonl", "bad.jsonl")
    folder = s3.put(write(tmp_path / "p.parquet", pairs_rows(4)), "folder/part-0.parquet").rsplit("/", 1)[0]
    b = s3.name
    cases = {
        f"s3://{b}/data/missing.parquet": (
            f"embed.data.path: s3://{b}/data/missing.parquet: not found "
            f"(no object with key 'data/missing.parquet' in bucket '{b}')"
        ),
        bad: f"embed.data.path: {bad}:2: missing keys ['positive'] (expected ['anchor', 'positive'])",
        folder: (
            f"embed.data.path: {folder}: a folder on object storage; expected a parquet or JSONL file "
            "there (step and datasets folders are read from a local path)"
        ),
        f"s3://AKIA:secret@{b}/pairs.parquet": (
            "embed.data.path: credentials or options in the URI are not allowed"
        ),
    }
    for uri, message in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, embed_overrides(tmp_path, uri))
        assert str(e.value).startswith(message), str(e.value)
    _reset_auth(moto_url, "0")  # refused credentials: the store's answer, under the key
    try:
        with pytest.raises(ConfigError, match=rf"^embed.data.path: {bad}: cannot read \(.*ACCESS_DENIED"):
            load_config(None, embed_overrides(tmp_path, bad))
    finally:
        _reset_auth(moto_url, "inf")


@pytest.mark.cloud
def test_embed_trains_from_a_pairs_file_on_s3_and_uploads_the_model(tmp_path, s3, tiny_bert, ray_session):
    from speed_ray.io.schemas import read_manifest

    uri = s3.put(write(tmp_path / "pairs.parquet", pairs_rows(16)), "in/pairs.parquet")
    started = time.time()
    args = [
        "embed",
        "configs/quickstart.yaml",
        *embed_overrides(tmp_path, uri, f"embed.model={tiny_bert}", "embed.steps=2"),
        *("embed.data.crops=null", "embed.data.exclude=null", "embed.batch_size=4"),  # the pairs alone
        "embed.resources.workers=1",
        "embed.hard_negatives=2",
        f"run.upload_to=s3://{s3.name}/out",
    ]
    assert main(args) == 0
    print(f"embed from s3: {time.time() - started:.1f} s")
    run = tmp_path / "quickstart"
    manifest = read_manifest(run / "embed/model")
    assert manifest["data"] == {"source": "pairs", "path": uri, "rows_available": 16}
    assert [h["step"] for h in manifest["history"]] == [1, 2] and manifest["hard_negatives"] == 2
    assert manifest["fingerprint"]["inputs"] == {"embed.data.path": path_hash(tmp_path / "pairs.parquet")}
    # every file of the embed folder, and the config, at the same place under the prefix
    local = sorted(str(p.relative_to(run)) for p in (run / "embed").rglob("*") if p.is_file())
    files = [k for k in s3.keys("out/") if not k.endswith("/")]
    assert files == sorted(["out/quickstart/config.yaml", *(f"out/quickstart/{f}" for f in local)])
    model = "embed/model/model.safetensors"
    assert s3.body(f"out/quickstart/{model}") == (run / model).read_bytes()
