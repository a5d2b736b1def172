import torch, torch.nn as nn, warnings, logging, time; warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
class ValueBranch(nn.Module):
    def __init__(s): super().__init__(); s.a = nn.Linear(8, 8); s.b = nn.Linear(8, 4)
    def forward(s, x):
        if x.abs().sum() > 0: x = x + s.a(x)
        return s.b(x)
x = torch.randn(1, 5, 8)
t = time.perf_counter()
try:
    ep = torch.export.draft_export(ValueBranch().eval(), (x,))
    print("draft_export OK %.1fs:" % (time.perf_counter() - t), [str(n.target) for n in ep.graph.nodes if n.op == 'call_function'])
except Exception as e: print("draft_export FAILED", type(e).__name__, str(e)[:200].replace('\n',' '))
