"""Text for the LLM-shaped experiment (``benchmarks/llm.py``): a byte-level corpus of Python
source files, language-model training with a checkpoint cache, perplexity, and pruning a
decoder the way Torch-Pruning's ``examples/LLMs/prune_llm.py`` does.

Corpus
------
:func:`load_text_corpus` reads the ``.py`` files under a directory -- by default the running
interpreter's standard library (``sysconfig.get_paths()["stdlib"]``), which ships with every
Python, so the corpus installs offline -- skipping any path with a ``site-packages``,
``test``, ``tests`` or ``idlelib`` component and any file that is not valid UTF-8. Tokens are
bytes (vocabulary 256: no tokenizer dependency). The split is by module: a file is held out
(for perplexity) when the first 8 hex digits of the SHA-256 of its relative POSIX path, as an
integer, are below :data:`HELDOUT_PERCENT` modulo 100 (:func:`split_of`), so about 10% of the
modules are held out, the same ones on every machine with the same standard library. Each
split is its files' bytes concatenated in sorted path order, cached as ``uint8`` arrays in
``<cache_dir>/text/<name>-<key>.npz`` (``key`` hashes the file list with sizes and mtimes)
with the statistics beside it in a ``.json``. :func:`write_synthetic_corpus` writes a small
directory of generated modules for the tests.

Language model
--------------
:class:`LMConfig` describes one baseline: the ``llama`` decoder of :mod:`engine.models`
(``llama_decoder``: RMSNorm, grouped-query attention, SwiGLU, no positional encoding), trained
with AdamW (linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak), gradient
clipping, on random windows of the training split, for ``steps`` steps of ``batch_size``
windows of ``context`` bytes (a fixed token budget). :func:`train_or_load_lm` caches the
checkpoint in ``<checkpoint_dir>/text-<corpus>-llama-<hash>.pt``, ``hash`` covering every field
that changes the weights (:data:`LM_HASHED_FIELDS`, the corpus digest included), as
:func:`engine.training.train_or_load` does. :func:`perplexity` is ``exp`` of the mean byte
cross-entropy on fixed windows (:func:`heldout_windows`: non-overlapping, chosen by a seed),
with bits per byte beside it.

Pruning as ``prune_llm.py``
---------------------------
:func:`llm_pruner` builds ``tp.pruner.BasePruner`` with ``prune_llm.py``'s arguments (local
pruning at ``ratio`` of every group, ``num_heads`` per projection, whole heads removed at
``head_pruning_ratio = ratio``, head dimensions kept, ``round_to=4``, LM head ignored); as in
``prune_llm.py`` the residual width (embedding, norms, every projection's input) is pruned at
the same ratio. :func:`fix_attention` then sets each attention's head counts from its pruned
projections (``prune_llm.py``'s attribute fix-ups) and checks them against the pruner's own
count. :func:`expected_widths` says what the widths must be; :func:`check_head_config` refuses
the grouped-query configurations where Torch-Pruning 1.6.1 silently skips head pruning.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .models import count_parameters, llama_decoder

__all__ = [
    "VOCAB", "SKIP_DIRS", "HELDOUT_PERCENT", "SPLIT_RULE", "TextCorpus", "stdlib_root",
    "split_of", "list_sources", "load_text_corpus", "write_synthetic_corpus",
    "random_batch", "heldout_windows", "calibration_windows",
    "LMConfig", "LM_HASHED_FIELDS", "lm_config_hash", "lm_checkpoint_path", "build_lm",
    "train_lm", "train_or_load_lm", "load_lm", "perplexity",
    "head_counts", "llm_pruner", "fix_attention", "widths", "expected_widths",
    "check_head_config", "PruningConfigError",
]

#: byte-level tokens
VOCAB = 256
#: a source file with one of these as a path component is skipped
SKIP_DIRS = ("site-packages", "test", "tests", "idlelib")
#: share of the modules held out for perplexity (percent)
HELDOUT_PERCENT = 10
SPLIT_RULE = (f"held out iff int(sha256(relative POSIX path).hexdigest()[:8], 16) % 100 < "
              f"{HELDOUT_PERCENT}; every other file trains")


# ============================================================================================
# corpus
# ============================================================================================
@dataclass
class TextCorpus:
    """A byte corpus split by module: ``train`` and ``heldout`` are ``uint8`` arrays (the
    files of each split concatenated in sorted path order); ``stats`` says where it came from
    (root, files and bytes per split, files skipped, the split rule, a content digest)."""
    train: np.ndarray
    heldout: np.ndarray
    stats: dict

    @property
    def name(self) -> str:
        return self.stats["name"]

    @property
    def digest(self) -> str:
        return self.stats["digest"]


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """``"heldout"`` or ``"train"`` for a file's relative POSIX path (:data:`SPLIT_RULE`)."""
    h = int(hashlib.sha256(relpath.encode("utf-8")).hexdigest()[:8], 16)
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def list_sources(root) -> list:
    """Sorted relative POSIX paths of the ``.py`` files under ``root``, without those below a
    directory named in :data:`SKIP_DIRS`."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        rel_dir = Path(dirpath).relative_to(root)
        out += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(out)


def _listing_key(root: Path, files: list) -> str:
    """Hash of the file list with sizes and mtimes (and the split rule): the cache key."""
    h = hashlib.sha256(SPLIT_RULE.encode())
    for rel in files:
        st = (root / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _corpus_name(root: Path) -> str:
    if root.resolve() == stdlib_root().resolve():
        return f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", root.name).strip("-") or "corpus"


def _read_splits(root: Path, files: list) -> tuple[dict, dict, list]:
    """``({split: [bytes]}, {split: [relpath]}, skipped non-UTF-8 relpaths)``."""
    parts = {"train": [], "heldout": []}
    names = {"train": [], "heldout": []}
    skipped = []
    for rel in files:
        raw = (root / rel).read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        s = split_of(rel)
        parts[s].append(raw)
        names[s].append(rel)
    return parts, names, skipped


def _build_corpus(root: Path, files: list, name: str) -> TextCorpus:
    """Read and split the files (no cache)."""
    parts, names, skipped = _read_splits(root, files)
    arrays = {s: np.frombuffer(b"".join(p), dtype=np.uint8).copy() for s, p in parts.items()}
    if not len(arrays["train"]) or not len(arrays["heldout"]):
        raise ValueError(f"corpus {root}: the split left no "
                         f"{'training' if not len(arrays['train']) else 'held-out'} file "
                         f"({len(files)} files; {SPLIT_RULE})")
    digest = hashlib.sha256(arrays["train"].tobytes() + b"\0" + arrays["heldout"].tobytes())
    stats = {
        "name": name, "root": str(root), "python": sys.version.split()[0],
        "tokens": f"bytes (vocabulary {VOCAB}, no tokenizer)",
        "files": {s: len(v) for s, v in names.items()},
        "bytes": {s: int(len(a)) for s, a in arrays.items()},
        "skipped_dirs": list(SKIP_DIRS), "skipped_non_utf8": skipped,
        "split_rule": SPLIT_RULE, "heldout_files": names["heldout"],
        "digest": digest.hexdigest()[:16],
    }
    return TextCorpus(arrays["train"], arrays["heldout"], stats)


def load_text_corpus(root=None, cache_dir="data", verbose: bool = False) -> TextCorpus:
    """The byte corpus of the ``.py`` files under ``root`` (default: :func:`stdlib_root`),
    split by module (see the module docstring). Cached under ``<cache_dir>/text/`` unless
    ``cache_dir`` is None; the cache is keyed by the file list, sizes and mtimes."""
    root = Path(root) if root is not None else stdlib_root()
    files = list_sources(root)
    if not files:
        raise FileNotFoundError(f"no .py files under {root}")
    name = _corpus_name(root)
    if cache_dir is None:
        return _build_corpus(root, files, name)
    base = Path(cache_dir) / "text" / f"{name}-{_listing_key(root, files)}"
    npz, js = Path(f"{base}.npz"), Path(f"{base}.json")
    if npz.is_file() and js.is_file():
        with np.load(npz) as z:
            corpus = TextCorpus(z["train"], z["heldout"], json.loads(js.read_text()))
        if verbose:
            print(f"loaded corpus {npz}")
        return corpus
    corpus = _build_corpus(root, files, name)
    npz.parent.mkdir(parents=True, exist_ok=True)
    tmp = npz.with_name(f"{base.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, train=corpus.train, heldout=corpus.heldout)
    os.replace(tmp, npz)
    js.write_text(json.dumps(corpus.stats, indent=1))
    corpus.stats["cache"] = str(npz)
    if verbose:
        print(f"built corpus {npz}: {corpus.stats['bytes']} bytes")
    return corpus


_SYNTH_WORDS = ("value", "count", "name", "items", "total", "index", "result", "buffer", "key",
                "offset", "size", "data", "node", "path", "token")


def _synthetic_module(i: int, rng: np.random.Generator, n_funcs: int) -> str:
    """A small generated Python module (functions with loops, conditions and docstrings)."""
    lines = [f'"""Generated module {i}."""', "", "import math", ""]
    for j in range(n_funcs):
        a, b, c = rng.choice(_SYNTH_WORDS, 3, replace=False)
        k = int(rng.integers(1, 9))
        lines += [f"def {a}_{b}_{j}({a}, {b}={k}):",
                  f'    """Return the {c} of {a} and {b}."""',
                  f"    {c} = 0",
                  f"    for {b}_i in range({b}):",
                  f"        if {a} % {k + 1} == 0:",
                  f"            {c} += math.floor({a} / ({b}_i + 1))",
                  "        else:",
                  f"            {c} -= {b}_i * {k}",
                  f"    return {c}", "", ""]
    return "\n".join(lines)


def write_synthetic_corpus(path, n_files: int = 24, n_funcs: int = 12, seed: int = 0) -> Path:
    """Write ``n_files`` generated modules ``mod_000.py``, ... into ``path`` (created) and
    return it: a small corpus for the tests. Raises ``ValueError`` if the module split leaves
    either side empty (deterministic: it depends on the file names only)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"mod_{i:03d}.py" for i in range(n_files)]
    for i, n in enumerate(names):
        (path / n).write_text(_synthetic_module(i, rng, n_funcs))
    if len({split_of(n) for n in names}) < 2:
        raise ValueError(f"{n_files} synthetic files do not fill both splits; use more")
    return path


