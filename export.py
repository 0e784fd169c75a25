"""
Merge a LoRA adapter into its base model and write a standalone checkpoint: a Hugging Face folder that
transformers.PhiForCausalLM loads, or a multimodal checkpoint whose LM is that merged folder (no adapter left).

    python export.py --mm=out/mm-demo --out=out/mm-demo-merged          # multimodal: lm/ + projector + tower
    python export.py --model=checkpoints/phi-2 --adapter=out/mm-llava/instruct/ckpt --out=out/phi2-merged

--mm and --adapter take a checkpoint folder or the run folder that holds it. A quantized (QLoRA) adapter merges into
the full-precision base: the export is full size (bfloat16 with --dtype=bfloat16).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from common import fail, parse_config, save_checkpoint
from lora import load_adapter, merge_lora
from model import Phi, atomic_write
from multimodal import MultimodalLM, find_mm_checkpoint


@dataclass
class ExportConfig:
    mm: str = ""  # a multimodal checkpoint (or run folder): its LM with the adapter merged, projector and tower
    model: str = ""  # a language model folder (or hub id) to merge --adapter into
    adapter: str = ""  # a PEFT-layout LoRA adapter folder (a multimodal checkpoint holds one) for --model
    out: str = ""  # the folder to write (must not exist yet)
    dtype: str = "float32"  # float32 | bfloat16 | float16: the dtype the merged weights are saved in


def export(cfg):
    out = Path(cfg.out)
    if not cfg.out:
        raise ValueError("--out=DIR is required")
    if out.exists():
        raise FileExistsError(f"{out} exists; pick a new folder")
    if bool(cfg.mm) == bool(cfg.model):
        raise ValueError("pass either --mm=CHECKPOINT or --model=FOLDER with --adapter=FOLDER")
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.mm:
        model = MultimodalLM.load(cfg.mm, dtype=cfg.dtype)  # the adapter is merged as it loads
        stage = json.loads((find_mm_checkpoint(cfg.mm) / "mm_config.json").read_text()).get("stage", "instruct")

        def write(folder):
            model.lm_ref = ""  # the merged LM is saved inside
            model.save(folder, stage)
            config = {**json.loads((folder / "mm_config.json").read_text()), "merged_from": str(Path(cfg.mm).resolve())}
            atomic_write(folder / "mm_config.json", json.dumps(config, indent=2))
        save_checkpoint(out.parent, write, name=out.name)
        return out
    if not cfg.adapter:
        raise ValueError("--model needs --adapter=FOLDER (the LoRA adapter to merge into it)")
    adapter = Path(cfg.adapter)
    if not (adapter / "adapter_config.json").is_file():
        adapter = find_mm_checkpoint(adapter)  # a run folder: its final checkpoint holds the adapter
    lm = merge_lora(load_adapter(Phi.from_pretrained(cfg.model, dtype=cfg.dtype), adapter))
    save_checkpoint(out.parent, lm.save_pretrained, name=out.name)
    return out


def main(argv=None):
    try:
        out = export(parse_config(ExportConfig, sys.argv[1:] if argv is None else argv, doc=__doc__))
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        fail("export.py", err)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
