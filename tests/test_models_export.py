"""Model adapters, resolve_model and the ONNX exporter, on every family's tiny built-in model.

Each built-in is exported once (module-scoped fixture) and the checks share that export.
"""

from __future__ import annotations

import inspect
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qcompile.errors import UserError
from qcompile.export import MODULE_KEY, ExportError, export_onnx
from qcompile.models.autoencoder_kl import VaeDecoderAdapter, VaeEncoderAdapter
from qcompile.models.base import InputRole, ModelAdapter, ModelFamily, NoiseSchedule
from qcompile.models.clip_text import ClipTextAdapter, ClipTextWithProjectionAdapter
from qcompile.models.source import resolve_model
from qcompile.models.table import ADAPTERS, BUILTINS, adapter_for_class, adapter_for_family
from qcompile.models.unet2d_condition import UNet2DConditionAdapter

TOL = 1e-4
WEIGHT_OPS = ("Conv", "MatMul", "Gemm")
# Inputs that diffusers takes inside `added_cond_kwargs` rather than as forward arguments.
ADDED_COND = {"text_embeds", "time_ids", "resolution", "aspect_ratio"}


@pytest.fixture(scope="module", params=sorted(BUILTINS))
def exported(request, tmp_path_factory):
    adapter = resolve_model(f"builtin:{request.param}")
    out = tmp_path_factory.mktemp(request.param) / "model.onnx"
    result = export_onnx(adapter, out)
    print(f"\n{request.param}: {result.exporter} diff={result.max_abs_diff:.2e} {result.seconds:.1f}s")
    return request.param, adapter, result


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _node_modules(path) -> list[tuple[onnx.NodeProto, str]]:
    model = onnx.load(str(path), load_external_data=False)
    return [(n, {p.key: p.value for p in n.metadata_props}.get(MODULE_KEY)) for n in model.graph.node]


# --- export ---------------------------------------------------------------------------------------
def test_export_matches_torch(exported):
    name, _, result = exported
    assert result.max_abs_diff <= TOL, f"{name}: {result}"
    assert result.exporter == "dynamo", f"{name} fell back: {result.notes}"
    assert result.opset == 20 and result.onnx_path.is_file()


def test_runs_at_batch_1_and_2(exported):
    _, adapter, result = exported
    session = _session(result.onnx_path)
    module = adapter.export_module()
    for batch in (1, 2):
        feeds = adapter.dummy_inputs(batch=batch, seed=7)
        got = session.run(list(adapter.output_names), feeds)
        with torch.no_grad():
            want = module(*(torch.from_numpy(feeds[s.name]) for s in adapter.input_specs()))
        want = want if isinstance(want, tuple) else (want,)
        for g, w in zip(got, want, strict=True):
            assert g.shape[0] == batch
            np.testing.assert_allclose(g, w.numpy(), rtol=0, atol=TOL)


def test_input_and_output_names(exported):
    _, adapter, result = exported
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    names = [i.name for i in model.graph.input]
    assert names == [s.name for s in adapter.input_specs()]
    assert [o.name for o in model.graph.output] == list(adapter.output_names)
    module = adapter.module
    arguments = set(inspect.signature(module.forward).parameters)
    if hasattr(module, "decode"):  # AutoencoderKL.decode(z)
        arguments |= set(inspect.signature(module.decode).parameters)
    assert set(names) <= arguments | ADDED_COND
    for spec, value in zip(adapter.input_specs(), model.graph.input, strict=True):
        first = value.type.tensor_type.shape.dim[0]
        assert (first.dim_param != "") == spec.batched, f"{spec.name}: batch axis not dynamic"


def test_module_metadata_and_node_names(exported):
    _, adapter, result = exported
    nodes = _node_modules(result.onnx_path)
    names = [n.name for n, _ in nodes]
    assert all(names) and len(set(names)) == len(names)
    assert all(module is not None for _, module in nodes), "every node carries qcompile.module"
    submodules = {name for name, _ in adapter.module.named_modules()}
    weighted = [(n, m) for n, m in nodes if n.op_type in WEIGHT_OPS]
    assert weighted
    for node, module in weighted:
        assert module in submodules, f"{node.name}: {module!r} is not a module path"
    # the default float scopes each name at least one real node
    for pattern in adapter.default_float_scopes():
        assert any(re.search(pattern, m) for _, m in nodes if m), pattern