# ============================================================================================
# windows
# ============================================================================================
def _gather(data: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """``(len(starts), length)`` int64 windows of ``data`` starting at ``starts``."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length, dtype=np.int64)
    return torch.from_numpy(data[idx].astype(np.int64))


def random_batch(data: np.ndarray, batch_size: int, context: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, each ``(batch_size, context)``: random windows of ``data``,
    targets shifted by one byte."""
    starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=gen).numpy()
    w = _gather(data, starts, context + 1)
    return w[:, :-1], w[:, 1:]


def heldout_windows(data: np.ndarray, n: int = 256, context: int = 128,
                    seed: int = 0) -> torch.Tensor:
    """``(n', context + 1)`` non-overlapping windows of ``data`` (inputs then the next byte),
    ``n' = min(n, len(data) // (context + 1))``: slots of ``context + 1`` bytes, ``n'`` of them
    chosen by ``seed``, in order."""
    slots = len(data) // (context + 1)
    if slots < 1:
        raise ValueError(f"{len(data)} bytes hold no window of {context + 1}")
    pick = np.sort(np.random.default_rng(seed).choice(slots, min(n, slots), replace=False))
    return _gather(data, pick * (context + 1), context + 1)


def calibration_windows(data: np.ndarray, n: int = 128, context: int = 128,
                        seed: int = 0) -> torch.Tensor:
    """``(n, context)`` windows of ``data`` at random starts fixed by ``seed``: the
    calibration data of every criterion and of the repair."""
    rng = np.random.default_rng(10_000 + seed)
    return _gather(data, rng.integers(0, len(data) - context, n), context)


