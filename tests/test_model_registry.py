"""Several models in one worker (f5worker.model.registry, inference.models, jobs.models).

Tiny random models of each layout f5-tts's community fine-tunes use, each with a vocabulary of its
own, registered together through ``F5_MODELS`` beside the default (tiny v1, from the single-model
variables): ``de`` on F5TTS_Base's (v0) layout as a ``.pt`` training checkpoint (EMA), ``hi`` on
F5TTS_Small's shape as a ``.pt`` saved without EMA, and ``fr`` (v0) addressed as ``hf://`` and found
in a prepared hub cache (offline: tests never download). Stock f5-tts on the same files is the
reference for every one of them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest

from f5worker.errors import StorageError
from f5worker.inference.batcher import run_whole, whole_calls
from f5worker.inference.engine import TTSEngine
from f5worker.jobs.plan import finish, plan
from f5worker.model.loader import weight_bytes
from f5worker.model.registry import model_registry
from f5worker.model.store import resolve_tts_files
from f5worker.preload import registry_hub_files
from f5worker.settings import ENV_CKPT_FILE, ENV_MODEL_CONFIG, ENV_VOCAB_FILE, ENV_VOCODER_DIR, Settings
from tests.fixtures_worker import worker_ctx
from tests.helpers import CPU_REL_L2, GEN_TEXT, hub_snapshot, load_stock, rel_l2, request, stock_infer
from tests.random_models import (TINY_SMALL_ARCH, TINY_V0_ARCH, write_f5_checkpoint, write_model_config,
                                 write_vocab)

NFE = 6
FR_REPO = "someone/F5-TTS-French-tiny"


def model_files(folder: Path, arch: dict, ckpt_name: str, extra_symbols: str, seed: int, *, ema: bool = True,
                name: str) -> dict[str, str]:
    folder.mkdir(parents=True)
    vocab = write_vocab(folder / "vocab.txt", extra_symbols)
    config = write_model_config(folder / "model.yaml", arch, name=name)
    ckpt = write_f5_checkpoint(folder / ckpt_name, arch, vocab, seed=seed, ema=ema)
    return {"ckpt": str(ckpt), "vocab": str(vocab), "config": str(config)}


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> dict[str, dict[str, str]]:
    folder = tmp_path_factory.mktemp("registry")
    return {
        "de": model_files(folder / "de", TINY_V0_ARCH, "model_f5tts_german.pt", "ẞĳ", 1, name="F5TTS_Base_de"),
        "hi": model_files(folder / "hi", TINY_SMALL_ARCH, "model_2500000.pt", "नमस्ते", 2, ema=False,
                          name="F5TTS_Small_hi"),
        "fr": model_files(folder / "fr", TINY_V0_ARCH, "model_last_reduced.safetensors", "çœ", 3,
                          name="F5TTS_Base_fr"),
    }


def models_variable(registered) -> str:
    fr = registered["fr"]
    return json.dumps({
        "de": registered["de"], "hi": registered["hi"],
        "fr": {"ckpt": f"hf://{FR_REPO}/{Path(fr['ckpt']).name}", "vocab": f"hf://{FR_REPO}/vocab.txt",
               "config": fr["config"]},
    })


def stock_env(tiny_models, files: dict[str, str]) -> dict[str, str]:
    return {ENV_CKPT_FILE: files["ckpt"], ENV_VOCAB_FILE: files["vocab"], ENV_MODEL_CONFIG: files["config"],
            ENV_VOCODER_DIR: tiny_models[ENV_VOCODER_DIR]}


@pytest.fixture(scope="module")
def ctx(tiny_models, tiny_whisper, registered, tmp_path_factory):
    with worker_ctx(tiny_models, tiny_whisper, tmp_path_factory.mktemp("models-worker"),
                    extra={"F5_MODELS": models_variable(registered)}) as ctx:
        # fr's files, in the volume's hub cache as huggingface_hub lays them out (after start:
        # a model not loaded at start is resolved on first use)
        snapshot = hub_snapshot(ctx.settings.hub_cache, FR_REPO)
        snapshot.mkdir(parents=True)
        for part in ("ckpt", "vocab"):
            shutil.copy(registered["fr"][part], snapshot / Path(registered["fr"][part]).name)
        yield ctx


class CallLog:
    """The models of each model call the batcher makes (the real call still runs)."""

    def __init__(self, batcher, monkeypatch):
        self.calls: list[list[str]] = []
        real = run_whole(batcher._start_call)

        def logged(items, abandoned=None):
            self.calls.append([item.model for item in items])
            return real(items, abandoned)
        monkeypatch.setattr(batcher, "_start_call", whole_calls(logged))


def test_registry_has_the_built_ins_the_variable_and_the_default_first(ctx):
    assert list(ctx.worker.models.registry) == ["F5TTS_v1_Base", "F5TTS_Base", "de", "hi", "fr"]
    assert ctx.worker.models.pool.loaded() == ["F5TTS_v1_Base"]  # only the default at start


def test_jobs_of_every_model_in_flight_at_once_each_equal_stock(ctx, registered, tiny_models, monkeypatch, ref_wav):
    names = ["F5TTS_v1_Base", "de", "hi", "fr"]
    envs = {"F5TTS_v1_Base": tiny_models, **{n: stock_env(tiny_models, registered[n]) for n in ("de", "hi", "fr")}}
    expected = {n: stock_infer(load_stock(envs[n], use_ema=n != "hi"), monkeypatch, ref_wav, GEN_TEXT, 5,
                               nfe_step=NFE) for n in names}
    worker = ctx.worker
    log = CallLog(worker.batcher, monkeypatch)

    async def one(name):
        with worker.models.pool.in_use(name):
            await worker.models.ensure_loaded(name)
            job = await asyncio.to_thread(plan, request(ref_wav, GEN_TEXT, 5, nfe_step=NFE, model=name))
            return finish(job, await worker.batcher.submit(job.items))

    async def all_at_once():
        return await asyncio.gather(*(one(name) for name in names))

    waves = dict(zip(names, asyncio.run(all_at_once())))
    for name in names:
        assert rel_l2(waves[name], expected[name]) < CPU_REL_L2, name
    assert rel_l2(waves["de"], expected["fr"]) > 1e-2  # the models differ: the equalities are not trivial
    assert all(len(set(models)) == 1 for models in log.calls)  # models never share a call
    assert {m for models in log.calls for m in models} == set(names)
    assert set(worker.models.pool.loaded()) == set(names)


def test_a_job_names_its_model_and_waits_for_its_first_load(ctx):
    job = {"text": "Guten Tag.", "local_voice": "basic_ref_en.wav", "nfe_step": 4, "seed": 3}
    ctx.worker.models.pool.make_room(10**15, keep="")  # nothing in use: everything unloads
    assert ctx.worker.models.pool.loaded() == []
    _, first = ctx.run({**job, "model": "de"})
    assert "error" not in first, first
    assert first["model"] == "de" and first["timings"]["model_load_s"] > 0
    _, again = ctx.run({**job, "model": "de"})
    assert "model_load_s" not in again["timings"]
    _, default = ctx.run(job)
    assert default["model"] == "F5TTS_v1_Base"


def test_an_unknown_model_is_refused_naming_the_registered_ones(ctx):
    _, result = ctx.run({"text": "Hi.", "local_voice": "basic_ref_en.wav", "model": "klingon"})
    assert result == {"error": "There is no model 'klingon' on this endpoint; it serves F5TTS_v1_Base, F5TTS_Base, "
                               "de, hi, fr."}


def test_list_models_says_each_layout_vocabulary_source_and_whether_loaded(ctx, registered):
    _, result = ctx.run({"endpoint": "list_models"})
    by_name = {m["name"]: m for m in result["models"]}
    assert result["default"] == "F5TTS_v1_Base" and list(by_name) == list(ctx.worker.models.registry)
    sizes = {n: len(Path(registered[n]["vocab"]).read_text(encoding="utf-8").splitlines()) for n in ("de", "hi")}
    packaged = len(Path(ctx.settings.vocab_file).read_text(encoding="utf-8").splitlines())
    assert by_name["de"]["vocab_size"] == sizes["de"] and by_name["hi"]["vocab_size"] == sizes["hi"]
    assert len({packaged, *sizes.values()}) == 3  # each its own
    assert by_name["de"]["layout"] == "F5TTS_Base_de" and by_name["hi"]["layout"] == "F5TTS_Small_hi"
    assert by_name["de"]["source"] == "local files" and by_name["de"]["registered_by"] == "F5_MODELS"
    assert by_name["fr"]["source"].startswith("volume cache") and by_name["fr"]["files"]["ckpt"].startswith("hf://")
    assert by_name["F5TTS_Base"]["vocab_size"] is None  # not cached: never downloaded by a listing
    assert "not available locally" in by_name["F5TTS_Base"]["source"]
    loaded = set(ctx.worker.models.pool.loaded())
    assert {n for n, m in by_name.items() if m["loaded"]} == loaded


def test_least_recently_used_unloads_under_the_budget_never_one_in_use(ctx, caplog):
    pool, models = ctx.worker.models.pool, ctx.worker.models
    for name in ("de", "hi", "fr"):
        asyncio.run(models.ensure_loaded(name))
    sizes = {n: pool.get(n).weight_bytes for n in ("de", "hi", "fr")}
    pool.get("de")  # de is now the most recently used; hi the least
    budget = pool.budget_bytes
    try:
        pool.budget_bytes = pool.held_bytes()  # full: the next load must make room
        pool.unloaded.clear()
        with pool.in_use("hi"):  # a job has hi's chunks queued
            gone = pool.make_room(sizes["fr"], keep="F5TTS_v1_Base")
            assert "hi" not in gone and gone  # the least recently used without work in flight
        assert "hi" in pool.loaded() and not set(gone) & set(pool.loaded())
        pool.budget_bytes = 1
        with pool.in_use("de"), pool.in_use("hi"), caplog.at_level(logging.WARNING, logger="f5worker.inference.models"):
            pool.make_room(sizes["fr"], keep="x")
        assert set(pool.loaded()) == {"de", "hi"}  # in use: kept, over the budget, and said
        assert any("over the" in r.getMessage() for r in caplog.records)
    finally:
        pool.budget_bytes = budget


def test_a_vocabulary_that_does_not_fit_a_registered_model_is_refused_naming_both(registered, tiny_models,
                                                                                   tmp_path):
    wrong = {**registered["de"], "vocab": registered["hi"]["vocab"]}
    settings = Settings.from_env({**tiny_models, "F5_MODELS": json.dumps({"de": wrong})})
    with pytest.raises(StorageError, match=rf"^The vocabulary {wrong['vocab']} has \d+ symbols but the checkpoint "
                                           rf"{wrong['ckpt']} was trained with \d+"):
        TTSEngine.load(resolve_tts_files(settings, model="de"), device="cpu")


@pytest.mark.parametrize("env, sentence", [
    ({"F5_DEFAULT_MODEL": "nope"}, "F5_DEFAULT_MODEL names 'nope', which is not a registered model; the registered "
                                   "ones are F5TTS_v1_Base, F5TTS_Base."),
    ({"F5_PRELOAD_MODELS": "F5TTS_Base, nope"}, "F5_PRELOAD_MODELS names 'nope', which is not a registered model"),
])
def test_names_that_are_not_registered_are_start_errors(env, sentence):
    with pytest.raises(StorageError, match="^" + sentence.replace("(", r"\(").replace(")", r"\)")):
        model_registry(Settings.from_env(env))


@pytest.mark.parametrize("raw, words", [
    ("[1]", "must be a JSON object of model names"),
    ('{"de": {"vocab": "v.txt"}}', "must be an object with \"ckpt\""),
    ('{"de": {"ckpt": "m.pt", "cfg": "x"}}', "has 'cfg', which is not one of ckpt, vocab, config"),
    ('{"../x": {"ckpt": "m.pt"}}', "names a model '../x'"),
])
def test_a_malformed_models_variable_is_refused_naming_it(raw, words):
    with pytest.raises(ValueError, match="^F5_MODELS") as err:
        Settings.from_env({"F5_MODELS": raw})
    assert words in str(err.value)


def test_a_busy_model_does_not_starve_another(ctx, ref_wav, monkeypatch):
    """40 chunks of de queued, then one of hi, then 40 more of de: hi's chunk is sampled as soon as
    the chunks queued before it have been (ceil(40 / 16) calls), never behind the later ones."""
    worker, models = ctx.worker, ctx.worker.models
    for name in ("de", "hi"):
        asyncio.run(models.ensure_loaded(name))
    log = CallLog(worker.batcher, monkeypatch)
    de_item = plan(request(ref_wav, "Guten Tag.", 0, nfe_step=2, model="de")).items[0]
    hi_item = plan(request(ref_wav, "Namaste.", 0, nfe_step=2, model="hi")).items[0]

    async def under_load():
        with models.pool.in_use("de"), models.pool.in_use("hi"):
            before = [worker.batcher.submit([dataclasses.replace(de_item, seed=s)]) for s in range(40)]
            other = worker.batcher.submit([hi_item])
            after = [worker.batcher.submit([dataclasses.replace(de_item, seed=100 + s)]) for s in range(40)]
            await asyncio.gather(*before, other, *after)

    asyncio.run(under_load())
    hi_call = next(i for i, models_of_call in enumerate(log.calls) if "hi" in models_of_call)
    assert log.calls[hi_call] == ["hi"]
    max_items = worker.batcher.max_items
    assert hi_call <= -(-40 // max_items)  # the calls the 40 chunks before it need, and no more
    assert sum(len(c) for c in log.calls[hi_call + 1:]) > 0  # later de chunks were still queued then


def test_preload_fetches_the_required_models_hub_files_only():
    settings = Settings.from_env({"F5_MODELS": json.dumps({
        "de": {"ckpt": "hf://hvoss-techfak/F5-TTS-German/model_f5tts_german.pt",
               "vocab": "hf://hvoss-techfak/F5-TTS-German/vocab.txt", "config": "F5TTS_Base"},
        "mine": {"ckpt": "/models/mine.safetensors"}})})
    fetched = {(f.repo, f.filename) for f in registry_hub_files(settings)}
    assert ("hvoss-techfak/F5-TTS-German", "model_f5tts_german.pt") in fetched
    assert ("hvoss-techfak/F5-TTS-German", "vocab.txt") in fetched
    assert ("SWivid/F5-TTS", "F5TTS_v1_Base/model_1250000.safetensors") in fetched  # the default
    assert not any(name.startswith("F5TTS_Base/") for _, name in fetched)  # a built-in no one asked for
    assert ("charactr/vocos-mel-24khz", "config.yaml") in fetched
    with_base = Settings.from_env({"F5_PRELOAD_MODELS": "F5TTS_Base"})
    assert ("SWivid/F5-TTS", "F5TTS_Base/model_1200000.safetensors") in {
        (f.repo, f.filename) for f in registry_hub_files(with_base)}


def test_preloaded_models_load_at_start_and_the_default_may_be_a_registered_one(tiny_models, tiny_whisper,
                                                                                 registered, tmp_path):
    models = json.dumps({"de": registered["de"], "hi": registered["hi"]})
    unset_single_model = {ENV_CKPT_FILE: "", ENV_VOCAB_FILE: "", ENV_MODEL_CONFIG: ""}  # else they are de's files
    with worker_ctx(tiny_models, tiny_whisper, tmp_path, extra={"F5_MODELS": models, "F5_PRELOAD_MODELS": "hi",
                                                                "F5_DEFAULT_MODEL": "de", **unset_single_model}) as ctx:
        assert ctx.worker.models.pool.loaded() == ["de", "hi"]
        de_vocab = Path(registered["de"]["vocab"]).read_text(encoding="utf-8").splitlines()
        assert len(ctx.worker.engine.model.vocab_char_map) == len(de_vocab)  # de's own files
        _, result = ctx.run({"text": "Hallo.", "local_voice": "basic_ref_en.wav", "nfe_step": 2})
        assert result["model"] == "de" and "model_load_s" not in result["timings"]


def test_a_job_for_a_model_past_the_budget_unloads_the_least_recently_used(ctx):
    pool, models = ctx.worker.models.pool, ctx.worker.models
    for name in ("de", "fr"):
        asyncio.run(models.ensure_loaded(name))
    pool.make_room(10**15, keep="fr")  # only fr left
    asyncio.run(models.ensure_loaded("de"))  # fr, then de: fr is the least recently used
    budget = pool.budget_bytes
    try:
        hi = resolve_tts_files(ctx.settings, model="hi")
        hi_bytes = weight_bytes(hi.model_config, hi.vocab, pool.dtype)
        # full: hi fits once fr, and only fr, is unloaded
        pool.budget_bytes = pool.held_bytes() - pool.get("fr").weight_bytes + hi_bytes
        pool.get("de")
        pool.unloaded.clear()
        _, result = ctx.run({"text": "Namaste.", "local_voice": "basic_ref_en.wav", "nfe_step": 2, "model": "hi"})
        assert "error" not in result, result
        assert result["timings"]["model_load_s"] > 0
        assert pool.unloaded == ["fr"] and pool.loaded() == ["de", "hi"]
    finally:
        pool.budget_bytes = budget
