"""Block-sparse attention entry points: a layout of marked blocks (``kernels.layouts``) through the dispatcher.

Layouts, their semantics and builders are documented in ``kernels.layouts``. Imports run one way: layouts and the
dispatcher sit below the implementations, and this module above the dispatcher.
"""
from __future__ import annotations

from qwen3vl.kernels import dispatch
from qwen3vl.kernels.layouts import check_layout, dynamic_topk_layout


def block_sparse_attention(q, k, v, block_layout, *, block_size, causal=False, segment_ids=None, sliding_window=None,
                           scale=None, implementation=None, sequence_sharded=False):
  """Attention that computes only the key blocks marked in ``block_layout`` (see the module docstring).

  Args:
    q, k, v, causal, segment_ids, sliding_window, scale: as in ``kernels.attention`` (GQA, layout
      [batch, length, heads, head_dim]); the token masks apply inside marked blocks.
    block_layout: bool [nq_blocks, nk_blocks] or [Hq, nq_blocks, nk_blocks] (per query head), blocks of
      ``block_size`` tokens, the same for every batch element.
    block_size: tokens per block on both sides (the last block may be partial).
    implementation: None for the first registered implementation that works, or a name to force one.
    sequence_sharded: as in ``kernels.attention`` (the layout's query-block rows are split with the rows).

  Returns [batch, Lq, Hq, head_dim] in q.dtype, equal to dense attention under the expanded mask; a query with no
  visible key gives 0.
  """
  segment_ids = dispatch.check_args(q, k, v, segment_ids, sliding_window)
  layout = check_layout(block_layout, q, k, block_size)
  return dispatch.dispatch_op("block_sparse_attention", implementation, q, k, v, causal=causal,
                              segment_ids=segment_ids, sliding_window=sliding_window, scale=scale,
                              block_layout=layout, block_size=int(block_size), sequence_sharded=sequence_sharded)


def dynamic_sparse_attention(q, k, v, *, block_size, top_k, local_blocks=1, causal=False, scale=None,
                             implementation=None):
  """``block_sparse_attention`` over ``dynamic_topk_layout(q, k, ...)``: each query block attends to its local key
  blocks and the top_k others by pooled score (per head). Jit it: the layout is then computed on device."""
  layout = dynamic_topk_layout(q, k, block_size, top_k, local_blocks=local_blocks, causal=causal)
  return block_sparse_attention(q, k, v, layout, block_size=block_size, causal=causal, scale=scale,
                                implementation=implementation)
