"""Hub-named models: checked against the local Hugging Face cache (offline) or the hub (online, here a
local HTTP server standing in for it through HF_ENDPOINT), and whether a run goes offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import huggingface_hub
import huggingface_hub.constants
import pytest

from speed_ray import cli
from speed_ray.config import load_config
from speed_ray.io import hub
from speed_ray.io.models import spec_problem
from speed_ray.ray_utils import worker_env
from tests.conftest import REPO

HUB_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# The fake hub's models: id -> gated ("manual": its files need a token with access; "locked": even
# its listing answers 403 GatedRepo).
MODELS = {
    "acme/tiny-model": False,
    "acme/gated-model": "manual",
    "acme/locked": "locked",
    "acme/other": False,
}
GOOD_TOKEN = "hf_test_access_7f3a"


def config(tmp_path: Path) -> Path:
    """A config that reads no data (no retrieval folder) and runs under tmp_path."""
    path = tmp_path / "c.yaml"
    path.write_text(f"run: {{output_dir: {tmp_path / 'runs'}}}\neval:\n  retrieval: {{path: null}}\n")
    return path


def error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


class FakeHub(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []

    def log_message(self, *args):
        pass

    def answer(self, code: int, body, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlsplit(self.path)
        self.seen.append((url.path, self.headers.get("Authorization")))
        if url.path == "/api/models":  # list_models: ?author= and ?search=
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            ids = [
                m
                for m in MODELS
                if q.get("search", "").lower() in m.lower()
                and q.get("author", m.split("/")[0]) == m.split("/")[0]
            ]
            return self.answer(200, [{"id": m, "_id": m, "modelId": m} for m in ids])
        if not url.path.startswith("/api/models/"):
            return self.answer(404, {"error": "not found"})
        repo = url.path.removeprefix("/api/models/").removesuffix("/auth-check")
        allowed = self.headers.get("Authorization") == f"Bearer {GOOD_TOKEN}"
        if repo not in MODELS:
            return self.answer(401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        gated = MODELS[repo]
        if gated and not allowed and (url.path.endswith("/auth-check") or gated == "locked"):
            return self.answer(403, {"error": "gated"}, {"X-Error-Code": "GatedRepo"})
        body = {"id": repo, "_id": repo, "modelId": repo, "sha": "abc", "private": False, "gated": gated}
        return self.answer(200, {} if url.path.endswith("/auth-check") else body)


def asked() -> list[tuple[str, str | None]]:
    """The fake hub's model requests (path, Authorization), less huggingface_hub's own (its daily
    fetch of /api/agent-harnesses)."""
    return [(path, auth) for path, auth in FakeHub.seen if path.startswith("/api/models")]


def go_online(monkeypatch, endpoint: str) -> None:
    """This test's process is online (the suite runs offline), talking to ``endpoint``."""
    for var in HUB_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    hub._ask_hub.cache_clear()


