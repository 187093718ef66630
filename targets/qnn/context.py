"""QNN context binaries: the bucket graphs compiled for HTP ahead of time.

A device that loads a Q/DQ ONNX model compiles it for HTP at session creation (2.3 s for the 16x16
reference graph at batch 2 on the simulator, 18 s at batch 16); a context binary is that compiled
graph, loaded in milliseconds (0.02 s). With K timestep buckets the K graphs go into one weight-shared
context (`ep.share_ep_contexts`): one .bin holding every bucket's graph with the weights once, and one
small EPContext ONNX model per bucket pointing into it.

What can be proven here: onnxruntime writes weight-shared contexts on x64 for devices, and the x86 HTP
simulator refuses to load them (QNN_COMMON_ERROR_NOT_SUPPORTED). So the device check compiles each
bucket's graph into an unshared context of its own as well, runs it on the simulator and requires its
output to be bit-identical to the same Q/DQ graph compiled at session creation; that check is called
`bucket_contexts_identical` and the report marks the shipped weight-shared binary as unverified. A
single-bucket artifact's context is unshared and is checked as shipped (`context_binary_identical`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.errors import UserError
from qcompile.targets.qnn import ep

CONTEXT_DIR = "context"


def context_model_name(model: str) -> str:
    return f"{Path(model).stem}_ctx.onnx"


def write_contexts(models: Sequence[Path], out_dir: Path, *, shared: bool, arch: int | None = None) -> list[Path]:
    """Compile each Q/DQ model into `out_dir` (an EPContext model each, binaries beside them, not
    embedded); with `shared`, one weight-shared binary for all. Returns every file written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.iterdir())
    for i, model in enumerate(models):
        config = {"ep.context_enable": "1", "ep.context_embed_mode": "0",
                  "ep.context_file_path": str(out_dir / context_model_name(model.name))}
        if shared:
            config["ep.share_ep_contexts"] = "1"
            if i == len(models) - 1:
                config["ep.stop_share_ep_contexts"] = "1"  # this session writes the one .bin
        ep.htp_session(model, session_config=config, arch=arch)
    return sorted(set(out_dir.iterdir()) - before)


def check_contexts(artifact_dir: Path, runner_htp, feeds: dict[int, dict[str, np.ndarray]]) -> dict[str, Any]:
    """For each bucket with a feed: its graph compiled into an unshared context runs bit-identically to
    the Q/DQ graph on HTP. Also whether the shipped contexts load on the simulator."""
    folder = Path(artifact_dir) / CONTEXT_DIR
    shipped = sorted(folder.glob("*_ctx.onnx"))
    bins = sorted(folder.glob("*.bin"))
    out: dict[str, Any] = {"files": [f"{CONTEXT_DIR}/{p.name}" for p in [*shipped, *bins]],
                           "binary_bytes": sum(p.stat().st_size for p in bins),
                           "weight_shared": len(shipped) > 1 and len(bins) == 1}
    try:
        if shipped:
            ep.htp_session(shipped[0], quiet=True, arch=runner_htp.htp_arch)
        out["shipped_loads_on_simulator"] = bool(shipped)
    except UserError as exc:
        out["shipped_loads_on_simulator"] = False
        out["shipped_load_error"] = str(exc).split(": ")[-1][:200]
    buckets = []
    with tempfile.TemporaryDirectory(prefix="qcompile-qnn-ctx-") as tmp:
        for bucket, chunk in feeds.items():
            model = runner_htp.paths[bucket]
            ctx = Path(tmp) / context_model_name(model.name)
            if out["shipped_loads_on_simulator"] and not out["weight_shared"]:
                ctx = folder / context_model_name(model.name)  # the shipped file itself
            else:
                write_contexts([model], Path(tmp), shared=False, arch=runner_htp.htp_arch)
            session = ep.htp_session(ctx, arch=runner_htp.htp_arch)
            feed = runner_htp.device_feed(chunk)
            got = session.run([runner_htp.output_name], feed)[0]
            want = runner_htp.run_chunk(bucket, chunk)
            buckets.append({"bucket": bucket, "identical": bool(np.array_equal(got, want)),
                            "checked": "shipped context" if ctx.parent == folder else "unshared context"})
    out["buckets"] = buckets
    # an unshared context (one bucket) must load as shipped; a weight-shared one cannot on the simulator
    out["identical"] = bool(buckets) and all(b["identical"] for b in buckets) and \
        (out["weight_shared"] or out["shipped_loads_on_simulator"])
    # Whether the binary that ships is the one that ran: never for a weight-shared context here.
    out["shipped_verified"] = out["identical"] and all(b["checked"] == "shipped context" for b in buckets)
    return out
