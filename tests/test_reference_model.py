"""The committed reference model is what every fidelity number rests on: check it loads and is good.

If these fail after retraining, the quality numbers elsewhere in the project are meaningless.
"""

from __future__ import annotations

import pytest
import torch

from qcompile.models.reference_model import (
    IMAGE_SIZE,
    LABEL_TOKENS,
    NULL_LABEL,
    NUM_CLASSES,
    DigitClassifier,
    LabelEmbedding,
    classify,
    load_classifier,
    load_digits_dataset,
    load_label_embedding,
    load_reference_unet,
    load_scheduler_config,
    reference_dir,
    sample_digits,
    train_test_indices,
)


@pytest.fixture(scope="module")
def unet():
    return load_reference_unet()


@pytest.fixture(scope="module")
def embedding():
    return load_label_embedding()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_artifacts_present_and_small():
    d = reference_dir()
    for rel in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json", "label_embedding.safetensors",
                "classifier.safetensors", "training.json"):
        assert (d / rel).is_file(), rel
        assert (d / rel).stat().st_size < 10 * 2**20, rel


def test_weights_load(unet, embedding, classifier):
    assert not unet.training and unet.dtype == torch.float32
    assert unet.config.cross_attention_dim == embedding.dim
    assert isinstance(embedding, LabelEmbedding) and isinstance(classifier, DigitClassifier)
    ctx = embedding(torch.tensor([0, 9, NULL_LABEL]))
    assert ctx.shape == (3, LABEL_TOKENS, unet.config.cross_attention_dim)
    x = torch.zeros(3, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        out = unet(x, torch.tensor(500), encoder_hidden_states=ctx).sample
        feats = classifier.features(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert feats.shape == (3, DigitClassifier.FEATURE_DIM)
    cfg = load_scheduler_config()
    assert cfg["_class_name"] == "DDPMScheduler" and cfg["num_train_timesteps"] == 1000
    assert cfg["prediction_type"] == "epsilon"


def test_dataset_and_split_deterministic():
    images, labels = load_digits_dataset()
    assert images.shape == (1797, 1, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(NUM_CLASSES))
    assert images.min() >= -1.0 and images.max() <= 1.0
    train, test = train_test_indices(len(labels))
    train2, test2 = train_test_indices(len(labels))
    assert torch.equal(test, test2) and torch.equal(train, train2)
    assert len(set(train.tolist()) & set(test.tolist())) == 0 and len(train) + len(test) == len(labels)


def test_classifier_held_out_accuracy(classifier):
    images, labels = load_digits_dataset()
    _, test = train_test_indices(len(labels))
    acc = (classify(classifier, images[test]) == labels[test]).float().mean().item()
    assert acc >= 0.95, acc


def test_ddim_cfg_samples_are_recognisable(unet, embedding, classifier):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(load_scheduler_config())
    labels = torch.arange(NUM_CLASSES).repeat_interleave(4)
    # One thread: on a shared 2-core CI box two OpenMP threads mostly wait on each other (~15 s vs ~60 s
    # next to another job); a batch of 80 tiny images has little parallelism to offer anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples = sample_digits(unet, embedding, scheduler, labels, num_inference_steps=20,
                                guidance_scale=2.5, generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(threads)
    assert samples.shape == (40, 1, IMAGE_SIZE, IMAGE_SIZE)
    acc = (classify(classifier, samples) == labels).float().mean().item()
    assert acc >= 0.85, acc  # 1.0 when trained
