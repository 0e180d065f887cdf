"""GPT-2 weights to and from Hugging Face's format (``GPT2LMHeadModel``): one key map, both ways.

Our names are GPT-2's own; the differences are layouts and gaps. GPT-2 stores the attention and
MLP matrices as Conv1D, the transpose of our ``nn.Linear``; a model trained with ``bias=False``
is written with zero biases (GPT-2 always has them); a tied output layer is stored once, as the
token embeddings, and an untied one (``untied_head``) as ``lm_head.weight`` with
``tie_word_embeddings: false``. Models with a feature GPT-2 lacks cannot be written.

Reading needs no transformers: config.json and model.safetensors (or pytorch_model.bin, read
with ``weights_only``) are enough. Writing goes to a temporary folder renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict

import torch
import torch.nn as nn

from .errors import ExportError
from .model import GPT, GPTConfig, features_on

HUB_NAMES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
# weights that GPT-2 keeps as Conv1D (in, out): the transpose of our nn.Linear (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SKIPPED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older files, not weights
GPT2_EOT = 50256


def to_ours(key: str) -> str:
    """A Hugging Face weight name -> ours (older files leave out the ``transformer.`` prefix)."""
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


# --------------------------------------------------------------------------------------------
# reading


def hf_folder(name_or_path: str) -> str:
    """A local folder with config.json and weights: as given, or downloaded from the hub."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise FileNotFoundError("%s has no config.json; expected a folder written by save_pretrained" % name_or_path)
        return name_or_path
    if name_or_path not in HUB_NAMES:
        raise FileNotFoundError("%r is neither a GPT-2 name (%s) nor a folder" % (name_or_path, ", ".join(HUB_NAMES)))
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("loading %s needs huggingface_hub: pip install 'nanogpt[hf]'" % name_or_path) from None
    return snapshot_download(HUB_NAMES[name_or_path], allow_patterns=["config.json", "*.safetensors"])


def read_weights(folder: str) -> dict:
    st = os.path.join(folder, "model.safetensors")
    if os.path.isfile(st):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError("reading %s needs safetensors: pip install safetensors" % st) from None
        return load_file(st)
    pt = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError("%s has neither model.safetensors nor pytorch_model.bin" % folder)


