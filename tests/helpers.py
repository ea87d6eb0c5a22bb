"""What several test modules use: references, sample inputs, checks. Fixtures live in ``fixtures_*``.

Sections: stock f5-tts as the reference; a tiny DiT and a sample for it; damaged checkpoints; the
Dockerfile read as instructions; settings (a Whisper folder, every number at and past its bound);
checks of results and records; the streaming handler with what it reported.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shlex
import shutil
import uuid
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from f5worker.env_values import Number
from f5worker.inference import fast
from f5worker.jobs import audio
from f5worker.jobs.plan import SynthesisRequest
from f5worker.model.dit import DiT
from f5worker.service import make_handler
from f5worker.settings import (ENV_ASR_MODEL, ENV_BAKED_MODEL_DIR, ENV_CKPT_FILE, ENV_VOCODER_DIR, ENV_VOLUME_PATH,
                               VARS, Settings)
from tests.fixtures_worker import Ctx
from tests.processes import REPO
from tests.random_models import TINY_ARCH

# --- stock f5-tts, the reference ------------------------------------------------------------------

REF_TEXT = "This is a reference."


GEN_TEXT = "Hello there, this is a test of the worker."


# CPU fp32 on the same weights: the only differences are summation order (batched matmuls, masked
# vs unmasked attention). fp16 on a GPU is held to a looser bound in the GPU tests.
CPU_REL_L2 = 1e-4


def _float64(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| for arrays or tensors of one shape, both finite."""
    a, b = _float64(a), _float64(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def load_stock(tiny_models: dict[str, str], use_ema: bool = True):
    """Stock f5-tts loading: utils_infer.load_model + load_vocoder, on the same files (``use_ema``
    False for a training checkpoint saved without EMA, as f5-tts's CLI's --no_ema loads it)."""
    import yaml
    from f5_tts.infer import utils_infer
    from f5_tts.model import DiT

    arch = yaml.safe_load(Path(tiny_models["F5_MODEL_CONFIG"]).read_text())["model"]["arch"]
    model = utils_infer.load_model(DiT, arch, tiny_models["F5_CKPT_FILE"], vocab_file=tiny_models["F5_VOCAB_FILE"],
                                   device="cpu", use_ema=use_ema)
    vocoder = utils_infer.load_vocoder("vocos", is_local=True, local_path=tiny_models["F5_VOCODER_DIR"], device="cpu")
    return utils_infer, model, vocoder


def stock_infer(stock, monkeypatch, ref_wav, gen_text, seed, device="cpu", **kw):
    """The path F5TTS.infer takes: preprocess_ref_audio_text, seed_everything, infer_process."""
    from f5_tts.model.utils import seed_everything

    utils_infer, model, vocoder = stock
    # torchaudio 2.9 decodes through torchcodec + FFmpeg, which the worker does not ship; this reads
    # the same PCM file with soundfile instead (a stand-in for the decoder only, not for inference).
    monkeypatch.setattr(utils_infer.torchaudio, "load",
                        lambda p: (torch.from_numpy(sf.read(p, dtype="float32", always_2d=True)[0].T.copy()),
                                   sf.info(p).samplerate))
    ref_file, ref_text = utils_infer.preprocess_ref_audio_text(str(ref_wav), REF_TEXT, show_info=lambda *_: None)
    seed_everything(seed)
    wave, sr, _ = utils_infer.infer_process(ref_file, ref_text, gen_text, model, vocoder, show_info=lambda *_: None,
                                            progress=None, device=device, **kw)
    Path(ref_file).unlink()
    utils_infer._ref_audio_cache.clear()  # it maps the audio's hash to the file just removed
    return wave


def request(ref_wav: Path, gen_text: str, seed: int, **kw) -> SynthesisRequest:
    samples, sr = audio.decode(ref_wav)
    return SynthesisRequest(ref_audio=samples, ref_sr=sr, ref_text=REF_TEXT, gen_text=gen_text, seed=seed, **kw)


# --- a tiny DiT and a sample to integrate -----------------------------------------------------------

VOCAB, MEL = 40, 100


def trained_like_text_grn(*models, scale: float = 0.3) -> None:
    """The text blocks' GRN weights at a trained model's size (random ones stay near 0.02, under
    which a row's dependence on the padding beside it hardly shows)."""
    for model in models:
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for block in getattr(model.text_embed, "text_blocks", []):
                block.grn.gamma.copy_(torch.randn(block.grn.gamma.shape, generator=gen) * scale)
                block.grn.beta.copy_(torch.randn(block.grn.beta.shape, generator=gen) * scale)


def tiny_dit(seed: int = 0, arch: dict | None = None) -> DiT:
    torch.manual_seed(seed)
    model = DiT(**(arch or TINY_ARCH), text_num_embeds=VOCAB, mel_dim=MEL).eval()
    with torch.no_grad():  # DiT zero-initialises its modulation and output: every layer must show
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    fast.install_fused_attention(model)
    return model


def sample(lengths: list[int], frames: int | None = None, seed: int = 1):
    """(y, step_cond, text, mask or None, t): noise, a reference prefix, text with batch padding."""
    frames = frames or max(lengths)
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    y = torch.randn(batch, frames, MEL, generator=gen)
    mask = torch.arange(frames)[None] < torch.tensor(lengths)[:, None]
    step_cond = torch.randn(batch, frames, MEL, generator=gen) * (torch.arange(frames)[None, :, None] < 4)
    text = torch.randint(0, VOCAB, (batch, 9), generator=gen)
    text[1:, 6:] = -1
    return y, step_cond, text, None if mask.all() else mask, torch.linspace(0, 1, 3)


# --- checkpoints damaged one way each -----------------------------------------------------------------

TARGET = "transformer.proj_out.weight"  # the tensor each damage touches, by the model's name


RAW_TARGET = "ema_model." + TARGET  # its key in the checkpoint file


VOCOS_TARGET = "backbone.embed.weight"


def renamed_tensor(state: dict) -> str:
    state[RAW_TARGET + "_renamed"] = state.pop(RAW_TARGET)
    return rf"1 tensor missing \({TARGET}\); 1 unexpected tensor \({TARGET}_renamed\)"


def wrong_shape(state: dict) -> str:
    rows, cols = state[RAW_TARGET].shape
    state[RAW_TARGET] = torch.zeros(rows + 1, cols)
    return rf"1 tensor of the wrong shape \({TARGET}: \[{rows + 1}, {cols}\] instead of \[{rows}, {cols}\]\)"


def nan_weight(state: dict) -> str:
    state[RAW_TARGET] = state[RAW_TARGET].clone()
    state[RAW_TARGET].view(-1)[3] = float("nan")
    return rf"non-finite values \(NaN or infinity\) in 1 tensor \({TARGET}\)"


def inf_weight(state: dict) -> str:
    state[RAW_TARGET] = state[RAW_TARGET].clone()
    state[RAW_TARGET].view(-1)[0] = float("-inf")
    return rf"non-finite values \(NaN or infinity\) in 1 tensor \({TARGET}\)"


def extra_tensor(state: dict) -> str:
    state["ema_model.transformer.adapter.weight"] = torch.zeros(4)
    return r"1 unexpected tensor \(transformer.adapter.weight\)"


DAMAGES = [renamed_tensor, wrong_shape, nan_weight, inf_weight, extra_tensor]


def damaged_copy(tiny_models: dict[str, str], folder: Path, damage, suffix: str = ".safetensors"
                 ) -> tuple[dict[str, str], str]:
    """The tiny model set's environment with its checkpoint replaced by a damaged copy in ``folder``
    (as safetensors, or as a .pt training checkpoint); and the pattern the refusal must contain."""
    state = load_file(tiny_models[ENV_CKPT_FILE])
    pattern = damage(state)
    ckpt = folder / f"damaged{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(ckpt))
    else:
        torch.save({"ema_model_state_dict": state}, str(ckpt))
    return {**tiny_models, ENV_CKPT_FILE: str(ckpt)}, pattern


def nan_vocoder(tiny_models: dict[str, str], folder: Path) -> dict[str, str]:
    vocoder = folder / "vocos"
    shutil.copytree(tiny_models[ENV_VOCODER_DIR], vocoder)
    state = torch.load(str(vocoder / "pytorch_model.bin"), weights_only=True)
    state[VOCOS_TARGET].view(-1)[0] = float("nan")
    torch.save(state, str(vocoder / "pytorch_model.bin"))
    return {**tiny_models, ENV_VOCODER_DIR: str(vocoder)}


# --- the Dockerfile -----------------------------------------------------------------------------------

DOCKERFILE = REPO / "Dockerfile.runpod"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def env_values() -> dict[str, str]:
    values = {}
    for word, rest in instructions():
        if word != "ENV":
            continue
        tokens = shlex.split(rest)
        if tokens and "=" not in tokens[0]:  # legacy form: ENV NAME value
            values[tokens[0]] = " ".join(tokens[1:])
            continue
        for token in tokens:
            name, _, value = token.partition("=")
            values[name] = value
    return values


# --- settings -----------------------------------------------------------------------------------------

def whisper_settings(tmp_path, asr_model: str) -> Settings:
    """Settings with ``asr_model`` as the transcriber, a volume in ``tmp_path`` and no baked copy."""
    volume = tmp_path / "volume"
    volume.mkdir(exist_ok=True)
    return Settings.from_env({ENV_ASR_MODEL: asr_model, ENV_VOLUME_PATH: str(volume),
                              ENV_BAKED_MODEL_DIR: str(tmp_path / "no-baked-copy")})


def _at_and_past(bound: Number) -> tuple[str, str]:
    if bound.whole:
        return str(int(bound.high)), str(int(bound.high) + 1)
    return f"{bound.high:g}", "1e308"  # 1e308 overflowed the socket timeout and failed every call


# (variable, a value at its upper bound, one past it), from the rows' own bounds; the fault matrix
# starts a worker on each past value.
SETTING_LIMITS = [(var.env, *_at_and_past(var.parse)) for var in VARS.values() if isinstance(var.parse, Number)]


# --- results and records ------------------------------------------------------------------------------

def assert_wav_matches(data: bytes, duration: float, sr: int = 24000) -> None:
    """A PCM WAV whose length is the reported duration, within one frame (plus the result's 1 ms rounding)."""
    info = sf.info(io.BytesIO(data))
    assert info.format == "WAV" and info.samplerate == sr and info.channels == 1
    assert abs(info.frames / sr - duration) <= 1 / sr + 0.0005, (info.frames, duration)


def smallest_accepted(accepts, refused: int, accepted: int) -> int:
    """The smallest limit in (``refused``, ``accepted``] that ``accepts(limit)``, for a check that
    accepts every limit above one it accepts (a job's F5_MAX_RESULT_BYTES), by bisection."""
    assert accepts(accepted) and not accepts(refused)
    while accepted - refused > 1:
        middle = (refused + accepted) // 2
        if accepts(middle):
            accepted = middle
        else:
            refused = middle
    return accepted


def result_bytes(items) -> int:
    """A job's output as runpod sends it: in its wrapping, JSON, UTF-8."""
    return len(json.dumps({"output": items}, ensure_ascii=False).encode("utf-8"))


def assert_one_sentence(result: dict) -> str:
    assert set(result) == {"error"}, result
    message = result["error"]
    assert isinstance(message, str) and message.strip() == message and message
    assert "\n" not in message and "Traceback" not in message
    assert message.endswith("."), message
    assert not re.search(r"[.!?]\s+[A-Z]", message[:-1]), f"more than one sentence: {message!r}"
    return message


def log_record(ctx: Ctx, job_id: str) -> dict:
    text = ctx.get_text(f"logs/{job_id}.json")
    assert text is not None, f"no log record for job {job_id}"
    record = json.loads(text)
    assert record["job_id"] == job_id
    return record


# --- the streaming handler ----------------------------------------------------------------------------

class Recorder:
    """The streaming handler with what it reported: progress updates and replacement requests."""

    def __init__(self, worker):
        self.progress: list[dict] = []
        self.replacements = 0
        self.handler = make_handler(worker, streaming=True, progress=self,
                                    replace_worker=self._replace)

    def _replace(self):
        self.replacements += 1

    def report(self, job: dict, update: dict) -> None:  # jobs.progress.ProgressReports
        self.progress.append(update)

    def finish(self, job: dict) -> None:
        """Every report is recorded as it is made: none is left to wait for."""

    def run(self, job_input: dict) -> list:
        async def collect():
            return [item async for item in self.handler({"id": f"s-{uuid.uuid4().hex[:10]}", "input": job_input})]
        return asyncio.run(collect())


def pcm_of(pieces: list[dict]) -> np.ndarray:
    return np.concatenate([np.frombuffer(base64.b64decode(p["audio_base64"]), "<i2") for p in pieces])


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def hub_snapshot(cache_dir: Path, repo: str) -> Path:
    """The snapshot folder of ``repo`` in a huggingface_hub cache layout (refs/main -> commit)."""
    commit = uuid.uuid4().hex + "abcdefgh"
    repo_dir = cache_dir / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return repo_dir / "snapshots" / commit
