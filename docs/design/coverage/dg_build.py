import sys, time, collections, warnings, torch, torchvision, timm
sys.path.insert(0, '/tmp/i9')
import torch_pruning as tp
from llama import TinyLlama
torch.set_num_threads(2)
warnings.filterwarnings("ignore")

def timm_vit_forward(m, x):  # mirrors TP examples/timm_models/prune_timm_models.py? (checked separately)
    return m(x)

import torch.nn.functional as F
def _tp_attn_forward(self, x, attn_mask=None, is_causal=False):
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p)
    else:
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
    x = x.transpose(1, 2).reshape(B, N, -1)
    x = self.proj(x)
    x = self.proj_drop(x)
    return x
def patch_timm_attn(model, fused=False):
    from timm.models.vision_transformer import Attention
    for m in model.modules():
        if isinstance(m, Attention):
            m.forward = _tp_attn_forward.__get__(m, Attention); m.fused_attn = fused
    return model
MODELS = {
  'tv_mobilenet_v3_small': (lambda: torchvision.models.mobilenet_v3_small(), lambda: torch.randn(1,3,64,64)),
  'tv_efficientnet_b0': (lambda: torchvision.models.efficientnet_b0(), lambda: torch.randn(1,3,64,64)),
  'tv_convnext_tiny': (lambda: torchvision.models.convnext_tiny(), lambda: torch.randn(1,3,64,64)),
  'tv_vit_b_16': (lambda: torchvision.models.vit_b_16(), lambda: torch.randn(1,3,224,224)),
  'timm_vit_tiny': (lambda: timm.create_model('vit_tiny_patch16_224', pretrained=False), lambda: torch.randn(1,3,224,224)),
  'timm_efficientnet_b0': (lambda: timm.create_model('efficientnet_b0', pretrained=False), lambda: torch.randn(1,3,64,64)),
  'timm_convnext_atto': (lambda: timm.create_model('convnext_atto', pretrained=False), lambda: torch.randn(1,3,64,64)),
  'timm_vit_tiny_tp': (lambda: patch_timm_attn(timm.create_model('vit_tiny_patch16_224', pretrained=False)), lambda: torch.randn(1,3,224,224)),
  'llama': (lambda: TinyLlama(), lambda: torch.randint(0,100,(1,8))),
}
def main():
  which = sys.argv[1:] or list(MODELS)
  for name in which:
      mk, inp = MODELS[name]
      m = mk().eval(); x = inp()
      t = time.perf_counter()
      DG = tp.DependencyGraph().build_dependency(m, x, verbose=False)
      dt = time.perf_counter() - t
      cnt = collections.Counter(n.type.name for n in DG.module2node.values())
      gfn = collections.Counter(n.grad_fn.name() for n in DG.module2node.values() if n.type.name in ('ELEMENTWISE','RESHAPE','EXPAND','SLICE','SPLIT','UNBIND','CONCAT') and hasattr(n.grad_fn,'name'))
      print(f"== {name}: build {dt:.2f}s nodes={len(DG.module2node)}", dict(cnt))
      print("   op grad_fns:", dict(gfn))
      t = time.perf_counter(); groups = list(DG.get_all_groups()); print(f"   get_all_groups: {len(groups)} groups in {time.perf_counter()-t:.2f}s", flush=True)

if __name__=='__main__': main()