"""
The scorers of eval_mm.py and the answer normalisation they use, written from each benchmark's definition, plus the
converters that write what a benchmark's own server scores (VQAv2 on EvalAI, MMBench on OpenCompass, MM-Vet's
grader, SEED-Bench's leaderboard).

Every entry of BENCHMARKS takes (questions, answers, annotations, out_dir): the Questions of the question file, the
answer records by Question.key, the ground-truth path (or "" where none is needed) and the folder for submission
files; it returns (scores, markdown table). A missing answer is a wrong one: it stays in every denominator and is
counted as "missing".
"""

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


@dataclass
class Question:
    key: str              # unique in the question file: the question id, or id and text where ids repeat (MME)
    qid: object           # question_id as the file has it
    image: object         # image path under --image_folder, an MMBench row index, or None (text only)
    text: str             # the answer record's "prompt", as LLaVA writes it
    content: str          # the user message the model reads ("<image>\n" first when there is an image)
    category: str = ""
    raw: dict = field(default_factory=dict)    # the question's record in the file
    extra: dict = field(default_factory=dict)  # more fields for its answer record (MMBench's options)


def read_jsonl(path):
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {n} is not JSON") from None
    return rows


def read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err}); expected {what}") from None


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def pct(x):
    return f"{100 * x:.2f}"


def write(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return str(path)


def answered(questions, answers):
    n = sum(q.key in answers for q in questions)
    return {"questions": len(questions), "answered": n, "missing": len(questions) - n}


# ---- answer normalisation ------------------------------------------------------------------------------------

NUMBERS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5", six="6", seven="7", eight="8",
               nine="9", ten="10")
ARTICLES = {"a", "an", "the"}
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
# the official VQA table maps each contraction written with one apostrophe left out to its proper spelling
CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't
must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
CONTRACTIONS = {w[:i] + w[i + 1:]: w for w in CONTRACTED for i, c in enumerate(w) if c == "'"}
CONTRACTIONS["somebody'd"] = "somebodyd"  # the one entry of the official table that runs the other way


def vqa_normalize(answer):
    """The VQA / TextVQA answer normalisation (EvalAI's): lower case, punctuation, number words to digits, no
    articles, contractions spelt out."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    glued = re.search(r"(?<=\d),+(?=\d)", text) is not None
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if p + " " in text or " " + p in text or glued else " ")
    out = re.sub(r"\.(?!\d)", "", out)
    words = [NUMBERS.get(w, w) for w in out.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction, humans):
    """VQA accuracy: min(humans who gave the answer / 3, 1), averaged over the subsets that leave one human out."""
    humans = [vqa_normalize(h) for h in humans]
    p = vqa_normalize(prediction)
    n = humans.count(p)
    return sum(min(1.0, (n - (h == p)) / 3) for h in humans) / len(humans) if humans else 0.0


def pope_says_yes(text):
    """LLaVA's POPE rule: 'no' when the first sentence, commas dropped, has the word No, no or not; else 'yes'."""
    return not {"No", "no", "not"} & set(text.split(".")[0].replace(",", "").split(" "))


def gqa_normalize(text):
    return text.rstrip(".").lower()


def sqa_letter(text, letters="ABCDE"):
    """LLaVA's ScienceQA parse: "B", "B. ..." or exactly one "The answer is B." ; else FAILED."""
    if text in list(letters):
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else "FAILED"


