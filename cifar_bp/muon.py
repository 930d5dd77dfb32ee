"""Muon for the weight matrices, Adam for the rest: `optim.name: muon`.

Muon (Keller Jordan, 2024) takes the momentum of a weight matrix's gradient and replaces it
by the nearest semi-orthogonal matrix before stepping: every direction the momentum points
in moves by the same amount, so directions that the gradient pushes only weakly learn as
fast as the dominant ones. It drives configs/default.yaml (docs/experiments.md has the
trials that chose it).

A conv filter bank is treated as an (out_channels, in_channels * k * k) matrix. Biases and
the classifier (the last layer, whose rows are the classes) keep Adam, as is usual for Muon.
One optimizer holds both kinds of group, so GradScaler, the lr schedule and checkpoints
see a single `torch.optim.Optimizer`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# Coefficients of the quintic Newton–Schulz iteration from Keller Jordan's Muon write-up:
# chosen to push every singular value into roughly [0.7, 1.2] in five steps, which is close
# enough to 1 for an update direction and much cheaper than an SVD.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# Muon's update has entries of RMS 1/sqrt(max(rows, cols)); this factor times sqrt(max(...))
# brings it to about the RMS of an Adam update (Moonlight, Liu et al. 2025), so one lr and
# one schedule serve both kinds of parameter.
ADAM_MATCH = 0.2


def orthogonalize(grad: torch.Tensor) -> torch.Tensor:
    """Approximately U·Vᵀ of grad = U·S·Vᵀ (one 2-D matrix); see `orthogonalize_all`."""
    return orthogonalize_all([grad])[0]


def orthogonalize_all(mats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Newton–Schulz iteration for several 2-D matrices at once.

    Each step is X ← P(A)·X with A = X·Xᵀ and P(A) = a·I + b·A + c·A². P(A) is a polynomial
    in A, so it commutes with A, and the next Gram matrix is P(A)·A·P(A). The iteration can
    therefore run on the small r×r Gram matrices alone (r = the shorter side), touching the
    long side only to form A and to apply the product of the P's at the end. The Gram
    matrices are zero-padded to one size and iterated as a batch: a zero block stays zero
    and the blocks never mix, and on a 2-core CPU a few batched kernels cost much less than
    many tiny ones.
    """
    a, b, c = NS_COEFFS
    flipped = [m.size(0) > m.size(1) for m in mats]
    wide = [(m.T if f else m).float() for m, f in zip(mats, flipped, strict=True)]
    wide = [x / (x.norm() + 1e-7) for x in wide]  # the iteration needs singular values <= 1
    size = max(len(x) for x in wide)
    grams = wide[0].new_zeros(len(wide), size, size)
    for i, x in enumerate(wide):
        grams[i, : len(x), : len(x)] = x @ x.T
    product = torch.eye(size, device=grams.device).expand_as(grams).clone()
    for _ in range(NS_STEPS):
        poly = torch.baddbmm(grams, grams, grams, beta=b, alpha=c)  # b·A + c·A²
        poly.diagonal(dim1=1, dim2=2).add_(a)
        product = torch.bmm(poly, product)
        grams = torch.bmm(torch.bmm(poly, grams), poly)
    out = [product[i, : len(x), : len(x)] @ x for i, x in enumerate(wide)]
    return [o.T if f else o for o, f in zip(out, flipped, strict=True)]


