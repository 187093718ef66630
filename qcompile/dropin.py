"""An artifact as a diffusers pipeline component: `pipe.unet = qcompile.load(DIR)`.

`load` reads the manifest, opens the artifact on its target's runtime (onnxruntime, the LiteRT
interpreter, the QNN runner) and wraps the runner in a `torch.nn.Module` that a pipeline cannot tell
from the component it replaces where it matters: `.config` is the component's own diffusers config
(saved into the artifact by the build), `.dtype`/`.device` follow `.to()`, and the call takes the
diffusers signature (read from the diffusers class itself) and returns its output type. Each call is
routed to its timestep bucket by the runner; a scalar timestep is broadcast to the batch.

The runtime computes on the CPU in its own precision whatever the pipeline's dtype and device: inputs
are copied to the CPU and cast to the graph's dtypes, and the output comes back in the dtype and on
the device of the sample the pipeline passed.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from qcompile.errors import UserError
from qcompile.manifest import FP32_TARGET, Manifest
from qcompile.target import Runner


@dataclass(frozen=True)
class StandIn:
    """How an artifact of one model family stands in for its diffusers component."""

    method: str  # the component's method the pipeline calls (and whose signature the call takes)
    output: str  # "module:Class" of the diffusers output type (`return_dict=True`)


# By model family (the manifest's source.family). Text encoders and VAE encoders are left out: the
# pipelines read hidden states and latent distributions from them, which an artifact does not give.
STAND_INS: dict[str, StandIn] = {
    "unet2d-condition": StandIn("forward", "diffusers.models.unets.unet_2d_condition:UNet2DConditionOutput"),
    "unet2d": StandIn("forward", "diffusers.models.unets.unet_2d:UNet2DOutput"),
    "transformer2d": StandIn("forward", "diffusers.models.modeling_outputs:Transformer2DModelOutput"),
    "sd3-transformer": StandIn("forward", "diffusers.models.modeling_outputs:Transformer2DModelOutput"),
    "flux-transformer": StandIn("forward", "diffusers.models.modeling_outputs:Transformer2DModelOutput"),
    "vae-decoder": StandIn("decode", "diffusers.models.autoencoders.vae:DecoderOutput"),
}
# Arguments of the diffusers call that steer the call itself, not the graph.
CALL_ARGUMENTS = frozenset({"return_dict", "added_cond_kwargs", "generator"})


class CompiledComponent(torch.nn.Module):
    """A compiled artifact acting as the diffusers component it was built from (see the module doc)."""

    def __init__(self, folder: Path, manifest: Manifest, runner: Runner, config: Mapping[str, Any]):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        stand_in = STAND_INS[manifest.source.family]
        self.folder = Path(folder)
        self.manifest = manifest
        self.runner = runner
        self.config = FrozenDict(config)
        self._dtype, self._device = torch.float32, torch.device("cpu")
        self._ignored: set[str] = set()
        method = getattr(_diffusers_class(manifest, folder), stand_in.method)
        params = list(inspect.signature(method).parameters.values())[1:]  # without self
        self._signature = inspect.Signature(params)
        self._output = _import(stand_in.output)
        if config.get("addition_embed_type") == "text_time":
            # SDXL pipelines check the time ids they build against the width of this embedding's input
            self.add_embedding = SimpleNamespace(
                linear_1=SimpleNamespace(in_features=int(config["projection_class_embeddings_input_dim"])))

    # --- what pipelines read ------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, *args: Any, **kwargs: Any) -> CompiledComponent:
        """Record the dtype and device the pipeline works in (outputs follow its inputs); the runtime
        keeps computing on the CPU in the artifact's own precision."""
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                self._device, self._dtype = value.device, value.dtype
            elif isinstance(value, torch.dtype):
                if not value.is_floating_point:
                    raise TypeError(f"{type(self).__name__}.to only accepts floating point dtypes, got {value}")
                self._dtype = value
            elif isinstance(value, (str, torch.device)):
                self._device = torch.device(value)
        return self

    def cache_context(self, name: str) -> contextlib.AbstractContextManager:
        """Flux pipelines name each call's cache context; an artifact keeps no cache."""
        return contextlib.nullcontext()

    def __getattr__(self, name: str) -> Any:
        """Config fields as attributes (`unet.in_channels`), as diffusers models allow."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("config")
            if config is not None and name in config:
                return config[name]
            raise

    def extra_repr(self) -> str:
        m = self.manifest
        return f"{m.source.class_name} as {m.target} ({m.precision}, {len(m.buckets) or 1} bucket(s)), {self.folder}"

    # --- the call -----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any):
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        given.update(given.get("added_cond_kwargs") or {})
        feed = self._feed(given)
        self._check_shapes(feed)
        self._warn_ignored(given, bound.signature)
        out = torch.from_numpy(np.ascontiguousarray(self.runner.run(feed)))
        sample = given[self.manifest.model.sample_input]
        out = out.to(device=sample.device, dtype=sample.dtype) if isinstance(sample, torch.Tensor) else out
        return self._output(out) if given["return_dict"] else (out,)

    def _feed(self, given: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The graph's inputs by name, cast to its dtypes; a 0-d (or one-element) timestep is broadcast
        to the sample's batch."""
        model = self.manifest.model
        missing = [r.name for r in model.inputs if given.get(r.name) is None]
        if missing:
            raise TypeError(f"{self.manifest.source.class_name} artifact in {self.folder}: the call has no "
                            f"{', '.join(repr(n) for n in missing)}, which the compiled graph takes")
        batch = len(given[model.sample_input])
        feed = {}
        for record in model.inputs:
            array = _numpy(given[record.name]).astype(record.dtype, copy=False)
            if array.ndim == 0 or (record.name == model.timestep_input and array.size == 1):
                array = np.full((batch,), array.reshape(()), record.dtype)
            feed[record.name] = array
        return feed

    def _check_shapes(self, feed: Mapping[str, np.ndarray]) -> None:
        """Each input at a shape the artifact takes (a static one: the shape it was built for, any batch),
        refused in one line naming the input, instead of the runtime's own error deep in the call."""
        from qcompile.calibration.inputs import expected_shape
        from qcompile.models.base import Axis

        m = self.manifest
        for record in m.model.inputs:
            if not record.axes:  # an artifact whose manifest does not describe its axes
                continue
            axes = [Axis(**a) for a in record.axes]
            shape = feed[record.name].shape
            pinned = m.input_shapes.get(record.name)
            if pinned is not None:
                ok = len(shape) == len(pinned) and all(a.name == "batch" or d == p
                                                       for d, p, a in zip(shape, pinned, axes, strict=True))
                want = "x".join("N" if a.name == "batch" else str(p) for p, a in zip(pinned, axes, strict=True))
                hint = ": generate at the size and prompt length it was built for, or rebuild it with --shape"
            else:
                ok = len(shape) == len(axes) and all(a.accepts(d) for d, a in zip(shape, axes, strict=True))
                want, hint = expected_shape(axes), ""
            if not ok:
                raise UserError(f"{self.folder}: the {m.target} artifact takes '{record.name}' {want}; the call "
                                f"passed {'x'.join(map(str, shape))}{hint}")

    def _warn_ignored(self, given: Mapping[str, Any], signature: inspect.Signature) -> None:
        """Say once per argument when the pipeline passes something the compiled graph does not take
        (an attention mask, LoRA scales): the artifact computes without it."""
        names = {r.name for r in self.manifest.model.inputs}
        for name, value in given.items():
            if name in names or name in CALL_ARGUMENTS or name in self._ignored or value is None:
                continue
            param = signature.parameters.get(name)
            if param is not None and value is param.default:
                continue
            self._ignored.add(name)
            warnings.warn(f"qcompile: the {self.manifest.source.class_name} artifact in {self.folder} ignores "
                          f"'{name}': its compiled graph does not take it", stacklevel=2)


