"""Model resolution order: explicit files, volume cache, image copy, then a download (only with
room for it); each failure is one clear StorageError. Pre-loading refuses to fill a container disk."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from f5worker.model import store as model_store
from f5worker.errors import StorageError
from f5worker.model.store import F5_FILES, VOCODER_HUB_FILES, resolve_tts_files
from f5worker.settings import ENV_BAKED_MODEL_DIR, ENV_VOLUME_PATH, POD_VOLUME_PATH, Settings

REVISION = "0123456789abcdef0123456789abcdef01234567"
REPO = Path(__file__).resolve().parent.parent


def put_in_hub_cache(cache: Path, hub_file, data: bytes = b"x") -> Path:
    """A file laid out as huggingface_hub's cache keeps it (refs/main -> snapshots/<rev>/...)."""
    repo_dir = cache / f"models--{hub_file.repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(REVISION)
    path = repo_dir / "snapshots" / REVISION / hub_file.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    volume = tmp_path / "volume"
    volume.mkdir()
    return {"RUNPOD_VOLUME_PATH": str(volume), "F5_BAKED_MODEL_DIR": str(tmp_path / "baked")}


def fill(cache: Path):
    return {f: put_in_hub_cache(cache, f) for f in F5_FILES + VOCODER_HUB_FILES}


def test_volume_cache_comes_before_the_image_copy(env):
    settings = Settings.from_env(env)
    assert settings.model_root == Path(env["RUNPOD_VOLUME_PATH"]) / "models"
    baked = fill(Path(env["F5_BAKED_MODEL_DIR"]) / "hub")
    files = resolve_tts_files(settings)
    assert files.ckpt == baked[F5_FILES[0]] and "image copy" in files.sources["f5"]
    on_volume = fill(settings.hub_cache)
    files = resolve_tts_files(settings)
    assert files.ckpt == on_volume[F5_FILES[0]] and "volume cache" in files.sources["f5"]
    assert files.vocoder_dir == on_volume[VOCODER_HUB_FILES[0]].parent


def test_explicit_files_come_first(env, tiny_models):
    fill(Settings.from_env(env).hub_cache)
    files = resolve_tts_files(Settings.from_env({**env, **tiny_models}))
    assert str(files.ckpt) == tiny_models["F5_CKPT_FILE"] and files.sources["f5"] == "local files"
    assert str(files.vocoder_dir) == tiny_models["F5_VOCODER_DIR"]


def test_a_set_is_never_mixed_across_caches(env):
    settings = Settings.from_env(env)
    put_in_hub_cache(settings.hub_cache, F5_FILES[0])  # checkpoint on the volume, vocab only baked
    baked = fill(Path(env["F5_BAKED_MODEL_DIR"]) / "hub")
    files = resolve_tts_files(settings)
    assert files.ckpt == baked[F5_FILES[0]] and files.vocab == baked[F5_FILES[1]]


def test_missing_explicit_file_is_one_sentence(env, tmp_path):
    with pytest.raises(StorageError, match=r"^F5_CKPT_FILE is set to .*, which does not exist\.$"):
        resolve_tts_files(Settings.from_env({**env, "F5_CKPT_FILE": str(tmp_path / "nope.safetensors")}))


def test_no_volume_falls_back_to_a_user_cache_not_tmp(tmp_path):
    settings = Settings.from_env({"RUNPOD_VOLUME_PATH": str(tmp_path / "absent")})
    assert not settings.volume_mounted
    assert settings.model_root == Path.home() / ".cache" / "f5-tts-worker" / "models"
    assert settings.local_storage_dir == Path("storage").resolve()


def test_offline_with_nothing_cached_says_where_it_looked(env):
    settings = Settings.from_env(env)
    with pytest.raises(StorageError) as err:
        resolve_tts_files(settings)
    message = str(err.value)
    assert str(settings.hub_cache) in message and "could not be downloaded" in message
    assert not any(settings.hub_cache.rglob("*.incomplete"))


def test_download_refused_without_room(env, monkeypatch):
    # A full volume cannot be made here; this stands in for disk_usage only (a fault we cannot cause).
    real = shutil.disk_usage
    monkeypatch.setattr(model_store.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=100_000_000))
    with pytest.raises(StorageError, match=r"has 0\.10 GB free but downloading the missing models needs about .* GB, so attach"):
        resolve_tts_files(Settings.from_env(env))


