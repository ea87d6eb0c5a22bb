"""Writes the reliability figures the tests measure into tests/RELIABILITY.md, and holds the one
check they all apply to an error (``sentence_problems``).

Why this module exists: reliability figures must come from the test suite itself (property test,
fault matrix, soak), not typed in by hand. Each producer owns one section of the file, delimited by
``<!-- BEGIN name -->`` / ``<!-- END name -->``, and rewrites only that section, stamped with the
date, the commit and the command that produced it. Sections keep the order they were first written in.
"""
from __future__ import annotations

import datetime
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPORT = REPO / "tests" / "RELIABILITY.md"
HEADER = """# Reliability figures

Written by the test suite (``tests/test_reliability_*.py``) and by the full soak
(``python bench/soak.py --jobs 1000 --record``); each section says when, on which commit and by
which command it was produced. Do not edit the sections by hand: run the command again.
"""


def provenance(command: str) -> str:
    """One line: UTC date, commit (marked when the tree had uncommitted changes) and command."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!tests/RELIABILITY.md"):
        commit += " + uncommitted changes"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"_{when}, commit {commit}, `{command}`_"


def whole_run(config) -> bool:
    """Whether pytest runs every test it collected: no ``-k``, ``-m``, ``--deselect`` or node id
    (``file.py::test``). Only such a run may rewrite a section; a selection's figures are partial
    (the fault matrix's guard counted the selected items, so ``-k`` wrote a table of a few rows)."""
    return not (config.getoption("keyword") or config.getoption("markexpr") or config.getoption("deselect")
                or any("::" in str(arg) for arg in config.args))


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of tests/RELIABILITY.md with ``body``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = REPORT.read_text(encoding="utf-8") if REPORT.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    REPORT.write_text(text, encoding="utf-8")


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table; ``|`` inside a cell is escaped."""
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def sentence_problems(message: object, secrets_: set[str]) -> list[str]:
    """What is wrong with ``message`` as a job's error: it must be one line, one sentence ending in
    a full stop, no traceback, not the catch-all internal error, and none of ``secrets_`` in it."""
    if not isinstance(message, str) or not message:
        return ["error is not a non-empty string"]
    problems = []
    if "\n" in message or "\r" in message:
        problems.append("error spans lines")
    if "Traceback" in message or 'File "' in message:
        problems.append("error holds a traceback")
    if message.startswith("Internal error"):
        problems.append("internal error")
    if not message.endswith("."):
        problems.append("error does not end with a full stop")
    if message != message.strip():
        problems.append("error has surrounding whitespace")
    if re.search(r"[.!?]\s+[A-Z]", re.sub(r"'[^']*'", "''", message)[:-1]):
        problems.append("error is more than one sentence")
    if any(s in message for s in secrets_):
        problems.append("error shows a secret")
    return problems
