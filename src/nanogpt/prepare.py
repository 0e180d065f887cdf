"""Dataset preparation: checked downloads, tokenisation, token files and meta.json.

    nanogpt prepare shakespeare_char            # characters, uint16, 90/10 split
    nanogpt prepare shakespeare                 # GPT-2 BPE
    nanogpt prepare openwebtext                 # Hugging Face dataset (needs `datasets`)
    nanogpt prepare corpus --source=PATH_OR_HF_NAME --out_dir=data/mine

Every dataset folder gets ``train.bin`` and ``val.bin`` (raw token ids) and ``meta.json``
(vocab_size, dtype, token counts, and the character table for char-level data).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import sys
import urllib.request

import numpy as np

from .config import UserError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
OPENWEBTEXT_HF = "Skylion007/openwebtext"
EOT = 50256  # GPT-2's <|endoftext|>


class PrepareError(UserError):
    pass


# --------------------------------------------------------------------------------------------
# downloads


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mirror_dir(mirror: str | None = None) -> str | None:
    """The local mirror folder: the argument, else $NANOGPT_DATA_MIRROR."""
    return mirror or os.environ.get("NANOGPT_DATA_MIRROR") or None


def fetch(url: str, dest: str, sha256: str, mirror_relpath: str, mirror: str | None = None) -> str:
    """Make ``dest`` hold the file at ``url`` with the given sha256: keep it if it is already
    right, else copy it from the mirror, else download it. Never leaves a partial file."""
    if os.path.isfile(dest):
        got = sha256_of(dest)
        if got == sha256:
            return dest
        raise PrepareError("%s exists but its sha256 is %s, not %s; delete it to fetch a fresh copy" % (dest, got, sha256))
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = dest + ".tmp%d" % os.getpid()
    mdir = mirror_dir(mirror)
    try:
        if mdir:
            src = os.path.join(mdir, mirror_relpath)
            if not os.path.isfile(src):
                raise PrepareError("mirror %s has no %s; fix --mirror / NANOGPT_DATA_MIRROR or unset it to download" % (mdir, mirror_relpath))
            shutil.copyfile(src, tmp)
            origin = src
        else:
            try:
                with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as e:
                raise PrepareError("download of %s failed (%s); offline, set NANOGPT_DATA_MIRROR to a folder holding %s"
                                   % (url, getattr(e, "reason", e), mirror_relpath)) from None
            origin = url
        got = sha256_of(tmp)
        if got != sha256:
            raise PrepareError("%s from %s has sha256 %s, expected %s; the source is damaged or changed" % (os.path.basename(dest), origin, got, sha256))
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def shakespeare_text(out_dir: str, mirror: str | None = None) -> str:
    """tiny Shakespeare: out_dir/input.txt, reusing the char dataset's copy when it is right."""
    dest = os.path.join(out_dir, "input.txt")
    sibling = os.path.join(os.path.dirname(os.path.abspath(out_dir)), "shakespeare_char", "input.txt")
    if not os.path.isfile(dest) and os.path.isfile(sibling) and sha256_of(sibling) == SHAKESPEARE_SHA256:
        os.makedirs(out_dir, exist_ok=True)
        shutil.copyfile(sibling, dest)
    fetch(SHAKESPEARE_URL, dest, SHAKESPEARE_SHA256, "tinyshakespeare/input.txt", mirror)
    with open(dest, encoding="utf-8") as f:
        return f.read()


# --------------------------------------------------------------------------------------------
# writing token files


def write_tokens(path: str, ids: np.ndarray) -> None:
    tmp = path + ".tmp"
    ids.tofile(tmp)
    os.replace(tmp, path)


