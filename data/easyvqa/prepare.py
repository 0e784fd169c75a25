"""
Turn the easy-vqa package (PyPI `easy-vqa`: 4,000 train / 1,000 test 64x64 images of one coloured shape, 38,575 /
9,673 questions, 13 answers) into LLaVA JSON for the offline multimodal demo.

    python data/easyvqa/prepare.py [--out_dir=data/easyvqa/prepared]

Writes into out_dir:
    images/train/N.png, images/test/N.png   copies of the package's images (the image folder of the JSONs)
    train.json, test.json                   one single-turn record per question, with "answer_type" (yes/no, shape,
                                            colour) for the per-type accuracy of train_mm.py --eval
    train_demo.json                         train.json with every colour yes/no question whose colour is in the
                                            picture three times (ids -r1, -r2 for the copies): the demo's training
                                            set. Only 1 in 8 of those questions names the picture's colour, and the
                                            comparison is learnt colour by colour from just these (README)
    captions.json                           one caption record per train image ("A red circle.") for the align
                                            stage; shape and colour are read off that image's questions and answers
    eval/                                   the test split in the formats of LLaVA's evaluation, for eval_mm.py:
        pope/llava_pope_test.jsonl, pope/coco/coco_pope_{shape,colour}.json    "Is there a circle in the image?"
        gqa/llava_gqa_testdev_balanced.jsonl, gqa/testdev_balanced_questions.json   every question, short answers
        scienceqa/llava_test_CQM-A.json, scienceqa/problems.json, pid_splits.json  shape and colour as lettered options
        MME/llava_mme.jsonl, MME/MME_Benchmark_release_version/{existence,color}/N.txt  a yes and a no per image
    meta.json                               counts and answers; written last, so its presence means "done"
"""

import json
import os
import random
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import fail, parse_config  # noqa: E402

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
NEGATIONS = {"not", "no"}
CAPTION_PROMPT = "Describe the image briefly."
VERSION = 3
COLOUR_MATCH_REPEATS = 3
SHORT = "Answer the question using a single word or phrase."
DEFAULT_OUT = Path(__file__).resolve().parent / "prepared"


def answer_type(answer):
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    if answer in COLOURS:
        return "colour"
    raise ValueError(f"easy-vqa answer {answer!r} is neither yes/no, a shape nor a colour")


def named_is_present(words, answer):
    """Whether what a yes/no question names is in the picture: its answer, flipped by a negation."""
    return (answer == "yes") != bool(words & NEGATIONS)


def image_facts(questions, answers, image_ids):
    """{image id: (shape or None, colour or None)} inferred from the questions: direct answers, the shape or colour a
    question names, yes/no answers (a negated question flips them), and elimination of what an image does not have."""
    found = {"shape": {}, "colour": {}}
    absent = {}
    for question, answer, image in zip(questions, answers, image_ids):
        words = set(re.findall(r"[a-z]+", question))
        named = {"shape": words & set(SHAPES), "colour": words & set(COLOURS)}
        kind = answer_type(answer)
        if kind == "yes/no":
            present = named_is_present(words, answer)
            for attribute, names in named.items():
                for name in names:
                    if present:
                        found[attribute][image] = name
                    else:
                        absent.setdefault(image, set()).add(name)
        else:
            found[kind][image] = answer
            other = "colour" if kind == "shape" else "shape"
            if named[other]:  # "what is the red shape?" / "what color is the circle?"
                found[other][image] = next(iter(named[other]))
    facts = {}
    for image in sorted(set(image_ids)):
        pair = []
        for attribute, names in (("shape", SHAPES), ("colour", COLOURS)):
            value = found[attribute].get(image)
            left = [n for n in names if n not in absent.get(image, set())]
            pair.append(value if value is not None else (left[0] if len(left) == 1 else None))
        facts[image] = tuple(pair)
    return facts


