"""Build diffusers models qcompile has never seen, from calibration files written the way a diffusers
script writes them, and print eps SQNR per model.

    python tools/user_models.py [--work out/user_models] [--rows 16]

For each model: a tiny config of the real architecture (seeded random weights) saved with
`save_pretrained`, and an .npz holding what a sampling loop hands the component: int64 timesteps
from a DDPM/DDIM scheduler (float ones from SD3's flow-matching scheduler), fp16 latents noised by
the scheduler's own `add_noise`/`scale_noise`, fp16 text embeddings, at a latent size and prompt
length other than the config's defaults. Then `qcompile build <folder> --calib file.npz` for
ort-int8, as a user would run it (the last quarter of the rows is held out for validation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # the shapes the npz uses, against the config's defaults
    make: Callable[[Path, int], None]  # (folder, rows): save the model and write folder/calib.npz


def _save(module: torch.nn.Module, folder: Path) -> None:
    module.save_pretrained(folder / "model")  # safetensors, config.json


def _ddpm_timesteps(rows: int, scheduler: str = "ddpm") -> torch.Tensor:
    """What a sampling loop passes the model: the scheduler's own int64 timesteps."""
    from diffusers import DDIMScheduler, DDPMScheduler

    s = DDIMScheduler() if scheduler == "ddim" else DDPMScheduler()
    s.set_timesteps(rows)
    return s.timesteps  # int64, descending


def _noised(x0: torch.Tensor, t: torch.Tensor, seed: int) -> torch.Tensor:
    from diffusers import DDPMScheduler

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return DDPMScheduler().add_noise(x0, noise, t)


