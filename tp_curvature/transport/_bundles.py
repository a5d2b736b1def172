"""Array bundles passed to the Numba solvers (named tuples: heterogeneous tuples in nopython).

Each bundle groups the arrays of one role, so that the jitted functions take a few bundles
instead of dozens of positional arrays. Field names follow the engine's notation: ``z`` / ``w``
are the atoms of the pred / succ measures, ``x`` / ``y`` the endpoints of a connection.
"""
from __future__ import annotations

from collections import namedtuple

#: Ground costs of a prepared layer pair (union supports, possibly padded) and the shared
#: potentials: ``C`` (kz, kw) float64 and ``C32`` float32 block :math:`C_{zw}`, ``R`` reduced
#: costs :math:`C - f \oplus g \ge 0`, ``CT`` / ``CT64`` transposes of ``C32`` / ``C``,
#: ``czy`` (kz, n_y) and ``czyT`` its transpose, ``cxw`` (n_x, kw), ``dxy`` (n_x, n_y),
#: ``fz`` (kz,) / ``gw`` (kw,) the shared dual potentials.
Costs = namedtuple("Costs", "C C32 R CT CT64 czy czyT cxw dxy fz gw")

#: Compacted measures: row ``x`` of the pred side has ``pk[x]`` atoms at local indices
#: ``ploc[x, :pk[x]]`` with masses ``pm[x, :pk[x]]`` (sum 1; ``pk[x] == 0``: delta); the same
#: for the succ side (``sloc``, ``sm``, ``sk``).
Measures = namedtuple("Measures", "ploc pm pk sloc sm sk")

#: Stage kernels :math:`e^{-R/\varepsilon_s}` of the shared block (``Ks[s]`` (kz, kw), ``KsT[s]``
#: transposed) and ``KCT`` = :math:`(K \circ C)^\top` of the last stage (batched rounding).
Kernels = namedtuple("Kernels", "Ks KsT KCT")

#: Solver settings: ``eps`` stage eps (absolute; per level: (n_levels, n_stages) or one level:
#: (n_stages,)), ``tol`` per stage, ``max_iter`` per stage, over-relaxation ``omega``,
#: ``path`` (0 float32, 1 float64, 2 log domain), ``alpha``, ``uniform`` (shared supports),
#: ``warm`` (one-at-a-time problems start from the previous connection out of the same x),
#: ``finer`` (the bound above which a one-at-a-time problem continues at a finer eps: inf =
#: never), ``uvmax`` (a one-at-a-time float32 result is kept only if max(u) max(v) <= uvmax:
#: :data:`~._primitives.F32_UVMAX` for raw values, inf when the certificate checks each value),
#: ``bypass`` (take the bypass plan where it is optimal: :func:`~._primitives.bypass`).
Settings = namedtuple("Settings",
                      "eps tol max_iter omega path alpha uniform warm finer uvmax bypass")

#: Results written by the solvers, all (n_x, n_y): W1 (rounded-plan cost), iterations, status
#: code, and ``lower``, a weak-duality lower bound of the (trimmed) W1 (:func:`~._primitives.
#: dual_bound`; equal to ``out`` for closed forms).
Outputs = namedtuple("Outputs", "out iters status lower")

#: Augmented matrix :math:`\begin{pmatrix} \mathrm{block} & \mathrm{col} \\ \mathrm{row} &
#: \mathrm{corner} \end{pmatrix}` of one connection: block (kz, kw) over the shared atoms,
#: col (kz,) the y column, row (kw,) the x row, corner the (x, y) entry. Used for both the
#: kernel and the cost of a problem.
Augmented = namedtuple("Augmented", "block col row corner")

#: Per-problem constants of a batch (slot q): connection ``(xs[q], ys[q])``, masses ``A[q]`` /
#: ``Bw[q]`` of the shared atoms (x / y carry alpha), c-transform potentials ``FX[q]``, ``GY[q]``.
Slots = namedtuple("Slots", "xs ys A Bw FX GY")

#: Scalars of one connection: support sizes ``kz``, ``kw``, ``d = d(x, y)`` and the c-transform
#: potentials ``fx``, ``gy`` (a tuple of scalars: free to build per problem).
Conn = namedtuple("Conn", "kz kw d fx gy")

#: Float64 workspaces of a ragged problem's own row x / column y (built once per chunk, the
#: first kz / kw entries used): costs ``cz`` to y and shared potentials ``fz`` on its pred
#: atoms, costs ``cw`` from x and ``gw`` on its succ atoms.
Frame = namedtuple("Frame", "cz fz cw gw")

#: Kernel-domain workspace of one problem (built once per chunk, first kz+1 / kw+1 entries
#: used; float32, or float64 in the fallback): scalings ``u``, ``v``, kernel row x ``kxw``,
#: column y ``kzy``, products ``ktu``, ``kv``.
Work = namedtuple("Work", "u v kxw kzy ktu kv")

#: Gathering of a ragged problem's block from the stage kernels: ``on`` (else the stage kernel
#: is the block itself), local atoms ``zi`` / ``wi``, flat workspace ``Bws``.
Gather = namedtuple("Gather", "on zi wi Bws")

#: The other workspaces of a chunk: masses ``wa``, ``wb`` (float64) and ``wa32``, ``wb32``;
#: float32 costs ``cz32``, ``cw32``; rounding ``rx32``, ``cy32``, ``ec32``; cost block
#: ``Cws32`` (float32, rounding) and ``Cws64`` (float64, certificate).
#:
#: Bundles are built once per chunk and unpacked once per call: in Numba every array in a
#: bundle is reference-counted when the bundle is built or passed to a (not inlined) function,
#: so hot functions take small bundles.
Workspace = namedtuple("Workspace", "wa wb wa32 wb32 cz32 cw32 rx32 cy32 ec32 Cws32 Cws64")