# ============================================================================================
# language model
# ============================================================================================
@dataclass
class LMConfig:
    """A decoder baseline: the ``llama`` model, the token budget and the optimiser.

    ``steps * batch_size * context`` bytes are seen in training. The learning rate warms up
    linearly for ``warmup`` steps, then follows a cosine from ``lr`` to ``lr * min_lr_ratio``.
    The fields after ``seed`` do not enter the hash."""
    corpus: str = "stdlib"
    corpus_digest: str = ""
    dim: int = 256
    n_heads: int = 8
    n_kv_heads: int = 2
    n_layers: int = 4
    hidden: int = 688
    context: int = 128
    batch_size: int = 16
    steps: int = 1200
    lr: float = 2e-3
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    warmup: int = 60
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # -- not hashed --
    checkpoint_dir: str = "checkpoints"
    log_every: int = 50

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.context

    def model_kwargs(self) -> dict:
        return dict(vocab=VOCAB, dim=self.dim, n_heads=self.n_heads,
                    n_kv_heads=self.n_kv_heads, n_layers=self.n_layers, hidden=self.hidden)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)


LM_HASHED_FIELDS = ("corpus", "corpus_digest", "dim", "n_heads", "n_kv_heads", "n_layers",
                    "hidden", "context", "batch_size", "steps", "lr", "weight_decay", "betas",
                    "warmup", "min_lr_ratio", "grad_clip", "seed")


