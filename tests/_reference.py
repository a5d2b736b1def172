"""The independent exact reference the curvature tests compare against.

It shares no code with the library. A network is expanded into its explicit neuron (element)
graph: one node per scalar activation, one edge per (input, output) pair of a weight, with the
strength ``|w|`` (times the BatchNorm scale ``|gamma / sqrt(var + eps)|`` of a BatchNorm right
after the layer). Node values are ``|activation|`` min-max normalised per layer. Then, straight
from the definition:

* length ``d(u, v) = 1/s`` (``flow``: ``1/(a_u s)``), forward shortest paths by scipy's Dijkstra;
* ``m_x = alpha delta_x + (1 - alpha) sum_z p_x(z) delta_z`` over the active predecessors z
  joined by an edge of strength > 0, ``p_x(z) ∝ exp(-1/a_z^2)`` (``flow``: ``∝ a_z s(z, x)``);
  ``m_x = delta_x`` when there is none; the same for ``m_y`` over successors;
* ``kappa = (1 - W_1(m_x, m_y) / d(x, y)) / (1 - alpha)`` with POT's exact ``ot.emd2``;
  an edge with a dead endpoint (``a = 0``) or strength 0 gets 1, a pair without an edge NaN.

:func:`mlp_curvature` applies it to a Flatten/Linear/ReLU MLP (channel graph = neuron graph),
:func:`element_curvature` to a chain of Conv2d/Linear layers, unrolling each convolution with
explicit loops over output positions and kernel taps.
"""
import numpy as np
import ot
import torch
import torch.nn as nn
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path

ALPHA = 0.5
#: the paper's definition, which these references compute (the library's default is the flow
#: variant with spread node values)
PAPER = {"variant": "paper", "node_value": "mean_abs"}


def minmax(a):
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.ones_like(a)


def _normalised(a, mode):
    if mode == "minmax":
        return minmax(a)
    if mode == "max":
        return a / a.max() if a.max() > 0 else np.zeros_like(a)
    raise ValueError(mode)


def graph_curvature(acts, edges, alpha=ALPHA, flow=False):
    """kappa of every edge of a layered graph, from first principles.

    ``acts``: normalised node values per node layer; ``edges``: ``{(u, v): (s, L, widx)}`` with
    global node ids ``u`` (layer L) -> ``v`` (layer L + 1), strength ``s >= 0`` and the index of
    the weight that generates the edge. Returns, per weight layer L, ``(K, WI)``: kappa
    (n_L, n_{L+1}), NaN where there is no edge, and the weight index (-1: no edge).
    """
    sizes = [a.size for a in acts]
    offs = np.cumsum([0] + sizes)
    n = offs[-1]
    a_all = np.concatenate(acts)
    rows, cols, lens = [], [], []
    for (u, v), (s, L, _) in edges.items():
        st = s * (a_all[u] if flow else 1.0)
        if st > 0:
            rows.append(u), cols.append(v), lens.append(1.0 / st)
    D = shortest_path(csr_matrix((lens, (rows, cols)), shape=(n, n)), method="D",
                      directed=True)
    pred = {v: [] for v in range(n)}
    succ = {u: [] for u in range(n)}
    for (u, v), (s, _, _) in edges.items():
        pred[v].append((u, s))
        succ[u].append((v, s))

    def measure(node, nbrs):
        nb, logw = [], []
        for g, s in nbrs:
            if s > 0 and a_all[g] > 0:
                nb.append(g)
                logw.append(np.log(a_all[g] * s) if flow else -1.0 / a_all[g] ** 2)
        if not nb:
            return [node], np.array([1.0])
        logw = np.array(logw)
        p = np.exp(logw - logw.max())
        p /= p.sum()
        return nb + [node], np.append((1 - alpha) * p, alpha)

    out = []
    for L in range(len(sizes) - 1):
        K = np.full((sizes[L], sizes[L + 1]), np.nan)
        WI = np.full((sizes[L], sizes[L + 1]), -1)
        for (u, v), (s, LL, widx) in edges.items():
            if LL != L:
                continue
            iu, iv = u - offs[L], v - offs[L + 1]
            WI[iu, iv] = widx
            if s == 0 or a_all[u] == 0 or a_all[v] == 0:
                K[iu, iv] = 1.0
                continue
            src, a = measure(u, pred[u])
            dst, b = measure(v, succ[v])
            C = D[np.ix_(src, dst)]
            K[iu, iv] = (1 - ot.emd2(a, b, C) / D[u, v]) / (1 - alpha)
        out.append((K, WI))
    return out


