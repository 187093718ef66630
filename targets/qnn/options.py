"""The QNN targets' own options (no onnxruntime-qnn import: the CLI reads this without the SDK)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qcompile.errors import UserError
from qcompile.target import STATIC_BATCH, OptionSpec, integer

DEFAULT_BATCH = 2  # one classifier-free-guidance pair per call
# HTP architectures onnxruntime-qnn 2.7.0 (QNN 2.51) compiles for; any other value is logged and ignored
# by the backend, which then compiles for its default, so qcompile refuses it instead.
HTP_ARCHS = (68, 69, 73, 75, 79, 81)
HTP_ARCH = OptionSpec("htp_arch", "--htp-arch", integer, "V",
                      "qnn-*: HTP architecture to compile context binaries for and simulate (73: Snapdragon 8 Gen 2, "
                      "75: 8 Gen 3, 79: 8 Elite); default: the QNN backend's")


@dataclass(frozen=True, kw_only=True)
class QnnOptions:
    batch: int = DEFAULT_BATCH  # QNN graphs are static
    htp_arch: int | None = None  # None: the QNN backend's default architecture

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise UserError(f"{STATIC_BATCH.flag} {self.batch}: needs at least 1")
        if self.htp_arch is not None and self.htp_arch not in HTP_ARCHS:
            raise UserError(f"{HTP_ARCH.flag} {self.htp_arch}: not an HTP architecture the QNN backend knows; choose "
                            f"one of {', '.join(map(str, HTP_ARCHS))}")

    @classmethod
    def cli(cls) -> tuple[OptionSpec, ...]:
        return (STATIC_BATCH, HTP_ARCH)

    @classmethod
    def from_cli(cls, values: Mapping[str, Any]) -> QnnOptions:
        return cls(**values)
