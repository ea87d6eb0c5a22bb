"""The worker's own Vocos decoder and log-mel spectrogram against the real packages: vocos's
``Vocos.decode``, f5-tts's ``MelSpec(mel_spec_type="vocos")`` and torchaudio's mel filterbank.

Equal output on the same weights and audio, every tensor of the hub's file layout loaded, configs
it does not implement refused with one sentence, and none of the heavy packages imported on the way.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from f5worker.model import stock as f5_imports
from f5worker.errors import StorageError
from f5worker.model.mel import LogMelSpectrogram, mel_filterbank
from tests.random_models import FULL_VOCOS, TINY_VOCOS, write_vocos
from f5worker.model.vocoder import Vocoder, load_vocoder, unsupported_reason
from tests.fixtures_models import SR, speechlike

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("vocos", "encodec", "scipy", "torchaudio", "librosa", "f5_tts", "transformers", "x_transformers", "einx")


def stock_vocos(folder: Path):
    from vocos import Vocos

    model = Vocos.from_hparams(str(folder / "config.yaml"))
    model.load_state_dict(torch.load(str(folder / "pytorch_model.bin"), map_location="cpu", weights_only=True))
    return model.eval()


def stock_mel(wave: torch.Tensor) -> torch.Tensor:
    f5_imports.install()  # f5-tts's modules without its trainer's imports
    from f5_tts.model.modules import MelSpec

    return MelSpec(mel_spec_type="vocos")(wave)


def voice_batch() -> torch.Tensor:
    """Two clips with digital silence at the ends, so the log floor is reached too."""
    clips = [speechlike(1.0, seed=s, lead_silence=0.2, tail_silence=0.1) for s in (0, 1)]
    return torch.from_numpy(np.stack(clips))


def max_rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_vocos(tmp_path_factory) -> Path:
    return write_vocos(tmp_path_factory.mktemp("tiny-vocos"), TINY_VOCOS, seed=1)


@pytest.fixture(scope="module")
def full_vocos(tmp_path_factory) -> Path:
    return write_vocos(tmp_path_factory.mktemp("full-vocos"), FULL_VOCOS, seed=2)


@pytest.mark.parametrize("model", ["tiny_vocos", "full_vocos"])
def test_decode_equals_vocos(model, request):
    folder = request.getfixturevalue(model)
    mel = stock_mel(voice_batch())
    ours, theirs = load_vocoder(folder, "cpu").decode(mel), stock_vocos(folder).decode(mel)
    assert ours.shape == theirs.shape == (2, (mel.shape[-1] - 1) * 256)
    assert theirs.std() > 0
    assert max_rel_diff(ours, theirs) < 1e-6


def test_feature_extractor_equals_vocos(tiny_vocos):
    wave = voice_batch()
    ours = load_vocoder(tiny_vocos, "cpu").feature_extractor(wave)
    theirs = stock_vocos(tiny_vocos).feature_extractor(wave)
    assert ours.shape == theirs.shape
    assert theirs.min() < math.log(1e-5)  # vocos's own floor (1e-7), below f5-tts's
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["B T", "B 1 T"])
def test_mel_equals_f5tts(layout):
    wave = voice_batch()
    wave = wave if layout == "B T" else wave.unsqueeze(1)
    ours, theirs = LogMelSpectrogram()(wave), stock_mel(wave)
    assert ours.shape == theirs.shape == (2, 100, wave.shape[-1] // 256 + 1)
    assert torch.isclose(theirs.min(), torch.tensor(math.log(1e-5)))  # the silence reaches the floor
    assert theirs.max() > theirs.min() + 5  # and the voice is well above it
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_mel_follows_the_waveforms_device():
    """Built on the CPU, called with a waveform elsewhere (the meta device stands in for a GPU here),
    it moves itself, as f5-tts's MelSpec does."""
    mel = LogMelSpectrogram()
    out = mel(torch.empty(2, 24000, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 100, 24000 // 256 + 1)
    assert mel.mel_spec.mel_scale.fb.device.type == "meta"


@pytest.mark.parametrize("n_fft, n_mels, sample_rate", [(1024, 100, 24000), (512, 80, 16000), (2048, 128, 44100)])
def test_filterbank_equals_torchaudio(n_fft, n_mels, sample_rate):
    from torchaudio.functional import melscale_fbanks

    theirs = melscale_fbanks(n_fft // 2 + 1, 0.0, float(sample_rate // 2), n_mels, sample_rate, norm=None,
                             mel_scale="htk")
    torch.testing.assert_close(mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate), theirs, rtol=0, atol=1e-7)


def test_checkpoint_buffers_are_the_computed_ones(tiny_vocos):
    """The filterbank and windows in a Vocos file are what mel.py computes, so the worker's mel needs
    no vocoder checkpoint."""
    state = torch.load(str(tiny_vocos / "pytorch_model.bin"), weights_only=True)
    mel = LogMelSpectrogram().mel_spec
    torch.testing.assert_close(state["feature_extractor.mel_spec.mel_scale.fb"], mel.mel_scale.fb, rtol=0, atol=1e-7)
    for key in ("feature_extractor.mel_spec.spectrogram.window", "head.istft.window"):
        torch.testing.assert_close(state[key], mel.spectrogram.window, rtol=0, atol=0)


def test_full_size_loads_every_tensor_of_the_file(full_vocos):
    state = torch.load(str(full_vocos / "pytorch_model.bin"), weights_only=True)
    loaded = load_vocoder(full_vocos, "cpu").state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state), "a parameter or buffer is not the file's"
    assert sum(t.numel() for k, t in loaded.items() if "window" not in k and ".fb" not in k) > 13_000_000


