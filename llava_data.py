"""
LLaVA JSON data: checking records against their image folder, the chat encoding with the assistant's tokens as
targets, deterministic batches that keep an image's records together, and images by path (preprocessed pixels kept
in memory, or the features of a CLIP feature cache).

A record is {"id", "image" (optional, relative to the image folder), "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}. A record is bad when its conversations are missing or
empty, do not alternate human/gpt starting with human and ending with gpt, have an empty turn, when an image
record has no '<image>' (exactly one, in the first human turn) or a text-only record has one, or when its image
file is missing or unreadable.
"""

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from clip_encoder import load_image, preprocess
from tokenizer import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, encode_chat

ROLES = ("human", "gpt")
CHAT_ROLES = {"human": "user", "gpt": "assistant"}
IGNORE = -100
SHOWN = 20  # bad records named in an error message


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


def load_checked(path, cfg, d):
    """The good records of a LLaVA JSON (cfg: image_folder, skip_bad, check_images, workers). The master process checks
    (and images are opened) once; every process gets the same list, or the same error."""
    records = load_records(path)
    result = [None]
    if d.master:
        try:
            good, report = validate(records, cfg.image_folder, skip_bad=cfg.skip_bad, check_images=cfg.check_images,
                                    workers=cfg.workers, source=str(path))
            print(format_report(report), flush=True)
            keep = {id(r) for r in good}
            result = [("ok", [i for i, r in enumerate(records) if id(r) in keep])]
        except (ValueError, FileNotFoundError) as err:
            result = [("error", (type(err).__name__, str(err)))]
    if d.world > 1:
        dist.broadcast_object_list(result, src=0)
    status, payload = result[0]
    if status == "error":
        raise {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}[payload[0]](payload[1])
    return [records[i] for i in payload]


def split_off(records, n, seed):
    """(train, held-out): whole images (all their records) are held out until at least n records are."""
    groups = group_by_image(records)
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    held, count = set(), 0
    for g in order:
        if count >= n:
            break
        held.add(g)
        count += len(groups[g])
    if len(held) == len(groups):
        raise ValueError(f"cannot hold out {n} records for validation: the data has only {len(records)} records "
                         f"of {len(groups)} images; lower --val_size or pass --val_data")
    val = [records[i] for g in sorted(held) for i in groups[g]]
    train = [records[i] for g in range(len(groups)) if g not in held for i in groups[g]]
    return train, val


def group_by_image(records):
    """Lists of record indices that share an image, in first-seen order; a text-only record is a group of its own."""
    groups, where = [], {}
    for i, r in enumerate(records):
        key = r.get("image")
        if key is None:
            groups.append([i])
        elif key in where:
            groups[where[key]].append(i)
        else:
            where[key] = len(groups)
            groups.append([i])
    return groups


