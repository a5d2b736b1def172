r"""The ridge least-squares refit of one layer.

With :math:`\tilde x = [x; 1]` the layer's input features and a constant, :math:`\tilde W_0 =
[W_0, b_0]` the unpruned layer (its kept output rows), :math:`\hat x_S` the features the pruned
layer still reads (``S`` kept, with the constant) and :math:`\lambda` the ridge,

.. math::

    W' = \arg\min_W \; \mathbb E \|\tilde W_0 \tilde x - W \hat x_S\|^2
         + \lambda \|(W - \tilde W_{0,S}) D\|^2
       = (\tilde W_0 C + \lambda \tilde W_{0,S} D)(A + \lambda D)^{-1},

with :math:`C = \mathbb E[\tilde x \hat x_S^T]`, :math:`A = \mathbb E[\hat x_S \hat x_S^T]` and
:math:`D` the identity on the features, 0 on the constant (the bias is not shrunk). The ridge
pulls the refit towards the unpruned weights, not towards zero. When the pruned layer reads
the unpruned model's features (the independent refit, :math:`\hat x_S = \tilde x_S`) this is the
compensation form :math:`W'_S = W_{0,S} + W_{0,R} \Sigma_{RS} (\Sigma_{SS} + \lambda D)^{-1}`
(``R`` removed), exact when the removed features are linear combinations of the kept ones;
with only the constant kept it is FLAP's bias compensation :math:`b' = b_0 + W_{0,R}\,
\mathbb E[x_R]`. ``lambda`` is relative: ``ridge * mean(diag A)`` over the features.
"""
from __future__ import annotations

from typing import Optional

import torch

#: relative ridges tried in turn, from the first that exceeds the one asked for, when the
#: Cholesky factorisation fails (a singular system: duplicate or constant features, fewer
#: samples than features with ridge 0)
FALLBACK_RIDGES = (1e-8, 1e-6, 1e-4, 1e-2, 1.0)
#: a factorisation whose smallest squared pivot is below this share of the largest is taken
#: for singular (condition number above ~1e10: duplicate features factor "successfully" with
#: pivots of rounding size and give huge weights)
PIVOT_RTOL = 1e-10


def ridge_refit(w0: torch.Tensor, cross: torch.Tensor, auto: torch.Tensor, keep: torch.Tensor,
                ridge: float) -> tuple:
    """The refit of one group (see the module docstring).

    ``w0``: ``(O, F+1)`` the unpruned rows with their bias as the last column; ``cross``:
    ``(F+1, k+1)`` :math:`C`; ``auto``: ``(k+1, k+1)`` :math:`A`; ``keep``: the ``k`` kept
    feature indices (the constant is appended). Returns ``(solution (O, k+1), ridge used)``;
    the solution is None when no ridge of :data:`FALLBACK_RIDGES` gives a finite one.
    """
    k = keep.numel()
    keep1 = torch.cat([keep, torch.tensor([w0.shape[1] - 1], device=keep.device)])
    w0_s = w0[:, keep1]
    diag = torch.ones(k + 1, dtype=auto.dtype, device=auto.device)
    diag[k] = 0.0
    scale = float(auto.diagonal()[:k].mean()) if k else 0.0
    if not scale > 0:
        scale = 1.0
    for rel in (ridge,) + tuple(r for r in FALLBACK_RIDGES if r > ridge):
        lam = rel * scale
        lhs = auto + torch.diag(lam * diag)
        rhs = cross.T @ w0.T + lam * (diag[:, None] * w0_s.T)
        chol, info = torch.linalg.cholesky_ex(lhs)
        pivots = chol.diagonal().square()
        if int(info) != 0 or not pivots.min() > PIVOT_RTOL * pivots.max():
            continue
        sol = torch.cholesky_solve(rhs, chol).T
        if torch.isfinite(sol).all():
            return sol, rel
    return None, None


def relative_error(w0: torch.Tensor, w: torch.Tensor, second: torch.Tensor,
                   keep: torch.Tensor) -> float:
    """:math:`\\mathbb E\\|\\tilde W_0 \\tilde x - W \\tilde x_S\\|^2 / \\mathbb E\\|\\tilde W_0
    \\tilde x\\|^2` over the unpruned features (``second`` = :math:`\\mathbb E[\\tilde x
    \\tilde x^T]`), for the independent setting."""
    keep1 = torch.cat([keep, torch.tensor([w0.shape[1] - 1], device=keep.device)])
    diff = w0.clone()
    diff[:, keep1] -= w
    num = torch.einsum("of,fg,og->", diff, second, diff)
    den = torch.einsum("of,fg,og->", w0, second, w0)
    return float(num / den) if den > 0 else 0.0
