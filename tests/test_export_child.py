"""A large model exports in a child process (qcompile.export_child): the same model as an export in
this process, checked against torch's outputs that the child recorded; a child that fails is an
exporter failure with its reason, like one in this process."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qcompile.export import ExportError, export_onnx
from qcompile.export_child import CHILD_EXPORT_BYTES, ModelSource, module_bytes
from qcompile.models.source import resolve_model

MODEL = "builtin:tiny-sd-unet"


def _weights(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_child_export_equals_export_here(tmp_path):
    adapter = resolve_model(MODEL)
    assert module_bytes(adapter.module) < CHILD_EXPORT_BYTES  # so the default exports it here
    here = export_onnx(adapter, tmp_path / "here" / "model.onnx")
    child = export_onnx(adapter, tmp_path / "child" / "model.onnx", source=ModelSource(MODEL, None, 0),
                        child_bytes=0)
    assert child.exporter == here.exporter == "dynamo"
    assert child.max_abs_diff == pytest.approx(here.max_abs_diff, rel=0, abs=1e-7)
    assert child.max_abs_diff < 1e-4
    a, b = onnx.load(str(here.onnx_path), load_external_data=False), onnx.load(str(child.onnx_path),
                                                                               load_external_data=False)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    wa, wb = _weights(here.onnx_path), _weights(child.onnx_path)
    assert wa.keys() == wb.keys()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in (tmp_path / "child").iterdir()) == ["model.data", "model.onnx"]


def test_child_failure_is_an_exporter_failure(tmp_path):
    adapter = resolve_model(MODEL)
    with pytest.raises(ExportError) as err:
        export_onnx(adapter, tmp_path / "model.onnx", source=ModelSource("builtin:no-such-model", None, 0),
                    child_bytes=0)
    message = str(err.value)
    assert "dynamo exporter failed" in message and "legacy exporter failed" in message
    assert "no-such-model" in message
    assert not (tmp_path / "model.onnx").exists()
