"""tp-curvature: neural-curvature (Ollivier-Ricci) importance for Torch-Pruning.

Data flow, one module each: :mod:`~tp_curvature.hooks` (calibration statistics) ->
:mod:`~tp_curvature.graph` (channel graph traced with torch.fx) ->
:mod:`~tp_curvature.curvature` (measures, shortest paths, transport problems) ->
:mod:`~tp_curvature.kernels` (Numba Sinkhorn / exact POT solvers) ->
:mod:`~tp_curvature.importance` (channel scores for Torch-Pruning).
"""
from .curvature import CurvatureConfig, LayerCurvature, connection_curvature
from .graph import ChannelGraph, UnsupportedModelError
from .hooks import CalibrationError
from .importance import CurvatureImportance
from .problem import LayerPairProblem

__all__ = ["CurvatureImportance", "connection_curvature", "CurvatureConfig", "LayerCurvature",
           "ChannelGraph", "LayerPairProblem", "UnsupportedModelError", "CalibrationError"]
__version__ = "0.1.0"
