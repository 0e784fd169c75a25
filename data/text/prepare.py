"""
Tokenize a text corpus into train.bin / val.bin (uint16 Phi-2 token ids) and meta.json for train_lm.py.

    python data/text/prepare.py                                        # offline: this Python's standard library
    python data/text/prepare.py --input=stories.txt,more/ --out_dir=data/text/mine

Inputs are files or folders of .txt, .jsonl (a "text" field per line) and .parquet (a "text" column; needs
pyarrow). A .txt file is one document, or several when separated by <|endoftext|> (TinyStories). Every document
ends with <|endoftext|> (50256). Exact duplicate documents are dropped, and a hash of each document's text puts it
in train or val, so the split depends neither on file order nor on the number of processes.
The default corpus is the running interpreter's standard library (.py sources, .rst/.txt docs) without its test
folders and without files over --max_file_bytes (large generated tables), about 14 MB of text.
"""

import contextlib
import hashlib
import json
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from common import fail, parse_config  # noqa: E402
from tokenizer import EOS, Tokenizer, tokenizer_fingerprint  # noqa: E402

DEFAULT_OUT_DIR = REPO / "data" / "text" / "stdlib"
CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")
STDLIB_SUFFIXES = (".py", ".rst", ".txt")
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
STDLIB_MAX_FILE_BYTES = 512_000
CHUNK_CHARS = 1 << 20  # text sent to a worker at a time
READ_CHARS = 1 << 24


def stdlib_dir():
    return Path(sysconfig.get_paths()["stdlib"])


def find_files(inputs, suffixes, skip_dirs=(), max_file_bytes=0):
    """Files with the given suffixes under each input (a file or a folder), in a fixed order."""
    files = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            if not path.name.endswith(suffixes):
                raise ValueError(f"input file {path} is not one of {', '.join(suffixes)}")
            files.append(path)
        elif path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in skip_dirs)
                files += [Path(root) / n for n in sorted(names) if n.endswith(suffixes)]
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if max_file_bytes:
        files = [f for f in files if f.stat().st_size <= max_file_bytes]
    return files


