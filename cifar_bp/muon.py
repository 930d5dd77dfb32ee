"""Muon for the weight matrices, Adam for the rest: `optim.name: muon`.

Muon (Keller Jordan, 2024) takes the momentum of a weight matrix's gradient and replaces it
by the nearest semi-orthogonal matrix before stepping: every direction the momentum points
in moves by the same amount, so directions that the gradient pushes only weakly learn as
fast as the dominant ones. On this activation-free network, in a 4-epoch budget, it fits
the training set faster than Adam does (see the README's accuracy section).

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
    """Approximately U·Vᵀ of grad = U·S·Vᵀ, by Newton–Schulz iteration on a 2-D matrix.

    Each step is X ← P(A)·X with A = X·Xᵀ and P(A) = a·I + b·A + c·A². P(A) is a polynomial
    in A, so it commutes with A, and the next Gram matrix is P(A)·A·P(A). The whole
    iteration therefore runs on the small r×r Gram matrix (r = the shorter side), and the
    long side is touched only twice: forming A, and applying the product of the P's at the
    end. For the 64×1024 `linear1` that is a quarter of the arithmetic of iterating on X.
    """
    a, b, c = NS_COEFFS
    x = grad / (grad.norm() + 1e-7)  # the iteration needs singular values at most 1
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    gram = x @ x.T
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    product = eye
    for _ in range(NS_STEPS):
        poly = a * eye + b * gram + c * gram @ gram
        product = poly @ product
        gram = poly @ gram @ poly
    x = product @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Groups with `muon=True` get orthogonalized Nesterov momentum; the others get Adam."""

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

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # Decoupled weight decay (as in AdamW): shrink the weights, not the gradient.
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = self._muon if group["muon"] else self._adam
                update(p, group)

    def _muon(self, p: nn.Parameter, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        # Nesterov: step along where the momentum is heading, not where it has been.
        direction = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        matrix = direction.reshape(len(direction), -1).float()
        scale = ADAM_MATCH * max(matrix.shape) ** 0.5
        p.add_(orthogonalize(matrix).view_as(p).to(p.dtype), alpha=-group["lr"] * scale)

    def _adam(self, p: nn.Parameter, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        # Bias corrections: both averages start at zero and would under-estimate early on.
        first = 1 - beta1 ** state["step"]
        second = 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / second).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / first)


def muon_groups(named: Iterable[tuple[str, nn.Parameter]]) -> list[dict]:
    """Weight matrices and conv filters → Muon; biases and the classifier (last) → Adam."""
    named = list(named)
    classifier = named[-1][0].rsplit(".", 1)[0]  # the module that owns the last parameter
    muon = [p for n, p in named if p.ndim >= 2 and not n.startswith(classifier + ".")]
    taken = {id(p) for p in muon}
    adam = [p for _, p in named if id(p) not in taken]
    return [{"params": muon, "muon": True}, {"params": adam, "muon": False}]
