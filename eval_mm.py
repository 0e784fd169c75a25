"""
Standard multimodal benchmarks in LLaVA's question and answer formats: greedy answers in left-padded batches, the
image first, scored here where the benchmark can be (benchmarks.py), else written as the file its server scores.

    E=data/easyvqa/prepared/eval
    python eval_mm.py --benchmark=pope --mm=out/mm-demo --questions=$E/pope/llava_pope_test.jsonl \\
        --image_folder=data/easyvqa/prepared/images --annotations=$E/pope/coco --out_dir=out/eval/pope
    torchrun --nproc_per_node=8 eval_mm.py --benchmark=gqa --mm=CKPT ...   # rank r answers every world-th question
    python eval_mm.py --benchmark=pope --score_only --answers=out/eval/pope/answers.jsonl --questions=... \\
        --annotations=...

Benchmarks: pope, gqa, textvqa, sqa (ScienceQA-IMG), mme and seed are scored here; vqav2 (EvalAI), mmbench
(OpenCompass) and mmvet (its grader) are written as submission files. data/benchmarks/README.md says where each
question and ground-truth file comes from, and gives the command for each.

Writes into out_dir: answers.jsonl (LLaVA's answer format, in question order), scores.json and a markdown table
where scored, submission.* where the benchmark has one. Answers go to answers.part<rank>.jsonl as they are made and
are merged at the end, so a rerun (or a run after a kill) answers only the questions not answered yet.
"""

import base64
import csv
import json
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import BENCHMARKS, LETTER, Question
from clip_encoder import load_image, preprocess
from common import Dist, close_distributed, fail, gather_objects, parse_config, setup_distributed
from llava_data import ImageSource
from model import atomic_write
from multimodal import MultimodalLM, find_mm_checkpoint, read_mm_config, resolve_ref
from tokenizer import IMAGE_TOKEN_ID, Tokenizer, encode_chat


@dataclass
class EvalConfig:
    benchmark: str = ""  # pope | gqa | textvqa | sqa | mme | seed | vqav2 | mmbench | mmvet
    mm: str = ""  # multimodal checkpoint folder (or a train_mm.py run folder) to answer with
    questions: str = ""  # the benchmark's question file in LLaVA's format (data/benchmarks/README.md)
    image_folder: str = ""  # the folder the question file's image paths are relative to (mmbench: not used)
    annotations: str = ""  # ground truth: pope coco/ label folder, gqa testdev_balanced_questions.json, textvqa
    # TextVQA_0.5.1_val.json, sqa problems.json, mme MME_Benchmark_release_version/, seed SEED-Bench.json, vqav2
    # (optional) llava_vqav2_mscoco_test2015.jsonl; without it answers are written but not scored
    out_dir: str = ""  # answers.jsonl, scores.json and submission files go here (default out/eval/BENCHMARK; with
    # --score_only, the answer file's folder)
    score_only: bool = False  # score (or convert) an existing answer file; no model is loaded
    answers: str = ""  # the answer file for --score_only (default out_dir/answers.jsonl)
    batch_size: int = 16  # questions answered together (left-padded, greedy)
    max_new_tokens: int = 0  # longest answer in tokens; 0: the benchmark's (32, mmvet 512)
    limit: int = 0  # answer and score only the first N questions of the file (0: all)
    skip_bad: bool = False  # skip questions whose image is missing or unreadable (each is named) instead of stopping
    model_id: str = ""  # the answers' model_id (default: --mm as given)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (under torchrun: each rank's own GPU)
    dtype: str = "auto"  # auto (bfloat16 on CUDA, else float32) | float32 | bfloat16 | float16
    quantize: str = ""  # "" | nf4 | int8 weight-only language model
    workers: int = 4  # threads decoding image files

    def check(self):
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"--benchmark must be one of {', '.join(BENCHMARKS)}, not {self.benchmark!r}")
        if not self.questions:
            raise ValueError(f"--questions is required: the {self.benchmark} question file "
                             f"({BENCHMARKS[self.benchmark]['example']})")
        if not self.score_only and not self.mm:
            raise ValueError("--mm is required (a multimodal checkpoint), unless --score_only")
        if self.batch_size < 1 or self.limit < 0 or self.max_new_tokens < 0:
            raise ValueError("--batch_size must be at least 1, --limit and --max_new_tokens at least 0")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16") or self.quantize not in ("", "nf4", "int8"):
            raise ValueError("--dtype must be auto, float32, bfloat16 or float16 and --quantize nf4, int8 or empty")
        if self.annotations and not Path(self.annotations).exists():
            raise FileNotFoundError(f"--annotations={self.annotations} does not exist")
        self.answers = self.answers or str(Path(self.out_dir or f"out/eval/{self.benchmark}") / "answers.jsonl")
        default = Path(self.answers).parent if self.score_only else Path("out/eval") / self.benchmark
        self.out_dir = self.out_dir or str(default)
        return self


