"""Export to Hugging Face format: ``python export.py --out_dir=out --hf_dir=out-hf``.

The folder written holds ``config.json`` and ``model.safetensors`` for transformers'
``GPT2LMHeadModel``, and the tokenizer files when the vocabulary is known: GPT-2's
``vocab.json`` / ``merges.txt`` (what ``GPT2Tokenizer`` reads) for GPT-2 BPE, or
``vocab_chars.json`` (the id -> character table) for a character-level dataset.

Only models that are GPT-2 in shape can be exported; a checkpoint whose ``model_args`` name a
feature GPT-2 lacks is refused. Differences that do not change the function are bridged: GPT-2
stores the attention and MLP weights as Conv1D, the transpose of our ``nn.Linear``; a model
trained with ``bias=False`` gets zero biases; a tied output layer is stored once, as the token
embeddings, and an untied one (``untied_head``) as ``lm_head.weight`` with
``tie_word_embeddings: false``. Everything is written to a temporary folder beside ``hf_dir`` and renamed into
place at the end, so an interrupted export leaves no half-written model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict

import torch
import torch.nn as nn

from . import checkpoint
from .config import ExportConfig, UserError, load_config, run_cli
from .model import GPT, GPTConfig

GPT2_VOCAB = 50257  # GPT-2 BPE: 50,256 merges-derived tokens plus <|endoftext|>
GPT2_EOT = 50256
EOT_TEXT = "<|endoftext|>"
# model_args keys of GPT-2's own shape; any value of these exports
GPT2_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "untied_head")
# other model_args keys that still describe a GPT-2 at exactly these values (a feature switched
# off); every key in neither table is refused, so a new feature is never exported silently
GPT2_EQUIVALENT = {"rope": False, "qk_norm": False, "mlp_activation": "gelu"}
# weights that GPT-2 keeps as Conv1D (in, out): the transpose of our nn.Linear (out, in)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT-2's BPE files; Hugging Face calls them vocab.json and merges.txt
BPE_FILES = (
    ("vocab.json", "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783", "gpt2-bpe/encoder.json"),
    ("merges.txt", "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
     "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", "gpt2-bpe/vocab.bpe"),
)


class ExportError(UserError):
    """A model or target folder that cannot be exported as asked; one line."""


# --------------------------------------------------------------------------------------------
# what can be exported


def check_gpt2_compatible(model_args: dict, source: str) -> None:
    """Refuse a model with a feature GPT2LMHeadModel does not have."""
    for key, value in model_args.items():
        if key in GPT2_FIELDS:
            continue
        if key in GPT2_EQUIVALENT and value == GPT2_EQUIVALENT[key] and type(value) is type(GPT2_EQUIVALENT[key]):
            continue
        raise ExportError("%s has %s=%r, a feature GPT-2 lacks: GPT2LMHeadModel cannot run it, so it cannot be exported"
                          % (source, key, value))


def hf_config(model_args: dict, gpt2_vocab: bool) -> dict:
    """config.json for transformers' GPT2LMHeadModel."""
    block = int(model_args["block_size"])
    dropout = float(model_args.get("dropout", 0.0))
    eot = GPT2_EOT if gpt2_vocab else None
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


# --------------------------------------------------------------------------------------------
# the vocabulary


def find_meta(train_config: dict | None, data_root: str) -> dict | None:
    """The meta dict of the training dataset: looked up under ``data_root`` first, then under
    the data_root the run was trained with (a folder without meta.json is passed over)."""
    from .prepare import load_meta
    dataset = (train_config or {}).get("dataset")
    if not dataset:
        return None
    for root in (data_root, (train_config or {}).get("data_root")):
        folder = os.path.join(root, dataset) if root else ""
        meta = load_meta(folder) if folder and os.path.isdir(folder) else None
        if meta is not None:
            return meta
    return None


def vocabulary_kind(meta: dict | None, vocab_size: int) -> str:
    """'char' (a character table), 'gpt2' (GPT-2 BPE), or 'unknown'.

    Without a meta.json (GPT-2 weights, or a dataset folder that is not at hand) the vocabulary
    is GPT-2's when the model holds at least its 50,257 ids, as training and sampling assume."""
    if meta and "stoi" in meta and "itos" in meta:
        return "char"
    if vocab_size < GPT2_VOCAB:
        return "unknown"
    if meta:
        ok = (meta.get("tokenizer") or "gpt2") == "gpt2" and meta.get("vocab_size", GPT2_VOCAB) == GPT2_VOCAB
        return "gpt2" if ok else "unknown"
    return "gpt2"


def write_gpt2_tokenizer(folder: str, block_size: int, mirror: str | None) -> list[str]:
    """vocab.json, merges.txt (checked by sha256; from the data mirror when one is set) and the
    two small files GPT2Tokenizer reads its special tokens from."""
    from .prepare import PrepareError, fetch
    for name, url, sha, mirror_path in BPE_FILES:
        try:
            fetch(url, os.path.join(folder, name), sha, mirror_path, mirror)
        except PrepareError as e:
            raise ExportError("%s; or pass --tokenizer=False to export the model alone" % e) from None
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    tok_config = dict(special, tokenizer_class="GPT2Tokenizer", model_max_length=block_size, add_prefix_space=False,
                      add_bos_token=False, errors="replace", clean_up_tokenization_spaces=False)
    _write_json(os.path.join(folder, "tokenizer_config.json"), tok_config)
    _write_json(os.path.join(folder, "special_tokens_map.json"), special)
    return [name for name, *_ in BPE_FILES] + ["tokenizer_config.json", "special_tokens_map.json"]