class CompiledVaeDecoder(CompiledComponent):
    """A VAE decoder artifact as `pipe.vae`: pipelines call `vae.decode(latents, return_dict=False)`."""

    def decode(self, *args: Any, **kwargs: Any):
        return self.forward(*args, **kwargs)


def load(folder: str | Path, *, runner: Runner | None = None) -> CompiledComponent:
    """The artifact in `folder` as a diffusers pipeline component (`pipe.unet = qcompile.load(DIR)`).

    `runner`: run the artifact on a runner of your own instead of its target's default (a QNN artifact
    on the HTP simulator: `QnnW8A8Target().runner(folder, manifest, htp=True)`)."""
    folder = Path(folder)
    manifest = Manifest.read(folder)
    family = manifest.source.family
    if family not in STAND_INS:
        raise UserError(f"{folder}: a {family} artifact cannot stand in for a pipeline component (qcompile.load "
                        f"takes {', '.join(STAND_INS)}); run it with its target's runner")
    config = _read_config(folder, manifest)
    if family == "vae-decoder":
        # The artifact decodes in its own precision: upcasting the torch VAE (SDXL's force_upcast)
        # would reach for weights the stand-in does not have.
        config = {**config, "force_upcast": False}
    cls = CompiledVaeDecoder if family == "vae-decoder" else CompiledComponent
    return cls(folder, manifest, runner if runner is not None else _runner(folder, manifest), config).eval()


def _runner(folder: Path, manifest: Manifest) -> Runner:
    from qcompile.config import TargetName
    from qcompile.runtime import OnnxRunner
    from qcompile.target import load_target

    model = manifest.model
    if manifest.target == FP32_TARGET:  # a `qcompile export` folder: the float model on onnxruntime
        return OnnxRunner([manifest.fp32_path(folder)], timestep_name=model.timestep_input,
                          sample_name=model.sample_input)
    return load_target(TargetName.parse(manifest.target)).runner(folder, manifest)


def _read_config(folder: Path, manifest: Manifest) -> dict[str, Any]:
    name = manifest.source.model_config
    if name is None:
        raise UserError(f"{folder}: the artifact does not record its model's config (built by qcompile "
                        f"{manifest.qcompile_version}); rebuild it to use it in a pipeline")
    path = folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the model config the manifest lists ({type(exc).__name__})") from None


def _diffusers_class(manifest: Manifest, folder: Path) -> type:
    import diffusers

    cls = getattr(diffusers, manifest.source.class_name, None)
    if not isinstance(cls, type):
        raise UserError(f"{folder}: its model class {manifest.source.class_name} is not in diffusers "
                        f"{diffusers.__version__}")
    return cls


def _import(spec: str) -> type:
    import importlib

    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def _numpy(value: Any) -> np.ndarray:
    """A tensor (any dtype, any device) or a number as a CPU numpy array (bfloat16 through float32)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return np.asarray(value)