def _latent(rows: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """A smooth clean latent (upsampled noise), as a VAE's latents are smooth."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(rows, c, max(1, h // 4), max(1, w // 4), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def _text(rows: int, tokens: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, tokens, dim, generator=torch.Generator().manual_seed(seed))


def _write(folder: Path, **arrays: Any) -> None:
    np.savez(folder / "calib.npz", **{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in arrays.items()})


def sdxl_unet(folder: Path, rows: int) -> None:
    from diffusers import UNet2DConditionModel

    from qcompile.models.unet2d_condition import UNet2DConditionAdapter

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{k: v for k, v in UNet2DConditionAdapter.tiny_sdxl_config().items()
                                   if not k.startswith("_")})
    _save(unet, folder)
    t = _ddpm_timesteps(rows, "ddim")
    h, w, tokens = 24, 20, 20  # config: 16x16 latent, 77 tokens
    x = _noised(_latent(rows, 4, h, w, 1), t, 2)
    ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]], dtype=torch.float16).repeat(rows, 1)
    _write(folder, sample=x.half(), timestep=t, encoder_hidden_states=_text(rows, tokens, 32, 3).half(),
           text_embeds=torch.randn(rows, 32).half(), time_ids=ids)


def pixart(folder: Path, rows: int) -> None:
    from diffusers import PixArtTransformer2DModel

    from qcompile.models.transformer2d import Transformer2DAdapter

    torch.manual_seed(0)
    cfg = {k: v for k, v in Transformer2DAdapter.tiny_pixart_config().items() if not k.startswith("_")}
    _save(PixArtTransformer2DModel(**cfg), folder)
    t = _ddpm_timesteps(rows)
    x = _noised(_latent(rows, 4, 16, 16, 1), t, 2)
    size = torch.tensor([[128.0, 128.0]]).repeat(rows, 1)
    _write(folder, hidden_states=x.half(), encoder_hidden_states=_text(rows, 120, 24, 3).half(), timestep=t,
           resolution=size.half(), aspect_ratio=torch.ones(rows, 1).half())


def sd3(folder: Path, rows: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from qcompile.models.sd3_transformer import SD3TransformerAdapter

    torch.manual_seed(0)
    cfg = {k: v for k, v in SD3TransformerAdapter.tiny_config().items() if not k.startswith("_")}
    _save(SD3Transformer2DModel(**cfg), folder)
    s = FlowMatchEulerDiscreteScheduler()
    s.set_timesteps(rows)
    t = s.timesteps  # float32 in [0, 1000]
    x0 = _latent(rows, 4, 24, 24, 1)  # config: 16x16 latent
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    sigma = (t / 1000.0).reshape(-1, 1, 1, 1)
    x = (1 - sigma) * x0 + sigma * noise  # FlowMatchEulerDiscreteScheduler.scale_noise, per row
    _write(folder, hidden_states=x.half(), encoder_hidden_states=_text(rows, 154, 32, 3).half(),
           pooled_projections=torch.randn(rows, 32).half(), timestep=t)


def vae_decoder(folder: Path, rows: int) -> None:
    from diffusers import AutoencoderKL

    from qcompile.models.autoencoder_kl import VaeDecoderAdapter

    torch.manual_seed(0)
    vae = AutoencoderKL(**{k: v for k, v in VaeDecoderAdapter.tiny_config().items() if not k.startswith("_")})
    _save(vae, folder)
    latents = _latent(rows, 4, 12, 20, 1)  # config: sample_size 32 / 2 = 16x16 latents
    _write(folder, z=(latents / vae.config.scaling_factor).double())  # float64, as numpy code often has it


def unet2d(folder: Path, rows: int) -> None:
    from diffusers import UNet2DModel

    from qcompile.models.unet2d import UNet2DAdapter

    torch.manual_seed(0)
    _save(UNet2DModel(**{k: v for k, v in UNet2DAdapter.tiny_config().items() if not k.startswith("_")}), folder)
    t = _ddpm_timesteps(rows)
    x = _noised(_latent(rows, 3, 24, 24, 1).clamp(-1, 1), t, 2)  # config: 16x16
    _write(folder, sample=x.half(), timestep=t.to(torch.int32))


CASES = (
    Case("sdxl-unet", "latent 24x20 (config 16x16), 20 tokens (77), DDIM int64 timesteps, fp16", sdxl_unet),
    Case("pixart", "120 T5 tokens, DDPM int64 timesteps, fp16", pixart),
    Case("sd3", "latent 24x24 (config 16x16), 154 tokens (333), flow-matching float timesteps, fp16", sd3),
    Case("vae-decoder", "latent 12x20 (config 16x16), float64", vae_decoder),
    Case("unet2d", "24x24 (config 16x16), DDPM int32 timesteps, fp16", unet2d),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("out/user_models"))
    ap.add_argument("--rows", type=int, default=16, help="calibration rows per model (a quarter is held out)")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    qcompile = Path(sys.executable).with_name("qcompile")
    rows = []
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        folder = args.work / case.name
        folder.mkdir(parents=True, exist_ok=True)
        case.make(folder, args.rows)
        out = folder / "artifact"
        cmd = [str(qcompile), "build", str(folder / "model"), "--calib", str(folder / "calib.npz"), "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        casts = [ln for ln in proc.stdout.splitlines() if "cast to the graph's input dtypes" in ln]
        report = out / "report.json" if proc.returncode == 0 else out.with_name("artifact.failed") / "report.json"
        sqnr = json.loads(report.read_text())["summary"]["eps_sqnr_db_mean"] if report.is_file() else None
        rows.append((case, proc.returncode, sqnr, casts[0].split("input dtypes: ")[1] if casts else ""))
        if proc.returncode not in (0, 1):
            print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "", file=sys.stderr)
    print("| model | calibration file | rc | eps SQNR (dB, held-out rows) | cast |")
    print("|---|---|---|---|---|")
    for case, rc, sqnr, cast in rows:
        print(f"| {case.name} | {case.what} | {rc} | {'-' if sqnr is None else f'{sqnr:.2f}'} | {cast.strip()} |")


if __name__ == "__main__":
    main()
