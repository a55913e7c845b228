"""`longvila data pack-text`: exact-length sequences, the corpus in order, document boundaries,
bounded memory, and rows the model trains on."""

import json
import random
import tracemalloc

import numpy as np
import pytest
import torch

from longvila.data.pack_text import PackedTextDataset, load_any_tokenizer, pack_text
from longvila.model.loss import IGNORE_INDEX

WORDS = "the a red blue green circle square moves left right up down video frame what colour is shape".split()


@pytest.fixture(scope="module")
def tokenizer():
    return load_any_tokenizer("tiny")


def write_corpus(root, num_docs=60, seed=0):
    """jsonl + txt (+ parquet when pyarrow is there); returns the documents in reading order."""
    rng = random.Random(seed)
    docs = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 80))) + f" doc{i}." for i in range(num_docs)
    ]
    root.mkdir(parents=True, exist_ok=True)
    third = num_docs // 3
    with open(root / "a.jsonl", "w") as handle:
        for doc in docs[:third]:
            handle.write(json.dumps({"text": doc, "meta": 1}) + "\n")
        handle.write(json.dumps({"text": ""}) + "\n")  # empty documents are skipped
    order = docs[:third]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs[third : 2 * third]}), root / "b.parquet")
        order += docs[third : 2 * third]
    except ImportError:
        pass
    (root / "c.txt").write_text(docs[2 * third])  # one .txt file = one document
    order.append(docs[2 * third])
    return order


def reference_stream(tokenizer, docs):
    """The tokenised corpus: each document's ids then <|endoftext|>; and each document's end offset."""
    eod = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokens, ends = [], []
    for doc in docs:
        tokens += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eod]
        ends.append(len(tokens))
    return np.asarray(tokens, dtype=np.int64), ends


def expected_cu_seqlens(ends, start, length):
    inside = [e - start for e in ends if start < e < start + length]
    return [0, *inside, length]


def test_sequences_are_the_corpus_in_order_with_document_boundaries(tmp_path, tokenizer):
    docs = write_corpus(tmp_path / "corpus")
    length = 64
    stats = pack_text(tmp_path / "corpus", tmp_path / "out", "tiny", length, sequences_per_shard=3)
    reference, ends = reference_stream(tokenizer, docs)
    dataset = PackedTextDataset(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "index.json").read_text())

    assert stats.documents == len(docs) and stats.corpus_tokens == len(reference)
    assert len(dataset) == stats.sequences == len(reference) // length
    assert stats.dropped_tokens == len(reference) % length  # default: the partial tail is dropped
    assert index["num_tokens"] == len(dataset) * length
    assert [s["sequences"] for s in index["shards"]][:-1] == [3] * (len(index["shards"]) - 1)
    rows = []
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["input_ids"].shape == item["labels"].shape == item["position_ids"].shape == (1, length)
        cu = item["cu_seqlens"].tolist()
        assert cu == expected_cu_seqlens(ends, i * length, length), i
        for a, b in zip(cu[:-1], cu[1:]):  # positions restart at every boundary
            assert item["position_ids"][0, a:b].tolist() == list(range(b - a))
        assert torch.equal(item["labels"], item["input_ids"])
        rows.append(item["input_ids"][0].numpy())
    assert np.array_equal(np.concatenate(rows), reference[: len(dataset) * length])


