"""Benchmark engine: what the experiments need besides the method (not part of ``tp_curvature``).

Laid out like Torch-Pruning's ``reproduce/engine/``: the scripts in ``benchmarks/`` run with
``benchmarks/`` on ``sys.path`` (Python puts a script's folder there), so they import
``from engine import models, data, training, criteria``; the tests get the same path from
``[tool.pytest.ini_options] pythonpath`` in ``pyproject.toml``.

* :mod:`engine.models`   model zoo (MLP, LeNet-5, the paper's LeNet, VGG-9, CIFAR ResNets, timm);
* :mod:`engine.data`     dataset loaders and calibration batches;
* :mod:`engine.training` training / evaluation / fine-tuning with a checkpoint cache;
* :mod:`engine.criteria` the baseline criteria and the score-every-group loop;
* :mod:`engine.utils`    small report helpers shared by the scripts.

Needs the ``bench`` extra (``pip install "tp-curvature[bench]"``).
"""
