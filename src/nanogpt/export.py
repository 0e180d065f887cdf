"""Export to Hugging Face format (``python export.py --out_dir=out --hf_dir=out-hf``) or to GGUF (``--gguf=model.gguf``, see gguf_export.py).

The folder written holds ``config.json`` and ``model.safetensors`` for transformers'
``GPT2LMHeadModel``, and the tokenizer files when the vocabulary is known: GPT-2's
``vocab.json`` / ``merges.txt`` (what ``GPT2Tokenizer`` reads) for GPT-2 BPE, a trained BPE's
``tokenizer.json`` with its ``tokenizer_config.json`` (what ``AutoTokenizer`` reads), or
``vocab_chars.json`` (the id -> character table) for a character-level dataset. The weight
mapping is hf.py's; a model with a feature GPT-2 lacks is refused before anything is written.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import asdict, dataclass

from . import checkpoint, lora
from .config import Config, Section, check_init_from, setting
from .errors import ConfigError, ExportError, run_command
from .gguf_export import architecture, check_gguf_target, write_gguf
from .hf import check_exportable, check_target, write_hf_folder
from .tokenizer import GPT2_VOCAB, Vocabulary, find_meta, vocabulary_kind, write_hf_tokenizer


@dataclass
class ExportSettings(Section):
    """What export.py writes, and from which model."""

    init_from: str = setting("resume", "'resume' (out_dir/ckpt.pt), a GPT-2 name ('gpt2', ..., 'gpt2-xl') or a local Hugging Face folder.")
    out_dir: str = setting("out", "Folder holding ckpt.pt when init_from='resume'.")
    hf_dir: str = setting("", "Folder to write (config.json, model.safetensors, tokenizer files); must not exist or be empty.", path="out")
    gguf: str = setting("", "GGUF file to write for llama.cpp / ollama (needs pip install gguf); with or instead of hf_dir.")
    gguf_type: str = setting("f16", "Weight type of the GGUF file's matrices (norms and biases stay f32).", choices=("f32", "f16", "q8_0"))
    overwrite: bool = setting(False, "Replace an existing, non-empty hf_dir, or an existing gguf file.")
    merge_lora: bool = setting(False, "The checkpoint holds LoRA adapters: fold them into the base weights (W + (alpha/r) B A) and write the merged model.")
    tokenizer: bool = setting(True, "Also write tokenizer files: GPT-2's vocab.json/merges.txt, a trained BPE's tokenizer.json, or vocab_chars.json for a character vocabulary (in a GGUF: its tokenizer.ggml keys; False writes tokenizer 'none').")
    data_root: str = setting("data", "Where the dataset folder (with meta.json) is looked up first; the training run's data_root is tried next.")
    mirror: str = setting("", "Local folder mirroring the GPT-2 BPE files (gpt2-bpe/encoder.json, gpt2-bpe/vocab.bpe); default $NANOGPT_DATA_MIRROR.",
                          path="dir")

    def check(self) -> None:
        if not self.hf_dir and not self.gguf:
            raise ConfigError("hf_dir or gguf must be set: the Hugging Face folder or the GGUF file to write, e.g. --hf_dir=out-hf "
                              "or --gguf=model.gguf")
        check_init_from(self.init_from, ("resume",))


class ExportConfig(Config):
    """Every key of export.py."""

    sections = (("export", ExportSettings),)


def load_source(cfg: ExportConfig):
    """(model, training config or None, a name for messages, checkpoint path or None)."""
    if cfg.init_from != "resume":
        if cfg.merge_lora:
            raise ExportError("merge_lora=True: %s has no LoRA adapters to merge; drop --merge_lora" % cfg.init_from)
        model, _ = checkpoint.load_for_inference(cfg.init_from, cfg.out_dir, dropout=None)
        return model, None, cfg.init_from, None
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = checkpoint.load(path, hint="train into that out_dir first, or pass --init_from=gpt2 (or a Hugging Face folder)")
    if cfg.hf_dir:
        check_exportable(ckpt["model_args"], path)  # before building: a feature must not just fail to load
    if cfg.gguf:
        architecture(ckpt["model_args"], path)
    if "lora" in ckpt and not cfg.merge_lora:
        raise ExportError("%s holds LoRA adapters on %s, which an exported model cannot hold apart; pass --merge_lora=True "
                          "to write the merged weights" % (path, lora.describe_base(ckpt["lora"].get("base") or {})))
    if cfg.merge_lora and "lora" not in ckpt:
        raise ExportError("merge_lora=True: %s holds whole weights, no LoRA adapters; drop --merge_lora" % path)
    model, ckpt = checkpoint.load_model(path, dropout=ckpt["model_args"].get("dropout", 0.0))  # the trained dropout goes into config.json
    name = "%s (iter %s)" % (path, ckpt.get("iter_num"))
    if cfg.merge_lora:
        lora.merge(model)
        name += " with its LoRA adapters merged"
    return model, ckpt.get("config") or {}, name, path


def export(cfg: ExportConfig) -> str:
    """Write the model ``cfg`` names as a Hugging Face folder and/or a GGUF file; returns the
    folder (or the file, with no hf_dir)."""
    cfg.validate()
    if cfg.hf_dir and importlib.util.find_spec("safetensors") is None:
        raise ExportError("export writes model.safetensors and needs safetensors: pip install safetensors")
    if cfg.gguf and importlib.util.find_spec("gguf") is None:
        raise ExportError("a GGUF export needs the gguf package: pip install gguf (or pip install -e '.[gguf]')")
    if cfg.hf_dir:
        check_target(cfg.hf_dir, cfg.overwrite)  # before loading a large model
    if cfg.gguf:
        check_gguf_target(cfg.gguf, cfg.overwrite)
    model, train_config, name, ckpt_path = load_source(cfg)
    if cfg.gguf:
        export_gguf(cfg, model, train_config, name, ckpt_path)
        if not cfg.hf_dir:
            return cfg.gguf
    model_args = asdict(model.config)
    vocab_size = model.config.vocab_size
    meta = find_meta(train_config, cfg.data_root) if train_config else None
    kind = vocabulary_kind(meta, vocab_size) if cfg.tokenizer else "none"
    vocab = Vocabulary(None, meta, kind, None)
    writer = None
    if kind in ("gpt2", "char", "bpe"):
        def writer(folder):
            return write_hf_tokenizer(folder, vocab, model.config.block_size, cfg.mirror or None)
    files = write_hf_folder(model, cfg.hf_dir, write_tokenizer=writer, gpt2_vocab=kind == "gpt2", overwrite=cfg.overwrite,
                            protected=ckpt_path, eot_token=meta.get("eot_token") if kind == "bpe" else None)

    print("exported %s to %s: %s" % (name, cfg.hf_dir, ", ".join(files)))
    print("  %.2fM parameters, vocab %d, context %d, %d layers x %d heads x %d wide, bias=%s"
          % (model.num_params(non_embedding=False) / 1e6, vocab_size, model_args["block_size"], model_args["n_layer"],
             model_args["n_head"], model_args["n_embd"], model_args.get("bias", True)))
    print("  load with: transformers.GPT2LMHeadModel.from_pretrained(%r)" % cfg.hf_dir)
    if kind == "gpt2":
        print("  tokenizer: GPT-2 BPE (transformers.GPT2Tokenizer.from_pretrained(%r))" % cfg.hf_dir)
        if vocab_size > GPT2_VOCAB:
            print("  ids %d..%d are padding the tokenizer never produces; mask them when sampling" % (GPT2_VOCAB, vocab_size - 1))
    elif kind == "bpe":
        print("  tokenizer: byte-level BPE of %d tokens (transformers.AutoTokenizer.from_pretrained(%r))" % (meta["vocab_size"], cfg.hf_dir))
        if vocab_size > meta["vocab_size"]:
            print("  ids %d..%d are padding the tokenizer never produces; mask them when sampling" % (meta["vocab_size"], vocab_size - 1))
    elif kind == "char":
        print("  tokenizer: one token per character, not a Hugging Face tokenizer; vocab_chars.json maps ids to text:")
        print("    itos = json.load(open('%s/vocab_chars.json'))['itos']; text = ''.join(itos[i] for i in ids)" % cfg.hf_dir)
    elif kind == "none":
        print("  no tokenizer files written (--tokenizer=False)")
    else:
        if meta:
            note = "the dataset's tokenizer is %r, not GPT-2's: encode with tiktoken.get_encoding(%r)" % (
                meta.get("tokenizer"), meta.get("tokenizer"))
        else:
            note = "no meta.json found for the training dataset; pass --data_root=<folder holding the dataset folder>"
        print("  no tokenizer files written: %s" % note, file=sys.stderr)
    return cfg.hf_dir


def export_gguf(cfg: ExportConfig, model, train_config, name: str, ckpt_path) -> None:
    """The GGUF half of :func:`export` (gguf_export.py does the writing)."""
    check_gguf_target(cfg.gguf, cfg.overwrite, ckpt_path)
    meta = find_meta(train_config, cfg.data_root) if train_config else None
    vocab = Vocabulary(None, meta, vocabulary_kind(meta, model.config.vocab_size), None, (train_config or {}).get("dataset"))
    info = write_gguf(model, cfg.gguf, vocab if cfg.tokenizer else None, cfg.gguf_type, mirror=cfg.mirror or None,
                      name=os.path.basename(os.path.abspath(cfg.out_dir if cfg.init_from == "resume" else cfg.init_from)),
                      source=name)
    types = ", ".join("%d %s" % (n, t) for t, n in sorted(info["types"].items()))
    print("exported %s to %s: GGUF architecture %s, %d tensors (%s), %.1f MB, tokenizer %s"
          % (name, cfg.gguf, info["arch"], info["tensors"], types, info["bytes"] / 1e6, info["tokenizer"]))
    ctx = model.config.block_size
    print("  run with: llama-cli -m %s -c %d -n %d -p 'Hello' -no-cnv, or llama_cpp.Llama(model_path=%r, n_ctx=%d)"
          % (cfg.gguf, ctx, ctx // 2, cfg.gguf, ctx))


def main(argv: list[str] | None = None) -> None:
    run_command(lambda args: export(ExportConfig.parse(args)), argv)


if __name__ == "__main__":
    main()