def test_external_data_layout(exported):
    _, _, result = exported
    onnx_path = result.onnx_path
    data = onnx_path.with_suffix(".data")
    assert data.is_file() and data.stat().st_size > 0
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["model.data", "model.onnx"]
    model = onnx.load(str(onnx_path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}["location"]
            assert location == "model.data"
        else:
            assert len(tensor.raw_data) <= 1024, f"{tensor.name} is inline"
    assert onnx_path.stat().st_size < 1_000_000


def test_synthetic_inputs_run(exported):
    _, adapter, result = exported
    timesteps = [0.999 * adapter.timestep_scale, 0.5 * adapter.timestep_scale, 0.0]
    feeds = adapter.synthetic_inputs(timesteps, seed=3)
    specs = adapter.input_specs()
    assert list(feeds) == [s.name for s in specs]
    for spec in specs:
        value = feeds[spec.name]
        assert value.dtype == np.dtype(spec.dtype)
        expected = (3, *spec.shape[1:]) if spec.batched else spec.shape
        assert value.shape == expected, spec.name
        if spec.role is InputRole.TIMESTEP:
            np.testing.assert_allclose(value, np.float32(timesteps))
    outputs = _session(result.onnx_path).run(None, feeds)
    assert all(np.isfinite(o).all() for o in outputs)
    if adapter.noise_schedule is not NoiseSchedule.NONE:
        sample = next(feeds[s.name] for s in specs if s.role is InputRole.SAMPLE)
        noisiest, cleanest = sample[0].std(), sample[2].std()
        assert 0.8 < noisiest < 1.2  # almost pure unit noise at the top of the schedule
        assert 0.2 < cleanest < 1.2  # the smooth clean latent


def test_legacy_exporter_stamps_modules(tmp_path):
    adapter = resolve_model("builtin:tiny-vae-encoder")
    result = export_onnx(adapter, tmp_path / "enc.onnx", exporters=("legacy",))
    assert result.exporter == "legacy" and result.max_abs_diff <= TOL
    assert (tmp_path / "enc.data").is_file()
    modules = {m for n, m in _node_modules(result.onnx_path) if n.op_type == "Conv"}
    assert {"encoder.conv_in", "quant_conv"} <= modules


def test_clip_with_projection_exports_both_outputs(tmp_path):
    adapter = ClipTextWithProjectionAdapter.from_config(ClipTextWithProjectionAdapter.tiny_config(), seed=1)
    result = export_onnx(adapter, tmp_path / "model.onnx")
    assert result.max_abs_diff <= TOL
    outputs = _session(result.onnx_path).run(None, adapter.synthetic_inputs([0, 0], seed=1))
    assert [o.shape for o in outputs] == [(2, 16, 32), (2, 32)]
    modules = {m for _, m in _node_modules(result.onnx_path)}
    assert "text_projection" in modules
    assert any(re.search(adapter.default_float_scopes()[0], m) for m in modules if m != "text_projection")


class _NotExportable(torch.nn.Module):
    def forward(self, sample):  # no ONNX translation in either exporter
        return torch.special.bessel_j0(sample)


class _BrokenAdapter(VaeDecoderAdapter):
    def export_module(self):
        return _NotExportable()


def test_failed_export_leaves_no_model(tmp_path):
    adapter = _BrokenAdapter.from_config(VaeDecoderAdapter.tiny_config())
    with pytest.raises(ExportError, match="AutoencoderKL"):
        export_onnx(adapter, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_opset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="opset 17"):
        export_onnx(resolve_model("builtin:tiny-clip-text"), tmp_path / "m.onnx", opset=17)


# --- table ----------------------------------------------------------------------------------------
def test_table_lookups():
    assert set(adapter_for_family(f) for f in ModelFamily) <= set(ADAPTERS)
    assert adapter_for_class("AutoencoderKL") is VaeDecoderAdapter
    assert adapter_for_class("AutoencoderKL", "encoder") is VaeEncoderAdapter
    assert adapter_for_class("Transformer2DModel").family is ModelFamily.TRANSFORMER2D
    assert adapter_for_class("CLIPTextModel") is ClipTextAdapter
    with pytest.raises(UserError, match="FooModel"):
        adapter_for_class("FooModel")
    assert all(issubclass(a, ModelAdapter) for a in ADAPTERS)


# --- resolve_model errors ---------------------------------------------------------------------
def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="no such model folder"):
        resolve_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unknown_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WeirdNet"}))
    with pytest.raises(UserError, match="WeirdNet"):
        resolve_model(str(tmp_path))


def test_unknown_builtin():
    with pytest.raises(UserError, match="builtin:tiny-sd-unet"):
        resolve_model("builtin:nonsense")


def test_reference_builtin():
    """Either the trained reference UNet wrapped for its label tokens, or a one-line UserError."""
    try:
        adapter = resolve_model("builtin:reference")
    except UserError as exc:
        assert "builtin:reference" in str(exc) and "\n" not in str(exc)
        return
    assert isinstance(adapter, UNet2DConditionAdapter)
    from qcompile.models import reference_model

    assert adapter.input_specs()[2].shape[1] == reference_model.LABEL_TOKENS


