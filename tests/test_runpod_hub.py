"""The RunPod Hub listing (.runpod/hub.json, .runpod/tests.json) against the worker it describes.

The Hub reads both files from ``.runpod/`` (the format: RunPod's Hub publishing guide) and builds
the image from a file named ``Dockerfile`` in ``.runpod/`` or the repository root, with the
repository root as the build context; ``.runpod/Dockerfile`` is therefore a byte-for-byte copy of
``Dockerfile.runpod``. What is checked here: the variables the listing offers are exactly the
worker's user-facing ones (``USER_FACING_ENV``), with the worker's own defaults and bounds; every
Hub test input is one the worker's input parser accepts; and every GPU the listing allows has the
memory the validation gate asks for.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from f5worker import settings as settings_module
from f5worker.jobs.inputs import parse_job_input
from f5worker.env_values import Number
from f5worker.settings import USER_FACING_ENV, VARS, Settings
from f5worker.validation import GIB, GPU_RECOMMENDED_BYTES
from tests.helpers import instructions

REPO = Path(__file__).resolve().parent.parent
HUB = json.loads((REPO / ".runpod" / "hub.json").read_text(encoding="utf-8"))
TESTS = json.loads((REPO / ".runpod" / "tests.json").read_text(encoding="utf-8"))
SETTINGS_ENV_NAMES = {v for k, v in vars(settings_module).items() if k.startswith("ENV_")}
ENV = {entry["key"]: entry for entry in HUB["config"]["env"]}
# Memory of the GPU types tests.json may name, from RunPod's GPU types reference (a pool's memory
# is in its name: AMPERE_16). Add a row when another type is used.
GPU_TYPE_MEMORY_GB = {"NVIDIA GeForce RTX 4090": 24, "NVIDIA RTX A4000": 16, "NVIDIA RTX A5000": 24, "NVIDIA L4": 24}
POOL = re.compile(r"^[A-Z]+_(\d+)(?:_PRO)?$")
# A card sold as N GB reports a little less than N GiB (the gate's own note), never half a GiB less.
SOLD_AS_SLACK_GIB = 0.5


def env_value(entry: dict, value) -> str:
    """A form value as the worker receives it: a string (booleans as trueValue/falseValue)."""
    if entry["input"]["type"] == "boolean":
        return entry["input"]["trueValue" if value else "falseValue"]
    return str(value)


# --- hub.json ------------------------------------------------------------------------------------

def test_hub_json_has_the_documented_fields():
    assert isinstance(HUB["title"], str) and HUB["title"] and isinstance(HUB["description"], str)
    assert HUB["type"] == "serverless" and HUB["category"] == "audio"
    config = HUB["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1
    assert isinstance(config["containerDiskInGb"], int) and config["containerDiskInGb"] > 0
    for entry in config["env"]:
        assert set(entry) == {"key", "input"}, entry
        field = entry["input"]
        assert field["type"] in {"string", "number", "boolean"} and field["name"] and field["description"]
        if field["type"] == "boolean":
            assert {"trueValue", "falseValue"} <= set(field)


def test_listed_variables_are_exactly_the_user_facing_ones():
    keys = [entry["key"] for entry in HUB["config"]["env"]]
    assert len(keys) == len(set(keys))
    assert set(keys) <= SETTINGS_ENV_NAMES, f"not defined in settings: {set(keys) - SETTINGS_ENV_NAMES}"
    assert set(keys) == set(USER_FACING_ENV)


@pytest.mark.parametrize("key", [k for k in ENV if "default" in ENV[k]["input"]])
def test_listed_defaults_are_the_workers_defaults(key):
    entry = ENV[key]
    assert Settings.from_env({key: env_value(entry, entry["input"]["default"])}) == Settings.from_env({})


@pytest.mark.parametrize("key", [k for k in ENV if "min" in ENV[k]["input"]])
def test_listed_lower_bounds_are_the_workers_bounds(key):
    low = ENV[key]["input"]["min"]
    Settings.from_env({key: str(low)})  # accepted
    with pytest.raises(ValueError, match=f"^{key} must be"):
        Settings.from_env({key: str(low - 1)})


def test_presets_set_only_listed_variables_to_values_the_worker_accepts():
    assert HUB["config"]["presets"]
    for preset in HUB["config"]["presets"]:
        assert preset["name"] and set(preset["defaults"]) <= set(ENV), preset
        Settings.from_env({k: env_value(ENV[k], v) for k, v in preset["defaults"].items()})


@pytest.mark.parametrize("key", [k for k in ENV if {"min", "max"} & set(ENV[k]["input"])])
def test_listed_bounds_are_the_rows_bounds(key):
    """The listing's number fields carry the bounds the setting's own row declares (settings.VARS),
    the upper one included."""
    (var,) = [var for var in VARS.values() if var.env == key]
    assert isinstance(var.parse, Number), key
    field = ENV[key]["input"]
    if "min" in field:
        assert field["min"] == var.parse.low or (var.parse.above and field["min"] > var.parse.low), key
    # a value past the row's bound is refused at start (the worker exits before taking a job), so
    # the form must not offer it
    assert field.get("max") == var.parse.high, key


# --- tests.json ----------------------------------------------------------------------------------

def test_every_hub_test_input_is_accepted_by_the_worker():
    names = [test["name"] for test in TESTS["tests"]]
    assert names and len(names) == len(set(names))
    for test in TESTS["tests"]:
        assert isinstance(test["timeout"], int) and test["timeout"] > 0  # milliseconds
        parse_job_input(test["input"])  # raises InputError with the worker's sentence otherwise


def test_hub_test_environment_uses_worker_variables_only():
    config = TESTS["config"]
    assert config["gpuCount"] == 1
    assert {e["key"] for e in config.get("env", [])} <= SETTINGS_ENV_NAMES


# --- GPUs, CUDA, the Dockerfile ------------------------------------------------------------------

def listed_gpu_memory_gb() -> dict[str, int]:
    memory = {}
    for gpu in HUB["config"]["gpuIds"].split(","):
        gpu = gpu.strip()
        if gpu.startswith("-"):  # a type taken out of a pool
            continue
        pool = POOL.match(gpu)
        memory[gpu] = int(pool.group(1)) if pool else GPU_TYPE_MEMORY_GB[gpu]
    memory[TESTS["config"]["gpuTypeId"]] = GPU_TYPE_MEMORY_GB[TESTS["config"]["gpuTypeId"]]
    return memory


def test_every_listed_gpu_has_the_memory_the_gate_recommends():
    """The gate fails below 7.5 GiB and warns below GPU_RECOMMENDED_BYTES; a listed GPU passes it."""
    memory = listed_gpu_memory_gb()
    assert memory
    short = {gpu: gb for gpu, gb in memory.items() if (gb - SOLD_AS_SLACK_GIB) * GIB < GPU_RECOMMENDED_BYTES}
    assert not short, f"below the gate's recommended {GPU_RECOMMENDED_BYTES / GIB:g} GiB: {short}"


def test_cuda_versions_allow_the_images_cuda():
    (base,) = [rest for word, rest in instructions() if word == "FROM"]
    image_cuda = tuple(int(n) for n in re.search(r"-cuda(\d+)\.(\d+)-", base).groups())
    for config in (HUB["config"], TESTS["config"]):
        versions = [tuple(int(n) for n in v.split(".")) for v in config["allowedCudaVersions"]]
        assert versions and min(versions) >= image_cuda, (config["allowedCudaVersions"], base)


def test_hub_dockerfile_is_dockerfile_runpod():
    """The Hub builds .runpod/Dockerfile (it looks for that name); the build context is the
    repository root, so the same file works unchanged. Edit Dockerfile.runpod, then copy it."""
    assert (REPO / ".runpod" / "Dockerfile").read_bytes() == (REPO / "Dockerfile.runpod").read_bytes(), \
        "run: cp Dockerfile.runpod .runpod/Dockerfile"
    assert (REPO / "README.md").is_file()  # the listing's page: .runpod/README.md or the root's


def test_the_guide_states_the_gates_gpu_thresholds():
    """STORAGE-DEPLOYMENT-GUIDE.md's Resources section says what the gate fails and warns at."""
    from f5worker.validation import GPU_MIN_BYTES

    guide = (REPO / "STORAGE-DEPLOYMENT-GUIDE.md").read_text(encoding="utf-8")
    resources = guide[guide.index("#### Resources"):guide.index("### 3. Pre-deployment validation")]
    fails = re.search(r"fails\s+on a GPU with less than ([\d.]+) GiB", resources)
    warns = re.search(r"warns below ([\d.]+) GiB", resources)
    assert fails and warns, resources
    assert float(fails.group(1)) * GIB == GPU_MIN_BYTES and float(warns.group(1)) * GIB == GPU_RECOMMENDED_BYTES
    for pool in re.findall(r"`([A-Z]+_\d+(?:_PRO)?)`", resources):  # the pools it recommends
        assert (int(POOL.match(pool).group(1)) - SOLD_AS_SLACK_GIB) * GIB >= GPU_RECOMMENDED_BYTES, pool
