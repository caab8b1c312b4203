"""The package boundaries of speed_ray, read from every import statement (top level or inside a
function): the layers below know nothing of the layers above, and pure logic imports no Ray, vLLM
or TRL. docs/design.md draws the same picture."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "speed_ray"
DOMAINS = ("synth", "align", "embed", "eval")
# What each package may import from speed_ray besides itself.
ALLOWED = {
    "io": set(),  # io knows no domain
    "engines": {"io"},  # engines know no stage
    "synth": {"io", "engines", "config", "ray_utils", "embed"},  # mining ranks with embed's model
    "align": {"io", "engines", "config", "ray_utils", "synth"},  # align runs synth's loop
    "embed": {"io", "config", "ray_utils"},  # neither synth nor eval
    "eval": {"io", "config", "embed", "pipeline", "ray_utils"},  # scores embed's models
}
# The modules that touch Ray, vLLM or TRL; every other module is pure logic.
EDGES = {
    "ray_utils.py",
    "doctor.py",
    "io/logs.py",
    "engines/vllm_engine.py",
    "synth/stage.py",
    "synth/driver.py",
    "synth/neighbours.py",
    "align/train.py",
    "embed/train.py",
    "embed/prepare.py",
    "embed/driver.py",
}
HEAVY = ("ray", "vllm", "trl")


def imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def package_of(name: str) -> str | None:
    """``speed_ray.synth.loop`` -> ``synth``; ``speed_ray.config`` -> ``config``."""
    parts = name.split(".")
    return parts[1].removesuffix(".py") if parts[0] == "speed_ray" and len(parts) > 1 else None


def test_each_package_imports_only_the_layers_below_it():
    wrong = []
    for path in modules():
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) < 2 or rel.parts[0] not in ALLOWED:
            continue
        own = rel.parts[0]
        for name in imports(path):
            other = package_of(name)
            if other is not None and other != own and other not in ALLOWED[own]:
                wrong.append(f"speed_ray/{rel} imports {name}")
    assert wrong == []


def test_pure_modules_import_no_ray_vllm_or_trl():
    wrong = []
    for path in modules():
        rel = str(path.relative_to(PACKAGE))
        if rel in EDGES:
            continue
        heavy = sorted(n for n in imports(path) if n.split(".")[0] in HEAVY)
        if heavy:
            wrong.append(f"speed_ray/{rel} imports {', '.join(heavy)}")
    assert wrong == []


def test_vllm_and_trl_each_have_one_home():
    homes = {
        h: sorted(
            str(p.relative_to(PACKAGE)) for p in modules() if any(n.split(".")[0] == h for n in imports(p))
        )
        for h in ("vllm", "trl")
    }
    assert homes == {"vllm": ["engines/vllm_engine.py"], "trl": ["align/train.py"]}


def test_every_domain_package_has_its_config_and_driver():
    for domain in DOMAINS:
        assert (PACKAGE / domain / "config.py").is_file(), domain
        assert (PACKAGE / domain / "driver.py").is_file(), domain
