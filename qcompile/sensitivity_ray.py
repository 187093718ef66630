"""Mixed precision's sensitivity probes as Ray tasks over layers (`qcompile build --mixed-precision DB
--ray [ADDRESS]`).

Ranking the layers takes one probe per candidate layer (the graph with only that layer quantized, run
on the probe inputs through the target): ~300 full forward passes for an SD 1.5 UNet, independent of
one another, so the ranking is a map over layers. What every probe needs (the float graph's files, the
target's name and options, the activation ranges, the probe inputs and the float model's outputs on
them) is put in Ray's object store once; each worker process reads it once and keeps one Prober for
every probe it runs, over one copy of the graph's files per node (in its temporary folder, removed
from every node when the ranking ends). A task carries the index of its layer and returns one float,
so the driver ranks exactly as one machine does, from the same scores in the same order. The few
probes of the bisection that follows depend on one another and run on the driver.

A task that fails is retried (qcompile.ray_tasks.RETRIES more times, also when its worker or node
dies); a layer whose probe keeps failing fails the build in one line naming the layer.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from qcompile.calibration.inputs import InputSet
from qcompile.config import TargetName
from qcompile.graph_io import load_graph, save_graph
from qcompile.manifest import Manifest
from qcompile.pass_manager import GraphProperty, graph_properties
from qcompile.quant import TensorRange
from qcompile.ray_tasks import RETRIES, ray_session, task_result
from qcompile.sensitivity import ProbeMap, Prober, alone
from qcompile.target import load_target


@dataclass(frozen=True, eq=False)
class ProbeState:
    """Everything a probe task needs, put in the object store once per build."""

    key: str  # this build's; a worker keeps the prober of the last key it saw
    files: dict[str, bytes]  # the float graph the probes quantize (model.onnx, its external data) by name
    properties: frozenset[GraphProperty]  # what the passes established on it (files do not carry them)
    target: TargetName
    options: Any  # the target's options dataclass
    ranges: dict[str, TensorRange]
    inputs: InputSet
    expected: np.ndarray  # the float model's outputs on `inputs`: every probe's reference
    base_exclude: tuple[str, ...]
    timestep_input: str | None
    template: Manifest
    candidates: tuple[str, ...]

    def nbytes(self) -> int:
        """The bulk of the state: the graph's files, the probe rows and the float outputs."""
        rows = sum(a.nbytes for a in self.inputs.arrays.values())
        return sum(len(data) for data in self.files.values()) + rows + self.expected.nbytes


def probe_state(prober: Prober, candidates: Sequence[str]) -> ProbeState:
    with tempfile.TemporaryDirectory(prefix="qcompile-probe-state-") as tmp:
        save_graph(prober.graph, Path(tmp) / "model.onnx")
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())}
    target = prober.target
    return ProbeState(uuid.uuid4().hex, files, frozenset(graph_properties(prober.graph)), target.name, target.options,
                      prober.ranges, prober.inputs, prober.expected, prober.base_exclude, prober.timestep_input,
                      prober.template, tuple(candidates))


# --- on the workers -----------------------------------------------------------------------------
_HELD: dict[str, tuple[Prober, tuple[str, ...], Path]] = {}  # per worker process: key -> prober, candidates, folder


def _probe(key: str, state: list, index: int) -> float:
    """One layer's probe. `state` is [the ProbeState's reference], in a list so that Ray hands the
    reference over unread: the state is read only by the first task of this build on each worker."""
    prober, candidates, _ = _HELD.get(key) or _hold(key, state[0])
    return float(prober.sqnr(alone(candidates, candidates[index])))


def _hold(key: str, ref) -> tuple[Prober, tuple[str, ...], Path]:
    import ray

    for old in list(_HELD):  # one build at a time per worker: drop an earlier build's prober
        shutil.rmtree(_HELD.pop(old)[2], ignore_errors=True)
    state: ProbeState = ray.get(ref)
    graph = load_graph(_node_copy(key, state.files) / "model.onnx")
    graph_properties(graph).update(state.properties)
    probes = Path(tempfile.mkdtemp(prefix=f"qcompile-probes-{key}-"))  # this worker's; removed by _sweep
    prober = Prober(graph, None, load_target(state.target, state.options), state.ranges, state.inputs,
                    state.base_exclude, timestep_input=state.timestep_input, template=state.template,
                    folder=probes, expected=state.expected)
    _HELD[key] = (prober, state.candidates, probes)
    return _HELD[key]


def _node_copy(key: str, files: dict[str, bytes]) -> Path:
    """This node's one copy of the float graph's files, shared by its workers: written aside by the
    first worker to need it and renamed into place, so a worker sees the folder whole or not at all."""
    folder = Path(tempfile.gettempdir()) / f"qcompile-probes-{key}"
    if not folder.is_dir():
        aside = Path(tempfile.mkdtemp(prefix=f"qcompile-probes-{key}-"))
        for name, data in files.items():
            (aside / name).write_bytes(data)
        try:
            aside.rename(folder)
        except OSError:  # another worker of this node renamed its copy first
            shutil.rmtree(aside, ignore_errors=True)
    return folder


def _sweep(key: str) -> None:
    """Remove this node's folders of the build `key`: Ray ends its worker processes without running their
    exit handlers, so the driver sends this task to every node once the probes are done."""
    for folder in Path(tempfile.gettempdir()).glob(f"qcompile-probes-{key}*"):
        shutil.rmtree(folder, ignore_errors=True)


# --- on the driver ------------------------------------------------------------------------------
def ray_probe_map(address: str, num_cpus: int | None = None) -> ProbeMap:
    """A ProbeMap running one Ray task per layer on the cluster at `address` ('' for a new local
    instance of `num_cpus` CPUs, stopped afterwards)."""

    def probe_on_ray(prober: Prober, candidates: Sequence[str]) -> list[float]:
        with ray_session(address, num_cpus) as ray:
            state = probe_state(prober, candidates)
            print(f"[qcompile] sensitivity on Ray: {len(candidates)} probe task(s); {state.nbytes() / 2**20:.1f} MiB "
                  "of probe state, shipped once to each node", flush=True)
            ref = ray.put(state)
            task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=True)(_probe)
            pending = {task.remote(state.key, [ref], i): i for i in range(len(candidates))}
            scores: dict[int, float] = {}
            try:
                with tqdm(total=len(candidates), desc="sensitivity on Ray", unit="layer", leave=False) as progress:
                    while pending:
                        (done,), _ = ray.wait(list(pending), num_returns=1)
                        i = pending.pop(done)
                        scores[i] = task_result(ray, done, f"the sensitivity probe of layer '{candidates[i]}'")
                        progress.update(1)
            finally:
                if pending:  # a layer failed: the other probes are of no use any more
                    for left in pending:
                        ray.cancel(left)
                    ray.wait(list(pending), num_returns=len(pending), timeout=60)
                _sweep_nodes(ray, state.key)
            return [scores[i] for i in range(len(candidates))]

    return probe_on_ray


def _sweep_nodes(ray, key: str) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    sweep = ray.remote(num_cpus=0, max_retries=1)(_sweep)
    refs = [sweep.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(key)
            for node in ray.nodes() if node["Alive"]]
    ray.wait(refs, num_returns=len(refs), timeout=60)
