"""validate-storage-config.py / f5worker.validation against temp folders and the real S3 test server."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from f5worker import settings as settings_module
from f5worker import validation
from tests.helpers import env_values as dockerfile_env_values
from f5worker.model.store import F5_FILES, VOCODER_HUB_FILES
from f5worker.settings import (
    CACHE_ENV_SUBDIRS,
    DEFAULT_VOLUME_PATH,
    ENV_AWS_ACCESS_KEY_ID,
    ENV_AWS_ENDPOINT_URL,
    ENV_AWS_REGION,
    ENV_AWS_SECRET_ACCESS_KEY,
    ENV_BAKED_MODEL_DIR,
    ENV_CKPT_FILE,
    ENV_LOCAL_STORAGE_DIR,
    ENV_MODEL_CONFIG,
    ENV_S3_BUCKET,
    ENV_TMP_DIR,
    ENV_VOCODER_DIR,
    ENV_VOLUME_PATH,
    POD_VOLUME_PATH,
    Settings,
)
from f5worker.validation import main
from tests.fixtures_faults import fault_proxy, hung_endpoint
from tests.random_models import TINY_SMALL_ARCH, TINY_V0_ARCH, write_f5_checkpoint, write_model_config, write_vocab
from tests.helpers import DAMAGES, VOCOS_TARGET, damaged_copy, hub_snapshot, nan_vocoder, nan_weight

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "validate-storage-config.py"
OFFLINE = ["--skip-s3", "--skip-gpu"]
# Every variable the worker or botocore reads, cleared so the developer's environment cannot leak in.
WORKER_ENV = [v for k, v in vars(settings_module).items() if k.startswith("ENV_")]
OTHER_ENV = list(CACHE_ENV_SUBDIRS) + ["AWS_CA_BUNDLE", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                                       "AWS_SESSION_TOKEN", "HF_XET_CACHE", "HF_HUB_OFFLINE"]


@pytest.fixture
def volume(monkeypatch, tmp_path) -> Path:
    """A volume folder (RUNPOD_VOLUME_PATH), empty caches, a temp folder, and the cache variables
    set the way Dockerfile.runpod sets them for this volume."""
    for name in WORKER_ENV + OTHER_ENV:
        monkeypatch.delenv(name, raising=False)
    vol = tmp_path / "volume"
    vol.mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv(ENV_VOLUME_PATH, str(vol))
    monkeypatch.setenv(ENV_BAKED_MODEL_DIR, str(tmp_path / "baked"))
    monkeypatch.setenv(ENV_TMP_DIR, str(tmp_path / "tmp"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in Settings.from_env(os.environ).cache_env().items():
        monkeypatch.setenv(name, value)
    return vol


@pytest.fixture
def models_env(monkeypatch, tiny_models, volume) -> dict[str, str]:
    for name, value in tiny_models.items():
        monkeypatch.setenv(name, value)
    return tiny_models


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *args: str) -> tuple[int, dict, dict[str, dict]]:
    code, out, _ = run(capsys, "--json", *args)
    doc = json.loads(out)
    assert doc["ok"] is (code == 0)
    return code, doc, {c["name"]: c for c in doc["checks"]}


def populate_cache(cache_dir: Path, tiny_models: dict[str, str], *, f5: bool = True, vocoder: bool = True) -> None:
    if f5:
        snap = hub_snapshot(cache_dir, F5_FILES[0].repo)
        for hub_file, source in zip(F5_FILES, (tiny_models[ENV_CKPT_FILE], tiny_models["F5_VOCAB_FILE"])):
            (snap / hub_file.filename).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, snap / hub_file.filename)
    if vocoder:
        snap = hub_snapshot(cache_dir, VOCODER_HUB_FILES[0].repo)
        snap.mkdir(parents=True)
        for hub_file in VOCODER_HUB_FILES:
            shutil.copy(Path(tiny_models[ENV_VOCODER_DIR]) / hub_file.filename, snap / hub_file.filename)


# --- volume, caches, models ------------------------------------------------------------------------

def test_complete_local_models_pass(capsys, models_env, volume):
    before = dict(os.environ)
    code, doc, checks = run_json(capsys, *OFFLINE)
    assert code == 0, doc
    assert checks["TTS models"]["status"] == "pass"
    assert "local files" in checks["TTS models"]["message"]
    assert checks["cache variables"]["status"] == "pass"
    assert checks["model cache location"]["status"] == "pass"
    assert checks["temp folder"]["status"] == "pass"
    assert checks["free space for models"]["status"] == "pass"
    # a temp folder is not a mount point: it works but would not persist
    assert checks["volume mounted"]["status"] == "warn"
    assert "not a mount point" in checks["volume mounted"]["message"]
    assert checks["transcription model"]["status"] == "warn"
    assert checks["S3 storage"]["status"] == checks["GPU"]["status"] == "skip"
    assert all(set(c) == {"name", "status", "message"} and "\n" not in c["message"] for c in doc["checks"])
    assert dict(os.environ) == before  # nothing applied to the environment
    assert not list(volume.iterdir()), "the checks left files on the volume"


def test_text_output(capsys, models_env):
    code, out, _ = run(capsys, *OFFLINE)
    assert code == 0
    lines = out.strip().splitlines()
    assert any(line.startswith("PASS  TTS models  ") for line in lines)
    assert any(line.startswith("WARN  volume mounted  ") and "Fix:" in line for line in lines)
    assert lines[-1].startswith("All storage configuration checks passed.")


@pytest.mark.parametrize("cache", ["volume", "image"])
def test_models_from_hub_caches(capsys, monkeypatch, tiny_models, volume, tmp_path, cache):
    # the tiny checkpoint stands in for the hub's: the config it was written for goes with it
    monkeypatch.setenv(ENV_MODEL_CONFIG, tiny_models[ENV_MODEL_CONFIG])
    settings = Settings.from_env(os.environ)
    cache_dir = settings.hub_cache if cache == "volume" else settings.baked_model_dir / "hub"
    populate_cache(cache_dir, tiny_models)
    code, doc, checks = run_json(capsys, *OFFLINE, "--require-models")
    assert code == 0, doc
    message = checks["TTS models"]["message"]
    assert ("volume cache" if cache == "volume" else "image copy") in message
    assert str(cache_dir) in message
    assert "TTS models already present" in checks["free space for models"]["message"]


def test_missing_models_warn_or_fail(capsys, monkeypatch, tiny_models, volume):
    populate_cache(Settings.from_env(os.environ).hub_cache, tiny_models, f5=False)  # vocoder only
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 0
    assert checks["TTS models"]["status"] == "warn"
    message = checks["TTS models"]["message"]
    assert "F5TTS_v1_Base not in any local cache" in message and "vocoder from volume cache" in message
    assert "Fix:" in message
    assert checks["free space for models"]["status"] == "pass"
    code, _, checks = run_json(capsys, *OFFLINE, "--require-models")
    assert code == 1 and checks["TTS models"]["status"] == "fail"


def test_not_enough_space_for_missing_models(capsys, monkeypatch, volume):
    monkeypatch.setattr(validation, "_free_bytes", lambda directory: 300_000_000)
    code, out, _ = run(capsys, *OFFLINE)
    assert code == 1
    assert any(line.startswith("FAIL  free space for models  ") and "Fix:" in line for line in out.splitlines())
    assert any(line.startswith("FAIL  temp folder  ") for line in out.splitlines())
    assert out.strip().splitlines()[-1] == "2 required check(s) failed."


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def _garbage(path: Path) -> None:
    path.write_bytes(b"<html>Rate limit exceeded</html>" * 10)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty])
def test_damaged_checkpoint_fails(capsys, monkeypatch, models_env, tmp_path, damage):
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(models_env[ENV_CKPT_FILE], ckpt)
    damage(ckpt)
    monkeypatch.setenv(ENV_CKPT_FILE, str(ckpt))
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 1
    assert checks["TTS models"]["status"] == "fail"
    assert str(ckpt) in checks["TTS models"]["message"]
    assert "Fix:" in checks["TTS models"]["message"]


def test_damaged_cached_vocoder_fails(capsys, tiny_models, volume):
    hub = Settings.from_env(os.environ).hub_cache
    populate_cache(hub, tiny_models)
    (weights,) = hub.glob("models--charactr--*/snapshots/*/pytorch_model.bin")
    _truncate(weights)
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 1
    assert checks["TTS models"]["status"] == "fail" and "pytorch_model.bin" in checks["TTS models"]["message"]


def test_explicit_file_that_does_not_exist_fails(capsys, monkeypatch, models_env, tmp_path):
    monkeypatch.setenv(ENV_CKPT_FILE, str(tmp_path / "nope.safetensors"))
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 1
    assert checks["TTS models"]["status"] == "fail"
    assert f"{ENV_CKPT_FILE} is set to" in checks["TTS models"]["message"]


def test_missing_volume_fails(capsys, monkeypatch, models_env, tmp_path):
    monkeypatch.setenv(ENV_VOLUME_PATH, str(tmp_path / "no-volume"))
    code, out, _ = run(capsys, *OFFLINE)
    assert code == 1
    assert any(line.startswith("FAIL  volume mounted  ") and "Fix:" in line for line in out.splitlines())
    assert "required check(s) failed." in out.strip().splitlines()[-1]


def test_cache_variables_in_tmp_fail(capsys, monkeypatch, models_env):
    monkeypatch.setenv("HF_HOME", "/tmp/hf")
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 1
    assert checks["cache variables"]["status"] == "fail"
    assert "HF_HOME=/tmp/hf" in checks["cache variables"]["message"]


def test_cache_variables_unset_warn(capsys, monkeypatch, models_env):
    for name in CACHE_ENV_SUBDIRS:
        monkeypatch.delenv(name)
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 0
    assert checks["cache variables"]["status"] == "warn"
    assert "the worker sets them itself" in checks["cache variables"]["message"]


def test_model_root_in_tmp_fails(capsys, monkeypatch, models_env, tmp_path):
    root = Path(os.environ[ENV_TMP_DIR]) / "models"
    monkeypatch.setenv("F5_MODEL_ROOT", str(root))
    for name, value in Settings.from_env(os.environ).cache_env().items():
        monkeypatch.setenv(name, value)  # consistent with the root: only the location is wrong
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 1
    assert checks["model cache location"]["status"] == "fail"
    assert checks["cache variables"]["status"] == "pass"


# --- weights the worker could not load --------------------------------------------------------------

@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_checkpoint_that_does_not_fit_fails(capsys, monkeypatch, models_env, tmp_path, damage):
    env, pattern = damaged_copy(models_env, tmp_path, damage)
    monkeypatch.setenv(ENV_CKPT_FILE, env[ENV_CKPT_FILE])
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 1
    check = checks["TTS models"]
    assert check["status"] == "fail"
    # the sentence the worker's loader refuses the same file with, then the fix
    assert re.search(rf"^The checkpoint {env[ENV_CKPT_FILE]} .*{pattern}\. Fix: .*{ENV_MODEL_CONFIG}",
                     check["message"]), check["message"]


def test_nan_vocoder_fails(capsys, monkeypatch, models_env, tmp_path):
    env = nan_vocoder(models_env, tmp_path)
    monkeypatch.setenv(ENV_VOCODER_DIR, env[ENV_VOCODER_DIR])
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 1 and checks["TTS models"]["status"] == "fail"
    assert f"{env[ENV_VOCODER_DIR]}/pytorch_model.bin has non-finite values" in checks["TTS models"]["message"]
    assert VOCOS_TARGET in checks["TTS models"]["message"]


def test_cached_checkpoint_checked_while_the_vocoder_is_missing(capsys, monkeypatch, tiny_models, volume, tmp_path):
    """One set still to download must not hide a damaged one already there."""
    env, pattern = damaged_copy(tiny_models, tmp_path, nan_weight)
    monkeypatch.setenv(ENV_MODEL_CONFIG, tiny_models[ENV_MODEL_CONFIG])
    populate_cache(Settings.from_env(os.environ).hub_cache, env, vocoder=False)
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 1 and checks["TTS models"]["status"] == "fail"
    assert re.search(pattern, checks["TTS models"]["message"])


# --- fix lines agree with the Dockerfile; variables nothing reads ----------------------------------

def test_gate_knows_what_the_dockerfile_sets(volume):
    dockerfile = dockerfile_env_values()
    assert validation.dockerfile_cache_env(Settings.from_env(os.environ)) == {
        name: dockerfile[name] for name in CACHE_ENV_SUBDIRS}


def test_dockerfile_cache_values_without_a_volume_point_at_the_volume(capsys, monkeypatch, models_env, tmp_path):
    """A container from Dockerfile.runpod started without its volume: the cache variables hold the
    image's values, and the fix is the volume, not a path under the fallback model root."""
    monkeypatch.setenv(ENV_VOLUME_PATH, str(tmp_path / "no-volume"))
    for name, value in dockerfile_env_values().items():
        if name in CACHE_ENV_SUBDIRS:
            monkeypatch.setenv(name, value)
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 1 and checks["volume mounted"]["status"] == "fail"
    assert f"{ENV_VOLUME_PATH}={POD_VOLUME_PATH}" in checks["volume mounted"]["message"]
    cache = checks["cache variables"]
    assert cache["status"] == "warn", cache
    assert "Dockerfile.runpod's values" in cache["message"] and "attach the network volume" in cache["message"]