# ---- question files -------------------------------------------------------------------------------------------


def not_format(path, name, problem):
    return ValueError(f"{path} is not a {name} question file in LLaVA's format ({problem}); expected "
                      f"{describe(name)}")


def describe(name):
    b = BENCHMARKS[name]
    if b["format"] == "sqa":
        return f"a JSON list of {{id, image, conversations}} records, like LLaVA's {b['example']}"
    if b["format"] == "mmbench":
        return f"a TSV with index, question, hint, A-D, answer and image (base64) columns, like {b['example']}"
    return f"JSON lines with {', '.join(b['keys'])}, like LLaVA's {b['example']}"


def with_keys(questions):
    """Question keys: the question id, or id and text where the file repeats ids (MME asks two questions per id); a
    question asked twice under one id is answered once."""
    ids = [str(q.qid) for q in questions]
    repeated = len(set(ids)) < len(ids)
    for q in questions:
        q.key = f"{q.qid}\n{q.text}" if repeated else str(q.qid)
    return questions, repeated


def jsonl_questions(path, name):
    text = path.read_text()
    if text.lstrip().startswith("["):
        raise not_format(path, name, "it is one JSON list, not JSON lines")
    questions = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise not_format(path, name, f"line {n} is not JSON") from None
        missing = [k for k in BENCHMARKS[name]["keys"] if k not in row] if isinstance(row, dict) else ["all"]
        if missing:
            raise not_format(path, name, f"line {n} has no {', '.join(missing)}")
        if name == "mme" and "/" not in str(row["question_id"]):
            raise not_format(path, name, f"line {n}: an MME question_id is category/image, not {row['question_id']!r}")
        asked = str(row["text"])
        content = "<image>\n" + asked.replace("<image>", "").strip()
        category = str(row.get("category", ""))
        questions.append(Question("", row["question_id"], row["image"], asked, content, category, row))
    return questions


def sqa_questions(path, name):
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise not_format(path, name, "it is not one JSON document") from None
    if not isinstance(records, list):
        raise not_format(path, name, "it is not a JSON list")
    questions = []
    for n, r in enumerate(records):
        turns = r.get("conversations") if isinstance(r, dict) else None
        first = turns[0] if isinstance(turns, list) and turns else None
        if not isinstance(first, dict) or "value" not in first or "id" not in r:
            raise not_format(path, name, f"record {n} has no id or conversations")
        asked = first["value"].replace("<image>", "").strip() + "\n" + LETTER
        shown = "<image>\n" + asked if r.get("image") else asked
        questions.append(Question("", r["id"], r.get("image"), shown, shown, "", r))
    return questions


