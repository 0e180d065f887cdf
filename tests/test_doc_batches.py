"""batch_mode='documents' and doc_attention: rows open at a document and are packed best-fit
from whole ones, the packing position resumes exactly and is sharded over ranks, and attention
inside documents computes each document as if it were alone."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_main, train
from nanogpt import checkpoint, doc_batches
from nanogpt.data import Tokens
from nanogpt.doc_batches import DocumentLoader, PackingStream, attention_kind, document_mask, document_spans
from nanogpt.errors import CheckpointError, ConfigError
from nanogpt.generate import generate
from nanogpt.model import GPT, GPTConfig

EOT, VOCAB, T = 0, 96, 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def documents(n, seed, longest=50, long_every=0):
    """``n`` documents of random ids in 1..VOCAB-1; every ``long_every``-th is longer than a row."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        size = int(rng.integers(1, longest))
        if long_every and i % long_every == 0:
            size = 3 * T
        docs.append(rng.integers(1, VOCAB, size=size).tolist())
    return docs


def write_split(folder, split, docs):
    ids = [t for d in docs for t in d + [EOT]]
    np.array(ids, dtype=np.uint16).tofile(os.path.join(folder, "%s.bin" % split))
    return len(ids)


@pytest.fixture(scope="module")
def docs_root(tmp_path_factory):
    """data/docs: 400 train documents (every 25th longer than a row) and 60 val ones."""
    root = tmp_path_factory.mktemp("docs_data")
    folder = root / "docs"
    folder.mkdir()
    train_docs, val_docs = documents(400, 0, long_every=25), documents(60, 1)
    counts = {s: write_split(str(folder), s, d) for s, d in (("train", train_docs), ("val", val_docs))}
    meta = {"vocab_size": VOCAB, "dtype": "uint16", "eot_token": EOT, "train_tokens": counts["train"], "val_tokens": counts["val"]}
    (folder / "meta.json").write_text(json.dumps(meta))
    return root, train_docs


def loader(root, seed=5, rank=0, world=1, prefetch=0, batch=6, buffer=50):
    return DocumentLoader(str(root / "docs"), "train", batch, T, "cpu", seed, prefetch=prefetch, eot=EOT, rank=rank,
                          world_size=world, buffer=buffer)


def pieces(row):
    """A row (T + 1 ids) cut before each end-of-text token: [eot, tokens...] each."""
    cuts = [i for i, t in enumerate(row) if t == EOT] + [len(row)]
    return [row[a:b] for a, b in zip(cuts, cuts[1:])]


def rows_of(batch):
    x, y = batch
    return torch.cat([x, y[:, -1:]], dim=1).tolist()


# ------------------------------------------------------------------------------------------
# the rows


def test_rows_open_at_a_document_and_hold_whole_documents(docs_root):
    root, docs = docs_root
    whole = {tuple(d) for d in docs}
    ld = loader(root)
    cropped_ends = 0
    for _ in range(20):
        x, y = batch = ld.next()
        assert x.shape == y.shape == (6, T) and torch.equal(x[:, 1:], y[:, :-1])
        for row in rows_of(batch):
            assert row[0] == EOT and len(row) == T + 1  # every row full: no padding
            parts = pieces(row)
            for i, part in enumerate(parts):
                body = tuple(part[1:])
                if i < len(parts) - 1:
                    assert body in whole  # all but the last piece are whole documents
                else:  # the last is whole, or the start of one that did not fit
                    assert body in whole or any(d[:len(body)] == list(body) and len(d) > len(body) for d in docs)
                    cropped_ends += body not in whole
    assert cropped_ends > 0


def test_a_document_longer_than_a_row_is_cropped_to_one_row(docs_root):
    root, docs = docs_root
    long_ones = {tuple(d[:T]) for d in docs if len(d) >= T}
    ld = loader(root)
    seen = 0
    for _ in range(40):
        for row in rows_of(ld.next()):
            if tuple(row[1:]) in long_ones:
                seen += 1
    assert seen >= 5  # each comes as [eot] + its first T tokens, alone in its row


def test_best_fit_takes_the_longest_that_fits_and_crops_only_the_last_gap():
    # every unit held at once: the row of 8 takes 6, then the 2 that fills the gap exactly
    stream = PackingStream(np.array([2, 3, 5, 6]), 8, 4, seed=0)
    assert [stream.units[d] for d, _ in stream.pack()] == [6, 2]
    # nothing fits the last token: the shortest held unit (5) gives its first token
    stream = PackingStream(np.array([5, 6, 7]), 8, 3, seed=0)
    assert [(int(stream.units[d]), take) for d, take in stream.pack()] == [(7, 7), (5, 1)]
    assert stream.cropped == 4


