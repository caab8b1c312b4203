"""Secrets handed to workers: read from the driver's environment, printed as stars, set again where
they are used."""

from __future__ import annotations

import os
import pickle

from speed_ray.io import secrets


def test_a_secret_never_prints_and_travels_whole(monkeypatch):
    monkeypatch.setenv("SPEED_RAY_T_KEY", "sk-abc")
    monkeypatch.setenv("SPEED_RAY_T_EMPTY", "")
    monkeypatch.delenv("SPEED_RAY_T_UNSET", raising=False)
    got = secrets.collect(["SPEED_RAY_T_KEY", "SPEED_RAY_T_EMPTY", "SPEED_RAY_T_UNSET", "SPEED_RAY_T_KEY"])
    assert list(got) == ["SPEED_RAY_T_KEY"]  # set and not empty, once
    shown = f"{got} {got['SPEED_RAY_T_KEY']} {got!r}"
    assert "sk-abc" not in shown and "********" in shown
    handed = pickle.loads(pickle.dumps(got))  # as Ray sends it to a worker
    monkeypatch.delenv("SPEED_RAY_T_KEY")
    secrets.export(handed)
    assert os.environ["SPEED_RAY_T_KEY"] == "sk-abc"
    secrets.export(None)  # nothing handed: nothing changes
