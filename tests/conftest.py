"""Shared fixtures: offline mode, a per-session model cache with tiny models, a tiny BEIR folder cut
from the Debian retrieval set, and one local Ray per session."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

# The suite makes its own local Ray; a RAY_ADDRESS left in the shell would send every test to that cluster.
os.environ.pop("RAY_ADDRESS", None)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# A stand-in API key for the fake HTTP teacher. Set before any Ray starts, so that Ray's workers,
# which inherit this environment, can read it as they would a real key.
TEST_API_KEY_ENV = "SPEED_RAY_TEST_API_KEY"
os.environ[TEST_API_KEY_ENV] = "sk-test-d0-not-leak-7f3a"

REPO = Path(__file__).resolve().parents[1]
DEBIAN = REPO / "speed_ray" / "data" / "debian"  # the data set speed-ray ships (gzipped)


@pytest.fixture(autouse=True)
def _speed_ray_logger():
    """``cli.main`` sets up the ``speed_ray`` logger for its process (a handler, a level, no propagation
    to the root logger, where ``caplog`` listens); each test gets it back as it found it."""
    logger = logging.getLogger("speed_ray")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[2]
    logger.setLevel(saved[1])


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face cache under tmp_path (HF_HOME, HF_HUB_CACHE, no stored token) for this
    test; ``hub_cache("org/name")`` caches a fake model there in the hub's layout (refs/main, blobs, and
    snapshots/<sha>/ linking config.json and weights to them) and returns its snapshot folder."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for var, value in (("HF_HOME", home), ("HF_HUB_CACHE", cache), ("HF_TOKEN_PATH", home / "token")):
        monkeypatch.setenv(var, str(value))
        monkeypatch.setattr(constants, var, str(value))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))

    def add(repo_id: str, weights: bool = True) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        sha = "5f3c0a9e" * 5
        snapshot = repo / "snapshots" / sha
        snapshot.mkdir(parents=True)
        (repo / "blobs").mkdir()
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(sha)
        files = {"config.json": b'{"model_type": "bert"}'} | (
            {"model.safetensors": b"\0" * 8} if weights else {}
        )
        for name, data in files.items():
            blob = repo / "blobs" / f"{name.replace('.', '')}0blob"
            blob.write_bytes(data)
            (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
        return snapshot

    return add


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Tiny models are built into a per-session cache; the real models keep the user's cache."""
    if "SPEED_RAY_CACHE" not in os.environ:
        os.environ["SPEED_RAY_CACHE"] = str(tmp_path_factory.mktemp("speed-ray-cache"))
    return Path(os.environ["SPEED_RAY_CACHE"])


@pytest.fixture(scope="session")
def tiny_llama(model_cache) -> str:
    from speed_ray.io.models import resolve_model

    return resolve_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_bert(model_cache) -> str:
    from speed_ray.io.models import resolve_model

    return resolve_model("tiny-bert")


@pytest.fixture(scope="session")
def beir_tiny(tmp_path_factory) -> Path:
    """20 Debian queries, their 20 documents and 20 more documents, in BEIR layout."""
    from speed_ray.io.data import read_beir

    corpus, queries, qrels = read_beir(DEBIAN / "retrieval")
    queries = queries[:20]
    wanted = {d for q in queries for d in qrels[q["id"]]}
    docs = [d for d in corpus if d["id"] in wanted] + [d for d in corpus if d["id"] not in wanted][:20]
    out = tmp_path_factory.mktemp("beir")
    (out / "qrels").mkdir()
    (out / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d["id"], "title": "", "text": d["text"]}) + "\n" for d in docs)
    )
    (out / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q["id"], "text": q["text"]}) + "\n" for q in queries)
    )
    rows = [f"{q['id']}\t{d}\t{s}" for q in queries for d, s in qrels[q["id"]].items()]
    (out / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return out


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # A new local instance, never a cluster another process left running or recorded in /tmp/ray.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def no_proxy(monkeypatch):
    """urllib would send 127.0.0.1 through an http_proxy from the environment."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server():
    """An OpenAI-compatible chat server on 127.0.0.1 (``tests.fakes.FakeServer``)."""
    import threading
    from http.server import ThreadingHTTPServer

    from tests.fakes import FakeServer, Handler

    fake = FakeServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_port}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()


# Fault records: each fault test says what it injected and what came out; with FAULTS_REPORT=path
# (make test-faults) the session's records are written there as JSON, the figures behind
# docs/reliability.md.
RECORDS: list[dict] = []


@pytest.fixture
def fault_record(request):
    def record(fault: str, **figures) -> None:
        RECORDS.append({"test": request.node.nodeid, "fault": fault, **figures})

    return record


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("FAULTS_REPORT")
    if path and RECORDS:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(
            json.dumps({"exit_status": int(exitstatus), "records": RECORDS}, indent=2) + "\n"
        )


def rows_figures(expected: list, got: list) -> dict[str, int]:
    """Rows expected and written, and how many were lost or written twice (by key)."""
    return {
        "rows_expected": len(expected),
        "rows_written": len(got),
        "rows_lost": len(set(expected) - set(got)),
        "rows_duplicated": len(got) - len(set(got)),
    }
