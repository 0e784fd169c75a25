"""
Generate training text with a model, in parallel: batched sampling from prompts, sharded over torchrun processes.

    python data/synth/generate.py --model=checkpoints/phi-2 --n=1000
    torchrun --nproc_per_node=8 data/synth/generate.py --model=checkpoints/phi-2 --n=100000 --batch_size=64
    python data/text/prepare.py --input=data/synth/out --out_dir=data/text/synth

Sample i uses prompt i % len(prompts); prompts come from --prompts (a .txt file with one prompt per line, or a
.jsonl file with a "prompt" field) or from built-in topic seeds. Rank r writes the samples with i % world == r to
out_dir/rank{r}.jsonl, one {"id", "prompt", "text"} per line where text is the prompt and its continuation, after
every batch; a rerun skips the ids already written, so a stopped job continues where it stopped.
"""

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from model import Phi  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from common import fail, parse_config, resolve_device  # noqa: E402


@dataclass
class GenerateConfig:
    model: str = ""  # HF folder (or hub id) of the model that writes the text
    out_dir: str = "data/synth/out"  # where the rank*.jsonl files go
    prompts: str = ""  # a .txt (one prompt per line) or .jsonl ("prompt" field) file; empty: built-in topic seeds
    n: int = 1000  # samples in all, over all processes
    max_new_tokens: int = 256  # longest answer in tokens
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95  # nucleus sampling threshold
    batch_size: int = 16  # prompts per batch of generation
    seed: int = 1337  # seeds the initial weights, the data order and sampling
    device: str = "auto"  # auto: this rank's GPU if there is one, else cpu
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on a CPU

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model is required: an HF folder of a Phi model, e.g. --model=checkpoints/phi-2")
        for name in ("n", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, not {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], not {self.top_p}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")


TOPICS = [
    "the water cycle", "volcanoes", "how bees make honey", "friendship", "the solar system", "photosynthesis",
    "a lost kitten", "prime numbers", "the history of writing", "how a bicycle works", "rainforests", "recycling",
    "a robot learning to paint", "fractions", "the human heart", "magnets", "a trip to the seaside", "dinosaurs",
    "sorting a list", "the moon's phases", "kindness to strangers", "how bread rises", "electric circuits",
    "a dragon who is afraid of the dark", "maps and compasses", "the immune system", "saving money", "clouds",
    "binary numbers", "a garden through the seasons", "why the sky is blue", "teamwork", "ancient Egypt",
    "probability with dice", "how airplanes fly", "a mystery in a library", "earthquakes", "healthy sleep",
    "recursion", "the first day at a new school",
]
STYLES = [
    "Write a short story for young children about {topic}.\n\nStory:",
    "Explain {topic} to a curious ten-year-old, step by step.\n\nExplanation:",
    "Chapter 1: {topic}\n\nIn this chapter we learn about {topic}, with a worked example.\n\n",
    "Write a Python function related to {topic}, with a docstring and a short usage example.\n\n```python\n",
    "Question: What are the most important things to know about {topic}?\nAnswer:",
    "A conversation between a student and a teacher about {topic}.\n\nStudent:",
]


def builtin_prompts():
    return [style.format(topic=topic) for topic in TOPICS for style in STYLES]


def load_prompts(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{path}:{n}: expected an object with a string 'prompt' field")
                prompts.append(record["prompt"])
    else:
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts


def read_done(path):
    """The ids already in a shard. A last line cut off by a crash is removed from the file."""
    if not path.is_file():
        return set()
    done, good_bytes = set(), 0
    data = path.read_bytes()
    for line in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
        try:
            record = json.loads(line)
            done.add(int(record["id"]))
        except (ValueError, KeyError, TypeError):
            break
        good_bytes += len(line) + 1
    if good_bytes != len(data):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_bytes(data[:good_bytes])
        os.replace(tmp, path)
    return done


def left_pad(rows, pad_id):
    """Token id lists -> (B, T) ids padded on the left and the attention mask of the real tokens."""
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return idx, mask


def generate(cfg):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(cfg.device, local_rank)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    prompts = load_prompts(cfg.prompts) if cfg.prompts else builtin_prompts()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard = out_dir / f"rank{rank}.jsonl"
    done = read_done(shard)
    todo = [i for i in range(rank, cfg.n, world) if i not in done]
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{world} processes; rank 0 has {len(todo)} of {len(range(0, cfg.n, world))} samples left -> {out_dir}",
        flush=True)
    if not todo:
        return shard
    tokenizer = Tokenizer()
    model = Phi.from_pretrained(cfg.model, dtype=dtype, device=device)
    context = model.config.max_position_embeddings
    start, new_tokens = time.time(), 0
    with open(shard, "a", encoding="utf-8") as f:
        for b in range(0, len(todo), cfg.batch_size):
            ids = todo[b:b + cfg.batch_size]
            texts = [prompts[i % len(prompts)] for i in ids]
            rows = [tokenizer.encode(t, allow_special=False) or [tokenizer.eos_id] for t in texts]
            idx, mask = left_pad(rows, tokenizer.eos_id)
            max_new = min(cfg.max_new_tokens, context - idx.shape[1])
            if max_new < 1:
                raise ValueError(f"a prompt of {idx.shape[1]} tokens leaves no room in the {context}-token context")
            generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + ids[0])
            out = model.generate(idx.to(device), max_new, temperature=cfg.temperature, top_p=cfg.top_p,
                                 eos_id=tokenizer.eos_id, attention_mask=mask.to(device), generator=generator)
            for i, text, tokens in zip(ids, texts, out[:, idx.shape[1]:].tolist()):
                if tokenizer.eos_id in tokens:
                    tokens = tokens[:tokens.index(tokenizer.eos_id)]
                new_tokens += len(tokens)
                f.write(json.dumps({"id": i, "prompt": text, "text": text + tokenizer.decode(tokens)},
                                   ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            say(f"rank 0: {b + len(ids)}/{len(todo)} samples, {new_tokens / (time.time() - start):.0f} new tokens/s",
                flush=True)
    return shard


def main(argv=None):
    try:
        generate(parse_config(GenerateConfig, sys.argv[1:] if argv is None else argv, doc=__doc__))
    except (ValueError, FileNotFoundError) as err:
        fail("generate.py", err)


if __name__ == "__main__":
    main()
