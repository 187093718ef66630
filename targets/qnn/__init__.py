"""Qualcomm QNN targets (HTP NPU): integer-only Q/DQ ONNX, proven on the QNN HTP simulator."""
