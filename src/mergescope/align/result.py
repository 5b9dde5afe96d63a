"""What an alignment returns: the permutation per group and the matrices it was chosen from."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class MatchResult:
    """The alignment of one model (B) to a reference (A).

    Attributes:
        perms: group name -> LongTensor ``p`` with permuted-B channel ``i`` = B channel ``p[i]``.
        similarity: group name -> (C, C) float64 matrix that was maximized: A channel i × B channel j
            (activation matching: Pearson correlation averaged over the group's observation points;
            weight matching: the inner products of the group's weights under the final permutations).
        dead_a, dead_b: group name -> indices of channels constant over the data, or over all of it but one
            sample (activation matching only, see :meth:`CoMoments.dead`); their matches carry no information
            and are reported, not trusted.
        method: "activation" or "weight".
    """

    perms: dict[str, torch.Tensor]
    similarity: dict[str, np.ndarray]
    method: str
    dead_a: dict[str, list[int]] = field(default_factory=dict)
    dead_b: dict[str, list[int]] = field(default_factory=dict)

    def matched_similarity(self, group: str) -> np.ndarray:
        """Similarity of each A channel with the B channel it was matched to, shape (C,)."""
        p = self.perms[group].cpu().numpy()
        return self.similarity[group][np.arange(len(p)), p]

    def summary(self) -> list[dict]:
        """One JSON-ready row per group (size, mean matched similarity, dead channels)."""
        return [
            {
                "group": g,
                "size": int(len(p)),
                "mean_correlation": float(self.matched_similarity(g).mean()) if self.method == "activation" else None,
                "dead_a": len(self.dead_a.get(g, [])),
                "dead_b": len(self.dead_b.get(g, [])),
            }
            for g, p in self.perms.items()
        ]
