"""TFLite targets (`tflite-int8`, `tflite-fp32`): the Q/DQ ONNX graph lowered to a TFLite flatbuffer.

No TensorFlow: the flatbuffer is written with the schema's object API from `ai_edge_litert`, and the
artifact runs in the LiteRT interpreter. `ai_edge_litert` is an optional extra, imported lazily.
"""
