"""Learned permutations: Git Re-Basin's straight-through estimator (Ainsworth et al. 2023, 'Git Re-Basin: Merging
Models modulo Permutation Symmetries', ICLR 2023, §3.3 and Alg. 2; reference: samuela/git-re-basin
``mnist_mlp_ste2.py``, "params represent the B endpoint and projection is inner product matching").

Free weights θ̃ (initialized at θ_A) stand for B in A's basin; each step projects them onto B's permutation orbit
and descends the loss of the midpoint through the projection as if it were the identity::

    θ̃ ← θ_A
    for each batch:  π ← argmax_π ⟨θ̃, π(θ_B)⟩                      (weight matching of B onto θ̃)
                     θ̂ = π(θ_B) + (θ̃ − sg(θ̃))                     (straight through: forward π(θ_B), ∂θ̂/∂θ̃ = I)
                     θ̃ ← SGD-momentum step on L(½(θ_A + θ̂); batch)
    return the π of the lowest batch loss

The midpoint's BatchNorms normalize with the batch's statistics (the reference's models have no running
statistics; the running statistics of the midpoint are left alone). mergescope's weight matching has no warm
start: each projection starts from the identity, seeded per step.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..align import MatchResult, weight_matching
from ..errors import MergescopeError, NumericsError
from ..perm import PermSpec, apply_permutation


def straight_through_matching(model_a: nn.Module, model_b: nn.Module, spec: PermSpec,
                              batches: Callable[[], Iterable], epochs: int = 1, lr: float = 0.01,
                              momentum: float = 0.9, seed: int = 0,
                              device: torch.device | str = "cpu") -> MatchResult:
    """B's permutation onto A learned by the straight-through estimator (module docstring).

    Args:
        model_a, model_b: two models of the architecture of ``spec`` (untouched).
        batches: makes one epoch of training batches (``.x``, ``.y``).
        epochs: passes over ``batches()``.
        lr, momentum: SGD on θ̃ (the reference's MNIST settings: 0.01, 0.9).
        seed: seeds the weight matchings (step t: seed + t).

    Returns:
        The :class:`~mergescope.align.MatchResult` of the step with the lowest midpoint loss (its similarity:
        weight matching's of that step).
    """
    if epochs < 1 or lr <= 0:
        raise MergescopeError(f"the straight-through estimator needs epochs ≥ 1 and lr > 0, got {epochs}, {lr}")
    from torch.func import functional_call

    net = copy.deepcopy(model_a).to(device).eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()  # batch statistics at the midpoint
    state_a = {k: v.detach().to(device) for k, v in model_a.state_dict().items()}
    state_b = {k: v.detach().to(device) for k, v in model_b.state_dict().items()}
    names = [n for n, _ in model_a.named_parameters()]
    tilde = {n: state_a[n].clone().float().requires_grad_(True) for n in names}
    opt = torch.optim.SGD(list(tilde.values()), lr=lr, momentum=momentum)
    best: tuple[float, MatchResult] | None = None
    step = 0
    for _ in range(epochs):
        for batch in batches():
            match = weight_matching({**state_a, **{n: t.detach() for n, t in tilde.items()}}, state_b, spec,
                                    seed=seed + step, device=device)
            projected = apply_permutation(dict(state_b), spec, match.perms)
            midpoint = {k: 0.5 * (state_a[k] + projected[k]) if state_a[k].is_floating_point() else state_a[k].clone()
                        for k in state_a}  # fresh tensors: the batch-statistics pass updates them in place
            midpoint.update({n: 0.5 * (state_a[n] + projected[n].detach() + (t - t.detach()))
                             for n, t in tilde.items()})
            loss = F.cross_entropy(functional_call(net, midpoint, (batch.x.to(device),)), batch.y.to(device))
            if not torch.isfinite(loss):
                raise NumericsError(f"the straight-through estimator's midpoint loss is {loss.item()} at step {step}")
            if best is None or loss.item() < best[0]:
                best = (loss.item(), match)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    if best is None:
        raise MergescopeError("the straight-through estimator got no batches to learn from")
    return best[1]
