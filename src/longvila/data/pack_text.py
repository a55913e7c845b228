"""Pack a text corpus into fixed-length token sequences for stage 4 (context extension, text only).

    longvila data pack-text --input corpus/ --tokenizer tiny --length 262144 --out packed/ --workers 8

Pipeline (streaming: memory is bounded by one shard buffer plus a few batches in flight, never the
corpus):

1. `iter_documents` reads documents one at a time: `.jsonl` (one JSON object a line, text in
   `text_field`), `.parquet` (the `text_field` column, read in record batches with pyarrow), `.txt`
   (one file is one document; files over `TXT_PIECE_BYTES` are read in pieces cut at line ends).
2. Documents are grouped into batches of about `batch_chars` characters and tokenised by a pool of
   `workers` processes. At most `2 × workers` batches are in flight and results come back in input
   order (`Pool.imap` would read the whole corpus ahead into its task queue; a bounded window of
   `apply_async` calls does not).
3. Every document gets an end-of-document token (`<|endoftext|>` when the vocabulary has it, else
   the tokenizer's EOS) and is appended to the stream. The stream is cut into sequences of exactly
   `length` tokens; a document may run over into the next sequence. Each sequence records its
   boundaries as `cu_seqlens` (int32, starting at 0 and ending at `length`): one segment per
   document piece, so attention and position ids restart where a document does.
4. A shard of `sequences_per_shard` sequences is written when full:
   `tokens-00000.npy` uint32 (S, length), `cu_seqlens-00000.npy` int32 (all the sequences'
   boundaries, concatenated) and `cu_offsets-00000.npy` int64 (S + 1) (sequence i owns
   `cu_seqlens[cu_offsets[i]:cu_offsets[i + 1]]`). `index.json` lists the shards and the counts.

The final partial sequence is dropped by default (`pad_last=False`; its tokens are counted as
`dropped_tokens`); with `pad_last=True` it is padded with `pad_token_id` as a last segment whose
labels the reader masks.

`PackedTextDataset(dir)[i]` gives `input_ids`, `labels`, `position_ids` (1, length) and `cu_seqlens`
— the keyword arguments of `LongVILA.forward` for one packed row.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from longvila.files import write_json_atomic

FORMAT = "longvila-packed-text"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SUFFIXES = (".jsonl", ".parquet", ".txt")
# A .txt file larger than this is read (and tokenised) in pieces of about this size, cut at line ends.
TXT_PIECE_BYTES = 8 << 20
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------
# Reading documents


def list_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files to read, in order: given files as they are, folders searched recursively (sorted)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise ValueError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise ValueError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return files


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from exc
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: no string field {text_field!r}")
            if text:
                yield text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install 'pyarrow>=15')") from exc
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def _iter_txt(path: Path) -> Iterator[list[str]]:
    """One document as a list of pieces (one piece unless the file is large)."""
    if path.stat().st_size <= TXT_PIECE_BYTES:
        text = path.read_text(encoding="utf-8")
        if text:
            yield [text]
        return

    def pieces() -> Iterator[str]:
        with open(path, encoding="utf-8") as handle:
            chunk: list[str] = []
            size = 0
            for line in handle:
                chunk.append(line)
                size += len(line)
                if size >= TXT_PIECE_BYTES:
                    yield "".join(chunk)
                    chunk, size = [], 0
            if chunk:
                yield "".join(chunk)

    yield pieces()  # type: ignore[misc]  # lazily: a large file is never held whole


def iter_documents(files: Iterable[Path], text_field: str = "text") -> Iterator[Iterable[str]]:
    """Each document as an iterable of text pieces, in file order (a piece never exceeds ~8 MiB
    for .txt; jsonl and parquet documents are one piece each)."""
    for path in files:
        if path.suffix == ".jsonl":
            yield from ([text] for text in _iter_jsonl(path, text_field))
        elif path.suffix == ".parquet":
            yield from ([text] for text in _iter_parquet(path, text_field))
        else:
            yield from _iter_txt(path)


# --------------------------------------------------------------------------------------------------
# Tokenising


def load_any_tokenizer(name: str | os.PathLike):
    """ "tiny" (the embedded tokenizer), a longvila checkpoint, or any Hugging Face tokenizer dir/name."""
    from longvila.text.tokenizer import _is_longvila_dir, load_tiny_tokenizer, load_tokenizer

    if str(name) == "tiny":
        return load_tiny_tokenizer()
    path = Path(name)
    if path.is_dir() and _is_longvila_dir(path):
        return load_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name))


def end_of_document_id(tokenizer) -> int:
    """`<|endoftext|>` when the vocabulary has it (Qwen2's document separator), else the EOS token."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|endoftext|> nor an EOS token; pass eod_token_id")
    return int(tokenizer.eos_token_id)


_WORKER_BACKEND = None


def _init_worker(backend_json: str) -> None:
    global _WORKER_BACKEND
    # Several processes each running the tokenizer's own thread pool would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER_BACKEND = Tokenizer.from_str(backend_json)


def encode_texts(backend, texts: list[str]) -> list[np.ndarray]:
    """Token ids (uint32) of each text, without special tokens.

    `backend` is the Rust `tokenizers.Tokenizer` behind a Hugging Face fast tokenizer
    (`tokenizer.backend_tokenizer`): what `tokenizer(texts, add_special_tokens=False)` runs, minus
    the Python wrapping, so worker processes need neither transformers nor torch.
    """
    if not texts:
        return []
    return [np.asarray(e.ids, dtype=np.uint32) for e in backend.encode_batch(texts, add_special_tokens=False)]


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return encode_texts(_WORKER_BACKEND, texts)


def _backend_of(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"pack-text needs a fast (Rust) tokenizer; got {type(tokenizer).__name__}")
    return backend


def _batches(documents: Iterator[Iterable[str]], batch_chars: int) -> Iterator[tuple[list[str], list[bool]]]:
    """Pieces grouped into batches of about `batch_chars`; `last[i]` marks a document's last piece."""
    texts: list[str] = []
    last: list[bool] = []
    size = 0
    for document in documents:
        pieces = iter(document)
        piece = next(pieces, None)
        while piece is not None:
            following = next(pieces, None)
            texts.append(piece)
            last.append(following is None)
            size += len(piece)
            piece = following
            if size >= batch_chars:
                yield texts, last
                texts, last, size = [], [], 0
    if texts:
        yield texts, last


def tokenize_stream(
    documents: Iterator[Iterable[str]],
    tokenizer,
    workers: int = 1,
    batch_chars: int = 1 << 18,
) -> Iterator[tuple[np.ndarray, bool]]:
    """(token ids, is the document's last piece) for every piece, in corpus order.

    `workers > 1` tokenises in a pool of spawned processes (each gets the tokenizer as its JSON) with
    at most 2 × workers batches in flight.
    """
    backend = _backend_of(tokenizer)
    batches = _batches(documents, batch_chars)
    if workers <= 1:
        for texts, last in batches:
            yield from zip(encode_texts(backend, texts), last)
        return
    context = multiprocessing.get_context("spawn")  # fork after a tokenizer's threads ran can deadlock
    with context.Pool(workers, initializer=_init_worker, initargs=(backend.to_str(),)) as pool:
        pending: collections.deque = collections.deque()
        for texts, last in batches:
            pending.append((pool.apply_async(_encode_in_worker, (texts,)), last))
            if len(pending) >= 2 * workers:
                result, flags = pending.popleft()
                yield from zip(result.get(), flags)
        while pending:
            result, flags = pending.popleft()
            yield from zip(result.get(), flags)


# --------------------------------------------------------------------------------------------------
# Packing


@dataclass
class PackStats:
    """Counts of one packing run (also written to index.json)."""

    documents: int = 0
    corpus_tokens: int = 0  # every document's tokens plus its end-of-document token
    sequences: int = 0
    written_tokens: int = 0  # sequences × length (padding included)
    dropped_tokens: int = 0  # the final partial sequence, when not padded
    padded_tokens: int = 0
    max_buffer_tokens: int = 0  # the largest token buffer held (one shard), for the memory test
    seconds: float = 0.0


class ShardWriter:
    """Fills one shard buffer (S, length) of sequences and writes it when full."""

    def __init__(self, out: Path, length: int, sequences_per_shard: int, stats: PackStats):
        self.out = out
        self.length = length
        self.capacity = sequences_per_shard
        self.stats = stats
        self.buffer = np.zeros((sequences_per_shard, length), dtype=np.uint32)
        stats.max_buffer_tokens = max(stats.max_buffer_tokens, self.buffer.size)
        self.shards: list[dict[str, Any]] = []
        self.sequence = 0  # index in the buffer of the sequence being filled
        self.position = 0  # tokens already in that sequence
        self.bounds: list[list[int]] = [[0]]  # cu_seqlens of each sequence in the buffer
        self.documents_in_shard = 0

    def add(self, tokens: np.ndarray, ends_document: bool) -> None:
        """Append a document piece; `ends_document` closes a segment after it."""
        if ends_document:
            self.documents_in_shard += 1
        start = 0
        while start < len(tokens):
            take = min(len(tokens) - start, self.length - self.position)
            self.buffer[self.sequence, self.position : self.position + take] = tokens[start : start + take]
            self.position += take
            start += take
            if self.position == self.length:
                self._close_sequence()
        if ends_document and self.position > 0 and self.bounds[-1][-1] != self.position:
            self.bounds[-1].append(self.position)

    def _close_sequence(self) -> None:
        if self.bounds[-1][-1] != self.length:
            self.bounds[-1].append(self.length)
        self.sequence += 1
        self.position = 0
        self.stats.sequences += 1
        self.stats.written_tokens += self.length
        if self.sequence == self.capacity:
            self.flush()
        self.bounds.append([0])

    def finish(self, pad_last: bool, pad_token_id: int) -> dict[str, int] | None:
        """Pad or drop the partial sequence; write the last shard. Returns where padding went."""
        padded = None
        if self.position > 0:
            if pad_last:
                pad = self.length - self.position
                if self.bounds[-1][-1] != self.position:
                    self.bounds[-1].append(self.position)
                self.buffer[self.sequence, self.position :] = pad_token_id
                padded = {"shard": len(self.shards), "sequence": self.sequence, "pad_tokens": pad}
                self.stats.padded_tokens = pad
                self.position = self.length
                self._close_sequence()
            else:
                self.stats.dropped_tokens = self.position
        self.bounds.pop()  # the open sequence: empty, or the dropped partial one
        if self.sequence:
            self.flush()
        return padded

    def flush(self) -> None:
        """Write the filled sequences of the buffer as the next shard."""
        count = self.sequence
        name = f"{len(self.shards):05d}"
        bounds = self.bounds[:count]
        offsets = np.cumsum([0] + [len(b) for b in bounds]).astype(np.int64)
        np.save(self.out / f"tokens-{name}.npy", self.buffer[:count])
        np.save(
            self.out / f"cu_seqlens-{name}.npy", np.concatenate([np.asarray(b, np.int32) for b in bounds])
        )
        np.save(self.out / f"cu_offsets-{name}.npy", offsets)
        self.shards.append(
            {
                "tokens": f"tokens-{name}.npy",
                "cu_seqlens": f"cu_seqlens-{name}.npy",
                "cu_offsets": f"cu_offsets-{name}.npy",
                "sequences": count,
                "num_tokens": count * self.length,
                "documents_ending": self.documents_in_shard,
            }
        )
        self.bounds = self.bounds[count:]
        self.sequence = 0
        self.documents_in_shard = 0


def pack_text(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    tokenizer: Any = "tiny",
    length: int = 262144,
    *,
    workers: int = 1,
    sequences_per_shard: int = 64,
    pad_last: bool = False,
    text_field: str = "text",
    eod_token_id: int | None = None,
    batch_chars: int = 1 << 18,
    progress: bool = False,
) -> PackStats:
    """Tokenise `inputs` and write packed shards plus index.json to `out` (see the module doc).

    `tokenizer`: a name for `load_any_tokenizer` ("tiny", a folder, a hub name) or a loaded Hugging
    Face fast tokenizer.
    """
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    if sequences_per_shard < 1:
        raise ValueError(f"sequences_per_shard must be >= 1, got {sequences_per_shard}")
    start_time = time.perf_counter()
    files = list_inputs(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_FILE).unlink(missing_ok=True)  # an index only ever describes a finished run
    if isinstance(tokenizer, (str, os.PathLike)):
        tok, tokenizer_name = load_any_tokenizer(tokenizer), str(tokenizer)
    else:
        tok, tokenizer_name = tokenizer, str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    eod = end_of_document_id(tok) if eod_token_id is None else int(eod_token_id)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eod
    stats = PackStats()
    writer = ShardWriter(out, length, sequences_per_shard, stats)
    eod_array = np.asarray([eod], dtype=np.uint32)
    stream = tokenize_stream(iter_documents(files, text_field), tok, workers, batch_chars)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="tok", unit_scale=True, desc="pack-text")
    for tokens, ends_document in stream:
        writer.add(tokens, False)
        stats.corpus_tokens += len(tokens)
        if ends_document:
            writer.add(eod_array, True)
            stats.corpus_tokens += 1
            stats.documents += 1
        if bar is not None:
            bar.update(len(tokens) + int(ends_document))
    if bar is not None:
        bar.close()
    padded = writer.finish(pad_last, pad_id)
    stats.seconds = time.perf_counter() - start_time
    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "length": length,
        "tokenizer": tokenizer_name,
        "eod_token_id": eod,
        "pad_token_id": pad_id,
        "dtype": "uint32",
        "pad_last": pad_last,
        "padded_sequence": padded,
        "inputs": [str(f) for f in files],
        "shards": writer.shards,
        "num_sequences": stats.sequences,
        "num_tokens": stats.written_tokens,
        "stats": asdict(stats),
    }
    write_json_atomic(out / INDEX_FILE, index, indent=1)
    return stats


