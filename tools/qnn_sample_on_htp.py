"""Sample images on the QNN HTP simulator with several artifacts of one model, paired by seed and label.

    python tools/qnn_sample_on_htp.py ART_K1 ART_K4 [...] [--per-class 1] [--seed 0] [--out out/qnn-sample-on-htp]

A build's device check samples only a couple of images (the simulator costs about a second per
sample per call). To compare artifacts (K=1 against K=4 buckets, W8A8 against W8A16) this runs free
sampling only (no teacher forcing), the same seeds and labels for every artifact, on HTP and on the
CPU EP, and reports mean sample PSNR against fp32 with the per-image differences to the first artifact.
Writes table.md and table.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from qcompile.artifact import read_manifest
from qcompile.config import FidelitySettings
from qcompile.evaluation.metrics import psnr_db
from qcompile.evaluation.sampling import sample
from qcompile.models.source import resolve_model
from qcompile.runtime import OnnxRunner
from qcompile.targets.qnn.target import QnnW8A8Target


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
    ap.add_argument("--seed", type=int, default=0, help="noise seed: another seed draws another image set")
    ap.add_argument("--out", type=Path, default=Path("out/qnn-sample-on-htp"))
    args = ap.parse_args()
    first = read_manifest(args.artifacts[0])
    src, model = first["source"], first["model"]
    names = (model["sample_input"], model["timestep_input"])
    setup = resolve_model(src["model"], src.get("component"), seed=src.get("seed", 0)).sampling()
    sampler = replace(FidelitySettings().sampler, seed=args.seed)
    labels = setup.labels(args.per_class)
    reference = OnnxRunner([args.artifacts[0] / src["fp32_model"]], timestep_name=names[1], sample_name=names[0])
    fp32 = images(reference, setup, labels, sampler, names)
    rows, base = [], None
    for artifact in args.artifacts:
        manifest = read_manifest(artifact)
        row = {"artifact": str(artifact), "target": manifest["target"], "buckets": len(manifest["buckets"])}
        for device, htp in (("htp", True), ("cpu_ep", False)):
            t0 = time.perf_counter()
            got = images(QnnW8A8Target().runner(artifact, manifest, htp=htp), setup, labels, sampler, names)
            per_image = np.array([psnr_db(a, b) for a, b in zip(fp32, got, strict=True)])
            row[f"{device}_psnr_db"] = round(float(per_image.mean()), 3)
            row[f"{device}_seconds"] = round(time.perf_counter() - t0, 1)
            row[f"_{device}_per_image"] = per_image
        if base is None:
            base = row
        for device in ("htp", "cpu_ep"):
            diff = row[f"_{device}_per_image"] - base[f"_{device}_per_image"]
            row[f"{device}_gain_vs_first_db"] = round(float(diff.mean()), 3)
            row[f"{device}_images_better"] = f"{int((diff > 0).sum())}/{len(diff)}"
        rows.append(row)
        print({k: v for k, v in row.items() if not k.startswith("_")}, flush=True)
    cols = ["artifact", "target", "buckets", "htp_psnr_db", "htp_gain_vs_first_db", "htp_images_better",
            "cpu_ep_psnr_db", "cpu_ep_gain_vs_first_db", "cpu_ep_images_better", "htp_seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(lines) + f"\n\n{len(labels)} images, {sampler.scheduler.value} "
                                       f"{sampler.steps} steps, guidance {sampler.guidance}, seed {sampler.seed}\n")
    (args.out / "table.json").write_text(json.dumps([{k: v for k, v in r.items() if not k.startswith("_")}
                                                     for r in rows], indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