def lm_config_hash(config: LMConfig, length: int = 10) -> str:
    """Short SHA-256 of the hashed fields (JSON, sorted keys)."""
    d = {k: getattr(config, k) for k in LM_HASHED_FIELDS}
    d["betas"] = list(d["betas"])
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:length]


def lm_checkpoint_path(config: LMConfig) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", config.corpus).strip("-")
    return Path(config.checkpoint_dir) / f"text-{slug}-llama-{lm_config_hash(config)}.pt"


def build_lm(config: LMConfig) -> nn.Module:
    """The untrained decoder of ``config`` (``llama_decoder`` with vocabulary 256)."""
    return llama_decoder(**config.model_kwargs())


def _lr_factor(step: int, config: LMConfig) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine to
    ``min_lr_ratio``."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _optimizer(model: nn.Module, config: LMConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=config.lr, betas=tuple(config.betas))


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train_lm(model: nn.Module, data: np.ndarray, config: LMConfig,
             progress: bool = True) -> dict:
    """Train ``model`` on random windows of ``data`` for ``config.steps`` steps; returns
    ``{"history": [{step, loss, lr}], "train_time_s", "tokens", "tokens_per_s"}`` (the
    loss is the mean over the last ``log_every`` steps). Leaves the model in eval mode."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(config.seed)
    opt = _optimizer(model, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    history, window = [], []
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(config.steps), desc=f"train seed {config.seed}", disable=not progress,
               leave=False)
    for step in bar:
        x, y = random_batch(data, config.batch_size, config.context, gen)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if len(window) == config.log_every or step == config.steps - 1:
            history.append({"step": step + 1, "loss": float(np.mean(window)),
                            "lr": opt.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
            window = []
    elapsed = time.perf_counter() - t0
    model.eval()
    return {"history": history, "train_time_s": elapsed, "tokens": config.tokens,
            "tokens_per_s": config.tokens / elapsed}


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 64) -> dict:
    """``{"ce", "ppl", "bpb"}`` of ``model`` on ``windows`` (``(n, context + 1)``: inputs
    then the next byte): mean next-byte cross-entropy in nats, its ``exp`` (perplexity) and
    bits per byte (``ce / ln 2``). Eval mode, training flag restored."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for s in range(0, len(windows), batch_size):
            w = windows[s:s + batch_size]
            logits = model(w[:, :-1])
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                           w[:, 1:].reshape(-1), reduction="sum"))
            count += w[:, 1:].numel()
    finally:
        model.train(was_training)
    ce = total / count
    return {"ce": ce, "ppl": math.exp(ce), "bpb": ce / math.log(2)}