def mmbench_questions(path, name):
    csv.field_size_limit(2**31 - 1)  # a cell holds a whole base64 image
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    columns = set(rows[0]) if rows else set()
    if not {"index", "question", "A", "B", "image"} <= columns:
        raise not_format(path, name, "its first line is not a header with index, question, A, B and image")
    questions, images = [], {}
    for row in rows:
        options = []
        for letter in "ABCD":
            value = row.get(letter)
            if value is None or value.strip().lower() in ("", "nan", "none"):
                break
            options.append(value)
        hint = row.get("hint") or ""
        asked = (hint + "\n" if hint.strip().lower() not in ("", "nan", "none") else "") + row["question"]
        asked += "".join(f"\n{letter}. {option}" for letter, option in zip("ABCD", options))
        index = int(row["index"]) if row["index"].isdigit() else row["index"]
        images[str(index)] = row["image"]
        raw = {k: v for k, v in row.items() if k != "image"}
        questions.append(Question("", index, str(index), asked, f"<image>\n{asked}\n{LETTER}", row.get("category", ""),
                                  raw, {"round_id": 0, "options": options, "option_char": list("ABCD"[:len(options)])}))
    return questions, images


def load_questions(cfg):
    path = Path(cfg.questions)
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} does not exist (data/benchmarks/README.md says where to get it)")
    fmt, images = BENCHMARKS[cfg.benchmark]["format"], None
    try:
        if fmt == "mmbench":
            questions, images = mmbench_questions(path, cfg.benchmark)
        else:
            questions = (sqa_questions if fmt == "sqa" else jsonl_questions)(path, cfg.benchmark)
    except UnicodeDecodeError:
        raise not_format(path, cfg.benchmark, "it is not text") from None
    if not questions:
        raise ValueError(f"{path} has no questions")
    questions, repeated = with_keys(questions)
    return questions, repeated, images


# ---- answer files ---------------------------------------------------------------------------------------------


def answer_key(a, repeated):
    return f"{a['question_id']}\n{a.get('prompt', '')}" if repeated else str(a["question_id"])


def read_answers(paths, cfg, keys, repeated, killed=False):
    """{question key: answer record} of LLaVA-format answer files; refuses another benchmark's answers and answers to
    questions the question file does not have. killed: a last line cut short (a killed run's) is dropped."""
    answers = {}
    for path in paths:
        lines = Path(path).read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                a = json.loads(line)
            except json.JSONDecodeError:
                if killed and n == len(lines):
                    continue
                raise ValueError(f"{path} line {n} is not JSON: not an answer file in LLaVA's format") from None
            if not isinstance(a, dict) or "question_id" not in a or "text" not in a:
                raise ValueError(f"{path} line {n} has no question_id and text: not an answer file in LLaVA's format")
            theirs = (a.get("metadata") or {}).get("benchmark")
            if theirs and theirs != cfg.benchmark:
                raise ValueError(f"{path} holds {theirs} answers, not {cfg.benchmark} ones")
            if answer_key(a, repeated) not in keys:
                raise ValueError(f"{path} line {n} answers question {a['question_id']!r}, which {cfg.questions} "
                                 f"does not ask: an answer file of another benchmark or question file")
            answers[answer_key(a, repeated)] = a
    return answers


# ---- images -----------------------------------------------------------------------------------------------------


class Base64Images:
    """MMBench's images: base64 in the question file, by row index (a short cell names the row that holds it)."""

    def __init__(self, encoded, processor, pad_to_square):
        self.encoded, self.processor, self.pad_to_square = encoded, processor, pad_to_square

    def get(self, keys, device):
        pixels = []
        for key in keys:
            data = self.encoded[key]
            data = self.encoded.get(data, data) if len(data) < 64 else data
            try:
                image = load_image(base64.b64decode(data))
            except ValueError as err:
                raise ValueError(f"cannot use the image of row {key}: {err}") from None
            pixels.append(preprocess([image], self.processor, pad_to_square=self.pad_to_square)[0])
        return {"pixels": torch.stack(pixels).to(device)} if pixels else {}


class Fetched:
    """One batch's pixels, fetched once, handed to MultimodalLM.answer by key."""

    def __init__(self, pixels):
        self.pixels = pixels

    def get(self, keys, device):
        return {"pixels": torch.stack([self.pixels[k] for k in keys]).to(device)} if keys else {}


