import sys, warnings, torch
sys.path.insert(0, '/tmp/i9'); warnings.filterwarnings("ignore")
import torch_pruning as tp
from torch_pruning import ops
from dg_build import MODELS
T = ops.OPTYPE
WEIGHT = (T.CONV, T.LINEAR, T.DEPTHWISE_CONV, T.MHA, T.EMBED)

def shape(n, i=0):
    try: return tuple(n.grad_fn._input_metadata[i].shape)
    except Exception: return None

def saved(n):
    g = n.grad_fn; out = {}
    for a in dir(g):
        if a.startswith('_saved_') and not a.startswith(('_saved_self', '_saved_other', '_saved_result', '_saved_mat', '_saved_weight', '_saved_input', '_saved_bias', '_saved_query','_saved_key','_saved_value','_saved_output','_saved_log','_saved_mean','_saved_invstd','_saved_philox','_saved_cum','_saved_grad','_saved_attn','_saved_running','_saved_rstd','_saved_indices', '_saved_exponent', '_saved_scale')):
            try: out[a[7:]] = getattr(g, a)
            except Exception: pass
        if a in ('_saved_self_sym_sizes', '_saved_dim'): out[a[7:]] = getattr(g, a)
    return out

def label(DG, n):
    nm = DG._module2name.get(n.module, None)
    g = n.grad_fn.name() if hasattr(n.grad_fn, 'name') else type(n.grad_fn).__name__
    return f"{n.type.name}[{nm or g}]" + (f"<{g}>" if nm else '')

def im(dep):
    f = [type(x).__name__ + (f"(stride={x._stride},rev={x.reverse})" if hasattr(x,'_stride') else f"({getattr(x,'offset','')},rev={x.reverse})") for x in dep.index_mapping if x is not None]
    return ' IM=' + ','.join(f) if f else ''

def walk(DG, module, max_nodes=40):
    """downstream of `module` until the next weight nodes"""
    start = DG.module2node[module]; seen = {start}; q = [start]; k = 0
    while q and k < max_nodes:
        n = q.pop(0); k += 1
        ins = ', '.join(label(DG, i) for i in n.inputs)
        print(f"  {label(DG, n)} shape={shape(n)} saved={saved(n)}\n      <- [{ins}]")
        for dep in n.dependencies:
            if dep.target in n.outputs and im(dep): print(f"      dep {label(DG,n)} -> {label(DG,dep.target)}{im(dep)}")
        for o in n.outputs:
            if o not in seen and (o.type not in WEIGHT or o is start):
                seen.add(o); q.append(o)
            elif o.type in WEIGHT and o not in seen:
                seen.add(o); print(f"  ==> reaches {label(DG, o)} shape_out={shape(o)}")

if __name__ == '__main__':
    name, path = sys.argv[1], sys.argv[2]
    mk, inp = MODELS[name]; m = mk().eval(); x = inp()
    DG = tp.DependencyGraph().build_dependency(m, x, verbose=False)
    mod = m.get_submodule(path)
    print(f"### {name}: downstream of {path} ({type(mod).__name__})")
    walk(DG, mod, int(sys.argv[3]) if len(sys.argv) > 3 else 40)
