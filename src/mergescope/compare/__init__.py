"""Compare channels across models: Kendall's τ-b of activation rankings, CLIP-δ of top-k images, top-k overlap,
and the channel categories of the thesis's Observations 2 and 3. Pure functions over tensors, no I/O.
"""
from .categories import (
    CONSENSUS_CATEGORIES,
    MERGED_CATEGORIES,
    ConsensusCategories,
    MergedCategories,
    Spread,
    category_table,
    consensus_categories,
    merged_categories,
    metric_spread,
)
from .clip_delta import ClipDeltaResult, clip_delta, clip_delta_from_ids
from .kendall import KendallResult, kendall_tau_b
from .overlap import overlap_counts, topk_overlap

__all__ = [
    "CONSENSUS_CATEGORIES", "ClipDeltaResult", "ConsensusCategories", "KendallResult", "MERGED_CATEGORIES",
    "MergedCategories", "Spread", "category_table", "clip_delta", "clip_delta_from_ids", "consensus_categories",
    "kendall_tau_b", "merged_categories", "metric_spread", "overlap_counts", "topk_overlap",
]
