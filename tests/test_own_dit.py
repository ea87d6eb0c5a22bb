"""The worker's own DiT (f5worker.model.dit) against f5-tts's real DiT: same keys, same function, light imports.

Stock f5-tts is the reference: both models get the same random weights (DiT's zero-initialised
projections randomised, as random_models does, so every layer shows in the output) and are compared
on every way the worker calls a DiT: stock's forward with and without guidance, padding masks and
the text cache, the sampler's eager runner and the fast path's step.
"""
from __future__ import annotations

import subprocess
import sys
from importlib.resources import files as package_files
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from f5worker.model import dit as own_dit
from f5worker.model import stock as f5_imports
from f5worker.inference import fast
from f5worker.model.checkpoint import ema_weights
from tests.helpers import trained_like_text_grn
from tests.random_models import TINY_ARCH, TINY_SMALL_ARCH, TINY_V0_ARCH, packaged_vocab, write_f5_checkpoint
from f5worker.inference.sampler import EagerStepRunner

f5_imports.install()
from f5_tts.model.backbones.dit import DiT as StockDiT  # noqa: E402
from f5_tts.model.utils import get_tokenizer  # noqa: E402
from x_transformers.x_transformers import apply_rotary_pos_emb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 40
MEL = 100
TOLERANCE = 1e-5  # of the output's scale; in practice the two agree bit for bit
ARCHS = {
    "tiny_v1": TINY_ARCH,
    "no_text_convs": dict(TINY_ARCH, conv_layers=0, heads=4, dim_head=16, ff_mult=3, depth=1),
    "unmasked_text": dict(TINY_ARCH, text_mask_padding=False, conv_layers=2, text_dim=None, attn_mask_enabled=True),
    "tiny_v0": TINY_V0_ARCH,
    "tiny_small_v0": TINY_SMALL_ARCH,
}
V0_ARCHS = ("tiny_v0", "tiny_small_v0")
FORBIDDEN = ("x_transformers", "einx", "einops", "torchdiffeq", "scipy", "vocos", "pypinyin", "jieba", "rjieba",
             "transformers", "f5_tts", "torch._dynamo")
# Stock warns when built with attention masking on (one of the archs here); that is not under test.
pytestmark = pytest.mark.filterwarnings("ignore:attn_mask_enabled=True:UserWarning")


def packaged_config_arch(name: str) -> dict:
    return yaml.safe_load(Path(str(package_files("f5_tts").joinpath(f"configs/{name}.yaml"))).read_text())["model"]


def randomise_zeros(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)


def model_pair(arch: dict, seed: int = 0, *, rows_alone: bool = True):
    """Stock's DiT and the own one with the same random weights. ``rows_alone``: stock's batched
    text embedding is made to embed each row at its own length (``dit.rows_alone``, as the worker's
    stock fallback runs it), since stock's batched forward makes a row depend on its neighbours'
    lengths and the own model's does not."""
    torch.manual_seed(seed)
    stock = StockDiT(**arch, text_num_embeds=VOCAB, mel_dim=MEL)
    randomise_zeros(stock)
    own = own_dit.DiT(**arch, text_num_embeds=VOCAB, mel_dim=MEL)
    own.load_state_dict(stock.state_dict(), strict=True)
    if rows_alone:  # stock's batched text embedding made its one-item one per row, as the stock fallback runs it
        stock.text_embed.forward = own_dit.rows_alone(stock.text_embed.forward)
    return stock.eval(), own.eval()


def inputs(batch=2, frames=48, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, MEL, generator=gen)
    cond = torch.randn(batch, frames, MEL, generator=gen)
    text = torch.randint(0, VOCAB, (batch, 20), generator=gen)
    text[1:, 13:] = -1  # batch padding, as list_str_to_idx writes it
    mask = torch.arange(frames)[None, :] < torch.tensor([frames, frames - 11] + [frames - 5] * (batch - 2))[:, None]
    return x, cond, text, mask


def assert_close(own_out, stock_out):
    assert own_out.shape == stock_out.shape
    scale = stock_out.abs().max().item()
    assert scale > 0
    assert (own_out - stock_out).abs().max().item() <= TOLERANCE * scale