def encode_record(tokenizer, record, image_tokens, max_len):
    """(ids, labels, truncated) of a record in the chat template: labels are the ids of assistant tokens (answers
    and their <|endoftext|>), -100 elsewhere. A sequence longer than max_len (image counted as image_tokens) is cut
    before the token that does not fit; an image that does not fit whole is dropped with everything after it."""
    messages = [{"role": CHAT_ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    ids, is_target = encode_chat(tokenizer, messages, add_generation_prompt=False)
    labels = [t if m else IGNORE for t, m in zip(ids, is_target)]
    length = 0
    for k, t in enumerate(ids):
        size = image_tokens if t == IMAGE_TOKEN_ID else 1
        if length + size > max_len:
            return ids[:k], labels[:k], True
        length += size
    return ids, labels, False


@dataclass
class Batch:
    ids: list  # token id rows, IMAGE_TOKEN_ID where an image goes
    labels: list  # aligned with ids: the id to learn or -100
    images: list  # the distinct image paths of the batch
    image_index: list  # for every IMAGE_TOKEN_ID in reading order: its position in images
    n_targets: int
    n_tokens: int  # spliced positions
    truncated: int  # records cut at max_len


class LlavaData:
    """Records in a deterministic order: each epoch shuffles the images and the records within an image, and keeps
    up to group_size records of one image next to each other, so a batch runs the tower once per image."""

    def __init__(self, records, tokenizer, image_tokens, max_len, seed, group_size=0):
        self.records, self.tokenizer = records, tokenizer
        self.image_tokens, self.max_len, self.seed, self.group_size = image_tokens, max_len, seed, group_size
        self.groups = group_by_image(records)
        self._orders = {}

    def __len__(self):
        return len(self.records)

    def order(self, epoch):
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            chunks = []
            for group in self.groups:
                members = [group[p] for p in torch.randperm(len(group), generator=generator).tolist()]
                size = self.group_size or len(members)
                chunks += [members[k:k + size] for k in range(0, len(members), size)]
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # a batch may span two
            self._orders[epoch] = [i for c in torch.randperm(len(chunks), generator=generator).tolist() for i in chunks[c]]
        return self._orders[epoch]

    def indices(self, it, batch_size):
        """Record indices of iteration it's global batch (epochs follow each other without a gap)."""
        out = []
        for pos in range(it * batch_size, (it + 1) * batch_size):
            epoch, offset = divmod(pos, len(self.records))
            out.append(self.order(epoch)[offset])
        return out

    def batch(self, indices):
        ids, labels, images, image_index, n_targets, n_tokens, truncated = [], [], [], [], 0, 0, 0
        where = {}
        for i in indices:
            record = self.records[i]
            row, row_labels, cut = encode_record(self.tokenizer, record, self.image_tokens, self.max_len)
            if IMAGE_TOKEN_ID in row:
                path = record["image"]
                if path not in where:
                    where[path] = len(images)
                    images.append(path)
                image_index.append(where[path])
            ids.append(row)
            labels.append(row_labels)
            n_targets += sum(1 for t in row_labels if t != IGNORE)
            n_tokens += len(row) + (self.image_tokens - 1) * row.count(IMAGE_TOKEN_ID)
            truncated += cut
        return Batch(ids, labels, images, image_index, n_targets, n_tokens, truncated)


class ImageSource:
    """Images by path relative to the image folder: preprocessed pixels (kept in memory up to a budget), or the
    features of a CLIP feature cache."""

    def __init__(self, folder, processor=None, pad_to_square=False, cache=None, memo_mb=1024, workers=8):
        self.folder, self.processor, self.pad_to_square, self.cache = Path(folder or "."), processor, pad_to_square, cache
        self.memo, self.memo_bytes, self.memo_budget = {}, 0, memo_mb * 2 ** 20
        self.pool = ThreadPoolExecutor(max(1, workers)) if workers else None

    def _pixels(self, path):
        if path in self.memo:
            return self.memo[path]
        try:
            image = load_image(self.folder / path)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"cannot use image {self.folder / path}: {err}") from None
        pixels = preprocess([image], self.processor, pad_to_square=self.pad_to_square)[0]
        size = pixels.numel() * pixels.element_size()
        if self.memo_bytes + size <= self.memo_budget:
            self.memo[path] = pixels
            self.memo_bytes += size
        return pixels

    def get(self, paths, device):
        """{'pixels': (n, 3, S, S)} or {'features': (n, N, D)} for the paths."""
        if not paths:
            return {}
        if self.cache is not None:
            missing = [p for p in paths if p not in self.cache]
            if missing:
                raise ValueError(f"image {missing[0]} is not in the feature cache {self.cache.folder} "
                                 f"({len(missing)} of this batch's {len(paths)} images are missing)")
            return {"features": torch.stack([self.cache.get(p) for p in paths]).to(device)}
        todo = [p for p in paths if p not in self.memo]
        if self.pool is not None and len(todo) > 1:
            loaded = dict(zip(todo, self.pool.map(self._pixels, todo)))
        else:
            loaded = {p: self._pixels(p) for p in todo}
        return {"pixels": torch.stack([loaded[p] if p in loaded else self.memo[p] for p in paths]).to(device)}
