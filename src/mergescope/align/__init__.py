"""Alignment: find the permutation of model B's channels that best matches model A."""
from .activation_matching import activation_matching, match_many, mean_matched_correlation
from .result import MatchResult
from .weight_matching import weight_matching, weight_objective

__all__ = ["MatchResult", "activation_matching", "match_many", "mean_matched_correlation", "weight_matching",
           "weight_objective"]
