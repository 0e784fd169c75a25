"""Tests for data/text/prepare.py (corpus -> train.bin/val.bin/meta.json) and data/synth/generate.py."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from model import Phi, PhiConfig  # noqa: E402
from tokenizer import EOS, Tokenizer  # noqa: E402


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # worker processes find its functions by this name
    spec.loader.exec_module(module)
    return module


prepare = load("data/text/prepare.py", "text_prepare")
synth = load("data/synth/generate.py", "synth_generate")

STORIES = [f"Story {i}: a {c} fox met a {d} owl, and they talked about number {i * 7}.\n    The end."
           for i, (c, d) in enumerate(zip(["red", "grey", "small", "quick", "calm", "old"] * 5,
                                           ["wise", "sleepy", "tall", "young", "kind", "loud"] * 5))]


def documents(folder):
    """Decoded documents of train.bin and val.bin, each without its closing EOS."""
    tok, out = Tokenizer(), {}
    for split in ("train", "val"):
        ids = np.fromfile(folder / f"{split}.bin", dtype=np.uint16)
        assert len(ids) == 0 or ids[-1] == tok.eos_id
        cuts = np.flatnonzero(ids == tok.eos_id)
        out[split] = [tok.decode(ids[a + 1 if i else 0:b]) for i, (a, b) in enumerate(zip(np.r_[0, cuts[:-1]], cuts))]
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores, OpenMP threads that spin-wait make busy times several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def corpus(tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(EOS.join(STORIES[:10]))  # TinyStories style: several documents in one file
    (src / "b.txt").write_text(STORIES[10])
    (src / "sub" / "c.jsonl").write_text("\n".join(
        [json.dumps({"text": s}) for s in STORIES[11:25]]
        + ["{not json", json.dumps({"no_text": 1}), json.dumps({"text": STORIES[0]})]) + "\n")  # bad, bad, duplicate
    (src / "sub" / "d.txt").write_text(STORIES[25])
    (src / "sub" / "dup.txt").write_text(STORIES[25])
    (src / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    (src / "ignored.md").write_text("not an input suffix")
    return src


def test_prepare_tokenizes_dedupes_and_splits(corpus, tmp_path):
    meta = prepare.prepare([corpus], tmp_path / "out", val_fraction=0.3, num_proc=2, progress=False)
    docs = documents(tmp_path / "out")
    assert sorted(docs["train"] + docs["val"]) == sorted(STORIES[:26])  # every document once, text intact
    assert docs["val"] and docs["train"]
    assert meta["duplicate_documents"] == 2 and meta["skipped_files"] == 1 and meta["skipped_records"] == 2
    assert meta["files"] == 6 and "latin1.txt" in meta["skipped_examples"][0]
    assert meta["train_documents"] == len(docs["train"]) and meta["val_documents"] == len(docs["val"])
    for split in ("train", "val"):
        assert (tmp_path / "out" / f"{split}.bin").stat().st_size == 2 * meta[f"{split}_tokens"]
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk["tokenizer"] == "phi-2" and on_disk["tokenizer_fingerprint"] == prepare.tokenizer_fingerprint(Tokenizer())
    assert not list((tmp_path / "out").glob("*.tmp"))

    # the split is a function of each document alone: same bytes with one process, same val set from one file
    prepare.prepare([corpus], tmp_path / "again", val_fraction=0.3, num_proc=1, progress=False)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "all.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in reversed(STORIES[:26])))
    prepare.prepare([tmp_path / "one" / "all.jsonl"], tmp_path / "out1", val_fraction=0.3, num_proc=1, progress=False)
    assert sorted(documents(tmp_path / "out1")["val"]) == sorted(docs["val"])


def test_prepare_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt, .jsonl, .parquet files"):
        prepare.prepare([empty], tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare.prepare([tmp_path / "missing"], tmp_path / "out", progress=False)
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match="has no text"):
        prepare.prepare([blank], tmp_path / "out", progress=False)
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    (unreadable / "b.jsonl").write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"has no text \(2 files; 1 unreadable or non-UTF-8 files skipped"):
        prepare.prepare([unreadable], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()
    if importlib.util.find_spec("pyarrow") is None:
        (blank / "c.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            prepare.prepare([blank], tmp_path / "out", progress=False)


def test_prepare_command_line_errors_and_stdlib_sample(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, str(REPO / "data/text/prepare.py"), f"--input={tmp_path / 'empty'}",
                             f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "prepare.py: error: no .txt, .jsonl, .parquet files found" in result.stderr

    meta = prepare.prepare(None, tmp_path / "stdlib", max_bytes=150_000, val_fraction=0.3, num_proc=1, progress=False)
    assert meta["capped"] and "standard library" in meta["sources"][0]
    assert meta["train_documents"] > 3 and meta["train_tokens"] > 20_000
    files = prepare.find_files([prepare.stdlib_dir()], prepare.STDLIB_SUFFIXES, prepare.STDLIB_SKIP_DIRS,
                               prepare.STDLIB_MAX_FILE_BYTES)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.parts)
    assert all(f.stat().st_size <= prepare.STDLIB_MAX_FILE_BYTES for f in files) and len(files) > 100


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen_model")
    torch.manual_seed(0)
    config = PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=96)
    Phi(config).save_pretrained(folder)
    return folder


def test_synth_generate_shards_resumes_and_feeds_prepare(small_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "synth"
    args = [f"--model={small_model_dir}", f"--out_dir={out}", "--max_new_tokens=6", "--batch_size=3", "--temperature=1.0"]
    for rank in (0, 1):  # two processes as torchrun would start them
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        synth.main(args + ["--n=7"])
    rows = {r: [json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert sorted(x["id"] for x in rows[0]) == [0, 2, 4, 6] and sorted(x["id"] for x in rows[1]) == [1, 3, 5]
    prompts = synth.builtin_prompts()
    for r in (0, 1):
        for x in rows[r]:
            assert x["prompt"] == prompts[x["id"]] and x["text"].startswith(x["prompt"])
    assert any(len(x["text"]) > len(x["prompt"]) for x in rows[0] + rows[1])

    # a crash left half a line on rank 0: the rerun drops it and only does the ids not yet written
    with open(out / "rank0.jsonl", "a") as f:
        f.write('{"id": 8, "prompt": "cut o')
    monkeypatch.setenv("RANK", "0")
    synth.main(args + ["--n=11"])
    ids = [json.loads(line)["id"] for line in (out / "rank0.jsonl").read_text().splitlines()]
    assert ids[:4] == [x["id"] for x in rows[0]] and sorted(ids) == [0, 2, 4, 6, 8, 10]

    meta = prepare.prepare([out], tmp_path / "tokens", val_fraction=0.3, num_proc=1, progress=False)
    assert meta["train_documents"] + meta["val_documents"] + meta["duplicate_documents"] == 9


def test_synth_generate_bad_options(small_model_dir, tmp_path):
    with pytest.raises(ValueError, match="--model is required"):
        synth.GenerateConfig()
    with pytest.raises(ValueError, match="--batch_size must be at least 1"):
        synth.GenerateConfig(model=str(small_model_dir), batch_size=0)
    with pytest.raises(SystemExit, match="unknown option --nope"):
        synth.main([f"--model={small_model_dir}", "--nope=1"])
    (tmp_path / "p.txt").write_text("\n\n")
    with pytest.raises(SystemExit, match="has no prompts"):
        synth.main([f"--model={small_model_dir}", f"--prompts={tmp_path / 'p.txt'}", f"--out_dir={tmp_path}"])
