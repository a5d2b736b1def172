import sys, time, warnings, logging, torch; sys.path.insert(0,'/tmp/i9'); warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
from dg_build import MODELS
from torch.export import Dim
for name in sys.argv[1:]:
    mk, inp = MODELS[name]; m = mk().eval(); x = torch.cat([inp(), inp()]) if name != "llama" else inp().repeat(2, 1)
    t = time.perf_counter()
    try:
        ep = torch.export.export(m, (x,), dynamic_shapes=({0: Dim.AUTO},), strict=False)
        xb = torch.cat([x, x, x]); out = ep.module()(xb); ref = m(xb)
        print(name, "dynamic batch OK %.1fs" % (time.perf_counter()-t), tuple(out.shape), "max|diff|=%.1e" % (out-ref).abs().max().item())
    except Exception as e: print(name, "FAILED", type(e).__name__, str(e)[:160].replace('\n', ' '))