def test_the_guides_pod_preload_variables_pass_the_gate(capsys, monkeypatch, models_env, volume):
    """The guide's pod steps (the image's variables, then its export for a volume at /workspace)
    end with the gate: it failed them, as the export left TRITON_CACHE_DIR at the image's value."""
    guide = (REPO / "STORAGE-DEPLOYMENT-GUIDE.md").read_text(encoding="utf-8")
    export = re.search(r"^\s*export (RUNPOD_VOLUME_PATH=/workspace .*?)(?<!\\)\n", guide, re.M | re.S)
    assert export, "the guide's pod export line"
    for name, value in dockerfile_env_values().items():
        if name in CACHE_ENV_SUBDIRS:
            monkeypatch.setenv(name, value)
    for assignment in shlex.split(export.group(1).replace("\\\n", " ")):
        name, _, value = assignment.partition("=")
        monkeypatch.setenv(name, value.replace("/workspace", str(volume), 1))
    _, _, checks = run_json(capsys, *OFFLINE)
    assert checks["cache variables"]["status"] == "pass", checks["cache variables"]


def test_fix_never_claims_the_dockerfile_sets_another_volumes_paths(capsys, monkeypatch, models_env):
    monkeypatch.setenv("HF_HOME", "/tmp/hf")  # the test volume is not /runpod-volume
    _, _, checks = run_json(capsys, *OFFLINE)
    message = checks["cache variables"]["message"]
    assert checks["cache variables"]["status"] == "fail"
    assert "as Dockerfile.runpod does" not in message and "(Dockerfile.runpod does)" not in message
    assert f"Dockerfile.runpod's values are for a volume at {DEFAULT_VOLUME_PATH}" in message


