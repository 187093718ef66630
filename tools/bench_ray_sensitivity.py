"""Mixed precision's sensitivity ranking on one machine against Ray tasks (docs/distributed.md).

    qcompile export builtin:reference --out exp
    qcompile calibrate builtin:reference --from-export exp --calib sample:32 --steps 20 --calib-cache cache
    python tools/bench_ray_sensitivity.py exp cache [--rows 64] [--ray ADDRESS] [--cpus 2]

Ranks every quantizable layer of the float model in EXPORT for ort-int8 on ROWS recorded rows of
CACHE (what `build --max-float-layers` does), first with the built-in probe map, then with the Ray
probe map (a local Ray instance of CPUS CPUs without --ray); prints the wall time of each, the bytes
put in the object store once and shipped per task, and whether the rankings are equal.
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from qcompile.calibration.cache import CalibrationCache
from qcompile.calibration.estimators import estimate_ranges
from qcompile.config import Estimator, TargetName
from qcompile.graph_io import load_graph
from qcompile.manifest import Manifest
from qcompile.sensitivity import mixed_precision, probe_each
from qcompile.sensitivity_ray import probe_state, ray_probe_map
from qcompile.target import load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("cache", type=Path)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--ray", default="", metavar="ADDRESS")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    import ray

    cache, model = CalibrationCache.open(args.cache), args.export / "model.onnx"
    target = load_target(TargetName.ORT_INT8)
    caps = target.caps
    levels = caps.activation_dtype.qmax - caps.activation_dtype.qmin
    ranges = estimate_ranges(cache.table(), Estimator.MAX, levels=levels, symmetric=caps.activation_symmetric)
    rows = cache.recording().spread_rows(args.rows)
    template = replace(Manifest.read(args.export), target=target.name.value, precision="w8a8")
    seen = {}

    def rank(probe_map, name):
        def timed(prober, candidates):
            seen["prober"], seen["candidates"] = prober, candidates
            start = time.perf_counter()
            scores = probe_map(prober, candidates)
            seen[name] = time.perf_counter() - start
            return scores

        with tempfile.TemporaryDirectory() as tmp:
            return mixed_precision(load_graph(model), model, target, ranges, rows, (),
                                   timestep_input=template.model.timestep_input, template=template,
                                   folder=Path(tmp), target_sqnr_db=None, max_float=0, probe_map=timed).ranking

    here = rank(probe_each, "one machine")
    start = time.perf_counter()
    ray.init(address=args.ray or None, num_cpus=None if args.ray else args.cpus, include_dashboard=False,
             log_to_driver=False)
    seen["ray start"] = time.perf_counter() - start
    on_ray = rank(ray_probe_map(args.ray), "on Ray")
    state = probe_state(seen["prober"], seen["candidates"])
    context = ray._private.worker.global_worker.get_serialization_context()
    task_bytes = context.serialize((state.key, [ray.put(state)], len(state.candidates) - 1)).total_bytes
    result_bytes = context.serialize(0.0).total_bytes
    ray.shutdown()
    print(f"{len(here)} layers, {rows.count} probe rows")
    for name in ("one machine", "ray start", "on Ray"):
        print(f"  {name}: {seen[name]:.1f} s")
    parts = {**{name: len(data) for name, data in state.files.items()},
             "probe rows": len(pickle.dumps(state.inputs)), "float outputs": state.expected.nbytes,
             "ranges": len(pickle.dumps(state.ranges)), "manifest template": len(pickle.dumps(state.template))}
    print(f"  probe state {len(pickle.dumps(state)):,} bytes once per node: "
          + ", ".join(f"{k} {v:,}" for k, v in parts.items()))
    print(f"  per task: {task_bytes} bytes to the worker, {result_bytes} back")
    print(f"  same ranking and scores: {here == on_ray}")


if __name__ == "__main__":
    main()