def test_best_fit_drops_fewer_tokens_than_a_tiny_buffer():
    units = np.random.default_rng(0).integers(2, T // 2 + 1, size=500)  # none longer than half a row
    dropped = {}
    for buffer in (1, 200):  # buffer=1 is plain sequential packing
        stream = PackingStream(units, T + 1, buffer, seed=0)
        for _ in range(300):
            stream.pack()
        dropped[buffer] = stream.cropped
    assert dropped[200] < 0.1 * dropped[1]


def test_document_spans_and_tokens_across_parts(tmp_path):
    ids = np.array([EOT, 4, 5, EOT, EOT, 6, 7, 8, EOT, 9], dtype=np.uint16)
    ids[:4].tofile(tmp_path / "train_000000.bin")
    ids[4:].tofile(tmp_path / "train_000001.bin")
    shards = {"train": [{"file": "train_%06d.bin" % i, "tokens": len(part), "sha256": "-"} for i, part in enumerate((ids[:4], ids[4:]))]}
    tokens = Tokens(str(tmp_path), "train", {"dtype": "uint16", "shards": shards}, verify=False)
    assert tokens.n == 10 and tokens.read(2, 6).tolist() == [5, EOT, EOT, 6, 7, 8]
    starts, lengths = document_spans(tokens, EOT, chunk=3)
    assert starts.tolist() == [1, 5, 9] and lengths.tolist() == [2, 3, 1]  # empty documents are skipped


# ------------------------------------------------------------------------------------------
# determinism, resume, ranks


def test_same_seed_same_rows_and_background_reading_changes_nothing(docs_root):
    root, _ = docs_root
    a, b, c = loader(root), loader(root, prefetch=3), loader(root, seed=6)
    try:
        for _ in range(8):
            (xa, _), (xb, _), (xc, _) = a.next(), b.next(), c.next()
            assert torch.equal(xa, xb) and not torch.equal(xa, xc)
            assert torch.equal(a.state_dict()["generator"], b.state_dict()["generator"])
    finally:
        b.close()


def test_the_packing_position_resumes_exactly(docs_root):
    root, _ = docs_root
    straight, first = loader(root, buffer=20), loader(root, buffer=20, prefetch=2)
    try:
        want = [straight.next()[0] for _ in range(30)]  # several passes over the shuffled documents
        got = [first.next()[0] for _ in range(11)]
        state = checkpoint_round_trip(first.state_dict())
        resumed = loader(root, seed=99, buffer=20)
        resumed.load_state_dict(state)
        got += [resumed.next()[0] for _ in range(19)]
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        first.reseed(5)  # back to the start of the seed's stream
        assert torch.equal(first.next()[0], want[0])
    finally:
        first.close()


def checkpoint_round_trip(state):
    """Through torch.save and torch.load(weights_only=True), as checkpoints store it."""
    with tempfile.TemporaryFile() as f:
        torch.save(state, f)
        f.seek(0)
        return torch.load(f, weights_only=True)


def test_a_position_from_another_mode_or_dataset_is_refused(docs_root):
    root, _ = docs_root
    ld = loader(root)
    with pytest.raises(CheckpointError, match="batch_mode='documents'"):
        ld.load_state_dict({"generator": torch.Generator().get_state()})
    other = PackingStream(np.array([3, 4]), T + 1, 5, 0)
    with pytest.raises(CheckpointError, match="dataset or block_size changed"):
        ld.load_state_dict({"generator": other.get_state()})


def test_each_rank_reads_its_own_documents(docs_root):
    root, _ = docs_root
    r0, r1 = loader(root, rank=0, world=2), loader(root, rank=1, world=2)
    one = loader(root)
    assert not set(r0.starts.tolist()) & set(r1.starts.tolist())
    assert sorted(r0.starts.tolist() + r1.starts.tolist()) == one.starts.tolist()
    assert not torch.equal(r0.next()[0], r1.next()[0])


# ------------------------------------------------------------------------------------------
# attention inside documents


def tiny_model(rope=False, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=T, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, rope=rope, bias=False)).eval()


@pytest.mark.parametrize("rope", [False, True])
def test_doc_attention_equals_each_document_alone(rope):
    model = tiny_model(rope)
    docs = [[5, 9, 11], [7, 7, 3, 2, 40, 1], [60, 61], [8, 3, 3, 9, 10, 11, 12, 13, 14]]
    row = [t for d in docs for t in [EOT] + d]
    idx = torch.tensor([row, row[::-1]])  # a second row with other boundaries, for the batch dimension
    with torch.no_grad():
        plain = model(idx)[0]
        model.doc_attention = (EOT, "dense")
        packed = model(idx)[0]
        alone = [model(torch.tensor([[EOT] + d]))[0][0] for d in docs]
    at = 0
    for d, logits in zip(docs, alone):
        torch.testing.assert_close(packed[0, at:at + len(d) + 1], logits, rtol=0, atol=1e-5)
        at += len(d) + 1
    assert not torch.allclose(packed[0, 4:], plain[0, 4:], atol=1e-3)  # without it, documents see each other