@pytest.fixture
def fake_hub(hub_cache, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    FakeHub.seen = []
    endpoint = f"http://127.0.0.1:{server.server_port}"
    go_online(monkeypatch, endpoint)
    yield endpoint
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------------------------
# Offline: the local cache


def test_offline_a_cached_hub_model_passes_and_a_typo_names_the_closest(hub_cache, tmp_path, capsys):
    assert huggingface_hub.is_offline_mode()  # the suite's HF_HUB_OFFLINE=1: the user asks
    hub_cache("acme/tiny-model")
    hub_cache("acme/half-model", weights=False)  # a config and no weights: not a cached model
    assert spec_problem("acme/tiny-model") is None
    assert load_config(config(tmp_path), ["embed.model=acme/tiny-model"]).embed.model == "acme/tiny-model"
    assert spec_problem("acme/half-model").startswith(
        "model acme/half-model is only partly in the local Hugging Face cache (model folder "
    )

    assert cli.main(["embed", str(config(tmp_path)), "embed.model=acme/tiny-modle"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(
        "speed-ray: error: embed.model: unknown model 'acme/tiny-modle'; did you mean acme/tiny-model? "
        "(expected a built-in name: all-minilm-l6-v2, smollm2-135m-instruct, tiny-llama, tiny-bert; "
        f"a model folder; or a model in the local Hugging Face cache {hub.cache_folder()} "
        "(HF_HUB_OFFLINE is set: the hub is not asked))"
    ), line
    assert not (tmp_path / "runs").exists()


def test_offline_typos_are_held_against_built_in_names_and_cached_models(hub_cache):
    hub_cache("acme/tiny-llama-chat")
    hub_cache("meta-llama/Meta-Llama-3-8B")
    assert "did you mean tiny-llama?" in spec_problem("tiny-lama")
    assert "did you mean acme/tiny-llama-chat?" in spec_problem("acme/tiny-lama-chat")
    assert "did you mean meta-llama/Meta-Llama-3-8B?" in spec_problem("Meta-Llama-3-8b")  # no org
    assert spec_problem("acme/tiny-llama-chat") is None


# ----------------------------------------------------------------------------------------------
# Online: a local stand-in for the hub


def test_online_a_hub_model_that_exists_passes(fake_hub):
    assert spec_problem("acme/tiny-model") is None
    assert asked() == [("/api/models/acme/tiny-model", None)]
    assert spec_problem("acme/tiny-model") is None  # asked once per process
    assert len(asked()) == 1


def test_online_a_typo_gets_the_closest_hub_ids(fake_hub, hub_cache):
    hub_cache("zeta/cached-model")
    assert spec_problem("acme/tiny-modle") == (
        f"unknown model 'acme/tiny-modle' on the hub {fake_hub}; did you mean acme/tiny-model? "
        "(expected a built-in name: all-minilm-l6-v2, smollm2-135m-instruct, tiny-llama, tiny-bert; "
        "a model folder; or a hub model id as org/name (a private one needs HF_TOKEN with access))"
    )
    # a wrong org: the org's listing is empty, the search for the name's longest word finds it
    assert "; did you mean acme/tiny-model?" in spec_problem("acm/tiny-model")
    assert ("/api/models", None) in asked()
    assert "did you mean zeta/cached-model?" in spec_problem("zeta/cached-modl")  # the cache counts too


@pytest.mark.parametrize("model", ["acme/gated-model", "acme/locked"])
def test_online_a_gated_model_needs_hf_token_with_access(fake_hub, monkeypatch, model):
    assert spec_problem(model) == (
        f"model {model} is gated and HF_TOKEN is not set: HF_TOKEN needs access to it "
        f"(ask for it at {fake_hub}/{model}, then set HF_TOKEN to a token of that account)"
    )
    hub._ask_hub.cache_clear()
    monkeypatch.setenv("HF_TOKEN", "hf_no_access_91c2")
    problem = spec_problem(model)
    assert problem.startswith(f"model {model} is gated and the token in use (HF_TOKEN) has no access to it:")
    assert "hf_no_access" not in problem  # the token is never shown
    hub._ask_hub.cache_clear()
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    assert spec_problem(model) is None
    assert asked()[-1][1] == f"Bearer {GOOD_TOKEN}"  # huggingface_hub sent HF_TOKEN itself


def test_online_a_gated_model_without_access_fails_the_cli_with_exit_2(fake_hub, tmp_path, capsys):
    assert cli.main(["embed", str(config(tmp_path)), "embed.model=acme/gated-model"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(
        "speed-ray: error: embed.model: model acme/gated-model is gated and HF_TOKEN is not set"
    )


def test_online_an_unreachable_hub_says_how_to_go_offline(hub_cache, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    go_online(monkeypatch, endpoint)
    problem = spec_problem("acme/tiny-model")
    assert problem.startswith(
        f"cannot check model 'acme/tiny-model': the hub {endpoint} could not be reached ("
    )
    assert "to run offline, set HF_HUB_OFFLINE=1 and name only local models" in problem
    assert "\n" not in problem


# ----------------------------------------------------------------------------------------------
# Whether a run goes offline


def run_and_probe(monkeypatch, argv: list[str]) -> dict:
    """Run the CLI with its stages replaced by a probe of the hub state they would find."""
    seen = {}

    def probe(cfg):
        seen["env"] = os.environ.get("HF_HUB_OFFLINE")
        seen["hub"] = huggingface_hub.is_offline_mode()
        seen["workers"] = worker_env().get("HF_HUB_OFFLINE")

    monkeypatch.setattr(cli, "run_stages", probe)
    assert cli.main(argv) == 0
    return seen


def test_a_run_whose_models_are_all_local_goes_offline(fake_hub, hub_cache, tmp_path, monkeypatch):
    hub_cache("acme/cached")
    state = run_and_probe(monkeypatch, ["embed", str(config(tmp_path)), "embed.model=acme/cached"])
    assert state == {"env": "1", "hub": True, "workers": "1"}
    assert asked() == []  # nothing asked the hub


def test_a_run_with_a_hub_model_stays_online(fake_hub, tmp_path, monkeypatch):
    state = run_and_probe(monkeypatch, ["embed", str(config(tmp_path)), "embed.model=acme/tiny-model"])
    assert state == {"env": None, "hub": False, "workers": None}


def test_asked_offline_with_transformers_offline_the_workers_get_hf_hub_offline(
    hub_cache, tmp_path, monkeypatch
):
    go_online(monkeypatch, "http://127.0.0.1:9")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")  # huggingface_hub reads it at import: as imported now
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_cache("acme/cached")
    state = run_and_probe(monkeypatch, ["embed", str(config(tmp_path)), "embed.model=acme/cached"])
    assert state == {"env": "1", "hub": True, "workers": "1"}


def test_what_a_run_needs_from_the_hub(hub_cache, tmp_path, monkeypatch):
    hub_cache("acme/cached")
    # eval.models: a labelled hub id and a bare one; the synth engine's hub id counts only when synth runs
    text = (
        "synth:\n  engine: {model: acme/generator}\n"
        "experiment:\n  variants: {big: {embed.model: acme/big}}\n"
        "  evals: {other: {eval.models: [base, big, x=acme/scorer]}}\n"
    )
    (tmp_path / "e.yaml").write_text(text)
    overrides = ["eval.retrieval.path=null", "eval.models=[base, acme/cached, y=acme/remote]"]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # nothing asks the hub here
    monkeypatch.setattr(hub, "hub_problem", lambda spec: None)
    cfg = load_config(tmp_path / "e.yaml", [*overrides, "run.stages=[embed, eval]"])
    assert cli.hub_needs(cfg) == ["acme/remote"]
    assert cli.hub_needs(cfg, experiment=True) == ["acme/big", "acme/remote", "acme/scorer"]
    cfg = load_config(tmp_path / "e.yaml", [*overrides, "run.stages=[synth, embed]"])
    assert cli.hub_needs(cfg) == ["acme/generator"]


def test_mteb_datasets_count_unless_the_cache_holds_them(hub_cache, tmp_path, monkeypatch):
    import speed_ray.eval.tasks

    datasets = {"A": {"path": "mteb/a", "revision": "r1"}, "B": {"path": "mteb/b", "revision": None}}
    tasks = {n: SimpleNamespace(metadata=SimpleNamespace(dataset=d)) for n, d in datasets.items()}
    monkeypatch.setattr(speed_ray.eval.tasks, "named_tasks", lambda names: [tasks[n] for n in names])
    cfg = load_config(config(tmp_path), ["eval.mteb_tasks=[A, B]", "run.stages=[eval]"])
    assert cli.hub_needs(cfg) == ["mteb dataset mteb/a", "mteb dataset mteb/b"]
    (hub.cache_folder() / "datasets--mteb--a" / "snapshots" / "r1").mkdir(parents=True)
    (hub.cache_folder() / "datasets--mteb--b" / "refs").mkdir(parents=True)
    (hub.cache_folder() / "datasets--mteb--b" / "refs" / "main").write_text("r2")
    assert cli.hub_needs(cfg) == []
    assert (
        cli.hub_needs(load_config(config(tmp_path), ["eval.mteb_tasks=[A, B]", "run.stages=[embed]"])) == []
    )


def test_workers_get_only_what_is_set_and_never_the_token(monkeypatch):
    for var in HUB_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_d0_not_pass")
    env = worker_env()
    assert not set(HUB_ENV) & set(env) and "hf_secret" not in json.dumps(env)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert worker_env()["HF_HUB_OFFLINE"] == "1"
    # a Ray job whose own runtime env sets it: its workers have it, and ray.init may not set it again
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}}})
    )
    assert "HF_HUB_OFFLINE" not in worker_env()


def test_going_offline_reaches_the_libraries_already_imported(hub_cache, tmp_path):
    """A fresh CLI process with no offline variable: datasets (and with it huggingface_hub) is imported
    before the config loads, as a library may be; all-local models take the driver offline for both."""
    hub_cache("acme/cached")
    code = (
        "import json, os, sys, datasets, huggingface_hub\n"
        "from speed_ray import cli\n"
        "def probe(cfg):\n"
        "    import datasets.config as d\n"
        "    print(json.dumps([os.environ.get('HF_HUB_OFFLINE'), huggingface_hub.is_offline_mode(),"
        " d.HF_HUB_OFFLINE]))\n"
        "cli.run_stages = probe\n"
        f"sys.exit(cli.main(['embed', {str(config(tmp_path))!r}, 'embed.model=acme/cached']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in HUB_ENV}
    env |= {"PYTHONPATH": str(REPO), "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == ["1", True, True]
