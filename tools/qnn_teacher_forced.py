"""Per-step guided eps SQNR against fp32, teacher-forced, for several QNN artifacts on HTP and the CPU EP.

    python tools/qnn_teacher_forced.py ART_K1 ART_K4 [...] [--seeds 3 4] [--labels-per-seed 2]

Free sampling on the simulator is slow and noisy. At W8A8, HTP's fixed-point rounding moves images
as much as quantization does. So this feeds every artifact the fp32 model's own x_t, along fp32
trajectories, and compares the guided noise predictions step by step. The question it answers:
does an artifact's gain (K=4 over K=1, say) hold per call on the device, as it does on the CPU EP?
A second table gives the mean of the raw eps error per step: a bias a fifth of the error's std costs
SQNR nothing, but sampling accumulates it (K=4's buckets on HTP, see targets/qnn/README.md).
Each seed draws `--labels-per-seed` labels, (seed + 5 i) mod classes, one trajectory each.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from qcompile.config import FidelitySettings
from qcompile.evaluation.metrics import sqnr_db
from qcompile.evaluation.sampling import DenoiserCall, guided, sample
from qcompile.manifest import Manifest
from qcompile.models.source import resolve_model
from qcompile.runtime import OnnxRunner
from qcompile.targets.qnn.target import QnnW8A8Target

DEVICES = ("htp", "cpu_ep")


def per_step_table(columns: dict[str, dict[float, float]], fmt: str) -> list[str]:
    """Markdown rows: one per timestep (latest first), one column per artifact and device."""
    names = list(columns)
    lines = ["| timestep | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for t in sorted(next(iter(columns.values())), reverse=True):
        lines.append(f"| {t:.0f} | " + " | ".join(format(columns[n][t], fmt) for n in names) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", type=Path, nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--labels-per-seed", type=int, default=2)
    args = ap.parse_args()
    first = Manifest.read(args.artifacts[0])
    src, model = first.source, first.model
    x_name, t_name = model.sample_input, model.timestep_input
    setup = resolve_model(src.model, src.component, seed=src.seed).sampling()
    one_per_class = setup.labels(1)
    reference = OnnxRunner([args.artifacts[0] / src.fp32_model], timestep_name=t_name, sample_name=x_name)
    sampler = FidelitySettings().sampler
    calls: list[DenoiserCall] = []

    def fp32(x, t, cond):
        return np.asarray(reference.run({x_name: x, t_name: t, setup.cond_input: cond}))

    for seed in args.seeds:
        for i in range(args.labels_per_seed):
            label = one_per_class[(seed + 5 * i) % len(one_per_class)]
            sample(fp32, replace(sampler, seed=seed), cond=setup.conditioning([label]),
                   uncond=setup.null_conditioning(1), latent_shape=(1, *setup.latent_shape),
                   scheduler_config=setup.scheduler_config, hook=calls.append)
    columns: dict[str, dict[float, float]] = {}
    biases: dict[str, dict[float, float]] = {}
    for artifact in args.artifacts:
        manifest = Manifest.read(artifact)
        for device in DEVICES:
            runner = QnnW8A8Target().runner(artifact, manifest, htp=device == "htp")
            per_t: dict[float, list[float]] = {}
            bias_t: dict[float, list[float]] = {}
            for c in calls:
                out = np.asarray(runner.run({x_name: c.sample, t_name: np.full(len(c.sample), c.timestep, np.float32),
                                             setup.cond_input: c.cond}))
                per_t.setdefault(c.timestep, []).append(sqnr_db(guided(c.eps, sampler.guidance),
                                                                guided(out, sampler.guidance)))
                bias_t.setdefault(c.timestep, []).append(float(np.mean(out - c.eps)))
            columns[f"{artifact.name} {device}"] = {t: float(np.mean(v)) for t, v in per_t.items()}
            biases[f"{artifact.name} {device}"] = {t: float(np.mean(v)) for t, v in bias_t.items()}
    lines = per_step_table(columns, ".2f")
    lines.append("| mean | " + " | ".join(f"{np.mean(list(v.values())):.2f}" for v in columns.values()) + " |")
    lines += ["", "mean eps error (bias), raw batch:", "", *per_step_table(biases, "+.5f")]
    print("\n".join(lines))
    print(f"\n{len(calls)} calls per artifact and device: seeds {args.seeds}, {args.labels_per_seed} labels each, "
          f"{sampler.scheduler.value} {sampler.steps} steps, guidance {sampler.guidance}")


if __name__ == "__main__":
    main()