def edit_config(folder: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "vocos"
    shutil.copytree(folder, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    edit(config)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


UNSUPPORTED = {
    "head padding same": (lambda c: c["head"]["init_args"].update(padding="same"), "head padding"),
    "head padding default": (lambda c: c["head"]["init_args"].pop("padding"), "head padding"),
    "features padding same": (lambda c: c["feature_extractor"]["init_args"].update(padding="same"),
                              "feature_extractor padding"),
    "adanorm": (lambda c: c["backbone"]["init_args"].update(adanorm_num_embeddings=4), "adanorm_num_embeddings"),
    "resnet backbone": (lambda c: c["backbone"].update(class_path="vocos.models.VocosResNetBackbone"),
                        "VocosResNetBackbone"),
    "imdct head": (lambda c: c["head"].update(class_path="vocos.heads.IMDCTCosHead"), "IMDCTCosHead"),
    "encodec features": (lambda c: c["feature_extractor"].update(class_path="vocos.feature_extractors.EncodecFeatures"),
                         "EncodecFeatures"),
    "unknown argument": (lambda c: c["backbone"]["init_args"].update(dropout=0.1), "dropout"),
    "missing dim": (lambda c: c["backbone"]["init_args"].pop("dim"), "lacks backbone dim"),
    "dim as text": (lambda c: c["backbone"]["init_args"].update(dim="32"), "positive whole number"),
    "no head": (lambda c: c.pop("head"), "no head section"),
}


def test_supported_config_has_no_reason(tiny_vocos):
    assert unsupported_reason(yaml.safe_load((tiny_vocos / "config.yaml").read_text())) is None


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_refuses_unsupported_config_in_one_sentence(case, tiny_vocos, tmp_path):
    edit, named = UNSUPPORTED[case]
    folder = edit_config(tiny_vocos, tmp_path, edit)
    with pytest.raises(StorageError) as err:
        load_vocoder(folder, "cpu")
    message = str(err.value)
    assert message.startswith(f"The vocoder config {folder / 'config.yaml'} ") and message.endswith(".")
    assert "\n" not in message and ". " not in message and named in message
    with pytest.raises(ValueError, match=named):
        Vocoder(yaml.safe_load((folder / "config.yaml").read_text()))


def rename(state):
    state["backbone.embed.weight_renamed"] = state.pop("backbone.embed.weight")
    return r"1 tensor missing \(backbone.embed.weight\); 1 unexpected tensor \(backbone.embed.weight_renamed\)"


def reshape(state):
    state["head.out.bias"] = torch.zeros(7)
    return r"1 tensor of the wrong shape \(head.out.bias: \[7\] instead of \[1026\]\)"


def poison(state):
    state["backbone.convnext.0.gamma"][1] = float("nan")
    return r"non-finite values \(NaN or infinity\) in 1 tensor \(backbone.convnext.0.gamma\)"


@pytest.mark.parametrize("damage", [rename, reshape, poison])
def test_refuses_weights_that_do_not_fit(damage, tiny_vocos, tmp_path):
    folder = edit_config(tiny_vocos, tmp_path, lambda c: None)
    state = torch.load(str(folder / "pytorch_model.bin"), weights_only=True)
    expected = damage(state)
    torch.save(state, str(folder / "pytorch_model.bin"))
    with pytest.raises(StorageError, match=rf"^The vocoder weights file {folder / 'pytorch_model.bin'} .*{expected}"):
        load_vocoder(folder, "cpu")


@pytest.mark.parametrize("content", [b"not a torch file", "list"])
def test_refuses_unreadable_weights(content, tiny_vocos, tmp_path):
    folder = edit_config(tiny_vocos, tmp_path, lambda c: None)
    if content == "list":
        torch.save([torch.zeros(3)], str(folder / "pytorch_model.bin"))
    else:
        (folder / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(StorageError, match=r"^The vocoder weights file .* (could not be read|does not hold a state)"):
        load_vocoder(folder, "cpu")


IMPORT_CHECK = """
import json, sys
from pathlib import Path
import torch
from f5worker.model.mel import LogMelSpectrogram
from f5worker.model.vocoder import load_vocoder
mel = LogMelSpectrogram()(torch.randn(1, 24000) * 0.1)
audio = load_vocoder(Path(sys.argv[1]), "cpu").decode(mel)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[2].split(","))
print(json.dumps({"samples": audio.shape[-1], "heavy": heavy}))
"""


def test_imports_none_of_the_heavy_packages(tiny_vocos):
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK, str(tiny_vocos), ",".join(HEAVY)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"samples": (SR // 256) * 256, "heavy": []}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_and_mel_equal_stock_on_cuda(full_vocos):
    wave = voice_batch().cuda()
    mel = stock_mel(wave)
    torch.testing.assert_close(LogMelSpectrogram().cuda()(wave), mel, rtol=1e-5, atol=1e-5)
    ours, theirs = load_vocoder(full_vocos, "cuda").decode(mel), stock_vocos(full_vocos).cuda().decode(mel)
    assert theirs.std() > 0 and max_rel_diff(ours, theirs) < 1e-5


# --- the vocos package's fallback, for layouts the own vocoder does not cover ---------------------

def stock_layout(tiny_vocos: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny vocoder with ``edit`` made to its config and weights vocos builds for it."""
    from vocos import Vocos

    folder = edit_config(tiny_vocos, tmp_path, edit)
    torch.save(Vocos.from_hparams(str(folder / "config.yaml")).state_dict(), str(folder / "pytorch_model.bin"))
    return folder


def resnet_backbone(config: dict) -> None:
    config["backbone"] = {"class_path": "vocos.models.VocosResNetBackbone",
                          "init_args": {"input_channels": 100, "dim": TINY_VOCOS["dim"], "num_blocks": 1}}


def test_a_layout_the_own_vocoder_lacks_runs_on_vocos_and_passes_the_gate(tiny_vocos, tmp_path):
    """The feature extractor is not used to decode: a sample rate of its own is no reason to refuse."""
    from f5worker.model import loader

    folder = stock_layout(tiny_vocos, tmp_path, lambda c: (resnet_backbone(c), c["feature_extractor"][
        "init_args"].update(sample_rate=44100)))
    loader.check_vocoder_weights(folder)
    model = loader.load_vocoder(folder, "cpu")
    assert type(model.backbone).__name__ == "VocosResNetBackbone"
    assert torch.isfinite(model.decode(stock_mel(voice_batch()))).all()


def run_command(marker: Path):
    return lambda c: c.update(feature_extractor={"class_path": "subprocess.getoutput",
                                                 "init_args": {"cmd": f"touch {marker}"}})


HOSTILE_VOCOS = {
    # vocos imports and calls whatever class_path names: a config on a shared volume must not run code
    "a command": (run_command, "'subprocess.getoutput' as its feature_extractor"),
    "encodec features": (lambda _: lambda c: c["feature_extractor"].update(
        class_path="vocos.feature_extractors.EncodecFeatures"), "EncodecFeatures"),
    "an imdct head": (lambda _: lambda c: c["head"].update(class_path="vocos.heads.IMDCTCosHead"), "IMDCTCosHead"),
    "adanorm": (lambda _: lambda c: (resnet_backbone(c), c["backbone"]["init_args"].update(adanorm_num_embeddings=4)),
                "adanorm_num_embeddings"),
    # what decoding reads of the mel, on vocos's layout and on the own vocoder's alike (a hop of 512
    # makes audio of the wrong length and pitch; 80 bands fail every model call)
    "another hop": (lambda _: lambda c: (resnet_backbone(c), c["head"]["init_args"].update(hop_length=512)),
                    "another mel than F5-TTS makes (head hop_length 512"),
    "another hop, own layout": (lambda _: lambda c: c["head"]["init_args"].update(hop_length=512),
                                "another mel than F5-TTS makes (head hop_length 512"),
    "80 bands, own layout": (lambda _: lambda c: c["backbone"]["init_args"].update(input_channels=80),
                             "another mel than F5-TTS makes (backbone input_channels 80"),
    "an argument vocos lacks": (lambda _: lambda c: (resnet_backbone(c), c["backbone"]["init_args"].update(colour=3)),
                                "does not build vocos's model (TypeError)"),
}


@pytest.mark.parametrize("case", HOSTILE_VOCOS)
def test_vocoders_build_only_vocos_classes_for_f5_ttss_mel(case, tiny_vocos, tmp_path):
    from f5worker.model import loader

    marker = tmp_path / "ran"
    edit, named = HOSTILE_VOCOS[case]
    folder = edit_config(tiny_vocos, tmp_path, edit(marker))
    for load in (loader.check_vocoder_weights, lambda f: loader.load_vocoder(f, "cpu")):
        with pytest.raises(StorageError) as err:
            load(folder)
        message = str(err.value)
        assert message.startswith(f"The vocoder config {folder / 'config.yaml'} ") and named in message
        assert message.endswith(".") and "\n" not in message
    assert not marker.exists()
