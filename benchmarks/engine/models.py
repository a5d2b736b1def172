"""Model zoo: small, plain ``nn.Module`` builders for the pruning experiments.

Every builder returns an ordinary :class:`torch.nn.Module` made of standard layers
(``Conv2d``, ``BatchNorm2d``, ``Linear``, ``ReLU``, ``MaxPool2d``, ``Flatten``), with no Python
control flow on tensor values, so the models are ``torch.fx``-traceable and Torch-Pruning's
``DependencyGraph`` can build on them. ReLUs are not in-place and every ReLU is its own module,
so forward hooks on a conv / BN see the pre-activation and hooks on the ReLU the
post-activation.

Input configurations supported (and tested in ``tests/test_models.py``):

========================  =========  ===========  ==========
config                    channels   image size   example
========================  =========  ===========  ==========
Fashion-MNIST / MNIST     1          28           ``fashion-mnist``
scikit-learn digits       1          8            ``digits``
CIFAR-10 / CIFAR-100      3          32           ``cifar10``
========================  =========  ===========  ==========

Sources
-------
* ``mlp``: the fully connected 784-256-128-10 network of the shared first measurement
  (``/work/shared/README.md``); any input size (the image is flattened).
* ``lenet5``: LeNet-5 of LeCun et al., "Gradient-based learning applied to document
  recognition" (Proc. IEEE 1998), in its common modern form (ReLU and max-pooling instead of
  scaled tanh and trainable sub-sampling; full C3 connectivity). The first conv is padded by 2 so
  that 28x28 inputs behave like the original 32x32 ones.
* ``paper_lenet``: the LeNet of the curvature paper (Tan, Sia, Bogdan, Ivanov, "Post-Training
  Neural Network Pruning using Graph Curvature", TMLR 2026, arXiv 2601.16366) as described in the
  project brief: no pooling, two stride-2 6x6 convs and three fully connected layers.
* ``vgg9``: the paper's VGG-9 (6 convs + 3 fully connected layers); VGG of Simonyan and
  Zisserman, ICLR 2015, cut to 9 weight layers. The fully connected sizes (512, 512) are our
  choice; the paper's exact head was not recoverable (see :func:`vgg9`).
* ``paper_vgg9``: the VGG-9 of the curvature paper's repository
  (``tools/vgg9_custom_relu.py`` of SH-Tan/Post-Training-NN-Pruning-using-Graph-Curvature, see
  ``/work/shared/README.md``): no pooling, no padding, 6 convs with BatchNorm and ReLU
  (3->64 k2 s2, 64->128 k3, 128->128 k3, 128->128 k3 s2, 128->256 k3, 256->256 k3; maps 16, 14,
  12, 5, 3, 1 for a 32x32 input) and fc 256 -> 512 -> 128 -> 10. Its element graph has 43.0M
  edges per image (the per-weight experiment's model).
* ``resnet20`` / ``resnet56``: CIFAR ResNets of He et al., "Deep Residual Learning for Image
  Recognition" (CVPR 2016, section 4.2): 3 stages of 16/32/64 channels, ``n`` basic blocks each
  (depth 6n+2), with projection (option B: 1x1 conv + BN) shortcuts wherever the shape changes, as
  in Torch-Pruning's ``benchmarks`` CIFAR ResNets.
* ``llama``: a small LLaMA-shaped decoder (Touvron et al., "LLaMA", 2023; the module names of
  Hugging Face's ``LlamaForCausalLM``): token embedding, blocks of RMSNorm -> grouped-query
  causal attention -> RMSNorm -> SwiGLU MLP with residual adds, final RMSNorm and LM head. Input:
  token ids ``(batch, tokens)``; the coverage tests prune its attention heads.
* ``timm_model``: any `timm <https://github.com/huggingface/pytorch-image-models>`_ model.

Registry
--------
Every builder is registered in :data:`MODELS` with ``@register_model(name, help=...)`` (as
timm's ``register_model``); ``timm:<name>`` is a registered family. :func:`build_model` looks a
name up and passes the builder the input configuration it asks for by parameter name
(``num_classes``, ``in_channels``, ``image_size``, or ``in_features`` for the MLP). To add a
model, decorate its builder.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

__all__ = [
    "mlp",
    "lenet5",
    "paper_lenet",
    "vgg9",
    "paper_vgg9",
    "resnet20",
    "resnet56",
    "CifarResNet",
    "BasicBlock",
    "llama_decoder",
    "LlamaDecoder",
    "timm_model",
    "build_model",
    "MODELS",
    "register_model",
    "count_parameters",
]

#: the model zoo: ``MODELS.get(name)`` is a builder; :func:`build_model` is the way to call one
MODELS = Registry("model", normalize=lambda name: name.strip().lower().replace("-", "_"))
register_model = MODELS.register


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Spatial output size of a conv / pool (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def _check_size(size: int, what: str, image_size: int) -> None:
    if size < 1:
        raise ValueError(
            f"{what}: input of {image_size}x{image_size} pixels is too small for this "
            f"architecture (a feature map would have size {size})"
        )


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU), unit BN, default Linear; deterministic under a seed."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------
@register_model("mlp", help="fully connected ReLU network (784-256-128-10 for 28x28 inputs; "
                            "kwargs: hidden)")
def mlp(
    in_features: int = 784,
    hidden: Sequence[int] = (256, 128),
    num_classes: int = 10,
) -> nn.Sequential:
    """Fully connected ReLU network: ``Flatten -> [Linear -> ReLU] * len(hidden) -> Linear``.

    The default is the 784-256-128-10 MLP of the shared first measurement. For 8x8 digits use
    ``in_features=64`` (``build_model`` does this from ``in_channels * image_size ** 2``).
    """
    layers: list[nn.Module] = [nn.Flatten()]
    prev = int(in_features)
    for h in hidden:
        layers += [nn.Linear(prev, int(h)), nn.ReLU()]
        prev = int(h)
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# LeNets
# --------------------------------------------------------------------------------------------
class _ConvFC(nn.Module):
    """``features`` (convs) -> flatten -> ``classifier`` (fully connected). fx-traceable."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _lenet_classifier(in_features: int, num_classes: int) -> nn.Sequential:
    """LeNet's fully connected head: in_features -> 120 -> 84 -> num_classes (ReLU between)."""
    return nn.Sequential(
        nn.Linear(in_features, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


@register_model("lenet5", help="LeNet-5 in its modern ReLU / max-pool form")
def lenet5(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    conv2_padding: int | None = None,
) -> nn.Module:
    """Classic LeNet-5 (LeCun et al. 1998), modern ReLU / max-pool form.

    ``conv 6@5x5 pad 2 -> ReLU -> maxpool 2 -> conv 16@5x5 -> ReLU -> maxpool 2 -> flatten ->
    fc 120 -> ReLU -> fc 84 -> ReLU -> fc num_classes``.

    Feature-map sizes: 28x28 input -> 14 -> 5 (fc input 16*5*5 = 400, as in the original);
    32x32 -> 16 -> 6 (576). For small inputs (``image_size < 16``, e.g. the 8x8 digits) the
    second conv would leave nothing, so ``conv2_padding`` defaults to 2 there: 8 -> 4 -> 2
    (fc input 16*2*2 = 64). Pass ``conv2_padding`` explicitly to override.
    """
    if conv2_padding is None:
        conv2_padding = 2 if image_size < 16 else 0
    s = _conv_out(image_size, 5, 1, 2) // 2
    s = _conv_out(s, 5, 1, conv2_padding) // 2
    _check_size(s, "lenet5", image_size)
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5, padding=conv2_padding),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    return _ConvFC(features, _lenet_classifier(16 * s * s, num_classes))


@register_model("paper_lenet", help="the curvature paper's LeNet: two stride-2 6x6 convs, no "
                                    "pooling, fc 120-84")
def paper_lenet(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    padding: int | None = None,
) -> nn.Module:
    """The curvature paper's LeNet (no pooling).

    ``conv 6@6x6 stride 2 -> ReLU -> conv 16@6x6 stride 2 -> ReLU -> flatten -> fc 120 -> ReLU
    -> fc 84 -> ReLU -> fc num_classes``.

    Feature-map sizes for the paper's 28x28 MNIST: 28 -> 12 -> 4 (fc input 16*4*4 = 256);
    32x32 -> 14 -> 5 (400). The 8x8 digits are too small for two unpadded 6x6 convs, so
    ``padding`` defaults to 2 for ``image_size < 20`` (8 -> 4 -> 2, fc input 64) and 0 otherwise.
    """
    if padding is None:
        padding = 2 if image_size < 20 else 0
    s = _conv_out(image_size, 6, 2, padding)
    s = _conv_out(s, 6, 2, padding)
    _check_size(s, "paper_lenet", image_size)
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=6, stride=2, padding=padding),
        nn.ReLU(),
        nn.Conv2d(6, 16, kernel_size=6, stride=2, padding=padding),
        nn.ReLU(),
    )
    return _ConvFC(features, _lenet_classifier(16 * s * s, num_classes))