def read_documents(path, stats):
    """Yields the documents of one file. A file that cannot be read or is not UTF-8 is counted in stats and
    skipped from there on; a .jsonl line without a string "text" field is counted and skipped."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
                for text in batch.column(0).to_pylist():
                    if isinstance(text, str):
                        yield text
                    else:
                        stats["skipped_records"] += 1
        elif path.suffix == ".jsonl":
            with open(path, "rb") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line.decode("utf-8")).get("text")
                    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                        text = None
                    if isinstance(text, str):
                        yield text
                    else:
                        stats["skipped_records"] += 1
        else:
            with open(path, encoding="utf-8", errors="strict", newline="") as f:
                rest = ""
                while piece := f.read(READ_CHARS):
                    *docs, rest = (rest + piece).split(EOS)
                    yield from docs
                yield rest
    except (OSError, UnicodeDecodeError, ValueError) as err:
        stats["skipped_files"] += 1
        stats["skipped_examples"].append(f"{path}: {type(err).__name__}: {err}"[:200])


def document_hash(text):
    return hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=16).digest()


def is_val(digest, val_fraction):
    return int.from_bytes(digest[:8], "little") < val_fraction * 2 ** 64


_tokenizer = None


def _init_worker():
    global _tokenizer
    _tokenizer = Tokenizer()


def tokenize_chunk(texts):
    """Worker: a list of documents -> (all their tokens, each followed by EOS, as uint16; length of each)."""
    pieces = [np.array(_tokenizer.encode(t, allow_special=False) + [_tokenizer.eos_id], dtype=np.uint16) for t in texts]
    return np.concatenate(pieces), np.array([len(p) for p in pieces], dtype=np.int64)


class Progress:
    """One line on stderr, redrawn in place: a bar over the input bytes read, tokens written and speed."""

    def __init__(self, total_bytes, enabled=True):
        self.total, self.enabled, self.start, self.last = max(total_bytes, 1), enabled, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, done_bytes, tokens, final=False):
        now = time.time()
        if not self.enabled or (not final and now - self.last < (0.2 if self.tty else 10.0)):
            return
        self.last = now
        frac = min(done_bytes / self.total, 1.0)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        speed = done_bytes / 1e6 / max(now - self.start, 1e-9)
        line = (f"[{bar}] {100 * frac:5.1f}% {done_bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB "
                f"{tokens / 1e6:.2f}M tokens {speed:.1f} MB/s")
        print(("\r" if self.tty else "") + line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


def prepare(inputs=None, out_dir=DEFAULT_OUT_DIR, val_fraction=0.02, num_proc=0, max_bytes=0, max_file_bytes=None,
            progress=True):
    """Tokenize the corpus under inputs (None: the standard library) into out_dir. Returns the meta dict."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 (0 means no cap), not {max_bytes}")
    if inputs:
        sources = [str(i) for i in inputs]
        files = find_files(inputs, CORPUS_SUFFIXES, max_file_bytes=max_file_bytes or 0)
        if not files:
            raise FileNotFoundError(f"no {', '.join(CORPUS_SUFFIXES)} files found in {', '.join(sources)}")
    else:
        sources = [f"python {sys.version.split()[0]} standard library: {stdlib_dir()}"]
        cap = STDLIB_MAX_FILE_BYTES if max_file_bytes is None else max_file_bytes
        files = find_files([stdlib_dir()], STDLIB_SUFFIXES, STDLIB_SKIP_DIRS, cap)
        if not files:
            raise FileNotFoundError(f"no .py/.rst/.txt files found in the standard library at {stdlib_dir()}")
    if any(f.suffix == ".parquet" for f in files):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ImportError("reading .parquet inputs needs pyarrow: pip install pyarrow") from None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"skipped_files": 0, "skipped_records": 0, "skipped_examples": []}
    counts = {"train_tokens": 0, "val_tokens": 0, "train_documents": 0, "val_documents": 0,
              "duplicate_documents": 0, "empty_documents": 0}
    seen = set()
    total_bytes = sum(f.stat().st_size for f in files)
    bar = Progress(min(total_bytes, max_bytes) if max_bytes else total_bytes, progress)
    tmp = {split: out / f"{split}.bin.tmp" for split in ("train", "val")}
    num_proc = num_proc or os.cpu_count() or 1

    def documents():
        """(text, goes_to_val) for every new document, up to max_bytes of text."""
        read = 0
        for i, path in enumerate(files):
            for text in read_documents(path, stats):
                if not text.strip():
                    counts["empty_documents"] += 1
                    continue
                digest = document_hash(text)
                if digest in seen:
                    counts["duplicate_documents"] += 1
                    continue
                seen.add(digest)
                yield text, is_val(digest, val_fraction)
                read += len(text.encode("utf-8", errors="surrogatepass"))
                if max_bytes and read >= max_bytes:
                    stats["capped"] = True
                    return
            stats["bytes_read"] = read if max_bytes else sum(f.stat().st_size for f in files[:i + 1])

    def chunks():
        texts, flags, size = [], [], 0
        for text, val in documents():
            texts.append(text)
            flags.append(val)
            size += len(text)
            if size >= CHUNK_CHARS:
                yield texts, flags
                texts, flags, size = [], [], 0
        if texts:
            yield texts, flags

    if num_proc == 1:
        _init_worker()
    with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val, \
            Pool(num_proc, initializer=_init_worker) if num_proc > 1 else contextlib.nullcontext() as pool:
        source = chunks()
        while True:
            pending = [c for _, c in zip(range(4 * num_proc), source)]
            if not pending:
                break
            texts = [t for t, _ in pending]
            results = pool.map(tokenize_chunk, texts) if pool else map(tokenize_chunk, texts)
            for (texts, flags), (tokens, lengths) in zip(pending, results):
                starts = np.concatenate(([0], np.cumsum(lengths)))
                for val, a, b in zip(flags, starts[:-1], starts[1:]):
                    split = "val" if val else "train"
                    (f_val if val else f_train).write(tokens[a:b].tobytes())
                    counts[f"{split}_tokens"] += int(b - a)
                    counts[f"{split}_documents"] += 1
            bar.update(stats.get("bytes_read", 0), counts["train_tokens"] + counts["val_tokens"])
    bar.update(stats.get("bytes_read", 0) if not stats.get("capped") else bar.total,
               counts["train_tokens"] + counts["val_tokens"], final=True)

    if counts["train_documents"] + counts["val_documents"] == 0:
        for t in tmp.values():
            t.unlink()
        why = f"; {stats['skipped_files']} unreadable or non-UTF-8 files skipped" if stats["skipped_files"] else ""
        raise ValueError(f"the corpus in {', '.join(sources)} has no text ({len(files)} files{why})")
    for split in ("train", "val"):
        if counts[f"{split}_documents"] == 0:
            for t in tmp.values():
                t.unlink()
            raise ValueError(f"the {split} split is empty ({counts['train_documents'] + counts['val_documents']} "
                             f"documents, val_fraction={val_fraction}); add documents or change val_fraction")
    meta = {"tokenizer": "phi-2", "tokenizer_fingerprint": tokenizer_fingerprint(Tokenizer()), "dtype": "uint16",
            "eos_id": Tokenizer.eos_id, "vocab_size": Tokenizer.vocab_size, **counts,
            "files": len(files), "skipped_files": stats["skipped_files"], "skipped_records": stats["skipped_records"],
            "skipped_examples": stats["skipped_examples"][:10], "sources": sources, "val_fraction": val_fraction,
            "max_bytes": max_bytes, "capped": bool(stats.get("capped"))}
    for split, t in tmp.items():
        os.replace(t, out / f"{split}.bin")
    meta_tmp = out / "meta.json.tmp"
    meta_tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    os.replace(meta_tmp, out / "meta.json")
    return meta


@dataclass
class PrepareConfig:
    input: str = ""  # files or folders of .txt/.jsonl/.parquet, separated by commas; empty: the Python standard library
    out_dir: str = ""  # where train.bin, val.bin and meta.json go (required with --input; default: data/text/stdlib)
    val_fraction: float = 0.02  # share of documents held out for val.bin (chosen by a hash of each document)
    num_proc: int = 0  # worker processes; 0: all cores
    max_bytes: int = 0  # stop after this much text; 0: no cap
    max_file_bytes: int = -1  # skip larger files; -1: 512,000 for the standard library, no limit otherwise


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    start = time.time()
    try:
        cfg = parse_config(PrepareConfig, argv, doc=__doc__)
        inputs = [p for p in cfg.input.split(",") if p]
        if inputs and not cfg.out_dir:
            raise ValueError("--out_dir is required with --input")
        out_dir = cfg.out_dir or DEFAULT_OUT_DIR
        meta = prepare(inputs or None, out_dir, cfg.val_fraction, cfg.num_proc, cfg.max_bytes,
                       None if cfg.max_file_bytes < 0 else cfg.max_file_bytes)
    except (ValueError, FileNotFoundError, ImportError) as err:
        fail("prepare.py", err)
    print(f"{meta['train_tokens']:,} train tokens ({meta['train_documents']:,} documents), {meta['val_tokens']:,} val "
          f"tokens ({meta['val_documents']:,} documents); {meta['duplicate_documents']} duplicates dropped, "
          f"{meta['skipped_files']} unreadable files skipped; {time.time() - start:.1f}s -> {out_dir}")


if __name__ == "__main__":
    main()
