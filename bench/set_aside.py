"""What setting a model call aside between two of its steps costs (the batcher's preemption).

    python bench/set_aside.py --out OUT.json [--device cuda] [--frames 1464] [--batch 1] [--tiny]

Why this module exists: a short job that arrives beside a chapter sets the chapter's call aside
after its current step (f5worker.inference.batcher). On the fast path both calls take turns on one
bucket's CUDA graph, and each turn saves the leaving call's y out of the graph's static buffers and
loads the other's in (``fast._Graph.take``). This times 32 steps of one integration run whole, twice
over, against two integrations of the same bucket alternating every step (63 hand-overs), on
random weights of F5TTS_v1_Base's exact layout (fp16 on CUDA; compute does not depend on the
weights). The difference per hand-over is the cost of setting a call aside. ``--tiny`` shrinks the
model for a smoke run on the CPU (eager steps, no graph: its figures are not the GPU's).
Reproduce on any machine: ``scripts/setup.sh --dev && .venv/bin/python bench/set_aside.py --out x.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = 32
TEXT_TOKENS = 200


def full_arch() -> dict:
    from importlib.resources import files as package_files

    import yaml

    config = Path(str(package_files("f5_tts").joinpath("configs/F5TTS_v1_Base.yaml")))
    return yaml.safe_load(config.read_text())["model"]["arch"]


def inputs(*, batch: int, frames: int, device: str, dtype, seed: int):
    """(y, step_cond, text, mask, t): noise, a reference prefix of a third of the frames, text."""
    import torch

    from tests.helpers import VOCAB

    gen = torch.Generator(device=device).manual_seed(seed)
    y = torch.randn(batch, frames, 100, device=device, dtype=dtype, generator=gen)
    prefix = (torch.arange(frames, device=device)[None, :, None] < frames // 3).to(dtype)
    step_cond = torch.randn(y.shape, device=device, dtype=dtype, generator=gen) * prefix
    text = torch.randint(0, VOCAB, (batch, TEXT_TOKENS), device=device, generator=gen)
    t = torch.linspace(0, 1, STEPS + 1, device=device, dtype=dtype)
    return y, step_cond, text, None, t


def timed(fn, device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(runner, cases, device: str, repeats: int) -> dict:
    """Seconds for both cases run whole one after the other, and for both alternating each step."""
    def whole():
        for case in cases:
            runner.integrate(*case, STEPS, 2.0)

    def alternating():
        runs = [runner.start(*case, STEPS, 2.0) for case in cases]
        for _ in range(STEPS):
            for run in runs:
                run.step()
        for run in runs:
            run.result()
            run.close()

    timed(whole, device), timed(alternating, device)  # captures, kernel choice, allocations
    pairs = [(timed(whole, device), timed(alternating, device)) for _ in range(repeats)]
    whole_s = statistics.median(p[0] for p in pairs)
    alternating_s = statistics.median(p[1] for p in pairs)
    hand_overs = 2 * STEPS - 1
    step_s = whole_s / (2 * STEPS)
    per_hand_over = (alternating_s - whole_s) / hand_overs
    return {"steps_per_integration": STEPS, "repeats": repeats, "whole_s": round(whole_s, 5),
            "alternating_s": round(alternating_s, 5), "step_ms": round(step_s * 1e3, 3),
            "hand_overs": hand_overs, "set_aside_ms": round(per_hand_over * 1e3, 3),
            "set_aside_share_of_a_step": round(per_hand_over / step_s, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: the GPU when there is one)")
    parser.add_argument("--frames", type=int, default=1464, help="frames per row (1464: about 15.6 s of audio)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a shrunken model, for a smoke run")
    args = parser.parse_args(argv)

    import torch

    from bench.stack import write_report
    from f5worker.inference.device import pick_device, pick_dtype
    from f5worker.inference.fast import BucketedStepRunner
    from tests.helpers import TINY_ARCH, tiny_dit

    device = pick_device(args.device)
    dtype = pick_dtype(device)
    model = tiny_dit(arch=TINY_ARCH if args.tiny else full_arch()).to(device, dtype)
    runner = BucketedStepRunner(model, use_graphs=device.startswith("cuda"), varlen=False)  # unfused graphs
    cases = [inputs(batch=args.batch, frames=args.frames, device=device, dtype=dtype, seed=seed) for seed in (1, 2)]
    with torch.inference_mode():
        figures = measure(runner, cases, device, args.repeats)
    result = write_report(args.out, {"model": "tiny" if args.tiny else "F5TTS_v1_Base architecture, random weights",
                                     "dtype": str(dtype), "level": runner.level, "batch": args.batch,
                                     "frames": args.frames, **figures}, device=device)
    print(f"set aside: {result['set_aside_ms']} ms per hand-over against {result['step_ms']} ms per step "
          f"({result['level']}, batch {args.batch} x {args.frames} frames on {result['device']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
