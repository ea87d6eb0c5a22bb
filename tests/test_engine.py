"""The worker's inference computes what stock f5-tts computes, batched or not."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from f5worker.jobs import plan as job_plan
from f5worker.jobs import audio
from f5worker.jobs.chunking import chunk_text
from f5worker.inference.engine import TTSEngine
from f5worker.inference.items import item_frames
from f5worker.jobs.plan import MAX_CHUNK_FRAMES
from f5worker.model.store import resolve_tts_files
from f5worker.settings import Settings
from tests.fixtures_models import SR, speechlike
from tests.helpers import CPU_REL_L2, GEN_TEXT, load_stock, rel_l2, request, stock_infer, trained_like_text_grn
from tests.random_models import TINY_V0_ARCH, write_model_set


@pytest.fixture(scope="module", params=["eager", "fast"])
def engine(request, tiny_models):
    """Both inference paths: f5-tts's own DiT forward, and the bucketed fast path (run eagerly on
    the CPU: the same arithmetic the GPU replays from CUDA graphs)."""
    return TTSEngine.load(resolve_tts_files(Settings.from_env(tiny_models)), device="cpu",
                          fast=request.param == "fast")


@pytest.fixture(scope="module")
def stock(tiny_models):
    return load_stock(tiny_models)


def test_waveform_equals_stock_f5tts(engine, stock, monkeypatch, ref_wav):
    for nfe, seed in ((8, 7), (16, 123)):
        expected = stock_infer(stock, monkeypatch, ref_wav, GEN_TEXT, seed, nfe_step=nfe)
        got = job_plan.synthesize(engine, request(ref_wav, GEN_TEXT, seed, nfe_step=nfe))
        assert rel_l2(got, expected) < CPU_REL_L2
    # and the seed matters (the comparison above is not trivially true)
    other = job_plan.synthesize(engine, request(ref_wav, GEN_TEXT, 8, nfe_step=8))
    assert rel_l2(other, stock_infer(stock, monkeypatch, ref_wav, GEN_TEXT, 7, nfe_step=8)) > 1e-2


def test_options_follow_stock(engine, stock, monkeypatch, ref_wav):
    kw = dict(nfe_step=6, speed=1.4, cfg_strength=1.5, sway_sampling_coef=-0.5)
    expected = stock_infer(stock, monkeypatch, ref_wav, GEN_TEXT, 3, **kw)
    assert rel_l2(job_plan.synthesize(engine, request(ref_wav, GEN_TEXT, 3, **kw)), expected) < CPU_REL_L2


def test_batched_items_equal_items_alone(engine, ref_wav):
    plans = [job_plan.plan(request(ref_wav, text, seed, nfe_step=6)) for text, seed in
             (("Short one.", 1), (GEN_TEXT + " And a much longer second sentence follows it.", 2), (GEN_TEXT, 3))]
    items = [item for plan in plans for item in plan.items]
    assert len({item.duration for item in items}) == len(items)  # different lengths, so padding is used
    together = engine.run_items(items)
    for item, wave in zip(items, together):
        alone = engine.run_items([item])[0]
        assert rel_l2(wave, alone) < CPU_REL_L2



@pytest.mark.parametrize("layout", ["F5TTS_Base", "stock_fallback"])
@pytest.mark.parametrize("fast", [False, True])
def test_batched_items_equal_items_alone_in_every_layout(layout, fast, tmp_path, ref_wav):
    """F5TTS_Base's layout (four unmasked text blocks) and one only stock's classes run (qk-norm), with
    text GRN weights of a trained model's size: a short item batched beside a long one differed from
    itself alone by 7e-3 (the text embedding ran at the batch's length)."""
    arch = (dict(TINY_V0_ARCH, conv_layers=4) if layout == "F5TTS_Base"
            else dict(TINY_V0_ARCH, conv_layers=4, qk_norm="rms_norm"))
    engine = TTSEngine.load(resolve_tts_files(Settings.from_env(write_model_set(tmp_path, arch=arch))),
                            device="cpu", fast=fast)
    trained_like_text_grn(engine.model.transformer)
    short, long_ = (job_plan.plan(request(ref_wav, text, seed, nfe_step=6)).items[0] for text, seed in
                    (("Short one here.", 1), (GEN_TEXT + " And a longer second sentence.", 2)))
    assert long_.duration > 2 * short.duration
    alone = engine.run_items([short])[0]
    assert rel_l2(engine.run_items([short, long_])[0], alone) < CPU_REL_L2

def test_a_call_set_aside_between_steps_gives_its_result_alone(engine, ref_wav):
    """A call stopped after a step while another runs (the batcher's preemption) and taken up again:
    the same waves as run whole. One call is a padded batch and one is not, so the DiT's cache and
    attention mask are switched between them."""
    alone_items = job_plan.plan(request(ref_wav, GEN_TEXT, 1, nfe_step=6)).items[:1]
    batch_items = [job_plan.plan(request(ref_wav, text, seed, nfe_step=6)).items[0]
                   for text, seed in (("Short one.", 2), (GEN_TEXT[:60], 3))]
    expected = engine.run_items(alone_items) + engine.run_items(batch_items)
    alone, batch = engine.start_call(alone_items), engine.start_call(batch_items)
    assert alone.advance(lambda: True) is None and batch.advance(lambda: True) is None
    assert alone.advance(lambda: True) is None and (alone.steps_left, batch.steps_left) == (4, 5)
    got = batch.advance(lambda: False)
    got = alone.advance(lambda: False) + got
    assert len(got) == 3 and all(np.array_equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("text,max_chars", [
    ("Hello world.", 135),
    ("One. Two, three; four: five! Six? " * 12, 60),
    ("你好，世界。今天天气很好！我们去公园吧？", 20),
    ("No punctuation at all " * 20, 50),
    ("", 100),
])
def test_chunk_text_matches_f5tts(text, max_chars):
    from f5_tts.infer.utils_infer import chunk_text as stock_chunk_text

    assert chunk_text(text, max_chars) == stock_chunk_text(text, max_chars)


def test_long_text_is_chunked_and_cross_faded(engine, ref_wav):
    long_text = " ".join(f"Sentence number {i} is here to make the text long." for i in range(12))
    plan = job_plan.plan(request(ref_wav, long_text, 5, nfe_step=2))
    assert len(plan.items) > 1
    waves = engine.run_items(plan.items)
    joined = job_plan.finish(plan, waves)
    fade = int(0.15 * SR)
    assert len(joined) == sum(len(w) for w in waves) - fade * (len(waves) - 1)


def stock_reference(path: Path) -> np.ndarray:
    """The reference as f5-tts's preprocess_ref_audio_text (pydub) prepares it."""
    from f5_tts.infer import utils_infer

    ref_file, _ = utils_infer.preprocess_ref_audio_text(str(path), "x.", show_info=lambda *_: None)
    expected, _ = sf.read(ref_file, dtype="float32")
    Path(ref_file).unlink()
    utils_infer._ref_audio_cache.clear()  # it maps the audio's hash to the file just removed
    return expected


def test_reference_trim_matches_pydub(tmp_path):
    clip = speechlike(2.0, lead_silence=0.4, tail_silence=0.7)
    path = tmp_path / "edges.wav"
    sf.write(str(path), clip, SR, subtype="PCM_16")
    expected = stock_reference(path)
    got = audio.prepare_reference(clip, SR)
    speech = int(2.0 * SR)
    assert len(got) < len(clip)  # the edges really were trimmed
    assert np.array_equal(got[:speech], expected[:speech])
    # then 50 ms of silence; pydub builds it at 11025 Hz and resamples, landing a sample or two short
    assert not got[speech:].any() and not expected[speech:].any()
    assert abs(len(got) - len(expected)) <= SR // 2000


def test_long_reference_is_cut_like_pydub(tmp_path):
    """Over 12 s: cut at pauses, the kept silence split at each pause's middle (no repeated audio)."""
    parts = []
    for i, pause in enumerate([0.3, 0.25, 1.3, 0.4, 0.3, 0.35, 0.3, 0.5]):
        parts += [speechlike(2.2, seed=i), np.zeros(int(pause * SR), dtype=np.float32)]
    clip = np.concatenate(parts)
    assert len(clip) / SR > 12
    path = tmp_path / "long.wav"
    sf.write(str(path), clip, SR, subtype="PCM_16")
    expected = stock_reference(path)
    got = audio.prepare_reference(clip, SR)
    assert len(got) <= 12.05 * SR
    # pydub finds pauses with a sliding window, this with 10 ms chunks: cuts may differ by a pause
    assert abs(len(got) - len(expected)) / SR < 0.5, (len(got) / SR, len(expected) / SR)


def test_split_on_silence_never_repeats_audio():
    clip = np.concatenate([speechlike(1.5, seed=1), np.zeros(int(0.3 * SR), dtype=np.float32),
                           speechlike(1.5, seed=2), np.zeros(int(1.2 * SR), dtype=np.float32), speechlike(1.0, seed=3)])
    for min_silence_ms, threshold in ((1000, -50.0), (100, -40.0)):
        pieces = audio.split_on_silence(clip, SR, min_silence_ms, threshold, keep_ms=1000)
        assert len(pieces) >= 2
        # every pause is shorter than twice the kept silence: the pieces tile the clip exactly
        assert np.array_equal(np.concatenate(pieces), clip)


@pytest.mark.parametrize("text", [
    "word " * 300,
    "汉" * 2000,  # Chinese with no punctuation
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ" * 13,  # Thai: no spaces between words
    "a" * 1000,
    "👩‍👩‍👧‍👦" * 250,  # one grapheme of 25 bytes, repeated
])
def test_any_text_is_planned_within_the_model_limit(engine, ref_wav, text):
    """Text f5-tts would keep as one overlong chunk is split, and no item exceeds the frames the
    model takes at once: the check runs before anything reaches the model."""
    plan = job_plan.plan(request(ref_wav, text, 1, nfe_step=2))
    assert len(plan.items) > 1
    assert max(item_frames(item) for item in plan.items) <= MAX_CHUNK_FRAMES


def test_unspeakable_text_is_refused_before_the_model(engine, ref_wav):
    """A grapheme that cannot be cut, too long to speak at this voice's pace (a 3 s voice whose
    transcript is one letter, at the slowest speed): refused with a sentence, not a model error."""
    from f5worker.errors import InputError

    req = request(ref_wav, "👩‍👩‍👧‍👦", 1, nfe_step=2, speed=0.3)
    req.ref_text = "A"
    with pytest.raises(InputError, match="cannot be cut into pieces"):
        job_plan.plan(req)


def test_the_longest_item_has_a_single_job_graph_bucket():
    from f5worker.inference.fast import SINGLE_MAX_FRAMES, bucket_frames

    assert bucket_frames(MAX_CHUNK_FRAMES, 1) <= SINGLE_MAX_FRAMES
