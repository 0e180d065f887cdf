"""LoRA finetuning: low-rank adapters on the Linear layers of the blocks (``--lora_rank=8``).

A :class:`LoRALinear` takes over an ``nn.Linear``'s weight and bias (frozen) and adds two small
trained matrices, A (r, in) and B (out, r):

    y = W x + b + (alpha / r) B A dropout(x)

B starts at zero, so the finetune starts exactly at its base model; A starts as ``nn.Linear``
initialises its weights (Kaiming-uniform). Only A and B train; every optimizer of optim.py sees
them as ordinary matrices (weight decay pulls them, and so the model, towards the base).
The parameter names stay GPT-2's (``...attn.c_attn.weight``) with ``lora_A``/``lora_B`` beside
them, so a LoRA model's state dict is its base's plus the adapters.

A checkpoint of a LoRA run holds the adapters only, with ``lora``: the settings and a
reference to the base weights (a GPT-2 name, or a Hugging Face folder's or base checkpoint's
path and sha256, checked when loading). :func:`merge` folds the adapters into the weights
(``W + (alpha / r) B A``) and gives plain ``nn.Linear`` layers back: what sampling, evaluation
and ``export --merge_lora=True`` use.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPT2_NAMES, Section, setting
from .download import sha256_of
from .errors import CheckpointError, ConfigError, first_line

# what lora_targets may name: the Linear layers of a block, by the end of their names
LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
GROUPS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj"), "all": LAYERS,
          "c_attn": ("attn.c_attn",), "c_proj": ("attn.c_proj", "mlp.c_proj"), "c_fc": ("mlp.c_fc",),
          "attn.c_attn": ("attn.c_attn",), "attn.c_proj": ("attn.c_proj",), "mlp.c_fc": ("mlp.c_fc",),
          "mlp.c_proj": ("mlp.c_proj",)}
SPEC_KEYS = ("rank", "alpha", "dropout", "targets", "base")


@dataclass
class LoraConfig(Section):
    """Low-rank adapters: the base weights stay frozen, only the adapters train."""

    lora_rank: int = setting(0, "Rank r of the LoRA adapters on the Linear layers lora_targets names; 0 trains every weight (no LoRA). Needs pretrained weights (init_from a GPT-2 name, a Hugging Face folder or a ckpt.pt file).",
                             ge=0, note="0 = off")
    lora_alpha: float = setting(16.0, "LoRA scale numerator: the adapters add (lora_alpha / lora_rank) B A x.", gt=0)
    lora_dropout: float = setting(0.0, "Dropout on the adapters' input (the frozen path sees x unchanged).", ge=0, lt=1)
    lora_targets: str = setting("attn", "Layers that get adapters: 'attn' (c_attn, attn.c_proj), 'mlp' (c_fc, mlp.c_proj), 'all', or a comma-separated list of names such as 'c_attn,c_fc' ('c_proj' means both projections; 'attn.c_proj' or 'mlp.c_proj' one).")

    def check(self) -> None:
        targets(self.lora_targets)


def targets(spec: str) -> tuple[str, ...]:
    """The layer names (from LAYERS) that ``lora_targets`` selects, in block order."""
    names = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else []
    if not names:
        raise ConfigError("lora_targets must name at least one layer: 'attn', 'mlp', 'all' or a list like 'c_attn,c_fc'; got %r" % (spec,))
    chosen = set()
    for n in names:
        if n not in GROUPS:
            raise ConfigError("lora_targets: unknown layer %r; choose from %s" % (n, ", ".join(GROUPS)))
        chosen.update(GROUPS[n])
    return tuple(n for n in LAYERS if n in chosen)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a low-rank adapter: ``y = W x + b + (alpha / r) B A dropout(x)``.

    Built from an existing layer, whose weight and bias Parameters it takes over (frozen); it is
    still an ``nn.Linear``, so code that looks for those finds it."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # (out, r): zero, so y starts at W x + b
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        """(alpha / r) B A, the adapter's change to the weight, in float32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding W + (alpha / r) B A (and the same bias)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_((self.weight.detach().float() + self.delta()).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias.detach())
        return out

    def extra_repr(self) -> str:
        return "%s, rank=%d, alpha=%g" % (super().extra_repr(), self.rank, self.alpha)


