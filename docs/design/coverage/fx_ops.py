import sys, collections, warnings, torch, torch.fx as fx, torch.nn as nn
sys.path.insert(0, '/tmp/i9'); warnings.filterwarnings("ignore")
from dg_build import MODELS
for name in (sys.argv[1:] or MODELS):
    mk, inp = MODELS[name]; m = mk().eval()
    try: gm = fx.symbolic_trace(m)
    except Exception as e: print(name, 'FAILED', type(e).__name__, str(e)[:200]); continue
    mods = dict(gm.named_modules()); c = collections.Counter()
    for n in gm.graph.nodes:
        if n.op == 'call_module': c['mod:'+type(mods[n.target]).__name__] += 1
        elif n.op == 'call_function': c['fn:'+getattr(n.target,'__name__',str(n.target))] += 1
        elif n.op == 'call_method': c['meth:'+n.target] += 1
        elif n.op == 'get_attr': c['get_attr'] += 1
    print(f"== {name}:", ', '.join(f"{k}={v}" for k,v in sorted(c.items())))