def mme_label(text):
    """MME's parse: yes / no, else 'yes' or 'no' within the first four characters, else other."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


# ---- scorers --------------------------------------------------------------------------------------------------


METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def score_pope(questions, answers, annotations, out_dir):
    """Per category (a coco_pope_<category>.json label file each) accuracy, precision, recall, F1 and yes-ratio.
    Labels pair with the category's questions in file order, as LLaVA pairs them."""
    folder = Path(annotations)
    files = {f.name[len("coco_pope_"):-len(".json")]: f for f in sorted(folder.glob("coco_pope_*.json"))}
    if not files:
        raise ValueError(f"{folder} holds no coco_pope_<category>.json label files (POPE's output/coco folder)")
    by_category = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q)
    unknown = sorted(set(by_category) - set(files))
    if unknown:
        raise ValueError(f"the questions' categories {unknown} have no label file coco_pope_<category>.json in "
                         f"{folder}")
    scores, rows = {}, []
    for category in sorted(by_category):
        qs, labels = by_category[category], read_jsonl(files[category])
        if len(qs) > len(labels):
            raise ValueError(f"{files[category]} has {len(labels)} labels for {len(qs)} {category} questions")
        c = Counter()
        for n, (q, label) in enumerate(zip(qs, labels), 1):
            if label.get("label") not in ("yes", "no"):
                raise ValueError(f"{files[category]} line {n} has no yes/no label: not a POPE label file")
            if label.get("image") and q.image and Path(label["image"]).name != Path(str(q.image)).name:
                raise ValueError(f"{files[category]} line {n} is about {label['image']} but {category} question "
                                 f"{q.qid} is about {q.image}: the labels are not those of this question file")
            truth, a = label["label"] == "yes", answers.get(q.key)
            if a is None:
                c["missing_yes" if truth else "missing_no"] += 1
                continue
            yes = pope_says_yes(a["text"])
            c[("T" if yes == truth else "F") + ("P" if yes else "N")] += 1
        n = len(qs)
        precision = c["TP"] / max(c["TP"] + c["FP"], 1)
        recall = c["TP"] / max(c["TP"] + c["FN"] + c["missing_yes"], 1)
        s = {"questions": n, "missing": c["missing_yes"] + c["missing_no"], "accuracy": (c["TP"] + c["TN"]) / n,
             "precision": precision, "recall": recall,
             "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
             "yes_ratio": (c["TP"] + c["FP"]) / max(n - c["missing_yes"] - c["missing_no"], 1),
             **{k: c[k] for k in ("TP", "FP", "TN", "FN")}}
        scores[category] = s
        rows.append([category, n, s["missing"]] + [pct(s[k]) for k in METRICS])
    mean = {k: sum(s[k] for s in scores.values()) / len(scores) for k in METRICS}
    rows.append(["**mean**", sum(len(v) for v in by_category.values()), sum(s["missing"] for s in scores.values())]
                + [pct(mean[k]) for k in METRICS])
    table = markdown(["category", "questions", "missing", "accuracy", "precision", "recall", "F1", "yes %"], rows)
    return {**answered(questions, answers), "categories": scores, "mean": mean}, table


def score_gqa(questions, answers, annotations, out_dir):
    """Exact match after LLaVA's normalisation (trailing periods off, lower case) against GQA's answers, per
    structural type. Also writes submission.json, the predictions file of GQA's own eval.py."""
    truth = read_json(annotations, "GQA's testdev_balanced_questions.json ({question id: {answer, ...}})")
    if not isinstance(truth, dict):
        raise ValueError(f"{annotations} is not GQA's questions file ({{question id: {{answer, ...}}}})")
    n, correct = Counter(), Counter()
    for q in questions:
        t = truth.get(str(q.qid))
        if not isinstance(t, dict) or "answer" not in t:
            raise ValueError(f"question {q.qid} has no answer in {annotations}: ground truth of another split?")
        a = answers.get(q.key)
        ok = a is not None and gqa_normalize(a["text"]) == t["answer"]
        for kind in (t.get("types", {}).get("structural", "other"), "all"):
            n[kind] += 1
            correct[kind] += ok
    predictions = [{"questionId": str(q.qid), "prediction": gqa_normalize(answers[q.key]["text"]) if q.key in answers
                    else ""} for q in questions]
    file = write(Path(out_dir) / "submission.json", json.dumps(predictions))
    accuracy = {k: correct[k] / n[k] for k in n}
    rows = [[k, n[k], pct(accuracy[k])] for k in sorted(n) if k != "all"]
    rows.append(["**all**", n["all"], pct(accuracy["all"])])
    return ({**answered(questions, answers), "accuracy": accuracy["all"], "by_type": accuracy, "submission": file},
            markdown(["structural type", "questions", "accuracy"], rows))


def textvqa_question(text):
    """The question in a TextVQA prompt (LLaVA's prompts put it first, or after a 'Reference OCR token:' line)."""
    if text.startswith("OCR tokens: "):
        found = re.search(r"Question: (.*?) Short answer:", text, re.S)
        return (found.group(1) if found else text).lower()
    lines = text.split("\n")
    return (lines[1] if text.startswith("Reference OCR token:") and len(lines) > 1 else lines[0]).lower()


