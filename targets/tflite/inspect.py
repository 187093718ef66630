"""Read back what a .tflite file contains (operators and their tensor types), for tests and reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qcompile.targets.tflite import deps


@dataclass(frozen=True)
class OpInfo:
    code: str
    version: int
    input_types: tuple[str, ...]
    output_types: tuple[str, ...]


def operators(path: Path | bytes, subgraph: int = 0) -> list[OpInfo]:
    S = deps.schema()
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    model = S.Model.GetRootAs(data, 0)
    code_names = {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(S.TensorType).items() if not k.startswith("_")}
    sg = model.Subgraphs(subgraph)
    ops = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        oc = model.OperatorCodes(op.OpcodeIndex())
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())

        def types(indices):
            return tuple(type_names[sg.Tensors(int(t)).Type()] if t >= 0 else "NONE" for t in indices)

        ops.append(OpInfo(code_names[code], oc.Version(), types(op.InputsAsNumpy()), types(op.OutputsAsNumpy())))
    return ops