def write_meta(out_dir: str, meta: dict) -> None:
    tmp = os.path.join(out_dir, "meta.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    os.replace(tmp, os.path.join(out_dir, "meta.json"))


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def prepare_shakespeare_char(out_dir: str = "data/shakespeare_char", mirror: str | None = None) -> dict:
    text = shakespeare_text(out_dir, mirror)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    write_tokens(os.path.join(out_dir, "train.bin"), ids[:n])
    write_tokens(os.path.join(out_dir, "val.bin"), ids[n:])
    meta = {"vocab_size": len(chars), "dtype": "uint16", "tokenizer": "char", "train_tokens": n,
            "val_tokens": len(ids) - n, "max_token_id": len(chars) - 1,
            "stoi": stoi, "itos": {str(i): c for i, c in enumerate(chars)}}
    write_meta(out_dir, meta)
    print("%s: vocab %d, train %s tokens, val %s tokens" % (out_dir, len(chars), f"{n:,}", f"{len(ids) - n:,}"))
    return meta


def prepare_shakespeare(out_dir: str = "data/shakespeare", mirror: str | None = None) -> dict:
    """GPT-2 BPE; each split ends with <|endoftext|>, as each document did in GPT-2's training."""
    from .tokenizer import get_gpt2_encoding
    text = shakespeare_text(out_dir, mirror)
    enc = get_gpt2_encoding(mirror)
    n = int(0.9 * len(text))
    splits = {"train": text[:n], "val": text[n:]}
    counts = {}
    for split, part in splits.items():
        ids = np.array(enc.encode_ordinary(part) + [EOT], dtype=np.uint16)
        write_tokens(os.path.join(out_dir, "%s.bin" % split), ids)
        counts[split] = len(ids)
    meta = {"vocab_size": enc.n_vocab, "dtype": "uint16", "tokenizer": "gpt2", "train_tokens": counts["train"],
            "val_tokens": counts["val"], "max_token_id": EOT}
    write_meta(out_dir, meta)
    print("%s: GPT-2 BPE, train %s tokens, val %s tokens" % (out_dir, f"{counts['train']:,}", f"{counts['val']:,}"))
    return meta


# --------------------------------------------------------------------------------------------
# any corpus


def list_documents(source: str, text_field: str = "text", hf_split: str = "train"):
    """(count, iterator factory) over documents: local .txt/.jsonl/.json files or folders, or a
    Hugging Face dataset name."""
    if os.path.exists(source):
        files = [source] if os.path.isfile(source) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs if f.endswith((".txt", ".jsonl", ".json")))
        if not files:
            raise PrepareError("no .txt, .jsonl or .json files under %s" % source)
        docs = []  # (file, line number or -1): documents are read again by the workers' feeder
        for path in files:
            if path.endswith(".txt"):
                docs.append((path, -1))
            else:
                with open(path, encoding="utf-8") as f:
                    docs.extend((path, i) for i, line in enumerate(f) if line.strip())
        return docs, lambda order: _local_docs(docs, order, text_field)
    try:
        import datasets
    except ImportError:
        raise PrepareError("%r is not a local path, and loading it from the Hugging Face hub needs `datasets`: pip install 'nanogpt[datasets]'" % source) from None
    ds = datasets.load_dataset(source, split=hf_split)
    if text_field not in ds.column_names:
        raise PrepareError("dataset %s has no %r column (columns: %s); pass --text_field" % (source, text_field, ", ".join(ds.column_names)))
    return list(range(len(ds))), lambda order: (ds[int(i)][text_field] for i in order)


def _local_docs(docs, order, text_field):
    cache_path, lines = None, None
    for i in order:
        path, line_no = docs[i]
        if line_no < 0:
            with open(path, encoding="utf-8") as f:
                yield f.read()
            continue
        if path != cache_path:  # jsonl files are read once per run of consecutive documents
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
            cache_path = path
        try:
            row = json.loads(lines[line_no])
        except json.JSONDecodeError as e:
            raise PrepareError("%s line %d is not valid JSON (%s)" % (path, line_no + 1, e.msg)) from None
        if not isinstance(row, dict) or text_field not in row:
            raise PrepareError("%s line %d has no %r field; pass --text_field" % (path, line_no + 1, text_field))
        yield row[text_field]


_ENC = None


def _encode_doc(text: str) -> np.ndarray:
    global _ENC
    if _ENC is None:
        from .tokenizer import get_gpt2_encoding
        _ENC = get_gpt2_encoding()
    ids = _ENC.encode_ordinary(text)
    ids.append(EOT)
    return np.array(ids, dtype=np.uint32)


def prepare_corpus(out_dir: str, source: str, *, text_field: str = "text", val_fraction: float = 0.0005,
                   num_proc: int | None = None, hf_split: str = "train", seed: int = 2357,
                   mirror: str | None = None) -> dict:
    """Tokenise any corpus with GPT-2 BPE (one <|endoftext|> after each document) into
    train.bin / val.bin, holding out a seeded random share of documents for validation."""
    from tqdm import tqdm
    from .tokenizer import get_gpt2_encoding
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError("val_fraction must be in [0, 1); got %r" % val_fraction)
    enc = get_gpt2_encoding(mirror)  # fail early (and set up the cache path for the workers)
    docs, read = list_documents(source, text_field, hf_split)
    n = len(docs)
    if n == 0:
        raise PrepareError("%s holds no documents" % source)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1 if n >= 2 else 0, round(n * val_fraction)))
    splits = {"val": sorted(order[:n_val]), "train": sorted(order[n_val:])}
    dtype = np.dtype(token_dtype(enc.n_vocab))
    num_proc = max(1, num_proc or min(8, os.cpu_count() or 1))
    os.makedirs(out_dir, exist_ok=True)
    counts, top = {}, 0
    for split in ("train", "val"):
        path = os.path.join(out_dir, "%s.bin" % split)
        tmp = path + ".tmp"
        total = 0
        with open(tmp, "wb") as f, tqdm(total=len(splits[split]), desc="tokenizing %s" % split, unit="doc") as bar:
            texts = read(splits[split])
            if num_proc > 1:
                import multiprocessing as mp
                with mp.get_context("spawn").Pool(num_proc) as pool:
                    pieces = pool.imap(_encode_doc, texts, chunksize=16)
                    total, top = _write_pieces(pieces, f, dtype, bar, total, top)
            else:
                total, top = _write_pieces(map(_encode_doc, texts), f, dtype, bar, total, top)
        os.replace(tmp, path)
        counts[split] = total
    meta = {"vocab_size": enc.n_vocab, "dtype": dtype.name, "tokenizer": "gpt2", "train_tokens": counts["train"],
            "val_tokens": counts["val"], "max_token_id": int(top),
            "documents": {"train": len(splits["train"]), "val": len(splits["val"])}, "source": source}
    write_meta(out_dir, meta)
    print("%s: %s documents, train %s tokens, val %s tokens (%s)" % (out_dir, f"{n:,}", f"{counts['train']:,}",
                                                                     f"{counts['val']:,}", dtype.name))
    return meta