# --------------------------------------------------------------------------------------------
# VGG-9
# --------------------------------------------------------------------------------------------
VGG9_CFG: tuple = (64, 64, "M", 128, 128, "M", 256, 256, "M")


@register_model("vgg9", help="VGG-9: 6 convs (BatchNorm) in three pooled blocks + 3 fc "
                             "(kwargs: width, batch_norm, fc_hidden)")
def vgg9(
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    batch_norm: bool = True,
    width: float = 1.0,
    fc_hidden: Sequence[int] = (512, 512),
) -> nn.Module:
    """The paper's VGG-9: 6 convs (3x3, pad 1, [BN], ReLU) in three blocks + 3 fully connected.

    Convs: ``64, 64, M, 128, 128, M, 256, 256, M`` (``M`` = 2x2 max-pool). Head:
    ``flatten -> fc 256*s*s -> 512 -> ReLU -> fc 512 -> ReLU -> fc num_classes`` with ``s`` the
    spatial size after three pools (32 -> 4, 28 -> 3, 8 -> 1). The head sizes (512, 512) are our
    choice (``fc_hidden``); no dropout, so post-training pruning sees the same network as training.

    ``width`` multiplies every conv and hidden fc width (rounded, at least 1): ``width=0.25``
    gives 16-16-32-32-64-64 convs and 128-128 fc, a CPU-friendly model.
    """

    def w(c: int) -> int:
        return max(1, int(round(c * width)))

    layers: list[nn.Module] = []
    c_in, s = in_channels, image_size
    for v in VGG9_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            s = s // 2
            continue
        c = w(v)
        layers.append(nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c))
        layers.append(nn.ReLU())
        c_in = c
    _check_size(s, "vgg9", image_size)
    head: list[nn.Module] = []
    prev = c_in * s * s
    for h in fc_hidden:
        head += [nn.Linear(prev, w(h)), nn.ReLU()]
        prev = w(h)
    head.append(nn.Linear(prev, num_classes))
    model = _ConvFC(nn.Sequential(*layers), nn.Sequential(*head))
    _init_weights(model)
    return model


