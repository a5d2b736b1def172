"""``CurvatureConfig``: every knob of the curvature definition and its solver, in one place.

The library default is ``CurvatureConfig()``. The named presets are the other definitions the
library and its benchmarks use; each is a classmethod taking the same fields as overrides:

===========================  ===================================================================
preset                       definition
===========================  ===================================================================
``CurvatureConfig()``        the library default for channels: ``variant="flow"`` (activations in
                             the lengths and measures), ``node_value="std"`` (the activation's
                             spread), ``alpha=0.5``, ``topk=32``
``CurvatureConfig.paper()``  the paper's definition (Tan et al., TMLR 2026): ``variant="paper"``
                             (lengths ``1/|w|``, measures ``exp(-1/a^2)``),
                             ``node_value="mean_abs"``, ``alpha=0.9`` (their scripts), untruncated
                             measures (``topk=None``)
``CurvatureConfig.element()`` the per-weight mode's default: :meth:`paper` with ``topk=32``
                             (dense element matrices) or ``topk=8`` (``sparse=True``: sparse
                             element graphs, where a conv's measures have hundreds of atoms)
===========================  ===================================================================

Examples
--------
>>> from tp_curvature import CurvatureConfig
>>> CurvatureConfig().variant, CurvatureConfig().node_value
('flow', 'std')
>>> cfg = CurvatureConfig.paper(topk=16)
>>> cfg.length, cfg.measure, cfg.alpha, cfg.topk
('weight', 'activation', 0.9, 16)
>>> CurvatureConfig.element(sparse=True).topk
8
>>> CurvatureConfig(alpha=1.0)
Traceback (most recent call last):
...
ValueError: alpha must be a number in [0, 1), got 1.0
"""
from __future__ import annotations

import dataclasses
import warnings
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

#: ``variant`` -> (``length``, ``measure``)
VARIANTS = {"paper": ("weight", "activation"), "flow": ("flow", "flow")}
LENGTHS = ("weight", "flow")
MEASURES = ("activation", "flow")
NORMALIZE_MODES = ("minmax", "max")
#: node values: the mean |activation| (the paper) or its spread over images and positions
NODE_VALUES = ("mean_abs", "std")

_PAPER = dict(variant="paper", node_value="mean_abs", alpha=0.9, topk=None)
#: ``topk`` of the per-weight mode (dense element matrices / sparse element graphs)
ELEMENT_TOPK = {False: 32, True: 8}


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _transport():
    """The solver subpackage, imported on first use (it pulls in POT and the Numba kernels)."""
    from . import transport
    return transport


def solver_keywords() -> frozenset:
    """The keyword options the transport solver ``solve_w1`` takes (``backend_options``)."""
    params = inspect.signature(_transport().solve_w1).parameters.values()
    return frozenset(q.name for q in params if q.kind == q.KEYWORD_ONLY)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


