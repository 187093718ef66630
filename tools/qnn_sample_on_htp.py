"""Sample images on the QNN HTP simulator with several artifacts of one model, paired by seed and label.

    python tools/qnn_sample_on_htp.py ART_K1 ART_K4 [...] [--per-class 1] [--seeds 0 1 ...]
        [--devices htp cpu_ep] [--out out/qnn-sample-on-htp]

A build's device check samples only a couple of images (the simulator costs about a second per
sample per call). To compare artifacts (K=1 against K=4 buckets, W8A8 against W8A16) this runs free
sampling only (no teacher forcing), the same seeds and labels for every artifact, on HTP and on the
CPU EP, and reports mean sample PSNR against fp32 with the per-image differences to the first artifact.
Writes table.md and table.json (with every image's PSNR, so runs over other seeds can be pooled).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from qcompile.config import FidelitySettings
from qcompile.evaluation.metrics import psnr_db
from qcompile.evaluation.sampling import sample
from qcompile.manifest import Manifest
from qcompile.models.source import resolve_model
from qcompile.runtime import OnnxRunner
from qcompile.targets.qnn.target import QnnW8A8Target

DEVICES = ("htp", "cpu_ep")


def images(runner, setup, labels, sampler, names) -> np.ndarray:
    def call(x, t, cond):
        return np.asarray(runner.run({names[0]: x, names[1]: t, setup.cond_input: cond}))

    return np.clip(sample(call, sampler, cond=setup.conditioning(labels), uncond=setup.null_conditioning(len(labels)),
                          latent_shape=(len(labels), *setup.latent_shape),
                          scheduler_config=setup.scheduler_config), -1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", type=Path, nargs="+")
    ap.add_argument("--per-class", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="noise seeds: each draws another image set of --per-class images per label")
    ap.add_argument("--devices", nargs="+", choices=DEVICES, default=list(DEVICES),
                    help="cpu_ep alone sweeps many images in seconds (the simulator takes ~1 s per sample-call)")
    ap.add_argument("--out", type=Path, default=Path("out/qnn-sample-on-htp"))
    args = ap.parse_args()
    first = Manifest.read(args.artifacts[0])
    src, model = first.source, first.model
    names = (model.sample_input, model.timestep_input)
    setup = resolve_model(src.model, src.component, seed=src.seed).sampling()
    labels = setup.labels(args.per_class)
    reference = OnnxRunner([args.artifacts[0] / src.fp32_model], timestep_name=names[1], sample_name=names[0])
    samplers = [replace(FidelitySettings().sampler, seed=seed) for seed in args.seeds]
    fp32 = [images(reference, setup, labels, sampler, names) for sampler in samplers]
    rows, base = [], None
    for artifact in args.artifacts:
        manifest = Manifest.read(artifact)
        row = {"artifact": str(artifact), "target": manifest.target, "buckets": len(manifest.buckets)}
        for device in args.devices:
            t0 = time.perf_counter()
            runner = QnnW8A8Target().runner(artifact, manifest, htp=device == "htp")
            per_image = np.concatenate([[psnr_db(a, b) for a, b in zip(want, images(runner, setup, labels, sampler,
                                                                                         names), strict=True)]
                                        for want, sampler in zip(fp32, samplers, strict=True)])
            row[f"{device}_psnr_db"] = round(float(per_image.mean()), 3)
            row[f"{device}_seconds"] = round(time.perf_counter() - t0, 1)
            row[f"_{device}_per_image"] = per_image
        if base is None:
            base = row
        for device in args.devices:
            diff = row[f"_{device}_per_image"] - base[f"_{device}_per_image"]
            row[f"{device}_gain_vs_first_db"] = round(float(diff.mean()), 3)
            row[f"{device}_gain_stderr_db"] = round(float(diff.std() / np.sqrt(len(diff))), 3)
            row[f"{device}_images_better"] = f"{int((diff > 0).sum())}/{len(diff)}"
        rows.append(row)
        print({k: v for k, v in row.items() if not k.startswith("_")}, flush=True)
    cols = ["artifact", "target", "buckets"] + [f"{d}_{c}" for d in args.devices for c in
                                                ("psnr_db", "gain_vs_first_db", "gain_stderr_db", "images_better")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    sampler = samplers[0]
    (args.out / "table.md").write_text("\n".join(lines) + f"\n\n{len(labels) * len(samplers)} images, "
                                       f"{sampler.scheduler.value} {sampler.steps} steps, guidance "
                                       f"{sampler.guidance}, seeds {args.seeds}\n")
    (args.out / "table.json").write_text(json.dumps([
        {k.lstrip("_"): [round(float(x), 3) for x in v] if k.startswith("_") else v for k, v in r.items()}
        for r in rows], indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
