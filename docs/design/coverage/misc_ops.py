import torch, torch.nn as nn, torch.nn.functional as F, warnings, logging; warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
import torchvision, timm
class Misc(nn.Module):
    def __init__(s):
        super().__init__(); s.c = nn.Conv2d(3, 8, 3, padding=1); s.gn = nn.GroupNorm(2, 8); s.up = nn.ConvTranspose2d(4, 6, 2, stride=2)
        s.d = nn.Conv2d(10, 4, 1); s.dp = timm.layers.DropPath(0.1); s.sd = torchvision.ops.StochasticDepth(0.1, 'row')
    def forward(s, x):
        y = s.gn(s.c(x))
        a, b = y.chunk(2, dim=1)                                   # chunk
        n, c, h, w = y.shape
        z = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)   # channel shuffle
        u = s.up(a)                                                # ConvTranspose2d
        u = F.interpolate(u, size=(h, w), mode='bilinear')         # interpolate
        v = torch.cat([b, u], 1)
        return s.d(s.dp(v)) + s.sd(z[:, :4]) + F.pixel_shuffle(z, 2).mean((2, 3), keepdim=True)[:, :2].repeat(1, 2, 1, 1)
m = Misc().eval(); x = torch.randn(1, 3, 8, 8)
ep = torch.export.export(m, (x,), strict=False)
print([str(n.target).replace('aten.', '') for n in ep.graph.nodes if n.op == 'call_function'])
m.train()
ep = torch.export.export(m, (x,), strict=False)
print('train:', [str(n.target).replace('aten.', '') for n in ep.graph.nodes if n.op == 'call_function'])
import torch_pruning as tp
DG = tp.DependencyGraph().build_dependency(m.eval(), x, verbose=False)
print('DG:', sorted({(n.type.name, n.grad_fn.name() if hasattr(n.grad_fn,'name') else '') for n in DG.module2node.values()}))
