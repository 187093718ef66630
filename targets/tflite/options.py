"""The TFLite targets' own options (no LiteRT import: the CLI reads this without the SDK)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qcompile.errors import UserError
from qcompile.target import STATIC_BATCH, OptionSpec

DEFAULT_BATCH = 1


@dataclass(frozen=True, kw_only=True)
class TfliteOptions:
    # TFLite tensors are static: the file is built for this batch (recorded in its metadata).
    batch: int = DEFAULT_BATCH

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise UserError(f"{STATIC_BATCH.flag} {self.batch}: needs at least 1")

    @classmethod
    def cli(cls) -> tuple[OptionSpec, ...]:
        return (STATIC_BATCH,)

    @classmethod
    def from_cli(cls, values: Mapping[str, Any]) -> TfliteOptions:
        return cls(**values)
