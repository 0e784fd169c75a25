"""
Turn the easy-vqa package (PyPI `easy-vqa`: 4,000 train / 1,000 test 64x64 images of one coloured shape, 38,575 /
9,673 questions, 13 answers) into LLaVA JSON for the offline multimodal demo.

    python data/easyvqa/prepare.py [--out_dir=data/easyvqa/prepared]

Writes into out_dir:
    images/train/N.png, images/test/N.png   copies of the package's images (the image folder of the JSONs)
    train.json, test.json                   one single-turn record per question, with "answer_type" (yes/no, shape,
                                            colour) for the per-type accuracy of train_mm.py --eval
    captions.json                           one caption record per train image ("A red circle.") for the align
                                            stage; shape and colour are read off that image's questions and answers
    meta.json                               counts and answers; written last, so its presence means "done"
"""

import json
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
NEGATIONS = {"not", "no"}
CAPTION_PROMPT = "Describe the image briefly."
VERSION = 1
DEFAULT_OUT = Path(__file__).resolve().parent / "prepared"


def answer_type(answer):
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    if answer in COLOURS:
        return "colour"
    raise ValueError(f"easy-vqa answer {answer!r} is neither yes/no, a shape nor a colour")


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
            present = (answer == "yes") != bool(words & NEGATIONS)
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


def write_json(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=None))
    os.replace(tmp, path)


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
        if split == "train":
            facts = image_facts(questions, answers, image_ids)
            captions = [{"id": f"caption-{image}", "image": f"train/{image}.png",
                         "conversations": [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                                           {"from": "gpt", "value": caption(shape, colour)}]}
                        for image, (shape, colour) in facts.items() if shape or colour]
            write_json(out / "captions.json", captions)
            meta["captions"] = len(captions)
            meta["captions_complete"] = sum(1 for s, c in facts.values() if s and c)
    write_json(out / "meta.json", meta)
    log(f"easy-vqa: {meta['train_questions']:,} train / {meta['test_questions']:,} test questions, "
        f"{meta['captions']:,} captions ({meta['captions_complete']:,} with shape and colour)")
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    if any(not a.startswith("--out_dir=") for a in args):
        raise SystemExit("usage: python data/easyvqa/prepare.py [--out_dir=DIR]")
    prepare(args[-1].split("=", 1)[1] if args else DEFAULT_OUT)
