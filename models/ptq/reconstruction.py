"""Block reconstruction: learned weight rounding, block by block (BRECQ, arXiv 2102.05426, Sec. 3-4;
AdaRound, arXiv 2004.10568, Eq. 21-24; QDrop, arXiv 2203.05740, Sec. 3-4; LSQ, arXiv 1902.08153, Eq. 1-3).

After calibration fixes every scale, each block of the model (``QVit.block_sequence()``: a ViT's blocks,
a Swin's PatchMerging and blocks), in order, learns for every quantized weight ``W`` of the block
whether to round each element down or up:

    W_soft = (clamp(floor(W / s) + h(V) + zp, qmin, qmax) - zp) * s,   h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

with ``V`` initialised so that ``W_soft = W`` (AdaRound's rectified sigmoid, zeta = 1.1, gamma = -0.1).
The loss is the squared error of the block's quantized output against the FP32 block's output on the
cached calibration images, plus ``reg * sum(1 - |2 h(V) - 1|^beta)`` (beta annealed from 20 to 2
after a 20% warm-up without it) which drives every ``h`` to 0 or 1. The block's activations stay
fake-quantized (straight-through gradients) and its input is the quantized model's, each element
replaced by the FP32 model's with probability ``drop`` (QDrop: the block learns to live with the
activation noise it will see, but not only that noise). The integer softmax runs in float during the
optimisation (its integer exponential has no gradient).

With ``scale_lr`` > 0 the step ``s`` of every per-tensor uniform activation grid in the block learns
too, as QDrop does: the point computes ``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` with the
rounding passed straight through, so ``s`` gets LSQ's gradient (Adam at ``scale_lr``; zero points stay).

At the end ``h(V) >= 0.5`` picks the rounding, which becomes the weight quantizer's ``rounded`` buffer
(saved, exported and profiled as GPTQ's is) and a learned step becomes the point's ``scale`` buffer -
but only if the block's output error on the cached images, with the quantized model's inputs, is
lower than with round-to-nearest and the calibrated steps; otherwise the block keeps those. So
reconstruction never ends worse than it started, and every learned weight is on its grid within one
step of its float value.

Under ``torchrun`` every process holds all the cached images (:func:`gather_batches`) and draws the same
steps from the same seed; each process runs its slice of every step's batch and the gradients are
summed across processes (:func:`all_reduce_`) before the identical update, so the processes share the
work and end with the same rounding - one process's, up to the order of float sums.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from models.ptq.collectives import all_reduce_, is_distributed
from models.ptq.quantizers import SCALE_EPS
from models.ptq.tensor_quantizer import TensorQuantizer
from quant_config import ReconstructionSpec

__all__ = ["learnable_steps", "reconstruct_block", "reconstructable_weights", "too_few_images_per_step"]

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1
WARMUP = 0.2  # fraction of the steps without the rounding regularizer
BETA = (20.0, 2.0)  # the regularizer's exponent, annealed over the remaining steps


def too_few_images_per_step(spec: ReconstructionSpec, world: int) -> str | None:
    """Why ``world`` processes cannot share each step of ``spec`` (a slice each), or None when they can."""
    if spec.batch < world:
        return f"reconstruction.batch {spec.batch} is smaller than the {world} processes that share each step"
    return None


def reconstructable_weights(block: nn.Module) -> dict[str, tuple[nn.Module, TensorQuantizer]]:
    """The block's layers whose weight quantizer is calibrated on a grid a learned rounding can choose on."""
    found = {}
    for name, module in block.named_modules():
        q = getattr(module, "weight_quant", None)
        if isinstance(q, TensorQuantizer) and q.enabled and q.is_calibrated and q.spec is not None and q.method.learnable_rounding:
            found[name] = (module, q)
    return found


