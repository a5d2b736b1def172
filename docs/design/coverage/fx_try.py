import sys, time, warnings, torch, torch.fx as fx
sys.path.insert(0, '/tmp/i9'); sys.path.insert(0, '/work/main')
warnings.filterwarnings("ignore")
from dg_build import MODELS
from tp_curvature.graph import ChannelGraph
for name in (sys.argv[1:] or MODELS):
    mk, inp = MODELS[name]; m = mk().eval(); x = inp()
    try:
        gm = fx.symbolic_trace(m); print(f"== {name}: symbolic_trace OK ({len(gm.graph.nodes)} nodes)")
    except Exception as e:
        print(f"== {name}: symbolic_trace FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    try:
        ChannelGraph.from_model(m, x); print("   ChannelGraph OK")
    except Exception as e:
        print(f"   ChannelGraph: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
