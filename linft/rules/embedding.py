"""``nn.Embedding``: ``y_t = E[id_t]``, so ``d f_a / d E[v] = sum_{t: id_t = v} g_t``: each
sample's rows are its output gradients added into the rows of its own tokens (a scatter-add),
zero elsewhere. The padding row (``padding_idx``) gets no gradient, as in the layer's own
backward. Declined: ``max_norm`` (the forward renormalizes ``E`` in place) and
``scale_grad_by_freq`` (the gradient depends on the batch's token counts). Ids shared by all
samples (position ids broadcast from ``[1, T]``) hold no sample dimension: ``layouts`` sends
those to the generic path, which is exact.
"""

from __future__ import annotations

from torch import nn

from .base import Rule, masked


class EmbeddingRule(Rule):
    name = "embedding"

    def slot(self, module: nn.Module, path: str):
        if type(module) is not nn.Embedding or path != "weight":
            return None
        if module.max_norm is not None or module.scale_grad_by_freq:
            return None
        return "weight"

    def input(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input")
        return None if ids is None else ids.unsqueeze(-1)  # [..., 1]: tokens, no features

    def rows(self, unit, x, g, mask, J, tags, op):
        ids = x[..., 0].long()  # [n, T]
        g = masked(g, mask, 2)  # [n, C, T, d]
        padding = unit.module.padding_idx
        if padding is not None:
            g = g.masked_fill((ids == padding)[:, None, :, None], 0)
        n, C, T, d = g.shape
        V = unit.module.num_embeddings
        col = unit.cols["weight"]
        rows = J[:, :, col : col + V * d].view(n, C, V, d)  # zeros: J starts at zero
        index = ids[:, None, :, None].expand(n, C, T, d)
        rows.scatter_add_(2, index, g.to(rows.dtype))
