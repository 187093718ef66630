"""Record a denoiser's inputs from a real diffusers pipeline run on the user's prompts.

The pipeline folder is loaded whole (tokenizer, text encoder, scheduler, VAE and the component being
compiled) and run as its users run it; a forward pre-hook on the component writes every call's
inputs, keyed by the timestep value the scheduler passed (not by a call counter, so second-order
schedulers and any step count record correctly). With guidance above 1, diffusers pipelines batch
[unconditional; conditional], and the rows are labelled so. Inputs are named as qcompile's ONNX
inputs: the diffusers argument names, with `added_cond_kwargs` (SDXL's text_embeds, time_ids)
flattened.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.calibration.recorder import Recording, RecordingWriter
from qcompile.errors import UserError

PROMPTS_PER_CALL = 4  # prompts per pipeline call (each is one image)


def read_prompts(path: Path) -> list[str]:
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--calib prompts:{path}: the file has no prompts (one per line)")
    return prompts


def _numpy(value) -> np.ndarray:
    """A torch tensor (or a Python number) the pipeline passed, as numpy."""
    return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)


def split_prompts(prompts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(calibration prompts, held-back prompts): with four or more, the last quarter validates the build
    and is never recorded for calibration (the rule a user's .npz follows too)."""
    prompts = list(prompts)
    if len(prompts) < 4:
        return prompts, []
    held = max(1, len(prompts) // 4)
    return prompts[:-held], prompts[-held:]


def record_pipeline(pipeline_dir: Path, component: str, prompts: Sequence[str], adapter, folder: Path, *,
                    steps: int, guidance: float, seed: int, unbatched: frozenset[str],
                    source: dict[str, Any]) -> Recording:
    """Run the pipeline in `pipeline_dir` on `prompts` and record every call of its `component`."""
    import torch
    from diffusers import DiffusionPipeline

    from qcompile.models.common import safe_loading

    try:
        pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), **safe_loading(pipeline_dir))
    except Exception as exc:  # a folder that loads as a component but not as a runnable pipeline
        raise UserError(f"{pipeline_dir}: cannot run it as a diffusers pipeline for prompts calibration "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    pipe.set_progress_bar_config(disable=True)
    module = getattr(pipe, component.split(":")[0], None)
    if module is None:
        raise UserError(f"{pipeline_dir}: the pipeline has no component '{component}'")
    specs = {s.name: s for s in adapter.input_specs()}
    signature = inspect.signature(module.forward)
    writer = RecordingWriter(folder, unbatched=unbatched)
    step = {"n": 0}

    def hook(_module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        bound.update(bound.pop("added_cond_kwargs", None) or {})
        batch = int(bound[next(iter(specs))].shape[0])
        inputs = {}
        for name, spec in specs.items():
            if name not in bound or bound[name] is None:
                raise UserError(f"{pipeline_dir}: the pipeline called {component} without '{name}'")
            value = _numpy(bound[name])
            if value.ndim == 0 and spec.batched:
                value = np.full(batch, value)
            inputs[name] = value.astype(spec.dtype)
        t = float(_numpy(bound.get("timestep")).reshape(-1)[0])
        writer.add(inputs, t, step=step["n"], cfg=guidance > 1.0 and batch % 2 == 0)
        step["n"] += 1

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(prompts), PROMPTS_PER_CALL):
            step["n"] = 0
            chunk = list(prompts[start:start + PROMPTS_PER_CALL])
            generator = torch.Generator().manual_seed(seed + start)
            with torch.no_grad():
                pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                     generator=generator)
    finally:
        handle.remove()
    return writer.close({**source, "pipeline": str(pipeline_dir), "component": component, "prompts": len(prompts),
                         "steps": steps, "guidance": guidance, "seed": seed})