def fetch(source, keys):
    """({key: pixels}, {key: why it cannot be used}) for a batch's images."""
    keys = sorted(keys)
    try:
        return (dict(zip(keys, source.get(keys, "cpu")["pixels"])) if keys else {}), {}
    except (ValueError, OSError):
        good, bad = {}, {}
        for key in keys:
            try:
                good[key] = source.get([key], "cpu")["pixels"][0]
            except (ValueError, OSError) as err:
                bad[key] = str(err) if "cannot use" in str(err) else f"cannot use image {key}: {err}"
        return good, bad


# ---- answering --------------------------------------------------------------------------------------------------


def load_model(cfg, checkpoint, device):
    c = read_mm_config(checkpoint)
    ref = resolve_ref(checkpoint, c["vision"]) if c.get("vision") else ""
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not Path(ref).exists()
    if not ref or not ((Path(ref) / "config.json").is_file() or hub_id):
        raise ValueError(f"{checkpoint} has no vision tower to answer questions about images with (its mm_config.json "
                         f"names {c.get('vision')!r}, which is not a CLIP folder here)")
    dtype = ("bfloat16" if device.type == "cuda" else None) if cfg.dtype == "auto" else cfg.dtype
    model = MultimodalLM.load(checkpoint, device=device, dtype=dtype, quantize=cfg.quantize or None).eval()
    if model.vision is None:
        raise ValueError(f"{checkpoint} has no vision tower to answer questions about images with")
    return model


def answer_shard(cfg, model, questions, source, part, checkpoint, log):
    """Answer questions in batches, appending each batch's records to the part file; returns the new records."""
    tokenizer, context = Tokenizer(), model.lm.config.max_position_embeddings
    max_new = cfg.max_new_tokens or BENCHMARKS[cfg.benchmark]["max_new_tokens"]
    model_id = cfg.model_id or str(cfg.mm).rstrip("/")
    new, shown = [], time.time()
    with open(part, "a") as f:
        for k in range(0, len(questions), cfg.batch_size):
            batch = questions[k:k + cfg.batch_size]
            pixels, bad = fetch(source, {q.image for q in batch if q.image is not None})
            ready = []
            for q in batch:
                content = q.content if q.image is not None else q.content.replace("<image>", "")
                messages = [{"role": "user", "content": content}]
                ids, _ = encode_chat(tokenizer, messages)
                positions = len(ids) + ids.count(IMAGE_TOKEN_ID) * (model.image_tokens - 1)
                problem = bad.get(q.image) or (positions >= context and f"its prompt takes {positions} positions of "
                                               f"the model's {context}, leaving no room for an answer")
                if problem and not cfg.skip_bad:
                    raise ValueError(f"question {q.qid}: {problem} (--skip_bad skips such questions)")
                if problem:
                    log(f"skipped question {q.qid}: {problem}")
                else:
                    ready.append((q, messages))
            texts = model.answer([(m, q.image) for q, m in ready], Fetched(pixels), max_new, tokenizer) if ready else []
            for (q, _), text in zip(ready, texts):
                record = {"question_id": q.qid, "prompt": q.text, "text": text, "answer_id": uuid.uuid4().hex,
                          "model_id": model_id, **q.extra,
                          "metadata": {"benchmark": cfg.benchmark, "checkpoint": str(checkpoint)}}
                f.write(json.dumps(record) + "\n")
                new.append(record)
            f.flush()
            if time.time() - shown > 30:
                log(f"answered {min(k + cfg.batch_size, len(questions)):,}/{len(questions):,}")
                shown = time.time()
    return new


