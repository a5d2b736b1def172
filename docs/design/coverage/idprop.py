"""Prototype: channel lineage by running data-movement ops on integer id tensors over a torch.export graph."""
import sys, time, warnings, operator, torch
sys.path.insert(0, '/tmp/i9'); warnings.filterwarnings("ignore")
torch.set_num_threads(2)
from dg_build import MODELS
sys.path.insert(0,'/tmp/i9'); import importlib.util as _u
_sp=_u.spec_from_file_location('misc_mod','/tmp/i9/misc_def.py'); _mm=_u.module_from_spec(_sp); _sp.loader.exec_module(_mm)
MODELS['misc']=(lambda: _mm.Misc(), lambda: torch.randn(1,3,8,8))
aten = torch.ops.aten
MOVE = {aten.view.default, aten.reshape.default, aten.permute.default, aten.transpose.int, aten.select.int,
        aten.unflatten.int, aten.flatten.using_ints, aten.squeeze.dim, aten.unsqueeze.default, aten.expand.default,
        aten.contiguous.default, aten.clone.default, aten.unbind.int, aten.repeat_interleave.self_int, aten.slice.Tensor,
        aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, operator.getitem,
        aten.pixel_shuffle.default, aten.alias.default, aten.repeat.default}
PASS = {aten.relu.default, aten.relu_.default, aten.hardswish_.default, aten.hardswish.default, aten.silu.default,
        aten.silu_.default, aten.gelu.default, aten.sigmoid.default, aten.hardsigmoid.default, aten.dropout.default,
        aten.dropout_.default, aten.batch_norm.default, aten.layer_norm.default, aten.group_norm.default}
ADD = {aten.add.Tensor, aten.add_.Tensor, aten.mul.Tensor, aten.sub.Tensor}
STAT = object()   # a per-token/per-sample statistic with no channel identity (norm denominators, attention scores)