#: the paper VGG-9's convs: (out channels, kernel, stride), padding 0
PAPER_VGG9_CONVS: tuple = ((64, 2, 2), (128, 3, 1), (128, 3, 1), (128, 3, 2), (256, 3, 1),
                           (256, 3, 1))


@register_model("paper_vgg9", help="the curvature paper's VGG-9: 6 convs with BatchNorm, no "
                                   "pooling or padding, fc 512-128")
def paper_vgg9(
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    fc_hidden: Sequence[int] = (512, 128),
) -> nn.Module:
    """The curvature paper's VGG-9 (its repository's ``tools/vgg9_custom_relu.py``).

    ``conv 64@2x2 s2 -> conv 128@3x3 -> conv 128@3x3 -> conv 128@3x3 s2 -> conv 256@3x3 ->
    conv 256@3x3``, each followed by BatchNorm and ReLU, no padding and no pooling (feature maps
    16, 14, 12, 5, 3, 1 for 32x32 inputs); then ``flatten -> fc 256 -> 512 -> ReLU -> fc 128 ->
    ReLU -> fc num_classes``. For Fashion-MNIST use ``in_channels=1`` with the images padded to
    32x32 (``load_dataset(..., pad_to=32)``). Other image sizes work while the last map is at
    least 1x1 (the first fc then reads ``256 * s * s`` features).
    """
    layers: list[nn.Module] = []
    c_in, s = in_channels, image_size
    for c, k, st in PAPER_VGG9_CONVS:
        layers += [nn.Conv2d(c_in, c, kernel_size=k, stride=st, bias=False), nn.BatchNorm2d(c),
                   nn.ReLU()]
        c_in, s = c, _conv_out(s, k, st, 0)
        _check_size(s, "paper_vgg9", image_size)
    head: list[nn.Module] = []
    prev = c_in * s * s
    for h in fc_hidden:
        head += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    head.append(nn.Linear(prev, num_classes))
    model = _ConvFC(nn.Sequential(*layers), nn.Sequential(*head))
    _init_weights(model)
    return model


