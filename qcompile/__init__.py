"""qcompile: compile diffusion models into quantized, deployable artifacts."""

__version__ = "0.1.0"
