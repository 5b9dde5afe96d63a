"""Ensembles: N models run side by side and their outputs averaged — the ceiling every merge is measured against,
at N times the inference cost (not a weight merge: the members keep their own weights and BatchNorm statistics).

* logit averaging: z(x) = Σ_k w_k z_k(x);
* probability averaging: p(x) = Σ_k w_k softmax(z_k(x)), returned as log p(x) (valid logits: softmax(log p) = p,
  and cross-entropy on them is the ensemble's negative log-likelihood).

Both are the classic output ensembles the survey's §3 (Table 1, 'ensemble') starts from; the weights are the
merge weights (uniform by default).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import MergescopeError

OUTPUTS = ("logits", "probs")


class Ensemble(nn.Module):
    """The weighted average of the members' logits or probabilities (module docstring).

    Attributes:
        members: the models (kept as given, in eval mode when evaluated).
        weights: one weight per member, summing to 1.
        output: ``"logits"`` or ``"probs"``.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None, output: str = "logits"):
        super().__init__()
        if output not in OUTPUTS:
            raise MergescopeError(f"an ensemble averages one of {', '.join(OUTPUTS)}, got '{output}'")
        if not members:
            raise MergescopeError("an ensemble needs at least one model")
        from .aggregate import normalized

        self.members = nn.ModuleList(members)
        self.weights = normalized(weights, len(members))
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.members]  # each (B, classes)
        if self.output == "logits":
            return sum(w * z for w, z in zip(self.weights, outs))
        probs = sum(w * torch.softmax(z.double(), dim=-1) for w, z in zip(self.weights, outs))
        return torch.log(probs).to(outs[0].dtype)


def inference_cost(model: nn.Module) -> dict[str, int]:
    """What running ``model`` costs, for the tables: ``{"parameters": ..., "forward_passes": ...}`` — an ensemble
    has its members' parameters and runs each member (N× one model's FLOPs); any other model runs once."""
    passes = len(model.members) if isinstance(model, Ensemble) else 1
    return {"parameters": sum(p.numel() for p in model.parameters()), "forward_passes": passes}