def write_char_table(folder: str, meta: dict) -> list[str]:
    """vocab_chars.json: ``itos`` (a list: id -> character) and ``stoi`` (character -> id)."""
    itos = {int(k): v for k, v in meta["itos"].items()}
    table = [itos.get(i, "") for i in range(max(itos) + 1)]
    _write_json(os.path.join(folder, "vocab_chars.json"), {"vocab_size": len(table), "itos": table,
                                                            "stoi": {c: i for i, c in enumerate(table) if c}})
    return ["vocab_chars.json"]


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# the target folder


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


def write_hf_folder(model: GPT, model_args: dict, hf_dir: str, *, vocab: str = "unknown", meta: dict | None = None,
                    overwrite: bool = False, mirror: str | None = None, protected: str | None = None) -> list[str]:
    """Write the model (and the tokenizer files its vocabulary ``vocab`` allows: 'gpt2' or
    'char' with ``meta``) as a Hugging Face folder, atomically. Returns the file names."""
    from safetensors.torch import save_file

    check_target(hf_dir, overwrite, protected)
    parent = os.path.dirname(os.path.abspath(hf_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(hf_dir)) + ".", suffix=".tmp", dir=parent)
    try:
        _write_json(os.path.join(tmp, "config.json"), hf_config(model_args, vocab == "gpt2"))
        save_file(hf_state_dict(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        files = ["config.json", "model.safetensors"]
        if vocab == "gpt2":
            files += write_gpt2_tokenizer(tmp, int(model_args["block_size"]), mirror)
        elif vocab == "char":
            files += write_char_table(tmp, meta)
        mask = _umask()  # mkdtemp (and safetensors) make private files: give them the usual modes
        os.chmod(tmp, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        _move_into_place(tmp, hf_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return files


# --------------------------------------------------------------------------------------------
# command line


def load_source(cfg: ExportConfig) -> tuple[GPT, dict, dict | None, str, str | None]:
    """(model, model_args, training config or None, a name for messages, checkpoint path or None)."""
    if cfg.init_from == "resume":
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        ckpt = checkpoint.load(path)
        check_gpt2_compatible(ckpt["model_args"], path)  # before building: a feature must not just fail to load
        args = {k: v for k, v in ckpt["model_args"].items() if k in GPT2_FIELDS}
        model = GPT(GPTConfig(**dict(args, dropout=0.0)))
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise ExportError("weights in %s do not fit a GPT-2: %s" % (path, checkpoint.load_error_line(e))) from None
        name = "%s (iter %s)" % (path, ckpt.get("iter_num"))
        return model, dict(ckpt["model_args"]), ckpt.get("config") or {}, name, path
    try:
        model = GPT.from_pretrained(cfg.init_from)
    except (OSError, ValueError, ImportError) as e:
        raise ExportError("cannot load %s: %s" % (cfg.init_from, e)) from None
    return model, asdict(model.config), None, cfg.init_from, None


def export(argv: list[str]) -> str:
    cfg, _ = load_config(ExportConfig, argv)
    cfg.validate()
    if importlib.util.find_spec("safetensors") is None:
        raise ExportError("export writes model.safetensors and needs safetensors: pip install safetensors")
    check_target(cfg.hf_dir, cfg.overwrite)  # before loading a large model
    model, model_args, train_config, name, ckpt_path = load_source(cfg)
    vocab_size = int(model_args["vocab_size"])
    meta = find_meta(train_config, cfg.data_root) if train_config else None
    vocab = vocabulary_kind(meta, vocab_size) if cfg.tokenizer else "none"
    files = write_hf_folder(model, model_args, cfg.hf_dir, vocab=vocab, meta=meta, overwrite=cfg.overwrite,
                            mirror=cfg.mirror or None, protected=ckpt_path)

    print("exported %s to %s: %s" % (name, cfg.hf_dir, ", ".join(files)))
    print("  %.2fM parameters, vocab %d, context %d, %d layers x %d heads x %d wide, bias=%s"
          % (model.num_params(non_embedding=False) / 1e6, vocab_size, model_args["block_size"], model_args["n_layer"],
             model_args["n_head"], model_args["n_embd"], model_args.get("bias", True)))
    print("  load with: transformers.GPT2LMHeadModel.from_pretrained(%r)" % cfg.hf_dir)
    if vocab == "gpt2":
        print("  tokenizer: GPT-2 BPE (transformers.GPT2Tokenizer.from_pretrained(%r))" % cfg.hf_dir)
        if vocab_size > GPT2_VOCAB:
            print("  ids %d..%d are padding the tokenizer never produces; mask them when sampling" % (GPT2_VOCAB, vocab_size - 1))
    elif vocab == "char":
        print("  tokenizer: one token per character, not a Hugging Face tokenizer; vocab_chars.json maps ids to text:")
        print("    itos = json.load(open('%s/vocab_chars.json'))['itos']; text = ''.join(itos[i] for i in ids)" % cfg.hf_dir)
    elif vocab == "none":
        print("  no tokenizer files written (--tokenizer=False)")
    else:
        if meta:
            note = "the dataset's tokenizer is %r, not GPT-2's: encode with tiktoken.get_encoding(%r)" % (
                meta.get("tokenizer"), meta.get("tokenizer"))
        else:
            note = "no meta.json found for the training dataset; pass --data_root=<folder holding the dataset folder>"
        print("  no tokenizer files written: %s" % note, file=sys.stderr)
    return cfg.hf_dir


def main(argv: list[str] | None = None) -> None:
    run_cli(export, argv)


if __name__ == "__main__":
    main()