class Muon(torch.optim.Optimizer):
    """Groups with `muon=True` get orthogonalized Nesterov momentum; the others get Adam.

    Both updates run on whole groups at once (`torch._foreach_*`): the parameters are small,
    so per-tensor kernel launches, not arithmetic, would dominate the step.
    """

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        momentum: float,
        nesterov: bool,
        betas: tuple[float, float],
        weight_decay: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "betas": betas,
                    "weight_decay": weight_decay, "eps": eps, "muon": False}  # fmt: skip
        super().__init__(groups, defaults)

    # GradScaler hands a step that takes this its found-inf flag as a device tensor
    # (`self.found_inf`) instead of reading it back to decide whether to call step(): the
    # host never waits. A step with inf/NaN gradients then changes nothing, by masking.
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        found = getattr(self, "found_inf", None)  # set by GradScaler.step, for this call
        scale = getattr(self, "grad_scale", None)  # None once the gradients are unscaled
        keep = None if found is None else (found == 0).float()  # 0: skip this step
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if scale is not None:
                torch._foreach_div_(grads, scale)
            if keep is not None:
                for g in grads:  # inf × 0 is NaN: a skipped step's gradients become zeros
                    g.masked_fill_(keep == 0, 0.0)
            if group["weight_decay"]:
                # Decoupled weight decay (as in AdamW): shrink the weights, not the gradient.
                decay = group["lr"] * group["weight_decay"]
                torch._foreach_mul_(params, 1 - decay if keep is None else 1 - decay * keep)
            update = self._muon if group["muon"] else self._adam
            update(params, group, keep)

    def _muon(self, params: list[nn.Parameter], group: dict, keep: torch.Tensor | None) -> None:
        grads = [p.grad for p in params]
        bufs = [self._zeros(p, "momentum_buffer") for p in params]
        # A skipped step multiplies by momentum ** 0 = 1 and adds zeros: the buffer stays.
        momentum = group["momentum"]
        torch._foreach_mul_(bufs, momentum if keep is None else torch.pow(momentum, keep))
        torch._foreach_add_(bufs, grads)
        # Nesterov: step along where the momentum is heading, not where it has been.
        nesterov = group["nesterov"]
        directions = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
        mats = [d.reshape(len(d), -1) for d in directions]
        for p, mat, ortho in zip(params, mats, orthogonalize_all(mats), strict=True):
            scale = ADAM_MATCH * max(mat.shape) ** 0.5
            step = ortho.view_as(p).to(p.dtype)
            p.add_(step if keep is None else step * keep, alpha=-group["lr"] * scale)

    def _adam(self, params: list[nn.Parameter], group: dict, keep: torch.Tensor | None) -> None:
        if keep is not None or torch.is_tensor(group.get("step", 0)):
            self._masked_adam(params, group, keep)
            return
        grads = [p.grad for p in params]
        avgs = [self._zeros(p, "exp_avg") for p in params]
        squares = [self._zeros(p, "exp_avg_sq") for p in params]
        # Every parameter of the group steps together, so the group keeps the one count
        # (group keys are saved in the optimizer's state_dict, so it survives a resume).
        group["step"] = step = group.get("step", 0) + 1
        beta1, beta2 = group["betas"]
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(squares, beta2)
        torch._foreach_addcmul_(squares, grads, grads, value=1 - beta2)
        # Bias corrections: both averages start at zero and would under-estimate early on.
        denom = torch._foreach_div(squares, 1 - beta2**step)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, avgs, denom, value=-group["lr"] / (1 - beta1**step))

    def _masked_adam(
        self, params: list[nn.Parameter], group: dict, keep: torch.Tensor | None
    ) -> None:
        """Adam with its step count on the device, so that a step GradScaler skips (keep 0)
        neither counts nor moves anything, without the host reading the flag back."""
        grads = [p.grad for p in params]
        avgs = [self._zeros(p, "exp_avg") for p in params]
        squares = [self._zeros(p, "exp_avg_sq") for p in params]
        keep = torch.ones((), device=params[0].device) if keep is None else keep
        group["step"] = step = torch.as_tensor(group.get("step", 0), device=keep.device) + keep
        beta1, beta2 = group["betas"]
        torch._foreach_mul_(avgs, torch.pow(beta1, keep))  # the same lerp, masked
        torch._foreach_add_(avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(squares, torch.pow(beta2, keep))
        torch._foreach_addcmul_(squares, grads, grads, value=1 - beta2)
        # Clamped: a first step that is skipped has count 0, and 0/0 would poison the weights.
        denom = torch._foreach_div(squares, (1 - torch.pow(beta2, step)).clamp(min=1e-12))
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        steps = torch._foreach_div(avgs, denom)
        size = -group["lr"] * keep / (1 - torch.pow(beta1, step)).clamp(min=1e-12)
        torch._foreach_mul_(steps, size)
        torch._foreach_add_(params, steps)

    def _zeros(self, p: nn.Parameter, name: str) -> torch.Tensor:
        state = self.state[p]
        if name not in state:
            state[name] = torch.zeros_like(p)
        return state[name]


def muon_groups(named: Iterable[tuple[str, nn.Parameter]]) -> list[dict]:
    """Weight matrices and conv filters → Muon; biases and the classifier (last) → Adam."""
    named = list(named)
    classifier = named[-1][0].rsplit(".", 1)[0]  # the module that owns the last parameter
    muon = [p for n, p in named if p.ndim >= 2 and not n.startswith(classifier + ".")]
    taken = {id(p) for p in muon}
    adam = [p for _, p in named if id(p) not in taken]
    return [{"params": muon, "muon": True}, {"params": adam, "muon": False}]
