"""Where speed-ray's ray.init goes: the named cluster, the job's cluster, or a new local instance."""

from __future__ import annotations

from speed_ray.ray_utils import where


def test_no_address_outside_a_job_starts_a_new_local_instance(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert where(None, 3) == {"address": "local", "num_cpus": 3}


def test_inside_a_ray_job_joins_its_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert where(None, 3) == {"address": None}  # ray.init reads RAY_ADDRESS; num_cpus would be refused


def test_a_named_address_is_joined_as_given(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert where("auto", 3) == {"address": "auto"}
    assert where("ray://head:10001", None) == {"address": "ray://head:10001"}