# --------------------------------------------------------------------------------------------------
# Reading packed sequences


@dataclass
class _Shard:
    tokens: str
    cu_seqlens: str
    cu_offsets: str
    sequences: int
    arrays: tuple | None = field(default=None, repr=False)


class PackedTextDataset:
    """Packed sequences as a map-style dataset (works as a torch Dataset; shards memory-mapped lazily).

    Item i is one packed row for `LongVILA.forward` (B = 1):
    `input_ids`, `labels`, `position_ids` LongTensor (1, length) and `cu_seqlens` int32 (segments + 1,).
    Labels are the input ids (the model shifts them and masks targets that cross a boundary); padding
    is -100. Position ids restart at 0 at every document boundary.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.exists():
            raise FileNotFoundError(f"{self.path}: no {INDEX_FILE} (not a finished pack-text output)")
        self.index = json.loads(index_path.read_text(encoding="utf-8"))
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: not a {FORMAT} index (format={self.index.get('format')!r})")
        self.length = int(self.index["length"])
        keys = ("tokens", "cu_seqlens", "cu_offsets", "sequences")
        self.shards = [_Shard(**{k: s[k] for k in keys}) for s in self.index["shards"]]
        self.starts = np.cumsum([0] + [s.sequences for s in self.shards])
        self.padded = self.index.get("padded_sequence")

    def __len__(self) -> int:
        return int(self.starts[-1])

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """DataLoader collate for `batch_size=1`: each item is already one full packed row."""
        if len(items) != 1:
            raise ValueError(f"packed text rows go one per batch (B = 1 with cu_seqlens), got {len(items)}")
        return items[0]

    def _arrays(self, shard_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shard = self.shards[shard_index]
        if shard.arrays is None:
            shard.arrays = (
                np.load(self.path / shard.tokens, mmap_mode="r"),
                np.load(self.path / shard.cu_seqlens),
                np.load(self.path / shard.cu_offsets),
            )
        return shard.arrays

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens uint32 (length,), cu_seqlens int32) of sequence `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range (0..{len(self) - 1})")
        shard_index = int(np.searchsorted(self.starts, index, side="right") - 1)
        local = index - int(self.starts[shard_index])
        tokens, cu, offsets = self._arrays(shard_index)
        return np.asarray(tokens[local]), cu[offsets[local] : offsets[local + 1]]

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        tokens, cu = self.sequence(index)
        input_ids = torch.from_numpy(tokens.astype(np.int64))
        labels = input_ids.clone()
        padded = self.padded
        if padded is not None:
            shard_index = int(np.searchsorted(self.starts, index, side="right") - 1)
            if (padded["shard"], padded["sequence"]) == (shard_index, index - int(self.starts[shard_index])):
                labels[self.length - padded["pad_tokens"] :] = IGNORE_INDEX
        cu_seqlens = torch.from_numpy(cu.astype(np.int32))
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
        position_ids = torch.arange(self.length) - starts
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[None],
            "cu_seqlens": cu_seqlens,
        }
