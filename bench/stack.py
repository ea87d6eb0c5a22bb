"""Which Python, torch, CUDA and Triton this machine runs, against the versions the image pins.

    python bench/stack.py [OUT.json]

Why this module exists: a GPU run is only evidence for the image if it ran the image's stack; a
machine's own torch may differ (another CUDA, another Triton). bench/device_run.sh runs this first,
records the JSON, and its summary says when the stack is not the pinned one.
"""
from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PYTHON = "3.11"  # pytorch/pytorch:<torch>-cuda12.8-cudnn9-runtime (Dockerfile.runpod)
IMAGE_CUDA = "12.8"


def pinned_torch() -> str:
    return re.search(r"^torch==(\S+)$", (ROOT / "requirements-torch.txt").read_text(), re.M).group(1)


def stack() -> dict:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "triton": triton_version, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    pinned = {"python": IMAGE_PYTHON, "torch": pinned_torch(), "cuda": IMAGE_CUDA}
    differs = [name for name, want in pinned.items() if not str(found[name] or "").startswith(want)]
    return {"found": found, "pinned": pinned, "differs": differs,
            "note": ("the pinned stack" if not differs else
                     "NOT the image's pinned stack (" + ", ".join(f"{n} {found[n]} instead of {pinned[n]}"
                                                              for n in differs) + ")")}


def write_report(out: Path, result: dict, *, device: str) -> dict:
    """``result`` with the device's name and the stack's note added, written to ``out`` as JSON:
    what every single-figure bench records beside its figures."""
    import torch

    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    report = {**result, "device": name, "stack": stack()["note"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str]) -> int:
    result = stack()
    text = json.dumps(result, indent=1)
    if argv:
        Path(argv[0]).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