def config_from_hf(hf: dict, folder: str, dropout: float | None = None) -> GPTConfig:
    """Our GPTConfig for a GPT-2 config.json; anything GPT-2-like but different is refused."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError("%s holds a %r model, not GPT-2" % (folder, hf.get("model_type")))
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError("%s uses activation %r; only GPT-2's tanh GELU is supported" % (folder, act))
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError("%s sets %s, which this model does not implement" % (folder, flag))
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise ValueError("%s uses layer_norm_epsilon=%s; GPT-2 uses 1e-5" % (folder, hf.get("layer_norm_epsilon")))
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True,
                     dropout=float(hf.get("resid_pdrop", 0.1) if dropout is None else dropout),
                     untied_head=not hf.get("tie_word_embeddings", True))


def load_pretrained(name_or_path: str, dropout: float | None = None) -> GPT:
    """GPT-2 weights from the Hugging Face hub ('gpt2' ... 'gpt2-xl') or a local folder written
    by ``save_pretrained``; every weight checked for shape and for nan/inf."""
    from .checkpoint import check_finite
    folder = hf_folder(name_or_path)
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    model = GPT(config_from_hf(hf, folder, dropout))
    sd = model.state_dict()
    src = read_weights(folder)
    check_finite(src, folder)
    loaded = set()
    for key, w in src.items():
        if key.endswith(SKIPPED):
            continue
        name = to_ours(key)
        if name not in sd:
            raise ValueError("unexpected weight %r in %s" % (key, folder))
        if name.endswith(CONV1D):
            w = w.t()
        if w.shape != sd[name].shape:
            raise ValueError("weight %r has shape %s, expected %s" % (key, tuple(w.shape), tuple(sd[name].shape)))
        with torch.no_grad():
            sd[name].copy_(w)
        loaded.add(name)
    missing = set(sd) - loaded - (set() if model.config.untied_head else {"lm_head.weight"})  # a tied lm_head is wte
    if missing:
        raise ValueError("%s lacks weights: %s" % (folder, ", ".join(sorted(missing)[:5])))
    return model


# --------------------------------------------------------------------------------------------
# writing


def check_exportable(model_args: dict, source: str) -> None:
    """Refuse a model with a feature GPT2LMHeadModel does not have (untied_head it has)."""
    on = {k: v for k, v in features_on(model_args).items() if k != "untied_head"}
    if on:
        key, value = next(iter(on.items()))
        raise ExportError("%s has %s=%r, a feature GPT-2 lacks: GPT2LMHeadModel cannot run it, so it cannot be exported"
                          % (source, key, value))


def hf_config(model_args: dict, gpt2_vocab: bool, eot_token: int | None = None) -> dict:
    """config.json for transformers' GPT2LMHeadModel; ``eot_token`` (GPT-2's 50256 when
    ``gpt2_vocab``) becomes the beginning and end token id."""
    block = int(model_args["block_size"])
    dropout = float(model_args.get("dropout", 0.0))
    eot = GPT2_EOT if gpt2_vocab else eot_token
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": int(model_args["vocab_size"]),  # a padded vocabulary stays padded
        "n_positions": block,
        "n_ctx": block,
        "n_embd": int(model_args["n_embd"]),
        "n_layer": int(model_args["n_layer"]),
        "n_head": int(model_args["n_head"]),
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # GPT-2's tanh GELU, as in our MLP
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": not model_args.get("untied_head", False),
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
        "dtype": "float32",  # the name newer transformers versions read
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names and layouts, fp32, with zero biases where the model has
    none; a tied lm_head is left out (it is the token embedding)."""
    out = {}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and not model.config.untied_head:
            continue  # tied: transformers rebuilds it from transformer.wte.weight
        w = w.detach().to("cpu", torch.float32)
        if name.endswith(CONV1D):
            w = w.t()  # (out, in) -> (in, out)
        out[name] = w.contiguous()
    for name, module in model.named_modules():  # bias=False: GPT-2 always has biases, so add zeros
        if name == "lm_head":
            continue
        if isinstance(module, nn.Linear) and module.bias is None:
            out[name + ".bias"] = torch.zeros(module.out_features, dtype=torch.float32)
        elif isinstance(module, nn.LayerNorm) and module.bias is None:
            out[name + ".bias"] = torch.zeros(module.normalized_shape, dtype=torch.float32)
    return out


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def check_target(hf_dir: str, overwrite: bool, protected: str | None = None) -> None:
    """Refuse a target that is a file, a non-empty folder (unless ``overwrite``), or a folder
    holding ``protected`` (the checkpoint being exported)."""
    if os.path.lexists(hf_dir) and not os.path.isdir(hf_dir):
        raise ExportError("hf_dir %s is a file, not a folder; choose another --hf_dir" % hf_dir)
    if protected:
        target, src = os.path.realpath(hf_dir), os.path.realpath(protected)
        if os.path.commonpath([target, src]) == target:
            raise ExportError("hf_dir %s holds the checkpoint being exported (%s); choose another --hf_dir" % (hf_dir, protected))
    if os.path.isdir(hf_dir) and os.listdir(hf_dir) and not overwrite:
        raise ExportError("hf_dir %s exists and is not empty; choose another --hf_dir, or pass --overwrite=True to replace it" % hf_dir)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(tmp: str, hf_dir: str) -> None:
    """Rename the finished folder over ``hf_dir``; an existing one is set aside first and only
    deleted once the new one is in place."""
    if not os.path.lexists(hf_dir):
        os.rename(tmp, hf_dir)
        return
    old = tmp + ".old"
    os.rename(hf_dir, old)
    try:
        os.rename(tmp, hf_dir)
    except BaseException:
        os.rename(old, hf_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_hf_folder(model: GPT, hf_dir: str, *, write_tokenizer=None, gpt2_vocab: bool = False,
                    overwrite: bool = False, protected: str | None = None, eot_token: int | None = None) -> list[str]:
    """Write the model as a Hugging Face folder, atomically; ``write_tokenizer(folder)`` adds
    tokenizer files and returns their names. Returns every file name written."""
    from safetensors.torch import save_file

    model_args = asdict(model.config)
    check_exportable(model_args, hf_dir)
    check_target(hf_dir, overwrite, protected)
    parent = os.path.dirname(os.path.abspath(hf_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(hf_dir)) + ".", suffix=".tmp", dir=parent)
    try:
        write_json(os.path.join(tmp, "config.json"), hf_config(model_args, gpt2_vocab, eot_token))
        save_file(hf_state_dict(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        files = ["config.json", "model.safetensors"]
        if write_tokenizer is not None:
            files += write_tokenizer(tmp)
        mask = _umask()  # mkdtemp (and safetensors) make private files: give them the usual modes
        os.chmod(tmp, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        _move_into_place(tmp, hf_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return files
