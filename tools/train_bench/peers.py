"""The PyTorch reference (segmentation_models_pytorch's Unet, Adam, the same loss) as contestants of the duel, and
the work of its step: parameters and FLOP by PyTorch's own counter."""

from __future__ import annotations

import math
from collections.abc import Callable

from train_bench.measure import Skipped, gigabytes
from train_bench.plan import Job, Settings
from train_bench.rounds import Contestant, log_phase, timed_loop


def torch_loss(logits, masks):
    """BCE with logits + per-image soft Dice (smooth 1), as `make_loss(BCE_DICE)`, in float32."""
    import torch

    logits = logits.float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
    probs = logits.sigmoid()
    dims = (1, 2, 3)
    dice = (2 * (probs * masks).sum(dims) + 1) / (probs.sum(dims) + masks.sum(dims) + 1)
    return bce + (1 - dice).mean()


def reference_model(model: str):
    import segmentation_models_pytorch as smp

    return smp.Unet(model, encoder_weights=None, classes=1)


def import_torch():
    try:
        import segmentation_models_pytorch  # noqa: F401 - the reference model
        import torch
    except ImportError as error:
        raise Skipped(f"PyTorch reference unavailable: {error}") from error
    return torch


def grouped_conv_backward_flop(*args, out_shape) -> int:
    """`FlopCounterMode`'s formula for `convolution_backward` with its weight gradient divided by `groups`.

    PyTorch's formula (torch/utils/flop_counter.py, 2.11 to 2.14) counts a grouped convolution's weight gradient as
    if the convolution were dense: `groups` times its products (32 x for SE-ResNeXt's 3x3 convolutions), so its
    total for UNet-SE-ResNeXt50 is 29% too high. The input gradient and the forward pass it counts right."""
    from torch.utils.flop_counter import conv_backward_flop

    formula = conv_backward_flop.__wrapped__  # the registered one takes tensors; this one their shapes
    *shapes, groups, output_mask = args
    total = formula(*args, out_shape=out_shape)
    if groups == 1 or not output_mask[1]:
        return total
    weight_gradient = formula(*shapes, groups, [False, True, False], out_shape=out_shape)
    return total - weight_gradient + weight_gradient // groups


def step_flops(model, images, masks, corrected: bool = True) -> int:
    """FLOP of one forward and backward pass of `model` on `images` with `torch_loss`, by FlopCounterMode
    (with `grouped_conv_backward_flop` unless not `corrected`). On the meta device nothing is computed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop} if corrected else {}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        torch_loss(model(images), masks).backward()
    return counter.get_total_flops()


def torch_work(job: Job) -> dict:
    """Parameters and FLOP per image of the reference's step, counted on the meta device (no memory, no time)."""
    torch = import_torch()
    with torch.device("meta"):
        model = reference_model(job.model)
        images = torch.empty(job.batch, 3, job.size, job.size)
        masks = torch.empty(job.batch, 1, job.size, job.size)
    return {
        "torch_params": sum(parameter.numel() for parameter in model.parameters()),
        "torch_model_input": list(images.shape),  # NCHW
        "torch_flops_per_image": step_flops(model, images, masks) / job.batch,
        "torch_flops_per_image_uncorrected": step_flops(model, images, masks, corrected=False) / job.batch,
    }


def torch_contestant(job: Job, settings: Settings, compiled: bool) -> tuple[Contestant, Callable[[], dict]]:
    """A fresh smp.Unet step (Adam, bf16 autocast and channels_last on CUDA; float32 on the CPU), eager or under
    `torch.compile`: its first step (the compilation) and warm-up done. Also a function of its figures so far."""
    torch = import_torch()
    cuda = torch.cuda.is_available()
    if not settings.smoke and not cuda:
        raise Skipped("torch sees no CUDA device")
    torch.backends.cudnn.benchmark = True
    device = "cuda" if cuda else "cpu"
    mode = "compile" if compiled else "eager"
    model = reference_model(job.model).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(job.batch, 3, job.size, job.size, device=device, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last)
    masks = (torch.rand(job.batch, 1, job.size, job.size, device=device, generator=generator) < 0.1).float()
    last_loss = []

    def one_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            logits = forward(images)
        loss = torch_loss(logits, masks)
        loss.backward()
        optimizer.step()
        last_loss[:] = [loss.detach()]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    log_phase(f"torch {mode}: first step" + " (compilation)" * compiled)
    first_step_s = timed_loop(one_step, sync, 1)
    contestant = Contestant(f"torch {mode}", job.batch, one_step, sync)
    log_phase(f"torch {mode}: warm-up ({settings.warmup} steps) after a first step of {first_step_s:.1f} s")
    contestant.warm_up(settings.warmup)

    def figures() -> dict:
        loss = float(last_loss[0])
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss}")
        return {
            "first_step_s": first_step_s,
            "peak_gb": gigabytes(torch.cuda.max_memory_allocated()) if cuda else None,
            "precision": "bf16 autocast, channels_last" if cuda else "float32, channels_last",
            "loss": loss,
        }

    return contestant, figures
