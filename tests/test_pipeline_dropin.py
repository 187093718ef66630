"""`qcompile.load`: a compiled UNet generating inside a real diffusers StableDiffusionPipeline.

A tiny pipeline folder is made offline (tests/tiny_pipeline.py); its UNet is built for ort-int8 and
tflite-int8 from the pipeline's own calls on a prompts file, swapped in with `pipe.unet = ...`, and the
pipeline's images are compared with the float pipeline's on the same prompts and generator (PSNR).
The artifact's own float model behind the same stand-in reproduces the float images: what the
stand-in adds to the images is nothing, and the PSNR measures quantization alone.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from tiny_pipeline import TOKENS, save_tiny_sd_pipeline

import qcompile
from qcompile.config import FidelitySettings, SamplerSettings
from qcompile.errors import UserError

STEPS, GUIDANCE = 8, 4.0
CALIBRATION_PROMPTS = ["a red fox", "a blue sky", "an old tree", "a wet rock", "a hot sun", "a green leaf",
                       "a cat", "a dog"]  # the last quarter validates the build
PROMPTS = ["a red fox in snow", "a boat"]  # the images compared
# Measured (8 steps, guidance 4, two buckets; the builds are deterministic): ort-int8 34.45 / 37.17 dB,
# tflite-int8 34.50 / 37.12 dB; the float model behind the stand-in 135.6 / 137.9 dB. The tolerances
# leave margin for other CPUs' float rounding reaching the calibration ranges.
MIN_PSNR_DB = {"ort-int8": 30.0, "tflite-int8": 30.0}
FLOAT_PSNR_DB = 90.0
MIN_VAE_PSNR_DB = 44.0  # measured 48.76 / 49.75 dB (calibrated on the pipeline's own final latents)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Images in [0, 1]."""
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def generate(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator,
                    output_type="np").images


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def float_images(pipe):
    return generate(pipe)


@pytest.fixture(scope="module")
def artifacts(pipeline_dir, tmp_path_factory):
    """The UNet built for ort-int8, then for tflite-int8 from the same float model and statistics."""
    tmp = tmp_path_factory.mktemp("built")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(CALIBRATION_PROMPTS))
    sampler = SamplerSettings(steps=STEPS, guidance=GUIDANCE)  # what the prompts calibration runs
    common = {"component": "unet", "calib": f"prompts:{prompts}", "calib_cache": tmp / "cache", "buckets": 2,
              "validate_count": 4, "fidelity": FidelitySettings(sampler=sampler)}
    ort = qcompile.build(pipeline_dir, tmp / "ort", target="ort-int8", **common)
    assert ort.passed
    print(f"\nort-int8 build: {ort.report['summary']['build_seconds']} s, "
          f"calibration {ort.report['summary']['calibration_seconds']} s")
    out = {"ort-int8": ort.out_dir}
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return out
    tflite = qcompile.build(pipeline_dir, tmp / "tflite", target="tflite-int8", export_from=ort.out_dir, **common)
    assert tflite.passed
    return {**out, "tflite-int8": tflite.out_dir}


@pytest.mark.parametrize("target", ["ort-int8", "tflite-int8"])
def test_a_compiled_unet_generates_in_the_diffusers_pipeline(target, pipeline_dir, float_images, artifacts):
    if target not in artifacts:
        pytest.skip("ai-edge-litert is not installed: no tflite-int8 build")
    from diffusers import StableDiffusionPipeline

    folder = artifacts[target]
    unet = qcompile.load(folder)
    swap = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True)
    swap.set_progress_bar_config(disable=True)
    swap.unet = unet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = generate(swap)
    assert not [w for w in caught if "qcompile" in str(w.message)]  # the pipeline passes nothing the graph lacks
    assert images.shape == float_images.shape
    per_image = [psnr_db(a, b) for a, b in zip(images, float_images, strict=True)]
    print(f"\n{target}: image PSNR vs the float pipeline {', '.join(f'{p:.2f}' for p in per_image)} dB")
    assert min(per_image) >= MIN_PSNR_DB[target], per_image
    # the pipeline's timesteps reach both buckets: each call ran its own bucket's scales
    assert {unet.runner.bucket_of(float(t)) for t in swap.scheduler.timesteps} == {0, 1}
    if target == "tflite-int8":  # static shapes: another resolution is refused in one line, naming the input
        with pytest.raises(UserError, match=r"takes 'sample' Nx4x8x8; the call passed 4x4x16x16: generate at"):
            swap(PROMPTS, num_inference_steps=1, height=32, width=32)
    else:  # dynamic height and width
        assert swap(PROMPTS[:1], num_inference_steps=2, height=32, width=32, output_type="np").images.shape == \
            (1, 32, 32, 3)
        with pytest.raises(UserError, match=r"takes 'sample' \(N, 4, height, width\) with height: a multiple of 2"):
            unet(torch.zeros(1, 4, 9, 8), 10, torch.zeros(1, TOKENS, 32))


def test_the_stand_in_adds_nothing_to_the_images(pipeline_dir, float_images, artifacts):
    """The artifact's float model (fp32/ in the artifact) behind the same stand-in: the float images."""
    from diffusers import StableDiffusionPipeline

    from qcompile.manifest import Manifest
    from qcompile.runtime import OnnxRunner

    folder = artifacts["ort-int8"]
    m = Manifest.read(folder)
    runner = OnnxRunner([m.fp32_path(folder)], timestep_name=m.model.timestep_input, sample_name=m.model.sample_input)
    swap = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True)
    swap.set_progress_bar_config(disable=True)
    swap.unet = qcompile.load(folder, runner=runner)
    per_image = [psnr_db(a, b) for a, b in zip(generate(swap), float_images, strict=True)]
    print(f"\nfloat ONNX behind the stand-in: PSNR {', '.join(f'{p:.1f}' for p in per_image)} dB")
    assert min(per_image) >= FLOAT_PSNR_DB, per_image


