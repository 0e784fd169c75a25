"""The shape of the code: imports point one way (no circles, no script imports a script, model.py and lora.py know
nothing of each other), no runtime file over 600 lines, and every script answers --help with its options."""

import ast
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_lm.py", "train_clip.py", "train_mm.py", "generate.py", "serve.py", "eval_mm.py",
           "data/text/prepare.py", "data/llava/prepare.py", "data/easyvqa/prepare.py", "data/coco/cache_features.py",
           "data/synth/generate.py", "bench/bench_lm.py", "bench/bench_gpu.py", "bench/bench_qlora.py",
           "bench/bench_serve.py", "bench/bench_clip.py", "bench/bench_audio.py", "bench/bench_eval.py",
           "bench/thread_diff.py"]
MODULES = {p.stem: p for p in REPO.glob("*.py")}
TOP_SCRIPTS = {Path(s).stem for s in SCRIPTS if "/" not in s}


def runtime_files():
    return sorted(p for p in [*REPO.glob("*.py"), *REPO.glob("data/*/*.py")] if p.name != "conftest.py")


def local_imports(path):
    """The top-level modules of this repository that a file imports (anywhere in it)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if n in MODULES}


def test_imports_point_one_way():
    graph = {name: local_imports(path) for name, path in MODULES.items()}
    assert graph["model"] == set() and graph["lora"] == set(), graph  # model.py and lora.py import no module here
    assert graph["projector"] == set() and graph["tokenizer"] == set()
    for name, imported in graph.items():
        assert not imported & TOP_SCRIPTS, f"{name}.py imports the script(s) {imported & TOP_SCRIPTS}"
    for path in REPO.glob("data/*/*.py"):
        assert not local_imports(path) & TOP_SCRIPTS, f"{path} imports a script"
        assert "spec_from_file_location" not in path.read_text(), f"{path} loads another file as a module"

    def visit(name, trail):
        if name in trail:
            raise AssertionError(f"import circle: {' -> '.join(trail[trail.index(name):] + [name])}")
        for nxt in graph[name]:
            visit(nxt, trail + [name])
    for name in graph:
        visit(name, [])


def test_no_runtime_file_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in runtime_files() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_model_py_is_architecture_only():
    text = (REPO / "model.py").read_text()
    for trick in ("torch.library", "is_compiling", "multiply_sum", "one_query", "bitsandbytes", "import lora"):
        assert trick not in text, trick


def test_every_script_answers_help_with_its_options():
    def run(script):
        return script, subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=REPO, capture_output=True,
                                      text=True, timeout=180)
    with ThreadPoolExecutor(4) as pool:
        results = dict(pool.map(run, [s for s in SCRIPTS if (REPO / s).is_file()]))
    for script, done in results.items():
        assert done.returncode == 0, f"{script} --help: {done.stderr[-2000:]}"
        assert "options:" in done.stdout and "Traceback" not in done.stderr, script
        options = re.findall(r"^  --(\w+)=(BOOL|INT|FLOAT|STR)  \(default: ", done.stdout, re.M)
        assert options, script
        # every option has a one-line description under it
        blocks = re.split(r"^  --", done.stdout.split("options:", 1)[1], flags=re.M)[1:]
        undescribed = [b.split("=")[0] for b in blocks if not re.search(r"\n {6}\S", b)]
        assert not undescribed, f"{script}: options without a description: {undescribed}"


@pytest.mark.parametrize("argv", [["--chek"], ["--help"], ["-h"], ["help"]])
def test_run_sh_refuses_what_it_does_not_know(argv):
    done = subprocess.run(["bash", str(REPO / "run.sh"), *argv], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert "bash run.sh --check" in (done.stderr if argv == ["--chek"] else done.stdout)
    assert done.returncode == (2 if argv == ["--chek"] else 0)
    assert "pretrain:" not in done.stdout and "installing" not in done.stdout  # nothing started
