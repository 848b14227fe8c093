"""Would bf16 GEMMs inside the op hurt APO-Precond's training? A quality check, not a speed one.

The CPU op computes its four GEMMs in fp32 (for half inputs too: fp32 GEMMs on upcast copies, the
result rounded once). bf16 GEMM units (AMX, avx512_bf16) would run them about 2× faster, at the
price of rounding every GEMM operand to bf16, H = Aᵀ·G·B included, before ⊙S². This script
emulates that op on the ``reference`` backend (every operand rounded to bf16, products and ⊙S² in
fp32; the meta-gradient stays exact) and trains fp32 models with APO-Precond at the point each paper
experiment chose (``python/results/<experiment>.json``), next to the ``cpu`` and ``reference``
backends, on the same seeds. It reports each experiment's own score (test accuracy, or final
training loss where the paper scores that).

    python python/measure_bf16_gemm_quality.py [--experiments classification,ill_conditioned,autoencoder] [--seeds 8]
                                               [--steps N]   # N steps instead of each task's own (a smoke run)
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from paper import common as C  # noqa: E402

from apo_kernels.ops import Backend, reference, register  # noqa: E402

EMULATED = "reference-bf16-gemm"


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


def precondition_bf16_operands(grad, A, S, B):
    """Y = A (S ⊙ (Aᵀ grad B)) Bᵀ with every GEMM operand rounded to bf16, products in fp32."""
    GB = grad if B is None else _bf16(grad) @ _bf16(B)
    H = GB if A is None else _bf16(A).T @ _bf16(GB)
    M = S * H
    AM = M if A is None else _bf16(A) @ _bf16(M)
    return AM if B is None else _bf16(AM) @ _bf16(B).T


def register_emulation() -> None:
    family = dataclasses.replace(
        reference.FAMILY,
        forward=precondition_bf16_operands,
        grouped=lambda grads, As, Ss, Bs: [precondition_bf16_operands(*layer) for layer in zip(grads, As, Ss, Bs)],
    )
    # below every real backend, so "auto" never picks it
    register(Backend(name=EMULATED, devices=("cpu",), priority=-20, family=family, why_unavailable=lambda: None))


def experiments_with_apo_precond() -> list[str]:
    """The experiments whose recorded results chose an APO-Precond point (what this script reruns)."""
    return sorted(p.stem for p in (ROOT / "results").glob("*.json")
                  if (ROOT / "paper" / f"{p.stem}.py").exists()
                  and any("chosen" in t.get("methods", {}).get("APO-Precond", {})
                          for t in C.read_json(p).get("tasks", {}).values()))


def first_task(experiment: str):
    module = importlib.import_module(f"paper.{experiment}")
    task = module.plan(C.default_args())[0].task  # the full-size task, as the experiment's command line
    result = C.read_json(ROOT / "results" / f"{experiment}.json")
    return task, result["tasks"][task.name]["methods"]["APO-Precond"]["chosen"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", default="classification,ill_conditioned,autoencoder")
    ap.add_argument("--seeds", type=C.cli_int(2), default=8, help="at least 2 (the spread is a std)")
    ap.add_argument("--steps", type=C.cli_int(1), default=None, help="steps per run (default: the task's own)")
    args = ap.parse_args()
    known = experiments_with_apo_precond()
    names = [e.strip() for e in args.experiments.split(",") if e.strip()]
    if not names or set(names) - set(known):
        ap.error(f"--experiments: expected a comma list of {', '.join(known)} (the recorded results with an "
                 f"APO-Precond choice), got {args.experiments!r}")
    torch.set_num_threads(1)
    register_emulation()
    variants = {"cpu": "cpu", "reference": "reference", "reference, bf16 GEMM operands": EMULATED}
    for experiment in names:
        task, chosen = first_task(experiment)
        steps = args.steps or task.steps
        print(f"\n{experiment}: {task.name}, APO-Precond at {json.dumps(chosen)}, {steps} steps, "
              f"score: {'test ' + task.metric if task.metric == 'accuracy' else 'final training loss'}")
        scores = {v: [] for v in variants}
        for seed in range(args.seeds):
            for label, backend in variants.items():
                run = C.train(C.RunSpec(task=task, method="APO-Precond", hp=dict(chosen, backend=backend),
                                        seed=seed, steps=steps))
                scores[label].append(run["report"])
        for label, values in scores.items():
            print(f"  {label:32s} median {statistics.median(values):.4g}, mean {statistics.mean(values):.4g} "
                  f"± {statistics.stdev(values):.2g}  [{', '.join(f'{v:.4g}' for v in values)}]")


if __name__ == "__main__":
    main()