def test_the_stand_in_reads_and_calls_like_the_unet(pipe, artifacts):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    from qcompile.dropin import CompiledComponent

    folder = artifacts["ort-int8"]
    unet = qcompile.load(folder)
    ref = pipe.unet
    assert isinstance(unet, torch.nn.Module)
    assert unet.config["_class_name"] == "UNet2DConditionModel"
    for key in ("sample_size", "in_channels", "out_channels", "cross_attention_dim", "time_cond_proj_dim",
                "addition_embed_type"):
        assert unet.config[key] == ref.config[key], key
    assert unet.in_channels == ref.config.in_channels  # config fields as attributes, as diffusers models allow
    assert unet.dtype == torch.float32 and unet.device == torch.device("cpu")
    rng = np.random.default_rng(0)
    sample = torch.from_numpy(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    text = torch.from_numpy(rng.standard_normal((2, TOKENS, 32)).astype(np.float32))
    t = torch.tensor(601)  # 0-d int64, as diffusers' schedulers give it
    out = unet(sample, t, encoder_hidden_states=text)
    assert isinstance(out, UNet2DConditionOutput) and out.sample.shape == sample.shape
    feed = {"sample": sample.numpy(), "timestep": np.full(2, 601, np.float32), "encoder_hidden_states": text.numpy()}
    np.testing.assert_array_equal(out.sample.numpy(), unet.runner.run(feed))  # the timestep broadcast to the batch
    with torch.no_grad():
        expected = ref(sample, t, encoder_hidden_states=text).sample.numpy()
    got = out.sample.numpy()
    cos = float(np.sum(got * expected) / np.linalg.norm(got) / np.linalg.norm(expected))
    assert cos > 0.98, cos
    # a half-precision pipeline: fp16 in, fp16 out, the runtime computing in its own precision
    assert unet.to(torch.float16) is unet and unet.dtype == torch.float16
    half = unet(sample.half(), t, text.half(), return_dict=False)
    assert isinstance(half, tuple) and half[0].dtype == torch.float16
    rounded = {**feed, "sample": sample.half().float().numpy(), "encoder_hidden_states": text.half().float().numpy()}
    np.testing.assert_array_equal(half[0].numpy(), unet.runner.run(rounded).astype(np.float16))
    unet.to(torch.float32)
    # SDXL pipelines check their time ids against the added embedding's input width
    sdxl = CompiledComponent(folder, unet.manifest, unet.runner, {**unet.config, "addition_embed_type": "text_time",
                                                                  "projection_class_embeddings_input_dim": 80})
    assert sdxl.add_embedding.linear_1.in_features == 80 and "add_embedding" not in dir(unet)
    with pytest.warns(UserWarning, match="ignores 'cross_attention_kwargs'"):
        unet(sample, t, text, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(TypeError, match="encoder_hidden_states"):
        unet(sample, t)


def test_load_refuses_folders_it_cannot_stand_in(artifacts, tmp_path):
    import shutil

    from qcompile.manifest import Manifest

    with pytest.raises(UserError, match="not a qcompile artifact folder"):
        qcompile.load(tmp_path)
    old = tmp_path / "old"
    shutil.copytree(artifacts["ort-int8"], old)
    m = Manifest.read(old)
    Manifest.from_json({**m.to_json(), "source": {**m.to_json()["source"], "model_config": None}}).write(old)
    with pytest.raises(UserError, match="does not record its model's config"):
        qcompile.load(old)


def test_import_qcompile_stays_light():
    """`import qcompile` loads neither torch nor onnx; `build`, `calibrate`, `load` come on first use."""
    code = ("import sys, qcompile; heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'diffusers') if m in "
            "sys.modules]; assert not heavy, heavy; from qcompile import build, calibrate, load; "
            "import qcompile.stages; assert qcompile.build is build and callable(build)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_compiled_vae_decoder_decodes_in_the_pipeline(pipeline_dir, pipe, float_images, tmp_path):
    """`pipe.vae = qcompile.load(...)`: the pipeline calls `vae.decode(latents, return_dict=False)`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.autoencoders.vae import DecoderOutput

    # calibrated on what the pipeline decodes: its final latents on other prompts, unscaled as it unscales them
    with torch.no_grad():
        latents = pipe(CALIBRATION_PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                       generator=torch.Generator().manual_seed(1)).images
    np.savez(tmp_path / "latents.npz", z=(latents / pipe.vae.config.scaling_factor).numpy())
    built = qcompile.build(pipeline_dir, tmp_path / "vae", component="vae", calib=str(tmp_path / "latents.npz"))
    assert built.passed
    vae = qcompile.load(built.out_dir)
    assert vae.config.scaling_factor == pipe.vae.config.scaling_factor
    assert vae.config.block_out_channels == list(pipe.vae.config.block_out_channels)
    assert isinstance(vae.decode(torch.zeros(1, 4, 8, 8)), DecoderOutput)
    swap = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True)
    swap.set_progress_bar_config(disable=True)
    swap.vae = vae
    per_image = [psnr_db(a, b) for a, b in zip(generate(swap), float_images, strict=True)]
    print(f"\nort-int8 VAE decoder: image PSNR vs the float pipeline {', '.join(f'{p:.2f}' for p in per_image)} dB")
    assert min(per_image) >= MIN_VAE_PSNR_DB, per_image
