"""Greedy soup (Wortsman et al. 2022, 'Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time', ICML 2022, Recipe 1).

The ingredients sorted by held-out score in decreasing order (ties: in the given order); the soup starts as the
best one, and each next ingredient is added iff the uniform mean of the soup with it scores at least as well on
the held-out split as the soup without it ("does not drop")::

    soup ← {θ_(1)};  for i = 2..N: if score(mean(soup ∪ {θ_(i)})) ≥ score(mean(soup)): soup ← soup ∪ {θ_(i)}

So the soup never scores below its best ingredient on the held-out split (its score only rises from there).
The uniform soup is the plain mean (:func:`mergescope.merge.aggregate.weighted_average`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .aggregate import weighted_average

State = Mapping[str, torch.Tensor]


def greedy_soup(states: Sequence[State], score: Callable[[State], float]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The greedy soup of ``states`` under ``score`` (held-out accuracy: higher is better).

    Returns:
        The soup's state and the indices of the ingredients in it, in the order they were added.
    """
    scores = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda k: -scores[k])
    kept = [order[0]]
    best = scores[order[0]]
    for k in order[1:]:
        candidate = weighted_average([states[i] for i in kept + [k]])
        got = score(candidate)
        if got >= best:
            kept, best = kept + [k], got
    return weighted_average([states[i] for i in kept]), kept


def heldout_accuracy(dataset, batch_size: int = 500,
                     device: torch.device | str = "cpu") -> Callable[[nn.Module], float]:
    """A held-out score for :class:`mergescope.merge.methods.AlignInputs.heldout`: a model's accuracy on
    ``dataset`` (one pass, :func:`mergescope.evaluate.evaluate_models`)."""
    from ..data import iter_batches
    from ..evaluate import evaluate_models

    def accuracy(model: nn.Module) -> float:
        return evaluate_models({"m": model}, iter_batches(dataset, batch_size), device=device)["m"]["accuracy"]

    return accuracy
