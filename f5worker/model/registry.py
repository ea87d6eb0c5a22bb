"""Which models an endpoint serves, by name: the built-in two, ``F5_MODELS``, and the default.

Why this module exists: most people who deploy F5-TTS outside English and Chinese run a community
fine-tune, and a product serving several languages should not need one endpoint (its own cold
starts, its own idle GPU) per model. The registry is the one place that says which names exist and
where each one's files are said to be; ``model.store`` finds the files, ``inference.models`` holds
the loaded ones. Nothing is read or loaded here.

A model is three files: the checkpoint, its vocabulary, its config. Each file is a local path or an
``hf://owner/repo/path`` address (f5-tts's CLI's spelling, found in RunPod's cached models, the volume
cache or the image copy, else downloaded); the config may instead name a layout f5-tts ships. The
single-model variables (``F5_CKPT_FILE``, ``F5_VOCAB_FILE``, ``F5_MODEL_CONFIG``) keep working: they
replace the default model's files, as they replaced the one model's before.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from f5worker.errors import NotFound, StorageError
from f5worker.settings import (
    ENV_CKPT_FILE,
    ENV_DEFAULT_MODEL,
    ENV_MODEL_CONFIG,
    ENV_MODELS,
    ENV_PRELOAD_MODELS,
    ENV_VOCAB_FILE,
    F5_CKPT_IN_REPO,
    F5_MODEL_NAME,
    F5_REPO,
    F5_V0_CKPT_IN_REPO,
    F5_V0_MODEL_NAME,
    F5_V0_VOCAB_IN_REPO,
    F5_VOCAB_IN_REPO,
    Settings,
)

HF_SCHEME = "hf://"
# OpenAI's model names: a client that cannot change its model name still gets the default model.
OPENAI_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: where its files are said to be (nothing resolved yet).

    ``vocab`` None means f5-tts's packaged vocabulary (what f5-tts does for a checkpoint given
    without one); ``labels`` say, per file, what a message about it names (``F5_CKPT_FILE``, or
    ``F5_MODELS' model 'de' ckpt``)."""

    name: str
    ckpt: str
    vocab: str | None
    config: str
    origin: str  # "built-in", F5_MODELS, or the single-model variables
    labels: tuple[tuple[str, str], ...] = ()
    language: str = "en"  # what its text is normalised in (jobs.normalize.language_of: kana and Hangul say their own)

    def label(self, part: str) -> str:
        return dict(self.labels).get(part, f"model {self.name!r}'s {part}")


BUILTIN_MODELS = {
    F5_MODEL_NAME: ModelSpec(F5_MODEL_NAME, f"{HF_SCHEME}{F5_REPO}/{F5_CKPT_IN_REPO}",
                             f"{HF_SCHEME}{F5_REPO}/{F5_VOCAB_IN_REPO}", F5_MODEL_NAME, "built-in"),
    F5_V0_MODEL_NAME: ModelSpec(F5_V0_MODEL_NAME, f"{HF_SCHEME}{F5_REPO}/{F5_V0_CKPT_IN_REPO}",
                                f"{HF_SCHEME}{F5_REPO}/{F5_V0_VOCAB_IN_REPO}", F5_V0_MODEL_NAME, "built-in"),
}


def split_hf(address: str) -> tuple[str, str] | None:
    """``hf://owner/repo/path/in/repo`` as (``owner/repo``, ``path/in/repo``); None for a local path.
    StorageError for an address huggingface_hub would refuse (``owner/repo@main``, a space) or
    whose path leaves the repo (``..``)."""
    if not address.startswith(HF_SCHEME):
        return None
    parts = address[len(HF_SCHEME):].split("/", 2)
    try:
        if len(parts) < 3 or not all(parts) or {".", ".."} & set(parts[2].split("/")):
            raise HFValidationError("no owner/repo/path")
        validate_repo_id(f"{parts[0]}/{parts[1]}")
    except HFValidationError as err:
        raise StorageError(f"{address[:200]!r} is not an hf://owner/repo/path address (a repo's name is letters, "
                           "digits, '-', '_' and '.'; no revision, no '..').") from err
    return f"{parts[0]}/{parts[1]}", parts[2]


