"""The PyTorch reference (segmentation_models_pytorch's Unet) measured the same way as the JAX step."""

from __future__ import annotations

import math

from train_bench.measure import Skipped, failure, gigabytes, timed_loop
from train_bench.plan import Job, Settings


def torch_loss(logits, masks):
    """BCE with logits + per-image soft Dice (smooth 1), as `make_loss(BCE_DICE)`, in float32."""
    import torch

    logits = logits.float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
    probs = logits.sigmoid()
    dims = (1, 2, 3)
    dice = (2 * (probs * masks).sum(dims) + 1) / (probs.sum(dims) + masks.sum(dims) + 1)
    return bce + (1 - dice).mean()


def torch_mode(job: Job, settings: Settings, compiled: bool) -> dict:
    """One torch training mode from a fresh model: first step (with compilation), warm-up, timed steps."""
    import segmentation_models_pytorch as smp
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = smp.Unet(job.model, encoder_weights=None, classes=1).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(job.batch, 3, job.size, job.size, device=device, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last)
    masks = (torch.rand(job.batch, 1, job.size, job.size, device=device, generator=generator) < 0.5).float()
    losses = []

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            logits = forward(images)
        loss = torch_loss(logits, masks)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first_step_s = timed_loop(one_step, sync, 1)
    timed_loop(one_step, sync, settings.warmup)
    seconds = timed_loop(one_step, sync, settings.steps)
    loss = float(losses[-1])
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    return {
        "status": "ok",
        "images_per_s": job.batch * settings.steps / seconds,
        "step_ms": 1e3 * seconds / settings.steps,
        "first_step_s": first_step_s,
        "peak_gb": gigabytes(torch.cuda.max_memory_allocated()) if cuda else None,
        "precision": "bf16 autocast, channels_last" if cuda else "float32, channels_last",
        "loss": loss,
    }


def run_torch(job: Job, settings: Settings, report) -> dict:
    try:
        import segmentation_models_pytorch  # noqa: F401 - checked here, used by torch_mode
        import torch
    except ImportError as error:
        raise Skipped(f"PyTorch reference unavailable: {error}") from error
    if not settings.smoke and not torch.cuda.is_available():
        raise Skipped("torch sees no CUDA device")
    torch.backends.cudnn.benchmark = True
    result = {"torch_version": torch.__version__, "eager": torch_mode(job, settings, compiled=False)}
    if job.compile:
        report(result)  # eager survives a failing compile
        torch.cuda.empty_cache()
        try:
            result["compile"] = torch_mode(job, settings, compiled=True)
        except Exception as error:  # noqa: BLE001 - reported beside the eager figures
            result["compile"] = failure(error)
    return result