def caption(shape, colour):
    return " ".join(["A"] + ([colour] if colour else []) + [shape or "shape"]) + "."


def split_records(split, questions, answers, image_ids):
    records = []
    seen = Counter()
    for question, answer, image in zip(questions, answers, image_ids):
        k = seen[image]
        seen[image] += 1
        records.append({"id": f"{split}-{image}-{k}", "image": f"{split}/{image}.png",
                        "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                          {"from": "gpt", "value": answer}],
                        "answer_type": answer_type(answer)})
    return records


def names_present_colour(record):
    """A colour yes/no question whose colour is the picture's ("is there a red shape?" of a red shape)."""
    words = set(re.findall(r"[a-z]+", record["conversations"][0]["value"]))
    return (record["answer_type"] == "yes/no" and bool(words & set(COLOURS))
            and named_is_present(words, record["conversations"][1]["value"]))


def demo_records(records, repeats=COLOUR_MATCH_REPEATS):
    out = []
    for r in records:
        out.append(r)
        if names_present_colour(r):
            out += [dict(r, id=f"{r['id']}-r{k}") for k in range(1, repeats)]
    return out


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def benchmark_files(questions, answers, image_ids, seed=0):
    """{path under eval/: text} of the test split as LLaVA-format benchmarks: POPE (a yes and a no question per image
    about its shape and about its colour, with label files), GQA (every question and its short answer), ScienceQA (the
    shape and the colour as lettered options) and MME (the same yes/no pairs, one ground-truth file per image)."""
    rng = random.Random(seed)
    facts = image_facts(questions, answers, image_ids)
    kinds = (("shape", "existence", SHAPES, "a {}"), ("colour", "color", COLOURS, "a {} shape"))
    pope, labels, mme, files, sqa, problems = [], {}, [], {}, [], {}
    for category, mme_category, names, say in kinds:
        labels[category] = []
        for image, fact in facts.items():
            truth = fact[0] if category == "shape" else fact[1]
            if truth is None:
                continue
            pair = [(truth, "yes"), (rng.choice([n for n in names if n != truth]), "no")]
            rng.shuffle(pair)
            for name, label in pair:
                asked, path = f"Is there {say.format(name)} in the image?", f"test/{image}.png"
                labels[category].append({"question_id": len(labels[category]) + 1, "image": path, "text": asked,
                                         "label": label})
                pope.append({"question_id": len(pope), "image": path, "text": f"{asked}\n{SHORT}",
                             "category": category})
                mme.append({"question_id": f"{mme_category}/{image}.png", "image": path, "text": f"{asked}\n{SHORT}"})
            files[f"MME/MME_Benchmark_release_version/{mme_category}/{image}.txt"] = "".join(
                f"Is there {say.format(name)} in the image? Please answer yes or no.\t{label.title()}\n"
                for name, label in sorted(pair, key=lambda p: p[1] == "no"))
            asked = "What shape is in the image?" if category == "shape" else "What color is the shape?"
            choices = list(names) if len(names) <= 4 else [truth] + rng.sample([n for n in names if n != truth], 3)
            rng.shuffle(choices)
            pid, answer = str(len(problems)), choices.index(truth)
            options = "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(choices))
            sqa.append({"id": pid, "image": f"test/{image}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{asked}\n{options}"}, {"from": "gpt", "value": "ABCD"[answer]}]})
            problems[pid] = {"question": asked, "choices": choices, "answer": answer, "hint": "", "image": "image.png",
                             "split": "test"}
    gqa, gqa_truth = [], {}
    for k, (question, answer, image) in enumerate(zip(questions, answers, image_ids)):
        gqa.append({"question_id": str(k), "image": f"test/{image}.png", "text": f"{question}\n{SHORT}"})
        gqa_truth[str(k)] = {"imageId": str(image), "question": question, "answer": answer, "types": {
            "structural": "verify" if answer in ("yes", "no") else "query", "detailed": answer_type(answer)}}
    files.update({"pope/llava_pope_test.jsonl": jsonl(pope), "MME/llava_mme.jsonl": jsonl(mme),
                  "gqa/llava_gqa_testdev_balanced.jsonl": jsonl(gqa),
                  "gqa/testdev_balanced_questions.json": json.dumps(gqa_truth),
                  "scienceqa/llava_test_CQM-A.json": json.dumps(sqa, indent=1),
                  "scienceqa/problems.json": json.dumps(problems),
                  "scienceqa/pid_splits.json": json.dumps({"test": list(problems)}),
                  **{f"pope/coco/coco_pope_{c}.json": jsonl(rows) for c, rows in labels.items()}})
    return files