# --------------------------------------------------------------------------------------------
# a model with adapters


def _layers(model: nn.Module, names: tuple[str, ...]):
    """(parent module, attribute, layer) of every Linear inside the blocks whose name ends with one of names."""
    for i, block in enumerate(model.transformer.h):
        for full in names:
            part, attr = full.split(".")
            parent = getattr(block, part)
            yield "transformer.h.%d.%s" % (i, full), parent, attr, getattr(parent, attr)


def apply(model: nn.Module, rank: int, alpha: float, dropout: float, target_spec: str, base: dict) -> int:
    """Freeze every weight of ``model`` (a GPT), put adapters on the layers ``target_spec`` names,
    and record the settings and ``base`` (see :func:`base_reference`) as ``model.lora_spec``.
    Returns the number of adapted layers."""
    if spec(model) is not None:
        raise ConfigError("the model already has LoRA adapters; merge them first (nanogpt export --merge_lora=True)")
    names = targets(target_spec)
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for _, parent, attr, layer in _layers(model, names):
        if type(layer) is not nn.Linear:
            raise ConfigError("lora_rank: %s.%s is a %s, not a plain Linear layer (fp8?); pass --fp8=False"
                              % (type(parent).__name__, attr, type(layer).__name__))
        setattr(parent, attr, LoRALinear(layer, rank, alpha, dropout))
        n += 1
    model.lora_spec = {"rank": rank, "alpha": float(alpha), "dropout": float(dropout), "targets": target_spec,
                       "base": dict(base)}
    return n


def spec(model: nn.Module) -> dict | None:
    """The LoRA settings and base reference of a model with adapters, else None."""
    return getattr(model, "lora_spec", None)


def is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def adapter_state(state: dict) -> dict:
    """The adapter tensors of a full state dict (what a LoRA checkpoint stores as 'model')."""
    return {k: v for k, v in state.items() if is_adapter(k)}


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, in place: the model becomes a plain GPT again (its
    weights trainable, as a model loaded from a checkpoint is). Returns the model."""
    for block in model.transformer.h:
        for part in ("attn", "mlp"):
            parent = getattr(block, part)
            for attr, layer in list(parent.named_children()):
                if isinstance(layer, LoRALinear):
                    setattr(parent, attr, layer.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_spec"):
        del model.lora_spec
    return model


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trained parameters, all parameters)."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


# --------------------------------------------------------------------------------------------
# the base a checkpoint refers to


def _hf_weights_file(folder: str) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise CheckpointError("%s has neither model.safetensors nor pytorch_model.bin; give a folder written by save_pretrained" % folder)


def base_reference(init_from: str) -> dict:
    """How a LoRA checkpoint names its base: a GPT-2 name, or the path and sha256 of a Hugging
    Face folder's weights file or of a base checkpoint (ckpt.pt)."""
    if init_from in GPT2_NAMES:
        return {"kind": "gpt2", "name": init_from}
    if os.path.isdir(init_from):
        path = os.path.abspath(_hf_weights_file(init_from))
        return {"kind": "hf", "path": os.path.dirname(path), "file": os.path.basename(path), "sha256": sha256_of(path)}
    if os.path.isfile(init_from):
        path = os.path.abspath(init_from)
        return {"kind": "checkpoint", "path": path, "sha256": sha256_of(path)}
    raise ConfigError("lora_rank needs pretrained weights: init_from a GPT-2 name, a Hugging Face folder or a ckpt.pt file; got %r"
                      % init_from)


def describe_base(base: dict) -> str:
    return base["name"] if base.get("kind") == "gpt2" else base.get("path", "?")


