"""Turn the MODEL argument of the CLI into a loaded adapter.

`spec` forms:
- a model folder in `save_pretrained` layout (config.json naming the class + weights);
- a pipeline folder (model_index.json) with `component` naming a subfolder: "unet", "transformer",
  "text_encoder", "vae", ... For the VAE, "vae" (or "vae:decoder") is the decoder and "vae:encoder"
  the encoder; for a bare AutoencoderKL model folder, `component` may be "decoder" or "encoder";
- `builtin:<name>`: a tiny seeded random model (see table.BUILTINS) or `builtin:reference`, the
  shipped reference UNet.
Weights load from local files only: nothing here reaches the network.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from qcompile.errors import UserError

from .base import ModelAdapter, NoiseSchedule
from .common import read_config, schedule_from_config
from .table import PARTS, adapter_for_class, builtin, class_name_of, supported_classes

BUILTIN_PREFIX = "builtin:"


def resolve_model(spec: str, component: str | None = None, seed: int = 0) -> ModelAdapter:
    """Load the adapter `spec` (and `component`) name; raise UserError with one line when it can't."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        return _reference() if name == "reference" else builtin(name, seed)
    folder = Path(spec).expanduser()
    if not folder.exists():
        raise UserError(f"{spec}: no such model folder")
    if not folder.is_dir():
        raise UserError(f"{spec}: not a folder (expected a diffusers model or pipeline folder)")
    if (folder / "model_index.json").is_file():
        return _from_pipeline(folder, component)
    part = None
    if component:
        part = component.partition(":")[2] or component
        if part not in PARTS:
            raise UserError(f"--component {component}: {spec} is a single-model folder, not a pipeline; "
                            f"only a part ({', '.join(PARTS)}) may be named for it")
    return _from_model_folder(folder, part)


def _from_model_folder(folder: Path, part: str | None, **options) -> ModelAdapter:
    config = read_config(folder)
    class_name = class_name_of(config)
    if not class_name:
        raise UserError(f"{folder / 'config.json'}: names no model class (_class_name or architectures)")
    if class_name not in supported_classes():
        raise UserError(f"{folder}: model class {class_name} is not supported; supported: "
                        + ", ".join(supported_classes()))
    return adapter_for_class(class_name, part).from_pretrained(folder, **options)


def _pipeline_components(folder: Path) -> dict[str, str]:
    """component -> class name, for the model_index.json entries an adapter can load."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder / 'model_index.json'}: not readable JSON ({exc})") from exc
    if not isinstance(index, dict):
        raise UserError(f"{folder / 'model_index.json'}: holds a JSON {type(index).__name__}, not a pipeline index")
    supported = set(supported_classes())
    return {name: entry[1] for name, entry in index.items()
            if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2
            and entry[1] in supported}


def _from_pipeline(folder: Path, component: str | None) -> ModelAdapter:
    components = _pipeline_components(folder)
    valid = []
    for name, class_name in components.items():
        valid += [name] + [f"{name}:{p}" for p in PARTS if _has_part(class_name, p)]
    if not component:
        raise UserError(f"{folder} is a pipeline folder: choose a model with --component "
                        f"({', '.join(valid) or 'none supported'})")
    name, _, part = component.partition(":")
    if name not in components:
        raise UserError(f"--component {component}: {folder} has no supported component {name!r}; "
                        f"valid: {', '.join(valid) or 'none'}")
    sub = folder / name
    if not sub.is_dir():
        raise UserError(f"{sub}: component folder listed in model_index.json is missing")
    options = {}
    if adapter_for_class(components[name], part or None).noise_schedule is NoiseSchedule.DDPM:
        schedule = _pipeline_schedule(folder)
        if schedule:
            options["schedule"] = schedule
    return _from_model_folder(sub, part or None, **options)


def _pipeline_schedule(folder: Path) -> tuple[str, float, float] | None:
    """The pipeline scheduler's betas, so synthetic calibration noises latents as the sampler will."""
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        return schedule_from_config(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _has_part(class_name: str, part: str) -> bool:
    try:
        adapter_for_class(class_name, part)
    except UserError:
        return False
    return True


def _reference() -> ModelAdapter:
    if importlib.util.find_spec("qcompile.models.reference_model") is None:
        raise UserError("builtin:reference is not available in this install")
    from qcompile.models import reference_model

    from .reference_setup import ReferenceAdapter

    weights = reference_model.reference_dir() / "unet"
    if not (weights / "config.json").is_file():  # checked first: diffusers would try the network
        raise UserError(f"builtin:reference is not available in this install (no trained UNet in {weights})")
    try:
        unet = reference_model.load_reference_unet()
        schedule = schedule_from_config(reference_model.load_scheduler_config())
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"builtin:reference could not be loaded: {first}") from exc
    options = {"text_len": reference_model.LABEL_TOKENS}  # label tokens stand in for text tokens
    if schedule:
        options["schedule"] = schedule
    return ReferenceAdapter(unet, **options)
