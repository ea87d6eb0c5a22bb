"""How a setting's text becomes its value: one parser per kind, each refusing what it does not know.

Why this module exists: a setting is declared once, as a row (``Var``: variable, parser, default,
one-line doc) on its ``Settings`` field, and everything else is derived from the rows: reading the
environment, the README's configuration table, the RunPod Hub listing's check. The parsers here
are that vocabulary. Each takes the variable's name and its text (never empty: unset and empty
both mean the default) and returns the value, or raises ValueError with one sentence naming the
variable and never repeating a value that might be a secret.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from f5worker.errors import SHOWN_CHARS  # of a refused value, in the sentence that refuses it

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def figure(value: float) -> str:
    """A bound or default as the README writes it: 1,048,576, 0.5."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


class Parser(Protocol):
    def __call__(self, name: str, raw: str) -> Any:
        """The value of ``raw`` (not empty), or ValueError naming ``name``."""

    def accepts(self) -> str:
        """What the parser takes, for the README's table."""


class Text:
    def __call__(self, name: str, raw: str) -> str:
        return raw

    def accepts(self) -> str:
        return "text"


class PathValue:
    def __call__(self, name: str, raw: str) -> Path:
        return Path(raw)

    def accepts(self) -> str:
        return "a path"


class Flag:
    """On or off, in the words people write; anything else is refused (``flase`` turned a
    setting on when every value but a few "off" words meant on)."""

    def __call__(self, name: str, raw: str) -> bool:
        word = raw.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f"{name} must be one of {', '.join(TRUE_WORDS)} (on) or {', '.join(FALSE_WORDS)} (off), "
                         f"not {raw[:SHOWN_CHARS]!r}")

    def accepts(self) -> str:
        return "`1`/`0` (also true/false, yes/no, on/off)"


@dataclass(frozen=True)
class Number:
    """A number from ``low`` to ``high``; ``whole`` for integers, ``above`` when ``low`` itself is
    not allowed. Upper bounds are set where a larger value is a slip, never a choice (one,
    ``S3_READ_TIMEOUT_SECONDS=1e308``, overflowed the socket timeout and failed every call)."""

    low: float
    high: float
    whole: bool = False
    above: bool = False

    def __call__(self, name: str, raw: str) -> int | float:
        try:
            value = int(raw) if self.whole else float(raw)
        except ValueError:
            value = None
        if value is None or value != value or not (value > self.low if self.above else value >= self.low):
            bound = f"greater than {self.low:g}" if self.above else f"at least {self.low:g}"
            raise ValueError(f"{name} must be a {'whole ' if self.whole else ''}number {bound}, "
                             f"not {raw[:SHOWN_CHARS]!r}")
        if value > self.high:
            raise ValueError(f"{name} must be at most {self.high:g}, not {raw[:SHOWN_CHARS]!r}")
        return value

    def accepts(self) -> str:
        kind = "whole number" if self.whole else "number"
        low = f"above {figure(self.low)}" if self.above else figure(self.low)
        return f"{kind}, {low} to {figure(self.high)}"


class Device:
    """What torch and safetensors both accept (``cpu:0`` is torch's, not safetensors')."""

    PATTERN = re.compile(r"cpu|cuda(?::\d+)?")

    def __call__(self, name: str, raw: str) -> str:
        value = raw.strip()
        if not self.PATTERN.fullmatch(value):
            raise ValueError(f"{name} must be cpu, cuda or cuda:<index> (such as cuda:0), or unset "
                             f"to pick the GPU when there is one, not {raw[:SHOWN_CHARS]!r}")
        return value

    def accepts(self) -> str:
        return "`cpu`, `cuda`, `cuda:<index>`"


@dataclass(frozen=True)
class Choice:
    """One of a few words, as written (lower case)."""

    words: tuple[str, ...]

    def __call__(self, name: str, raw: str) -> str:
        word = raw.strip().lower()
        if word not in self.words:
            raise ValueError(f"{name} must be {' or '.join(self.words)}, not {raw[:SHOWN_CHARS]!r}")
        return word

    def accepts(self) -> str:
        return " or ".join(f"`{word}`" for word in self.words)


class NameMap:
    """A JSON object of names to names (``{"alloy": "alice.wav"}``); what the names may be is
    checked where they are used."""

    def __call__(self, name: str, raw: str) -> dict[str, str]:
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError(f"{name} must be a JSON object of names to names, such as "
                             '{"alloy": "alice.wav"}')
        return value

    def accepts(self) -> str:
        return 'JSON object, `{"name": "voice.wav"}`'


