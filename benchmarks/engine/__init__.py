"""Benchmark engine: what the experiments need besides the method (not part of ``tp_curvature``).

Laid out like Torch-Pruning's ``reproduce/engine/``: the scripts in ``benchmarks/`` run with
``benchmarks/`` on ``sys.path`` (Python puts a script's folder there), so they import
``from engine import models, data, training, criteria``; the tests (``tests/benchmarks/``) get
the same path from ``[tool.pytest.ini_options] pythonpath`` in ``pyproject.toml``.

* :mod:`engine.registry`   the name -> factory registry filled by a decorator;
* :mod:`engine.models`     model zoo (MLP, LeNets, VGG-9s, CIFAR ResNets, a LLaMA-shaped
  decoder, timm), registered in ``MODELS``;
* :mod:`engine.data`       dataset loaders and calibration batches;
* :mod:`engine.training`   training / evaluation / fine-tuning with a checkpoint cache;
* :mod:`engine.presets`    curvature presets, command-line overrides, curvature criterion names;
* :mod:`engine.criteria`   the criteria (registered in ``CRITERIA``) and the score-every-group
  loop;
* :mod:`engine.peers`      the calibration-data peers (activation, Wanda-sp, FLAP) and FLAP's
  bias compensation;
* :mod:`engine.experiment` ``compare.py``'s experiment: seeds, scores, pruning sweep, stages;
* :mod:`engine.report`     ``summary.md``, ``accuracy.png`` and ``compare_report.py``'s tables;
* :mod:`engine.runs`       saved runs: rows / meta files, ``--report-only``, ``--add``;
* :mod:`engine.stats`      paired statistics over seeds;
* :mod:`engine.utils`      small helpers shared by the scripts.

Needs the ``bench`` extra (``pip install "tp-curvature[bench]"``).
"""