def _check_addresses(spec: ModelSpec) -> None:
    """Every hf:// address of a model checked as the registry is built, so a malformed one is a
    start error naming the setting, not a failure of every listing and job that reaches it."""
    for part in ("ckpt", "vocab", "config"):
        address = getattr(spec, part)
        try:
            if address:
                split_hf(address)
        except StorageError as err:
            raise StorageError(f"{spec.label(part)}: {err}") from err


def _from_models_variable(name: str, files: dict[str, str]) -> ModelSpec:
    labels = tuple((part, f"{ENV_MODELS}' model {name!r} {part}") for part in ("ckpt", "vocab", "config"))
    return ModelSpec(name, files["ckpt"], files.get("vocab"), files.get("config", F5_MODEL_NAME), ENV_MODELS, labels,
                     files.get("language", "en"))


def _with_single_model_variables(spec: ModelSpec, settings: Settings) -> ModelSpec:
    """The default model with F5_CKPT_FILE / F5_VOCAB_FILE / F5_MODEL_CONFIG in place of its files.
    A local checkpoint without F5_VOCAB_FILE gets f5-tts's packaged vocabulary, as before."""
    if not (settings.ckpt_file or settings.vocab_file or settings.model_config):
        return spec
    ckpt = settings.ckpt_file or spec.ckpt
    vocab = settings.vocab_file or (None if settings.ckpt_file else spec.vocab)
    labels = dict(spec.labels)
    for part, env, value in (("ckpt", ENV_CKPT_FILE, settings.ckpt_file), ("vocab", ENV_VOCAB_FILE, settings.vocab_file),
                             ("config", ENV_MODEL_CONFIG, settings.model_config)):
        if value:
            labels[part] = env
    used = [env for env, v in ((ENV_CKPT_FILE, settings.ckpt_file), (ENV_VOCAB_FILE, settings.vocab_file),
                               (ENV_MODEL_CONFIG, settings.model_config)) if v]
    return ModelSpec(spec.name, ckpt, vocab, settings.model_config or spec.config, ", ".join(used),
                     tuple(labels.items()), spec.language)


def model_registry(settings: Settings) -> dict[str, ModelSpec]:
    """Every model the endpoint serves, by name, the default first. StorageError when the default
    or a preloaded name is not registered, naming the registered ones."""
    specs = dict(BUILTIN_MODELS)
    for name, files in (settings.models or {}).items():
        specs[name] = _from_models_variable(name, files)  # may redefine a built-in name
    default = settings.default_model
    if default not in specs:
        raise StorageError(f"{ENV_DEFAULT_MODEL} names {default!r}, which is not a registered model; the "
                           f"registered ones are {', '.join(specs)}.")
    for name in settings.preload_models:
        if name not in specs:
            raise StorageError(f"{ENV_PRELOAD_MODELS} names {name!r}, which is not a registered model; the "
                               f"registered ones are {', '.join(specs)}.")
    specs[default] = _with_single_model_variables(specs[default], settings)
    for spec in specs.values():
        _check_addresses(spec)
    return {default: specs[default], **{n: s for n, s in specs.items() if n != default}}


def default_aliases(settings: Settings) -> tuple[str, ...]:
    """Other names of the default model: OpenAI's, and the file stem of an ``F5_CKPT_FILE`` (what
    the HTTP face called a fine-tune before there was a registry, so its clients keep working)."""
    stem = Path(settings.ckpt_file).stem if settings.ckpt_file else None
    return (*([stem] if stem and stem != settings.default_model else []), *OPENAI_MODEL_ALIASES)


def model_for_job(requested: str | None, registry: dict[str, ModelSpec], default: str,
                  aliases: tuple[str, ...] = OPENAI_MODEL_ALIASES) -> str:
    """The registered name a job's (or a request's) ``model`` means: the default when it names
    none or one of its ``aliases``; a NotFound naming the registered ones otherwise."""
    if requested is None or (requested in aliases and requested not in registry):
        return default
    if requested not in registry:
        raise NotFound(f"There is no model {requested[:64]!r} on this endpoint; it serves "
                         f"{', '.join(registry)}.", param="model")
    return requested


def required_models(settings: Settings, registry: dict[str, ModelSpec]) -> list[str]:
    """The models an endpoint must have at hand: the default, the preloaded, and every one
    F5_MODELS registers (a built-in that is not the default is fetched only when a job names it).
    What the pre-deploy gate checks and ``python -m f5worker.preload`` fetches."""
    return [name for name, spec in registry.items()
            if name == settings.default_model or name in settings.preload_models or spec.origin != "built-in"]