def learnable_steps(block: nn.Module) -> dict[str, TensorQuantizer]:
    """The block's calibrated activation points whose per-tensor grid step can learn (uniform, no PTF, no
    per-token factor: LSQ's gradient is for one static step)."""
    return {
        name: q for name, q in block.named_modules()
        if isinstance(q, TensorQuantizer) and not q.is_weight and q.enabled and q.is_calibrated and q.spec is not None
        and q.method.learnable_scale and q.scale.dim() == 0 and q.ptf is None and q.static_grid
    }  # fmt: skip


class _LearnedStep:
    """One activation point's learnable step: LSQ's fake quantization with a straight-through round."""

    def __init__(self, q: TensorQuantizer) -> None:
        self.s = q.scale.detach().float().clone().requires_grad_(True)
        zero = float(q.zero_point)
        self.low, self.high = q.spec.bit_type.qmin - zero, q.spec.bit_type.qmax - zero

    def __call__(self, x: Tensor) -> Tensor:
        s = self.s.clamp_min(SCALE_EPS)
        scaled = x / s
        rounded = scaled + (scaled.round() - scaled).detach()
        return (rounded.clamp(self.low, self.high) * s).to(x.dtype)


class _SoftRounding:
    """One weight's learnable rounding: ``V`` and the fixed parts of the soft and hard quantized weight."""

    def __init__(self, weight: Tensor, q: TensorQuantizer) -> None:
        w = weight.detach().float()
        self.scale = q.broadcast(q.scale, w).float()
        self.zero = q.broadcast(q.zero_point, w).float()
        self.qmin, self.qmax = q.spec.bit_type.qmin, q.spec.bit_type.qmax
        scaled = w / self.scale
        self.floor = torch.floor(scaled)
        rest = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)  # h(V) = rest: W_soft starts at W
        self.v = torch.log((rest - GAMMA) / (ZETA - rest)).requires_grad_(True)  # sigmoid^-1((rest - gamma) / (zeta - gamma))
        self.dtype = weight.dtype

    def h(self) -> Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def _weight(self, up: Tensor) -> Tensor:
        return ((self.floor + up + self.zero).clamp(self.qmin, self.qmax) - self.zero) * self.scale

    def soft(self) -> Tensor:
        return self._weight(self.h()).to(self.dtype)

    def hard(self) -> Tensor:
        return self._weight((self.v >= 0).float()).detach().to(self.dtype)  # h(V) >= 0.5

    def regularizer(self, beta: float) -> Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


