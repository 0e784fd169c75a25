"""
Check a LLaVA-format JSON (LLaVA-Instruct-150K, LLaVA-Pretrain-558K or your own) against its image folder before
any training starts, and report what it holds. train_mm.py runs the same check (it imports this file).

    python data/llava/prepare.py --data=llava_instruct_150k.json --image_folder=data/coco/train2017
    python data/llava/prepare.py --data=blip_laion_cc_sbu_558k.json --image_folder=data/llava/pretrain/images \
        --skip_bad --out=data/llava/prepared/pretrain_clean.json

A record is {"id", "image" (optional, relative to the image folder), "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}. A record is bad when its conversations are missing or
empty, do not alternate human/gpt starting with human and ending with gpt, have an empty turn, when an image
record has no '<image>' (exactly one, in the first human turn) or a text-only record has one, or when its image
file is missing or unreadable. Bad records are listed and the check stops, unless --skip_bad drops them.
"""

import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("human", "gpt")
SHOWN = 20  # bad records named in an error message


@dataclass
class PrepareConfig:
    data: str = ""  # the LLaVA JSON to check
    image_folder: str = ""  # image paths in the JSON are relative to this folder
    skip_bad: bool = False  # drop bad records (listed) instead of stopping
    check_images: str = "open"  # open: read each image's header | decode: decode every pixel (slow) | exists | none
    out: str = ""  # write the good records here (a cleaned JSON)
    workers: int = 16  # threads that check images


def load_records(path):
    """The list of records in a LLaVA JSON file; anything else is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA JSON {path} does not exist")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of records (LLaVA format), not a {type(records).__name__}")
    return records


def record_id(record, index):
    """The id used in messages: the record's own id, else its position."""
    if isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
        return str(record["id"])
    return f"#{index}"


