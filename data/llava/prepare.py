"""
Check a LLaVA-format JSON (LLaVA-Instruct-150K, LLaVA-Pretrain-558K or your own) against its image folder before
any training starts, and report what it holds. train_mm.py runs the same check (llava_data.validate).

    python data/llava/prepare.py --data=llava_instruct_150k.json --image_folder=data/coco/train2017
    python data/llava/prepare.py --data=blip_laion_cc_sbu_558k.json --image_folder=data/llava/pretrain/images \
        --skip_bad --out=data/llava/prepared/pretrain_clean.json

What makes a record bad: llava_data.py.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import fail, parse_config  # noqa: E402
from llava_data import format_report, load_records, validate  # noqa: E402


@dataclass
class PrepareConfig:
    data: str = ""  # the LLaVA JSON to check
    image_folder: str = ""  # image paths in the JSON are relative to this folder
    skip_bad: bool = False  # drop bad records (listed) instead of stopping
    check_images: str = "open"  # open: read each image's header | decode: decode every pixel (slow) | exists | none
    out: str = ""  # write the good records here (a cleaned JSON)
    workers: int = 16  # threads that check images


def main(argv):
    cfg = parse_config(PrepareConfig, argv, doc=__doc__)
    if not cfg.data:
        raise ValueError("--data=PATH (a LLaVA JSON) is required")
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
        fail("prepare.py", err)
