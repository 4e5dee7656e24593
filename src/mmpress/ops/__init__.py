"""Pure tensor functions shared by presses: batched over M images, no loops over tokens."""

from mmpress.ops.coverage import greedy_coverage
from mmpress.ops.diversity import farthest_nearest_neighbour, max_min_diversity
from mmpress.ops.merge import bipartite_merge, merge_to
from mmpress.ops.pool import grid_cells, grid_pool, grid_sample, spaced_mask
from mmpress.ops.select import gather_tokens, topk_indices
from mmpress.ops.similarity import cosine_distance, cosine_similarity

__all__ = [
    "bipartite_merge", "cosine_distance", "cosine_similarity", "farthest_nearest_neighbour", "gather_tokens",
    "greedy_coverage", "grid_cells", "grid_pool", "grid_sample", "max_min_diversity", "merge_to",
    "spaced_mask", "topk_indices",
]
