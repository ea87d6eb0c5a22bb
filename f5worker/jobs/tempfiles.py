"""A job's files in the worker's temp folder, named in one place.

Why this module exists: the job's workflow creates them (``jobs.workflows.job_files``) and the
guard removes what an abandoned thread left (``jobs.guard.JobGuard.sweep``). The guard matched
``<job_id>_*``, which also took the files of a job whose id merely starts with that one's and an
underscore (``a`` swept ``a_b``'s files while it ran); both now derive the names from here. A
failure of the folder itself is said once, by ``staging_error``, for the jobs and the HTTP face.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Iterator

from f5worker.errors import StorageError
from f5worker.settings import ENV_TMP_DIR

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


def staging_error(tmp_dir: Path, err: BaseException) -> StorageError:
    """One sentence for a failure of the worker's temp folder, naming the folder and the cause."""
    if not tmp_dir.is_dir():
        return StorageError(f"The worker's temp folder {tmp_dir} does not exist; create it or set "
                            f"{ENV_TMP_DIR} to a writable folder")
    errno_ = getattr(err, "errno", None)
    if errno_ == errno.ENOSPC or "space" in str(err).lower() or shutil.disk_usage(tmp_dir).free < 1_000_000:
        return StorageError(f"The worker's temp folder {tmp_dir} is full; free space there or set "
                            f"{ENV_TMP_DIR} to a larger folder")
    reason = getattr(err, "strerror", None) or type(err).__name__
    return StorageError(f"The worker's temp folder {tmp_dir} could not be written ({reason})")
