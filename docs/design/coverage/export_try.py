import sys, time, collections, warnings, torch
sys.path.insert(0, '/tmp/i9'); warnings.filterwarnings("ignore")
torch.set_num_threads(2)
from dg_build import MODELS
for name in (sys.argv[1:] or MODELS):
    mk, inp = MODELS[name]; m = mk().eval(); x = inp()
    t = time.perf_counter()
    try:
        ep = torch.export.export(m, (x,), strict=False)
    except Exception as e:
        print(f"== {name}: export FAILED {type(e).__name__}: {str(e)[:300]}"); continue
    dt = time.perf_counter() - t
    c = collections.Counter(str(n.target) for n in ep.graph.nodes if n.op == 'call_function')
    print(f"== {name}: export {dt:.1f}s, {len(ep.graph.nodes)} nodes:", ', '.join(f"{k.replace('aten.','')}={v}" for k, v in sorted(c.items())), flush=True)
