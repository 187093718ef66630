"""Train the project's reference digits diffusion model and its judging classifier.

    python tools/train_reference.py            # writes models/reference/ and docs/reference_samples.png

Everything the model *is* (UNet config, scheduler config, label embedding, classifier, data split)
is defined once in qcompile.models.reference_model; this script only trains it. Seeded throughout
and run with a fixed number of threads, so a rerun on the same machine reproduces the weights.

Budget: 3000 UNet steps of batch 64 take about 17 minutes with 2 threads on an idle two-core machine,
25-30 minutes single-threaded next to other jobs; the classifier takes under a minute.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qcompile.models.reference_model import (
    IMAGE_SIZE,
    NULL_LABEL,
    NUM_CLASSES,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    DigitClassifier,
    LabelEmbedding,
    classify,
    load_digits_dataset,
    reference_dir,
    sample_digits,
    train_test_indices,
)

REPO = Path(__file__).resolve().parents[1]


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in x and y, filling with background (-1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen)
    return torch.stack([padded[i, :, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(offs.tolist())])


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# --- classifier ------------------------------------------------------------------------------------
def train_classifier(images, labels, train_idx, test_idx, seed: int, epochs: int, log):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    x_train, y_train = images[train_idx], labels[train_idx]
    batch = 64
    steps_per_epoch = math.ceil(len(x_train) / batch)
    total = epochs * steps_per_epoch
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            x = random_shift(x_train[idx], gen)
            # Mild pixel noise: the classifier will judge generated samples, which are never as
            # clean as the dataset; this keeps its decisions from hinging on exact pixel values.
            x = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, 2e-3, warmup=steps_per_epoch)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if (epoch + 1) % 5 == 0 or epoch == epochs - 1:
            model.eval()
            acc = (classify(model, images[test_idx]) == labels[test_idx]).float().mean().item()
            log(f"classifier epoch {epoch + 1:3d}  loss {loss.item():.4f}  held-out acc {acc:.4f}")
    model.eval()
    return model, acc


# --- diffusion -------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1.0 - decay)


# Sampler settings for the committed accuracy numbers: (diffusers class name, steps, extra config).
SAMPLERS = {
    "ddim": ("DDIMScheduler", 50, {}),
    "euler": ("EulerDiscreteScheduler", 30, {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", 20, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
GUIDANCE = 2.5


def make_scheduler(name: str = "ddim"):
    import diffusers

    cls_name, steps, extra = SAMPLERS[name]
    return getattr(diffusers, cls_name).from_config(SCHEDULER_CONFIG, **extra), steps


def sample_accuracy(unet, emb, classifier, per_class: int, seed: int, sampler: str = "ddim",
                    steps: int | None = None, guidance: float = GUIDANCE) -> float:
    scheduler, default_steps = make_scheduler(sampler)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(seed)
    samples = sample_digits(unet, emb, scheduler, labels, steps or default_steps, guidance, generator=gen)
    return (classify(classifier, samples) == labels).float().mean().item()


def save_grid(unet, emb, path: Path, per_class: int = 8, guidance: float = GUIDANCE, seed: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scheduler, steps = make_scheduler("ddim")
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    samples = sample_digits(unet, emb, scheduler, labels, steps, guidance,
                            generator=torch.Generator().manual_seed(seed))
    # rows = classes, columns = samples; 1 px gutter, nearest-neighbour upscaling for viewing.
    tiles = F.pad((samples + 1) / 2, (1, 1, 1, 1), value=1.0)
    s = IMAGE_SIZE + 2
    grid = tiles.view(NUM_CLASSES, per_class, s, s).permute(0, 2, 1, 3).reshape(NUM_CLASSES * s, per_class * s)
    grid = grid.repeat_interleave(4, 0).repeat_interleave(4, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid.numpy(), cmap="gray", vmin=0.0, vmax=1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=reference_dir())
    p.add_argument("--grid", type=Path, default=REPO / "docs" / "reference_samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.12)
    p.add_argument("--classifier-epochs", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=1000)
    # One thread by default: on a shared two-core machine, two OpenMP threads competing with other
    # processes spend most of their time in barriers (measured: 2.3 s/step with 2 threads vs 0.5 s/step
    # with 1 while another job ran; 0.33 s/step with 2 threads on an idle machine). A fixed thread
    # count also keeps floating-point reduction order, hence the weights, reproducible.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-only", action="store_true",
                   help="load the artifacts in --out, re-measure sample accuracy, rewrite grid and scheduler")
    args = p.parse_args()

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    if args.eval_only:
        eval_only(args, log)
        return

    images, labels = load_digits_dataset()
    train_idx, test_idx = train_test_indices(len(labels))
    log(f"digits: {len(labels)} images, train {len(train_idx)}, held-out {len(test_idx)}")

    classifier, clf_acc = train_classifier(images, labels, train_idx, test_idx, args.seed,
                                           args.classifier_epochs, log)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()},
              str(args.out / "classifier.safetensors"))

    # The UNet trains on the training split only, so the held-out images stay unseen by everything.
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    emb = LabelEmbedding()
    noise_sched = DDPMScheduler(**SCHEDULER_CONFIG)
    abar = noise_sched.alphas_cumprod
    n_params = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in emb.parameters())
    log(f"unet {sum(p.numel() for p in unet.parameters()):,} params, label embedding "
        f"{sum(p.numel() for p in emb.parameters()):,}")

    class Joint(torch.nn.Module):  # one module so one EMA covers the UNet and the embedding
        def __init__(self):
            super().__init__()
            self.unet, self.emb = unet, emb

    model = Joint().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = list(model.parameters())
    decay_params = [p for p in params if p.ndim >= 2]
    other_params = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": 1e-2},
                             {"params": other_params, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))

    x_train, y_train = images[train_idx], labels[train_idx]
    perm, cursor = torch.randperm(len(x_train), generator=gen), 0
    loss_hist: list[float] = []
    history: list[dict] = []
    t_unet = time.time()
    for step in range(args.steps):
        if cursor + args.batch > len(perm):
            perm, cursor = torch.randperm(len(x_train), generator=gen), 0
        idx = perm[cursor:cursor + args.batch]
        cursor += args.batch
        x0 = random_shift(x_train[idx], gen)
        y = y_train[idx].clone()
        y[torch.rand(len(y), generator=gen) < args.label_dropout] = NULL_LABEL
        t = torch.randint(0, SCHEDULER_CONFIG["num_train_timesteps"], (len(y),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        pred = unet(xt, t, encoder_hidden_states=emb(y)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # EMA with the usual warm-up so early averages are not dominated by the random init.
        ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))

        loss_hist.append(loss.item())
        if (step + 1) % 50 == 0:
            recent = sum(loss_hist[-50:]) / 50
            rate = (time.time() - t_unet) / (step + 1)
            log(f"step {step + 1:5d}  loss(avg50) {recent:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{rate:.2f} s/step  eta {rate * (args.steps - step - 1) / 60:.1f} min")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            acc = sample_accuracy(ema.unet, ema.emb, classifier, per_class=10, seed=123, steps=20)
            history.append({"step": step + 1, "loss_avg50": sum(loss_hist[-50:]) / 50, "ddim20_acc": acc})
            log(f"step {step + 1:5d}  EMA sample acc (DDIM 20, cfg {GUIDANCE}, 100 samples) {acc:.3f}")
    train_wall = time.time() - t_unet

    ema.unet.save_pretrained(args.out / "unet", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in ema.emb.state_dict().items()},
              str(args.out / "label_embedding.safetensors"))

    info = {
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "lr_schedule": f"linear warmup {args.warmup} steps, cosine to 5%",
        "optimizer": "AdamW(betas=(0.9, 0.99), weight_decay=1e-2 on matrices), grad clip 1.0",
        "ema_decay": args.ema_decay,
        "label_dropout": args.label_dropout,
        "augmentation": "random +-1 px shift (background fill)",
        "train_images": len(train_idx),
        "parameters": n_params,
        "unet_train_wall_s": round(train_wall, 1),
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "final_loss_avg100": round(sum(loss_hist[-100:]) / min(100, len(loss_hist)), 5),
        "classifier_held_out_acc": round(clf_acc, 4),
        "history_sampler": f"DDIM 20 steps, cfg {GUIDANCE}, 100 samples, seed 123, "
                           f"clip_sample={SCHEDULER_CONFIG['clip_sample']}",
        "history": history,
    }
    evaluate(args, ema.unet, ema.emb, classifier, info, log)
    info["total_wall_s"] = round(time.time() - t_start, 1)
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"done in {info['total_wall_s']:.0f} s")


def evaluate(args, unet, emb, classifier, info: dict, log) -> None:
    """Sample accuracy of the EMA model with each sampler (200 samples), the sample grid, and the
    scheduler config; the numbers go into `info` (training.json)."""
    from diffusers import DDPMScheduler

    DDPMScheduler(**SCHEDULER_CONFIG).save_config(args.out / "scheduler")
    per_class = 20
    accs = {}
    for name, (cls_name, steps, _) in SAMPLERS.items():
        acc = sample_accuracy(unet, emb, classifier, per_class=per_class, seed=2024, sampler=name)
        accs[name] = {"scheduler": cls_name, "steps": steps, "accuracy": round(acc, 4)}
        log(f"EMA sample acc ({cls_name} {steps} steps, cfg {GUIDANCE}, {per_class * NUM_CLASSES} samples) "
            f"{acc:.3f}")
    info["sample_accuracy"] = {"guidance_scale": GUIDANCE, "samples": per_class * NUM_CLASSES,
                               "seed": 2024, "by_sampler": accs}
    if args.grid:
        save_grid(unet, emb, args.grid)
        log(f"wrote {args.grid}")


def eval_only(args, log) -> None:
    """Re-measure committed artifacts (e.g. after a sampling-config change) without retraining."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(args.out / "unet", local_files_only=True,
                                                use_safetensors=True).eval()
    emb = LabelEmbedding()
    emb.load_state_dict(load_file(str(args.out / "label_embedding.safetensors")))
    classifier = DigitClassifier()
    classifier.load_state_dict(load_file(str(args.out / "classifier.safetensors")))
    info_path = args.out / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.pop("sample_acc_ddim50_cfg2.5_200", None)
    evaluate(args, unet, emb.eval(), classifier.eval(), info, log)
    info_path.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
