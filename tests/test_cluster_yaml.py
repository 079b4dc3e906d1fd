"""cluster.yaml: valid for Ray's own cluster-launcher validator, and in step with pyproject.toml."""

from __future__ import annotations

import copy
import re
import tomllib

import pytest
import yaml

from tests.conftest import ROOT


def load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def prepared(cfg: dict) -> dict:
    """What `ray up` does first: fill in defaults, merge setup commands, then validate the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(cfg))
    validate_config(cfg)
    return cfg


def pins() -> dict[str, str]:
    """{package: version} for every `name[extras]==version` dependency in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^,;\s]+)", requirement)
        if match:
            found[match.group(1).lower()] = match.group(3)
    return found


def test_ray_validator_accepts_it_and_rejects_an_unknown_key():
    cfg = prepared(load())
    assert cfg["provider"]["type"] == "aws"
    with pytest.raises(Exception, match="'node_typos' was unexpected"):
        prepared({**load(), "node_typos": {}})  # the validator is strict, so a typo cannot slip by


def test_node_types_head_without_training_resources_cpu_and_gpu_workers_with_bounds():
    cfg = prepared(load())
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    cpu, gpu = types["cpu_worker"], types["gpu_worker"]
    for worker in (cpu, gpu):
        assert 0 <= worker["min_workers"] < worker["max_workers"] <= cfg["max_workers"]
    assert cpu["node_config"]["InstanceType"].startswith(("c5", "c6", "m5", "m6"))
    assert gpu["node_config"]["InstanceType"].startswith(("g4", "g5", "g6", "p3", "p4"))
    assert gpu["docker"]["worker_image"].endswith("-gpu")


def test_setup_installs_this_project_with_the_versions_pyproject_pins():
    cfg = prepared(load())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins()
    # The image's Ray and Python are the pinned ones, so pip never swaps Ray under a running node.
    python = re.search(r"3\.(\d+)", project["requires-python"]).group(1)
    images = [cfg["docker"]["image"], cfg["available_node_types"]["gpu_worker"]["docker"]["worker_image"]]
    for image in images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(pinned['ray'])}-py3{python}-(cpu|gpu)", image), image
    # The checkout is mounted and pip-installed, so every other pin comes from pyproject.toml itself.
    mounted = [target for target, source in cfg["file_mounts"].items() if source == "."]
    assert len(mounted) == 1
    for commands in (cfg["head_setup_commands"], cfg["worker_setup_commands"]):
        assert f"pip install -e {mounted[0]}" in [c.split("  #")[0].strip() for c in commands]
        # Any version spelled out in a setup command (the GPU TensorFlow) matches the pin.
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s\"']+)", " ".join(commands)):
            assert pinned.get(name.lower()) == version, f"{name}=={version} vs pyproject {pinned.get(name.lower())}"
        assert any(f'tensorflow[and-cuda]=={pinned["tensorflow"]}' in c for c in commands)


def test_token_authentication_is_on_on_every_node():
    cfg = prepared(load())
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert any("chmod 600 ~/.ray/auth_token" in c for c in cfg["setup_commands"])
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
