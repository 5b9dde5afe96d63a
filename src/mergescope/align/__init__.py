"""Alignment: find the permutation (or linear map) of model B's channels that best matches model A."""
from .activation_matching import activation_matching, match_many, mean_matched_correlation
from .covariance import JointMoments, group_covariances
from .merge_many_matching import merge_many_matching
from .regression import (DEFAULT_FRACTIONS, RegressionFit, RegressionResult, keep_count, regress_many,
                         heldout_r2, regression_alignment, regression_fit, regression_from_stats, regression_subsets,
                         sparsify, sparsity_sweep)
from .result import MatchResult
from .weight_matching import weight_matching, weight_objective

__all__ = [
    "DEFAULT_FRACTIONS", "JointMoments", "MatchResult", "RegressionFit", "RegressionResult", "activation_matching",
    "group_covariances", "keep_count", "match_many", "mean_matched_correlation", "merge_many_matching", "regress_many",
    "heldout_r2", "regression_alignment", "regression_fit", "regression_from_stats", "regression_subsets", "sparsify",
    "sparsity_sweep", "weight_matching", "weight_objective",
]