def load_lm(path) -> tuple[nn.Module, dict]:
    """Rebuild the decoder stored by :func:`train_or_load_lm` -> ``(model, info)``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    config = LMConfig.from_dict(ckpt["config"])
    model = build_lm(config)
    model.load_state_dict(ckpt["state_dict"])
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    info["checkpoint"] = str(path)
    return model.eval(), info


def train_or_load_lm(config: LMConfig, corpus: TextCorpus, eval_windows: torch.Tensor,
                     force: bool = False, progress: bool = True,
                     verbose: bool = True) -> tuple[nn.Module, dict]:
    """Train the baseline of ``config`` on ``corpus.train`` (seeded with ``config.seed``), or
    reload its cached checkpoint. ``info``: ``config``, ``hash``, ``checkpoint``, the training
    record of :func:`train_lm`, ``base`` (:func:`perplexity` on ``eval_windows``, computed
    again on reload), ``num_params``, ``cached``."""
    if config.corpus_digest != corpus.digest:
        raise ValueError(f"config.corpus_digest {config.corpus_digest!r} is not the corpus's "
                         f"{corpus.digest!r}")
    path = lm_checkpoint_path(config)
    if path.is_file() and not force:
        model, info = load_lm(path)
        info["cached"] = True
    else:
        torch.manual_seed(config.seed)
        model = build_lm(config)
        info = {"config": config.to_dict(), "hash": lm_config_hash(config),
                "num_params": count_parameters(model), "torch_version": str(torch.__version__),
                "threads": torch.get_num_threads(),
                **train_lm(model, corpus.train, config, progress)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save({"state_dict": model.state_dict(), **info}, tmp)
        os.replace(tmp, path)
        info["checkpoint"], info["cached"] = str(path), False
    info["base"] = perplexity(model, eval_windows)
    if verbose:
        how = "loaded" if info["cached"] else f"trained in {info['train_time_s']:.0f} s"
        print(f"{how} {path}: held-out perplexity {info['base']['ppl']:.3f} "
              f"({info['base']['bpb']:.3f} bits/byte)")
    return model, info


# ============================================================================================
# pruning as Torch-Pruning's examples/LLMs/prune_llm.py
# ============================================================================================
class PruningConfigError(ValueError):
    """A decoder / ratio combination that Torch-Pruning 1.6.1 does not prune as asked."""


def _attentions(model: nn.Module) -> list:
    return [layer.self_attn for layer in model.layers]


def head_counts(model: nn.Module) -> dict:
    """``prune_llm.py``'s ``num_heads``: ``{q_proj: heads, k_proj: kv heads, v_proj: kv
    heads}`` of every attention."""
    out = {}
    for a in _attentions(model):
        out[a.q_proj], out[a.k_proj], out[a.v_proj] = a.n_heads, a.n_kv_heads, a.n_kv_heads
    return out


def llm_pruner(model: nn.Module, example_inputs, importance, ratio: float,
               round_to: int = 4, prune_residual: bool = True):
    """``tp.pruner.BasePruner`` with ``prune_llm.py``'s arguments: local pruning at ``ratio``
    of every group (the residual width and every SwiGLU hidden layer), whole heads at
    ``head_pruning_ratio=ratio`` (``prune_head_dims=False``), ``round_to``, the LM head
    ignored. Our decoder has separate ``gate_proj`` / ``up_proj``, so no
    ``out_channel_groups``. ``prune_residual=False`` (not ``prune_llm.py``) also ignores the
    embedding, which keeps the residual width. Torch-Pruning's warning about the RMSNorm
    weights (unwrapped parameters, pruned along their only dimension) is silenced."""
    ignored = [model.lm_head] + ([] if prune_residual else [model.embed_tokens])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.pruner.BasePruner(
            model, example_inputs, importance=importance, global_pruning=False,
            pruning_ratio=ratio, ignored_layers=ignored, num_heads=head_counts(model),
            prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
            round_to=round_to)


def fix_attention(model: nn.Module, pruner) -> None:
    """``prune_llm.py``'s attribute fix-ups after pruning: each attention's ``n_heads`` /
    ``n_kv_heads`` from its pruned projections (``head_dim`` is unchanged: head dimensions
    are not pruned). Raises :class:`PruningConfigError` where the projections disagree with
    the pruner's own head count (``pruner.num_heads``)."""
    for a in _attentions(model):
        n_q, rq = divmod(a.q_proj.out_features, a.head_dim)
        n_kv, rk = divmod(a.k_proj.out_features, a.head_dim)
        if rq or rk or a.v_proj.out_features != a.k_proj.out_features or n_q % n_kv:
            raise PruningConfigError(f"attention widths q {a.q_proj.out_features}, k "
                                     f"{a.k_proj.out_features}, v {a.v_proj.out_features} are "
                                     f"not whole heads of {a.head_dim} in groups")
        claimed = (pruner.num_heads[a.q_proj], pruner.num_heads[a.k_proj])
        if claimed != (n_q, n_kv):
            raise PruningConfigError(f"the pruner counts {claimed} (heads, kv heads) but the "
                                     f"projections hold {(n_q, n_kv)}")
        a.n_heads, a.n_kv_heads = n_q, n_kv


