"""A job's files in the worker's temp folder, named in one place.

Why this module exists: the job's workflow creates them (``jobs.workflows.job_files``) and the
guard removes what an abandoned thread left (``jobs.guard.JobGuard.sweep``). The guard matched
``<job_id>_*``, which also took the files of a job whose id merely starts with that one's and an
underscore (``a`` swept ``a_b``'s files while it ran); both now derive the names from here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

# The guide's /tmp/{job_id}_voice.wav and {job_id}_output.wav, an upload's source, a subtitle file.
JOB_FILE_NAMES = ("voice.wav", "output.wav", "download", "subtitles")


def job_paths(tmp_dir: Path, job_id: str) -> dict[str, Path]:
    return {name: tmp_dir / f"{job_id}_{name}" for name in JOB_FILE_NAMES}


def job_leftovers(tmp_dir: Path, job_id: str) -> Iterator[Path]:
    """The job's files that exist, and the hidden partial files beside them (``.<name>.*``, as
    ``s3_utils.atomic_write`` writes them)."""
    for path in job_paths(tmp_dir, job_id).values():
        if path.exists():
            yield path
        yield from tmp_dir.glob(f".{path.name}.*")
