"""`--calib prompts:FILE`: a real diffusers pipeline folder (tokenizer, text encoder, scheduler, VAE,
UNet) run on a prompts file, every UNet call recorded by timestep value with CFG halves labelled."""

import numpy as np
import pytest
import torch
from tiny_pipeline import save_tiny_sd_pipeline

from qcompile.calibration.pipeline_recorder import read_prompts, record_pipeline
from qcompile.calibration.recorder import CFG_COND, CFG_UNCOND
from qcompile.config import CalibKind, CalibSpec
from qcompile.errors import UserError
from qcompile.models.source import resolve_model


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny StableDiffusionPipeline saved with save_pretrained, tokenizer included (a letter vocabulary)."""
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("pipe"))


def test_every_unet_call_is_recorded_by_timestep_with_cfg_halves(pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    adapter = resolve_model(str(pipeline_dir), "unet")
    prompts = ["a cat", "a dog", "red fox", "blue sky", "old tree"]  # two pipeline calls (4 + 1 prompts)
    rec = record_pipeline(pipeline_dir, "unet", prompts, adapter, tmp_path / "rec", steps=5, guidance=3.0, seed=0,
                          unbatched=frozenset(), source={})
    assert rec.rows == 5 * 5 * 2  # prompts x steps x [uncond; cond]
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True, use_safetensors=True)
    pipe.scheduler.set_timesteps(5)
    assert sorted(rec.timesteps().tolist()) == sorted(float(t) for t in pipe.scheduler.timesteps)
    with torch.no_grad():
        cond = pipe.encode_prompt(prompts[:4], "cpu", 1, do_classifier_free_guidance=True)
    rows, meta = next(rec.shards())
    first = np.nonzero(meta.call == 0)[0]  # the first call: 4 prompts, uncond then cond
    assert list(meta.cfg_half[first]) == [CFG_UNCOND] * 4 + [CFG_COND] * 4
    ehs = rows.arrays["encoder_hidden_states"][first]
    np.testing.assert_allclose(ehs[4:], cond[0].numpy(), atol=1e-5)  # the conditional half: the prompts
    np.testing.assert_allclose(ehs[:4], cond[1].numpy(), atol=1e-5)  # the unconditional half: ""
    assert rows.arrays["timestep"][first].tolist() == [float(pipe.scheduler.timesteps[0])] * 8


def test_prompts_spec_and_its_errors(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n\n  a dog  \n")
    spec = CalibSpec.parse(f"prompts:{prompts}")
    assert spec.kind is CalibKind.PROMPTS and spec.describe() == f"prompts:{prompts}"
    assert read_prompts(prompts) == ["a cat", "a dog"]
    with pytest.raises(UserError, match="no such prompts file"):
        CalibSpec.parse(f"prompts:{tmp_path / 'missing.txt'}")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserError, match="has no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_held_back_prompts_validate_the_build_and_are_not_calibrated_on(pipeline_dir, tmp_path):
    """With four or more prompts the last quarter is held back: the build validates on the pipeline's own
    calls for them (real text-encoder states, not synthetic ones) and calibrates on the rest only."""
    from diffusers import StableDiffusionPipeline

    from qcompile.calibration.calibrate import record
    from qcompile.calibration.pipeline_recorder import split_prompts
    from qcompile.config import CompileConfig, FidelitySettings, SamplerSettings
    from qcompile.stages import calibration_plan

    prompts = ["a cat", "a dog", "red fox", "blue sky", "old tree", "green leaf", "wet rock", "hot sun"]
    assert split_prompts(prompts) == (prompts[:6], prompts[6:]) and split_prompts(prompts[:3]) == (prompts[:3], [])
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts))
    cfg = CompileConfig(model=str(pipeline_dir), component="unet", out_dir=tmp_path / "out",
                        calib=CalibSpec.parse(f"prompts:{path}"), validate_count=6,
                        fidelity=FidelitySettings(sampler=SamplerSettings(steps=3)))
    adapter = resolve_model(str(pipeline_dir), "unet")
    plan = calibration_plan(cfg, adapter)
    spec, inputs, held_out = plan.spec, plan.inputs, plan.held_out
    assert inputs is None and held_out.count == 6
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True, use_safetensors=True)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts[6:], "cpu", 1, do_classifier_free_guidance=True)
    allowed = np.concatenate([cond.numpy(), uncond.numpy()])
    for row in held_out.arrays["encoder_hidden_states"]:  # each row is a held-back prompt's (or "") states
        assert np.min(np.abs(allowed - row).reshape(len(allowed), -1).max(axis=1)) < 1e-5
    rec = record(spec, adapter, None, tmp_path / "rec", names=("sample", "timestep"), sampler=cfg.fidelity.sampler,
                 seed=0, pipeline=(pipeline_dir, "unet"))
    assert rec.rows == 6 * 3 * 2  # the six calibration prompts only