def score_textvqa(questions, answers, annotations, out_dir):
    """VQA accuracy against the ten human answers of TextVQA_0.5.1_val.json (matched by image and question)."""
    data = read_json(annotations, "TextVQA_0.5.1_val.json ({data: [...]})")
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{annotations} is not TextVQA's annotation file ({{'data': [...]}})")
    by_image = {(str(r.get("image_id")), str(r.get("question", "")).lower()): r for r in rows}
    by_id = {str(r.get("question_id")): r for r in rows}
    total = 0.0
    for q in questions:
        image = Path(str(q.image)).stem if q.image else str(q.qid)
        r = by_image.get((image, textvqa_question(q.text))) or by_id.get(str(q.qid))
        if r is None or not r.get("answers"):
            raise ValueError(f"question {q.qid} ({textvqa_question(q.text)!r}) is not in {annotations}")
        a = answers.get(q.key)
        total += vqa_accuracy(a["text"], r["answers"]) if a is not None else 0.0
    s = {**answered(questions, answers), "accuracy": total / max(len(questions), 1)}
    return s, markdown(["", "questions", "missing", "VQA accuracy"],
                       [["TextVQA", s["questions"], s["missing"], pct(s["accuracy"])]])


def score_sqa(questions, answers, annotations, out_dir):
    """ScienceQA: the option letter parsed as LLaVA does, against problems.json; IMG (questions with an image),
    TXT and all."""
    path = Path(annotations)
    path = path / "problems.json" if path.is_dir() else path
    problems = read_json(path, "ScienceQA's problems.json")
    if not isinstance(problems, dict):
        raise ValueError(f"{path} is not ScienceQA's problems.json ({{problem id: {{choices, answer, ...}}}})")
    n, correct, failed = Counter(), Counter(), 0
    for q in questions:
        p = problems.get(str(q.qid))
        if not isinstance(p, dict) or "answer" not in p or "choices" not in p:
            raise ValueError(f"question {q.qid} is not a problem of {path}: ground truth of another benchmark?")
        letter = sqa_letter(answers[q.key]["text"]) if q.key in answers else "FAILED"
        failed += letter == "FAILED"
        ok = letter in "ABCDE"[:len(p["choices"])] and "ABCDE".index(letter) == p["answer"]
        for subset in ("IMG" if q.image else "TXT", "all"):
            n[subset] += 1
            correct[subset] += ok
    accuracy = {k: correct[k] / n[k] for k in n}
    rows = [[k if k != "all" else "**all**", n[k], correct[k], pct(accuracy[k])] for k in ("IMG", "TXT", "all") if n[k]]
    return ({**answered(questions, answers), "img_accuracy": accuracy.get("IMG"), "accuracy": accuracy["all"],
             "by_subset": accuracy, "unparsed": failed}, markdown(["subset", "questions", "correct", "accuracy"], rows))