def test_a_variable_nothing_reads_is_not_checked(capsys, monkeypatch, models_env):
    # transformers 5 (the pinned version) no longer reads TRANSFORMERS_CACHE
    monkeypatch.setenv("TRANSFORMERS_CACHE", "/tmp/somewhere-else")
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 0
    assert checks["cache variables"]["status"] == "pass"
    assert "TRANSFORMERS_CACHE" not in checks["cache variables"]["message"]


# --- GPU ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gib,status", [(None, "fail"), (4, "fail"), (12, "warn"), (24, "pass")])
def test_gpu(capsys, monkeypatch, models_env, gib, status):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gib is not None)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(name="Fake GPU", total_memory=(gib or 0) * 2 ** 30))
    code, _, checks = run_json(capsys, "--skip-s3")
    assert checks["GPU"]["status"] == status
    assert code == (1 if status == "fail" else 0)


@pytest.mark.parametrize("problem", [None, "RuntimeError: Failed to find C compiler."])
def test_fused_kernels_that_cannot_compile_are_a_warning_with_the_fix(capsys, monkeypatch, models_env, problem):
    import torch

    from f5worker.inference import kernel_switch as fast_kernels

    # Injected: a GPU (this machine has none) on which Triton can or cannot build its launcher.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(name="Fake GPU", total_memory=24 * 2 ** 30))
    monkeypatch.setattr(fast_kernels, "triton_probe", lambda device: problem)
    code, _, checks = run_json(capsys, "--skip-s3")
    assert code == 0
    check = checks["Fused kernels"]
    if problem is None:
        assert check["status"] == "pass"
    else:
        assert check["status"] == "warn" and "C compiler" in check["message"] and "gcc" in check["message"]
    code, _, checks = run_json(capsys, "--skip-s3", "--skip-gpu")
    assert checks["Fused kernels"]["status"] == "skip"


