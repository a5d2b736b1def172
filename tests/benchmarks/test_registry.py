"""engine.registry (the decorator registry), the registries it fills (models, criteria), the
curvature criterion names of engine.presets, and the stage registry of engine.experiment."""
import argparse

import compare  # benchmarks/compare.py: benchmarks/ is on pytest's pythonpath (pyproject.toml)
import pytest
import torch
import train
from engine import experiment, report
from engine.criteria import CRITERIA, make_criterion
from engine.models import MODELS, build_model
from engine.presets import (CurvatureOverrides, config_from_args, parse_curvature_name, recipe)
from engine.registry import Registry
from tp_curvature import CurvatureConfig, CurvatureImportance


# ----------------------------------------------------------------------------- Registry
def test_registry_register_get_names_and_help():
    reg = Registry("widget")

    @reg.register("Plain", help="a plain entry")
    def plain(x=1):
        return ("plain", x)

    @reg.register("fam:<name>", prefix="fam:", help="every fam:<name>")
    def family(name, x=1):
        return (name, x)

    @reg.register("fam:special", help="wins over the family")
    def special():
        return "special"

    assert reg.get(" plain ") is plain                     # normalised lookup
    assert reg.get("fam:Abc")(x=2) == ("fam:Abc", 2)       # the family gets the full name
    assert reg.get("fam:special")() == "special"
    assert reg.names() == ["Plain", "fam:special", "fam:<name>"]
    assert "fam:anything" in reg and "nope" not in reg
    text = reg.help()
    assert "Plain" in text and "a plain entry" in text and "fam:<name>" in text
    with pytest.raises(ValueError, match=r"unknown widget 'nope'; choose one of Plain, "):
        reg.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("plain")(plain)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("fam:<x>", prefix="FAM:")(family)


def test_model_registry_holds_every_builder():
    assert MODELS.names() == ["mlp", "lenet5", "paper_lenet", "vgg9", "paper_vgg9", "resnet20",
                              "resnet56", "llama", "timm:<name>"]
    assert isinstance(build_model("Paper-LeNet", 10, 1, 28), torch.nn.Module)  # - and case
    with pytest.raises(ValueError, match="unknown model 'alexnet'; choose one of mlp, "):
        build_model("alexnet")