def mlp_curvature(model: nn.Sequential, x: torch.Tensor, alpha=ALPHA, flow=False,
                  normalize="minmax", node_value="mean_abs"):
    """kappa for every connection of a Flatten/Linear/ReLU MLP; node values are the mean
    |post-activation| over the batch ``x`` (``node_value="std"``: its population std)."""
    def value(h):
        h = h.detach().double()
        return h.std(0, unbiased=False) if node_value == "std" else h.abs().mean(0)

    linears = [m for m in model if isinstance(m, nn.Linear)]
    acts, h = [], x.flatten(1)
    acts.append(value(h))
    mods = list(model)[1:]
    for i, m in enumerate(mods):
        h = m(h)
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.ReLU) or (isinstance(m, nn.Linear) and nxt is None):
            acts.append(value(h))
    acts = [_normalised(a.numpy(), normalize) for a in acts]
    sizes = [a.size for a in acts]
    offs = np.cumsum([0] + sizes)
    edges = {}
    for L, lin in enumerate(linears):
        w = lin.weight.detach().double().abs().numpy()        # (out, in)
        for u in range(sizes[L]):
            for v in range(sizes[L + 1]):
                edges[(offs[L] + u, offs[L + 1] + v)] = (w[v, u], L, v * sizes[L] + u)
    return [K for K, _ in graph_curvature(acts, edges, alpha, flow)]


def element_curvature(model: nn.Sequential, x: torch.Tensor, alpha=ALPHA, flow=False,
                      output="softmax"):
    """Per weight layer of a Conv2d/BatchNorm2d/ReLU/Flatten/Linear chain, for one image ``x``
    (C, H, W): kappa (n_in, n_out) (NaN = no edge) and weight index (n_in, n_out)."""
    mods = list(model)
    # node values by running the layers one by one
    vals, h = [], x[None]
    vals.append(h.flatten())
    weight_mods, bn_of = [], {}
    for i, m in enumerate(mods):
        if isinstance(m, (nn.Conv2d, nn.Linear)) and i > 0:
            vals.append(h.flatten())
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            weight_mods.append(m)
        if isinstance(m, nn.BatchNorm2d):
            bn_of[len(weight_mods) - 1] = m
        h = m(h)
    vals.append(torch.softmax(h, 1).flatten() if output == "softmax" else h.flatten())
    acts = [minmax(v.detach().double().abs().numpy()) for v in vals]
    sizes = [a.size for a in acts]
    offs = np.cumsum([0] + sizes)
    # explicit edges (global ids), strength, layer, weight index
    edges = {}
    shape_in = x.shape
    for L, m in enumerate(weight_mods):
        w = m.weight.detach().double()
        scale = np.ones(w.shape[0])
        if L in bn_of:
            b = bn_of[L]
            scale = (b.weight.detach().double()
                     / torch.sqrt(b.running_var.double() + b.eps)).abs().numpy()
        if isinstance(m, nn.Conv2d):
            C, H, W = shape_in
            O, _, kh, kw = w.shape
            s, p = m.stride[0], m.padding[0]
            Ho, Wo = (H + 2 * p - kh) // s + 1, (W + 2 * p - kw) // s + 1
            for o in range(O):
                for oh in range(Ho):
                    for ow in range(Wo):
                        for c in range(C):
                            for i in range(kh):
                                for j in range(kw):
                                    ih, iw = oh * s - p + i, ow * s - p + j
                                    if not (0 <= ih < H and 0 <= iw < W):
                                        continue
                                    u = offs[L] + (c * H + ih) * W + iw
                                    v = offs[L + 1] + (o * Ho + oh) * Wo + ow
                                    edges[(u, v)] = (abs(w[o, c, i, j].item()) * scale[o], L,
                                                     ((o * C + c) * kh + i) * kw + j)
            shape_in = (O, Ho, Wo)
        else:
            O, I = w.shape
            for o in range(O):
                for i in range(I):
                    edges[(offs[L] + i, offs[L + 1] + o)] = (abs(w[o, i].item()) * scale[o], L,
                                                             o * I + i)
            shape_in = (O,)
    return graph_curvature(acts, edges, alpha, flow)