# A model's name in F5_MODELS, a job's "model" and OpenAI's model field: what a caller may type.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MODEL_FIELDS = ("ckpt", "vocab", "config", "language")  # ckpt required; the others default (model.registry)
LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(?:_[A-Z]{2})?\Z")  # ISO 639 and a region: en, de, pt_BR
MODEL_MAP_EXAMPLE = ('{"de": {"ckpt": "hf://owner/repo/model.pt", "vocab": "hf://owner/repo/vocab.txt", '
                     '"config": "F5TTS_Base"}}')


class ModelMap:
    """A JSON object of model names to their files (``MODEL_MAP_EXAMPLE``); where each file is
    found is checked where the models are resolved (f5worker.model.store)."""

    def __call__(self, name: str, raw: str) -> dict[str, dict[str, str]]:
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict) or not value:
            raise ValueError(f"{name} must be a JSON object of model names to their files, such as {MODEL_MAP_EXAMPLE}")
        for model, files in value.items():
            if not MODEL_NAME.match(model):
                raise ValueError(f"{name} names a model {model[:SHOWN_CHARS]!r}; a model's name is 1 to 64 letters, "
                                 "digits, '.', '_' or '-', beginning with a letter or digit")
            if not isinstance(files, dict) or not isinstance(files.get("ckpt"), str) \
                    or not all(isinstance(v, str) and v.strip() for v in files.values()):
                raise ValueError(f"{name}: model {model!r} must be an object with \"ckpt\" and optionally \"vocab\" "
                                 "and \"config\", each a local path or an hf://owner/repo/path address")
            if "language" in files and not LANGUAGE_CODE.match(files["language"].strip()):
                raise ValueError(f"{name}: model {model!r} has language {files['language'][:SHOWN_CHARS]!r}; a "
                                 "language is an ISO 639 code such as 'de' or 'pt_BR'")
            unknown = sorted(set(files) - set(MODEL_FIELDS))
            if unknown:
                raise ValueError(f"{name}: model {model!r} has {unknown[0][:SHOWN_CHARS]!r}, which is not one of "
                                 f"{', '.join(MODEL_FIELDS)}")
        return {model: {k: v.strip() for k, v in files.items()} for model, files in value.items()}

    def accepts(self) -> str:
        return 'JSON object, `{"name": {"ckpt": …, "vocab": …, "config": …, "language": …}}`'


class NameList:
    """Comma-separated model names (``de, fr``); which names exist is checked where they are used."""

    def __call__(self, name: str, raw: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in raw.split(",") if part.strip())
        bad = [n for n in names if not MODEL_NAME.match(n)]
        if bad:
            raise ValueError(f"{name} must be model names separated by commas, not {bad[0][:SHOWN_CHARS]!r}")
        return names

    def accepts(self) -> str:
        return "names, comma-separated"


class Secret:
    """Text that is never shown: not in a sentence, a log line or the README."""

    def __call__(self, name: str, raw: str) -> str:
        return raw

    def accepts(self) -> str:
        return "text (never logged)"


class Present:
    """Whether the variable is set at all (RunPod's own markers)."""

    def __call__(self, name: str, raw: str) -> bool:
        return True

    def accepts(self) -> str:
        return "set or unset"


@dataclass(frozen=True)
class Var:
    """One setting: its variable, how its text is read, its default, what it means.

    ``shown`` is how the README shows a default computed at start (a folder under the volume,
    say); ``offered`` puts the variable in the RunPod Hub listing (``.runpod/hub.json``)."""

    env: str
    parse: Parser
    default: Any
    doc: str
    shown: str | None = None
    offered: bool = False

    def read(self, env) -> Any:
        raw = env.get(self.env) or ""  # stripped by the caller (Settings.from_env)
        return self.parse(self.env, raw) if raw else self.default

    def shown_default(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.default is None:
            return "unset"
        if isinstance(self.default, bool):
            return f"`{int(self.default)}`"
        if isinstance(self.default, (int, float)):
            return f"`{figure(self.default)}`"
        return f"`{self.default}`"

    def markdown_row(self) -> str:
        return f"| `{self.env}` | {self.shown_default()} | {self.parse.accepts()} | {self.doc} |"