def test_flex_attention_gives_the_dense_mask_result():
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = tiny_model(rope=True)
    idx = torch.randint(1, VOCAB, (2, T))
    idx[0, [0, 5, 6, 20]] = EOT
    idx[1, [9, 31]] = EOT
    with torch.no_grad():  # FlexAttention on the CPU runs forward only
        model.doc_attention = (EOT, "dense")
        dense = model(idx)[0]
        model.doc_attention = (EOT, "flex")
        flex = model(idx)[0]
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)


def test_positions_restart_at_each_document():
    idx = torch.tensor([[3, 4, EOT, 5, EOT, EOT, 6, 7]])
    _, mask = document_mask(idx, EOT, "dense")
    docs, pos = doc_batches.document_positions(idx, EOT)
    assert pos.tolist() == [[0, 1, 0, 1, 0, 0, 1, 2]] and docs.tolist() == [[0, 0, 1, 1, 2, 3, 3, 3]]
    assert mask[0, 0, 3].tolist() == [False, False, True, True, False, False, False, False]


def test_sampling_with_the_kv_cache_ignores_doc_attention():
    model = tiny_model()
    prompt = torch.tensor([[EOT, 5, 9, EOT, 4]])
    want = generate(model, prompt, 10, temperature=1.0, top_k=1)
    model.doc_attention = (EOT, "dense")
    assert torch.equal(generate(model, prompt, 10, temperature=1.0, top_k=1), want)


def test_doc_attention_is_refused_where_it_cannot_train(monkeypatch):
    assert attention_kind("cpu") == "dense"
    with pytest.raises(ConfigError, match="doc_attention=True trains on cuda .* or cpu.*'mps'"):
        attention_kind("mps")
    monkeypatch.setattr(doc_batches, "_FLEX", (None, None))
    with pytest.raises(ConfigError, match="needs FlexAttention"):
        attention_kind("cuda")


# ------------------------------------------------------------------------------------------
# training with it


def tiny(root, out, *extra):
    return ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=%d" % T,
            "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2", "--warmup_iters=2", "--learning_rate=3e-3",
            "--min_lr=3e-4", "--dataset=docs", "--data_root=%s" % root, "--out_dir=%s" % out, "--log_interval=1",
            "--batch_mode=documents", "--doc_attention=True", "--doc_buffer=30"] + list(extra)


def test_training_resumes_bit_exact(docs_root, tmp_path, capsys):
    root, _ = docs_root
    common = ["--max_iters=12", "--lr_decay_iters=12", "--eval_interval=6"]
    straight = train(tiny(root, tmp_path / "a", *common))
    first = train(tiny(root, tmp_path / "b", *common, "--max_iters=6", "--prefetch=3"))
    second = train(tiny(root, tmp_path / "b", *common, "--init_from=resume"))
    assert first["history"] + second["history"] == straight["history"]
    a, b = checkpoint.load(str(tmp_path / "a" / "ckpt.pt")), checkpoint.load(str(tmp_path / "b" / "ckpt.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    r = run_main("train.py", tiny(root, tmp_path / "b", *common, "--max_iters=14", "--init_from=resume", "--batch_mode=windows"), capsys)
    assert_one_line_error(r, "batch_mode='documents'", "--batch_mode='documents'")


def test_bad_settings_get_one_line(docs_root, data_root, tmp_path, capsys):
    root, _ = docs_root
    r = run_main("train.py", tiny(root, tmp_path / "a", "--dropout=0.1", "--max_iters=1"), capsys)
    assert_one_line_error(r, "doc_attention=True has no attention dropout", "--dropout=0.0")
    r = run_main("train.py", tiny(data_root, tmp_path / "b", "--dataset=shakespeare_char", "--doc_attention=False",
                                  "--max_iters=1"), capsys)
    assert_one_line_error(r, "batch_mode='documents' needs the dataset's end-of-text token", "shakespeare_char")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_each_pack_their_own_documents_and_save_their_position(docs_root, tmp_path):
    """Under torchrun (gloo, two processes) each rank packs its own share of the documents, and
    the checkpoint holds every rank's packing position exactly where that rank stands (a resume
    puts each back, as for the windows loader's generators)."""
    root, _ = docs_root
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py")]
    steps = 2
    args = tiny(root, tmp_path, "--max_iters=%d" % steps, "--lr_decay_iters=%d" % steps, "--eval_interval=%d" % steps,
                "--eval_iters=1", "--seed=11")
    r = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    path = str(tmp_path / "ckpt.pt")
    ckpt = checkpoint.load(path)
    ranks = checkpoint.load_train_state(path, ckpt)["rng"]["ranks"]
    assert ckpt["world_size"] == 2 and len(ranks) == 2
    for rank, saved in enumerate(ranks):
        mine = loader(root, seed=11 + rank, rank=rank, world=2, batch=4, buffer=30)
        for _ in range(steps):  # one micro-step per rank per step (gradient_accumulation_steps=2 over 2)
            mine.next()
        assert torch.equal(saved["loader"], mine.state_dict()["generator"]), rank