MME_TYPES = {"Perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                            "artwork", "OCR"],
             "Cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]}


def mme_truth(folder):
    """{(category, image stem, question): 'Yes' | 'No'} from MME_Benchmark_release_version: a folder per category
    holding (or holding questions_answers_YN/ with) one .txt per image of 'question<TAB>answer' lines."""
    truth = {}
    for category in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        qa = category / "questions_answers_YN" if (category / "questions_answers_YN").is_dir() else category
        for file in qa.glob("*.txt"):
            for line in file.read_text().splitlines():
                question, _, answer = line.strip().partition("\t")
                if answer:
                    truth[(category.name, file.stem, question)] = answer.strip()
    return truth


def score_mme(questions, answers, annotations, out_dir):
    """MME: per category acc (questions) and acc+ (images with both questions right), score = acc + acc+ in
    percent; the perception and cognition totals are the sums of their categories' scores."""
    if not Path(annotations).is_dir():
        raise ValueError(f"{annotations} is not a folder: MME's ground truth is MME_Benchmark_release_version/")
    truth = mme_truth(annotations)
    if not truth:
        raise ValueError(f"{annotations} holds no MME question files (<category>/*.txt of question<TAB>Yes/No lines)")
    images = {}
    for q in questions:
        category, stem = str(q.qid).split("/")[0], Path(str(q.qid)).stem
        asked = q.text.replace(SHORT, "").strip()
        candidates = [asked] if "Please answer yes or no." in asked else [
            asked + " Please answer yes or no.", asked + "  Please answer yes or no."]
        gt = next((truth[(category, stem, c)] for c in candidates if (category, stem, c) in truth), None)
        if gt is None:
            raise ValueError(f"question {q.qid} ({asked!r}) is not in the MME ground truth {annotations}")
        a = answers.get(q.key)
        ok = a is not None and mme_label(a["text"]) == gt.lower()
        images.setdefault(category, {}).setdefault(q.qid, []).append(ok)
    scores, rows = {}, []
    for category, per_image in sorted(images.items()):
        results = [ok for oks in per_image.values() for ok in oks]
        acc, acc_plus = sum(results) / len(results), sum(all(oks) for oks in per_image.values()) / len(per_image)
        scores[category] = {"images": len(per_image), "questions": len(results), "acc": 100 * acc,
                            "acc_plus": 100 * acc_plus, "score": 100 * (acc + acc_plus)}
        rows.append([category, len(per_image), len(results), f"{100 * acc:.2f}", f"{100 * acc_plus:.2f}",
                     f"{100 * (acc + acc_plus):.2f}"])
    totals = {kind: sum(scores[c]["score"] for c in names if c in scores) for kind, names in MME_TYPES.items()
              if any(c in scores for c in names)}
    rows += [[f"**{kind}**", "", "", "", "", f"**{total:.2f}**"] for kind, total in totals.items()]
    return ({**answered(questions, answers), "categories": scores, **{k.lower(): v for k, v in totals.items()}},
            markdown(["category", "images", "questions", "acc", "acc+", "score"], rows))


def score_seed(questions, answers, annotations, out_dir):
    """SEED-Bench: the answer must be the option letter exactly, per question type (and image / video). Also
    writes submission.jsonl for the leaderboard."""
    data = read_json(annotations, "SEED-Bench.json ({questions: [...], question_type: {...}})")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"{annotations} is not SEED-Bench.json ({{'questions': [...], 'question_type': {{...}}}})")
    names = {v: k for k, v in data.get("question_type", {}).items()}
    truth = {str(t.get("question_id")): t for t in data["questions"]}
    n, correct = Counter(), Counter()
    for q in questions:
        t = truth.get(str(q.qid))
        if t is None or "answer" not in t:
            raise ValueError(f"question {q.qid} is not in {annotations}: ground truth of another benchmark?")
        ok = q.key in answers and answers[q.key]["text"] == t["answer"]
        named = names.get(t.get("question_type_id"), str(t.get("question_type_id")))
        for kind in (named, t.get("data_type", "image"), "all"):
            n[kind] += 1
            correct[kind] += ok
    lines = [json.dumps({"question_id": q.qid, "prediction": answers[q.key]["text"] if q.key in answers else ""})
             for q in questions]
    file = write(Path(out_dir) / "submission.jsonl", "\n".join(lines) + "\n")
    accuracy = {k: correct[k] / n[k] for k in n}
    splits = [k for k in ("image", "video") if k in n]
    rows = [[k, n[k], pct(accuracy[k])] for k in sorted(set(n) - {"all", *splits})]
    rows += [[f"*{k}*", n[k], pct(accuracy[k])] for k in splits] + [["**all**", n["all"], pct(accuracy["all"])]]
    return ({**answered(questions, answers), "accuracy": accuracy["all"], "by_type": accuracy, "submission": file},
            markdown(["question type", "questions", "accuracy"], rows))


# ---- submission files ---------------------------------------------------------------------------------------


def submission_table(name, scores):
    return markdown(["", "questions", "answered", "file"],
                    [[name, scores["questions"], scores["answered"], scores["submission"]]])


