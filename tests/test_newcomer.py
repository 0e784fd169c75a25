"""A newcomer's first hour: ordinary mistakes get one clear line and exit code 2 (no traceback), run folders work
wherever a checkpoint is expected, a finished run is never overwritten by accident, the interactive chat and
several samples work, a LoRA adapter merges into a standalone checkpoint that transformers loads, and every file a
checkpoint holds is readable like any other file the user writes."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import Phi, PhiConfig

REPO = Path(__file__).resolve().parents[1]
TINY_MM = ["--preset=tiny", "--lora_dropout=0", "--workers=0", "--max_iters=2", "--samples=0"]


def run(script, *args, stdin=None, timeout=240):
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True,
                          input=stdin, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_clear_line(done, words):
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and words in done.stderr, done.stderr[-2000:]
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm") / "run"
    Phi(PhiConfig.from_preset("tiny")).save_pretrained(path / "ckpt")  # a run folder, as train_lm.py writes it
    return path


@pytest.fixture(scope="module")
def mm_run(tmp_path_factory):
    """A tiny two-stage train_mm.py run folder on a handful of drawn images."""
    from PIL import Image
    root = tmp_path_factory.mktemp("mm")
    (root / "images").mkdir()
    records = []
    for k in range(12):
        Image.new("RGB", (32, 32), ("red", "blue", "green")[k % 3]).save(root / "images" / f"{k}.png")
        records.append({"id": str(k), "image": f"{k}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": ("red", "blue", "green")[k % 3]}]})
    (root / "data.json").write_text(json.dumps(records))
    done = run("train_mm.py", *TINY_MM, f"--data={root / 'data.json'}", f"--image_folder={root / 'images'}",
               "--val_size=3", f"--out_dir={root / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.parametrize("script, args, words", [
    ("generate.py", ["--model=DIR", "--prompt=hi", "--device=cuda"], "--device=cuda but"),
    ("generate.py", ["--model=DIR", "--prompt=hi", "--device=gpu"], "--device=gpu is not a device"),
    ("generate.py", ["--model=DIR", "--prompt=hi", "--top_p=1.5"], "--top_p must be in (0, 1]"),
    ("generate.py", ["--model=DIR", "--prompt=hi", "--temperature=-1"], "--temperature must be >= 0"),
    ("generate.py", ["--model=checkpoints/phi-2-nowhere", "--prompt=hi"], "does not exist"),
    ("generate.py", ["--model=./nope", "--prompt=hi"], "checkpoint folder ./nope does not exist"),
    ("generate.py", ["--mm=no/such/run", "--prompt=hi"], "multimodal checkpoint no/such/run does not exist"),
    ("train_mm.py", ["--preset=tiny", "--data=x.json", "--device=cuda:7"], "--device=cuda:7"),
    ("data/coco/cache_features.py", ["--images=.", "--vision=no/such/clip", "--out=/tmp/never"], "does not exist"),
])
def test_ordinary_mistakes_get_one_clear_line(lm_dir, script, args, words):
    if "--device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_clear_line(run(script, *[a.replace("DIR", str(lm_dir)) for a in args]), words)


def test_run_folders_work_where_checkpoints_are_expected(lm_dir, mm_run):
    done = run("generate.py", f"--model={lm_dir}", "--prompt=def f(x):", "--raw", "--max_new_tokens=3",
               "--temperature=0")
    assert done.returncode == 0 and done.stdout.startswith("def f(x):"), done.stderr[-2000:]
    image = mm_run / "images" / "0.png"
    for folder in (mm_run / "run", mm_run / "run" / "instruct", mm_run / "run" / "instruct" / "ckpt"):
        done = run("generate.py", f"--mm={folder}", f"--image={image}", "--prompt=What colour is it?",
                   "--temperature=0", "--max_new_tokens=3")
        assert done.returncode == 0, done.stderr[-2000:]
    done = run("train_mm.py", *TINY_MM, "--stage=instruct", f"--init={mm_run / 'run' / 'align'}",
               f"--data={mm_run / 'data.json'}", f"--image_folder={mm_run / 'images'}", "--val_size=3",
               f"--out_dir={mm_run / 'again'}")
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_finished_run_is_not_overwritten_without_asking(mm_run):
    args = [*TINY_MM, f"--data={mm_run / 'data.json'}", f"--image_folder={mm_run / 'images'}", "--val_size=3",
            f"--out_dir={mm_run / 'run'}"]
    before = (mm_run / "run" / "instruct" / "ckpt" / "projector.safetensors").read_bytes()
    one_clear_line(run("train_mm.py", *args), "pass --resume to continue it or --overwrite")
    assert (mm_run / "run" / "instruct" / "ckpt" / "projector.safetensors").read_bytes() == before
    assert run("train_mm.py", *args, "--resume").returncode == 0  # both stages are complete: nothing to do


def test_chat_mode_and_samples(lm_dir):
    done = run("generate.py", f"--model={lm_dir}", "--chat", "--system=Be brief.", "--max_new_tokens=4",
               "--temperature=0", stdin="hello\nand again\n\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("> ") >= 3  # two turns answered, then the empty line ends the chat
    done = run("generate.py", f"--model={lm_dir}", "--prompt=hi", "--num_samples=3", "--max_new_tokens=5", "--seed=3")
    assert done.returncode == 0 and done.stderr.count("--- sample") == 3, done.stderr[-2000:]
    again = run("generate.py", f"--model={lm_dir}", "--prompt=hi", "--num_samples=3", "--max_new_tokens=5", "--seed=3")
    assert again.stdout == done.stdout  # seeded: the same three samples


def test_merged_export_loads_in_transformers_and_answers_the_same(mm_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from multimodal import ChatModel
    from PIL import Image
    done = run("export.py", f"--mm={mm_run / 'run'}", f"--out={tmp_path / 'merged'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "merged" / "adapter_config.json").exists() and (tmp_path / "merged" / "lm" / "config.json").is_file()
    original, merged = ChatModel(None, mm=mm_run / "run"), ChatModel(None, mm=tmp_path / "merged")
    messages = [{"role": "user", "content": "<image>\nWhat colour is it?"}]
    image = [Image.open(mm_run / "images" / "1.png")]
    assert merged.reply(messages, image, temperature=0, max_tokens=4) == original.reply(messages, image, temperature=0,
                                                                                           max_tokens=4)
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path / "merged" / "lm").eval()
    idx = torch.randint(0, 50000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, merged.model(idx)[0], rtol=1e-4, atol=1e-4)
    done = run("export.py", f"--model={mm_run / 'run' / 'align' / 'random_tiny'}",
               f"--adapter={mm_run / 'run'}", f"--out={tmp_path / 'lm-only'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert transformers.PhiForCausalLM.from_pretrained(tmp_path / "lm-only") is not None
    one_clear_line(run("export.py", f"--mm={mm_run / 'run'}", f"--out={tmp_path / 'merged'}"), "exists")


def test_checkpoint_files_are_readable_like_any_other(mm_run):
    umask = os.umask(0)
    os.umask(umask)
    ckpt = mm_run / "run" / "instruct" / "ckpt"
    files = [p for p in ckpt.rglob("*") if p.is_file()] + list((mm_run / "run" / "align" / "random_tiny").iterdir())
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


def test_nf4_says_nothing_about_optional_kernels(lm_dir):
    pytest.importorskip("bitsandbytes")
    done = run("generate.py", f"--model={lm_dir}", "--prompt=hi", "--quantize=nf4", "--dtype=bfloat16",
               "--max_new_tokens=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels" not in done.stderr and "Failed to load" not in done.stderr, done.stderr


def test_eval_without_answer_types_prints_one_total_row(mm_run, capsys):
    import train_mm
    train_mm.main(["--preset=tiny", "--workers=0", "--eval", f"--init={mm_run / 'run'}",
                   f"--eval_data={mm_run / 'data.json'}", f"--image_folder={mm_run / 'images'}",
                   f"--out_dir={mm_run / 'eval'}"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["**all**"]
