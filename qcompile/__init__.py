"""qcompile: compile diffusion models into quantized, deployable artifacts.

    import qcompile
    qcompile.build("sd-pipeline", "unet-int8", component="unet", target="ort-int8")
    pipe.unet = qcompile.load("unet-int8")

`build`, `calibrate` and `load` come from qcompile.api, imported on first use: `import qcompile`
itself loads neither torch nor onnx.
"""

__version__ = "0.1.0"
__all__ = ["__version__", "build", "calibrate", "load"]
_API = ("build", "calibrate", "load")


def __getattr__(name: str):
    if name in _API:
        from qcompile import api

        return getattr(api, name)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
