"""Model files that cannot load, or would load into trouble, against the worker's real loading code.

Each case is one a community fine-tune's files (or a volume shared with others) can bring: a vocab
with a repeated line, a config that overstates its model or makes another mel, a damaged or
oddly named checkpoint, a malformed hf:// address, a training checkpoint with its optimizer state,
a load cut short by its job's cancellation. Each is refused in one sentence that names the file or
setting, or served correctly, and none costs the models already loaded their places.
"""
from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from f5worker.errors import StorageError
from f5worker.inference.models import ModelPool
from f5worker.jobs.guard import stuck_at
from f5worker.model import loader
from f5worker.model.loader import check_model_checkpoint, read_servable_config, read_state_dict
from f5worker.model.registry import model_registry
from f5worker.model.store import ensure_free_space, resolve_tts_files
from f5worker.model.text_tokens import load_vocab, symbols_to_ids, text_to_symbols
from f5worker.preload import registry_hub_files
from f5worker.settings import Settings
from tests.fixtures_worker import worker_ctx
from tests.helpers import hub_snapshot
from tests.processes import REPO
from tests.random_models import (TINY_ARCH, packaged_arch, packaged_vocab, write_f5_checkpoint, write_model_config,
                                 write_vocab)

JOB = {"local_voice": "basic_ref_en.wav", "nfe_step": 2, "seed": 1}


def model_files(folder: Path, *, vocab_lines: list[str] | None = None, config_arch: dict | None = None,
                mel: dict | None = None, ckpt_name: str = "model.safetensors") -> dict[str, str]:
    """A tiny model's files; ``config_arch`` gives its config another layout than its checkpoint's."""
    folder.mkdir(parents=True, exist_ok=True)
    if vocab_lines is None:
        vocab = write_vocab(folder / "vocab.txt", "ẞ")
    else:
        vocab = folder / "vocab.txt"
        vocab.write_text("".join(f"{line}\n" for line in vocab_lines), encoding="utf-8")
    ckpt = write_f5_checkpoint(folder / ckpt_name, TINY_ARCH, vocab, seed=4)  # through f5-tts's own tokenizer
    config = write_model_config(folder / "model.yaml", config_arch or TINY_ARCH, name="F5TTS_odd")
    if mel:
        cfg = yaml.safe_load(config.read_text())
        cfg["model"]["mel_spec"].update(mel)
        config.write_text(yaml.safe_dump(cfg))
    return {"ckpt": str(ckpt), "vocab": str(vocab), "config": str(config)}


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> dict[str, dict[str, str]]:
    folder = tmp_path_factory.mktemp("odd-models")
    lines = packaged_vocab().read_text(encoding="utf-8").splitlines()
    assert "a" in lines and "ẞ" not in lines
    return {
        "repeats": model_files(folder / "repeats", vocab_lines=[*lines, "a", "ẞ"]),  # 'a' twice: ẞ is line n+1
        "overstated": model_files(folder / "overstated", config_arch=packaged_arch("F5TTS_v1_Base")),
        "bigvgan": model_files(folder / "bigvgan", mel={"mel_spec_type": "bigvgan"}),
        "upper": model_files(folder / "upper", ckpt_name="model.SAFETENSORS"),
        "cut": model_files(folder / "cut"),
    }


@pytest.fixture(scope="module")
def ctx(tiny_models, tiny_whisper, odd, tmp_path_factory):
    cut = Path(odd["cut"]["ckpt"])
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a download that stopped half way
    with worker_ctx(tiny_models, tiny_whisper, tmp_path_factory.mktemp("odd-worker"),
                    extra={"F5_MODELS": json.dumps(odd)}) as ctx:
        yield ctx


