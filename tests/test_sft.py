"""Chat SFT: conversations prepared with their loss mask, batches that learn only assistant
tokens, bad conversation files, exact resume, and eval.py's masked loss."""

import gzip
import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helpers import assert_one_line_error, evaluate, run_main, train
from nanogpt import chat_template
from nanogpt.data import BatchLoader, DataError, load_meta
from nanogpt.model import GPT, GPTConfig
from nanogpt.prepare import prepare_chat
from nanogpt.tokenizer import BPETokenizer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "chat" / "conversations.jsonl"
CONVS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": "5."}]},
    {"messages": [{"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome."},
                  {"role": "user", "content": "And of Spain?"}, {"role": "assistant", "content": "Madrid."}]},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
    {"messages": [{"role": "system", "content": "Answer in capitals."}, {"role": "user", "content": "Spell cat."},
                  {"role": "assistant", "content": "C-A-T."}]},
]


@pytest.fixture(autouse=True)
def offline(data_mirror, monkeypatch):
    monkeypatch.setenv("NANOGPT_DATA_MIRROR", str(data_mirror))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(data_mirror / "tiktoken-cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_root(tmp_path_factory, data_mirror):
    """The shipped conversations, prepared under a data root as data/chat/prepare.py does."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(data_mirror / "tiktoken-cache"))
    root = tmp_path_factory.mktemp("chatdata")
    prepare_chat(str(root / "chat"), str(SHIPPED))
    return root


def split_files(folder, split):
    ids = np.fromfile(folder / ("%s.bin" % split), dtype=np.uint16)
    mask = np.fromfile(folder / ("%s.mask.bin" % split), dtype=np.uint8)
    starts = np.fromfile(folder / ("%s.starts.bin" % split), dtype=np.uint64)
    return ids, mask, starts


# --------------------------------------------------------------------------------------------
# preparation


def test_prepare_writes_tokens_mask_and_starts_that_line_up(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", CONVS)
    meta = prepare_chat(str(tmp_path / "out"), str(src), val_fraction=0.25, seed=1)
    out = tmp_path / "out"
    assert meta["chat"]["conversations"] == {"train": 3, "val": 1} and load_meta(str(out))["chat"]
    tok = BPETokenizer()
    encoded = [chat_template.encode(c["messages"], tok) for c in CONVS]
    seen = []
    for split in ("train", "val"):
        ids, mask, starts = split_files(out, split)
        assert len(ids) == len(mask) == meta["%s_tokens" % split]
        assert int(mask.sum()) == meta["chat"]["learned_tokens"][split]
        bounds = list(starts.tolist()) + [len(ids)]
        for a, b in zip(bounds, bounds[1:]):  # each conversation exactly as the template encodes it
            got = (ids[a:b].tolist(), mask[a:b].tolist())
            assert got in encoded
            seen.append(got)
            assert tok.decode(ids[a:a + 2]).split(":")[0] in ("System", "User")
            learned = tok.decode(ids[a:b][mask[a:b] == 1])
            replies = [m["content"] for c in CONVS for m in c["messages"] if m["role"] == "assistant"]
            assert learned.split("<|endoftext|>")[:-1] == [" " + r for r in replies if " " + r in learned]
    assert sorted(seen) == sorted(encoded)  # every conversation once, in one split or the other
    # the same seed gives the same files; .jsonl.gz reads the same
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(src.read_text(encoding="utf-8"))
    prepare_chat(str(tmp_path / "gz"), str(tmp_path / "c.jsonl.gz"), val_fraction=0.25, seed=1)
    (tmp_path / "c.json").write_text(json.dumps(CONVS, indent=1), encoding="utf-8")  # and so does one JSON array
    prepare_chat(str(tmp_path / "array"), str(tmp_path / "c.json"), val_fraction=0.25, seed=1)
    for other in ("gz", "array"):
        for name in ("train.bin", "train.mask.bin", "train.starts.bin", "val.bin", "val.mask.bin", "val.starts.bin"):
            assert (tmp_path / other / name).read_bytes() == (out / name).read_bytes(), (other, name)


def test_prepare_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(CONVS), tmp_path / "c.parquet")
    write_jsonl(tmp_path / "c.jsonl", CONVS)
    prepare_chat(str(tmp_path / "a"), str(tmp_path / "c.parquet"))
    prepare_chat(str(tmp_path / "b"), str(tmp_path / "c.jsonl"))
    for name in ("train.bin", "train.mask.bin", "val.bin", "val.mask.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_prepare_reads_a_hugging_face_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, **kw: datasets.Dataset.from_list(CONVS))
    meta = prepare_chat(str(tmp_path / "hub"), "someone/chats")
    assert sum(meta["chat"]["conversations"].values()) == len(CONVS)


BAD = [
    ("not json", '{"messages": [', "line 2 is not valid JSON"),
    ("no assistant", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "line 2 has no assistant turn"),
    ("unknown role", json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), "line 2: message 0 has role 'bot'"),
    ("no messages", json.dumps({"text": "hello"}), "line 2 is not an object with a 'messages' list"),
    ("eot in content", json.dumps({"messages": [{"role": "user", "content": "a<|endoftext|>b"},
                                                {"role": "assistant", "content": "ok"}]}), "line 2: message 0 holds the text"),
]


@pytest.mark.parametrize("name,line,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_conversations_are_one_line_naming_file_and_line(tmp_path, capsys, name, line, needle):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps(CONVS[0]) + "\n" + line + "\n" + json.dumps(CONVS[1]) + "\n", encoding="utf-8")
    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for out in (fresh, kept):
        r = run_main("prepare", ["chat", "--source=%s" % src, "--out_dir=%s" % out], capsys)
        assert_one_line_error(r, str(src), needle)
    assert not fresh.exists()  # the folder it made is gone again
    assert sorted(os.listdir(kept)) == ["notes.txt"]  # nothing half-written beside what was there


def test_the_data_folder_script_prepares_the_shipped_conversations(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "chat"
    folder.mkdir()
    shutil.copy(ROOT / "data" / "chat" / "prepare.py", folder)
    shutil.copy(SHIPPED, folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(folder / "prepare.py")])
    runpy.run_path(str(folder / "prepare.py"), run_name="__main__")  # `python data/chat/prepare.py`, in this process
    assert "240 conversations (24 in val)" in capsys.readouterr().out
    assert load_meta(str(folder))["chat"]["conversations"] == {"train": 216, "val": 24}


def test_prepare_chat_needs_a_source(tmp_path, capsys):
    r = run_main("prepare", ["chat", "--out_dir=%s" % (tmp_path / "x")], capsys)
    assert_one_line_error(r, "chat needs --source")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# batches


def test_windows_start_at_conversations_and_learn_only_assistant_tokens(chat_root):
    folder = chat_root / "chat"
    ids, mask, starts = split_files(folder, "train")
    meta = load_meta(str(folder))
    T = 48
    loader = BatchLoader(str(folder), "train", 16, T, "cpu", seed=5, meta=meta)
    start_set = set(starts.tolist())
    for _ in range(5):
        x, y = loader.next()
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            # the window is the tokens at a conversation start, packed into what follows
            hits = [s for s in start_set if len(ids) - s >= 1 and np.array_equal(ids[s:s + T], row_x[:min(T, len(ids) - s)])]
            assert hits, "a window began mid-conversation"
            s = hits[0]
            want = ids[s + 1:s + T + 1].astype(np.int64)
            learned = mask[s + 1:s + T + 1] == 1
            n = len(want)
            assert np.array_equal(row_y[:n][learned], want[learned])
            assert (row_y[:n][~learned] == -1).all() and (row_y[n:] == -1).all()  # user, system, headers, padding
    # a window that runs past the end of the split is padded, and the padding is never a target
    vids, vmask, _ = split_files(folder, "val")
    small = BatchLoader(str(folder), "val", 8, len(vids) + 5, "cpu", seed=0, meta=load_meta(str(folder)))
    x, y = small.next()
    assert x.shape == (8, len(vids) + 5) and (y[:, len(vids) - 1:] == -1).all()
    assert (y[0] != -1).sum() > 0


def test_a_chat_dataset_with_a_mismatched_mask_is_refused(chat_root, tmp_path):
    folder = tmp_path / "chat"
    shutil.copytree(chat_root / "chat", folder)
    with open(folder / "train.mask.bin", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(DataError, match="the mask does not match"):
        BatchLoader(str(folder), "train", 2, 16, "cpu", 0, meta=load_meta(str(folder)))
    os.remove(folder / "val.starts.bin")
    with pytest.raises(DataError, match="val.starts.bin is missing"):
        BatchLoader(str(folder), "val", 2, 16, "cpu", 0, meta=load_meta(str(folder)))


def test_chat_batches_resume_exactly_with_prefetch(chat_root):
    folder = str(chat_root / "chat")
    meta = load_meta(folder)
    straight = BatchLoader(folder, "train", 4, 32, "cpu", 3, prefetch=2, meta=meta)
    first = BatchLoader(folder, "train", 4, 32, "cpu", 3, meta=meta)
    expected = [straight.next() for _ in range(8)]
    got = [first.next() for _ in range(3)]
    resumed = BatchLoader(folder, "train", 4, 32, "cpu", 99, prefetch=3, meta=meta)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next() for _ in range(5)]
    for (x0, y0), (x1, y1) in zip(expected, got):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    straight.close()
    resumed.close()


@pytest.mark.parametrize("loss_chunk", [0, 7])
def test_user_and_system_tokens_get_no_gradient(chat_root, loss_chunk):
    folder = chat_root / "chat"
    ids, mask, starts = split_files(folder, "train")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=24, vocab_size=50304))
    loader = BatchLoader(str(folder), "train", 2, 24, "cpu", seed=1, meta=load_meta(str(folder)))
    x, y = loader.next()
    assert (y == -1).any() and (y != -1).any()

    # reference: full logits, cross-entropy over the learned positions only
    logits, _ = model(x)  # (B, T, V)
    logits.retain_grad()
    keep = y != -1
    ref = F.cross_entropy(logits[keep], y[keep])
    ref.backward()
    assert (logits.grad[~keep] == 0).all()  # a user/system/header position pushes nothing back
    assert (logits.grad[keep].abs().sum(-1) > 0).all()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    # the model's own loss (chunked or not), and again with the masked targets set to other tokens
    # (and then ignored again): the loss and every gradient are the same
    model.loss_chunk = loss_chunk
    _, loss = model(x, y)
    loss.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    for k, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[k], atol=1e-6, rtol=1e-4), k

    # a batch with nothing to learn (prompts only) is a loss of 0 with zero gradients, not nan
    model.zero_grad()
    _, loss = model(x, torch.full_like(y, -1))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# training and evaluation

TINY = ["--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32",
        "--batch_size=2", "--gradient_accumulation_steps=1", "--eval_iters=1", "--warmup_iters=2", "--dataset=chat",
        "--dtype=float32", "--prefetch=1"]


def test_sft_resume_is_bit_exact_and_eval_reports_the_masked_loss(chat_root, tmp_path):
    common = TINY + ["--data_root=%s" % chat_root, "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2"]
    straight = train(common + ["--out_dir=%s" % (tmp_path / "a")])
    first = train(common + ["--out_dir=%s" % (tmp_path / "b"), "--max_iters=2"])
    second = train(common + ["--out_dir=%s" % (tmp_path / "b"), "--init_from=resume"])
    assert first["history"] + second["history"] == straight["history"]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    r = evaluate(["--out_dir=%s" % (tmp_path / "a"), "--data_root=%s" % chat_root, "--device=cpu"])
    chat = r["chat"]
    meta = load_meta(str(chat_root / "chat"))
    assert chat["conversations"] == meta["chat"]["conversations"]["val"]
    vids, vmask, vstarts = split_files(chat_root / "chat", "val")
    assert chat["tokens"] == int(vmask.sum())  # every assistant token of the held-out conversations, once

    # the same figure by hand: each held-out conversation on its own, assistant targets only
    model = GPT(GPTConfig(**a["model_args"]))
    model.load_state_dict(a["model"])
    model.eval()
    bounds = list(vstarts.tolist()) + [len(vids)]
    nll, count = 0.0, 0
    with torch.no_grad():
        for s, e in zip(bounds, bounds[1:]):
            t = torch.from_numpy(vids[s:e].astype(np.int64))
            m = torch.from_numpy(vmask[s:e].astype(np.int64))
            for b0 in range(0, e - s - 1, 32):  # windows of the model's context, no overlap
                xx = t[b0:b0 + 32][None]
                yy = t[b0 + 1:b0 + 33].clone()
                yy[m[b0 + 1:b0 + 33] == 0] = -1
                logits, _ = model(xx[:, :len(yy)])
                nll += F.cross_entropy(logits[0].float(), yy, ignore_index=-1, reduction="sum").item()
                count += int((yy != -1).sum())
    assert count == chat["tokens"]
    assert abs(nll / count - chat["loss"]) < 1e-4


def test_sft_config_finetunes_a_hugging_face_model(chat_root, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "tiny-hf"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1,
                                                         n_head=2)).save_pretrained(hf)
    out = tmp_path / "sft"
    result = train([str(ROOT / "config" / "sft_gpt2.py"), "--init_from=%s" % hf, "--out_dir=%s" % out,
                    "--data_root=%s" % chat_root, "--block_size=32", "--batch_size=2", "--gradient_accumulation_steps=1",
                    "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--device=cpu", "--compile=False",
                    "--dtype=float32"])
    assert len(result["history"]) == 2 and (out / "ckpt.pt").is_file()
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["config"]["dataset"] == "chat" and saved["config"]["learning_rate"] == 2e-5