@dataclass
class CurvatureConfig:
    """Every knob of the curvature definition and its solver, checked when it is built
    (``ValueError`` naming the option and its accepted values).

    Parameters
    ----------
    alpha : float in [0, 1)
        The mass a measure keeps at its centre: 0 puts it all on the neighbours (kappa <= 1);
        1 is excluded (kappa has a factor ``1/(1 - alpha)``).
    variant : {"flow", "paper"} or None
        A consistent pair of ``length`` and ``measure`` (see :mod:`tp_curvature.curvature`).
    length : {"weight", "flow"}, optional
        Overrides the variant's lengths: ``1/|w|`` or ``1/(a_u |w|)``.
    measure : {"activation", "flow"}, optional
        Overrides the variant's measures: ``exp(-1/a^2)`` or ``a |w|``.
    p : float > 0, finite
        The norm of a kernel slice (a very large p, above ~50, can underflow small weights to
        a zero strength: keep p <= 10).
    normalize : {"minmax", "max"}
        Per-junction normalisation of the node values.
    node_value : {"std", "mean_abs"}
        The activation's spread over images and positions, or its mean |activation| (the
        paper); see :mod:`tp_curvature.calibration`.
    topk : int or None
        Keep each measure's ``k`` heaviest atoms (renormalised); None keeps all.
    backend : {"sinkhorn", "exact", "pot-sinkhorn"}
        The transport solver (:func:`tp_curvature.transport.solve_w1`).
    backend_options : dict
        Keyword arguments of ``solve_w1`` (``eps``, ``tol``, ``kappa_tol``, ...).
    """
    alpha: float = 0.5
    variant: Optional[str] = "flow"
    length: Optional[str] = None
    measure: Optional[str] = None
    p: float = 2.0
    normalize: str = "minmax"
    node_value: str = "std"
    topk: Optional[int] = 32
    backend: str = "sinkhorn"
    backend_options: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ presets
    @classmethod
    def paper(cls, **overrides) -> "CurvatureConfig":
        """The paper's definition: ``variant="paper"``, ``node_value="mean_abs"``,
        ``alpha=0.9``, ``topk=None`` (each field can be overridden)."""
        return cls(**{**_PAPER, **overrides})

    @classmethod
    def element(cls, sparse: bool = False, **overrides) -> "CurvatureConfig":
        """The per-weight mode's default: :meth:`paper` with ``topk=32`` (dense element
        matrices) or ``topk=8`` (``sparse=True``)."""
        return cls.paper(**{"topk": ELEMENT_TOPK[bool(sparse)], **overrides})

    def replace(self, **changes) -> "CurvatureConfig":
        """A copy with some fields changed (a new ``variant`` re-derives ``length`` and
        ``measure`` unless they are given too)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if "variant" in changes:
            fields["length"] = fields["measure"] = None
        return type(self)(**{**fields, **changes})

    def describe(self) -> str:
        """The fields that differ from the library default, as ``CurvatureConfig(...)``."""
        default = CurvatureConfig()
        diff = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)]
        return f"CurvatureConfig({', '.join(diff)})"

    # ------------------------------------------------------------------ checks
    def __post_init__(self):
        if self.variant is not None:
            _choice("variant", self.variant, tuple(VARIANTS))
        base = VARIANTS[self.variant or "flow"]
        self.length = self.length or base[0]
        self.measure = self.measure or base[1]
        _choice("length", self.length, LENGTHS)
        _choice("measure", self.measure, MEASURES)
        if not (_is_real(self.alpha) and 0.0 <= self.alpha < 1.0):
            raise ValueError(f"alpha must be a number in [0, 1), got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if not (_is_real(self.p) and math.isfinite(self.p) and self.p > 0):
            raise ValueError(f"p (the norm of a kernel slice) must be a finite number > 0, got "
                             f"{self.p!r}")
        self.p = float(self.p)
        _choice("normalize", self.normalize, NORMALIZE_MODES)
        _choice("node_value", self.node_value, NODE_VALUES)
        if self.topk is not None and (isinstance(self.topk, bool)
                                      or not isinstance(self.topk, numbers.Integral)
                                      or self.topk < 1):
            raise ValueError(f"topk must be a positive int or None, got {self.topk!r}")
        if self.topk is not None:
            self.topk = int(self.topk)
        _choice("backend", self.backend, _transport().BACKENDS)
        self._check_backend_options()

    def _check_backend_options(self) -> None:
        if self.backend_options is not None and not isinstance(self.backend_options, dict):
            raise ValueError(f"backend_options must be a dict of solve_w1 keywords, got "
                             f"{type(self.backend_options).__name__}")
        self.backend_options = dict(self.backend_options or {})
        if self.backend_options:
            known = solver_keywords()
            bad = sorted(set(self.backend_options) - known)
            if bad:
                raise ValueError(f"backend_options has unknown keys {bad}; solve_w1 takes "
                                 f"{sorted(known)}")


def resolve_config(config: Optional[CurvatureConfig], fields: dict) -> CurvatureConfig:
    """``config``, or ``CurvatureConfig(**fields)`` when it is None; passing both is a
    ``TypeError`` (so is a ``config`` that is not a :class:`CurvatureConfig`)."""
    if config is None:
        return CurvatureConfig(**fields)
    if not isinstance(config, CurvatureConfig):
        raise TypeError(f"config must be a CurvatureConfig, got {type(config).__name__}; "
                        "pass CurvatureConfig fields as keywords instead")
    if fields:
        raise TypeError(f"pass either config=CurvatureConfig(...) or its fields as keywords, "
                        f"not both (got config and {sorted(fields)})")
    return config


def renamed_keyword(old: str, old_value, new: str, new_value):
    """The value of a keyword renamed from ``old`` to ``new``: ``new_value``, or the value
    passed under the old name (with a ``DeprecationWarning``)."""
    if old_value is None:
        return new_value
    warnings.warn(f"the keyword {old}= is deprecated; use {new}= (same values)",
                  DeprecationWarning, stacklevel=3)
    return old_value