# --------------------------------------------------------------------------------------------
# CIFAR ResNets
# --------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU-3x3 conv-BN, plus identity or 1x1 conv-BN projection, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.downsample: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.downsample(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016, sec. 4.2): depth ``6n + 2``.

    ``conv 3x3 16 -> BN -> ReLU -> stage(16, n) -> stage(32, n, stride 2) -> stage(64, n, stride
    2) -> global average pool -> fc``. Global pooling is adaptive, so 28x28 and 8x8 inputs work
    too (8x8 -> 8 -> 4 -> 2).
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(widths[0], num_blocks[0], 1)
        self.layer2 = self._make_layer(widths[1], num_blocks[1], 2)
        self.layer3 = self._make_layer(widths[2], num_blocks[2], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        _init_weights(self)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register_model("resnet20", help="CIFAR ResNet-20 (3 basic blocks per stage, 0.27M parameters)")
def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (3 blocks per stage, 0.27M parameters)."""
    return CifarResNet([3, 3, 3], num_classes=num_classes, in_channels=in_channels)


@register_model("resnet56", help="CIFAR ResNet-56 (9 basic blocks per stage, 0.86M parameters)")
def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (9 blocks per stage, 0.86M parameters)."""
    return CifarResNet([9, 9, 9], num_classes=num_classes, in_channels=in_channels)


# --------------------------------------------------------------------------------------------
# LLaMA-shaped decoder
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query keys / values: ``n_kv_heads`` key and
    value heads, each shared by ``n_heads / n_kv_heads`` query heads (``repeat_interleave``),
    then ``F.scaled_dot_product_attention(is_causal=True)``. No rotary embedding."""

    def __init__(self, dim: int = 64, n_heads: int = 4, n_kv_heads: int = 2) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def _heads(self, proj: nn.Linear, x: torch.Tensor, n: int) -> torch.Tensor:
        """``(batch, tokens, n * head_dim)`` -> ``(batch, n, tokens, head_dim)``."""
        b, t, _ = x.shape
        return proj(x).view(b, t, n, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self._heads(self.q_proj, x, self.n_heads)
        k = self._heads(self.k_proj, x, self.n_kv_heads)
        v = self._heads(self.v_proj, x, self.n_kv_heads)
        group = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = Attention(dim, n_heads, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """Token ids ``(batch, tokens)`` -> logits ``(batch, tokens, vocab)``: ``embed_tokens``,
    the ``layers`` (:class:`Block`), ``norm`` and ``lm_head``."""

    def __init__(self, vocab: int, dim: int, n_heads: int, n_kv_heads: int, n_layers: int,
                 hidden: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim, n_heads, n_kv_heads, hidden)
                                     for _ in range(n_layers)])
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


@register_model("llama", help="small LLaMA-shaped decoder on token ids (kwargs: vocab, dim, "
                              "n_heads, n_kv_heads, n_layers, hidden)")
def llama_decoder(vocab: int = 100, dim: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
                  n_layers: int = 2, hidden: int = 128) -> LlamaDecoder:
    """A LLaMA-shaped decoder; the defaults give a 0.1M-parameter model for the tests (vocab
    100, width 64, 4 query / 2 key-value heads of 16 dims, 2 blocks, SwiGLU hidden 128)."""
    if dim % n_heads or n_heads % n_kv_heads:
        raise ValueError(f"llama: dim ({dim}) must be a multiple of n_heads ({n_heads}) and "
                         f"n_heads a multiple of n_kv_heads ({n_kv_heads})")
    return LlamaDecoder(vocab, dim, n_heads, n_kv_heads, n_layers, hidden)


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------
def timm_model(
    name: str, num_classes: int = 10, in_channels: int = 3, pretrained: bool = False, **kwargs
) -> nn.Module:
    """``timm.create_model(name, pretrained, num_classes, in_chans=in_channels, **kwargs)``.

    ``pretrained=True`` needs the weights in the local Hugging Face / timm cache or network
    access. Most timm CNNs are fx-traceable and work with Torch-Pruning, but not all: check with
    ``torch.fx.symbolic_trace`` and ``tp.DependencyGraph`` before relying on one.
    """
    import timm

    return timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kwargs
    )


@register_model("timm:<name>", prefix="timm:",
                help="any timm model (timm.create_model; kwargs e.g. pretrained)")
def _timm_by_name(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """``timm:<timm model name>`` -> :func:`timm_model`."""
    return timm_model(name[len("timm:"):], num_classes=num_classes, in_channels=in_channels,
                      **kwargs)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------
def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    **kwargs,
) -> nn.Module:
    """Build a registered model (:data:`MODELS`) for inputs of shape
    ``(in_channels, image_size, image_size)``.

    ``name``: a name of :data:`MODELS` (``mlp``, ``lenet5``, ``resnet20``, ...; case and ``-`` /
    ``_`` do not matter) or ``timm:<timm model name>``. The builder gets those of
    ``num_classes``, ``in_channels``, ``image_size`` and ``in_features`` (``in_channels *
    image_size ** 2``) that it takes as parameters, and ``kwargs`` (e.g. ``width=0.25`` for
    ``vgg9``, ``hidden=(64,)`` for ``mlp``, ``pretrained=True`` for timm). An unknown name is a
    ``ValueError`` listing the registered ones.
    """
    builder = MODELS.get(name)
    inputs = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
              "in_features": in_channels * image_size * image_size}
    params = inspect.signature(builder).parameters
    wanted = {k: v for k, v in inputs.items() if k in params and k not in kwargs}
    return builder(**wanted, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

