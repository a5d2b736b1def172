"""Coverage: Torch-Pruning's own example workflows, pruned with ``CurvatureImportance``.

Every workflow is one of Torch-Pruning's examples (1.6.1, github VainF/Torch-Pruning): its
model, its pruner arguments (``ignored_layers``, ``num_heads``, ``round_to``, head pruning,
``output_transform``) and its attribute fix-ups after pruning; pruned at 0.5 by ``BasePruner``
once with Torch-Pruning's ``GroupMagnitudeImportance`` (the norm of the example) and once
with ``CurvatureImportance(topk=8)`` calibrated on the example's kind of input. The table
says, per workflow and importance, whether the pruning step ran and shrank the model (and the
pruned model still runs), and for curvature which layers Torch-Pruning asked about that the
channel graph could not score (``imp.coverage()["fallback"]``), with the seconds each took.

Lists (``--list`` prints them):

* ``tv-cls``, ``tv-seg``, ``tv-det``: examples/torchvision_models/torchvision_pruning.py
  (classification, segmentation, detection; ``weights_backbone=None``,
  ``trainable_backbone_layers=5`` for detection, its ignored layers);
* ``timm``: examples/timm_models/prune_timm_models.py (``TIMM_FUSED_ATTN=0``, ``num_heads``
  of every ``qkv``, the classifier ignored; the example's per-conv random pruning ratios, a
  NAS experiment, are left out: one ratio);
* ``hf``: examples/transformers/prune_hf_vit.py, prune_hf_bert.py (as ``BasePruner``) and
  examples/LLMs/prune_llm.py, on small configurations built from config objects (as many
  KV heads as heads: with grouped-query attention Torch-Pruning 1.6.1 never finishes its
  dependency graph).

No download: random weights (timm / torchvision / transformers constructors), random
inputs: 64 x 64 images (80 x 80 for inception_v3, 64 x 80 for detection, resized by the
models' own transforms to at most 160 px), 8-token sequences; classifiers built with 10
classes where the constructor allows (the classifier is ignored by every example, and its
connections would dominate the cost). Layer scales initialised near 0 by timm (``gamma``,
``ls1``...) are drawn in [0.5, 1.5] first, as in tests/test_coverage.py: at 1e-6 they make
most transport problems ill-conditioned (docs/performance.md).

Each workflow runs in its own process (``--timeout`` seconds, both importances), so one that
hangs (Torch-Pruning's graph on some models) or crashes is recorded, not fatal.

Usage::

    python benchmarks/workflow_coverage.py                 # every workflow but HEAVY (about 40 min)
    python benchmarks/workflow_coverage.py --all           # and HEAVY (about 10 min more)
    python benchmarks/workflow_coverage.py --quick         # a subset of each list (a few minutes)
    python benchmarks/workflow_coverage.py --only resnet18 hf_bert
    python benchmarks/workflow_coverage.py --list

Writes ``results/coverage/coverage.csv`` and ``results/coverage/coverage.md`` (the command,
the versions and the wall time beside the table; ``--out`` for another folder;
``--update`` replaces the rows of the workflows it runs and keeps the others).

(Not ``benchmarks/coverage.py``: benchmarks/ is on the tests' ``pythonpath``, and Numba imports
the ``coverage`` package when it is there, so a module of that name breaks every test.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# benchmarks/kernels.py would shadow the ``kernels`` package that transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
os.environ.setdefault("TIMM_FUSED_ATTN", "0")          # as prune_timm_models.py

IMAGE = 64
RATIO = 0.5
TOPK = 8

TV_CLS = ["resnet18", "resnet50", "resnext50_32x4d", "vgg11_bn", "densenet121", "googlenet",
          "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
          "efficientnet_b0", "mnasnet0_5", "regnet_y_400mf", "squeezenet1_1",
          "shufflenet_v2_x0_5"]
TV_SEG = ["fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large",
          "lraspp_mobilenet_v3_large"]
TV_DET = ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
          "fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
          "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn_v2"]
TIMM = ["resnet18", "resnet26d", "resnet50", "resnext26ts", "seresnext26d_32x4d",
        "resnest14d", "res2net50_14w_8s", "densenet121", "dla34", "efficientnet_b0",
        "efficientnet_lite0", "mobilenetv2_050", "mobilenetv3_small_050",
        "mobilenetv3_large_075", "mnasnet_050", "ghostnet_050", "regnetx_002", "regnety_002",
        "rexnet_100", "tinynet_e", "lcnet_050", "mixnet_s", "fbnetc_100", "spnasnet_100",
        "semnasnet_050", "hardcorenas_a", "ese_vovnet19b_dw", "repvgg_a0", "convnext_atto",
        "convnextv2_atto", "poolformer_s12", "mobilevit_xxs", "mobilevitv2_050",
        "deit_tiny_patch16_224", "vit_tiny_patch16_224", "mixer_s32_224", "resmlp_12_224",
        "edgenext_xx_small"]
HF = ["hf_vit", "hf_bert", "hf_llama"]
#: the heaviest workflows (1.5 to 2.5 min of curvature each on one busy core), run with --all
#: only: without them a full pass stays within about 40 minutes on 2 shared cores
HEAVY = ["tv:resnext50_32x4d", "tv:inception_v3", "tv:deeplabv3_resnet50",
         "tv:fcos_resnet50_fpn", "timm:resnet50", "timm:res2net50_14w_8s"]
#: timm models that take an ``img_size`` (position embeddings / token counts)
TIMM_IMG_SIZE = ("deit", "vit_", "mixer", "resmlp")

QUICK = ["tv:resnet18", "tv:mobilenet_v3_small", "tv:shufflenet_v2_x0_5",
         "tv:lraspp_mobilenet_v3_large", "tv:fasterrcnn_mobilenet_v3_large_320_fpn",
         "timm:mobilenetv3_small_050", "timm:ghostnet_050", "timm:deit_tiny_patch16_224",
         "hf_vit", "hf_bert", "hf_llama"]


def all_workflows(heavy: bool = True) -> list:
    names = [f"tv:{n}" for n in TV_CLS + TV_SEG + TV_DET] + [f"timm:{n}" for n in TIMM] + HF
    return names if heavy else [n for n in names if n not in HEAVY]


def group_of(name: str) -> str:
    if name.startswith("tv:"):
        n = name[3:]
        return "tv-seg" if n in TV_SEG else "tv-det" if n in TV_DET else "tv-cls"
    return "timm" if name.startswith("timm:") else "hf"


# ------------------------------------------------------------------------------ workflows
@dataclass
class Workflow:
    """One example: the model, how Torch-Pruning and the calibration see it, the fix-ups."""
    model: object
    example: object                      # Torch-Pruning's example_inputs
    calib: object                        # calibration data for CurvatureImportance
    p: int = 2                           # the example's norm for GroupMagnitudeImportance
    kwargs: dict = field(default_factory=dict)
    forward_fn: Optional[Callable] = None
    fixup: Optional[Callable] = None     # fixup(model, pruner) after pruning
    run: Optional[Callable] = None       # run(model) -> output, after pruning
    config: str = ""


def _images(n=4, size=IMAGE, seed=0):
    import torch
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ignore_1000(model, num_classes=1000):
    import torch.nn as nn
    return [m for m in model.modules() if isinstance(m, nn.Linear)
            and m.out_features == num_classes]


def torchvision_workflow(name: str) -> Workflow:
    import torch
    import torchvision.models as tvm
    import torchvision.models.detection as det
    import torchvision.models.segmentation as seg
    if name in TV_DET:
        ctor = getattr(det, name)
        kw = dict(weights=None, weights_backbone=None)
        if not name.startswith("ssd"):                # SSD's transform has a fixed size
            kw.update(trainable_backbone_layers=5, min_size=128, max_size=160)
        model = ctor(**kw).eval()
        ignored = []
        if name.startswith("ssd"):
            ignored.append(model.head)
        if "fasterrcnn" in name:
            ignored += [model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.backbone.fpn,
                        model.roi_heads]
        if name == "fcos_resnet50_fpn":
            ignored += [model.head.classification_head.cls_logits,
                        model.head.regression_head.bbox_reg,
                        model.head.regression_head.bbox_ctrness]
        if name == "maskrcnn_resnet50_fpn_v2":
            ignored += [model.rpn.head.cls_logits, model.rpn.head.bbox_pred,
                        model.roi_heads.box_predictor, model.roi_heads.mask_predictor]
        if name == "retinanet_resnet50_fpn_v2":
            ignored += [model.head.classification_head.cls_logits,
                        model.head.regression_head.bbox_reg]
        ex = [torch.rand(3, 64, 80), torch.rand(3, 80, 64)]
        size = 320 if "320" in name else IMAGE
        calib = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        return Workflow(model, ex, calib, p=1, kwargs=dict(ignored_layers=ignored),
                        run=lambda m: m(ex), config="min_size 128, max_size 160; calibration "
                        "through backbone + FPN + head (the library's default)")
    if name in TV_SEG:
        model = getattr(seg, name)(weights=None, weights_backbone=None, aux_loss=None).eval()
        x = _images()
        return Workflow(model, x[:1], x, p=1, kwargs=dict(ignored_layers=_ignore_1000(model)),
                        forward_fn=lambda m, b: m(b)["out"], run=lambda m: m(x)["out"],
                        config="forward_fn: model(x)['out'] (the example's output_transform)")
    kw = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=True)
    model = getattr(tvm, name)(weights=None, **kw).eval()
    x = _images(size=80 if name == "inception_v3" else IMAGE)
    return Workflow(model, x[:1], x, p=1, kwargs=dict(ignored_layers=_ignore_1000(model, 10)),
                    run=lambda m: m(x), config="num_classes 10")


def timm_workflow(name: str) -> Workflow:
    import timm
    import torch
    import torch.nn as nn
    kw = dict(num_classes=10)
    if name.startswith(TIMM_IMG_SIZE):
        kw["img_size"] = IMAGE
    model = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():
        for pn, prm in model.named_parameters():
            leaf = pn.rsplit(".", 1)[-1]
            if prm.dim() == 1 and (leaf in ("gamma", "layer_scale", "ls1", "ls2", "gamma1",
                                            "gamma2", "layer_scale_1", "layer_scale_2")
                                   or leaf.startswith("layer_scale")
                                   or (leaf == "scale" and "layer_scale" in pn)):   # MetaFormer
                prm.uniform_(0.5, 1.5)
    num_heads, ignored = {}, []
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features == model.num_classes:
            ignored.append(m)
        if hasattr(m, "num_heads"):
            if hasattr(m, "qkv"):
                num_heads[m.qkv] = m.num_heads
            elif hasattr(m, "qkv_proj"):
                num_heads[m.qkv_proj] = m.num_heads

    def fixup(model, pruner):
        for m in model.modules():
            if hasattr(m, "num_heads") and hasattr(m, "qkv") and m.qkv in pruner.num_heads:
                m.num_heads = pruner.num_heads[m.qkv]
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                if hasattr(m, "attn_dim"):            # timm >= 1.0.20 reshapes by attn_dim
                    m.attn_dim = m.num_heads * m.head_dim

    x = _images()
    return Workflow(model, x[:1], x, p=2,
                    kwargs=dict(ignored_layers=ignored, num_heads=num_heads), fixup=fixup,
                    run=lambda m: m(x), config=", ".join(f"{k} {v}" for k, v in kw.items()))


def _import_transformers():
    import importlib
    return importlib.import_module("transformers")


def hf_workflow(name: str) -> Workflow:
    import torch
    transformers = _import_transformers()
    g = torch.Generator().manual_seed(0)
    if name == "hf_vit":
        cfg = transformers.ViTConfig(image_size=IMAGE, patch_size=16, hidden_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, num_labels=10)
        model = transformers.ViTForImageClassification(cfg).eval()
        attns = [m for m in model.modules() if type(m).__name__ in ("ViTAttention",
                                                                     "ViTSelfAttention")]
        num_heads = {}
        for a in attns:
            for proj in ("q_proj", "k_proj", "v_proj", "query", "key", "value"):
                if hasattr(a, proj):
                    num_heads[getattr(a, proj)] = a.num_attention_heads

        def fixup(model, pruner):                 # prune_hf_vit.py's attribute fix-ups
            for a in attns:
                q = a.q_proj if hasattr(a, "q_proj") else a.query
                a.num_attention_heads = pruner.num_heads[q]
                if hasattr(a, "head_dim"):
                    a.head_dim = q.out_features // a.num_attention_heads
                if hasattr(a, "attention_head_size"):
                    a.attention_head_size = q.out_features // a.num_attention_heads
                    a.all_head_size = q.out_features
        x = _images()
        return Workflow(model, x[:1], x, p=1, kwargs=dict(
            ignored_layers=[model.classifier], num_heads=num_heads, prune_head_dims=True,
            prune_num_heads=False, head_pruning_ratio=0.5,
            output_transform=lambda out: out.logits.sum()), fixup=fixup,
            run=lambda m: m(x).logits, config="ViTConfig(image_size 64, patch 16, hidden 64, "
            "2 layers, 4 heads, mlp 128)")
    if name == "hf_bert":
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128,
                                      max_position_embeddings=32)
        model = transformers.BertModel(cfg).eval()
        attns = [m for m in model.modules() if type(m).__name__ == "BertSelfAttention"]
        num_heads = {}
        for a in attns:
            num_heads[a.query] = num_heads[a.key] = num_heads[a.value] = a.num_attention_heads
        batch = {"input_ids": torch.randint(0, 100, (4, 8), generator=g),
                 "token_type_ids": torch.randint(0, 2, (4, 8), generator=g),
                 "attention_mask": torch.ones(4, 8, dtype=torch.long)}
        ex = {k: v[:1] for k, v in batch.items()}

        def fixup(model, pruner):                 # prune_hf_bert.py's attribute fix-ups
            for a in attns:
                a.num_attention_heads = pruner.num_heads[a.query]
                a.attention_head_size = a.query.out_features // a.num_attention_heads
                a.all_head_size = a.query.out_features
        return Workflow(model, ex, [batch], p=2, kwargs=dict(
            global_pruning=True, num_heads=num_heads, prune_head_dims=False,
            prune_num_heads=True, head_pruning_ratio=0.5,
            output_transform=lambda out: out.pooler_output.sum(),
            ignored_layers=[model.pooler]),
            forward_fn=lambda m, b: m(**b), fixup=fixup,
            run=lambda m: m(**batch).last_hidden_state, config="BertConfig(hidden 64, 2 "
            "layers, 4 heads, mlp 128), 8 tokens; forward_fn: model(**batch)")
    if name == "hf_llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4,
                                       intermediate_size=128, max_position_embeddings=64,
                                       use_cache=False)
        model = transformers.LlamaForCausalLM(cfg).eval()
        num_heads = {}
        for n, m in model.named_modules():
            if n.endswith("self_attn"):
                num_heads[m.q_proj] = cfg.num_attention_heads
                num_heads[m.k_proj] = cfg.num_key_value_heads
                num_heads[m.v_proj] = cfg.num_key_value_heads
        ids = torch.randint(0, 128, (4, 8), generator=g)

        def fixup(model, pruner):                 # prune_llm.py's attribute fix-ups
            model.config.hidden_size = model.lm_head.in_features
            for n, m in model.named_modules():
                if n.endswith("self_attn"):
                    m.hidden_size = m.q_proj.out_features
                    m.num_heads = m.hidden_size // m.head_dim
                    model.config.num_attention_heads = m.num_heads
                    m.num_key_value_heads = m.num_heads
                    m.num_key_value_groups = 1
                elif n.endswith("mlp"):
                    m.hidden_size = m.gate_proj.in_features
                    model.config.intermediate_size = m.gate_proj.out_features
            model.config.num_key_value_heads = model.config.num_attention_heads
        return Workflow(model, ids[:1], ids, p=2, kwargs=dict(
            ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True,
            prune_head_dims=False, head_pruning_ratio=0.5, round_to=4,
            output_transform=lambda o: o.logits), fixup=fixup,
            run=lambda m: m(ids).logits, config="LlamaConfig(hidden 64, 2 layers, 4 heads = "
            "4 KV heads, mlp 128, use_cache False), 8 tokens")
    raise KeyError(name)


def build(name: str) -> Workflow:
    if name.startswith("tv:"):
        return torchvision_workflow(name[3:])
    if name.startswith("timm:"):
        return timm_workflow(name[5:])
    return hf_workflow(name)


# ------------------------------------------------------------------------------ one run
def run_one(name: str, importance: str) -> dict:
    """Prune workflow ``name`` at 0.5 with ``importance`` ("magnitude" | "curvature")."""
    import torch
    import torch_pruning as tp
    from tp_curvature import CurvatureImportance
    row = dict(workflow=name, group=group_of(name), importance=importance, pruned=False,
               params_before=None, params_after=None, fallback="", n_fallback=None,
               n_curvature=None, seconds=None, error="", config="")
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        wf = build(name)
        row["config"] = wf.config
        model = wf.model
        n0 = sum(p.numel() for p in model.parameters())
        row["params_before"] = n0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if importance == "curvature":
                imp = CurvatureImportance(topk=TOPK)
                imp.calibrate(model, wf.calib, forward_fn=wf.forward_fn)
            else:
                imp = tp.importance.GroupMagnitudeImportance(p=wf.p)
            pruner = tp.pruner.BasePruner(model, wf.example, importance=imp,
                                          pruning_ratio=RATIO, **wf.kwargs)
            pruner.step()
            if wf.fixup is not None:
                wf.fixup(model, pruner)
            with torch.no_grad():
                wf.run(model.eval())
        n1 = sum(p.numel() for p in model.parameters())
        row["params_after"] = n1
        row["pruned"] = n1 < n0
        if importance == "curvature":
            cov = imp.coverage()
            row["n_fallback"] = len(cov["fallback"])
            row["n_curvature"] = len(cov["curvature"])
            row["fallback"] = " ".join(cov["fallback"])
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        traceback.print_exc(limit=4)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def worker(name: str, out: str, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    rows = []
    for imp in ("magnitude", "curvature"):      # written after each: a timeout keeps the first
        rows.append(run_one(name, imp))
        Path(out).write_text(json.dumps(rows))


def run_in_process(name: str, timeout: float, threads: int) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", name, "--json", str(out),
                                   "--threads", str(threads)], env=env, timeout=timeout,
                                  capture_output=True, text=True)
            tail = proc.stderr.strip().splitlines()
            err = (tail[-1][:200] if tail else f"exit code {proc.returncode}") \
                if proc.returncode else ""
        except subprocess.TimeoutExpired:
            err = f"timeout after {timeout:.0f} s"
        done = json.loads(out.read_text()) if out.exists() else []
        seconds = round(time.perf_counter() - t0 - sum(r.get("seconds") or 0 for r in done), 1)
        return done + [dict(workflow=name, group=group_of(name), importance=imp, pruned=False,
                            error=err or "no result", seconds=seconds)
                       for imp in ("magnitude", "curvature")[len(done):]]


# ------------------------------------------------------------------------------ report
def versions() -> str:
    import timm
    import torch
    import torch_pruning
    import torchvision
    try:
        hf = _import_transformers().__version__
    except ImportError:
        hf = "not installed"
    return (f"torch {torch.__version__}, torch-pruning {torch_pruning.__version__}, torchvision "
            f"{torchvision.__version__}, timm {timm.__version__}, transformers {hf}, Python "
            f"{platform.python_version()}, {os.cpu_count()} CPUs")


def write_report(rows: list, out_dir: Path, command: str, wall: float, threads: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = ["workflow", "group", "importance", "pruned", "params_before", "params_after",
            "n_curvature", "n_fallback", "fallback", "seconds", "error", "config"]
    import csv
    with open(out_dir / "coverage.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    by = {}
    for r in rows:
        by.setdefault(r["workflow"], {})[r["importance"]] = r
    lines = ["# Coverage: Torch-Pruning's example workflows with CurvatureImportance", "",
             f"Command: `{command}`  ", f"Wall time: {wall / 60:.1f} min on {threads} "
             f"thread(s) per workflow, one workflow at a time; {versions()}.", "",
             "Each workflow pruned at 0.5 by `BasePruner` with its Torch-Pruning example "
             "arguments, once with `GroupMagnitudeImportance` (the example's norm) and once "
             f"with `CurvatureImportance(topk={TOPK})`; random weights and inputs (see "
             "`benchmarks/workflow_coverage.py`). *pruned*: the step ran, the model shrank and still "
             "runs. *fallback*: the layers Torch-Pruning asked about that the channel graph "
             "could not score (`imp.coverage()['fallback']`).", ""]
    summary = {}
    for name, d in by.items():
        s = summary.setdefault(group_of(name), dict(n=0, mag=0, cur=0, full=0, fb=0))
        s["n"] += 1
        mag, cur = d.get("magnitude", {}), d.get("curvature", {})
        s["mag"] += bool(mag.get("pruned"))
        s["cur"] += bool(cur.get("pruned"))
        s["full"] += bool(cur.get("pruned")) and cur.get("n_fallback") == 0
        s["fb"] += int(cur.get("n_fallback") or 0)
    lines += ["| list | workflows | pruned (magnitude) | pruned (curvature) | "
              "curvature, no fallback | fallback layers |", "|---|---|---|---|---|---|"]
    tot = dict(n=0, mag=0, cur=0, full=0, fb=0)
    for g in ("tv-cls", "tv-seg", "tv-det", "timm", "hf"):
        if g in summary:
            s = summary[g]
            lines.append(f"| {g} | {s['n']} | {s['mag']} | {s['cur']} | {s['full']} | "
                         f"{s['fb']} |")
            for k in tot:
                tot[k] += s[k]
    lines += [f"| all | {tot['n']} | {tot['mag']} | {tot['cur']} | {tot['full']} | "
              f"{tot['fb']} |", ""]
    lines += ["| workflow | pruned (magnitude) | pruned (curvature) | layers by curvature | "
              "fallback layers | s (magnitude) | s (curvature) | note |",
              "|---|---|---|---|---|---|---|---|"]
    for name, d in by.items():
        mag, cur = d.get("magnitude", {}), d.get("curvature", {})
        fb = cur.get("fallback") or ""
        fb_names = fb.split()
        fb_txt = (str(cur.get("n_fallback")) if cur.get("n_fallback") is not None else "-")
        if fb_names:
            fb_txt += ": " + ", ".join(f"`{n}`" for n in fb_names[:4]) + \
                (" ..." if len(fb_names) > 4 else "")
        notes = []
        for k, r in (("magnitude", mag), ("curvature", cur)):
            if r.get("error"):
                notes.append(f"{k}: {r['error']}")
        cfg = cur.get("config") or mag.get("config") or ""
        if cfg:
            notes.append(cfg)
        yes = lambda r: "yes" if r.get("pruned") else "**no**"          # noqa: E731
        lines.append(f"| {name} | {yes(mag)} | {yes(cur)} | {cur.get('n_curvature', '-')} | "
                     f"{fb_txt} | {mag.get('seconds', '-')} | {cur.get('seconds', '-')} | "
                     f"{'; '.join(notes).replace('|', '/')} |")
    (out_dir / "coverage.md").write_text("\n".join(lines) + "\n")


def read_rows(path: Path) -> list:
    """The rows of a coverage.csv, typed as :func:`run_one` writes them."""
    import csv
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            r["pruned"] = r["pruned"] == "True"
            for k in ("params_before", "params_after", "n_curvature", "n_fallback"):
                r[k] = int(r[k]) if r.get(k) not in (None, "") else None
            r["seconds"] = float(r["seconds"]) if r.get("seconds") else None
            rows.append(r)
    return rows


def read_command(path: Path) -> tuple:
    """``(command, wall seconds)`` recorded in a coverage.md (``("", 0)`` if none)."""
    if not path.exists():
        return "", 0.0
    text = path.read_text()
    cmd = text.split("Command: `", 1)[1].split("`  ", 1)[0] if "Command: `" in text else ""
    wall = 0.0
    if "Wall time: " in text:
        wall = float(text.split("Wall time: ", 1)[1].split(" min", 1)[0]) * 60
    return cmd, wall


def _ordered(rows: list) -> list:
    order = {n: i for i, n in enumerate(all_workflows())}
    return sorted(rows, key=lambda r: (order.get(r["workflow"], len(order)),
                                       r["importance"] != "magnitude"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset of every list")
    ap.add_argument("--all", action="store_true", help="also the heaviest workflows (HEAVY)")
    ap.add_argument("--only", nargs="+", help="workflow names (tv:..., timm:..., hf_...), "
                    "or bare model names")
    ap.add_argument("--list", action="store_true", help="print the workflows and exit")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per workflow")
    ap.add_argument("--threads", type=int, default=1, help="torch / Numba threads")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "coverage")
    ap.add_argument("--update", action="store_true", help="keep the rows of --out's table "
                    "for the workflows not run now (their command is kept beside it)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.json, args.threads)
        return
    names = all_workflows(heavy=args.all)
    if args.list:
        print("\n".join(f"{group_of(n):7s} {n}" for n in names))
        return
    if args.quick:
        names = QUICK
    if args.only:
        names = [n for n in all_workflows() if n in args.only or n.split(":")[-1] in args.only]
    command = "python benchmarks/workflow_coverage.py" + (" " + " ".join(sys.argv[1:])
                                                  if sys.argv[1:] else "")
    t0 = time.perf_counter()
    rows, kept, earlier = [], [], 0.0
    if args.update and (args.out / "coverage.csv").exists():
        kept = [r for r in read_rows(args.out / "coverage.csv") if r["workflow"] not in names]
        old_cmd, earlier = read_command(args.out / "coverage.md")
        command = f"{old_cmd}`, then `{command}" if old_cmd else command
    for i, name in enumerate(names):
        got = run_in_process(name, args.timeout, args.threads)
        rows += got
        cur = [r for r in got if r["importance"] == "curvature"][0]
        mag = [r for r in got if r["importance"] == "magnitude"][0]
        print(f"[{i + 1}/{len(names)}] {name}: magnitude {'ok' if mag.get('pruned') else 'no'} "
              f"({mag.get('seconds')} s), curvature {'ok' if cur.get('pruned') else 'no'} "
              f"({cur.get('seconds')} s, fallback {cur.get('n_fallback')}) "
              f"{cur.get('error') or mag.get('error') or ''}", flush=True)
        write_report(_ordered(kept + rows), args.out, command,
                     earlier + time.perf_counter() - t0, args.threads)
    print(f"wrote {args.out / 'coverage.md'} ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
