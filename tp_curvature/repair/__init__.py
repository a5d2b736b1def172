"""Least-squares repair of pruned models (any Torch-Pruning pruner and importance).

:class:`LeastSquaresRepair` refits every layer whose input channels a pruner removed, from the
second moments of its input on calibration data (``_statistics``: the observer of the
calibration pass; ``_replay``: which channels each layer kept, from the pruner's history;
``_solve``: the ridge least squares; ``_sequential``: the layer-by-layer variant);
:func:`recalibrate_batchnorm` re-estimates BatchNorm statistics afterwards.
"""
from ._batchnorm import recalibrate_batchnorm
from ._repair import DEFAULT_MAX_GRAM_BYTES, DEFAULT_RIDGE, LeastSquaresRepair, RepairError

__all__ = ["LeastSquaresRepair", "RepairError", "recalibrate_batchnorm", "DEFAULT_RIDGE",
           "DEFAULT_MAX_GRAM_BYTES"]
