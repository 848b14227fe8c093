"""Classification (paper §6.2.3, Table 2): an MLP and a CNN on MNIST-1D and a CNN on
scikit-learn's digits; SGDm, Adam, KFAC and APO-Precond, every one with the same step decay
(×0.2 at 30 %, 60 % and 80 % of training: the paper's epochs 60/120/160 of 200). Chosen on
validation accuracy, reporting test accuracy. With --data-dir and --datasets, LeNet-5 tasks on
torchvision datasets already on disk are added (for GPU-scale runs).

    python python/paper/classification.py [--quick] [--steps N] [--seeds S] [--out DIR]
                                          [--data-dir DIR --datasets cifar10,svhn]
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper import common as C  # noqa: E402

NAME = "classification"
TITLE = "Classification (§6.2.3, Table 2)"
MLP_TASK, CNN_TASK, DIGITS_TASK = "MNIST-1D MLP", "MNIST-1D CNN", "Digits CNN"
# torchvision dataset → (input channels, image size, classes)
IMAGE_SHAPES = {"mnist": (1, 28, 10), "fashionmnist": (1, 28, 10), "cifar10": (3, 32, 10),
                "cifar100": (3, 32, 100), "svhn": (3, 32, 10)}


def mnist1d_mlp_task(steps: int) -> C.Task:
    """The MNIST-1D ReLU MLP 40-256-256-10, batch 100 (also used by apo_lr, low_precision and
    ablations)."""
    return C.Task(name=MLP_TASK, data="mnist1d", model=functools.partial(C.mlp, (40, 256, 256, 10)),
                  loss="ce", metric="accuracy", batch_size=100, steps=steps,
                  description="MNIST-1D (3,500 train / 500 val / 1,000 test), 40-256-256-10 ReLU, batch 100")


def tasks(args) -> list[C.Task]:
    q = args.quick
    ts = [
        mnist1d_mlp_task(150 if q else 3000),
        C.Task(name=CNN_TASK, data="mnist1d", model=functools.partial(C.cnn1d), loss="ce",
               metric="accuracy", batch_size=100, steps=150 if q else 3000,
               description="MNIST-1D, the reference CNN (3 convolutions, 25 channels), batch 100"),
        C.Task(name=DIGITS_TASK, data="digits", data_kwargs=(("images", True),),
               model=functools.partial(C.cnn_digits), loss="ce", metric="accuracy", batch_size=64,
               steps=100 if q else 1500,
               description="sklearn digits 8×8 (1,077 train / 360 val / 360 test), small CNN, batch 64"),
    ]
    for name in getattr(args, "dataset_list", []):
        ch, size, classes = IMAGE_SHAPES[name]
        ts.append(C.Task(name=f"{name} LeNet", data="torchvision",
                         data_kwargs=(("name", name), ("data_dir", args.data_dir)),
                         model=functools.partial(C.lenet, ch, size, classes), loss="ce",
                         metric="accuracy", batch_size=128, steps=300 if q else 20000,
                         description=f"torchvision {name} from --data-dir, LeNet-5, batch 128, no augmentation"))
    return ts


def entries(quick: bool, methods=("SGDm", "Adam", "KFAC", "APO-Precond")) -> list[C.Entry]:
    """Four points per method (two with --quick), all with the step-decay schedule."""
    step = ["step"]
    if quick:
        grids = {
            "SGDm": C.grid(lr=[0.1, 0.03], schedule=step),
            "Adam": C.grid(lr=[3e-3, 1e-3], schedule=step),
            "KFAC": C.grid(lr=[0.03], damping=[1e-2, 1e-3], schedule=step),
            "APO-Precond": C.grid(lr=[0.1], meta_lr=[0.1], lambda_fsd=[0.1], lambda_wsd=[0.3, 1.0], schedule=step),
        }
    else:
        grids = {
            "SGDm": C.grid(lr=[0.3, 0.1, 0.03, 0.01], schedule=step),
            "Adam": C.grid(lr=[1e-2, 3e-3, 1e-3, 3e-4], schedule=step),
            "KFAC": C.grid(lr=[0.03, 0.01], damping=[1e-2, 1e-3], schedule=step),
            # λ_WSD keeps the same-batch objective from growing the step (docs/optim.md): ≈ 0.01/lr–0.1/lr
            "APO-Precond": C.grid(lr=[0.1, 0.03], meta_lr=[0.1], lambda_fsd=[0.1], lambda_wsd=[0.3, 1.0],
                                  schedule=step),
        }
    return [C.Entry(m, m, grids[m]) for m in methods]


def plan(args) -> list[C.PlanItem]:
    return [C.plan_item(t, entries(args.quick), args) for t in tasks(args)]


def run(args, progress=None) -> dict:
    return C.run_plan(args, NAME, TITLE, plan(args), progress, C.plot_tasks(NAME))


def claims(result: dict) -> list[dict]:
    """On each task APO-Precond's mean test accuracy ≥ SGDm's and ≥ Adam's."""
    rows = []
    for t in result.get("tasks", {}):
        apo = C.method_stat(result, t, "APO-Precond")
        sgd = C.method_stat(result, t, "SGDm")
        adam = C.method_stat(result, t, "Adam")
        rows.append(C.claim(f"{t}: APO-Precond test accuracy ≥ SGDm and ≥ Adam",
                            "APO-Precond ≥ SGDm and Adam on 10 of 10 tasks (Table 2)",
                            f"APO-Precond {C.fmt(apo)} %, SGDm {C.fmt(sgd)} %, Adam {C.fmt(adam)} %",
                            (apo >= sgd and apo >= adam) if C.finite(apo, sgd, adam) else None))
    return rows


if __name__ == "__main__":
    from paper import classification as _self

    C.experiment_main(_self.run, __doc__)