def vqav2_submission(questions, answers, annotations, out_dir):
    """EvalAI's VQAv2 file: [{question_id, answer}] over every question of the test split (annotations: LLaVA's
    llava_vqav2_mscoco_test2015.jsonl; default the question file), answers normalised, missing ones empty."""
    ids = [r["question_id"] for r in read_jsonl(annotations)] if annotations else [q.qid for q in questions]
    texts = {str(a["question_id"]): a["text"] for a in answers.values()}
    rows = [{"question_id": i, "answer": vqa_normalize(texts[str(i)]) if str(i) in texts else ""} for i in ids]
    s = {"questions": len(rows), "answered": sum(str(i) in texts for i in ids),
         "submission": write(Path(out_dir) / "submission.json", json.dumps(rows))}
    return s, submission_table("VQAv2 (EvalAI)", s)


def mmvet_submission(questions, answers, annotations, out_dir):
    """MM-Vet's grader input: {"v1_<question id>": answer}."""
    rows = {f"v1_{q.qid}": answers[q.key]["text"] if q.key in answers else "" for q in questions}
    s = {**answered(questions, answers),
         "submission": write(Path(out_dir) / "submission.json", json.dumps(rows, indent=2))}
    return s, submission_table("MM-Vet", s)


def mmbench_submission(questions, answers, annotations, out_dir):
    """The MMBench TSV for OpenCompass: the question file's columns without the images, a prediction column after the
    options."""
    columns = [c for c in (questions[0].raw if questions else {}) if c != "image"]
    last_option = max((columns.index(c) for c in "ABCD" if c in columns), default=len(columns) - 1)
    columns.insert(last_option + 1, "prediction")
    path = Path(out_dir) / "submission.tsv"
    with open(f"{path}.tmp", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(columns)
        for q in questions:
            row = {**q.raw, "prediction": answers[q.key]["text"] if q.key in answers else ""}
            writer.writerow([row.get(c, "") for c in columns])
    Path(f"{path}.tmp").replace(path)
    s = {**answered(questions, answers), "submission": str(path)}
    return s, submission_table("MMBench (OpenCompass)", s)


# ---- the benchmarks --------------------------------------------------------------------------------------------

# format: jsonl (question_id, image, text [, category]), sqa (LLaVA JSON records), mmbench (TSV with base64 images).
# truth: what --annotations is (None: nothing needed; "optional": used when given).
BENCHMARKS = {
    "pope": dict(format="jsonl", keys=("question_id", "image", "text", "category"), score=score_pope, max_new_tokens=32,
                 example="llava_pope_test.jsonl",
                 truth="POPE's output/coco folder of coco_pope_<category>.json label files"),
    "gqa": dict(format="jsonl", keys=("question_id", "image", "text"), score=score_gqa, max_new_tokens=32,
                example="llava_gqa_testdev_balanced.jsonl", truth="GQA's testdev_balanced_questions.json"),
    "textvqa": dict(format="jsonl", keys=("question_id", "image", "text"), score=score_textvqa, max_new_tokens=32,
                    example="llava_textvqa_val_v051_ocr.jsonl", truth="TextVQA_0.5.1_val.json"),
    "sqa": dict(format="sqa", score=score_sqa, max_new_tokens=32, example="llava_test_CQM-A.json",
                truth="ScienceQA's problems.json (or the folder holding it)"),
    "mme": dict(format="jsonl", keys=("question_id", "image", "text"), score=score_mme, max_new_tokens=32,
                example="llava_mme.jsonl", truth="the MME_Benchmark_release_version folder"),
    "seed": dict(format="jsonl", keys=("question_id", "image", "text"), score=score_seed, max_new_tokens=32,
                 example="llava-seed-bench.jsonl", truth="SEED-Bench.json"),
    "vqav2": dict(format="jsonl", keys=("question_id", "image", "text"), score=vqav2_submission, max_new_tokens=32,
                  example="llava_vqav2_mscoco_test-dev2015.jsonl",
                  truth="optional: llava_vqav2_mscoco_test2015.jsonl, the whole test split the file must cover"),
    "mmbench": dict(format="mmbench", score=mmbench_submission, max_new_tokens=32, example="mmbench_dev_20230712.tsv",
                    truth=None),
    "mmvet": dict(format="jsonl", keys=("question_id", "image", "text"), score=mmvet_submission, max_new_tokens=512,
                  example="llava-mm-vet.jsonl", truth=None),
}
