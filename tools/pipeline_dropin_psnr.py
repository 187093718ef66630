"""Image PSNR of a tiny StableDiffusionPipeline with its UNet compiled for each target and swapped in
(`pipe.unet = qcompile.load(DIR)`), against the float pipeline on the same prompts and generator.

The pipeline is tests/tiny_pipeline.py's (random weights, made offline); the UNet is calibrated on the
pipeline's own calls on eight prompts, once, and every target reuses the float model and statistics.
tests/test_pipeline_dropin.py checks ort-int8 and tflite-int8 the same way; this adds the QNN targets
(their builds compile HTP context binaries and check them on the simulator: about a minute each).

    python tools/pipeline_dropin_psnr.py --out /tmp/dropin --targets ort-int8 tflite-int8 qnn-w8a16 qnn-w8a8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny pipeline the tests use
from tiny_pipeline import save_tiny_sd_pipeline  # noqa: E402

import qcompile  # noqa: E402
from qcompile.config import FidelitySettings, SamplerSettings  # noqa: E402

STEPS, GUIDANCE = 8, 4.0
CALIBRATION_PROMPTS = ["a red fox", "a blue sky", "an old tree", "a wet rock", "a hot sun", "a green leaf",
                       "a cat", "a dog"]
PROMPTS = ["a red fox in snow", "a boat"]


def generate(pipe) -> np.ndarray:
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(0), output_type="np").images


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (pipeline, statistics, artifacts)")
    parser.add_argument("--targets", nargs="+", default=["ort-int8", "tflite-int8", "qnn-w8a16", "qnn-w8a8"])
    parser.add_argument("--buckets", type=int, default=2)
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    sd = save_tiny_sd_pipeline(args.out / "pipeline")
    prompts = args.out / "prompts.txt"
    prompts.write_text("\n".join(CALIBRATION_PROMPTS))
    pipe = StableDiffusionPipeline.from_pretrained(str(sd), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    reference = generate(pipe)
    fidelity = FidelitySettings(sampler=SamplerSettings(steps=STEPS, guidance=GUIDANCE), device_samples=0)
    rows, first = [], None
    for target in args.targets:
        start = time.perf_counter()
        result = qcompile.build(sd, args.out / target, component="unet", target=target, calib=f"prompts:{prompts}",
                                calib_cache=args.out / "statistics", export_from=first, buckets=args.buckets,
                                validate_count=4, fidelity=fidelity)
        first = first or result.out_dir
        seconds = time.perf_counter() - start
        swap = StableDiffusionPipeline.from_pretrained(str(sd), local_files_only=True)
        swap.set_progress_bar_config(disable=True)
        swap.unet = qcompile.load(result.out_dir)
        per_image = [psnr_db(a, b) for a, b in zip(generate(swap), reference, strict=True)]
        rows.append((target, result.passed, seconds, per_image))
    print(f"\n{STEPS} DDIM steps, guidance {GUIDANCE}, {args.buckets} bucket(s); image PSNR vs the float pipeline")
    print("| target | build passed | build s | PSNR dB per image |\n|---|---|---|---|")
    for target, passed, seconds, per_image in rows:
        print(f"| {target} | {passed} | {seconds:.0f} | {', '.join(f'{p:.2f}' for p in per_image)} |")


if __name__ == "__main__":
    main()