def conversation_problem(record):
    """Why a record's structure is bad (ignoring its image file), or None."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object"
    if "conversations" not in record:
        return "has no 'conversations'"
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        return "has empty conversations" if isinstance(turns, list) else "has 'conversations' that is not a list"
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            return f"turn {k} is not an object with 'from' and a string 'value'"
        expected = ROLES[k % 2]
        if turn["from"] != expected:
            return (f"turn {k} is from {turn['from']!r} where {expected!r} was expected "
                    "(turns must alternate human, gpt, human, gpt, ...)")
        if not turn["value"].strip().replace(IMAGE_PLACEHOLDER, ""):
            return f"turn {k} ({turn['from']}) is empty"
    if len(turns) % 2:
        return f"ends with a human turn that has no gpt answer ({len(turns)} turns)"
    counts = [turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns]
    image = record.get("image")
    if image is None:
        if sum(counts):
            return f"has an {IMAGE_PLACEHOLDER} placeholder in its conversation but no 'image'"
        return None
    if not isinstance(image, str) or not image:
        return f"has an 'image' that is not a path string: {image!r} (one image per record is supported)"
    if counts[0] != 1 or sum(counts) != 1:
        where = "none" if not sum(counts) else f"{sum(counts)} ({counts[0]} in the first human turn)"
        return f"has an image but {where} {IMAGE_PLACEHOLDER} placeholders; it needs exactly one, in the first human turn"
    return None


def image_problem(path, check):
    """Why an image file cannot be used, or None. check: open | decode | exists | none."""
    if check == "none":
        return None
    if not path.is_file():
        return f"image {path} is missing"
    if check == "exists":
        return None
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            if check == "decode":
                image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"image {path} is unreadable ({type(err).__name__}: {err})"
    return None


def validate(records, image_folder, *, skip_bad=False, check_images="open", workers=16, source="the data"):
    """(good records, report). report: counts of records, image and text-only records, turns, images, and the bad
    records as (id, reason). Raises ValueError naming the bad records unless skip_bad."""
    if check_images not in ("open", "decode", "exists", "none"):
        raise ValueError(f"check_images must be open, decode, exists or none, not {check_images!r}")
    if not isinstance(records, list):
        raise ValueError(f"{source} must be a JSON list of records (LLaVA format), not a {type(records).__name__}")
    problems = {i: conversation_problem(r) for i, r in enumerate(records)}
    with_image = [i for i, r in enumerate(records) if problems[i] is None and r.get("image") is not None]
    if with_image and check_images != "none":
        if not image_folder:
            raise ValueError(f"{source} has {len(with_image)} records with images but no image folder was given "
                             "(--image_folder)")
        folder = Path(image_folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        paths = sorted({records[i]["image"] for i in with_image})
        with ThreadPoolExecutor(max(1, workers)) as pool:
            found = dict(zip(paths, pool.map(lambda p: image_problem(folder / p, check_images), paths)))
        for i in with_image:
            problems[i] = found[records[i]["image"]]
    bad = [(record_id(records[i], i), reason) for i, reason in problems.items() if reason is not None]
    good = [r for i, r in enumerate(records) if problems[i] is None]
    report = {"source": str(source), "records": len(records), "good": len(good), "bad": len(bad),
              "image_records": sum(1 for r in good if r.get("image") is not None),
              "text_only_records": sum(1 for r in good if r.get("image") is None),
              "images": len({r["image"] for r in good if r.get("image") is not None}),
              "turns": sum(len(r["conversations"]) for r in good),
              "bad_reasons": dict(Counter(reason_kind(reason) for _, reason in bad)),
              "bad_records": bad}
    if bad and not skip_bad:
        listing = "\n".join(f"  record {rid}: {reason}" for rid, reason in bad[:SHOWN])
        more = f"\n  ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise ValueError(f"{source}: {len(bad)} of {len(records)} records are bad:\n{listing}{more}\n"
                         "fix them, or pass --skip_bad to leave them out")
    if not good:
        raise ValueError(f"{source} has no usable records")
    return good, report


def reason_kind(reason):
    """A short category of a problem message, for the counts."""
    kinds = (("is missing", "missing image"), ("unreadable", "unreadable image"), ("no 'conversations'", "no conversations"),
             ("empty", "empty"), ("alternate", "not alternating"), ("no gpt answer", "no final answer"),
             ("placeholder", "misplaced <image>"))
    return next((kind for key, kind in kinds if key in reason), "malformed")


def format_report(report):
    lines = [f"{report['source']}: {report['records']:,} records, {report['good']:,} good, {report['bad']:,} bad",
             f"  {report['image_records']:,} with an image ({report['images']:,} distinct images), "
             f"{report['text_only_records']:,} text-only, {report['turns']:,} turns"]
    if report["bad"]:
        lines.append("  bad: " + ", ".join(f"{k} {v}" for k, v in sorted(report["bad_reasons"].items())))
        lines += [f"  skipped record {rid}: {reason}" for rid, reason in report["bad_records"][:SHOWN]]
        if report["bad"] > SHOWN:
            lines.append(f"  ... and {report['bad'] - SHOWN} more")
    return "\n".join(lines)


def parse_args(argv):
    types = {f.name: f.type for f in fields(PrepareConfig)}
    values = {}
    for arg in argv:
        key, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in types:
            raise SystemExit(f"unknown option {arg!r}; options: " + " ".join(f"--{k}" for k in types))
        if types[key] is bool:
            if sep and value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--{key} takes true or false, not {value!r}")
            values[key] = not sep or value.lower() in ("true", "1")
        elif types[key] is int:
            try:
                values[key] = int(value)
            except ValueError:
                raise SystemExit(f"--{key} must be an integer, not {value!r}") from None
        else:
            values[key] = value
    config = PrepareConfig(**values)
    if not config.data:
        raise SystemExit("--data=PATH (a LLaVA JSON) is required")
    return config


def main(argv):
    cfg = parse_args(argv)
    records = load_records(cfg.data)
    good, report = validate(records, cfg.image_folder, skip_bad=cfg.skip_bad, check_images=cfg.check_images,
                            workers=cfg.workers, source=cfg.data)
    print(format_report(report))
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(good))
        os.replace(tmp, out)
        print(f"wrote {len(good):,} good records to {out}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