def test_a_vocabulary_with_a_repeated_line_speaks_every_symbol_inside_its_embedding(ctx, odd):
    """f5-tts keeps a repeated line's last index, so the last line's id is one past the embedding
    f5-tts builds: a job saying that symbol failed its model call (on a GPU, a device-side assert)."""
    vocab = load_vocab(odd["repeats"]["vocab"])
    lines = Path(odd["repeats"]["vocab"]).read_text(encoding="utf-8").splitlines()
    assert len(vocab) == len(lines) - 1 and vocab["ẞ"] == 0  # unknown, as f5-tts's training saw it
    assert max(vocab.values()) < len(vocab)
    check_model_checkpoint(*(Path(odd["repeats"][k]) for k in ("ckpt", "config", "vocab")))
    _, result = ctx.run({**JOB, "text": "Straße ẞ.", "model": "repeats"})
    assert "error" not in result, result
    ids = symbols_to_ids([text_to_symbols("Straße ẞ.")], ctx.worker.models.pool.get("repeats").model.vocab_char_map)
    rows = ctx.worker.models.pool.get("repeats").model.transformer.text_embed.text_embed.num_embeddings
    assert int(ids.max()) + 1 < rows  # the embedding shifts ids by one (row 0 is the filler)


def test_a_config_that_overstates_its_model_neither_allocates_it_nor_unloads_the_others(ctx, monkeypatch):
    pool = ctx.worker.models.pool
    before = pool.loaded()
    pool.unloaded.clear()
    devices = []
    real = loader.build_model

    def recorded(model_cfg, vocab):  # the real build, and the device it was asked for
        devices.append(torch.get_default_device().type)
        return real(model_cfg, vocab)
    monkeypatch.setattr(loader, "build_model", recorded)
    budget = pool.budget_bytes
    try:
        pool.budget_bytes = pool.held_bytes() + 1  # full: a 337 M-parameter model would need room
        _, result = ctx.run({**JOB, "text": "Hello.", "model": "overstated"})
    finally:
        pool.budget_bytes = budget
    assert result["error"].startswith(f"The checkpoint {ctx.worker.models.registry['overstated'].ckpt} does not fit")
    assert devices and set(devices) == {"meta"}  # shapes only: nothing the size of the claim was built
    assert pool.unloaded == [] and pool.loaded() == before


def test_a_config_of_another_mel_is_refused_not_served_as_noise(ctx, odd):
    """A BigVGAN-mel model on the shared Vocos decodes to noise: stock f5-tts would have built it."""
    config = odd["bigvgan"]["config"]
    sentence = (f"The model config {config} makes another mel than the worker's Vocos decodes (mel_spec_type: "
                "'bigvgan'); only vocos mels of 24 kHz, 100 bands and hop 256 are served.")
    _, result = ctx.run({**JOB, "text": "Hello.", "model": "bigvgan"})
    assert result == {"error": sentence}
    with pytest.raises(StorageError, match="makes another mel"):
        read_servable_config(Path(config))


def test_a_checkpoint_named_in_capitals_loads_and_a_cut_one_is_named(ctx, odd):
    _, upper = ctx.run({**JOB, "text": "Hello.", "model": "upper"})
    assert "error" not in upper, upper
    _, cut = ctx.run({**JOB, "text": "Hello.", "model": "cut"})
    assert cut == {"error": f"The checkpoint {odd['cut']['ckpt']} could not be read (SafetensorError)."}
    with pytest.raises(StorageError, match="could not be read"):
        check_model_checkpoint(*(Path(odd["cut"][k]) for k in ("ckpt", "config", "vocab")))


def test_a_load_outlasts_its_cancelled_job_so_a_model_loads_once(ctx, monkeypatch):
    """A job cancelled (its deadline, a client gone) while its model loads released the one-load
    lock: the next job loaded the same model again beside it. The slow load is a stand-in for a
    slow disk, which the test cannot make (the real load runs after the pause)."""
    models = ctx.worker.models
    models.pool.make_room(10**15, keep=models.pool.default)  # only the default stays
    loads, real = [], models._load_engine

    def slow_load(files):
        loads.append(files.model)
        time.sleep(0.8)
        return real(files)
    monkeypatch.setattr(models, "_load_engine", slow_load)

    async def cancelled_then_asked_again():
        first = asyncio.ensure_future(models.ensure_loaded("upper"))
        while not loads:
            await asyncio.sleep(0.01)
        assert stuck_at(first) == "JobModels._load_and_add"  # what a deadline's sentence names
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await models.ensure_loaded("upper")

    asyncio.run(cancelled_then_asked_again())
    assert loads == ["upper"] and "upper" in models.pool.loaded()


