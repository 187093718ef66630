"""A plain-Python description of a TFLite model (tensors, buffers, operators, signatures).

Lowering fills it in; `emit.py` turns it into a flatbuffer. Keeping the two apart means the lowering
never touches the generated schema classes, and the emitter owns every flatbuffer detail (alignment,
the 2 GB limit, op-code tables). Constant buffers are deduplicated by content, so subgraphs of
several timestep buckets share their weight buffers automatically.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Quant:
    """TFLite quantization parameters: one scale per tensor, or per channel along `axis`."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    @classmethod
    def per_tensor(cls, scale: float, zero_point: int) -> Quant:
        return cls((float(np.float32(scale)),), (int(zero_point),))

    @classmethod
    def of(cls, scale: np.ndarray, zero_point: np.ndarray, axis: int = 0) -> Quant:
        s = np.asarray(scale, np.float32).reshape(-1)
        z = np.asarray(zero_point).astype(np.int64).reshape(-1)
        if z.size == 1 and s.size > 1:
            z = np.repeat(z, s.size)
        return cls(tuple(float(v) for v in s), tuple(int(v) for v in z), axis)

    @property
    def per_channel(self) -> bool:
        return len(self.scale) > 1


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    quant: Quant | None = None
    buffer: int = 0  # 0: the empty buffer (a non-constant tensor)


@dataclass(frozen=True)
class OpSpec:
    """One operator: a BuiltinOperator name, its options table (type name and fields) and its tensors."""

    code: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options_type: str | None = None
    options: tuple[tuple[str, Any], ...] = ()


@dataclass
class Subgraph:
    name: str
    tensors: list[TensorSpec] = field(default_factory=list)
    ops: list[OpSpec] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)

    def add_tensor(self, name: str, shape, dtype, quant: Quant | None = None, buffer: int = 0) -> int:
        """Append a tensor; names are made unique (signatures and debugging refer to tensors by name)."""
        unique, i = name, 1
        while unique in self._names:
            unique, i = f"{name}_{i}", i + 1
        self._names.add(unique)
        self.tensors.append(TensorSpec(unique, tuple(int(d) for d in shape), np.dtype(dtype), quant, buffer))
        return len(self.tensors) - 1

    def add_op(self, code: str, inputs, outputs, options_type: str | None = None, **options: Any) -> None:
        self.ops.append(OpSpec(code, tuple(inputs), tuple(outputs), options_type, tuple(sorted(options.items()))))

    def spec(self, index: int) -> TensorSpec:
        return self.tensors[index]


@dataclass
class Signature:
    key: str
    subgraph: int
    inputs: list[tuple[str, int]]  # (name at the API, tensor index)
    outputs: list[tuple[str, int]]


class ModelBuilder:
    """Owns the buffers (deduplicated by content), the subgraphs, the signatures and the metadata."""

    def __init__(self, description: str = "qcompile"):
        self.description = description
        self.buffers: list[np.ndarray] = [np.zeros(0, np.uint8)]  # buffer 0 is the empty sentinel
        self._buffer_index: dict[bytes, int] = {}
        self.subgraphs: list[Subgraph] = []
        self.signatures: list[Signature] = []
        self.metadata: dict[str, bytes] = {}

    def add_subgraph(self, name: str) -> Subgraph:
        self.subgraphs.append(Subgraph(name))
        return self.subgraphs[-1]

    def add_buffer(self, data: np.ndarray) -> int:
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        digest = hashlib.blake2b(raw.data, digest_size=20).digest() + raw.size.to_bytes(8, "little")
        index = self._buffer_index.get(digest)
        if index is None:
            index = len(self.buffers)
            self.buffers.append(raw)
            self._buffer_index[digest] = index
        return index

    def constant(self, sg: Subgraph, name: str, values: np.ndarray, quant: Quant | None = None) -> int:
        values = np.asarray(values)
        return sg.add_tensor(name, values.shape, values.dtype, quant, self.add_buffer(values))

    @property
    def data_bytes(self) -> int:
        return sum(b.size for b in self.buffers)
