"""The project's trained reference diffusion model: a small class-conditional digits UNet.

Every fidelity number qcompile reports (sample accuracy, Fréchet distance, per-timestep error of a
quantized artifact) is measured against this model, so it has to be a *trained* network with real
activation statistics, not seeded random weights: random weights have no outliers, no
timestep-dependent ranges and no attention structure worth preserving, and a quantizer that looks
fine on them tells us nothing.

It is deliberately shaped like Stable Diffusion's denoiser, only tiny: a diffusers
`UNet2DConditionModel` (16x16x1 pixel space, three resolution levels, cross-attention in two of
them and in the mid block) whose conditioning enters through `encoder_hidden_states`, exactly as
text does in SD. A learned `LabelEmbedding` maps a digit label (or the null label used for
classifier-free guidance) to a few "tokens", so the cross-attention softmax has more than one key
to choose from and its quantization is not trivially exact.

The data is scikit-learn's bundled 8x8 digits (no download), upscaled to 16x16. A small CNN
(`DigitClassifier`) trained on the same data judges samples (class accuracy) and provides the
penultimate features for a Fréchet distance.

Artifacts live in `models/reference/` (written by `tools/train_reference.py`, which imports every
definition below, so the training code and the loading code cannot drift apart).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 16
NUM_CLASSES = 10
# Index of the "no label" embedding used for the unconditional branch of classifier-free guidance.
NULL_LABEL = 10
# Several tokens per label: with a single key, softmax over keys is identically 1 and the
# cross-attention would degenerate into a per-label bias, which is no test of attention quantization.
LABEL_TOKENS = 4
CROSS_ATTENTION_DIM = 64
# Fraction of the digits held out from training (both the UNet and the classifier); the split is a
# fixed permutation so every run and every test sees the same held-out images.
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 1234

# The UNet: ~1.2M parameters. Three levels (16, 8, 4 px), cross-attention at 8 px, 4 px and in the
# mid block; the 16 px level is plain ResNet blocks (as SD's highest-resolution level would be if it
# were cheap to drop attention there). `attention_head_dim` is diffusers' legacy name for the number
# of heads: 4 heads of 16 channels at width 64.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": CROSS_ATTENTION_DIM,
    "attention_head_dim": 4,
}

# Linear betas as in DDPM (which used them for 32x32 pixel space); "trailing" spacing makes a
# few-step sampler start at t=999, where the input really is (almost) pure noise.
# clip_sample is off on purpose: DDIM clips its x0 estimate but keeps stepping along the unclipped
# epsilon, and with guidance that mismatch compounds over steps. Measured on the trained model
# (100 samples, guidance 2.5): DDIM-50 class accuracy 0.70-0.81 with clipping, 1.00 without;
# at guidance 4, 0.28 with clipping. Training only uses the betas, so this is a sampling choice.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
}


def reference_dir() -> Path:
    """Folder with the committed artifacts (installed as package data of qcompile.models)."""
    return Path(__file__).resolve().parent / "reference"


# --- data ------------------------------------------------------------------------------------------
def load_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 sklearn digits as float32 (N, 1, 16, 16) in [-1, 1] and int64 labels (N,).

    The 8x8 images (values 0..16) are upscaled bilinearly: 16x16 gives the UNet three meaningful
    resolution levels (16, 8, 4) while staying cheap enough to train on two CPU cores.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = (images * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels


def train_test_indices(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, held-out) index split of the digits dataset.

    A fixed-seed permutation rather than sklearn's train_test_split, so the split depends only on
    torch's generator and not on library versions.
    """
    if n is None:
        n = len(load_digits_dataset()[1])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(n * HELD_OUT_FRACTION))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


# --- conditioning ----------------------------------------------------------------------------------
class LabelEmbedding(nn.Module):
    """Maps digit labels to `encoder_hidden_states` of shape (B, LABEL_TOKENS, dim).

    The label plays the role of the prompt: it reaches the UNet only through cross-attention keys
    and values, as CLIP text embeddings do in Stable Diffusion. Index NULL_LABEL (10) is the learned
    "empty prompt" for classifier-free guidance. Each label owns LABEL_TOKENS independent vectors, so
    attention has several keys to weigh.
    """

    NULL_LABEL = NULL_LABEL

    def __init__(self, num_labels: int = NUM_CLASSES + 1, tokens: int = LABEL_TOKENS,
                 dim: int = CROSS_ATTENTION_DIM):
        super().__init__()
        self.tokens = tokens
        self.dim = dim
        self.embedding = nn.Embedding(num_labels, tokens * dim)
        # Unit-scale entries: similar in magnitude to a layer-normed text encoder's output.
        nn.init.normal_(self.embedding.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels.long()).view(labels.shape[0], self.tokens, self.dim)


# --- classifier ------------------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    """Small CNN that judges generated digits: class accuracy, and 64-d features for a Fréchet
    distance (the role Inception-v3 plays for FID, at the scale of 16x16 digits).

    No batch norm, so eval-mode output depends on nothing but the weights and the input.
    """

    FEATURE_DIM = 64

    def __init__(self, num_classes: int = NUM_CLASSES, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
        )
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (post-ReLU) features, (B, FEATURE_DIM)."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


# --- loading ---------------------------------------------------------------------------------------
def load_reference_unet():
    """The trained UNet (EMA weights), fp32, eval mode."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(reference_dir() / "unet", torch_dtype=torch.float32,
                                                local_files_only=True, use_safetensors=True)
    return unet.eval()


def load_scheduler_config() -> dict[str, Any]:
    """The saved DDPMScheduler config; build any diffusers scheduler with `Cls.from_config(...)`."""
    with open(reference_dir() / "scheduler" / "scheduler_config.json") as f:
        return json.load(f)


def _load_state(module: nn.Module, filename: str) -> nn.Module:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(reference_dir() / filename)))
    return module.eval()


def load_label_embedding() -> LabelEmbedding:
    return _load_state(LabelEmbedding(), "label_embedding.safetensors")


def load_classifier() -> DigitClassifier:
    return _load_state(DigitClassifier(), "classifier.safetensors")


# --- sampling --------------------------------------------------------------------------------------
@torch.no_grad()
def sample_digits(unet, label_embedding: LabelEmbedding, scheduler, labels: torch.Tensor,
                  num_inference_steps: int = 50, guidance_scale: float = 2.5,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free-guided sampling with any diffusers scheduler; returns images in [-1, 1].

    The conditional and unconditional branches run as one batch (uncond first), the way SD
    pipelines do, so a compiled artifact sees the same batch layout as here.
    """
    labels = labels.long()
    b = labels.shape[0]
    scheduler.set_timesteps(num_inference_steps)
    x = torch.randn((b, 1, IMAGE_SIZE, IMAGE_SIZE), generator=generator) * scheduler.init_noise_sigma
    null = torch.full_like(labels, NULL_LABEL)
    context = torch.cat([label_embedding(null), label_embedding(labels)])
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        eps_uncond, eps_cond = unet(model_in, t, encoder_hidden_states=context).sample.chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def classify(classifier: DigitClassifier, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Predicted labels (int64) for images in [-1, 1]."""
    return torch.cat([classifier(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])
