"""BatchNorm recalibration: the running statistics re-estimated on calibration data."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from ..calibration import CalibrationData


def recalibrate_batchnorm(model: nn.Module, data, forward_fn: Optional[Callable] = None,
                          max_batches: Optional[int] = None) -> nn.Module:
    """Re-estimate the running mean and variance of every BatchNorm of ``model`` on ``data``
    (any form :class:`~tp_curvature.calibration.CalibrationData` accepts), as the cumulative
    average over the batches, then put every module back in its own train/eval mode.

    Only the BatchNorm layers run in train mode (dropout and the rest keep their mode);
    gradients are off; weights are not changed. A model without BatchNorm is returned as is.
    The standard cheap repair after pruning, and the step after
    :class:`~tp_curvature.repair.LeastSquaresRepair` on models with BatchNorm.

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> from tp_curvature import recalibrate_batchnorm
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> x = torch.randn(32, 3, 8, 8) * 3 + 1
    >>> _ = recalibrate_batchnorm(net, x)
    >>> y = net[0](x)
    >>> torch.allclose(net[1].running_mean, y.mean((0, 2, 3)), atol=1e-5), net.training
    (True, False)
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    data = CalibrationData(data, max_batches, forward_fn)
    saved = [(m, m.momentum, m.training) for m in bns]
    state = {id(m): (m.running_mean.clone(), m.running_var.clone(),
                     m.num_batches_tracked.clone()) for m in bns if m.track_running_stats}
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None                 # cumulative average over all batches
            m.train()
        with torch.no_grad():
            for batch in data:
                data.forward_fn(model, batch)
    except BaseException:
        for m in bns:                         # an error leaves the old statistics
            if id(m) in state:
                m.running_mean.copy_(state[id(m)][0])
                m.running_var.copy_(state[id(m)][1])
                m.num_batches_tracked.copy_(state[id(m)][2])
        raise
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    return model
