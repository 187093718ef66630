"""A tiny StableDiffusionPipeline folder made offline: random weights, a letter vocabulary for the
CLIP tokenizer (no hub download), every component small enough to run a whole pipeline in a second."""

from __future__ import annotations

import json
from pathlib import Path

TOKENS = 77  # the tokenizer's length: what the pipeline hands the UNet as encoder_hidden_states


def save_tiny_sd_pipeline(folder: Path, seed: int = 0) -> Path:
    """Write a StableDiffusionPipeline (save_pretrained layout, tokenizer included) under `folder`/sd."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16),
        text_encoder=CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1)),
        tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TOKENS),
        unet=UNet2DConditionModel(
            sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=8),
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"