def _write_pieces(pieces, f, dtype, bar, total, top, flush_tokens: int = 1 << 22):
    """Append token arrays to an open file in chunks of about flush_tokens: bounded memory."""
    buf, held = [], 0
    for ids in pieces:
        buf.append(ids)
        held += len(ids)
        bar.update(1)
        if held >= flush_tokens:
            chunk = np.concatenate(buf)
            top = max(top, int(chunk.max()))
            f.write(chunk.astype(dtype).tobytes())
            total += len(chunk)
            buf, held = [], 0
    if buf:
        chunk = np.concatenate(buf)
        top = max(top, int(chunk.max()))
        f.write(chunk.astype(dtype).tobytes())
        total += len(chunk)
    return total, top


# --------------------------------------------------------------------------------------------
# reading meta


class _PlainUnpickler(pickle.Unpickler):
    """nanoGPT's meta.pkl holds only dicts, strings and ints, which need no classes; anything
    that asks for a class is refused instead of imported."""

    def find_class(self, module, name):
        raise PrepareError("meta.pkl asks for %s.%s: refusing to unpickle anything but plain dicts, strings and numbers"
                           % (module, name))


def load_meta(data_dir: str) -> dict | None:
    """meta.json (or a legacy meta.pkl) of a dataset folder, or None when there is neither."""
    path = os.path.join(data_dir, "meta.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise PrepareError("%s is not valid JSON (%s); re-run the dataset's prepare.py" % (path, e.msg)) from None
    else:
        path = os.path.join(data_dir, "meta.pkl")
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            meta = _PlainUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(meta, dict):
            raise PrepareError("%s does not hold a dict" % path)
    if "itos" in meta:
        meta["itos"] = {int(k): v for k, v in meta["itos"].items()}
    meta.setdefault("dtype", "uint16")
    return meta


# --------------------------------------------------------------------------------------------
# command line

DATASETS = ("shakespeare_char", "shakespeare", "openwebtext", "corpus")


def main(argv: list[str] | None = None, default_name: str | None = None) -> None:
    p = argparse.ArgumentParser(prog="nanogpt prepare", description="Prepare a dataset into train.bin / val.bin / meta.json.")
    if default_name is None:
        p.add_argument("name", choices=DATASETS)
    p.add_argument("--out_dir", help="output folder (default data/<name>)")
    p.add_argument("--mirror", help="local folder mirroring the downloads (default $NANOGPT_DATA_MIRROR)")
    p.add_argument("--source", help="corpus: a .txt/.jsonl file or folder, or a Hugging Face dataset name")
    p.add_argument("--text_field", default="text", help="JSON field / dataset column holding the text")
    p.add_argument("--val_fraction", type=float, default=0.0005, help="share of documents held out for val.bin")
    p.add_argument("--num_proc", type=int, default=None, help="tokenizer processes (default: min(8, CPUs))")
    p.add_argument("--split", default="train", help="Hugging Face dataset split to read")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    name = default_name or args.name
    out_dir = args.out_dir or os.path.join("data", name)
    try:
        if name == "shakespeare_char":
            prepare_shakespeare_char(out_dir, args.mirror)
        elif name == "shakespeare":
            prepare_shakespeare(out_dir, args.mirror)
        else:
            source = args.source or (OPENWEBTEXT_HF if name == "openwebtext" else None)
            if not source:
                raise PrepareError("corpus needs --source=PATH (a .txt/.jsonl file or folder) or a Hugging Face dataset name")
            prepare_corpus(out_dir, source, text_field=args.text_field, val_fraction=args.val_fraction,
                           num_proc=args.num_proc, hf_split=args.split, mirror=args.mirror)
    except UserError as e:
        print("error: %s" % e, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