def test_the_fused_kernel_probe_runs_on_the_gpu_the_worker_would_use(capsys, monkeypatch, models_env):
    """F5_DEVICE=cuda:1: the probe ran on cuda (device 0) and could pass for a GPU the worker never uses."""
    import torch

    from f5worker.inference import kernel_switch

    # Injected: two GPUs (this machine has none); the probe records where it was asked to run.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(name="Fake GPU", total_memory=24 * 2 ** 30))
    probed = []
    monkeypatch.setattr(kernel_switch, "triton_probe", lambda device: probed.append(device))
    monkeypatch.setenv("F5_DEVICE", "cuda:1")
    run_json(capsys, "--skip-s3")
    assert probed == ["cuda:1"]
    monkeypatch.setenv("F5_DEVICE", "cuda:5")  # not on this machine: the GPU check fails, the probe is skipped
    probed.clear()
    _, _, checks = run_json(capsys, "--skip-s3")
    assert probed == [] and checks["Fused kernels"]["status"] == "skip" and checks["GPU"]["status"] == "fail"


# --- S3 and secrets --------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_secret_never_printed_when_s3_fails(capsys, monkeypatch, models_env):
    secret = "sekrit-" + uuid.uuid4().hex
    key_id = "AKIA" + uuid.uuid4().hex[:16].upper()
    monkeypatch.setenv(ENV_S3_BUCKET, "my-bucket")
    monkeypatch.setenv(ENV_AWS_ACCESS_KEY_ID, key_id)
    monkeypatch.setenv(ENV_AWS_SECRET_ACCESS_KEY, secret)
    monkeypatch.setenv(ENV_AWS_REGION, "us-east-1")
    monkeypatch.setenv(ENV_AWS_ENDPOINT_URL, f"http://127.0.0.1:{_closed_port()}")
    for args in (["--skip-gpu"], ["--skip-gpu", "--json"]):
        code, out, err = run(capsys, *args)
        assert code == 1
        assert secret not in out + err and key_id not in out + err
        assert key_id[-4:] in out
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["S3 storage"]["status"] == "fail" and "Fix:" in checks["S3 storage"]["message"]