# --- save_pretrained round trips ------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    unet = resolve_model("builtin:tiny-sd-unet", seed=1)
    vae = resolve_model("builtin:tiny-vae-decoder", seed=2)
    text = resolve_model("builtin:tiny-clip-text", seed=3)
    unet.module.save_pretrained(root / "unet")
    vae.module.save_pretrained(root / "vae")
    text.module.save_pretrained(root / "text_encoder")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "beta_schedule": "linear", "beta_start": 0.0002, "beta_end": 0.02}))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }))
    return root, {"unet": unet, "vae": vae, "text_encoder": text}


def _same_outputs(a: ModelAdapter, b: ModelAdapter) -> None:
    feeds = a.dummy_inputs(batch=2, seed=5)
    args = [torch.from_numpy(feeds[s.name]) for s in a.input_specs()]
    with torch.no_grad():
        torch.testing.assert_close(a.export_module()(*args), b.export_module()(*args), rtol=0, atol=0)


def test_model_folder_round_trip(pipeline_folder):
    root, originals = pipeline_folder
    loaded = resolve_model(str(root / "unet"))
    assert isinstance(loaded, UNet2DConditionAdapter)
    _same_outputs(originals["unet"], loaded)
    assert isinstance(resolve_model(str(root / "vae"), component="encoder"), VaeEncoderAdapter)


def test_pipeline_folder_round_trip(pipeline_folder):
    root, originals = pipeline_folder
    unet = resolve_model(str(root), component="unet")
    _same_outputs(originals["unet"], unet)
    assert unet.schedule == ("linear", 0.0002, 0.02)  # synthetic inputs follow the pipeline's scheduler
    decoder = resolve_model(str(root), component="vae")
    assert isinstance(decoder, VaeDecoderAdapter)
    _same_outputs(originals["vae"], decoder)
    assert isinstance(resolve_model(str(root), component="vae:encoder"), VaeEncoderAdapter)
    text = resolve_model(str(root), component="text_encoder")
    assert isinstance(text, ClipTextAdapter)
    _same_outputs(originals["text_encoder"], text)


def test_pipeline_component_errors(pipeline_folder):
    root, _ = pipeline_folder
    with pytest.raises(UserError, match="--component.*unet.*vae:encoder"):
        resolve_model(str(root))
    with pytest.raises(UserError, match="valid: unet"):
        resolve_model(str(root), component="scheduler")
    with pytest.raises(UserError, match="no part"):
        resolve_model(str(root), component="unet:encoder")


# --- dynamic axes ---------------------------------------------------------------------------------
DYNAMIC = {"tiny-unet2d": {"height", "width"}, "tiny-sd-unet": {"height", "width", "tokens"},
           "tiny-sdxl-unet": {"height", "width", "tokens"}, "tiny-pixart": {"tokens"},
           "tiny-sd3": {"height", "width", "tokens"}, "tiny-vae-decoder": {"height", "width"},
           "tiny-vae-encoder": {"height", "width"}, "tiny-dit": set(), "tiny-flux": set(), "tiny-clip-text": set()}


def test_dynamic_axes_are_symbolic_and_run_at_other_sizes(exported):
    """What the adapter records as dynamic is symbolic in the graph (and nothing else is), and the graph
    runs at another valid value of each such axis and batch 3, matching torch."""
    name, adapter, result = exported
    axes = adapter.input_axes()
    assert {a.name for ax in axes.values() for a in ax if a.dynamic} - {"batch"} == DYNAMIC[name]
    assert all(a.why for ax in axes.values() for a in ax if not a.dynamic), axes
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert [d.dim_param != "" for d in dims] == [a.dynamic for a in axes[inp.name]], inp.name
    sizes = {a.name: a.alternative() for ax in axes.values() for a in ax if a.dynamic and a.name != "batch"}
    feeds = adapter.dummy_inputs(batch=3, seed=11, sizes=sizes)
    got = _session(result.onnx_path).run(None, feeds)[0]
    with torch.no_grad():
        want = adapter.export_module()(*(torch.from_numpy(feeds[s.name]) for s in adapter.input_specs()))
    want = (want[0] if isinstance(want, (tuple, list)) else want).numpy()
    assert got.shape == want.shape and got.shape[0] == 3
    assert float(np.abs(got - want).max()) <= TOL
    for a in (a for ax in axes.values() for a in ax if a.dynamic and a.name != "batch"):
        assert a.accepts(a.default) and a.accepts(a.alternative())
        assert a.multiple == 1 or not a.accepts(a.default + 1)