def set_attn_mask(model, enabled: bool) -> None:
    for block in model.transformer_blocks:
        block.attn.processor.attn_mask_enabled = enabled


CALLS = {
    "plain": dict(),
    "cfg_infer": dict(cfg_infer=True),
    "masked_cfg": dict(cfg_infer=True, masked=True),
    "masked_plain": dict(masked=True),
    "mask_attention_unmasked": dict(masked=False),  # f5-tts's v1 default: mask the convs and outputs only
    "drop_text": dict(drop_text=True),
    "drop_audio_cond": dict(drop_audio_cond=True),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_stock(arch, call):
    stock, own = model_pair(ARCHS[arch])
    x, cond, text, mask = inputs()
    kwargs = dict(CALLS[call])
    if "masked" in kwargs:
        masked = kwargs.pop("masked")
        set_attn_mask(stock, masked)
        set_attn_mask(own, masked)
        kwargs["mask"] = mask
    for time in (torch.tensor(0.3), torch.tensor([0.1, 0.9])):
        with torch.inference_mode():
            assert_close(own(x, cond, text, time, **kwargs), stock(x, cond, text, time, **kwargs))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_batched_row_equals_stock_on_that_item_alone(arch):
    """A job's audio must not depend on what it shares a model call with. The text embedding ran
    at the batch's longest length: F5TTS_Base's unmasked text convolutions read past a row's end,
    and GRN's norm spans the padding in every layout, so a row changed with its neighbours."""
    stock, own = model_pair(ARCHS[arch], rows_alone=False)
    trained_like_text_grn(stock, own)
    set_attn_mask(own, True)  # the worker masks attention wherever rows are padded
    x, cond, text, mask = inputs(batch=3)
    time = torch.tensor(0.4)
    with torch.inference_mode():
        batched = own(x, cond, text, time, mask=mask, cfg_infer=True)  # [2b, n, mel]: guided rows, then unguided
        for i, frames in enumerate(mask.sum(dim=1).tolist()):
            alone = stock(x[i:i + 1, :frames], cond[i:i + 1, :frames], text[i:i + 1], time, cfg_infer=True)
            assert_close(batched[[i, len(x) + i], :frames], alone)

@pytest.mark.parametrize("arch", ["tiny_v1", *V0_ARCHS])
def test_fp16_forward_and_rotary_match_stock(arch):
    """In fp16 stock computes its rotary angles in fp16 (the buffer is cast with the model); so does ours."""
    stock, own = model_pair(ARCHS[arch])
    stock, own = stock.half(), own.half()
    x, cond, text, mask = inputs()
    with torch.inference_mode():
        out = own(x.half(), cond.half(), text, torch.tensor(0.4).half(), mask=mask, cfg_infer=True)
        ref = stock(x.half(), cond.half(), text, torch.tensor(0.4).half(), mask=mask, cfg_infer=True)
        assert out.dtype == torch.float16
        assert_close(out.float(), ref.float())
        own_freqs, own_scale = own.rotary_embed.forward_from_seq_len(3000)
        stock_freqs, stock_scale = stock.rotary_embed.forward_from_seq_len(3000)
    assert own_freqs.dtype == stock_freqs.dtype == torch.float16
    assert torch.equal(own_freqs, stock_freqs) and own_scale == stock_scale == 1.0


def test_text_cache_is_used_and_cleared():
    stock, own = model_pair(TINY_ARCH)
    x, cond, text, mask = inputs()
    other_text = torch.randint(0, VOCAB, text.shape, generator=torch.Generator().manual_seed(9))
    time = torch.tensor(0.5)
    with torch.inference_mode():
        for model in (stock, own):
            model.clear_cache()
        first = [m(x, cond, text, time, mask=mask, cfg_infer=True, cache=True) for m in (own, stock)]
        again = [m(x, cond, other_text, time, mask=mask, cfg_infer=True, cache=True) for m in (own, stock)]
        assert_close(*first)
        assert_close(*again)
        assert torch.equal(again[0], first[0])  # the cached text embedding, not other_text's
        own.clear_cache()
        fresh = own(x, cond, other_text, time, mask=mask, cfg_infer=True, cache=True)
        assert_close(fresh, stock(x, cond, other_text, time, mask=mask, cfg_infer=True))
        assert not torch.equal(fresh, first[0])


def test_apply_rotary_matches_x_transformers():
    stock, own = model_pair(TINY_ARCH)
    freqs, _ = stock.rotary_embed.forward_from_seq_len(50)
    own_freqs, _ = own.rotary_embed.forward_from_seq_len(50)
    assert torch.equal(freqs, own_freqs)
    gen = torch.Generator().manual_seed(3)
    width = freqs.shape[-1]
    for t in (torch.randn(2, 3, 50, width, generator=gen), torch.randn(2, 40, width, generator=gen),
              torch.randn(2, 3, 50, width + 16, generator=gen)):  # per head; 3-D; head wider than the table
        assert torch.equal(own_dit.apply_rotary(t, freqs), apply_rotary_pos_emb(t, freqs, 1.0))


def test_v0_rotates_the_first_head_only():
    """pe_attn_head really changes the function (so equality with stock above is not vacuous)."""
    torch.manual_seed(0)
    v0 = own_dit.DiT(**ARCHS["tiny_v0"], text_num_embeds=VOCAB, mel_dim=MEL)
    randomise_zeros(v0)
    every_head = own_dit.DiT(**dict(ARCHS["tiny_v0"], pe_attn_head=None), text_num_embeds=VOCAB, mel_dim=MEL)
    every_head.load_state_dict(v0.state_dict(), strict=True)
    x, cond, text, _ = inputs()
    with torch.inference_mode():
        assert not torch.allclose(v0(x, cond, text, torch.tensor(0.3)), every_head(x, cond, text, torch.tensor(0.3)))
    t = torch.randn(2, 3, 10, 16)  # dim_head 16
    freqs, _ = v0.rotary_embed.forward_from_seq_len(10)
    rotated = own_dit.apply_rotary_heads(t, freqs, 1)
    assert torch.equal(rotated[:, 1:], t[:, 1:]) and not torch.equal(rotated[:, :1], t[:, :1])


@pytest.mark.parametrize("arch", ["tiny_v1", "unmasked_text", *V0_ARCHS])
def test_sampler_and_fast_step_match_stock(arch):
    stock, own = model_pair(ARCHS[arch])
    x, cond, text, mask = inputs(batch=3)
    t = torch.linspace(0, 1, 4)
    with torch.inference_mode():
        for masked in (mask, None):
            runs = [EagerStepRunner(m).integrate(x, cond, text, masked, t, 3, 2.0) for m in (own, stock)]
            assert_close(*runs)
        full = torch.ones_like(mask)
        for guided in (True, False):
            states = [fast._SampleState(m, cond, text, mask, guided) for m in (own, stock)]
            steps = [fast.dit_step(m, x, cond, mask, torch.tensor(0.3), s, cfg_strength=2.0) for m, s in zip((own, stock), states)]
            assert_close(*steps)
        runs = [fast.BucketedStepRunner(m, use_graphs=False).integrate(x, cond, text, full, t, 3, 2.0)
                for m in (own, stock)]  # installs the fused attention processor on both
        assert isinstance(own.transformer_blocks[0].attn.processor, fast.FusedAttnProcessor)
        assert_close(*runs)


def test_checkpoint_loads_by_key_and_fills_every_tensor(tmp_path):
    ckpt = write_f5_checkpoint(tmp_path / "model.safetensors", TINY_ARCH, packaged_vocab())
    vocab_size = get_tokenizer(str(packaged_vocab()), "custom")[1]
    prefix = "transformer."
    state = {k[len(prefix):]: v for k, v in ema_weights(load_file(str(ckpt))).items() if k.startswith(prefix)}
    own = own_dit.DiT(**TINY_ARCH, text_num_embeds=vocab_size, mel_dim=MEL)
    with torch.no_grad():
        for tensor in own.state_dict().values():
            tensor.fill_(float("nan"))
    own.load_state_dict(state, strict=True)
    loaded = own.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # Non-persistent buffers are not in a checkpoint: built, equal to stock's.
    stock = StockDiT(**TINY_ARCH, text_num_embeds=vocab_size, mel_dim=MEL)
    assert torch.equal(own.text_embed.freqs_cis, stock.text_embed.freqs_cis)
    assert all(torch.isfinite(p).all() for p in own.parameters())


def meta_models(arch: dict, vocab_size: int):
    with torch.device("meta"):
        stock = StockDiT(**arch, text_num_embeds=vocab_size, mel_dim=MEL)
        return stock, own_dit.DiT(**arch, text_num_embeds=vocab_size, mel_dim=MEL)


PACKAGED_LAYOUTS = ["F5TTS_v1_Base", "F5TTS_v1_Small", "F5TTS_Base", "F5TTS_Small"]


@pytest.mark.parametrize("name", PACKAGED_LAYOUTS)
def test_full_packaged_archs_have_stock_keys_and_shapes(name):
    arch = packaged_config_arch(name)["arch"]
    vocab_size = get_tokenizer(str(packaged_vocab()), "custom")[1]
    assert vocab_size == len(packaged_vocab().read_text(encoding="utf-8").splitlines())
    assert own_dit.unsupported_reason(arch) is None
    stock, own = meta_models(arch, vocab_size)
    stock_state, own_state = stock.state_dict(), own.state_dict()
    assert stock_state["text_embed.text_embed.weight"].shape[0] == vocab_size + 1
    layout = {k: (v.shape, v.dtype) for k, v in own_state.items()}
    assert layout == {k: (v.shape, v.dtype) for k, v in stock_state.items()}
    loaded = own.load_state_dict(stock_state, strict=True, assign=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    # Every parameter and persistent buffer is a checkpoint key; the rest are the same non-persistent buffers.
    own_tensors = {n for n, _ in own.named_parameters()} | {n for n, _ in own.named_buffers()}
    stock_tensors = {n for n, _ in stock.named_parameters()} | {n for n, _ in stock.named_buffers()}
    assert own_tensors - own_state.keys() == stock_tensors - stock_state.keys() == {"text_embed.freqs_cis"}
    assert sum(p.numel() for p in own.parameters()) == sum(p.numel() for p in stock.parameters())


def test_a_layout_not_covered_is_refused_in_one_sentence():
    arch = dict(packaged_config_arch("F5TTS_v1_Base")["arch"], qk_norm="rms_norm")
    reason = own_dit.unsupported_reason(arch)
    assert "qk_norm" in reason and reason.count(".") <= 1
    with pytest.raises(ValueError, match="qk_norm"):
        own_dit.DiT(**arch, text_num_embeds=VOCAB)


@pytest.mark.parametrize("setting", [dict(qk_norm="rms_norm"), dict(attn_backend="flash_attn"),
                                     dict(long_skip_connection=True), dict(text_embedding_average_upsampling=True),
                                     dict(rope_theta=500)])
def test_unsupported_settings_are_named(setting):
    key = next(iter(setting))
    reason = own_dit.unsupported_reason(dict(TINY_ARCH, **setting))
    assert reason is not None and key in reason
    assert own_dit.unsupported_reason(dict(TINY_ARCH, checkpoint_activations=True, dropout=0.0)) is None


def test_import_and_forward_load_no_heavy_modules():
    code = (
        "import sys, torch, f5worker.model.dit as d\n"
        "m = d.DiT(dim=32, depth=1, heads=2, dim_head=16, text_dim=16, conv_layers=1, text_num_embeds=10,\n"
        "          pe_attn_head=1, text_mask_padding=False).eval()\n"
        "out = m(torch.randn(2, 8, 100), torch.randn(2, 8, 100), torch.zeros(2, 3, dtype=torch.long),\n"
        "        torch.tensor(0.5), mask=torch.ones(2, 8, dtype=torch.bool), cfg_infer=True, cache=True)\n"
        "assert out.shape == (4, 8, 100)\n"
        f"print(sorted(m for m in sys.modules if m in {FORBIDDEN!r} or m.split('.')[0] in {FORBIDDEN!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