@pytest.mark.parametrize("address, part", [
    ("hf://hvoss-techfak/F5-TTS-German@main/model.pt", "ckpt"),
    ("hf://owner/a repo/model.pt", "ckpt"),
    ("hf://owner/repo/../../outside.txt", "vocab"),
    ("hf://owner/repo", "config"),
])
def test_a_malformed_hf_address_is_a_start_error_naming_its_setting(address, part):
    files = {"ckpt": "/m/model.pt", part: address}
    settings = Settings.from_env({"F5_MODELS": json.dumps({"x": files})})
    with pytest.raises(StorageError) as err:
        model_registry(settings)
    assert str(err.value).startswith(f"F5_MODELS' model 'x' {part}: {address!r} is not an hf://owner/repo/path")


def test_a_config_addressed_on_the_hub_is_found_in_the_cache_and_preloaded(tiny_models, tmp_path):
    env = {**tiny_models, "F5_MODEL_ROOT": str(tmp_path / "models"),
           "F5_MODELS": json.dumps({"x": {"ckpt": "hf://someone/tiny/model.safetensors",
                                          "vocab": "hf://someone/tiny/vocab.txt",
                                          "config": "hf://someone/tiny/model.yaml"}})}
    settings = Settings.from_env(env)
    snapshot = hub_snapshot(settings.hub_cache, "someone/tiny")
    snapshot.mkdir(parents=True)
    for name, source in (("model.safetensors", "F5_CKPT_FILE"), ("vocab.txt", "F5_VOCAB_FILE"),
                         ("model.yaml", "F5_MODEL_CONFIG")):
        (snapshot / name).write_bytes(Path(tiny_models[source]).read_bytes())
    files = resolve_tts_files(settings, allow_download=False, model="x")
    assert files.model_config == snapshot / "model.yaml"
    assert ("someone/tiny", "model.yaml") in {(f.repo, f.filename) for f in registry_hub_files(settings)}


def test_a_model_cache_that_cannot_be_written_is_said_in_a_sentence(tmp_path):
    (tmp_path / "volume").write_text("a file where the cache's folder should be")
    with pytest.raises(StorageError, match=r"^The model cache at .* cannot be used \(.*\), so no model can be "):
        ensure_free_space(tmp_path / "volume" / "hub", 1)


RSS_PROBE = """
import resource, sys
from pathlib import Path
from f5worker.model.loader import read_state_dict
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
state = read_state_dict(Path(sys.argv[1]))
print(len(state), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_training_checkpoint_brings_only_its_ema_weights_into_memory(tiny_models, tmp_path):
    """A .pt training checkpoint holds optimizer state and trained weights beside the EMA ones
    (about three times their size for a Base), and was read whole (onto the device). Read here on
    the CPU, where only what the reader touches becomes resident: the EMA weights, then moved to
    the device one by one, not the 256 MiB of optimizer state."""
    ema = load_file(tiny_models["F5_CKPT_FILE"])
    optimizer = {"state": {0: {"exp_avg": torch.ones(64, 2**20)}}}  # 256 MiB the worker never uses
    ckpt = tmp_path / "model_1200000.pt"
    torch.save({"ema_model_state_dict": {"ema_model." + k: v for k, v in ema.items()}, "optimizer_state_dict": optimizer},
               str(ckpt))
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, str(ckpt)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    tensors, grown_mib = map(int, done.stdout.split())
    assert tensors == len(read_state_dict(ckpt)) == len(ema)
    assert grown_mib < 64, f"reading the checkpoint grew the peak resident memory by {grown_mib} MiB"


def test_the_budget_warning_says_why_it_is_exceeded(caplog):
    class Engine:  # what the pool reads of an engine: its size (the accounting is all this tests)
        vocoder = device = dtype = None
        weight_bytes = 10

    pool = ModelPool("a", Engine(), budget_bytes=100)
    with caplog.at_level(logging.WARNING, logger="f5worker.inference.models"):
        pool.make_room(1000, keep="b")
    assert pool.loaded() == [] and "larger than the budget by itself" in caplog.text
    pool.add("a", Engine())
    caplog.clear()
    with pool.in_use("a"), caplog.at_level(logging.WARNING, logger="f5worker.inference.models"):
        pool.make_room(1000, keep="b")
    assert pool.loaded() == ["a"] and "a still has work in flight" in caplog.text
