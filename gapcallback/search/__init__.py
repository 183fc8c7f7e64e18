"""The exact nearest-neighbour engine every computation of gapcallback runs on.

=====================  ===============================================================
``driver``             :func:`blocked_search`: the one blocked screen-and-recheck loop
``screen``             candidate selection of one block (tile minima; lower/upper bounds)
``topk``               :class:`TopK`, the accumulator every search merges into; :class:`KNNResult`
``gemm``               the plain product: blocked GEMM screen (:func:`gemm_knn`)
``kdtree``             the low-dimension CPU backend on scipy's cKDTree (:func:`kdtree_knn`)
``dispatch``           :func:`exact_search`: the plain search, backend chosen by a cost model
``recheck``            the exact re-check by direct difference (:func:`direct_sq_dists`)
``ranges``             screen scaling and the cast of exact distances to the output dtype
=====================  ===============================================================

Symmetry searches (:mod:`gapcallback.symmetry`) form their own products and exact re-checks and
run them on :func:`blocked_search`; nothing outside this package uses its private names.

On CPU the searches borrow their product blocks from one pool that keeps them for the next search
(:func:`gapcallback.utils.memory.reused_buffer`, at most 128 MiB idle): :func:`idle_buffer_bytes`
says what it holds, :func:`release_buffers` frees it.
"""

from gapcallback.search.dispatch import BACKENDS, Backend, choose_backend, exact_search
from gapcallback.search.driver import PENDING_PER_ROW, Exact, Product, RowBlock, blocked_search
from gapcallback.search.gemm import (
    DEFAULT_POINT_BLOCK,
    DEFAULT_QUERY_BLOCK,
    NARROW_BLOCKS,
    NARROW_BLOCKS_UP_TO_DIM,
    GemmOperands,
    GemmProduct,
    default_blocks,
    gemm_knn,
    gemm_operands,
    same_tensor,
)
from gapcallback.search.kdtree import kdtree_knn, prefer_kdtree
from gapcallback.search.ranges import (
    DistanceRangeError,
    centred_magnitude,
    check_underflow,
    exact_dtype,
    ldexp,
    output_sq_dists,
    range_message,
    screen_exponent,
)
from gapcallback.search.recheck import RECHECK_ELEMENTS, direct_sq_dists
from gapcallback.search.screen import (
    TILE,
    bound_candidates,
    k_smallest,
    row_tiles,
    surviving,
    tile_candidates,
)
from gapcallback.search.topk import KNNResult, TopK, distinct_topk, merge_distinct, merge_sorted
from gapcallback.utils.memory import idle_buffer_bytes, release_buffers

__all__ = [
    "BACKENDS",
    "DEFAULT_POINT_BLOCK",
    "DEFAULT_QUERY_BLOCK",
    "NARROW_BLOCKS",
    "NARROW_BLOCKS_UP_TO_DIM",
    "PENDING_PER_ROW",
    "RECHECK_ELEMENTS",
    "TILE",
    "Backend",
    "DistanceRangeError",
    "Exact",
    "GemmOperands",
    "GemmProduct",
    "KNNResult",
    "Product",
    "RowBlock",
    "TopK",
    "blocked_search",
    "bound_candidates",
    "centred_magnitude",
    "check_underflow",
    "choose_backend",
    "default_blocks",
    "direct_sq_dists",
    "distinct_topk",
    "exact_dtype",
    "exact_search",
    "gemm_knn",
    "gemm_operands",
    "idle_buffer_bytes",
    "k_smallest",
    "kdtree_knn",
    "ldexp",
    "merge_distinct",
    "merge_sorted",
    "output_sq_dists",
    "prefer_kdtree",
    "range_message",
    "release_buffers",
    "row_tiles",
    "same_tensor",
    "screen_exponent",
    "surviving",
    "tile_candidates",
]