def test_allow_download_false_never_downloads(env):
    with pytest.raises(StorageError, match="not in any local cache"):
        resolve_tts_files(Settings.from_env(env), allow_download=False)


def test_preload_volume_without_a_volume_refuses_and_writes_nothing(tmp_path):
    """On a pod the volume is at /workspace, not /runpod-volume: without it, --volume would have
    filled the container disk (the model root falls back to ~/.cache)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("F5_", "RUNPOD_", "HF_", "TORCH_"))}
    env.update({"HOME": str(home), ENV_VOLUME_PATH: str(tmp_path / "not-mounted"), "HF_HUB_OFFLINE": "1",
                ENV_BAKED_MODEL_DIR: str(tmp_path / "baked"), "PYTHONPATH": str(REPO)})
    proc = subprocess.run([sys.executable, "-m", "f5worker.preload", "--volume", "--no-asr"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(tmp_path / "not-mounted") in lines[0]
    assert f"{ENV_VOLUME_PATH}={POD_VOLUME_PATH}" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"] and not any(home.iterdir())



def test_preload_asks_room_only_for_what_its_cache_lacks_and_reads_a_local_whisper_folder(env, monkeypatch,
                                                                                        tiny_whisper):
    """A volume holding every file, with 3 GB free: a preload run again was refused for want of
    3.36 GB (it counted the files it already had), and with ASR_MODEL a local folder it ended in
    a traceback (the folder passed to the hub as a repo id) after fetching the rest."""
    from f5worker import preload

    settings = Settings.from_env({**env, "ASR_MODEL": str(tiny_whisper)})
    fill(settings.hub_cache)
    real = shutil.disk_usage  # a full volume cannot be made here: disk_usage stands in for one
    monkeypatch.setattr(model_store.shutil, "disk_usage", lambda p: real(p)._replace(free=3_000_000_000))
    paths = preload.preload(settings.hub_cache, settings)
    assert sorted(paths) == sorted(fill(settings.hub_cache).values())  # the cached files; no Whisper fetched
    monkeypatch.setattr(model_store.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000_000))
    for hub_file in VOCODER_HUB_FILES:  # one set missing: room for it alone is asked
        (settings.hub_cache / f"models--{hub_file.repo.replace('/', '--')}" / "snapshots" / REVISION /
         hub_file.filename).unlink()
    with pytest.raises(StorageError, match=r"has 0\.10 GB free but downloading the missing models needs about "
                                           r"0\.[0-9]+ GB"):
        preload.preload(settings.hub_cache, settings)


def test_preload_out_of_room_is_one_sentence(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    volume = tmp_path / "volume"
    (volume / "models").mkdir(parents=True)
    (volume / "models" / "hub").write_text("a file where the cache folder goes")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("F5_", "RUNPOD_", "HF_", "TORCH_"))}
    env.update({"HOME": str(home), ENV_VOLUME_PATH: str(volume), "HF_HUB_OFFLINE": "1",
                ENV_BAKED_MODEL_DIR: str(tmp_path / "baked"), "PYTHONPATH": str(REPO)})
    proc = subprocess.run([sys.executable, "-m", "f5worker.preload", "--volume", "--no-asr"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot be used" in proc.stderr and len(proc.stderr.strip().splitlines()) == 2, proc.stderr

# --- RunPod's cached models (<volume>/huggingface-cache/hub) -------------------------------------

def tiny_set(tiny_models) -> dict:
    """The bytes of a tiny random model set, by the hub file each stands in for."""
    vocoder = Path(tiny_models["F5_VOCODER_DIR"])
    sources = [tiny_models["F5_CKPT_FILE"], tiny_models["F5_VOCAB_FILE"]] + [vocoder / f.filename
                                                                              for f in VOCODER_HUB_FILES]
    return {f: Path(src).read_bytes() for f, src in zip(F5_FILES + VOCODER_HUB_FILES, sources)}


def put_snapshot(cache: Path, files: dict, revision: str, *, ref: bool = True, mtime: float | None = None) -> Path:
    """``files`` (hub file -> bytes, one repo) as snapshot ``revision``; with ``ref``, refs/main names it."""
    (repo,) = {f.repo for f in files}
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    for hub_file, data in files.items():
        (snapshot / hub_file.filename).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / hub_file.filename).write_bytes(data)
    if ref:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(revision)
    if mtime is not None:
        os.utime(snapshot, (mtime, mtime))
    return snapshot


def test_runpod_cached_models_come_after_explicit_files_and_before_the_volume_cache(env, tiny_models):
    settings = Settings.from_env(env)
    assert settings.runpod_model_cache == Path(env["RUNPOD_VOLUME_PATH"]) / "huggingface-cache" / "hub"
    data = tiny_set(tiny_models)
    f5_only = {f: data[f] for f in F5_FILES}
    fill(settings.hub_cache)  # everything on the volume cache
    cached = put_snapshot(settings.runpod_model_cache, f5_only, REVISION)  # RunPod caches one model only
    files = resolve_tts_files(settings)
    assert files.ckpt == cached / F5_FILES[0].filename and files.ckpt.read_bytes() == data[F5_FILES[0]]
    assert files.sources["f5"] == f"RunPod cached models ({settings.runpod_model_cache})"
    assert "volume cache" in files.sources["vocoder"]  # the other sets come from the next cache
    assert resolve_tts_files(Settings.from_env({**env, **tiny_models})).sources["f5"] == "local files"


def test_without_refs_main_the_newest_snapshot_holding_the_whole_set_is_used(env, tiny_models):
    settings = Settings.from_env(env)
    data = tiny_set(tiny_models)
    f5_set = {f: data[f] for f in F5_FILES}
    older = put_snapshot(settings.runpod_model_cache, f5_set, "a" * 40, ref=False, mtime=1_000_000)
    put_snapshot(settings.runpod_model_cache, {F5_FILES[0]: data[F5_FILES[0]]}, "b" * 40, ref=False,
                 mtime=2_000_000)  # newer, but without the vocab
    fill(settings.hub_cache)
    files = resolve_tts_files(settings)
    assert (files.ckpt, files.vocab) == (older / F5_FILES[0].filename, older / F5_FILES[1].filename)
    newer = put_snapshot(settings.runpod_model_cache, f5_set, "c" * 40, ref=False, mtime=3_000_000)
    assert resolve_tts_files(settings).ckpt == newer / F5_FILES[0].filename


def test_with_refs_main_only_that_snapshot_counts(env, tiny_models):
    settings = Settings.from_env(env)
    data = tiny_set(tiny_models)
    put_snapshot(settings.runpod_model_cache, {f: data[f] for f in F5_FILES}, "a" * 40, ref=False)
    put_snapshot(settings.runpod_model_cache, {F5_FILES[0]: data[F5_FILES[0]]}, "b" * 40)  # refs/main: no vocab
    on_volume = fill(settings.hub_cache)
    files = resolve_tts_files(settings)
    assert files.ckpt == on_volume[F5_FILES[0]] and "volume cache" in files.sources["f5"]


def test_the_cached_models_folder_is_searched_and_never_written(env):
    settings = Settings.from_env(env)
    with pytest.raises(StorageError) as err:
        resolve_tts_files(settings)
    assert str(settings.runpod_model_cache) in str(err.value)
    assert not settings.runpod_model_cache.exists()
    assert model_store.cache_dirs(settings)[0] == ("RunPod cached models", settings.runpod_model_cache)


def test_a_model_root_on_the_cached_models_folder_is_searched_once(env):
    root = Path(env["RUNPOD_VOLUME_PATH"]) / "huggingface-cache"
    settings = Settings.from_env({**env, "F5_MODEL_ROOT": str(root)})
    assert settings.hub_cache == settings.runpod_model_cache
    assert [label for label, _ in model_store.cache_dirs(settings)] == ["RunPod cached models", "image copy"]


def test_whisper_from_runpod_cached_models_without_refs_main(env, tiny_whisper):
    settings = Settings.from_env(env)
    repo_dir = settings.runpod_model_cache / f"models--{settings.asr_model.replace('/', '--')}"
    shutil.copytree(tiny_whisper, repo_dir / "snapshots" / REVISION)
    assert model_store.resolve_asr_model(settings, allow_download=False) == repo_dir / "snapshots" / REVISION
