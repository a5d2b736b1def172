import sys, warnings, torch
sys.path.insert(0, '/tmp/i9'); warnings.filterwarnings("ignore")
import torch_pruning as tp
from dg_build import MODELS
name = sys.argv[1]; mk, inp = MODELS[name]; m = mk().eval(); x = inp()
kw = {}
if name == 'llama':
    kw = dict(num_heads={l.self_attn.k_proj: 2 for l in m.layers} | {l.self_attn.v_proj: 2 for l in m.layers} | {l.self_attn.q_proj: 4 for l in m.layers},
              ignored_layers=[m.lm_head])
pr = tp.pruner.BasePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5, **kw)
print("pruner.DG:", type(pr.DG).__name__, "| attrs with DG:", [a for a in vars(pr) if 'DG' in a])
for g in pr.DG.get_all_groups(ignored_layers=pr.ignored_layers, root_module_types=pr.root_module_types):
    print("group._DG is pruner.DG:", g._DG is pr.DG)
    for i, it in enumerate(g):
        dep, idxs = it.dep, it.idxs
        ri = it.root_idxs
        print(f"  [{i}] {dep.handler.__name__:32s} {pr.DG._module2name.get(dep.target.module, str(dep.target.module))[:50]:50s} len={len(idxs)} idxs[:4]={list(idxs)[:4]} root[:4]={list(ri)[:4]}")
    if int(sys.argv[2]) <= 0: break
    sys.argv[2] = str(int(sys.argv[2]) - 1)
