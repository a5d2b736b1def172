"""Per-edge kappa against the paper authors' own code, edge by edge (``conventions="authors"``).

Takes a local copy of the authors' repository (github
SH-Tan/Post-Training-NN-Pruning-using-Graph-Curvature; clone or download it yourself) and
imports their modules from it at run time; nothing of their code is copied here. Their code
does not run as shipped, so it is patched *in memory* only, never on disk, and only in how it
imports and where it runs:

* stub modules for the missing ``tools.layers`` and for the ``GraphRicciCurvature``,
  ``tools.small_model_relu`` (and, when absent, ``pandas``) imports of ``tools/utils.py`` and
  their pruning scripts; their dataset classes (``MNIST`` / ``CIFAR10``, built at import time
  with ``download=True``) are replaced by a dummy while the scripts are imported;
* ``torch.cuda.mem_get_info`` (used for a chunk size only) returns a fixed 64 GiB; the three
  functions that ``graph_curvature_main_torch`` calls with ``device='cuda'`` get ``'cpu'``; the
  ``fork`` process pool is a sequential ``map``;
* their LeNet's ``CNN_edges`` multiplies the unfolded input ``(B, L, C*k*k)`` by a conv mask
  of shape ``(C, k, k)``, which does not broadcast: the (all-ones) conv masks are reshaped to
  ``(out, C*k*k)`` after their ``init_remove_mask``.

For each of their two model classes, a *shrunk copy* (an instance of their class, built with
their constructor, whose layers are then replaced by narrower ones, with the matching
``model_dims``): their LeNet (``tools/LeNet5_custom_small_w.py``: conv k6 s2, conv k6 s2,
three fc, softmax output) on a 1x20x20 input, and their VGG-9 (``tools/vgg9_custom_relu.py``:
six convs with BatchNorm and ReLU, three fc, logits output) on a 3x30x30 input. Random
weights (a few set to exactly 0), random BatchNorm statistics, one random image (the LeNet's
with zero pixels, as MNIST). Their curvature routine (their ``NN_info_batch``, the ``|w|``
clamp of their driver, ``normalization_weight_w4``, ``graph_curvature_main_torch`` with
``threshold=0``, alpha 0.9, exact ``ot.emd2``) against the library's
``edge_curvature`` (dense) and ``sparse_edge_curvature`` with ``conventions="authors"``,
``topk=None``, ``backend="exact"``, on an ``nn.Sequential`` holding the same modules; and the
dense routine once more on *their* node values (substituted into the same element graph), which
separates the curvature computation from the float32 differences of the two forward passes.
For reference the library's own conventions (``conventions="library"``) are compared too.

Per weight, their pruning pipeline (``get_top_c`` of their pruning script for the model, then
``aggregate_cnn_weight_curvature`` / ``count_weight_frequency`` / ``count_edge_frequency``)
against :func:`tp_curvature.unstructured.weight_curvature` with ``conventions="authors"``
(this checks the relabel of dead edges to 2.0 and the min over positions).

Writes ``results/authors_check/authors_check.md`` and ``.csv`` (per model: edges compared,
max |dkappa|, number above 1e-5, the same per weight, and how often each convention was
exercised) and prints the table with the command. The exit status is 0 when the curvature
routines agree within 1e-5 on the same node values (end to end the two forward passes differ
in float32; both are reported).

    python benchmarks/authors_check.py /path/to/Post-Training-NN-Pruning-using-Graph-Curvature
    python benchmarks/authors_check.py REPO --seeds 5 6 --models vgg9 --out /tmp/check
    python benchmarks/authors_check.py REPO --models vgg9 --vgg-channels 2 3 3 3 4 6 \
        --vgg-fc 6 5 4 --out results/authors_check/narrow_vgg9
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.9
TOL = 1e-5

from tp_curvature.unstructured import (edge_curvature, element_graph, node_values,  # noqa: E402
                                       sparse_edge_curvature, weight_curvature)
from tp_curvature.unstructured._checks import element_config  # noqa: E402
from tp_curvature.unstructured._scores import _image_edges as image_edges  # noqa: E402


# ------------------------------------------------------------------------ their code, loaded
class _SequentialPool:
    """Stands in for ``multiprocessing.get_context('fork').Pool``: ``map`` in this process."""

    def __init__(self, processes=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, args, chunksize=None):
        return [fn(a) for a in args]


class _SequentialContext:
    Pool = _SequentialPool


class _NoDataset:
    """Stands in for their module-level ``MNIST(...)`` / ``CIFAR10(...)`` downloads."""

    def __init__(self, *args, **kwargs):
        pass


def _stub(name: str, **attrs) -> None:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class AuthorsCode:
    """Their modules, imported from ``repo`` with the patches of the module docstring."""

    def __init__(self, repo: Path):
        repo = Path(repo).resolve()
        if not (repo / "tools" / "graph_curvature_cnn_threshold_optimized.py").is_file():
            raise SystemExit(f"{repo} does not look like the authors' repository (no "
                             "tools/graph_curvature_cnn_threshold_optimized.py)")
        sys.path.insert(0, str(repo))
        _stub("tools.layers")
        _stub("GraphRicciCurvature")
        _stub("GraphRicciCurvature.OllivierRicci", OllivierRicci=None)
        _stub("tools.small_model_relu", FC_MD=None)
        try:
            import pandas  # noqa: F401
        except ImportError:
            _stub("pandas")
        os.environ.setdefault("MPLBACKEND", "Agg")
        import torchvision.datasets.cifar as cifar
        import torchvision.datasets.mnist as mnist

        with _patched(cifar, "CIFAR10", _NoDataset), _patched(mnist, "MNIST", _NoDataset), \
                contextlib.redirect_stdout(io.StringIO()):
            self.curvature = importlib.import_module(
                "tools.graph_curvature_cnn_threshold_optimized")
            self.vgg = importlib.import_module("tools.vgg9_custom_relu")
            self.lenet = importlib.import_module("tools.LeNet5_custom_small_w")
            self.e2w = importlib.import_module("CNN.e2w_utils_new")
            self.prune_vgg = importlib.import_module(
                "CNN.remove_edge_cifar_union_w_small_combined")
            self.prune_lenet = importlib.import_module("CNN.remove_edge_cnn_union_w_combined")
        gc = self.curvature
        gc.get_context = lambda method: _SequentialContext()
        for fn in ("cnn_layerwise_shortest_path_torch", "cnn_adjacent_layer",
                   "out_distribution"):
            setattr(gc, fn, _on_cpu(getattr(gc, fn)))

    def edge_kappa(self, net, md: dict, image: torch.Tensor, lenet: bool) -> tuple:
        """Their per-edge kappa for one image, ``[(i, j, kappa)]`` with global node indices
        (their driver: ``NN_info_batch``, the 1e-30 clamp, ``normalization_weight_w4``,
        ``graph_curvature_main_torch`` with ``threshold=0``), and their node values (one
        float64 array per layer)."""
        dims = dims_of(md)
        gib = 64 << 30
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), \
                _patched(torch.cuda, "mem_get_info", lambda *a: (gib, gib)):
            info = net.NN_info_batch(image[None])
            edge_array, nodes, weights = info[0], info[1], info[2]
            bad = np.flatnonzero(np.add.reduceat(torch.isnan(nodes[0]).numpy(),
                                                 np.cumsum([0] + dims[:-1])))
            if bad.size:
                raise ConstantLayer(f"their node values are NaN in layer(s) {bad.tolist()}")
            weights = weights.clone()
            weights[abs(weights) <= 1e-30] = 1e-30
            extra = (None,) if lenet else ()
            w_len, w_prob = net.normalization_weight_w4(nodes, weights, dims, md, *extra)
            res, _, _ = self.curvature.graph_curvature_main_torch(
                dims, w_len, device="cpu", model_dims=md, probability_w=w_prob, alpha=ALPHA,
                nodes=torch.abs(nodes), edge_value=edge_array, threshold=0.)
        split = np.cumsum(dims)[:-1]
        values = [v.astype(np.float64) for v in np.split(nodes[0].numpy(), split)]
        return [(int(i), int(j), float(c)) for i, j, c in res[0]], values

    def weight_keys(self, triples: list, md: dict, lenet: bool) -> dict:
        """Their pruning key of every weight for one image (their ``get_top_c``, then the min
        per conv weight / fc edge): ``(weight layer, flat index in the weight) -> key``."""
        script = self.prune_lenet if lenet else self.prune_vgg
        prefix = np.cumsum([0] + dims_of(md)).tolist()
        with contextlib.redirect_stdout(io.StringIO()):
            neg_e, pos_e, cnn_e = script.get_top_c([triples] if lenet else triples, 1, prefix)
            weight_sets = []
            for layer, edges in cnn_e.items():
                d, pre = md[layer + 2]["dim"], md[layer + 1]["dim"]
                emap = self.e2w.build_cnn_edge_weight_map(
                    pre.get("channel", 1), pre["out_size"], d["channel"], d["kernel"],
                    d["stride"], d.get("padding", 0), layer, prefix)
                pos, neg = self.e2w.aggregate_cnn_weight_curvature(edges, emap)
                weight_sets += [[(w, c, f, z) for w, (c, f, z) in part.items()]
                                for part in (pos, neg)]
            fc_edges = [e for part in (neg_e, pos_e) for edges in part.values() for e in edges]
            freq_fc = script.count_edge_frequency(fc_edges)
            freq_cnn = self.e2w.count_weight_frequency(weight_sets, md,
                                                       script.cal_parameters(md))
        keys = {}
        for (layer, oc, ic, kh, kw), _, c, _ in freq_cnn:
            d, pre = md[layer + 2]["dim"], md[layer + 1]["dim"]
            shape = (d["channel"], pre.get("channel", 1), d["kernel"], d["kernel"])
            keys[(layer, int(np.ravel_multi_index((oc, ic, kh, kw), shape)))] = float(c)
        for i, j, _, c in freq_fc:
            layer = int(np.searchsorted(prefix, i, side="right") - 1)
            n_in = prefix[layer + 1] - prefix[layer]
            keys[(layer, int((j - prefix[layer + 1]) * n_in + (i - prefix[layer])))] = float(c)
        return keys


class ConstantLayer(Exception):
    """Their min-max normalisation gave NaN (a layer constant on the image)."""


def _on_cpu(fn):
    def wrapper(*args, **kwargs):
        kwargs["device"] = "cpu"
        return fn(*args, **kwargs)
    return wrapper


# --------------------------------------------------------------------- the shrunk models
def dims_of(md: dict) -> list:
    """Nodes per layer of a ``model_dims`` dict (their ``cal_dims``)."""
    out = []
    for i in range(1, len(md) + 1):
        name, d = md[i]["name"], md[i]["dim"]
        out.append(d["out_size"] if name == "fc" else d["channel"] * d["out_size"] ** 2)
    return out


def conv_dims(in_ch: int, size: int, convs: list, fcs: list) -> dict:
    """``model_dims`` of ``convs`` = [(channels, kernel, stride)] then ``fcs`` widths."""
    md = {1: {"name": "input", "dim": {"channel": in_ch, "out_size": size}}}
    for c, k, s in convs:
        size = (size - k) // s + 1
        md[len(md) + 1] = {"name": "cnn", "dim": {"channel": c, "kernel": k, "stride": s,
                                                  "padding": 0, "out_size": size}}
    for f in fcs:
        md[len(md) + 1] = {"name": "fc", "dim": {"out_size": f}}
    return md


VGG_CONVS = ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "conv4_1", "conv4_2"]
VGG_GEOMETRY = [(2, 2), (3, 1), (3, 1), (3, 2), (3, 1), (3, 1)]    # their kernels / strides


def _random_bn(bn: nn.BatchNorm2d, g: torch.Generator) -> nn.BatchNorm2d:
    with torch.no_grad():
        n = bn.num_features
        bn.weight.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))
        bn.bias.copy_(torch.empty(n).uniform_(-0.3, 0.3, generator=g))
        bn.running_mean.copy_(torch.empty(n).uniform_(-0.2, 0.2, generator=g))
        bn.running_var.copy_(torch.empty(n).uniform_(0.3, 3.0, generator=g))
    return bn


def shrunk_vgg(code: AuthorsCode, seed: int, size: int = 30,
               channels=(2, 3, 4, 4, 6, 8), fcs=(8, 6, 4)):
    """Their VGG9_CIFAR10 with narrower layers on a ``3 x size x size`` input; returns
    ``(net, model_dims, sequential, their image, our image, output)``."""
    full = conv_dims(3, 32, [(c, k, s) for c, (k, s) in
                             zip((64, 128, 128, 128, 256, 256), VGG_GEOMETRY)], [512, 128, 10])
    with contextlib.redirect_stdout(io.StringIO()):
        net = code.vgg.VGG9_CIFAR10(full, None, "cpu", np.cumsum([0] + dims_of(full)).tolist())
    md = conv_dims(3, size, [(c, k, s) for c, (k, s) in zip(channels, VGG_GEOMETRY)], fcs)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    c_in = 3
    for name, c, (k, s) in zip(VGG_CONVS, channels, VGG_GEOMETRY):
        setattr(net, name, nn.Conv2d(c_in, c, k, stride=s, padding=0))
        setattr(net, "bn" + name[4:], _random_bn(nn.BatchNorm2d(c), g))
        c_in = c
    net.fc1, net.fc2, net.fc3 = (nn.Linear(c_in, fcs[0]), nn.Linear(fcs[0], fcs[1]),
                                 nn.Linear(fcs[1], fcs[2]))
    with torch.no_grad():                      # exact zeros (their 1e-30 clamp)
        net.conv2_1.weight[0, 1, 1, 1] = 0.0
        net.conv3_2.weight[1, 0, 0, 2] = 0.0
        net.fc2.weight[1, 2] = 0.0
    net.model_info, net.prefix_dims = md, np.cumsum([0] + dims_of(md)).tolist()
    net.init_remove_mask()
    net.eval()
    seq = []
    for name in VGG_CONVS:
        seq += [getattr(net, name), getattr(net, "bn" + name[4:]), nn.ReLU()]
    seq += [nn.Flatten(), net.fc1, nn.ReLU(), net.fc2, nn.ReLU(), net.fc3]
    image = torch.rand(3, size, size, generator=g)
    return net, md, nn.Sequential(*seq).eval(), image, net.normalize(image)[None], "logits"


def shrunk_lenet(code: AuthorsCode, seed: int, size: int = 20, channels=(3, 4),
                 fcs=(10, 8, 4)):
    """Their LeNet_custom_v2 with narrower layers on a ``1 x size x size`` input (MNIST-like:
    about half the pixels exactly 0)."""
    full = conv_dims(1, 28, [(6, 6, 2), (16, 6, 2)], [120, 84, 10])
    with contextlib.redirect_stdout(io.StringIO()):
        net = code.lenet.LeNet_custom_v2(full, None, "cpu",
                                         np.cumsum([0] + dims_of(full)).tolist())
    md = conv_dims(1, size, [(channels[0], 6, 2), (channels[1], 6, 2)], fcs)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    flat = channels[1] * md[3]["dim"]["out_size"] ** 2
    net.conv1, net.conv2 = nn.Conv2d(1, channels[0], 6, stride=2), \
        nn.Conv2d(channels[0], channels[1], 6, stride=2)
    net.fc1, net.fc2, net.fc3 = (nn.Linear(flat, fcs[0]), nn.Linear(fcs[0], fcs[1]),
                                 nn.Linear(fcs[1], fcs[2]))
    with torch.no_grad():
        net.conv2.weight[1, 0, 2, 3] = 0.0
        net.fc1.weight[3, 5] = 0.0
    net.model_info, net.prefix_dims = md, np.cumsum([0] + dims_of(md)).tolist()
    net.init_remove_mask()
    for l, mask in net.remove_mask.items():   # their CNN_edges needs (out, in*k*k) masks
        if mask.dim() == 4:
            net.remove_mask[l] = mask.reshape(mask.shape[0], -1)
    net.eval()
    seq = nn.Sequential(net.conv1, nn.ReLU(), net.conv2, nn.ReLU(), nn.Flatten(), net.fc1,
                        nn.ReLU(), net.fc2, nn.ReLU(), net.fc3).eval()
    image = torch.rand(1, size, size, generator=g)
    image = image * (torch.rand(1, size, size, generator=g) < 0.5)
    return net, md, seq, image, image[None], "softmax"


MODELS = {"lenet": (shrunk_lenet, True), "vgg9": (shrunk_vgg, False)}


# ---------------------------------------------------------------------------- comparison
def exercised(seq: nn.Module, x: torch.Tensor, output: str) -> dict:
    """How often each convention that differs is exercised on this model and image: dead
    input / output endpoints (solved by the authors only), zero-weight edges, BatchNorm
    layers, and neighbour measures that take the float32 uniform fallback."""
    g = element_graph(seq, x, conventions="authors")
    a = node_values(g, x, output)[0]
    n = len(g.layers)
    dead_boundary = int(((a[0][:, None] == 0) & g.layers[0].exists).sum()
                        + ((a[n][None, :] == 0) & g.layers[-1].exists).sum())
    zero_w = sum(int(((np.abs(lay.module.weight.detach().numpy().reshape(-1))
                       [np.maximum(lay.weight_index, 0)] == 0) & lay.exists).sum())
                 for lay in g.layers)
    fallback = measures = 0
    for l in range(n):
        S = g.layers[l].strength                  # layer l -> layer l + 1
        # predecessor measures of layer l + 1 (a source layer unless it is the output) and
        # successor measures of layer l (a target layer unless it is the input)
        for axis, a_nb, used in ((0, a[l], l + 1 < n), (1, a[l + 1], l > 0)):
            if not used:
                continue
            shape = (-1, 1) if axis == 0 else (1, -1)
            ok = (S > 0) & (a_nb.reshape(shape) > 0)
            with np.errstate(divide="ignore", over="ignore"):
                inv = np.float32(1) / a_nb.astype(np.float32)
                w = np.where(ok, np.exp(-(inv * inv)).reshape(shape), np.float32(0))
            total = w.astype(np.float32).sum(axis=axis, dtype=np.float32)
            active = ok.any(axis=axis)
            measures += int(active.sum())
            fallback += int(((total <= np.float32(1e-7)) & active).sum())
    return {"dead_boundary_edges": dead_boundary, "zero_weight_edges": zero_w,
            "batchnorm_layers": sum(isinstance(m, nn.BatchNorm2d) for m in seq),
            "fallback_measures": fallback, "measures": measures}


def compare(code: AuthorsCode, which: str, seed: int) -> dict:
    """One model and seed; :class:`ConstantLayer` when their min-max gives NaN (then the
    library must refuse the image with ``conventions="authors"``: checked here)."""
    build, lenet = MODELS[which]
    net, md, seq, image, x, output = build(code, seed)
    t0 = time.perf_counter()
    try:
        triples, their_values = code.edge_kappa(net, md, image, lenet)
    except ConstantLayer as e:
        try:
            edge_curvature(seq, x, output=output, conventions="authors")
        except ValueError as ours:
            raise ConstantLayer(f"seed {seed}: {e}; the library: {ours}") from None
        raise AssertionError(f"seed {seed}: {e}, but the library did not refuse the image")
    t_theirs = time.perf_counter() - t0
    prefix = np.cumsum([0] + dims_of(md))
    theirs = {}
    for i, j, c in triples:
        l = int(np.searchsorted(prefix, i, side="right") - 1)
        theirs[(l, i - prefix[l], j - prefix[l + 1])] = c
    row = {"model": which, "seed": seed, "edges": len(theirs),
           "their_nan": int(np.isnan(list(theirs.values())).sum())}
    opts = dict(output=output, alpha=ALPHA, topk=None, backend="exact")
    t0 = time.perf_counter()
    for conv in ("authors", "library"):
        dense = edge_curvature(seq, x, conventions=conv, **opts)
        n_ours = sum(int((ek.weight_index >= 0).sum()) for ek in dense)
        assert n_ours == len(theirs), f"{which}: {n_ours} edges here, {len(theirs)} theirs"
        d = np.array([abs(dense[l].kappa[i, j] - c) for (l, i, j), c in theirs.items()])
        d = np.where(np.isnan(d), np.inf, d)        # NaN on either side counts as a miss
        row[f"{conv}_max"], row[f"{conv}_above"] = float(d.max()), int((d > TOL).sum())
        if conv == "authors":
            scale = np.maximum(1.0, np.abs(list(theirs.values())))
            row["authors_max_rel"] = float(np.max(d / scale))
            authors_edges = dense
    # the same graph on their node values: the curvature routine alone, without the float32
    # differences of two forward passes (their unfold / matmul / fold against conv2d)
    graph = element_graph(seq, x, conventions="authors")
    cfg = element_config({k: v for k, v in opts.items() if k != "output"})
    on_theirs = image_edges(graph, their_values, cfg)
    d = np.array([abs(on_theirs[l].kappa[i, j] - c) for (l, i, j), c in theirs.items()])
    d = np.where(np.isnan(d), np.inf, d)
    row["values_max"], row["values_above"] = float(d.max()), int((d > TOL).sum())
    row["node_value_max_diff"] = float(max(np.abs(u - v).max() for u, v in zip(
        their_values, node_values(graph, x, output)[0])))
    sparse = sparse_edge_curvature(seq, x, conventions="authors", **opts)
    ds = []
    for l, (xs, ys, _, k) in enumerate(sparse.values()):
        ds += [abs(theirs[(l, int(a), int(b))] - kk) for a, b, kk in zip(xs, ys, k)]
    ds = np.where(np.isnan(ds), np.inf, np.array(ds))
    assert len(ds) == len(theirs), f"{which}: {len(ds)} sparse edges, {len(theirs)} theirs"
    row["sparse_edges"], row["sparse_max"] = len(ds), float(ds.max())
    row["sparse_above"] = int((ds > TOL).sum())
    # per weight: their pruning key against weight_curvature(conventions="authors")
    keys = code.weight_keys(triples, md, lenet)
    ours = list(weight_curvature(seq, x, conventions="authors", progress=False, **opts)
                .values())
    dw = np.array([abs(float(ours[l].reshape(-1)[f]) - c) for (l, f), c in keys.items()])
    dw = np.where(np.isnan(dw), np.inf, dw)
    assert len(keys) == sum(s.numel() for s in ours), f"{which}: weights missing"
    row["weights"], row["weight_max"] = len(keys), float(dw.max())
    row["weight_above"] = int((dw > TOL).sum())
    row["relabelled"] = int(sum(c == 2.0 for c in keys.values()))
    # the same relabel applied per weight after the min, in every layer, for contrast
    plain = []
    for ek in authors_edges:
        acc = np.full(int(ek.weight_index.max()) + 1, np.inf)
        ex = ek.weight_index >= 0
        np.minimum.at(acc, ek.weight_index[ex], ek.kappa[ex])
        plain.append(np.where(np.abs(acc - 1.0) < 1e-6, 2.0, acc))
    row["per_weight_relabel_differs"] = int(sum(abs(plain[l][f] - c) > TOL
                                                for (l, f), c in keys.items()))
    row["seconds_theirs"], row["seconds_ours"] = t_theirs, time.perf_counter() - t0
    row.update(exercised(seq, x, output))
    return row


COLUMNS = [("model", "model"), ("seed", "seed"), ("edges", "edges compared"),
           ("authors_max", "max abs dkappa (dense)"),
           ("authors_max_rel", "max abs dkappa / max(1, abs kappa)"),
           ("authors_above", "above 1e-5"),
           ("node_value_max_diff", "node values: max abs diff"),
           ("values_max", "on their node values: max abs dkappa"),
           ("values_above", "on their node values: above 1e-5"),
           ("sparse_max", "max abs dkappa (sparse)"), ("sparse_above", "above 1e-5 (sparse)"),
           ("weights", "weights compared"), ("weight_max", "max abs dscore"),
           ("weight_above", "above 1e-5 (weights)"), ("relabelled", "weights at 2.0"),
           ("per_weight_relabel_differs", "relabel after the min: weights differing"),
           ("library_max", "library conventions: max abs dkappa"),
           ("library_above", "library: above 1e-5"),
           ("dead_boundary_edges", "dead input/output edges"),
           ("zero_weight_edges", "zero-weight edges"),
           ("fallback_measures", "uniform fallbacks"), ("measures", "measures"),
           ("batchnorm_layers", "BN layers")]


def _fmt(v):
    return f"{v:.2e}" if isinstance(v, float) else str(v)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", type=Path, help="local copy of the authors' repository")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="one shrunk model and image per seed")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", type=Path, default=ROOT / "results" / "authors_check")
    p.add_argument("--threads", type=int, default=1, help="torch / Numba threads")
    p.add_argument("--vgg-channels", type=int, nargs=6, default=None,
                   help="channels of the shrunk VGG-9's six convs (default 2 3 4 4 6 8)")
    p.add_argument("--vgg-fc", type=int, nargs=3, default=None,
                   help="widths of its three fc layers (default 8 6 4)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    code = AuthorsCode(args.repo)
    if args.vgg_channels or args.vgg_fc:
        sizes = {k: tuple(v) for k, v in (("channels", args.vgg_channels),
                                          ("fcs", args.vgg_fc)) if v}
        MODELS["vgg9"] = (lambda code, seed: shrunk_vgg(code, seed, **sizes), False)
    rows = []
    notes = []
    for which in args.models:
        for seed in args.seeds:
            try:
                row = compare(code, which, seed)
            except ConstantLayer as e:       # their NaN, the library's ValueError: agreed
                notes.append(f"- {which}, {e}")
                row = {"model": which, "seed": seed, "constant_layer": 1}
            rows.append(row)
            print(", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out / "authors_check.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    command = "python benchmarks/authors_check.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    md = ["# Per-edge kappa against the authors' code\n",
          f"Their curvature routine (alpha {ALPHA}, exact ot.emd2, one random image) against "
          "the library with `conventions=\"authors\"` (`topk=None`, `backend=\"exact\"`); "
          f"tolerance {TOL:g}. See benchmarks/authors_check.py.\n",
          "| " + " | ".join(h for _, h in COLUMNS) + " |",
          "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(r.get(k, "-")) for k, _ in COLUMNS) + " |" for r in rows]
    done = [r for r in rows if "authors_max" in r]
    if done:
        md.append(
            f"\nOn the same node values (theirs, substituted into the library's element graph) "
            f"the two curvature routines agree to {max(r['values_max'] for r in done):.2e} on "
            f"every edge. End to end, each side runs its own forward pass (their unfold / matmul "
            f"/ fold convolution against torch's conv2d): node values differ by up to "
            f"{max(r['node_value_max_diff'] for r in done):.2e} (float32), which "
            f"exp(-1/a^2) and 1/(1-alpha) amplify to at most "
            f"{max(r['authors_max'] for r in done):.2e} in kappa "
            f"({max(r['authors_max_rel'] for r in done):.2e} relative to max(1, |kappa|)).")
    if notes:
        md += ["\nImages with a constant layer (their min-max gives NaN, the library with "
               "`conventions=\"authors\"` refuses the image; not compared):\n"] + notes
    md.append(f"\nCommand: `{command}`\n")
    text = "\n".join(md)
    (args.out / "authors_check.md").write_text(text)
    print(text)
    worst = max((r["values_max"] for r in done), default=np.inf)
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