def test_s3_bucket_without_secret_fails(capsys, monkeypatch, models_env):
    monkeypatch.setenv(ENV_S3_BUCKET, "my-bucket")
    monkeypatch.setenv(ENV_AWS_ACCESS_KEY_ID, "AKIAEXAMPLEEXAMPLE")
    code, _, checks = run_json(capsys, "--skip-gpu")
    assert code == 1 and list(checks) == ["settings"]  # the worker would not start either
    assert checks["settings"]["status"] == "fail"
    assert ENV_AWS_SECRET_ACCESS_KEY in checks["settings"]["message"]


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_a_local_storage_folder_the_worker_cannot_write_fails(capsys, monkeypatch, models_env, tmp_path, where):
    """It used to warn '(not created yet)' and every job then failed."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    root = {"a file": blocker, "under a file": blocker / "storage", "read-only": tmp_path / "ro" / "storage"}[where]
    if where == "read-only":
        (tmp_path / "ro").mkdir()
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "ro")  # root may write anywhere
    monkeypatch.setenv(ENV_LOCAL_STORAGE_DIR, str(root))
    code, _, checks = run_json(capsys, "--skip-gpu")
    assert code == 1 and checks["S3 storage"]["status"] == "fail"
    message = checks["S3 storage"]["message"]
    assert message.startswith(f"{ENV_LOCAL_STORAGE_DIR} ({root}) cannot hold voices and outputs: "), message
    assert ("is a file" if where != "read-only" else "is not writable") in message
    assert not (tmp_path / "ro" / "storage").exists()  # the gate made nothing


def test_a_bucket_name_s3_does_not_allow_fails(capsys, monkeypatch, models_env):
    for name, value in {ENV_S3_BUCKET: "Bad_Bucket!", ENV_AWS_ENDPOINT_URL: "http://127.0.0.1:9",
                        ENV_AWS_ACCESS_KEY_ID: "AKIAEXAMPLEEXAMPLE", ENV_AWS_SECRET_ACCESS_KEY: "example-secret"}.items():
        monkeypatch.setenv(name, value)
    code, _, checks = run_json(capsys, "--skip-gpu")
    assert code == 1 and f"{ENV_S3_BUCKET} is not a bucket name S3 allows" in checks["S3 storage"]["message"]


@pytest.mark.parametrize("device, expected", [("cpu", "F5_DEVICE=cpu: the worker would run on the CPU"),
                                              ("cuda:3", "F5_DEVICE is cuda:3, but this machine has 1 CUDA")])
def test_the_gpu_check_uses_f5_device(capsys, monkeypatch, models_env, device, expected):
    import torch

    # Stand-in for a one-GPU machine (this one has none): only the count is asked before the refusal.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("F5_DEVICE", device)
    monkeypatch.setenv("F5_FUSED_KERNELS", "0")  # the Triton check would try this machine's missing GPU
    code, _, checks = run_json(capsys, "--skip-s3")
    assert code == 1 and checks["GPU"]["status"] == "fail" and checks["GPU"]["message"].startswith(expected)


def test_no_bucket_is_local_mode(capsys, models_env, volume):
    code, _, checks = run_json(capsys, "--skip-gpu")
    assert code == 0
    assert checks["S3 storage"]["status"] == "warn"
    assert "(writable)" in checks["S3 storage"]["message"]  # the volume's storage folder was probed
    code, _, checks = run_json(capsys, "--skip-gpu", "--require-s3")
    assert code == 1 and checks["S3 storage"]["status"] == "fail"


def _use_s3_env(monkeypatch, s3_env: dict[str, str]) -> None:
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)


def test_s3_probe_passes(capsys, monkeypatch, models_env, s3_env):
    _use_s3_env(monkeypatch, s3_env)
    code, out, err = run(capsys, "--skip-gpu", "--require-s3")
    assert code == 0, out
    line = next(line for line in out.splitlines() if "  S3 storage  " in line)
    assert line.startswith("PASS") and s3_env.bucket in line
    assert s3_env[ENV_AWS_SECRET_ACCESS_KEY] not in out + err
    assert s3_env[ENV_AWS_ACCESS_KEY_ID] not in out + err
    # the probe cleaned up after itself
    assert s3_env.server.client().list_objects_v2(Bucket=s3_env.bucket).get("KeyCount", 0) == 0


def test_a_presigned_url_callers_cannot_fetch_fails_the_probe(capsys, monkeypatch, models_env, s3_server, s3_env):
    """The bucket's API calls pass while the URLs a job hands out fail (a URL signed for another
    region is refused; botocore follows the bucket's region for its own calls): the probe fetches
    its object as a caller would. SeaweedFS accepts any region, so a proxy in front of it refuses
    presigned GETs (those with a signature in their query) the way S3 does, with a real answer."""
    _use_s3_env(monkeypatch, s3_env)
    with fault_proxy(s3_server, lambda method, path: "X-Amz-Signature=" in path) as proxy:
        monkeypatch.setenv(ENV_AWS_ENDPOINT_URL, proxy.url)
        code, _, checks = run_json(capsys, "--skip-gpu")
    assert code == 1 and proxy.failed == 1 and proxy.forwarded > 0
    message = checks["S3 storage"]["message"]
    assert checks["S3 storage"]["status"] == "fail"
    assert ("the probe object's presigned URL (what a job gives as audio_url) was answered HTTP 503 ServiceUnavailable, "
            "so callers could not fetch their audio; check AWS_REGION (it must be the bucket's region)") in message
    assert "Signature" not in message.replace("X-Amz-Signature", "")  # the URL is never shown
    assert s3_env.server.client().list_objects_v2(Bucket=s3_env.bucket).get("KeyCount", 0) == 0  # deleted anyway


def test_s3_wrong_secret_fails(capsys, monkeypatch, models_env, s3_env):
    _use_s3_env(monkeypatch, s3_env)
    wrong = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv(ENV_AWS_SECRET_ACCESS_KEY, wrong)
    code, out, err = run(capsys, "--skip-gpu", "--json")
    assert code == 1
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["S3 storage"]["status"] == "fail"
    for secret in (wrong, s3_env[ENV_AWS_SECRET_ACCESS_KEY], s3_env[ENV_AWS_ACCESS_KEY_ID]):
        assert secret not in out + err


# --- the script itself -----------------------------------------------------------------------------

def test_script_from_another_directory(models_env, tmp_path):
    secret = "sekrit-" + uuid.uuid4().hex
    env = dict(os.environ, **{ENV_AWS_SECRET_ACCESS_KEY: secret})
    env.pop("PYTHONPATH", None)  # the script must find the package on its own
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", *OFFLINE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True
    assert secret not in proc.stdout + proc.stderr


def test_script_exit_code_on_failure(monkeypatch, models_env, tmp_path):
    env = dict(os.environ, **{ENV_VOLUME_PATH: str(tmp_path / "no-volume")})
    proc = subprocess.run([sys.executable, "validate-storage-config.py", *OFFLINE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  volume mounted  " in proc.stdout


# --- RunPod's cached models and runpod's bucket variable names ------------------------------------

@pytest.mark.parametrize("with_ref", [True, False], ids=["refs-main", "no-refs"])
def test_models_from_runpod_cached_models(capsys, monkeypatch, tiny_models, volume, with_ref):
    """The endpoint's Model setting puts the F5-TTS repo under <volume>/huggingface-cache/hub (here
    built from the tiny random models); the vocoder, which RunPod cannot cache alongside, comes
    from the volume cache. The gate finds, checks and never writes the cached folder."""
    monkeypatch.setenv(ENV_MODEL_CONFIG, tiny_models[ENV_MODEL_CONFIG])
    settings = Settings.from_env(os.environ)
    cached = settings.runpod_model_cache
    populate_cache(cached, tiny_models, vocoder=False)
    populate_cache(settings.hub_cache, tiny_models, f5=False)
    if not with_ref:
        shutil.rmtree(next(cached.glob("models--*")) / "refs")
    before = sorted((str(p), p.stat().st_mtime_ns) for p in cached.rglob("*"))
    code, doc, checks = run_json(capsys, *OFFLINE, "--require-models")
    assert code == 0, doc
    message = checks["TTS models"]["message"]
    assert f"F5TTS_v1_Base from RunPod cached models ({cached})" in message
    assert f"vocoder from volume cache ({settings.hub_cache})" in message
    assert "RunPod's cached models are in" in checks["volume mounted"]["message"]
    assert sorted((str(p), p.stat().st_mtime_ns) for p in cached.rglob("*")) == before


def test_damaged_checkpoint_in_runpod_cached_models_fails(capsys, monkeypatch, tiny_models, volume):
    monkeypatch.setenv(ENV_MODEL_CONFIG, tiny_models[ENV_MODEL_CONFIG])
    cached = Settings.from_env(os.environ).runpod_model_cache
    populate_cache(cached, tiny_models)
    (ckpt,) = cached.glob(f"models--*/snapshots/*/{F5_FILES[0].filename}")
    _truncate(ckpt)
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 1 and checks["TTS models"]["status"] == "fail" and str(ckpt) in checks["TTS models"]["message"]


def _runpod_names(s3_env) -> dict[str, str]:
    return {"BUCKET_ENDPOINT_URL": f"{s3_env[ENV_AWS_ENDPOINT_URL]}/{s3_env.bucket}",
            "BUCKET_ACCESS_KEY_ID": s3_env[ENV_AWS_ACCESS_KEY_ID],
            "BUCKET_SECRET_ACCESS_KEY": s3_env[ENV_AWS_SECRET_ACCESS_KEY]}


def test_s3_probe_passes_with_runpod_names_only(capsys, monkeypatch, models_env, s3_env):
    for name, value in _runpod_names(s3_env).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(ENV_AWS_REGION, s3_env[ENV_AWS_REGION])
    code, out, err = run(capsys, "--skip-gpu", "--require-s3")
    assert code == 0, out
    line = next(line for line in out.splitlines() if "  S3 storage  " in line)
    assert line.startswith("PASS") and s3_env.bucket in line
    assert s3_env[ENV_AWS_SECRET_ACCESS_KEY] not in out + err and s3_env[ENV_AWS_ACCESS_KEY_ID] not in out + err


def test_conflicting_aliases_warn_by_name_only(capsys, monkeypatch, models_env, s3_env):
    _use_s3_env(monkeypatch, s3_env)
    other = "other-" + uuid.uuid4().hex
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", other)
    code, out, err = run(capsys, "--skip-gpu", "--json")
    check = {c["name"]: c for c in json.loads(out)["checks"]}["S3 storage"]
    assert code == 0 and check["status"] == "warn", check
    assert "write, read, presigned fetch and delete OK" in check["message"]  # ours won: the probe used the right secret
    assert (f"{ENV_AWS_SECRET_ACCESS_KEY} and BUCKET_SECRET_ACCESS_KEY are both set and differ; "
            f"{ENV_AWS_SECRET_ACCESS_KEY} is used.") in check["message"]
    assert other not in out + err and s3_env[ENV_AWS_SECRET_ACCESS_KEY] not in out + err


def test_alias_endpoint_without_a_bucket_says_so(capsys, monkeypatch, models_env, volume):
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "https://s3.us-west-004.backblazeb2.com")
    code, _, checks = run_json(capsys, "--skip-gpu")
    message = checks["S3 storage"]["message"]
    assert code == 0 and checks["S3 storage"]["status"] == "warn"
    assert message.startswith("BUCKET_ENDPOINT_URL is set but names no bucket") and "local folder" in message


def test_unusable_alias_url_fails_the_settings_check(capsys, monkeypatch, models_env):
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "https://user:hunter2@host/a/b")
    code, out, _ = run(capsys, "--skip-gpu")
    assert code == 1 and out.startswith("FAIL  settings  BUCKET_ENDPOINT_URL must look like")
    assert "hunter2" not in out


def test_a_presign_expiry_over_a_week_fails_the_gate(capsys, monkeypatch, models_env):
    monkeypatch.setenv("S3_PRESIGN_EXPIRY_SECONDS", "1000000")
    code, _, checks = run_json(capsys, "--skip-s3", "--skip-gpu")
    assert code == 1 and checks["settings"]["status"] == "fail"
    assert "S3_PRESIGN_EXPIRY_SECONDS must be at most 604800" in checks["settings"]["message"]


# --- several models (F5_MODELS) ---------------------------------------------------------------------

def registered_model(folder: Path, arch: dict, extra: str, **kw) -> dict[str, str]:
    folder.mkdir(parents=True)
    vocab = write_vocab(folder / "vocab.txt", extra)
    return {"ckpt": str(write_f5_checkpoint(folder / "model.pt", arch, vocab, **kw)), "vocab": str(vocab),
            "config": str(write_model_config(folder / "model.yaml", arch))}


def test_every_registered_model_is_checked(capsys, monkeypatch, models_env, tmp_path):
    de = registered_model(tmp_path / "de", TINY_V0_ARCH, "ẞĳ")
    hi = registered_model(tmp_path / "hi", TINY_SMALL_ARCH, "नमस्ते", ema=False)
    monkeypatch.setenv("F5_MODELS", json.dumps({"de": de, "hi": hi}))
    code, doc, checks = run_json(capsys, *OFFLINE, "--require-models")
    assert code == 0, doc
    message = checks["TTS models"]["message"]
    assert "de from local files" in message and "hi from local files" in message
    assert "F5TTS_Base" not in message  # a built-in nobody asked for is not required
    # a registered model given the other's vocabulary: the worker's sentence, naming both
    monkeypatch.setenv("F5_MODELS", json.dumps({"de": {**de, "vocab": hi["vocab"]}}))
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 1 and checks["TTS models"]["status"] == "fail"
    assert f"The vocabulary {hi['vocab']} has" in checks["TTS models"]["message"]
    assert f"the checkpoint {de['ckpt']} was trained with" in checks["TTS models"]["message"]


def test_a_registered_model_not_cached_needs_room_and_a_missing_local_file_fails(capsys, monkeypatch, models_env,
                                                                              tmp_path):
    monkeypatch.setenv("F5_MODELS", json.dumps({"fr": {"ckpt": "hf://someone/fr-tiny/model.pt",
                                                       "vocab": "hf://someone/fr-tiny/vocab.txt"}}))
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 0 and checks["TTS models"]["status"] == "warn"
    assert "fr not in any local cache" in checks["TTS models"]["message"]
    monkeypatch.setattr(validation, "_free_bytes", lambda directory: 300_000_000)
    code, _, checks = run_json(capsys, *OFFLINE)
    assert checks["free space for models"]["status"] == "fail"
    monkeypatch.setenv("F5_MODELS", json.dumps({"fr": {"ckpt": str(tmp_path / "gone.pt")}}))
    code, _, checks = run_json(capsys, *OFFLINE)
    assert code == 1 and checks["TTS models"]["status"] == "fail"
    assert f"F5_MODELS' model 'fr' ckpt is set to {tmp_path / 'gone.pt'}, which does not exist." \
        in checks["TTS models"]["message"]


# --- the gate's own bounds ---------------------------------------------------------------------------

def test_a_volume_that_does_not_answer_is_bounded_by_the_timeout(capsys, monkeypatch, volume):
    """Reading the settings looks at the volume (is it a folder?): a volume that stopped answering
    held the gate past --timeout, with no output. A stat that blocks cannot be caused here (no
    hung network mount), so Path.is_dir blocks on the volume's path: a stand-in for that fault."""
    released = threading.Event()
    original = Path.is_dir
    monkeypatch.setattr(Path, "is_dir", lambda self: released.wait() if self == volume else original(self))
    started = time.monotonic()
    try:
        code, doc, checks = run_json(capsys, *OFFLINE, "--timeout", "3")
    finally:
        released.set()
    assert time.monotonic() - started < 3
    assert code == 1 and list(checks) == ["settings"]
    assert checks["settings"]["message"].startswith(
        f"did not finish within 1 s (it was looking at the volume ({ENV_VOLUME_PATH})); ")


