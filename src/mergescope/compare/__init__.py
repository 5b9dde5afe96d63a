"""Compare channels across models: Kendall's τ-b of activation rankings, CLIP-δ of top-k images, top-k overlap,
and the channel categories of the thesis's Observations 2 and 3. Pure functions over tensors; :mod:`.study`
combines them over a whole probe into tidy rows (and writes/reads those rows as ``compare.csv``).
"""
from .categories import (
    CONSENSUS_CATEGORIES,
    EMBEDDING_CATEGORIES,
    MERGED_CATEGORIES,
    ConsensusCategories,
    EmbeddingCategories,
    MergedCategories,
    Spread,
    category_table,
    consensus_categories,
    embedding_category_table,
    merged_categories,
    merged_categories_embedding,
    merged_categories_embedding_from_ids,
    metric_spread,
)
from .clip_delta import ClipDeltaResult, clip_delta, clip_delta_from_ids
from .kendall import KendallResult, kendall_tau_b
from .overlap import overlap_counts, topk_overlap
from .study import (
    COLUMNS,
    METRICS,
    THESIS_OBSERVATION3,
    ComparePair,
    CompareResult,
    compare_models,
    read_compare_csv,
    write_compare_csv,
)

__all__ = [
    "COLUMNS",
    "CONSENSUS_CATEGORIES",
    "EMBEDDING_CATEGORIES",
    "MERGED_CATEGORIES",
    "METRICS",
    "THESIS_OBSERVATION3",
    "ClipDeltaResult",
    "ComparePair",
    "CompareResult",
    "ConsensusCategories",
    "EmbeddingCategories",
    "KendallResult",
    "MergedCategories",
    "Spread",
    "category_table",
    "clip_delta",
    "clip_delta_from_ids",
    "compare_models",
    "consensus_categories",
    "embedding_category_table",
    "kendall_tau_b",
    "merged_categories",
    "merged_categories_embedding",
    "merged_categories_embedding_from_ids",
    "metric_spread",
    "overlap_counts",
    "read_compare_csv",
    "topk_overlap",
    "write_compare_csv",
]
