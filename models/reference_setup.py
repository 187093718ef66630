"""builtin:reference as a model that can sample: labels in, digits out, judged by the shipped classifier.

The adapter is the ordinary UNet2DCondition adapter plus a `sampling()` setup, so `qcompile build`
and `qcompile eval` can run real sampling loops on any compiled artifact of it, and its synthetic
calibration inputs carry real label embeddings (as a text pipeline would carry real prompts).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch

from qcompile.models import reference_model as ref
from qcompile.models.unet2d_condition import UNet2DConditionAdapter


class ReferenceSampling:
    """The SamplingSetup of the reference model (qcompile.evaluation.fidelity)."""

    cond_input = "encoder_hidden_states"
    latent_shape = (1, ref.IMAGE_SIZE, ref.IMAGE_SIZE)

    @cached_property
    def scheduler_config(self) -> dict[str, Any]:
        return ref.load_scheduler_config()

    @cached_property
    def _embedding(self) -> ref.LabelEmbedding:
        return ref.load_label_embedding()

    @cached_property
    def _classifier(self) -> ref.DigitClassifier:
        return ref.load_classifier()

    def labels(self, per_class: int) -> np.ndarray:
        return np.repeat(np.arange(ref.NUM_CLASSES, dtype=np.int64), per_class)

    @torch.no_grad()
    def conditioning(self, labels: np.ndarray) -> np.ndarray:
        return self._embedding(torch.from_numpy(np.asarray(labels, np.int64))).numpy().astype(np.float32)

    def null_conditioning(self, count: int) -> np.ndarray:
        return self.conditioning(np.full(count, ref.NULL_LABEL, np.int64))

    @torch.no_grad()
    def judge(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.asarray(images, np.float32))
        feats = self._classifier.features(x)
        return self._classifier.head(feats).argmax(1).numpy(), feats.numpy()

    @cached_property
    def _data_features(self) -> np.ndarray:
        images, _ = ref.load_digits_dataset()
        _, held_out = ref.train_test_indices(len(images))
        return self.judge(images[held_out].numpy())[1]

    def data_features(self) -> np.ndarray:
        return self._data_features


class ReferenceAdapter(UNet2DConditionAdapter):
    """The trained digits UNet; conditioning is label embeddings, 10% of them the null label (CFG)."""

    @cached_property
    def _sampling(self) -> ReferenceSampling:
        return ReferenceSampling()

    def sampling(self) -> ReferenceSampling:
        return self._sampling

    def synthetic_inputs(self, timesteps: Sequence[float], seed: int = 0) -> dict[str, np.ndarray]:
        out = super().synthetic_inputs(timesteps, seed)
        rng = np.random.default_rng(seed + 1)
        labels = rng.integers(0, ref.NUM_CLASSES, len(timesteps))
        labels[rng.uniform(size=len(timesteps)) < 0.1] = ref.NULL_LABEL
        out[self._sampling.cond_input] = self._sampling.conditioning(labels)
        return out
