"""
eval_mm.py and benchmarks.py: every scorer against a hand computation on small files in the benchmarks' own formats
(punctuation, articles, number words, "Yes, there is", "The answer is B.", missing answers); the easy-vqa miniature
answered end to end by a tiny checkpoint trained here (batched = one at a time, resumable, 2 torchrun ranks = 1
process, MMBench's base64 TSV); bad input stopping with one clear line; the request lmms-eval's OpenAI-compatible
model sends, through serve.py to a stand-in; bench/bench_eval.py's table.
"""

import asyncio
import base64
import csv
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import benchmarks as B
import eval_mm

REPO = Path(__file__).resolve().parents[1]
SHORT = "\nAnswer the question using a single word or phrase."


def load_prepare():
    spec = importlib.util.spec_from_file_location("easyvqa_prepare_for_eval", REPO / "data/easyvqa/prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answer_rows(texts, prompts=None, benchmark=None):
    """LLaVA-format answer records {question id: text}; a None text leaves the question unanswered."""
    rows = []
    for qid, text in texts.items():
        if text is not None:
            row = {"question_id": qid, "prompt": (prompts or {}).get(qid, ""), "text": text, "answer_id": f"a{qid}",
                   "model_id": "hand", "metadata": {"benchmark": benchmark} if benchmark else {}}
            rows.append(row)
    return rows


def run(argv, capsys):
    """eval_mm.main in this process: (exit code, stdout, stderr)."""
    try:
        eval_mm.main(argv)
        code = 0
    except SystemExit as err:
        code = err.code
    out = capsys.readouterr()
    return code, out.out, out.err


def score_only(tmp_path, capsys, benchmark, questions, answers, annotations=None):
    answers_file = jsonl(tmp_path / "answers" / "answers.jsonl", answers)
    argv = [f"--benchmark={benchmark}", f"--questions={questions}", f"--answers={answers_file}", "--score_only"]
    code, out, err = run(argv + ([f"--annotations={annotations}"] if annotations else []), capsys)
    assert code == 0, err
    return json.loads((tmp_path / "answers" / "scores.json").read_text()), out


def refused(argv, capsys, *words):
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval_mm.py: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ---- normalisation ------------------------------------------------------------------------------------------


def test_vqa_normalisation_and_accuracy():
    n = B.vqa_normalize
    assert n("Yes, there is.") == "yes there is"
    assert n("The Dog!") == "dog" and n("a red car") == "red car" and n("An apple") == "apple"
    assert n("Two") == "2" and n("none") == "0" and n("ten dogs") == "10 dogs"
    assert n("3,000") == "3000" and n("1.5") == "1.5" and n("end.") == "end"
    assert n("dont") == "don't" and n("wouldnt've") == "wouldn't've" and n("lets") == "lets"
    assert n("yes/no") == "yes no" and n("left - right") == "left right"
    assert n("the man's hat?") == "man 's hat"
    def ten(*groups):
        return [a for a, k in groups for _ in range(k)]
    assert B.vqa_accuracy("dog", ten(("dog", 2), ("cat", 8))) == pytest.approx(0.6)  # (2 * 1/3 + 8 * 2/3) / 10
    assert B.vqa_accuracy("Dog.", ten(("dog", 3), ("cat", 7))) == pytest.approx(0.9)  # (3 * 2/3 + 7 * 1) / 10
    assert B.vqa_accuracy("the dog", ten(("dog", 4), ("cat", 6))) == 1.0
    assert B.vqa_accuracy("bird", ten(("dog", 4), ("cat", 6))) == 0.0
    assert B.pope_says_yes("Yes, there is a dog in the image.") and not B.pope_says_yes("No, there is not.")
    assert not B.pope_says_yes("There is no cat. A dog") and B.pope_says_yes("Not sure")  # LLaVA's words: No, no, not
    assert [B.sqa_letter(t) for t in ("B", "The answer is B.", "B. a cat", "b", "The answer is B", "B.", "",
                                      "The answer is A. The answer is B.")] == ["B", "B", "B"] + ["FAILED"] * 5
    assert [B.mme_label(t) for t in ("Yes", "no, it is not", "Yes, there is", "maybe", "Not")] == \
        ["yes", "no", "yes", "other", "no"]
    assert B.gqa_normalize("Yes.") == "yes" and B.gqa_normalize("The dog.") == "the dog"


# ---- each scorer by hand -------------------------------------------------------------------------------------


def test_pope_by_hand(tmp_path, capsys):
    cats = ["adversarial"] * 4 + ["random"] * 4
    questions = jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": i, "image": f"COCO_val2014_{i:012d}.jpg", "text": f"Is there a dog in the image?{SHORT}",
         "category": c} for i, c in enumerate(cats)])
    for cat, labels, first in (("adversarial", "yes no yes no", 0), ("random", "yes yes no no", 4)):
        jsonl(tmp_path / "coco" / f"coco_pope_{cat}.json", [
            {"question_id": k + 1, "image": f"COCO_val2014_{first + k:012d}.jpg",
             "text": "Is there a dog in the image?", "label": label} for k, label in enumerate(labels.split())])
    texts = {0: "Yes, there is a dog in the image.", 1: "No, there is not.", 2: "There is no cat. But a dog.",
             3: "Not sure", 4: "yes", 5: None, 6: "No, it isn't", 7: "no"}
    scores, printed = score_only(tmp_path, capsys, "pope", questions, answer_rows(texts), tmp_path / "coco")
    adv, rnd = scores["categories"]["adversarial"], scores["categories"]["random"]
    # adversarial: TP (q0), TN (q1), FN (q2: the first sentence says no), FP (q3: "Not" is not LLaVA's "not")
    assert (adv["TP"], adv["TN"], adv["FN"], adv["FP"]) == (1, 1, 1, 1)
    assert adv["accuracy"] == adv["precision"] == adv["recall"] == adv["f1"] == adv["yes_ratio"] == 0.5
    # random: TP (q4), q5 missing (a yes), TN (q6, q7): accuracy 3/4, precision 1/1, recall 1/2, yes-ratio 1/3
    assert rnd["missing"] == 1 and rnd["accuracy"] == 0.75 and rnd["precision"] == 1.0 and rnd["recall"] == 0.5
    assert rnd["f1"] == pytest.approx(2 / 3) and rnd["yes_ratio"] == pytest.approx(1 / 3)
    assert scores["mean"]["accuracy"] == pytest.approx(0.625) and scores["mean"]["f1"] == pytest.approx(7 / 12)
    assert scores["questions"] == 8 and scores["missing"] == 1
    assert "| random | 4 | 1 | 75.00 | 100.00 | 50.00 | 66.67 | 33.33 |" in printed
    # labels of another question file (their images differ) are refused
    coco = tmp_path / "coco"
    (coco / "coco_pope_random.json").write_text((coco / "coco_pope_adversarial.json").read_text())
    answers = jsonl(tmp_path / "a2.jsonl", answer_rows(texts))
    refused(["--benchmark=pope", f"--questions={questions}", f"--answers={answers}", "--score_only",
             f"--annotations={coco}"], capsys, "coco_pope_random.json line 1", "not those of this question file")