def widths(model: nn.Module) -> dict:
    """``{"dim", "hidden", "n_heads", "n_kv_heads"}`` of the first block (the residual width,
    the SwiGLU hidden width, the head counts; every block has the same under uniform
    pruning) and ``"params"``."""
    b = model.layers[0]
    return {"dim": model.lm_head.in_features, "hidden": b.mlp.gate_proj.out_features,
            "n_heads": b.self_attn.q_proj.out_features // b.self_attn.head_dim,
            "n_kv_heads": b.self_attn.k_proj.out_features // b.self_attn.head_dim,
            "params": count_parameters(model)}


def _kept(n: int, ratio: float, round_to: int) -> int:
    """Channels Torch-Pruning 1.6.1 keeps of ``n`` at ``ratio`` (local pruning, ``round_to``)."""
    kept = int(n * (1 - ratio))
    return kept - kept % round_to if round_to else kept


def _heads_kept(n_heads: int, n_kv_heads: int, ratio: float) -> tuple[int, int]:
    """Heads Torch-Pruning 1.6.1 keeps: ``ceil(ratio * n_heads)`` query heads removed, and with
    grouped-query attention that count rounded up to a multiple of ``n_kv_heads`` (the same
    number from every key-value group; key-value heads are kept)."""
    removed = math.ceil(ratio * n_heads)
    if n_kv_heads == n_heads:
        return n_heads - removed, n_heads - removed
    removed = n_kv_heads * math.ceil(removed / n_kv_heads)
    return n_heads - removed, n_kv_heads


def check_head_config(n_heads: int, n_kv_heads: int, ratios) -> None:
    """Raise :class:`PruningConfigError` for a grouped-query configuration that Torch-Pruning
    1.6.1 does not prune: where its policy would leave as many query heads as key-value heads
    (e.g. 8 heads / 4 kv heads at any ratio up to 0.5), its second GQA test fails, the key and
    value projections stay in the group, and ``check_pruning_group`` drops the whole head
    group (heads are silently not pruned and ``pruner.num_heads`` is wrong); or where no head
    would remain."""
    for r in ratios:
        q, kv = _heads_kept(n_heads, n_kv_heads, r)
        if q < 1:
            raise PruningConfigError(f"ratio {r}: no query head would remain of {n_heads}")
        if n_kv_heads < n_heads and q <= n_kv_heads:
            raise PruningConfigError(
                f"{n_heads} heads / {n_kv_heads} kv heads at ratio {r}: Torch-Pruning 1.6.1 "
                f"would keep {q} query heads for {kv} kv heads and then skip head pruning "
                f"(use n_heads >= 4 * n_kv_heads, or n_kv_heads = n_heads)")


def expected_widths(dim: int, hidden: int, n_heads: int, n_kv_heads: int, ratio: float,
                    round_to: int = 4, prune_residual: bool = True) -> dict:
    """What :func:`widths` must give after :func:`llm_pruner` at ``ratio`` (Torch-Pruning
    1.6.1's rules: ``int(n * (1 - ratio))`` channels kept, rounded down to ``round_to``;
    heads by :func:`_heads_kept`)."""
    q, kv = _heads_kept(n_heads, n_kv_heads, ratio)
    return {"dim": _kept(dim, ratio, round_to) if prune_residual else dim,
            "hidden": _kept(hidden, ratio, round_to), "n_heads": q, "n_kv_heads": kv}