def run(name):
    mk, inp = MODELS[name]; m = mk().eval(); x = inp()
    t0 = time.perf_counter()
    ep = torch.export.export(m, (x,), strict=False)
    t1 = time.perf_counter()
    sig = ep.graph_signature
    p2name = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    lin = {}      # node -> list of (src, ids) | STAT | None ; tuple results -> list of those
    report = []
    def L(a): return lin.get(a) if isinstance(a, torch.fx.Node) else None
    def val(a): return a.meta['val'] if isinstance(a, torch.fx.Node) else a
    def sub(a, ids_by_node):  # replace traced nodes by id tensors
        if isinstance(a, torch.fx.Node): return ids_by_node[a]
        if isinstance(a, (list, tuple)): return type(a)(sub(b, ids_by_node) for b in a)
        return a
    def fill(a): return torch.full(tuple(val(a).shape), -1, dtype=torch.long)
    def new_layer(n, src, dim):
        shp = tuple(n.meta['val'].shape); C = shp[dim]; v = [1]*len(shp); v[dim] = C
        return [(src, torch.arange(C).view(v).expand(shp))]
    for n in ep.graph.nodes:
        if n.op == 'placeholder':
            if n.name in p2name: lin[n] = None; continue
            v = n.meta['val']
            lin[n] = new_layer(n, 'input', 1) if v.is_floating_point() else None; continue
        if n.op != 'call_function': continue
        t = n.target; args = n.args
        if t in (aten.linear.default, aten.conv2d.default, aten.embedding.default, aten.conv_transpose2d.input):
            wnode = args[1] if t is not aten.embedding.default else args[0]
            lname = p2name.get(wnode.name, wnode.name).rsplit('.', 1)[0]
            if t is not aten.embedding.default:
                xl = L(args[0]); cdim = -1 if t is aten.linear.default else 1
                if xl is None or xl is STAT: report.append((lname, 'NO LINEAGE')); 
                else:
                    desc = []
                    for src, ids in xl:
                        f = ids.movedim(cdim, -1).reshape(-1, ids.shape[cdim])
                        ok = bool(((f == f[:1]) | (f[:1] < 0).expand_as(f) | (f < 0)).all())
                        g = f.max(0).values
                        nn_ = len(set(g[g >= 0].tolist())); rng = (int(g[g>=0].min()), int(g.max())) if (g>=0).any() else None
                        desc.append(f"{src}:{nn_}/{ids.shape[cdim]} ids{rng}{'' if ok else ' (NOT CONST)'}")
                    report.append((lname, ' + '.join(desc)))
            lin[n] = new_layer(n, lname, 1 if t in (aten.conv2d.default, aten.conv_transpose2d.input) else -1); continue
        if t in PASS: lin[n] = L(args[0]); continue
        if t in MOVE:
            xs = [a for a in n.all_input_nodes if isinstance(L(a), list)]
            if t is operator.getitem:
                src = L(args[0]); lin[n] = src[args[1]] if isinstance(src, tuple) else None; continue
            if not xs: lin[n] = STAT if any(L(a) is STAT for a in n.all_input_nodes) else None; continue
            res = []
            for xnode in xs:
                for src, ids in L(xnode):
                    idmap = {a: (ids if a is xnode else fill(a)) for a in n.all_input_nodes}
                    res.append((src, t(*sub(args, idmap), **n.kwargs)))
            if isinstance(res[0][1], (list, tuple)):
                lin[n] = tuple([(s, r[i]) for s, r in res] for i in range(len(res[0][1])))
            else: lin[n] = res
            continue
        if t is aten.cat.default:
            parts = args[0]; res = []
            for p in parts:
                for src, ids in (L(p) or []):
                    res.append((src, torch.cat([ids if q is p else fill(q) for q in parts], *args[1:])))
            lin[n] = res; continue
        if t in ADD:
            shp = tuple(n.meta['val'].shape); res = []
            for a in args[:2]:
                if isinstance(L(a), list): res += [(s, i.expand(shp)) for s, i in L(a)]
            lin[n] = res or (STAT if any(L(a) is STAT for a in args[:2]) else None); continue
        if t is aten.upsample_bilinear2d.vec:
            shp = tuple(n.meta['val'].shape); lin[n] = [(s_, i[..., :1, :1].expand(shp)) for s_, i in L(args[0])]; continue
        if t in (aten.mean.dim, aten.adaptive_avg_pool2d.default):
            xl = L(args[0]); shp = tuple(n.meta['val'].shape)
            if not isinstance(xl, list): lin[n] = xl; continue
            if t is aten.mean.dim:
                dims = [d % xl[0][1].dim() for d in args[1]]
                if any(d in (1,) and xl[0][1].dim() == 4 or (d == xl[0][1].dim()-1 and xl[0][1].dim() == 3) for d in dims):
                    lin[n] = STAT; continue   # reduction over the channel dim (RMSNorm statistic)
            lin[n] = [(s, i[tuple(slice(0, k) for k in shp)] if i.dim() == len(shp) else i) for s, i in xl]; continue
        if t in (aten.pow.Tensor_Scalar, aten.rsqrt.default):
            lin[n] = L(args[0]) if t is aten.pow.Tensor_Scalar else STAT; continue
        if t is aten.scaled_dot_product_attention.default:
            q, k, v = (L(a) for a in args[:3]); shp = tuple(n.meta['val'].shape)
            lin[n] = [(s, i[..., :1, :].expand(shp)) for s, i in v]; continue   # values' channels flow on
        if t is aten.matmul.default:
            a, b = L(args[0]), L(args[1]); shp = tuple(n.meta['val'].shape)
            if isinstance(b, list) and not isinstance(a, list):   # attn @ v
                lin[n] = [(s, i[..., :1, :].expand(shp)) for s, i in b]
            else: lin[n] = STAT                                  # q @ k^T: scores
            continue
        if t is aten.softmax.int: lin[n] = STAT if L(args[0]) is not None else None; continue
        raise NotImplementedError(f"{name}: {t} at {n.name}")
    t2 = time.perf_counter()
    print(f"== {name}: export {t1-t0:.2f}s, lineage {t2-t1:.2f}s, {len(report)} weight layers")
    return report

if __name__ == '__main__':
    for name in sys.argv[1:]:
        rep = run(name)
        for r in rep[:int(sys.argv[0:1] and 100)]:
            pass
        show = [r for r in rep]
        for lname, d in show[:14]: print(f"   {lname:45s} reads {d}")
        if len(show) > 14: print("   ...", *[f"{l}: {d}" for l, d in show[-3:]], sep='\n   ')