def test_gqa_by_hand(tmp_path, capsys):
    truth = {"1": ("yes", "verify"), "2": ("dog", "query"), "3": ("red", "query"), "4": ("2", "query"),
             "5": ("left", "choose")}
    annotations = tmp_path / "testdev_balanced_questions.json"
    annotations.write_text(json.dumps({k: {"imageId": f"n{k}", "question": "?", "answer": a, "types": {"structural": s}}
                                       for k, (a, s) in truth.items()}))
    questions = jsonl(tmp_path / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": k, "image": f"n{k}.jpg", "text": f"Question {k}?{SHORT}"} for k in truth])
    texts = {"1": "Yes.", "2": "The dog.", "3": "Red", "4": "two", "5": None}  # GQA keeps articles and number words
    scores, printed = score_only(tmp_path, capsys, "gqa", questions, answer_rows(texts), annotations)
    assert scores["accuracy"] == pytest.approx(2 / 5)
    assert scores["by_type"] == {"verify": 1.0, "query": pytest.approx(1 / 3), "choose": 0.0, "all": pytest.approx(0.4)}
    assert "| **all** | 5 | 40.00 |" in printed
    predictions = json.loads(Path(scores["submission"]).read_text())
    assert predictions[0] == {"questionId": "1", "prediction": "yes"} and predictions[4]["prediction"] == ""


def test_textvqa_by_hand(tmp_path, capsys):
    def humans(*groups):
        return [a for a, k in groups for _ in range(k)]
    data = [("img1", 101, "what is the brand?", humans(("dakota", 3), ("dakota digital", 2), ("nikon", 5)), "Dakota."),
            ("img2", 102, "how many?", humans(("2", 1), ("two", 1), ("3", 8)), "Two"),  # 2 of 10 say "2"
            ("img3", 103, "what is it?", humans(("red car", 4), ("car", 6)), "the red car!"),
            ("img4", 104, "what time?", humans(("noon", 10)), None),
            ("img4", 105, "what word?", humans(("don't", 1), ("no", 9)), "dont")]
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"image_id": im, "question_id": qid, "question": q, "answers": a} for im, qid, q, a, _ in data]}))
    prompts = {qid: f"{q}\nReference OCR token: Dakota, Digital{SHORT}" for _, qid, q, _, _ in data}
    questions = jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": qid, "image": f"{im}.jpg", "text": prompts[qid]} for im, qid, _, _, _ in data])
    texts = {qid: t for _, qid, _, _, t in data}
    scores, _ = score_only(tmp_path, capsys, "textvqa", questions, answer_rows(texts, prompts),
                           tmp_path / "TextVQA_0.5.1_val.json")
    assert scores["accuracy"] == pytest.approx((0.9 + 0.6 + 1.0 + 0.0 + 0.3) / 5)
    assert scores["missing"] == 1