def test_pad_last_keeps_every_token_and_masks_the_padding(tmp_path, tokenizer):
    docs = write_corpus(tmp_path / "corpus", num_docs=9, seed=1)
    length = 50
    stats = pack_text(
        tmp_path / "corpus", tmp_path / "out", "tiny", length, sequences_per_shard=2, pad_last=True
    )
    reference, ends = reference_stream(tokenizer, docs)
    dataset = PackedTextDataset(tmp_path / "out")
    pad = (-len(reference)) % length
    assert stats.dropped_tokens == 0 and stats.padded_tokens == pad > 0
    assert len(dataset) == -(-len(reference) // length)
    last = dataset[len(dataset) - 1]
    assert (last["labels"][0, length - pad :] == IGNORE_INDEX).all()
    assert (last["labels"][0, : length - pad] != IGNORE_INDEX).all()
    assert last["cu_seqlens"].tolist()[-2:] == [length - pad, length]  # the padding is its own segment
    tokens = np.concatenate([dataset[i]["input_ids"][0].numpy() for i in range(len(dataset))])
    assert np.array_equal(tokens[: len(reference)], reference)


def test_worker_pool_gives_the_same_shards(tmp_path):
    write_corpus(tmp_path / "corpus", num_docs=40, seed=2)
    pack_text(tmp_path / "corpus", tmp_path / "one", "tiny", 32, sequences_per_shard=4)
    # Small batches so that several are in flight and must come back in order.
    pack_text(
        tmp_path / "corpus", tmp_path / "two", "tiny", 32, sequences_per_shard=4, workers=2, batch_chars=200
    )
    one, two = PackedTextDataset(tmp_path / "one"), PackedTextDataset(tmp_path / "two")
    assert len(one) == len(two) > 4
    for i in range(len(one)):
        a, b = one[i], two[i]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_memory_is_bounded_by_one_shard_not_the_corpus(tmp_path, tokenizer):
    """tracemalloc counts every Python object and numpy buffer the packer allocates (the corpus text,
    token lists, token arrays, shard buffers); the Rust tokenizer's own memory is per batch. If the
    packer held the corpus, or its tokens, the traced peak would exceed the corpus size; streaming, it
    stays at one shard buffer plus a batch or two."""
    rng = random.Random(3)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    size = 0
    for part in range(4):
        with open(corpus / f"part{part}.jsonl", "w") as handle:
            for _ in range(330):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 1000)))
                handle.write(json.dumps({"text": text}) + "\n")
                size += len(text)
    assert size > 4_000_000
    length, per_shard = 1024, 8
    tracemalloc.start()
    try:
        stats = pack_text(
            corpus, tmp_path / "out", "tiny", length, sequences_per_shard=per_shard, batch_chars=1 << 16
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    corpus_token_bytes = 4 * stats.corpus_tokens
    assert stats.max_buffer_tokens == length * per_shard
    assert corpus_token_bytes > 3_000_000
    print(f"traced peak {peak} B; corpus {size} chars, {corpus_token_bytes} B of tokens")
    assert peak < 1_500_000, (peak, size, corpus_token_bytes)
    assert len(PackedTextDataset(tmp_path / "out")) == stats.corpus_tokens // length


def test_a_packed_row_trains_the_model(tmp_path, tiny_model):
    write_corpus(tmp_path / "corpus", num_docs=12, seed=4)
    pack_text(tmp_path / "corpus", tmp_path / "out", "tiny", 96, sequences_per_shard=2)
    dataset = PackedTextDataset(tmp_path / "out")
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=dataset.collate)
    batch = list(loader)[1]
    assert batch["cu_seqlens"].numel() > 2  # several documents in the row
    tiny_model.train()
    out = tiny_model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in tiny_model.llm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        pack_text(tmp_path / "missing", tmp_path / "out", "tiny", 16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        pack_text(bad, tmp_path / "out", "tiny", 16)
    with pytest.raises(FileNotFoundError, match="index.json"):
        PackedTextDataset(tmp_path / "out")  # a failed run leaves no index


def test_stage4_trains_on_packed_text_through_the_trainer(tmp_path):
    """`data.kind: packed_text` feeds `longvila data pack-text` rows to the trainer (stage 4, LoRA)."""
    from longvila.train.metrics import read_metrics
    from longvila.train.recipe import load_recipe
    from longvila.train.run import train

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"document {i} " + "word " * (20 + i)}) + "\n" for i in range(40))
    )
    pack_text([corpus], tmp_path / "packed", tokenizer="tiny", length=128, workers=1)
    overrides = ["--run.root", str(tmp_path / "runs"), "--model.init", "tiny", "--data.kind", "packed_text",
                 "--data.packed_text_dir", str(tmp_path / "packed"), "--data.batch_size", "1",
                 "--train.max_steps", "3", "--logging.progress_bar", "false", "--checkpoint.save_final", "false"]  # fmt: skip
    recipe = load_recipe("tiny/stage4", overrides)
    result = train(recipe)
    losses = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="data.batch_size must be 1"):
        load_recipe("tiny/stage4", [*overrides, "--data.batch_size", "2"])
