"""
Evaluation throughput: questions/s of eval_mm.py at batch 1 against batch 16 (left-padded batches, images included)
on a multimodal checkpoint, on the easy-vqa miniature of a benchmark that data/easyvqa/prepare.py writes. Each run is
`python eval_mm.py` into a fresh folder; the rate is the one eval_mm.py reports, answering only (loading left out).
The last column says how many answers are the same as at batch 1.

    python bench/bench_eval.py                                  # the demo checkpoint of `bash run.sh`, POPE
    python bench/bench_eval.py --mm=CKPT --benchmark=gqa --limit=1024 --batch_sizes=1,16,64 --device=cuda
"""

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common import Dist, fail, parse_config, prepare_once  # noqa: E402

EVAL = REPO / "data" / "easyvqa" / "prepared" / "eval"
MINIATURES = {"pope": "pope/llava_pope_test.jsonl", "gqa": "gqa/llava_gqa_testdev_balanced.jsonl",
              "sqa": "scienceqa/llava_test_CQM-A.json", "mme": "MME/llava_mme.jsonl"}


@dataclass
class BenchConfig:
    mm: str = str(REPO / "out" / "mm-demo")  # multimodal checkpoint (default: the demo's, from `bash run.sh`)
    benchmark: str = "pope"  # which easy-vqa miniature: pope | gqa | sqa | mme
    questions: str = ""  # another question file of that benchmark's format (default: the miniature's)
    image_folder: str = str(REPO / "data" / "easyvqa" / "prepared" / "images")  # the question file's image folder
    limit: int = 1024  # questions per run (the first ones of the file)
    batch_sizes: str = "1,16"  # comma-separated batch sizes; the first is the baseline of the speed-up
    reps: int = 2  # runs per batch size; the fastest counts
    device: str = "auto"  # eval_mm.py --device
    dtype: str = "auto"  # eval_mm.py --dtype


def run(cfg, batch, out):
    done = subprocess.run([sys.executable, str(REPO / "eval_mm.py"), f"--benchmark={cfg.benchmark}", f"--mm={cfg.mm}",
                           f"--questions={cfg.questions}", f"--image_folder={cfg.image_folder}", f"--out_dir={out}",
                           f"--limit={cfg.limit}", f"--batch_size={batch}", f"--device={cfg.device}",
                           f"--dtype={cfg.dtype}"], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise ValueError(f"eval_mm.py failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    rate = re.search(r"answered ([\d,]+) questions in ([\d.]+)s", done.stdout)
    answers = [json.loads(line)["text"] for line in (Path(out) / "answers.jsonl").read_text().splitlines()]
    return int(rate.group(1).replace(",", "")), float(rate.group(2)), answers


def main(argv):
    cfg = parse_config(BenchConfig, argv, doc=__doc__)
    if cfg.benchmark not in MINIATURES:
        raise ValueError(f"--benchmark must be one of {', '.join(MINIATURES)}")
    if not cfg.questions:
        prepare_once(Dist(), EVAL / MINIATURES[cfg.benchmark], REPO / "data/easyvqa/prepare.py", what="easy-vqa")
        cfg.questions = str(EVAL / MINIATURES[cfg.benchmark])
    if not (Path(cfg.mm).exists()):
        raise FileNotFoundError(f"no checkpoint at {cfg.mm}: run `bash run.sh` for the demo's, or pass --mm=CKPT")
    sizes = [int(b) for b in cfg.batch_sizes.split(",") if b.strip()]
    rows, base, first = [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        for batch in sizes:
            best = None
            for rep in range(cfg.reps):
                n, seconds, answers = run(cfg, batch, Path(tmp) / f"b{batch}-{rep}")
                best = min(best or (n, seconds, answers), (n, seconds, answers), key=lambda r: r[1])
            n, seconds, answers = best
            base, first = base or n / seconds, first or answers
            same = sum(a == b for a, b in zip(answers, first)) / len(first)
            rate = n / seconds
            rows.append(f"| {batch} | {n:,} | {seconds:.2f} | {rate:.2f} | {rate / base:.2f}x | {100 * same:.1f}% |")
            print(f"batch {batch}: {n / seconds:.2f} questions/s", file=sys.stderr, flush=True)
    print(f"\neval_mm.py on {cfg.benchmark} ({Path(cfg.questions).name}, first {cfg.limit}), checkpoint {cfg.mm}, "
          f"device {cfg.device}, dtype {cfg.dtype}:\n")
    print("| batch | questions | seconds | questions/s | speed-up | answers as at batch 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as err:
        fail("bench_eval.py", err)