def test_sqa_by_hand(tmp_path, capsys):
    problems = {"10": ("abc", 1), "11": ("abc", 1), "12": ("abc", 1), "13": ("xy", 0), "14": ("abc", 2),
                "15": ("ab", 0), "16": ("abc", 1)}
    (tmp_path / "problems.json").write_text(json.dumps(
        {pid: {"question": "?", "choices": list(c), "answer": a, "image": None if pid == "15" else "image.png"}
         for pid, (c, a) in problems.items()}))
    records = [{"id": pid, **({} if pid == "15" else {"image": f"{pid}/image.png"}), "conversations": [
        {"from": "human", "value": ("" if pid == "15" else "<image>\n") + "Which one?\nA. a\nB. b"},
        {"from": "gpt", "value": "The answer is B."}]} for pid in problems]
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(records))
    texts = {"10": "B", "11": "The answer is B.", "12": "B. b", "13": "C", "14": "b", "15": "A", "16": None}
    questions = tmp_path / "llava_test_CQM-A.json"
    scores, printed = score_only(tmp_path, capsys, "sqa", questions, answer_rows(texts), tmp_path)
    assert scores["by_subset"] == {"IMG": 0.5, "TXT": 1.0, "all": pytest.approx(4 / 7)}  # 13: C is not an option of 2
    assert scores["img_accuracy"] == 0.5 and scores["unparsed"] == 2  # "b" and the missing answer
    assert "| IMG | 6 | 3 | 50.00 |" in printed