def test_llama_decoder_defaults_and_attributes():
    torch.manual_seed(0)
    m = build_model("llama")
    assert sum(p.numel() for p in m.parameters()) == 86848
    assert len(m.layers) == 2 and m.embed_tokens.num_embeddings == 100
    a = m.layers[0].self_attn
    assert (a.n_heads, a.n_kv_heads, a.head_dim) == (4, 2, 16)
    assert m.layers[0].mlp.gate_proj.out_features == 128
    ids = torch.randint(0, 100, (2, 5))
    out = m(ids)
    assert out.shape == (2, 5, 100)
    # causal: the first token's logits do not depend on the later tokens
    ids2 = ids.clone()
    ids2[:, 1:] = (ids2[:, 1:] + 1) % 100
    torch.testing.assert_close(m(ids2)[:, 0], out[:, 0])
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        build_model("llama", n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize("script", [compare.parse_args, train.parse_args])
def test_help_lists_the_registered_models_and_criteria(script, capsys):
    with pytest.raises(SystemExit):
        script(["--help"])
    text = capsys.readouterr().out
    for name in MODELS.names():
        assert f"\n  {name} " in text, name
    if script is compare.parse_args:
        for name in CRITERIA.names():
            assert f"\n  {name}" in text, name
        for stage in experiment.STAGES:
            assert f"\n  {stage} " in text, stage


# ----------------------------------------------------------------------------- names
README_NAMES = {   # new name -> (preset config, reduction, sides)
    "curvature": (CurvatureConfig(), "mean", "both"),
    "curvature-paper": (CurvatureConfig.paper(), "mean", "both"),
    "curvature-consumer": (CurvatureConfig(), "mean", "consumer"),
    "curvature-meanabs": (CurvatureConfig(node_value="mean_abs"), "mean", "both"),
    "curvature-paper-spread": (CurvatureConfig.paper(node_value="std"), "mean", "both"),
    "curvature-paper-consumer": (CurvatureConfig.paper(), "mean", "consumer"),
    "curvature-meanabs-consumer": (CurvatureConfig(node_value="mean_abs"), "mean", "consumer"),
    "curvature-paper-flow": (CurvatureConfig.paper(variant="flow"), "mean", "both"),
    "curvature-min": (CurvatureConfig(), "min", "both"),
    "curvature-paper-negsum": (CurvatureConfig.paper(), "neg_sum", "both"),
}


@pytest.mark.parametrize("name", list(README_NAMES))
def test_curvature_names_build_their_preset(name):
    config, reduction, sides = README_NAMES[name]
    crit = make_criterion(name, 0)
    imp = crit.importance
    assert isinstance(imp, CurvatureImportance) and crit.name == name
    assert imp.config == config and (imp.reduction, imp.sides) == (reduction, sides)
    assert config.describe() in crit.note
    assert crit.note.endswith(f"reduction={reduction}, sides={sides}")
    assert crit.note.startswith("CurvatureConfig.paper(" if "paper" in name
                                else "CurvatureConfig(")


def test_old_names_map_to_the_new_ones():
    """The first release's names (alpha 0.5 and topk 32 from the command line) and their
    new spelling run the same definition."""
    cli = argparse.Namespace(alpha=0.5, topk=32, backend=None, backend_options=None)
    old_paper = CurvatureConfig(alpha=0.5, variant="paper", node_value="mean_abs", topk=32)
    assert make_criterion("curvature-paper", 0, cli).importance.config == old_paper
    old_flow_spread_consumer = make_criterion("curvature-consumer", 0, cli).importance
    assert old_flow_spread_consumer.config == CurvatureConfig(variant="flow", node_value="std")
    assert make_criterion("curvature-meanabs", 0, cli).importance.config == \
        CurvatureConfig(variant="flow", node_value="mean_abs")
    assert make_criterion("curvature-paper-spread", 0, cli).importance.config == \
        CurvatureConfig(variant="paper", node_value="std")


def test_command_line_overrides_every_curvature_criterion():
    cli = argparse.Namespace(alpha=0.3, topk=0, backend="exact",
                             backend_options='{"tol": 1e-6}')
    assert CurvatureOverrides.from_args(cli).changes() == {
        "alpha": 0.3, "topk": None, "backend": "exact", "backend_options": {"tol": 1e-6}}
    for name in ("curvature", "curvature-paper-spread"):
        cfg = make_criterion(name, 0, cli).importance.config
        assert (cfg.alpha, cfg.topk, cfg.backend, cfg.backend_options) == \
            (0.3, None, "exact", {"tol": 1e-6})
    element = make_criterion("curvature-element", 0, cli)
    assert element.importance.config == CurvatureConfig.element(
        sparse=True, alpha=0.3, topk=None, backend="exact", backend_options={"tol": 1e-6})
    assert "CurvatureConfig.element(sparse=True, alpha=0.3" in element.note
    # no override: each criterion keeps its preset's values
    assert make_criterion("curvature-element", 0).importance.config == \
        CurvatureConfig.element(sparse=True)


@pytest.mark.parametrize("name,match", [
    ("curvature-foo", "modifier 'foo' in 'curvature-foo' is unknown"),
    ("curvature-flow-paper", "modifier 'paper' in 'curvature-flow-paper' must come first"),
    ("curvature-spread-meanabs", "'spread' and 'meanabs' .* both set node_value"),
    ("curvature-min-negsum", "both set reduction"),
])
def test_bad_curvature_names_are_clear_errors(name, match):
    with pytest.raises(ValueError, match=match):
        parse_curvature_name(name)
    with pytest.raises(ValueError, match=match):
        make_criterion(name, 0)


def test_script_presets_and_recipe():
    args = argparse.Namespace(preset="paper", alpha=0.5, topk=None, backend=None,
                              backend_options=None)
    assert config_from_args(args) == CurvatureConfig.paper(alpha=0.5)
    assert recipe(args) == ("CurvatureConfig.paper(alpha=0.5) = "
                            + CurvatureConfig.paper(alpha=0.5).describe())
    args.preset = "default"
    assert recipe(args).startswith("CurvatureConfig(alpha=0.5) = CurvatureConfig(")


# ----------------------------------------------------------------------------- stages
def _plan(wanted, has_bn, can_finetune):
    return [(p.stage.name, p.evaluated, p.parent)
            for p in experiment.stage_plan(set(wanted), has_bn, can_finetune)]


def test_stage_plan_follows_todays_semantics():
    every = list(experiment.STAGES)
    assert every == ["pruned", "bias", "bn", "bias+bn", "lsq", "lsq+bn", "ft"]
    assert _plan(every, True, True) == [
        ("pruned", True, None), ("bias", True, None), ("bn", True, "pruned"),
        ("bias+bn", True, "bias"), ("lsq", True, None), ("lsq+bn", True, "lsq"),
        ("ft", True, "bn")]
    # no BatchNorm: no bn stages, the fine-tune starts from the pruned copy
    assert _plan(every, False, True) == [("pruned", True, None), ("bias", True, None),
                                         ("lsq", True, None), ("ft", True, "pruned")]
    # lsq+bn without lsq: the repaired copy is made, not evaluated
    assert _plan(["lsq+bn"], True, False) == [("pruned", True, None), ("lsq", False, None),
                                              ("lsq+bn", True, "lsq")]
    # bn not asked for: the fine-tune starts from the pruned copy, BN untouched
    assert _plan(["ft"], True, True) == [("pruned", True, None), ("ft", True, "pruned")]
    # bias+bn without bias: the bias-compensated copy is made, not evaluated
    assert _plan(["bias+bn"], True, False) == [("pruned", True, None), ("bias", False, None),
                                               ("bias+bn", True, "bias")]


def test_a_registered_stage_gets_a_column_a_plan_entry_and_a_table(monkeypatch):
    """What adding a stage (as ``lsq`` was) takes: one function, one registration."""
    monkeypatch.setattr(experiment, "STAGES", dict(experiment.STAGES))
    monkeypatch.setattr(report, "STAGES", experiment.STAGES)

    @experiment.register_stage("demo+bn", "after a test repair", parents=("pruned",))
    def repaired(run, model):
        return model

    assert experiment.stage_col("demo+bn") == "acc_demo_bn"
    assert "acc_demo_bn" in experiment.row_fields()
    assert ("demo+bn", True, "pruned") in _plan(["demo+bn"], False, False)
    assert "repaired (bias, bn, bias+bn, lsq, lsq+bn, demo+bn)" in report.stage_groups()
    rows = [{"criterion": c, "mode": "uniform", "ratio": 0.5, "seed": 0, "acc_pruned": 0.5,
             "acc_demo_bn": 0.7, "macs_kept": 0.5, "params_kept": 0.5} for c in ("l2", "wanda")]
    ax = report.Axes.of(rows)
    assert ax.stages == ["pruned", "demo+bn"]
    assert "## uniform pruning, accuracy after a test repair" in \
        "\n".join(report._accuracy_table(rows, ax, "uniform", "demo+bn"))
    with pytest.raises(ValueError, match="register its parents"):
        experiment.register_stage("orphan", "x", parents=("nowhere",))(repaired)
