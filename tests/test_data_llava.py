"""
The LLaVA JSON check (data/llava/prepare.py) and the easy-vqa conversion (data/easyvqa/prepare.py): real-shaped
records pass with their counts, every kind of bad record is named by its id, --skip_bad drops exactly those.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def load(relpath, name):
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


llava = load("data/llava/prepare.py", "llava_prepare_under_test")
easyvqa = load("data/easyvqa/prepare.py", "easyvqa_prepare_under_test")


def make_jpeg(path, size=(48, 36), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.effect_noise(size, 40 + seed).convert("RGB")
    image.save(path, format="JPEG")


def instruct_records():
    """Records shaped exactly like LLaVA-Instruct-150K and LLaVA-Pretrain-558K (ids, COCO / nested file names)."""
    return [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
            {"from": "human", "value": "Where is the cat positioned in the image?\n<image>"},
            {"from": "gpt", "value": "The cat is positioned on top of the back of the couch."}]},
        {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]},
        {"id": "text-1", "conversations": [
            {"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}]},
    ]


@pytest.fixture()
def folder(tmp_path):
    for k, name in enumerate(["000000033471.jpg", "000000052846.jpg", "00453/004539375.jpg"]):
        make_jpeg(tmp_path / "images" / name, seed=k)
    return tmp_path


def test_real_shaped_records_pass_with_counts(folder):
    good, report = llava.validate(instruct_records(), folder / "images", check_images="decode")
    assert len(good) == 4 and report["bad"] == 0
    assert report["image_records"] == 3 and report["text_only_records"] == 1 and report["images"] == 3
    assert report["turns"] == 4 + 2 + 2 + 2
    assert "4 records, 4 good, 0 bad" in llava.format_report(report)


@pytest.mark.parametrize("record, words", [
    ({"id": "no-convs", "image": "000000033471.jpg"}, "no 'conversations'"),
    ({"id": "empty", "conversations": []}, "empty conversations"),
    ({"id": "two-humans", "image": "000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nhi"}, {"from": "human", "value": "again"}]}, "alternate"),
    ({"id": "gpt-first", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]},
     "alternate"),
    ({"id": "unanswered", "conversations": [{"from": "human", "value": "hi"}]}, "no gpt answer"),
    ({"id": "no-placeholder", "image": "000000033471.jpg", "conversations": [
        {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A bus."}]}, "<image>"),
    ({"id": "late-placeholder", "image": "000000033471.jpg", "conversations": [
        {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A bus."},
        {"from": "human", "value": "<image>\nAnd now?"}, {"from": "gpt", "value": "Still a bus."}]}, "first human turn"),
    ({"id": "text-with-placeholder", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "No image."}]}, "no 'image'"),
    ({"id": "missing-image", "image": "nope/000000000001.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}, "missing"),
    ({"id": "empty-answer", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}, "empty"),
    ("just a string", "not an object"),
])
def test_bad_records_are_named_and_skipped_only_when_asked(folder, record, words):
    records = instruct_records() + [record]
    with pytest.raises(ValueError) as err:
        llava.validate(records, folder / "images", source="data.json")
    message = str(err.value)
    rid = record["id"] if isinstance(record, dict) else "#4"
    assert f"record {rid}:" in message and words in message and "--skip_bad" in message
    good, report = llava.validate(records, folder / "images", skip_bad=True)
    assert len(good) == 4 and report["bad"] == 1 and report["bad_records"][0][0] == rid


def test_unreadable_image_and_bad_files(folder, tmp_path):
    (folder / "images" / "broken.jpg").write_bytes(b"this is not a jpeg at all")
    record = {"id": "broken", "image": "broken.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
    with pytest.raises(ValueError, match=r"record broken: image .*broken.jpg is unreadable"):
        llava.validate([record], folder / "images")
    not_list = tmp_path / "dict.json"
    not_list.write_text(json.dumps({"id": "x", "conversations": []}))
    with pytest.raises(ValueError, match=r"dict.json must hold a JSON list of records"):
        llava.load_records(not_list)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("[{")
    with pytest.raises(ValueError, match="garbage.json is not valid JSON"):
        llava.load_records(garbage)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llava.load_records(tmp_path / "absent.json")
    with pytest.raises(FileNotFoundError, match="image folder"):
        llava.validate(instruct_records(), tmp_path / "no-such-folder")
    with pytest.raises(ValueError, match="no image folder was given"):
        llava.validate(instruct_records(), "")


def test_command_line_reports_and_writes_clean_json(folder):
    records = instruct_records() + [{"id": "bad-one", "conversations": [{"from": "human", "value": "unanswered"}]}]
    data = folder / "data.json"
    data.write_text(json.dumps(records))
    script = str(REPO / "data" / "llava" / "prepare.py")
    stopped = subprocess.run([sys.executable, script, f"--data={data}", f"--image_folder={folder / 'images'}"],
                             capture_output=True, text=True)
    assert stopped.returncode != 0 and "record bad-one" in stopped.stderr
    out = folder / "clean.json"
    done = subprocess.run([sys.executable, script, f"--data={data}", f"--image_folder={folder / 'images'}",
                           "--skip_bad", f"--out={out}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "5 records, 4 good, 1 bad" in done.stdout and "skipped record bad-one" in done.stdout
    assert [r["id"] for r in json.loads(out.read_text())] == [r["id"] for r in instruct_records()]


def test_easyvqa_facts_and_records():
    questions = ["what color is the circle?", "is there not a triangle?", "what shape is present?",
                 "is there a blue shape?", "does the image not contain a rectangle?", "is no circle present?",
                 "is there not a red shape?"]
    answers = ["green", "yes", "triangle", "yes", "yes", "yes", "yes"]
    images = [0, 0, 1, 1, 2, 2, 3]
    facts = easyvqa.image_facts(questions, answers, images)
    assert facts[0] == ("circle", "green")  # the question names the shape whose colour is the answer
    assert facts[1] == ("triangle", "blue")
    assert facts[2] == ("triangle", None)  # neither rectangle nor circle: the shape left over
    assert facts[3] == (None, None)
    assert easyvqa.caption("circle", "green") == "A green circle."
    assert easyvqa.caption("triangle", None) == "A triangle." and easyvqa.caption(None, "red") == "A red shape."
    records = easyvqa.split_records("test", questions[:3], answers[:3], images[:3])
    assert records[1] == {"id": "test-0-1", "image": "test/0.png", "answer_type": "yes/no", "conversations": [
        {"from": "human", "value": "<image>\nis there not a triangle?"}, {"from": "gpt", "value": "yes"}]}
    assert [r["answer_type"] for r in records] == ["colour", "yes/no", "shape"]
    good, _ = llava.validate(records, "", check_images="none")
    assert len(good) == 3


def test_easyvqa_package_counts():
    easy_vqa = pytest.importorskip("easy_vqa")
    test = easyvqa.split_records("test", *easy_vqa.get_test_questions())
    assert len(test) == 9673 and len({r["image"] for r in test}) == 1000
    train_questions = easy_vqa.get_train_questions()
    facts = easyvqa.image_facts(*train_questions)
    assert len(facts) == 4000 and sum(1 for s, c in facts.values() if s and c) > 3400
    assert sorted(easyvqa.SHAPES + easyvqa.COLOURS + ("yes", "no")) == sorted(easy_vqa.get_answers())


def test_easyvqa_demo_set_repeats_only_colour_questions_naming_the_pictures_colour():
    questions = ["is there a blue shape?", "is there a red shape?", "is there not a blue shape?",
                 "does the image not contain a red shape?", "is there a circle?", "what color is the shape?"]
    answers = ["yes", "no", "no", "yes", "yes", "blue"]  # image 0: a blue circle
    records = easyvqa.split_records("train", questions, answers, [0] * len(questions))
    demo = easyvqa.demo_records(records)
    repeated = [r["id"] for r in records if easyvqa.names_present_colour(r)]
    assert repeated == ["train-0-0", "train-0-2"]  # "blue" asked of the blue picture, negated or not; never a shape
    assert len(demo) == len(records) + 2 * (easyvqa.COLOUR_MATCH_REPEATS - 1)
    assert [r["id"] for r in demo[:3]] == ["train-0-0", "train-0-0-r1", "train-0-0-r2"]
    assert demo[1]["conversations"] == records[0]["conversations"]
    assert len({r["id"] for r in demo}) == len(demo)
    good, _ = llava.validate(demo, "", check_images="none")
    assert len(good) == len(demo)