def test_mme_by_hand(tmp_path, capsys):
    root = tmp_path / "MME_Benchmark_release_version"
    gt = {("existence", "1", ""): [("Is there a dog in this image?", "Yes"), ("Is there a cat in this image?", "No")],
          ("existence", "2", ""): [("Is there a car in this image?", "Yes"), ("Is there a bus in this image?", "No")],
          ("artwork", "3", "questions_answers_YN"): [("Is this by Monet?", "Yes"), ("Is this by Picasso?", "No")],
          ("code_reasoning", "4", ""): [("Does the code print 5?", "Yes"), ("Does the code print 6?", "No")]}
    rows = []
    for (cat, stem, sub), qa in gt.items():
        folder = root / cat / sub
        folder.mkdir(parents=True, exist_ok=True)
        space = "  " if cat == "artwork" else " "  # some MME files have two spaces before the suffix
        (folder / f"{stem}.txt").write_text("".join(f"{q}{space}Please answer yes or no.\t{a}\n" for q, a in qa))
        for q, _ in qa:
            text = f"{q} Please answer yes or no." if cat == "code_reasoning" else q + SHORT
            rows.append({"question_id": f"{cat}/{stem}.png", "image": f"{cat}/{stem}.png", "text": text})
    questions = jsonl(tmp_path / "llava_mme.jsonl", rows)
    texts = ["Yes", "No, there is not.", "Yes, there is", "maybe", None, "no", "yes", "No"]
    answers = [a for row, t in zip(rows, texts)
               for a in answer_rows({row["question_id"]: t}, {row["question_id"]: row["text"]})]
    scores, printed = score_only(tmp_path, capsys, "mme", questions, answers, root)
    cats = scores["categories"]
    assert cats["existence"] == {"images": 2, "questions": 4, "acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert cats["artwork"]["score"] == 50.0 and cats["code_reasoning"]["score"] == 200.0
    assert scores["perception"] == 175.0 and scores["cognition"] == 200.0 and scores["missing"] == 1
    assert "| **Perception** |  |  |  |  | **175.00** |" in printed


def test_seed_by_hand(tmp_path, capsys):
    (tmp_path / "SEED-Bench.json").write_text(json.dumps({
        "question_type": {"Scene Understanding": 1, "Instance Identity": 2},
        "questions": [{"question_id": "101", "answer": "A", "question_type_id": 1, "data_type": "image"},
                      {"question_id": "102", "answer": "B", "question_type_id": 1, "data_type": "image"},
                      {"question_id": "103", "answer": "C", "question_type_id": 2, "data_type": "image"},
                      {"question_id": "104", "answer": "D", "question_type_id": 2, "data_type": "video"}]}))
    questions = jsonl(tmp_path / "llava-seed-bench.jsonl", [
        {"question_id": q, "image": f"SEED-Bench-image/{q}.jpg", "text": "Which?\nA. a\nB. b\nC. c\nD. d\n" + B.LETTER}
        for q in ("101", "102", "103", "104")])
    texts = {"101": "A", "102": "The answer is B.", "103": None, "104": "D"}  # the letter exactly, as LLaVA scores it
    scores, _ = score_only(tmp_path, capsys, "seed", questions, answer_rows(texts), tmp_path / "SEED-Bench.json")
    assert scores["by_type"] == {"Scene Understanding": 0.5, "Instance Identity": 0.5, "image": pytest.approx(1 / 3),
                                 "video": 1.0, "all": 0.5}
    submitted = [json.loads(line) for line in Path(scores["submission"]).read_text().splitlines()]
    assert submitted[1] == {"question_id": "102", "prediction": "The answer is B."} and submitted[2]["prediction"] == ""


def test_submission_files(tmp_path, capsys):
    questions = jsonl(tmp_path / "llava_vqav2_mscoco_test-dev2015.jsonl", [
        {"question_id": q, "image": f"COCO_test2015_{q:012d}.jpg", "text": "How many?" + SHORT} for q in (1, 2, 3)])
    split = jsonl(tmp_path / "llava_vqav2_mscoco_test2015.jsonl",
                  [{"question_id": q, "image": "x.jpg", "text": "?"} for q in (1, 2, 3, 4)])
    answers = answer_rows({1: "Two dogs.", 2: "Yes, it is", 3: None})
    scores, _ = score_only(tmp_path, capsys, "vqav2", questions, answers, split)
    assert json.loads(Path(scores["submission"]).read_text()) == [
        {"question_id": 1, "answer": "2 dogs"}, {"question_id": 2, "answer": "yes it is"},
        {"question_id": 3, "answer": ""}, {"question_id": 4, "answer": ""}]
    mmvet = jsonl(tmp_path / "llava-mm-vet.jsonl",
                  [{"question_id": q, "image": f"v1_{q}.png", "text": "Describe."} for q in (0, 1)])
    shutil.rmtree(tmp_path / "answers")
    scores, _ = score_only(tmp_path, capsys, "mmvet", mmvet, answer_rows({0: "A cat on a mat.", 1: None}))
    assert json.loads(Path(scores["submission"]).read_text()) == {"v1_0": "A cat on a mat.", "v1_1": ""}
    tsv = write_mmbench(tmp_path / "mmbench_dev_20230712.tsv")
    shutil.rmtree(tmp_path / "answers")
    scores, _ = score_only(tmp_path, capsys, "mmbench", tsv, answer_rows({0: "B", 1: None, 2: "The answer is A"}))
    with open(scores["submission"], newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["index", "question", "hint", "A", "B", "C", "D", "prediction", "answer", "category",
                       "l2-category", "source", "split"]
    assert [r[7] for r in rows[1:]] == ["B", "", "The answer is A"] and rows[2][1] == "Which colour is it?"


def png_base64(colour, size=(20, 16)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_mmbench(path):
    """An MMBench TSV (columns as mmbench_dev_20230712.tsv): row 1 has 3 options and a hint, row 2 points at row 0's
    image by its index, as MMBench does for a repeated image."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "source",
              "split"]
    rest = ["l2", "s", "dev"]
    rows = [[0, "What is shown?", "nan", "a cat", "a dog", "a bird", "a fish", "B", "scene", png_base64("red"), *rest],
            [1, "Which colour is it?", "Look closely.", "red", "green", "blue", "", "A", "color", png_base64("green"),
             *rest],
            [2, "Is it bright?", "", "yes", "no", "nan", "nan", "A", "color", "0", *rest]]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---- refusals without a model ---------------------------------------------------------------------------------


def test_question_files_in_other_formats_are_refused(tmp_path, capsys):
    sqa = tmp_path / "llava_test_CQM-A.json"
    sqa.write_text(json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "?"}]}]))
    pope = jsonl(tmp_path / "pope.jsonl", [{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?" + SHORT}])
    tsv = write_mmbench(tmp_path / "mmbench.tsv")
    answers = jsonl(tmp_path / "answers.jsonl", [])
    base = ["--score_only", f"--answers={answers}"]
    refused(base + ["--benchmark=pope", f"--questions={sqa}"], capsys, "not a pope question file", "one JSON list")
    refused(base + ["--benchmark=pope", f"--questions={pope}"], capsys, "line 1 has no category",
            "llava_pope_test.jsonl")
    refused(base + ["--benchmark=gqa", f"--questions={tsv}"], capsys, "not a gqa question file", "line 1 is not JSON")
    refused(base + ["--benchmark=sqa", f"--questions={pope}"], capsys, "not a sqa question file")
    refused(base + ["--benchmark=mmbench", f"--questions={pope}"], capsys, "not a mmbench question file", "header")
    refused(base + ["--benchmark=mme", f"--questions={pope}"], capsys, "category/image")
    refused(base + ["--benchmark=nope", f"--questions={pope}"], capsys, "--benchmark must be one of")
    refused(base + ["--benchmark=gqa", f"--questions={tmp_path / 'missing.jsonl'}"], capsys, "does not exist")


def test_answer_files_of_another_benchmark_are_refused(tmp_path, capsys):
    questions = jsonl(tmp_path / "gqa.jsonl", [{"question_id": str(k), "image": "a.jpg", "text": "?"}
                                               for k in range(3)])
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({str(k): {"answer": "yes"} for k in range(3)}))
    base = ["--benchmark=gqa", f"--questions={questions}", "--score_only", f"--annotations={truth}"]
    tagged = jsonl(tmp_path / "pope_answers.jsonl", answer_rows({"0": "yes"}, benchmark="pope"))
    refused(base + [f"--answers={tagged}"], capsys, "holds pope answers, not gqa ones")
    other = jsonl(tmp_path / "other.jsonl", answer_rows({"0": "yes", "20968379": "no"}))
    refused(base + [f"--answers={other}"], capsys, "answers question '20968379'", "another benchmark")
    questions_file = tmp_path / "not_answers.jsonl"
    questions_file.write_text("question_id\ttext\n")
    refused(base + [f"--answers={questions_file}"], capsys, "not an answer file in LLaVA's format")
    good = jsonl(tmp_path / "good.jsonl", answer_rows({"0": "yes"}))
    refused(base[:-1] + [f"--answers={good}"], capsys, "--score_only needs --annotations")


# ---- end to end: the easy-vqa miniature and a tiny checkpoint ---------------------------------------------------

SHAPES = [("circle", "red"), ("rectangle", "blue"), ("triangle", "green"), ("circle", "yellow"), ("rectangle", "red"),
          ("triangle", "teal")]


def draw(shape, colour):
    image = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(image)
    if shape == "circle":
        d.ellipse((12, 12, 52, 52), fill=colour)
    elif shape == "rectangle":
        d.rectangle((10, 18, 54, 46), fill=colour)
    else:
        d.polygon([(32, 8), (56, 56), (8, 56)], fill=colour)
    return image


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """easy-vqa-shaped test questions on drawn images, the benchmark files prepare.py writes from them, and a tiny
    checkpoint trained on the same records."""
    import train_mm
    root = tmp_path_factory.mktemp("mini")
    questions, answers, images = [], [], []
    for k, (shape, colour) in enumerate(SHAPES):
        (root / "images" / "test").mkdir(parents=True, exist_ok=True)
        draw(shape, colour).save(root / "images" / "test" / f"{k}.png")
        for q, a in (("what shape is in the image?", shape), ("what color is the shape?", colour),
                     (f"is there a {shape} in the image?", "yes")):
            questions.append(q), answers.append(a), images.append(k)
    prepare = load_prepare()
    for relative, text in prepare.benchmark_files(questions, answers, images).items():
        (root / "eval" / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / "eval" / relative).write_text(text)
    (root / "train.json").write_text(json.dumps(prepare.split_records("test", questions, answers, images)))
    train_mm.main(["--preset=tiny", "--lora_dropout=0", "--workers=0", f"--data={root / 'train.json'}",
                   f"--image_folder={root / 'images'}", f"--out_dir={root / 'run'}", "--max_iters=1", "--samples=0"])
    return root


def files(mini, benchmark):
    e = mini / "eval"
    return {"pope": (e / "pope/llava_pope_test.jsonl", e / "pope/coco"),
            "gqa": (e / "gqa/llava_gqa_testdev_balanced.jsonl", e / "gqa/testdev_balanced_questions.json"),
            "sqa": (e / "scienceqa/llava_test_CQM-A.json", e / "scienceqa/problems.json"),
            "mme": (e / "MME/llava_mme.jsonl", e / "MME/MME_Benchmark_release_version")}[benchmark]


def eval_args(mini, benchmark, out, *extra):
    questions, truth = files(mini, benchmark)
    return [f"--benchmark={benchmark}", f"--mm={mini / 'run'}", f"--questions={questions}", f"--annotations={truth}",
            f"--image_folder={mini / 'images'}", f"--out_dir={out}", "--max_new_tokens=4", "--workers=0", *extra]


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_miniature_files(mini):
    e = mini / "eval"
    pope, labels = read(e / "pope/llava_pope_test.jsonl"), read(e / "pope/coco/coco_pope_shape.json")
    shape_questions = [q for q in pope if q["category"] == "shape"]
    assert len(shape_questions) == len(labels) == 2 * len(SHAPES) and len(pope) == 4 * len(SHAPES)
    assert shape_questions[0]["text"].startswith("Is there a ") and shape_questions[0]["text"].endswith(SHORT)
    assert all(q["text"].startswith(lab["text"]) and q["image"] == lab["image"]
               for q, lab in zip(shape_questions, labels))
    assert {(lab["image"], lab["label"]) for lab in labels} == {(f"test/{k}.png", y) for k in range(6)
                                                                for y in ("yes", "no")}
    yes = [lab for lab in labels if lab["label"] == "yes"]
    assert all(SHAPES[int(lab["image"][5:-4])][0] in lab["text"] for lab in yes)
    problems = json.loads((e / "scienceqa/problems.json").read_text())
    record = json.loads((e / "scienceqa/llava_test_CQM-A.json").read_text())[0]
    assert record["conversations"][0]["value"].startswith("<image>\nWhat shape is in the image?\nA. ")
    assert problems[record["id"]]["choices"][problems[record["id"]]["answer"]] == "circle"
    mme = (e / "MME/MME_Benchmark_release_version/existence/0.txt").read_text().splitlines()
    assert mme[0] == "Is there a circle in the image? Please answer yes or no.\tYes" and mme[1].endswith("\tNo")
    truth = json.loads((e / "gqa/testdev_balanced_questions.json").read_text())
    assert truth["0"]["answer"] == "circle" and truth["2"]["types"]["structural"] == "verify"


@pytest.mark.parametrize("benchmark", ["pope", "gqa", "sqa", "mme"])
def test_miniature_end_to_end_and_batches_agree(mini, tmp_path, capsys, benchmark):
    code, out, err = run(eval_args(mini, benchmark, tmp_path / "b4", "--batch_size=4"), capsys)
    assert code == 0, err
    answers = read(tmp_path / "b4" / "answers.jsonl")
    questions, _ = files(mini, benchmark)
    records = json.loads(questions.read_text()) if benchmark == "sqa" else read(questions)
    ids = [q["id"] if benchmark == "sqa" else q["question_id"] for q in records]
    assert [a["question_id"] for a in answers] == ids  # every question, in question order
    assert set(answers[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert answers[0]["model_id"] == str(mini / "run") and answers[0]["metadata"]["benchmark"] == benchmark
    if benchmark == "sqa":
        assert answers[0]["prompt"].startswith("<image>\nWhat shape") and answers[0]["prompt"].endswith(B.LETTER)
    scores = json.loads((tmp_path / "b4" / "scores.json").read_text())
    assert scores["questions"] == len(ids) and scores["missing"] == 0
    assert f"{benchmark} on " in out and "| **" in out and "questions/s (batch 4, 1 process)" in out
    code, _, err = run(eval_args(mini, benchmark, tmp_path / "b1", "--batch_size=1"), capsys)
    assert code == 0, err
    assert [a["text"] for a in read(tmp_path / "b1" / "answers.jsonl")] == [a["text"] for a in answers]
    code, _, err = run(eval_args(mini, benchmark, tmp_path / "b4", "--score_only"), capsys)
    assert code == 0, err
    assert {k: v for k, v in json.loads((tmp_path / "b4" / "scores.json").read_text()).items()} == scores


def test_pope_and_mme_score_the_same_questions_alike(mini, tmp_path, capsys):
    """The miniature asks POPE's and MME's yes/no pairs alike: with the same yes/no answers, POPE's accuracy per
    category is MME's acc."""
    pope_q, pope_truth = files(mini, "pope")
    mme_q, mme_truth = files(mini, "mme")
    texts = [("yes", "no", "no")[k % 3] for k in range(len(read(pope_q)))]
    for benchmark, questions, truth in (("pope", pope_q, pope_truth), ("mme", mme_q, mme_truth)):
        answers = [{"question_id": q["question_id"], "prompt": q["text"], "text": t}
                   for q, t in zip(read(questions), texts)]
        score_only(tmp_path / benchmark, capsys, benchmark, questions, answers, truth)
    pope, mme = (json.loads((tmp_path / b / "answers" / "scores.json").read_text()) for b in ("pope", "mme"))
    assert 100 * pope["categories"]["shape"]["accuracy"] == pytest.approx(mme["categories"]["existence"]["acc"])
    assert 100 * pope["categories"]["colour"]["accuracy"] == pytest.approx(mme["categories"]["color"]["acc"])
    assert 0 < mme["categories"]["color"]["acc"] < 100


def test_resume_answers_only_what_is_missing(mini, tmp_path, capsys):
    out = tmp_path / "pope"
    code, printed, err = run(eval_args(mini, "pope", out, "--limit=5", "--batch_size=2"), capsys)
    assert code == 0, err
    first = read(out / "answers.jsonl")
    assert len(first) == 5 and json.loads((out / "scores.json").read_text())["questions"] == 5
    # as a killed run leaves it: two answers in a rank's part file, its last line cut short, no answers.jsonl
    lines = (out / "answers.jsonl").read_text().splitlines()
    (out / "answers.part1.jsonl").write_text(lines[3] + "\n" + lines[4] + "\n" + lines[0][:40])
    (out / "answers.jsonl").write_text("\n".join(lines[:3]) + "\n")
    code, printed, err = run(eval_args(mini, "pope", out, "--batch_size=3"), capsys)
    assert code == 0, err
    assert "5 answered before, 19 to answer" in printed
    again = read(out / "answers.jsonl")
    assert [a["question_id"] for a in again] == list(range(24)) and not list(out.glob("answers.part*"))
    assert [a["answer_id"] for a in again[:5]] == [a["answer_id"] for a in first]  # kept, not answered again
    code, printed, err = run(eval_args(mini, "pope", out), capsys)
    assert code == 0 and "24 answered before, 0 to answer" in printed
    # answers of another checkpoint are not mixed in
    other = tmp_path / "other"
    shutil.copytree(mini / "run" / "instruct" / "ckpt", other)
    refused(eval_args(mini, "pope", out)[:1] + [f"--mm={other}"] + eval_args(mini, "pope", out)[2:], capsys,
            "already holds answers of", "another --out_dir")


def test_two_torchrun_ranks_match_one_process(mini, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "eval_mm.py"),
                           *eval_args(mini, "mme", tmp_path / "two", "--batch_size=1", "--device=cpu")],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stdout and "(batch 1, 2 processes)" in done.stdout
    one = subprocess.run([sys.executable, str(REPO / "eval_mm.py"),
                          *eval_args(mini, "mme", tmp_path / "one", "--batch_size=1")],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two, single = read(tmp_path / "two" / "answers.jsonl"), read(tmp_path / "one" / "answers.jsonl")
    def rows(answers):
        return [(a["question_id"], a["prompt"], a["text"]) for a in answers]
    assert rows(two) == rows(single)
    assert json.loads((tmp_path / "two" / "scores.json").read_text())["perception"] == \
        json.loads((tmp_path / "one" / "scores.json").read_text())["perception"]


def test_mmbench_base64_end_to_end(mini, tmp_path, capsys):
    tsv = write_mmbench(tmp_path / "mmbench_dev_20230712.tsv")
    code, out, err = run(["--benchmark=mmbench", f"--mm={mini / 'run'}", f"--questions={tsv}",
                          f"--out_dir={tmp_path / 'mb'}", "--max_new_tokens=3", "--batch_size=2"], capsys)
    assert code == 0, err
    answers = read(tmp_path / "mb" / "answers.jsonl")
    assert [a["question_id"] for a in answers] == [0, 1, 2]
    assert answers[1]["prompt"] == "Look closely.\nWhich colour is it?\nA. red\nB. green\nC. blue"
    assert answers[1]["options"] == ["red", "green", "blue"] and answers[1]["option_char"] == ["A", "B", "C"]
    assert answers[0]["round_id"] == 0 and answers[2]["options"] == ["yes", "no"]
    with open(tmp_path / "mb" / "submission.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["prediction"] for r in rows] == [a["text"] for a in answers] and "image" not in rows[0]


def test_bad_images_are_named_and_skipped_on_request(mini, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(mini / "images", images)
    (images / "test" / "1.png").unlink()
    (images / "test" / "2.png").write_bytes(b"not a png at all")
    args = eval_args(mini, "gqa", tmp_path / "out") + [f"--image_folder={images}", "--batch_size=4"]
    refused(args, capsys, "question 3:", "1.png", "--skip_bad")
    code, out, err = run(args + ["--skip_bad"], capsys)
    assert code == 0, err
    assert "skipped question 3: cannot use image" in out and "1.png" in out and "2.png" in out
    answered = {a["question_id"] for a in read(tmp_path / "out" / "answers.jsonl")}
    assert answered == {"0", "1", "2", "9", "10", "11", "12", "13", "14", "15", "16", "17"}
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["missing"] == 6


def test_checkpoints_without_a_vision_tower_are_refused(mini, tmp_path, capsys):
    blind = tmp_path / "blind"
    shutil.copytree(mini / "run" / "instruct" / "ckpt", blind)
    shutil.rmtree(blind / "vision")
    args = eval_args(mini, "pope", tmp_path / "out")
    def using(checkpoint):
        return [a if not a.startswith("--mm=") else f"--mm={checkpoint}" for a in args]
    refused(using(blind), capsys, "has no vision tower")
    lm_only = tmp_path / "lm"
    shutil.copytree(mini / "run" / "align" / "random_tiny", lm_only)
    refused(using(lm_only), capsys, "is not a multimodal checkpoint")
    done = subprocess.run([sys.executable, str(REPO / "eval_mm.py"), *using(blind)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "has no vision tower" in done.stderr


def test_bench_eval_prints_its_table(mini):
    questions, _ = files(mini, "pope")
    done = subprocess.run([sys.executable, str(REPO / "bench/bench_eval.py"), f"--mm={mini / 'run'}",
                           f"--questions={questions}", f"--image_folder={mini / 'images'}", "--limit=6",
                           "--batch_sizes=1,3"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "| batch | questions | seconds | questions/s | speed-up | answers as at batch 1 |" in done.stdout
    assert "| 1 | 6 |" in done.stdout and "| 3 | 6 |" in done.stdout and "| 1.00x | 100.0% |" in done.stdout


# ---- lmms-eval through serve.py's OpenAI-compatible API ----------------------------------------------------------


def test_lmms_eval_openai_compatible_request_reaches_the_model():
    """lmms-eval's `openai_compatible` model posts, through AsyncOpenAI, one user message of a text part then an
    image_url part with a PNG data: URI, model, max_tokens and temperature 0; its chat variant puts the image first."""
    openai = pytest.importorskip("openai")
    from serve import ServeConfig, create_app
    from test_serve_api import ScriptedChat, live_server

    chat = ScriptedChat("Yes", whisper=None)
    question = "Is there a circle in the image?" + SHORT
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_base64('red', (64, 64))}"}}
    with live_server(create_app(chat, ServeConfig(max_queue=4))) as url:
        client = openai.AsyncOpenAI(api_key="EMPTY", base_url=f"{url}/v1")

        async def ask(content):
            payload = {"messages": [{"role": "user", "content": content}], "model": "omniphi", "max_tokens": 16,
                       "temperature": 0}
            return await client.chat.completions.create(**payload)

        async def both():
            return await asyncio.gather(ask([{"type": "text", "text": question}, image]),
                                        ask([image, {"type": "text", "text": question}]))
        replies = asyncio.run(both())
    assert [r.choices[0].message.content for r in replies] == ["Yes", "Yes"]
    contents = sorted(call["messages"][-1]["content"] for call in chat.calls)
    assert contents == sorted([question + "\n<image>", "<image>\n" + question])  # the second is eval_mm.py's prompt
    assert all(call["images"][0].size == (64, 64) and call["options"].get("temperature") == 0 for call in chat.calls)