@contextlib.contextmanager
def _learned(roundings: dict[str, tuple[TensorQuantizer, _SoftRounding]], steps: dict[str, tuple[TensorQuantizer, _LearnedStep]],
             kind: str) -> Iterator[None]:  # fmt: skip
    """Within: each weight quantizer outputs its soft (``kind="soft"``) or hard learned weight, and each
    learnable activation point quantizes with its learned step."""
    handles = [q.register_forward_hook(lambda module, args, out, r=r: getattr(r, kind)()) for q, r in roundings.values()]
    handles += [q.register_forward_hook(lambda module, args, out, step=step: step(args[0])) for q, step in steps.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _float_softmax(block: nn.Module) -> Iterator[None]:
    """Within: an integer softmax runs in float (its output still quantized), so gradients flow."""
    switched = [m for m in block.modules() if getattr(m, "integer", False) is True and hasattr(m, "output_quant")]
    for m in switched:
        m.integer = False
    try:
        yield
    finally:
        for m in switched:
            m.integer = True


def _output_error(block: nn.Module, inputs: list[Tensor], targets: list[Tensor]) -> float:
    with torch.no_grad():
        return sum(float((block(x) - y).float().square().sum()) for x, y in zip(inputs, targets))


def reconstruct_block(block: nn.Module, fp32_inputs: list[Tensor], quant_inputs: list[Tensor], targets: list[Tensor],
                      spec: ReconstructionSpec, generator: torch.Generator, on_step: Callable[[], object] | None = None) -> dict[str, float]:  # fmt: skip
    """Learn the rounding of every reconstructable weight of ``block`` (which runs in the quantized mode)
    from cached batches: its FP32-model inputs, its quantized-model inputs and the FP32 block's outputs.
    Sets the weight quantizers' ``rounded`` buffers (and, with ``scale_lr``, the learned activation
    steps) when that lowers the output error on the cache; returns that error before and at the end.
    ``on_step`` is called after each of the ``spec.iters`` optimisation steps (a progress bar)."""
    layers = reconstructable_weights(block)
    points = learnable_steps(block) if spec.scale_lr > 0 else {}
    before = _output_error(block, quant_inputs, targets)
    if not layers and not points:
        return {"before": before, "after": before}
    previous = {name: q.rounded for name, (_, q) in layers.items()}
    for _, q in layers.values():
        q.set_rounded(None)  # learn from round-to-nearest's starting point, not an earlier rounding
    warmup = int(WARMUP * spec.iters)
    # Calibration runs under inference mode, whose tensors autograd cannot save: learn outside it, on copies.
    with torch.inference_mode(False), torch.enable_grad():
        roundings = {name: (q, _SoftRounding(module.weight, q)) for name, (module, q) in layers.items()}
        steps = {name: (q, _LearnedStep(q)) for name, q in points.items()}
        groups = [{"params": [r.v for _, r in roundings.values()], "lr": spec.lr}, {"params": [st.s for _, st in steps.values()], "lr": spec.scale_lr}]
        optimizer = torch.optim.Adam([g for g in groups if g["params"]])
        x_fp, x_q, y = (torch.cat(t).clone() for t in (fp32_inputs, quant_inputs, targets))
        _learn(block, roundings, steps, optimizer, x_fp, x_q, y, spec, warmup, generator, on_step)
    with _learned(roundings, steps, "hard"):
        after = _output_error(block, quant_inputs, targets)
    if after < before:
        for q, r in roundings.values():
            q.set_rounded(r.hard())
        with torch.no_grad():
            for q, step in steps.values():
                q.scale.copy_(step.s.detach().clamp_min(SCALE_EPS).to(q.scale.dtype))
    else:  # round-to-nearest and the calibrated steps were as good: keep them (or the rounding there was before)
        for name, (_, q) in layers.items():
            q.set_rounded(previous[name])
        after = before
    return {"before": before, "after": after}


def _learn(block: nn.Module, roundings: dict, steps: dict, optimizer: torch.optim.Optimizer, x_fp: Tensor, x_q: Tensor,
           y: Tensor, spec: ReconstructionSpec, warmup: int, generator: torch.Generator, on_step: Callable[[], object] | None) -> None:  # fmt: skip
    world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if is_distributed() else (1, 0)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with _float_softmax(block), _learned(roundings, steps, "soft"):
        for step in range(spec.iters):
            # Every process draws the whole step (the same generator), then runs its slice of it.
            index = torch.randint(0, len(x_q), (min(spec.batch, len(x_q)),), generator=generator).to(x_q.device)
            inputs = x_q[index]
            if spec.drop > 0:
                keep_fp = torch.rand(inputs.shape, generator=generator).to(inputs.device) < spec.drop
                inputs = torch.where(keep_fp, x_fp[index], inputs)
            own = torch.tensor_split(torch.arange(len(index), device=index.device), world)[rank]
            # The step's loss is the mean over its images of each image's squared error per token.
            error = (block(inputs[own].clone()) - y[index[own]]).float().square().sum(-1).flatten(1).mean(1)
            loss = error.sum() / len(index)
            if step >= warmup and spec.reg > 0 and roundings:
                progress = (step - warmup) / max(1, spec.iters - warmup)
                beta = BETA[1] + (BETA[0] - BETA[1]) * (1 + math.cos(math.pi * progress)) / 2
                loss = loss + spec.reg / world * sum(r.regularizer(beta) for _, r in roundings.values())
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            if world > 1:
                for v in params:
                    if v.grad is not None:  # None in every process alike: each runs the same block
                        all_reduce_(v.grad, "sum")
            optimizer.step()
            if on_step is not None:
                on_step()
