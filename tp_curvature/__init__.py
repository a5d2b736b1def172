"""tp-curvature: neural-curvature (Ollivier-Ricci) importance for Torch-Pruning.

Data flow, one module each: :mod:`~tp_curvature.calibration` (the data, streamed once through the exported model, gives
the statistics) -> :mod:`~tp_curvature.graph` (channel graph from torch.export + id lineage) ->
:mod:`~tp_curvature.curvature` (measures, shortest paths, transport problems) ->
:mod:`~tp_curvature.transport` (Numba Sinkhorn / exact POT solvers) ->
:mod:`~tp_curvature.importance` (channel scores for Torch-Pruning).
:mod:`~tp_curvature.unstructured` is the paper's per-weight mode on the same kernels (dense
element matrices for small models, sparse element graphs for e.g. the paper's VGG-9);
:mod:`~tp_curvature.element_importance` turns its per-weight kappa into channel scores.
:mod:`~tp_curvature.repair` refits the layers that read pruned channels (any criterion).
"""
from .config import CurvatureConfig
from .curvature import LayerCurvature, connection_curvature
from ._export import UnsupportedModelError
from .calibration import CalibrationError, UnvalidatedCurvatureWarning
from .graph import ChannelGraph
from .element_importance import ElementCurvatureImportance
from .importance import CurvatureImportance
from .problem import LayerPairProblem
from .repair import LeastSquaresRepair, RepairError, recalibrate_batchnorm
from .unstructured import prune_by_curvature, sparse_weight_curvature, weight_curvature

__all__ = ["CurvatureImportance", "connection_curvature", "CurvatureConfig", "LayerCurvature",
           "ChannelGraph", "LayerPairProblem", "UnsupportedModelError", "CalibrationError",
           "UnvalidatedCurvatureWarning", "weight_curvature", "prune_by_curvature",
           "sparse_weight_curvature", "ElementCurvatureImportance", "LeastSquaresRepair",
           "RepairError", "recalibrate_batchnorm"]
__version__ = "0.1.0"