def write_text(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=None))


def is_prepared(out_dir=DEFAULT_OUT):
    meta = Path(out_dir) / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("version") == VERSION


def prepare(out_dir=DEFAULT_OUT, log=print):
    """Build everything in out_dir (skipped when already there); returns out_dir as a Path."""
    import easy_vqa

    out = Path(out_dir)
    if is_prepared(out):
        return out
    log(f"preparing easy-vqa into {out}")
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
              "test": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())}
    meta = {"version": VERSION, "source": "PyPI easy-vqa", "answers": easy_vqa.get_answers()}
    for split, ((questions, answers, image_ids), paths) in splits.items():
        missing = sorted(set(image_ids) - set(paths))
        if missing:
            raise FileNotFoundError(f"easy-vqa {split} questions name images without files, e.g. {missing[0]}")
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for image, source in paths.items():
            target = folder / f"{image}.png"
            if not target.is_file() or target.stat().st_size != os.path.getsize(source):
                shutil.copyfile(source, folder / f"{image}.png.tmp")
                os.replace(folder / f"{image}.png.tmp", target)
        records = split_records(split, questions, answers, image_ids)
        write_json(out / f"{split}.json", records)
        meta[f"{split}_questions"] = len(records)
        meta[f"{split}_images"] = len(paths)
        meta[f"{split}_answer_types"] = dict(Counter(r["answer_type"] for r in records))
        if split == "test":
            files = benchmark_files(questions, answers, image_ids)
            for relative, text in files.items():
                (out / "eval" / relative).parent.mkdir(parents=True, exist_ok=True)
                write_text(out / "eval" / relative, text)
            meta["benchmarks"] = {"pope": len(files["pope/llava_pope_test.jsonl"].splitlines()),
                                  "gqa": len(files["gqa/llava_gqa_testdev_balanced.jsonl"].splitlines()),
                                  "sqa": len(json.loads(files["scienceqa/problems.json"])),
                                  "mme": len(files["MME/llava_mme.jsonl"].splitlines())}
        if split == "train":
            train_records = records
            facts = image_facts(questions, answers, image_ids)
            captions = [{"id": f"caption-{image}", "image": f"train/{image}.png",
                         "conversations": [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                                           {"from": "gpt", "value": caption(shape, colour)}]}
                        for image, (shape, colour) in facts.items() if shape or colour]
            write_json(out / "captions.json", captions)
            meta["captions"] = len(captions)
            meta["captions_complete"] = sum(1 for s, c in facts.values() if s and c)
    write_json(out / "train_demo.json", demo_records(train_records))  # second to last: train_mm.py waits for it
    write_json(out / "meta.json", meta)
    log(f"easy-vqa: {meta['train_questions']:,} train / {meta['test_questions']:,} test questions, "
        f"{meta['captions']:,} captions ({meta['captions_complete']:,} with shape and colour)")
    return out


@dataclass
class PrepareConfig:
    out_dir: str = str(DEFAULT_OUT)  # where the images and JSON files go


if __name__ == "__main__":
    try:
        prepare(parse_config(PrepareConfig, sys.argv[1:], doc=__doc__).out_dir)
    except (ValueError, FileNotFoundError) as err:
        fail("prepare.py", err)