@pytest.mark.parametrize("seconds", ["1e12", "1e308", "0", "nan"])
def test_a_timeout_past_a_day_or_not_above_0_is_refused(capsys, seconds):
    """--timeout 1e12 passed, then failed in a thread's wait (OverflowError) with a traceback."""
    with pytest.raises(SystemExit) as exited:
        main(["--skip-s3", "--skip-gpu", "--timeout", seconds])
    assert exited.value.code == 2
    assert f"must be a number of seconds above 0 and at most 86400, not '{seconds}'" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(models_env):
    """Ctrl-C while the storage probe waits (on an endpoint that never answers) ended the gate in
    a KeyboardInterrupt traceback; the script is sent a real SIGINT."""
    with hung_endpoint() as url:
        env = dict(os.environ, **{ENV_AWS_ENDPOINT_URL: url, ENV_S3_BUCKET: "hung", ENV_AWS_ACCESS_KEY_ID: "AKIDEXAMPLE",
                                  ENV_AWS_SECRET_ACCESS_KEY: "secret"})
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--skip-gpu"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)  # into the checks: the S3 probe waits on the endpoint
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert err.strip().endswith("interrupted: the checks did not finish (a storage probe cut short may leave its "
                                "small logs/probe-*.txt object behind).") and "Traceback" not in err, err