def check_spec(lora: dict, path: str) -> None:
    """A checkpoint's 'lora' entry, each field checked."""
    bad = "%s: its LoRA entry is damaged (%%s); restore a good copy" % path
    if not isinstance(lora, dict) or any(k not in lora for k in SPEC_KEYS):
        raise CheckpointError(bad % ("it needs %s" % ", ".join(SPEC_KEYS)))
    if not isinstance(lora["rank"], int) or lora["rank"] <= 0:
        raise CheckpointError(bad % ("rank %r" % (lora["rank"],)))
    base = lora["base"]
    if not isinstance(base, dict) or base.get("kind") not in ("gpt2", "hf", "checkpoint"):
        raise CheckpointError(bad % "no base reference")
    if base["kind"] == "gpt2" and base.get("name") not in GPT2_NAMES:
        raise CheckpointError(bad % ("base %r is not a GPT-2 name" % (base.get("name"),)))
    if base["kind"] != "gpt2" and not (isinstance(base.get("path"), str) and isinstance(base.get("sha256"), str)):
        raise CheckpointError(bad % "the base has no path and sha256")
    try:
        targets(lora["targets"])
    except ConfigError as e:
        raise CheckpointError(bad % e) from None


def load_base(base: dict, path: str, dropout: float):
    """The base model a LoRA checkpoint at ``path`` refers to, its sha256 checked."""
    from .model import GPT
    kind = base["kind"]
    if kind == "gpt2":
        try:
            return GPT.from_pretrained(base["name"], dropout=dropout)
        except (OSError, ValueError, ImportError) as e:
            raise CheckpointError("cannot load %s, the base of the LoRA checkpoint %s: %s" % (base["name"], path, first_line(e))) from None
    file = os.path.join(base["path"], base["file"]) if kind == "hf" else base["path"]
    if not os.path.isfile(file):
        raise CheckpointError("the base of the LoRA checkpoint %s is missing: no file %s; put the base weights back there" % (path, file))
    got = sha256_of(file)
    if got != base["sha256"]:
        raise CheckpointError("the base of the LoRA checkpoint %s has changed: %s has sha256 %s..., the adapters were trained on %s...; "
                              "restore the base they were trained on" % (path, file, got[:12], base["sha256"][:12]))
    if kind == "hf":
        from .hf import load_pretrained
        try:
            return load_pretrained(base["path"], dropout=dropout)
        except (OSError, ValueError, ImportError) as e:
            raise CheckpointError("cannot load %s, the base of the LoRA checkpoint %s: %s" % (base["path"], path, first_line(e))) from None
    from .checkpoint import load_model
    model, ckpt = load_model(file, dropout=dropout)
    if spec(model) is not None:
        raise CheckpointError("the base of the LoRA checkpoint %s is itself a LoRA checkpoint (%s); merge it first" % (path, file))
    return model


def load_model(ckpt: dict, path: str, dropout: float):
    """The model of a LoRA checkpoint: its base (as the reference names it, cropped to the
    checkpoint's block_size) with the adapters put back on."""
    from .model import architecture_keys
    lora = ckpt["lora"]
    check_spec(lora, path)
    model = load_base(lora["base"], path, dropout)
    args = ckpt["model_args"]
    block = args.get("block_size", model.config.block_size)
    if isinstance(block, int) and 0 < block < model.config.block_size:
        model.crop_block_size(block)
    for k in architecture_keys():
        if k in args and getattr(model.config, k) != args[k]:
            raise CheckpointError("the base of the LoRA checkpoint %s has %s=%r, the adapters were trained with %r; "
                                  "restore the base they were trained on" % (path, k, getattr(model.config, k), args[k]))
    apply(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"], lora["base"])
    want = {k for k in model.state_dict() if is_adapter(k)}
    got = set(ckpt["model"])
    if want != got:
        missing, extra = sorted(want - got), sorted(got - want)
        raise CheckpointError("adapters in %s do not fit the model: missing %s; unexpected %s"
                              % (path, ", ".join(missing[:3]) or "none", ", ".join(extra[:3]) or "none"))
    try:
        model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as e:
        from .checkpoint import load_error_line
        raise CheckpointError("adapters in %s do not fit the model: %s" % (path, load_error_line(e))) from None
    return model
