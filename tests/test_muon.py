"""optim.name=muon: orthogonalized momentum for the weight matrices, Adam for the rest."""

from __future__ import annotations

import pytest
import torch

from cifar_bp.config import ModelConfig
from cifar_bp.model import build_model
from cifar_bp.muon import (
    ADAM_MATCH,
    NS_COEFFS,
    NS_STEPS,
    Muon,
    muon_groups,
    orthogonalize,
    orthogonalize_all,
)
from tests.helpers import only_run, scalars, smoke_scalars


@pytest.mark.parametrize("shape", [(32, 75), (800, 32), (64, 1024)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k))
    grad = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # singular values 0.1 to 10
    singular = torch.linalg.svdvals(orthogonalize(grad))
    assert singular.min() > 0.6 and singular.max() < 1.25


def test_groups_put_matrices_on_muon_and_biases_and_classifier_on_adam():
    model = build_model(ModelConfig(channels_last=False))
    names = {id(p): n for n, p in model.named_parameters()}
    muon, adam = muon_groups(model.named_parameters())
    assert muon["muon"] and not adam["muon"]
    assert sorted(names[id(p)] for p in muon["params"]) == [
        "model1.conv1.weight", "model1.conv2.weight", "model1.conv3.weight",
        "model1.linear1.weight",
    ]  # fmt: skip
    assert "model1.linear2.weight" in {names[id(p)] for p in adam["params"]}
    assert len(muon["params"]) + len(adam["params"]) == len(names)


def test_one_step_matches_adam_and_the_muon_rule():
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(8, 12)), torch.nn.Parameter(torch.randn(8))
    twin = torch.nn.Parameter(bias.detach().clone())
    groups = [{"params": [weight], "muon": True}, {"params": [bias], "muon": False}]
    opt = Muon(groups, lr=0.01, momentum=0.9, nesterov=True, betas=(0.9, 0.99))
    adam = torch.optim.Adam([twin], lr=0.01, betas=(0.9, 0.99))
    start = weight.detach().clone()
    for _ in range(3):
        grad_w, grad_b = torch.randn(8, 12), torch.randn(8)
        weight.grad, bias.grad, twin.grad = grad_w, grad_b, grad_b.clone()
        opt.step()
        adam.step()
    assert torch.allclose(bias, twin, atol=1e-6)  # the Adam half is Adam
    # Check the last Muon step by hand: Nesterov momentum, orthogonalized, Adam-RMS scaled.
    weight2 = torch.nn.Parameter(start.clone())
    opt2 = Muon([{"params": [weight2], "muon": True}], 0.01, 0.9, True, (0.9, 0.99))
    weight2.grad = torch.ones(8, 12)
    opt2.step()
    expected = start - 0.01 * ADAM_MATCH * 12**0.5 * orthogonalize(torch.ones(8, 12) * 1.9)
    assert torch.allclose(weight2, expected, atol=1e-6)


def test_training_with_muon_learns_and_resumes(cli, tmp_path):
    sets = ("optim.name=muon", "optim.momentum=0.9")
    accuracy = smoke_scalars(cli, tmp_path, "--epochs", "2", sets=sets)["test/accuracy"]
    assert accuracy[-1][1] > 0.3  # 10 classes: chance is 0.1
    more = cli("train", "--resume", only_run(tmp_path), "--epochs", "3", "-q")
    assert more.exit_code == 0, more.stderr
    assert len(scalars(only_run(tmp_path))["test/accuracy"]) == 3


def test_gram_form_equals_the_textbook_iteration():
    """`orthogonalize` iterates on X·Xᵀ; iterating on X itself must give the same matrix."""
    a, b, c = NS_COEFFS
    torch.manual_seed(1)
    for grad in (torch.randn(64, 1024), torch.randn(800, 32)):
        x = grad / grad.norm()
        x = x.T if x.size(0) > x.size(1) else x
        for _ in range(NS_STEPS):
            x = a * x + (b * (x @ x.T) + c * (x @ x.T) @ (x @ x.T)) @ x
        x = x.T if grad.size(0) > grad.size(1) else x
        assert torch.allclose(orthogonalize(grad), x, atol=1e-5)


def test_batched_matrices_of_different_sizes_do_not_mix():
    """The zero-padded batch gives each matrix exactly what it would get alone."""
    torch.manual_seed(2)
    mats = [torch.randn(32, 75), torch.randn(64, 1024), torch.randn(800, 32), torch.randn(10, 64)]
    together = orthogonalize_all(mats)
    for mat, got in zip(mats, together, strict=True):
        assert got.shape == mat.shape
        assert torch.allclose(got, orthogonalize(mat), atol=1e-5)


def make_pair(decay: float = 0.01) -> tuple[Muon, list[torch.nn.Parameter]]:
    torch.manual_seed(1)
    weight, bias = torch.nn.Parameter(torch.randn(8, 12)), torch.nn.Parameter(torch.randn(8))
    groups = [{"params": [weight], "muon": True}, {"params": [bias], "muon": False}]
    return Muon(groups, 0.01, 0.9, True, (0.9, 0.99), weight_decay=decay), [weight, bias]


def test_a_step_the_scaler_flags_changes_nothing_and_nothing_is_read_back():
    """GradScaler passes its found-inf flag as a device tensor (the host never waits on it):
    a flagged step leaves weights and state as they were, and the run goes on as if that
    step had never been taken, Adam's step count included."""
    grads = [(torch.randn(8, 12), torch.randn(8)) for _ in range(3)]
    plain, ours = make_pair(), make_pair()
    for g in (grads[0], grads[2]):
        for p, x in zip(plain[1], g, strict=True):
            p.grad = x.clone()
        plain[0].step()
    bad = (torch.full((8, 12), float("inf")), torch.full((8,), float("nan")))
    for g, flag in ((grads[0], 0.0), (bad, 1.0), (grads[2], 0.0)):
        for p, x in zip(ours[1], g, strict=True):
            p.grad = x.clone()
        before = [p.detach().clone() for p in ours[1]]
        ours[0].found_inf = torch.tensor(flag)
        ours[0].step()
        del ours[0].found_inf
        if flag:
            assert all(torch.equal(a, p) for a, p in zip(before, ours[1], strict=True))
    for a, b in zip(plain[1], ours[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(ours[0].param_groups[1]["step"]) == plain[0].param_groups[1]["step"] == 2


def test_grad_scaler_skips_muons_bad_step_through_the_flag():
    opt, params = make_pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    before = [p.detach().clone() for p in params]
    loss = scaler.scale(sum(p.sum() for p in params)) * float("inf")
    loss.backward()  # every gradient inf, as in a float16 overflow
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert scaler.get_scale() == 2.0  # the overflow halved the scale
    assert not hasattr(opt, "found_inf")  # the scaler set the flag for that call only
