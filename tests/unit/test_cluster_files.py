"""The cluster files under cluster/: Ray's own validation for the launcher configs, and for the KubeRay
manifests the fields the operator needs, resource names, autoscaling bounds and one image everywhere."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]


def _dockerfile() -> tuple[str, str]:
    """(the image tag the Dockerfile says it builds, the Ray version it starts from)."""
    text = (CLUSTER / "Dockerfile").read_text()
    tag = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", text)
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu$", text, re.M)
    assert tag and base, "cluster/Dockerfile: expected its build command and a rayproject/ray base"
    return tag.group(1), base.group(1)


IMAGE, RAY_VERSION = _dockerfile()


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_configs_pass_rays_own_validation(name):
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    config = prepare_config(raw)  # what `ray up` does before it launches anything
    validate_config(config)
    assert config["docker"]["image"] == IMAGE
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no heavy work
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU")}
    assert {"gpu-l4", "gpu-l4-spot", "gpu-a100", "gpu-a100-spot", "gpu-h100"} <= set(gpu)
    for node_type, t in types.items():
        if node_type != config["head_node_type"]:
            assert t["min_workers"] == 0 and t["max_workers"] > 0, node_type  # scale from zero
    spot = {n for n, t in types.items() if _is_spot(raw["provider"]["type"], t["node_config"])}
    assert spot == {"cpu-worker", "gpu-l4-spot", "gpu-a100-spot"}
    assert (
        sum(t["max_workers"] for n, t in types.items() if n != config["head_node_type"])
        == config["max_workers"]  # the cluster cap never cuts a group short
    )
    # the head's `ray start` gets the secrets from the cloud's secret store, never a literal value
    start = " ".join(raw["head_start_ray_commands"])
    for var in ("OPENAI_API_KEY", "HF_TOKEN"):
        assert f'export {var}="$(python -c ' in start and f"{var}=sk" not in start


def _is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"


def _ray_clusters() -> dict[str, dict]:
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    return {"raycluster.yaml": cluster["spec"], "rayjob.yaml": job["spec"]["rayClusterSpec"]}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_clusters_autoscale_gpu_groups_from_zero_on_the_image(name):
    spec = _ray_clusters()[name]
    assert spec["rayVersion"] == RAY_VERSION and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    pods = {"head": (head["template"]["spec"], "ray-head")}
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert 0 == g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert isinstance(g["rayStartParams"], dict)
        pods[g["groupName"]] = (g["template"]["spec"], "ray-worker")
    gpus = {}
    for group, (pod, container_name) in pods.items():
        (container,) = pod["containers"]
        assert container["name"] == container_name and container["image"] == IMAGE, group
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests == limits, f"{group}: requests and limits differ"  # guaranteed QoS
        assert set(limits) <= {"cpu", "memory", "nvidia.com/gpu"}, group
        gpus[group] = int(limits.get("nvidia.com/gpu", 0))
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{group}: volume {mount['name']} is mounted but not defined"
        if gpus[group]:
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), group
            assert pod["nodeSelector"], group
    assert gpus == {"head": 0, "cpu": 0, "gpu-l4": 4, "gpu-a100": 8, "gpu-h100": 8}


def test_the_rayjob_runs_a_job_script_and_config_of_this_repo(monkeypatch, hub_cache):
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    words = shlex.split(job["entrypoint"])
    assert words[:3] == ["cd", "/home/ray/speed-ray", "&&"]  # cluster/Dockerfile's WORKDIR
    script, config = words[4], words[words.index("--config") + 1]
    assert (REPO / script).is_file() and (REPO / config).is_file()
    from speed_ray.config import load_config

    overrides = words[words.index("--config") + 2 :]
    assert overrides == ["run.output_dir=/mnt/shared/runs"]  # the shared volume
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # the pod gets it from the Secret
    for hub_model in ("meta-llama/Meta-Llama-3-8B", "mistralai/Mistral-7B-v0.1"):
        hub_cache(hub_model)  # offline here; on the cluster they come from the hub (HF_TOKEN: gated)
    cfg = load_config(str(REPO / config), overrides)
    assert cfg.run.output_dir == "/mnt/shared/runs"
    assert cfg.eval.retrieval.path == "builtin:debian/retrieval"  # shipped inside the package
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "WORKDIR /home/ray/speed-ray" in dockerfile and "COPY --chown=ray:users jobs ./jobs" in dockerfile


SECRETS = {"OPENAI_API_KEY": ("speed-ray-teacher", "api-key"), "HF_TOKEN": ("speed-ray-hub", "token")}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_puts_the_secrets_on_every_group(name):
    """The teacher's key and the hub token, from Kubernetes Secrets, in the head (where the driver of a
    submitted job runs) and in every worker group (where actors run); never as a literal value."""
    spec = _ray_clusters()[name]
    pods = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for group, pod in pods.items():
        (container,) = pod["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        for var, (secret, key) in SECRETS.items():
            assert "value" not in env[var], f"{group}: {var} written into the manifest"
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"], ref["optional"]) == (secret, key, True), f"{group}: {var}"
