"""`qcompile.load` for every family that can stand in for a pipeline component: called the way the
family's diffusers pipelines call it (keyword arguments, `added_cond_kwargs`, a 0-d timestep for
UNets), it returns the diffusers output type with the float module's numbers.

The artifacts are `qcompile export` folders (the float ONNX on onnxruntime), so what is compared is the
stand-in's binding of the call, not quantization (tests/test_pipeline_dropin.py measures that)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qcompile
from qcompile.api import export
from qcompile.models.source import resolve_model

ADDED_COND = ("text_embeds", "time_ids", "resolution", "aspect_ratio")  # inside `added_cond_kwargs`
FAMILIES = {  # builtin -> the diffusers output type
    "tiny-sdxl-unet": "UNet2DConditionOutput",
    "tiny-unet2d": "UNet2DOutput",
    "tiny-pixart": "Transformer2DModelOutput",
    "tiny-sd3": "Transformer2DModelOutput",
    "tiny-flux": "Transformer2DModelOutput",
    "tiny-vae-decoder": "DecoderOutput",
}


def diffusers_call(inputs: dict[str, np.ndarray]) -> dict:
    """The ONNX inputs as a pipeline passes them: SDXL's and PixArt's extra conditioning in
    `added_cond_kwargs`, a UNet's timestep 0-d."""
    kw = {k: torch.from_numpy(v) for k, v in inputs.items() if k not in ADDED_COND}
    added = {k: torch.from_numpy(v) for k, v in inputs.items() if k in ADDED_COND}
    if added:
        kw["added_cond_kwargs"] = added
    if "sample" in kw:
        kw["timestep"] = kw["timestep"][0]
    return kw


@pytest.mark.parametrize("builtin", list(FAMILIES))
def test_each_family_stands_in_for_its_diffusers_module(builtin, tmp_path):
    folder = export(f"builtin:{builtin}", tmp_path / "fp32")
    adapter = resolve_model(f"builtin:{builtin}")
    module = adapter.module
    stand_in = qcompile.load(folder)
    assert stand_in.config["_class_name"] == type(module).__name__
    if builtin == "tiny-vae-decoder":
        z = torch.from_numpy(adapter.dummy_inputs(batch=2, seed=3)["z"])
        with torch.no_grad():
            ref = module.decode(z, return_dict=False)[0].numpy()
        out = stand_in.decode(z)
        got = stand_in.decode(z, return_dict=False)[0].numpy()
    else:
        t = np.full(2, 0.5 * adapter.timestep_scale, np.float32)
        kw = diffusers_call(adapter.synthetic_inputs(t, seed=3))
        with torch.no_grad():
            ref = module(**kw, return_dict=False)[0].numpy()
        out = stand_in(**kw)
        got = stand_in(**kw, return_dict=False)[0].numpy()
    assert type(out).__name__ == FAMILIES[builtin]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * float(np.abs(ref).max()))
