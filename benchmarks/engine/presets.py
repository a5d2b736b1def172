"""Curvature settings of the benchmark scripts: the library's presets, the command-line
overrides, and the grammar of the curvature criterion names.

Every curvature run starts from one of the library's presets (:data:`PRESETS`) and applies
what the command line gives (:class:`CurvatureOverrides`: ``--alpha``, ``--topk``, ``--backend``,
``--backend-options``; ``None`` keeps the preset's value). :func:`add_curvature_arguments` adds
those options (and ``--preset``) to a script's parser, :func:`config_from_args` builds the
:class:`~tp_curvature.CurvatureConfig`, and :func:`recipe` says how it was built, for the
results (``CurvatureConfig.paper(alpha=0.5) = CurvatureConfig(...)``: the preset call, then
``describe()`` of what ran).

Criterion names (``benchmarks/compare.py``), :data:`CURVATURE_GRAMMAR`: ``curvature`` is the
library default ``CurvatureConfig()``; modifiers appended with ``-`` apply in order
(:data:`MODIFIERS`): ``paper`` (first only: start from ``CurvatureConfig.paper()``), ``flow``
(``variant="flow"``), ``spread`` / ``meanabs`` (``node_value="std"`` / ``"mean_abs"``),
``consumer`` (importance ``sides="consumer"``), ``min`` / ``negsum`` (importance
``reduction="min"`` / ``"neg_sum"``). :func:`parse_curvature_name` reads one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Optional

from tp_curvature import CurvatureConfig

#: preset name -> the ``CurvatureConfig`` constructor (each takes field overrides as keywords)
PRESETS = {"default": CurvatureConfig, "paper": CurvatureConfig.paper,
           "element": CurvatureConfig.element}
BACKENDS = ("sinkhorn", "exact", "pot-sinkhorn")

CURVATURE_GRAMMAR = "curvature[-paper][-flow][-spread|-meanabs][-consumer][-min|-negsum]"
#: name modifier -> (the option it sets, its value); ``paper`` picks the preset instead
MODIFIERS = {"flow": ("variant", "flow"), "spread": ("node_value", "std"),
             "meanabs": ("node_value", "mean_abs"), "consumer": ("sides", "consumer"),
             "min": ("reduction", "min"), "negsum": ("reduction", "neg_sum")}
#: options of ``CurvatureImportance`` itself (the others are ``CurvatureConfig`` fields)
IMPORTANCE_OPTIONS = {"reduction": "mean", "sides": "both"}


def _kwargs(items) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in items)


def preset_call(preset: str, changes: dict = None, **preset_kwargs) -> str:
    """``CurvatureConfig()``, ``CurvatureConfig.paper(alpha=0.5)``, ...: how a config is built."""
    head = "CurvatureConfig" + ("" if preset == "default" else f".{preset}")
    return f"{head}({_kwargs([*preset_kwargs.items(), *(changes or {}).items()])})"


# ============================================================================================
# command-line overrides
# ============================================================================================
@dataclass(frozen=True)
class CurvatureOverrides:
    """What the command line sets over a preset (``None``: the preset's value)."""
    alpha: Optional[float] = None
    topk: Optional[int] = None              # 0: untruncated measures (``topk=None``)
    backend: Optional[str] = None
    backend_options: Optional[object] = None  # JSON text or a dict

    @classmethod
    def from_args(cls, args) -> "CurvatureOverrides":
        """The overrides of an argparse namespace (missing attributes: not overridden)."""
        return cls(**{f.name: getattr(args, f.name, None) for f in fields(cls)})

    def changes(self) -> dict:
        """The ``CurvatureConfig`` fields these overrides set."""
        out = {}
        if self.alpha is not None:
            out["alpha"] = self.alpha
        if self.topk is not None:
            out["topk"] = self.topk or None
        if self.backend is not None:
            out["backend"] = self.backend
        if self.backend_options:
            opts = self.backend_options
            out["backend_options"] = json.loads(opts) if isinstance(opts, str) else dict(opts)
        return out


def add_curvature_arguments(parser, preset: Optional[str] = "default",
                            presets=("default", "paper"), solver: bool = True) -> None:
    """``--preset`` (choices ``presets``, default ``preset``; none when ``preset`` is None:
    the caller picks the presets) and the overrides ``--alpha``, ``--topk`` and, with
    ``solver``, ``--backend`` and ``--backend-options``."""
    if preset is not None:
        parser.add_argument("--preset", choices=presets, default=preset,
                            help="the library preset the curvature starts from: "
                                 + ", ".join(f"{p} = {preset_call(p)}" for p in presets)
                                 + " (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=None, help="default: the preset's")
    parser.add_argument("--topk", type=int, default=None,
                        help="atoms kept per measure (0: all); default: the preset's")
    if solver:
        parser.add_argument("--backend", default=None, choices=BACKENDS,
                            help="transport solver; default: the preset's")
        parser.add_argument("--backend-options", default=None,
                            help='JSON, e.g. \'{"eps": 0.02}\'; default: the preset\'s')


OVERRIDES_TITLE = ("curvature (overrides every curvature criterion; default: each criterion's "
                   "preset)")


def add_repair_arguments(group, refit: str = "the lsq stages") -> None:
    """``--repair-ridge`` and ``--repair-independent`` of a comparison whose ``refit`` (its
    words for what uses ``LeastSquaresRepair``) takes the library's defaults otherwise."""
    group.add_argument("--repair-ridge", type=float, default=None,
                       help=f"relative ridge of {refit} (default: the library's for the "
                            "refit used, tp_curvature.repair.DEFAULT_RIDGE)")
    group.add_argument("--repair-independent", action="store_true",
                       help=f"{refit}: refit each layer on the unpruned model's inputs "
                            "(default: the library's sequential refit, layer after layer on "
                            "the repaired pruned model's inputs)")


def parse_comparison_args(parser, sections, apply_defaults, argv=None):
    """A comparison's command line: the ``sections`` (each adds its arguments to ``parser``),
    the curvature overrides of every curvature criterion, then ``apply_defaults(args)``;
    ``--ratios`` must lie in (0, 1)."""
    for add in sections:
        add(parser)
    add_curvature_arguments(parser.add_argument_group(OVERRIDES_TITLE), preset=None)
    args = parser.parse_args(argv)
    apply_defaults(args)
    if any(not 0.0 < r < 1.0 for r in args.ratios):
        parser.error("--ratios must lie in (0, 1)")
    return args


def config_from_args(args, preset: Optional[str] = None, **preset_kwargs) -> CurvatureConfig:
    """``PRESETS[preset or args.preset](**preset_kwargs)`` with the command line's overrides."""
    changes = CurvatureOverrides.from_args(args).changes()
    return PRESETS[preset or args.preset](**preset_kwargs, **changes)


def recipe(args, preset: Optional[str] = None, **preset_kwargs) -> str:
    """How :func:`config_from_args` builds its config and what it is:
    ``CurvatureConfig.paper(alpha=0.5) = CurvatureConfig(variant='paper', ...)``."""
    preset = preset or args.preset
    changes = CurvatureOverrides.from_args(args).changes()
    config = config_from_args(args, preset, **preset_kwargs)
    return f"{preset_call(preset, changes, **preset_kwargs)} = {config.describe()}"


# ============================================================================================
# curvature criterion names
# ============================================================================================
@dataclass(frozen=True)
class CurvatureName:
    """A parsed curvature criterion name: the preset, the config fields its modifiers set
    (in order) and the importance options (``reduction``, ``sides``)."""
    name: str
    preset: str = "default"
    config_changes: tuple = ()
    reduction: str = "mean"
    sides: str = "both"

    def config(self, overrides: CurvatureOverrides = CurvatureOverrides()) -> CurvatureConfig:
        """The preset, then the modifiers, then the command line's overrides."""
        return PRESETS[self.preset](**self.changes(overrides))

    def changes(self, overrides: CurvatureOverrides) -> dict:
        return {**dict(self.config_changes), **overrides.changes()}

    def note(self, overrides: CurvatureOverrides = CurvatureOverrides()) -> str:
        """``CurvatureConfig.paper(alpha=0.5) = CurvatureConfig(...); reduction=mean,
        sides=both``: what runs, for meta.json / summary.md."""
        return (f"{preset_call(self.preset, self.changes(overrides))} = "
                f"{self.config(overrides).describe()}; reduction={self.reduction}, "
                f"sides={self.sides}")


def parse_curvature_name(name: str) -> CurvatureName:
    """Read ``curvature[-paper][-modifier...]`` (see :data:`CURVATURE_GRAMMAR`); a
    ``ValueError`` names an unknown, misplaced or conflicting modifier."""
    parts = name.strip().lower().split("-")
    if parts[0] != "curvature":
        raise ValueError(f"{name!r} is not a curvature criterion ({CURVATURE_GRAMMAR})")
    preset, mods = "default", parts[1:]
    if mods and mods[0] == "paper":
        preset, mods = "paper", mods[1:]
    config, options = {}, dict(IMPORTANCE_OPTIONS)
    seen: dict = {}
    for m in mods:
        if m not in MODIFIERS:
            where = "must come first" if m == "paper" else "is unknown"
            raise ValueError(f"curvature modifier {m!r} in {name!r} {where}; the names are "
                             f"{CURVATURE_GRAMMAR} (modifiers: paper, {', '.join(MODIFIERS)})")
        key, value = MODIFIERS[m]
        if key in seen:
            raise ValueError(f"curvature modifiers {seen[key]!r} and {m!r} in {name!r} both set "
                             f"{key}")
        seen[key] = m
        (options if key in options else config)[key] = value
    return CurvatureName(name.strip().lower(), preset, tuple(config.items()), **options)
