"""
Multimodal training (train_mm.py) on tiny random models: the loss covers exactly the assistant's tokens, truncation
never splits an image, batches are deterministic and grouped by image, the target-rows loss equals the full-logits
loss; real LLaVA-shaped data trains through both stages into a checkpoint that generate.ChatModel and generate.py
load and answer with; cached features are used (and refused for another layer); a SIGKILLed run resumes exactly;
2-process gloo DDP matches 1 process; bad data stops with the record named.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_mm
import llava_data
import train_clip
from model import Phi, PhiConfig
from multimodal import ChatModel, MultimodalLM
from tokenizer import IMAGE_TOKEN_ID, Tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset=tiny", "--lora_dropout=0", "--workers=0"]


def make_jpeg(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise(size, 30 + 10 * seed).convert("RGB").save(path, format="JPEG")


def llava_records():
    """Records in the exact shape of LLaVA-Instruct-150K / LLaVA-Pretrain-558K, plus a text-only one."""
    long_answer = "The bus is white and red, with a large advertisement on its side and people waiting nearby."
    records = [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": long_answer},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
            {"from": "human", "value": "Where is the cat positioned in the image?\n<image>"},
            {"from": "gpt", "value": "The cat is on top of the back of the couch."}]},
        {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]},
        {"id": "text-only-1", "conversations": [
            {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]},
    ]
    for k in range(8):
        records.append({"id": f"{k:012d}", "image": f"{k:012d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": f"Noise number {k}."},
            {"from": "human", "value": "Is it bright?"}, {"from": "gpt", "value": "yes" if k % 2 else "no"}]})
    return records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    records = llava_records()
    for k, r in enumerate(records):
        if "image" in r:
            make_jpeg(root / "images" / r["image"], (40 + 4 * (k % 3), 30 + 6 * (k % 2)), k)
    (root / "train.json").write_text(json.dumps(records))
    questions = [{"id": f"q{k}", "image": r["image"], "answer_type": "yes/no" if k % 2 else "other",
                  "conversations": r["conversations"][:2]} for k, r in enumerate(records) if "image" in r]
    (root / "questions.json").write_text(json.dumps(questions))
    return root


def data_args(root):
    return [f"--data={root / 'train.json'}", f"--image_folder={root / 'images'}"]


def tensors(ckpt):
    out = {}
    for name in ("projector.safetensors", "adapter_model.safetensors", "vision/model.safetensors"):
        if (ckpt / name).is_file():
            out.update({f"{name}:{k}": v for k, v in load_file(str(ckpt / name)).items()})
    return out


def log_rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def run_script(args, env=None, torchrun=False, script="train_mm.py"):
    prefix = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [])
    # one thread in every process: runs that are compared must not differ by how a thread count splits their sums
    return subprocess.run(prefix + [str(REPO / script)] + args, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


# ---- pieces ----------------------------------------------------------------------------------------------------


def test_targets_are_the_assistant_tokens_only():
    tok = Tokenizer()
    record = llava_records()[0]
    ids, labels, cut = llava_data.encode_record(tok, record, image_tokens=16, max_len=10_000)
    assert not cut and ids.count(IMAGE_TOKEN_ID) == 1 and len(ids) == len(labels)
    targets = [t for t in labels if t != -100]
    answers = [t["value"] for t in record["conversations"][1::2]]
    assert tok.decode(targets) == "".join(f" {a}<|endoftext|>" for a in answers)
    assert all(labels[i] in (-100, ids[i]) for i in range(len(ids)))
    first_answer = ids.index(tok.eos_id)
    assert labels[ids.index(IMAGE_TOKEN_ID)] == -100 and labels[first_answer + 1] == -100  # the "\n" after it
    assert tok.decode(ids[:3]) == "User: " and tok.decode(ids[3:4]) == "<image>"


def test_truncation_keeps_images_whole():
    tok = Tokenizer()
    record = llava_records()[1]  # "Where is the cat ...?\n<image>": the image comes after the question
    ids, _, _ = llava_data.encode_record(tok, record, 16, 10_000)
    at = ids.index(IMAGE_TOKEN_ID)
    cut_ids, cut_labels, cut = llava_data.encode_record(tok, record, 16, at + 10)  # the image would need 16 positions
    assert cut and cut_ids == ids[:at] and len(cut_labels) == at
    whole, _, cut = llava_data.encode_record(tok, record, 16, at + 16 + 2)
    assert cut and whole == ids[:at + 3] and whole[at] == IMAGE_TOKEN_ID
    data = llava_data.LlavaData([record], tok, 16, at + 10, seed=0)
    batch = data.batch([0])
    assert batch.truncated == 1 and batch.images == [] and batch.image_index == [] and batch.n_tokens == at


def test_order_is_deterministic_and_grouped_by_image():
    records = [{"id": str(i), "image": f"{i % 5}.jpg", "conversations": []} for i in range(23)]
    records += [{"id": "t", "conversations": []}]
    data = llava_data.LlavaData(records, None, 1, 10, seed=3)
    order = data.order(0)
    assert sorted(order) == list(range(24)) and order != data.order(1)
    assert llava_data.LlavaData(records, None, 1, 10, seed=3).order(0) == order
    runs, previous = [], None  # each image's records come together, once
    for i in order:
        image = records[i].get("image", "text")
        if image == previous:
            runs[-1][1] += 1
        else:
            runs.append([image, 1])
        previous = image
    assert sorted(runs) == [["0.jpg", 5], ["1.jpg", 5], ["2.jpg", 5], ["3.jpg", 4], ["4.jpg", 4], ["text", 1]]
    pairs = llava_data.LlavaData(records, None, 1, 10, seed=3, group_size=2).order(0)
    assert sorted(pairs) == list(range(24)) and pairs != order
    both = data.indices(1, 20)  # positions 20..39: the end of epoch 0, then epoch 1
    assert both[:4] == order[20:] and both[4:] == data.order(1)[:16]


def test_target_rows_loss_equals_full_logits_loss():
    torch.manual_seed(0)
    lm = Phi(PhiConfig.from_preset("tiny"))
    from clip_encoder import CLIPVision, CLIPVisionConfig
    from projector import build_projector
    vision = CLIPVision(CLIPVisionConfig.from_preset("tiny"))
    projector = build_projector("mlp2x_gelu", 64, lm.config.hidden_size)
    mm = MultimodalLM(lm, projector, vision, feature_layer=-1)
    tok = Tokenizer()
    data = llava_data.LlavaData(llava_records()[:4], tok, 16, 256, seed=0)
    batch = data.batch([0, 1, 2, 3])  # rows of different lengths, one without an image
    images = {"pixels": torch.randn(len(batch.images), 3, 32, 32)}
    loss_sum = mm(batch.ids, batch.labels, batch.image_index, images)
    spliced = mm.splice(batch.ids, batch.image_index, images, batch.labels)
    _, reference = lm(inputs_embeds=spliced.inputs_embeds, targets=spliced.targets, attention_mask=spliced.attention_mask)
    assert (spliced.targets != -100).sum().item() == batch.n_targets
    torch.testing.assert_close(loss_sum / batch.n_targets, reference, rtol=1e-5, atol=1e-5)


# ---- whole runs --------------------------------------------------------------------------------------------------


def test_llava_shaped_data_trains_both_stages_and_loads_for_chat(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train_mm.main(TINY + data_args(dataset) + [f"--out_dir={out}", "--max_len=56", "--val_size=3",
                                               f"--eval_data={dataset / 'questions.json'}"])
    printed = capsys.readouterr().out
    align, instruct = out / "align" / "ckpt", out / "instruct" / "ckpt"
    config = json.loads((instruct / "mm_config.json").read_text())
    assert set(config) >= {"lm", "vision", "projector", "vision_dim", "lm_dim", "feature_layer", "pad_to_square",
                           "template", "stage"}
    assert config["template"] == "omniphi-chat" and config["stage"] == "instruct" and config["vision"] == "vision"
    assert Path(config["lm"]).is_dir() and (instruct / "vision" / "config.json").is_file()
    assert (instruct / "adapter_config.json").is_file() and (instruct / "adapter_model.safetensors").is_file()
    assert not (align / "adapter_config.json").exists()
    assert json.loads((align / "mm_config.json").read_text())["stage"] == "align"
    # instruct started from the align checkpoint's projector and tower, and trained them further
    a, b = tensors(align), tensors(instruct)
    assert all(k in b for k in a) and any(not torch.equal(a[k], b[k]) for k in a)
    rows = log_rows(out / "instruct")
    assert rows[0]["iter"] == 0 and rows[-1]["iter"] == 4 and rows[-1]["val_loss"] is not None
    assert rows[-1]["samples"] and {"question", "answer", "reference"} <= set(rows[-1]["samples"][0])
    assert rows[-1]["truncated_total"] > 0 and "truncated" in printed  # the long conversation is cut at 56 positions
    assert (out / "instruct" / "loss.png").is_file()
    report = json.loads((out / "eval.json").read_text())
    assert report["n"] == 11 and set(report["by_type"]) == {"yes/no", "other"} and 0 <= report["accuracy"] <= 1
    assert report["correct"] == sum(c["correct"] for c in report["counts"].values())
    assert "| **all** | 11 |" in printed

    from clip_encoder import load_image
    chat = ChatModel(None, mm=instruct)
    image = load_image(dataset / "images" / "000000033471.jpg")
    messages = [{"role": "user", "content": "<image>\nWhat are the colors of the bus in the image?"}]
    reply = chat.reply(messages, [image], temperature=0, max_tokens=6)
    embeds, _ = chat.prompt_embeddings(messages, [image])
    new = chat.model.generate(inputs_embeds=embeds, max_new_tokens=6, temperature=0)[0].tolist()
    expected = chat.tokenizer.decode(new[:new.index(50256)] if 50256 in new else new).strip()
    mm = MultimodalLM(chat.model, chat.projector, chat.vision, config["feature_layer"]).eval()
    source = llava_data.ImageSource(dataset / "images", chat.vision.processor, workers=0)
    assert mm.answer([(messages, "000000033471.jpg")], source, 6, chat.tokenizer) == [expected]

    cli = subprocess.run([sys.executable, str(REPO / "generate.py"), f"--mm={instruct}",
                          f"--image={dataset / 'images' / '000000033471.jpg'}", "--temperature=0", "--max_new_tokens=6",
                          "--prompt=What are the colors of the bus in the image?", "--device=cpu", "--dtype=float32"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == reply.strip()


def test_cached_features_are_used_and_checked(dataset, tmp_path):
    from clip_encoder import CLIPVision, CLIPVisionConfig
    sys.path.insert(0, str(REPO / "data" / "coco"))
    import cache_features
    tower = tmp_path / "tower"
    torch.manual_seed(0)
    CLIPVision(CLIPVisionConfig.from_preset("tiny")).save_pretrained(tower)
    cache_features.main([f"--images={dataset / 'images'}", f"--vision={tower}", f"--out={tmp_path / 'cache'}",
                         "--layer=-2", "--workers=0", "--device=cpu"])
    args = TINY + data_args(dataset) + ["--stage=align", f"--vision={tower}",
                                        f"--features={tmp_path / 'cache'}", "--max_iters=2", "--samples=0"]
    train_mm.main(args + [f"--out_dir={tmp_path / 'run'}"])
    config = json.loads((tmp_path / "run" / "ckpt" / "mm_config.json").read_text())
    assert config["vision"] == str(tower.resolve()) and not (tmp_path / "run" / "ckpt" / "vision").exists()
    with pytest.raises(SystemExit, match="built for another tower or setting"):
        train_mm.main(args + [f"--out_dir={tmp_path / 'other'}", "--feature_layer=-1"])


def test_instruct_on_an_nf4_base(dataset, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "nf4"
    train_mm.main(TINY + data_args(dataset) + ["--stage=instruct", "--quantize=nf4", "--max_iters=2", "--samples=1",
                                               f"--out_dir={out}"])
    config = json.loads((out / "ckpt" / "adapter_config.json").read_text())
    assert config["r"] == 4 and (out / "ckpt" / "adapter_model.safetensors").is_file()
    from lora import NF4Linear
    chat = ChatModel(None, mm=out / "ckpt", quantize="nf4")
    assert any(isinstance(m, NF4Linear) for m in chat.model.modules())
    assert isinstance(chat.reply([{"role": "user", "content": "hi"}], temperature=0, max_tokens=3), str)


def test_align_lora_with_the_output_head_and_a_waiting_tower(dataset, tmp_path):
    """The demo's recipe: LoRA (lm_head included) trains in align too, while tower and projector wait their
    iterations; instruct continues from that adapter."""
    args = TINY + data_args(dataset) + ["--align_lora", "--lora_targets=q_proj,fc2,lm_head", "--freeze_image_iters=2",
                                        "--max_iters=2", "--samples=0", "--val_size=2"]
    runs = {}
    for lr in ("3e-3", "1e-2"):
        train_mm.main(args + ["--stage=align", f"--lr={lr}", f"--min_lr={lr}", f"--out_dir={tmp_path / lr}"])
        runs[lr] = tensors(tmp_path / lr / "ckpt")
        config = json.loads((tmp_path / lr / "ckpt" / "adapter_config.json").read_text())
        assert sorted(config["target_modules"]) == ["fc2", "lm_head", "q_proj"]
    a, b = runs.values()
    image_keys = [k for k in a if not k.startswith("adapter")]
    assert image_keys and all(torch.equal(a[k], b[k]) for k in image_keys)  # waited: untouched by either lr
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("adapter"))
    train_mm.main(args[:-3] + ["--stage=instruct", "--max_iters=1", "--samples=0", "--val_size=2",
                               f"--init={tmp_path / '1e-2' / 'ckpt'}", f"--out_dir={tmp_path / 'instruct'}"])
    chat = ChatModel(None, mm=tmp_path / "instruct" / "ckpt")
    assert type(chat.model.lm_head) is torch.nn.Linear  # the adapted head was merged like the rest
    assert isinstance(chat.reply([{"role": "user", "content": "hi"}], temperature=0, max_tokens=2), str)


def test_full_lm_trains_every_lm_weight_keeps_it_in_the_checkpoint_and_resumes_exactly(dataset, tmp_path):
    """--full_lm (the demo's recipe for a random LM): all the LM's weights train, not LoRA; the checkpoint holds the
    trained LM in lm/ (no adapter), loads for chat, and a killed run resumes to the uninterrupted one's weights."""
    args = TINY + data_args(dataset) + ["--stage=instruct", "--full_lm", "--max_iters=4", "--ckpt_interval=2",
                                        "--samples=0", "--val_size=2", "--eval_interval=4"]
    done = run_script(args + [f"--out_dir={tmp_path / 'whole'}"])
    assert done.returncode == 0, done.stderr
    ckpt = tmp_path / "whole" / "ckpt"
    assert json.loads((ckpt / "mm_config.json").read_text())["lm"] == "lm"
    assert (ckpt / "lm" / "config.json").is_file() and not (ckpt / "adapter_config.json").exists()
    trained = load_file(str(ckpt / "lm" / "model.safetensors"))
    start = load_file(str(tmp_path / "whole" / "random_tiny" / "model.safetensors"))
    assert trained.keys() == start.keys()
    changed = [k for k in trained if not torch.equal(trained[k], start[k])]
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert all(any(k.startswith(f"model.layers.{i}.") for k in changed) for i in range(2))
    model = MultimodalLM.load(ckpt)
    assert all(torch.equal(model.lm.state_dict()[k], trained[k]) for k in trained)
    chat = ChatModel(None, mm=ckpt)
    assert isinstance(chat.reply([{"role": "user", "content": "hi"}], temperature=0, max_tokens=2), str)

    killed = run_script(args + [f"--out_dir={tmp_path / 'killed'}"], env={train_mm.KILL_AT_ITER_ENV: "3"})
    assert killed.returncode == -9
    resumed = run_script(args + [f"--out_dir={tmp_path / 'killed'}", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    got = load_file(str(tmp_path / "killed" / "ckpt" / "lm" / "model.safetensors"))
    assert all(torch.equal(got[k], trained[k]) for k in trained)
    assert tensors(tmp_path / "killed" / "ckpt").keys() == tensors(ckpt).keys()

    with pytest.raises(SystemExit, match="--full_lm trains the LM's own weights"):
        train_mm.main(TINY + data_args(dataset) + ["--stage=instruct", "--full_lm", "--quantize=nf4",
                                                   f"--out_dir={tmp_path / 'nf4'}"])


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory):
    """6 uninterrupted instruct iterations (projector and LoRA train) in 2 accumulated micro-steps of 2, checkpoints
    every 2."""
    out = tmp_path_factory.mktemp("reference")
    args = TINY + data_args(dataset) + ["--stage=instruct", "--lm=tiny", "--vision=tiny", "--max_iters=6",
                                        "--micro_batch_size=2", "--ckpt_interval=2", "--eval_interval=3", "--samples=1",
                                        "--val_size=2"]
    done = run_script(args + [f"--out_dir={out}"])
    assert done.returncode == 0, done.stderr
    return args, out


def test_resume_after_sigkill_is_exact(reference_run, tmp_path):
    args, reference = reference_run
    out = tmp_path / "killed"
    killed = run_script(args + [f"--out_dir={out}"], env={train_mm.KILL_AT_ITER_ENV: "3"})
    assert killed.returncode == -9  # SIGKILL after iteration 3; the last checkpoint is iteration 2
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=False)["iter"] == 2
    resumed = run_script(args + [f"--out_dir={out}", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming instruct" in resumed.stdout
    want, got = tensors(reference / "ckpt"), tensors(out / "ckpt")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [r["train_loss"] for r in log_rows(out)] == [r["train_loss"] for r in log_rows(reference)]


def test_two_process_ddp_matches_one_process(reference_run, tmp_path):
    """Each process (one thread, as the reference) computes its micro-batch as the reference's micro-step does; the loss
    is scaled by world / targets, a power of two away from the reference's scale, and the all-reduce adds two values,
    which commutes: the gradients and every weight after them are the same to the bit. Held-out records are batched
    differently per process (every world-th), so held-out losses agree to fp32 rounding (1e-6 relative)."""
    args, reference = reference_run
    out = tmp_path / "ddp"
    done = run_script(args + [f"--out_dir={out}"], torchrun=True)
    assert done.returncode == 0, done.stderr
    assert "2 processes x 1 micro-steps x 2" in done.stdout
    want, got = tensors(reference / "ckpt"), tensors(out / "ckpt")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for a, b in zip(log_rows(reference), log_rows(out), strict=True):
        assert a["train_loss"] == b["train_loss"]
        assert (a["val_loss"] is None) == (b["val_loss"] is None)
        assert a["val_loss"] is None or b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Caption data of 64 drawn images: a reddish or a bluish circle or square of a random size and place."""
    from PIL import ImageDraw
    root, generator = tmp_path_factory.mktemp("shapes"), torch.Generator().manual_seed(0)
    (root / "images").mkdir()
    records = []
    for k in range(64):
        image = Image.new("RGB", (32, 32), "white")
        size, x, y = torch.randint(10, 16, (1,), generator=generator).item(), *torch.randint(0, 16, (2,), generator=generator).tolist()
        strong, weak = 150 + torch.randint(0, 100, (1,), generator=generator).item(), torch.randint(0, 80, (2,), generator=generator).tolist()
        name, colour = ("red", (strong, *weak)) if k % 2 else ("blue", (*weak, strong))
        draw = ImageDraw.Draw(image)
        (draw.ellipse if k % 3 else draw.rectangle)((x, y, x + size, y + size), fill=colour)
        image.save(root / "images" / f"{k}.png")
        records.append({"id": f"caption-{k}", "image": f"{k}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": f"A {name} shape."}]})
    (root / "captions.json").write_text(json.dumps(records))
    return root


CLIP = ["--preset=tiny", "--workers=0", "--batch_size=16", "--val_size=16", "--lr=3e-3", "--feature_layer=-1",
        "--log_interval=5"]


def test_clip_stage_learns_which_caption_is_which(shapes, tmp_path):
    out = tmp_path / "clip"
    train_clip.main(CLIP + [f"--data={shapes / 'captions.json'}", f"--image_folder={shapes / 'images'}",
                            "--max_iters=60", "--eval_interval=30", f"--out_dir={out}"])
    rows = [r for r in log_rows(out) if r.get("val_loss") is not None]
    assert [r["iter"] for r in rows] == [0, 30, 60]
    assert rows[-1]["caption_accuracy"] == 1.0 and rows[-1]["val_loss"] < rows[0]["val_loss"]  # chance is 50%
    from clip_encoder import CLIPVision
    tower = CLIPVision.from_pretrained(out / "ckpt" / "vision")
    assert tower.config.hidden_size == 64 and (out / "loss.png").is_file()


def test_clip_stage_resumes_exactly(shapes, tmp_path):
    args = CLIP + [f"--data={shapes / 'captions.json'}", f"--image_folder={shapes / 'images'}", "--max_iters=4",
                   "--ckpt_interval=2", "--eval_interval=4"]
    reference = run_script(args + [f"--out_dir={tmp_path / 'reference'}"], script="train_clip.py")
    assert reference.returncode == 0, reference.stderr
    killed = run_script(args + [f"--out_dir={tmp_path / 'killed'}"], env={train_clip.KILL_AT_ITER_ENV: "3"},
                        script="train_clip.py")
    assert killed.returncode == -9
    resumed = run_script(args + [f"--out_dir={tmp_path / 'killed'}", "--resume"], script="train_clip.py")
    assert resumed.returncode == 0 and "resuming clip" in resumed.stdout, resumed.stderr
    for name in ("vision/model.safetensors", "contrastive.safetensors"):
        want, got = load_file(str(tmp_path / "reference" / "ckpt" / name)), load_file(str(tmp_path / "killed" / "ckpt" / name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert [r["train_loss"] for r in log_rows(tmp_path / "killed")] == [r["train_loss"] for r in log_rows(tmp_path / "reference")]


def test_clip_stage_needs_captioned_images(dataset, tmp_path):
    data = tmp_path / "text-only.json"
    data.write_text(json.dumps([r for r in llava_records() if "image" not in r] * 4))
    with pytest.raises(SystemExit, match="the clip stage needs image records"):
        train_clip.main(CLIP + [f"--data={data}", f"--image_folder={dataset / 'images'}", "--val_size=1",
                                f"--out_dir={tmp_path / 'o'}"])
    assert not (tmp_path / "o" / "ckpt").exists()


def test_the_clip_tower_goes_into_both_stages(shapes, tmp_path):
    out = tmp_path / "all"
    data = [f"--data={shapes / 'captions.json'}", f"--image_folder={shapes / 'images'}"]
    train_clip.main(["--preset=tiny", "--workers=0", "--max_iters=2"] + data + [f"--out_dir={out / 'clip'}"])
    train_mm.main(TINY + data + [f"--vision={out / 'clip' / 'ckpt' / 'vision'}", "--max_iters=2", "--samples=0",
                                 f"--out_dir={out}"])
    tower = load_file(str(out / "clip" / "ckpt" / "vision" / "model.safetensors"))
    for stage in ("align", "instruct"):  # the clip stage's tower, frozen, inside each checkpoint
        config = json.loads((out / stage / "ckpt" / "mm_config.json").read_text())
        assert config["vision"] == "vision" and config["stage"] == stage
        saved = load_file(str(out / stage / "ckpt" / "vision" / "model.safetensors"))
        assert saved.keys() == tower.keys() and all(torch.equal(saved[k], tower[k]) for k in tower)
    shutil.rmtree(out / "clip")  # the final checkpoint stands on its own
    chat = ChatModel(None, mm=out / "instruct" / "ckpt")
    assert isinstance(chat.reply([{"role": "user", "content": "<image>\nWhat is it?"}],
                                 [Image.open(shapes / "images" / "0.png")], temperature=0, max_tokens=3), str)


@pytest.mark.parametrize("change, words", [
    (lambda records: {"records": records}, "must hold a JSON list of records"),
    (lambda records: records[:1] + [{"id": "lost-convs", "image": "000000052846.jpg"}],
     "record lost-convs: has no 'conversations'"),
    (lambda records: records[:1] + [{**records[1], "id": "gone", "image": "nowhere/000000999999.jpg"}],
     "record gone: image"),
    (lambda records: records[:1] + [{"id": "two-gpts", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"},
        {"from": "human", "value": "c"}]}], "record two-gpts: turn 2 is from 'gpt' where 'human' was expected"),
])
def test_bad_data_stops_naming_the_record(dataset, tmp_path, change, words):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(change(llava_records())))
    with pytest.raises(SystemExit) as err:
        train_mm.main(TINY + [f"--data={data}", f"--image_folder={dataset / 'images'}", f"--out_dir={tmp_path / 'o'}"])
    assert words in str(err.value)
    assert not (tmp_path / "o" / "align" / "ckpt").exists()


def test_stage_configs():
    first, (align, instruct) = train_mm.stage_configs(["--preset=tiny", "--data=d.json", "--out_dir=o", "--lr=0.01"])
    assert first.stage == "both" and (align.stage, instruct.stage) == ("align", "instruct")
    assert (align.out_dir, instruct.out_dir, instruct.init) == ("o/align", "o/instruct", "o/align/ckpt")
    assert align.lm == "tiny" and instruct.lm == instruct.vision == "" and align.lr == instruct.lr == 0.01
    _, (alone,) = train_mm.stage_configs(["--preset=tiny", "--stage=instruct", "--data=d.json", "--init=ck"])
    assert alone.out_dir == "out/mm-tiny/instruct" and alone.lm == alone.vision == ""  # the init checkpoint's
    _, (alone,) = train_mm.stage_configs(["--preset=tiny", "--stage=instruct", "--data=d.json", "--init=ck",
                                          "--vision=tower"])
    assert alone.vision == "tower" and alone.lm == ""
    demo, (demo_instruct,) = train_mm.stage_configs([])  # the demo trains a random LM whole: no align stage
    assert demo.stage == "instruct" and demo_instruct.full_lm and demo_instruct.lm == "demo"
    assert demo_instruct.data.endswith("train_demo.json") and demo_instruct.vision == "out/mm-demo/clip/ckpt/vision"
    assert demo_instruct.out_dir == "out/mm-demo/instruct"
    _, (demo_align, _) = train_mm.stage_configs(["--stage=both"])
    assert train_clip.PRESETS["demo"]["data"] == demo_align.data and demo_align.data.endswith("captions.json")


def test_bad_options_are_refused():
    for argv, words in ((["--stage=pretrain"], "--stage must be align, instruct, both"),
                        (["--quantize=fp8"], "--quantize"), (["--no_such_option=1"], "unknown option --no_such_option"),
                        (["--resume", "--eval"], "exclude each other")):
        with pytest.raises(SystemExit, match=words):
            train_mm.main(TINY + ["--data=x.json"] + argv)
    assert train_clip.tower_overrides("hidden_size=128,hidden_act=gelu") == {"hidden_size": 128, "hidden_act": "gelu"}
    for bad in ("width=128", "hidden_size=wide", "hidden_size"):
        with pytest.raises(ValueError, match="--vision_config"):
            train_clip.tower_overrides(bad)
