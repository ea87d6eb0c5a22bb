"""scripts/setup.sh decides from its stamp whether a venv is reused, completed or built afresh.

A stand-in python (a shell script that logs what it is asked and makes the venv's files) takes
pip's place: the decisions are under test, not pip, and a real install takes minutes.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.processes import REPO

STAND_IN = """#!/usr/bin/env bash
echo "$*" >> "$SETUP_LOG"
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && echo "home = /stand-in" > "$3/pyvenv.cfg"
fi
case "$*" in *"$SETUP_FAIL"*) [ -n "$SETUP_FAIL" ] && exit 1 ;; esac
exit 0
"""


@pytest.fixture
def setup(tmp_path):
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    venv, log = tmp_path / "venv", tmp_path / "calls.log"

    def run(*args: str, fail: str = "") -> tuple[int, list[str]]:
        log.write_text("")
        env = {**os.environ, "VENV": str(venv), "PYTHON": str(python), "SETUP_LOG": str(log), "SETUP_FAIL": fail}
        done = subprocess.run(["bash", "scripts/setup.sh", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)
        return done.returncode, [line for line in log.read_text().splitlines() if line]

    run.venv = venv
    return run


def installs(calls: list[str]) -> list[str]:
    return [call.rsplit(" ", 1)[-1] for call in calls if " -r " in call]


def test_a_venv_is_reused_while_its_locks_stand_and_a_dev_one_serves_a_runtime_run(setup):
    """A runtime run after the tests' --dev one reinstalled everything (needing the package
    index, which the README's first command then failed without)."""
    code, calls = setup("--dev")
    assert code == 0 and calls[0].startswith("-m venv") and installs(calls) == [
        "requirements-torch.txt", "requirements.txt", "requirements-dev.txt"]
    assert setup() == (0, []) and setup("--dev") == (0, [])
    shutil.rmtree(setup.venv)
    code, calls = setup()
    assert code == 0 and installs(calls) == ["requirements-torch.txt", "requirements.txt"]
    assert setup() == (0, [])
    code, calls = setup("--dev")  # the dev tools added to the runtime venv, not built afresh
    assert code == 0 and installs(calls)[-1] == "requirements-dev.txt" and not calls[0].startswith("-m venv")


def test_other_locks_or_an_unfinished_install_build_the_venv_afresh(setup):
    """Stamps were appended and any line matched, so a venv last built from other locks passed as
    current; and a changed lock was installed over the old venv, keeping what it no longer names."""
    setup("--dev")
    (setup.venv / "left-over-package").write_text("from an older lock")
    stamp = setup.venv / ".f5worker-stamp"
    stamp.write_text(stamp.read_text().replace("runtime ", "runtime 0", 1))  # built from other locks
    code, calls = setup("--dev")
    assert code == 0 and calls[0].startswith("-m venv") and not (setup.venv / "left-over-package").exists()
    shutil.rmtree(setup.venv)
    code, _ = setup(fail="requirements.txt")  # interrupted: no stamp, so the next run starts over
    assert code != 0 and not stamp.exists()
    code, calls = setup()
    assert code == 0 and calls[0].startswith("-m venv") and Path(stamp).read_text().startswith("runtime ")
    (setup.venv / ".f5worker-made").unlink()  # a venv made otherwise is installed into, never removed
    stamp.write_text("an older stamp\n")
    code, calls = setup()
    assert code == 0 and not calls[0].startswith("-m venv") and (setup.venv / "pyvenv.cfg").exists()