def answer_all(cfg, questions, every, repeated, images, d):
    """Answer what answers.jsonl and the part files do not have yet, rank r every world-th of it; the master merges
    everything into answers.jsonl in question order and returns {key: record} (None on the other ranks)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final, keys = Path(cfg.answers), {q.key for q in every}
    checkpoint = find_mm_checkpoint(cfg.mm).resolve()
    done = read_answers(([final] if final.is_file() else []) + sorted(out.glob("answers.part*.jsonl")), cfg, keys,
                        repeated, killed=True)
    others = {str((a.get("metadata") or {}).get("checkpoint")) for a in done.values()} - {"None", str(checkpoint)}
    if others:
        raise ValueError(f"{out} already holds answers of {sorted(others)[0]}; pass another --out_dir to answer with "
                         f"{checkpoint}")
    todo = [q for q in questions if q.key not in done]
    mine = todo[d.rank::d.world]
    d.log(f"{cfg.benchmark}: {len(questions):,} questions, {len(questions) - len(todo):,} answered before, "
          f"{len(todo):,} to answer" + (f" on {d.world} processes" if d.world > 1 else ""), flush=True)
    start, new = time.time(), []
    if mine:
        model = load_model(cfg, checkpoint, d.device)
        source = (Base64Images(images, model.processor, model.pad_to_square) if images is not None else
                  ImageSource(cfg.image_folder, model.processor, model.pad_to_square, None, 0, cfg.workers))
        start = time.time()
        new = answer_shard(cfg, model, mine, source, out / f"answers.part{d.rank}.jsonl", checkpoint,
                           lambda text: print(f"[rank {d.rank}] {text}" if d.world > 1 else text, flush=True))
    parts = gather_objects(new, d)
    if not d.master:
        return None
    seconds, count = time.time() - start, sum(len(p) for p in parts)
    if count:
        print(f"answered {count:,} questions in {seconds:.2f}s: {count / seconds:.2f} questions/s "
              f"(batch {cfg.batch_size}, {d.world} process{'es' if d.world > 1 else ''})", flush=True)
    merged = {**done, **{answer_key(a, repeated): a for p in parts for a in p}}
    order = {q.key: i for i, q in enumerate(every)}
    rows = sorted(merged.items(), key=lambda kv: order[kv[0]])
    atomic_write(final, "".join(json.dumps(a) + "\n" for _, a in rows))
    for part in out.glob("answers.part*.jsonl"):
        part.unlink()
    print(f"wrote {final} ({len(rows):,} answers)")
    return merged


def score(cfg, questions, answers):
    bench = BENCHMARKS[cfg.benchmark]
    if bench["truth"] and not bench["truth"].startswith("optional") and not cfg.annotations:
        if cfg.score_only:
            raise ValueError(f"--score_only needs --annotations: {bench['truth']}")
        print(f"no --annotations ({bench['truth']}): answers written, not scored")
        return None
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    scores, table = bench["score"](questions, answers, cfg.annotations, cfg.out_dir)
    scores = {"benchmark": cfg.benchmark, "questions_file": cfg.questions, "answers_file": cfg.answers,
              "annotations": cfg.annotations, **scores}
    atomic_write(Path(cfg.out_dir) / "scores.json", json.dumps(scores, indent=2))
    answered = f"{scores.get('answered', 0):,} of {scores['questions']:,} answered"
    print(f"\n{cfg.benchmark} on {cfg.questions} ({answered}):\n")
    print(table + "\n")
    print(f"wrote {Path(cfg.out_dir) / 'scores.json'}", flush=True)
    return scores


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    d = Dist()
    try:
        cfg = parse_config(EvalConfig, argv, doc=__doc__).check()
        every, repeated, images = load_questions(cfg)
        questions = every[:cfg.limit] if cfg.limit else every
        if cfg.score_only:
            if not Path(cfg.answers).is_file():
                raise FileNotFoundError(f"answer file {cfg.answers} does not exist")
            answers = read_answers([cfg.answers], cfg, {q.key for q in every}, repeated)
        else:
            if images is None and not Path(cfg.image_folder or ".").is_dir():
                raise FileNotFoundError(f"--image_folder={cfg.image_folder} is not a folder")
            d = setup_distributed(cfg.device)
            answers = answer_all(cfg, questions, every, repeated, images, d)
        if answers is not None:
            score(cfg, questions, answers)
    except (ValueError, FileNotFoundError) as err:
        fail("eval_mm.py", err)
    finally:
        close_distributed(d)


if __name__ == "__main__":
    main()
