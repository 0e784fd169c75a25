"""
Tests for serve.py's OpenAI-compatible API: text, images, speech, streaming, errors, auth and load, through
Flask's test client and through the official `openai` client against a live server on 127.0.0.1. Models are
tiny random ones (a tiny Phi, and a tiny CLIP tower + projector for images); speech uses the real Whisper
tiny.en on espeak-ng audio. The helpers here (ScriptedChat, live_server, ...) are shared with the browser tests.
"""

import base64
import http.client
import io
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import wave
import zlib
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from werkzeug.test import EnvironBuilder

import serve
from serve import ServeConfig, create_app
from tokenizer import IMAGE_TOKEN_ID, Tokenizer, encode_chat, speech_text

WHISPER_PATH = Path(__file__).resolve().parents[1].parent / "shared/models/whisper-tiny.en.pt"
API_KEY = "test-key"
SPOKEN = "What color is the sky?"


# -----------------------------------------------------------------------------
# shared helpers

class ScriptedChat:
    """A stand-in with ChatModel's interface whose answer is fixed (or computed from the request), streamed a
    word at a time; it records every call and whether its stream was closed. Speech uses the real Whisper."""

    def __init__(self, answer, *, vision=True, whisper=WHISPER_PATH, delay=0.0, context=2048):
        self.answer, self.delay, self.context = answer, delay, context
        self.tokenizer = Tokenizer()
        self.vision = object() if vision else None
        self.whisper = str(whisper) if whisper else None
        self.calls, self.closed = [], threading.Event()

    def transcribe(self, audio):
        from audio import transcribe
        return transcribe(audio, model=self.whisper)

    def stream(self, messages, images=(), *, max_tokens=256, usage=None, **options):
        self.calls.append({"messages": messages, "images": list(images), "options": options})
        text = self.answer(messages, images) if callable(self.answer) else self.answer
        pieces = re.findall(r"\s*\S+", text)[:max_tokens]
        try:
            for piece in pieces:
                if self.delay:
                    time.sleep(self.delay)
                yield piece
        finally:
            self.closed.set()
        if usage is not None:
            usage.update(prompt_tokens=1, completion_tokens=len(pieces), finish_reason="stop")


@contextmanager
def live_server(app):
    """Serve `app` with werkzeug's threaded server on a free port of 127.0.0.1."""
    from werkzeug.serving import make_server
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)


def speak(text, path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return Path(path)


def wav_bytes(samples, rate=16000):
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data, mime="image/png"):
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_bomb(side=20000):
    """A valid 1-bit PNG of side x side pixels that compresses to ~100 kB."""
    def chunk(kind, payload):
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")
    compressor, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def sse_events(body):
    """The data payloads of an SSE body, the final [DONE] included as the string."""
    events = [line[len("data: "):] for line in body.split("\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def build_tiny_lm(folder, seed=0):
    from model import Phi, PhiConfig
    torch.manual_seed(seed)
    Phi(PhiConfig.from_preset("tiny")).save_pretrained(folder)
    return folder


def build_tiny_mm(folder, lm_folder, seed=0):
    """A multimodal checkpoint folder as generate.ChatModel reads it: tiny CLIP tower, projector, mm_config.json."""
    from clip_encoder import CLIPVision, CLIPVisionConfig
    from projector import build_projector, save_projector
    folder.mkdir(parents=True, exist_ok=True)
    vision = CLIPVision(CLIPVisionConfig.from_preset("tiny"))
    vision.init_weights(seed)
    vision.save_pretrained(folder / "vision")
    torch.manual_seed(seed)
    lm_dim = json.loads((Path(lm_folder) / "config.json").read_text())["hidden_size"]
    projector = build_projector("mlp2x_gelu", vision.config.hidden_size, lm_dim)
    save_projector(projector, folder / "projector.safetensors")
    config = {"lm": str(lm_folder), "vision": "vision", "projector": "mlp2x_gelu", "vision_dim": vision.config.hidden_size,
              "lm_dim": lm_dim, "feature_layer": -2, "pad_to_square": False}
    (folder / "mm_config.json").write_text(json.dumps(config))
    return folder


def chat_body(content="Hello there", **extra):
    return {"model": "omniphi", "messages": [{"role": "user", "content": content}], "max_tokens": 6, "seed": 1, **extra}


# -----------------------------------------------------------------------------
# fixtures: one tiny model, one app, one live server per module

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("serve") / "lm")


@pytest.fixture(scope="module")
def chat(lm_dir):
    from multimodal import ChatModel
    return ChatModel(str(lm_dir), whisper=str(WHISPER_PATH))


@pytest.fixture(scope="module")
def app(chat):
    return create_app(chat, ServeConfig(max_queue=4, max_audio_seconds=10))


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def live(chat):
    app = create_app(chat, ServeConfig(max_queue=4, api_key=API_KEY))
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def mm_chat(lm_dir, tmp_path_factory):
    pytest.importorskip("projector", reason="projector.py is not there yet")
    from multimodal import ChatModel
    mm = build_tiny_mm(tmp_path_factory.mktemp("serve-mm") / "mm", lm_dir)
    return ChatModel(None, mm=str(mm), whisper=str(WHISPER_PATH))


@pytest.fixture(scope="module")
def mm_client(mm_chat):
    return create_app(mm_chat, ServeConfig(max_images=3)).test_client()


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    if not WHISPER_PATH.is_file():
        pytest.skip(f"real Whisper weights not found at {WHISPER_PATH}")
    return speak(SPOKEN, tmp_path_factory.mktemp("speech") / "speech.wav")


def assert_good_request_works(client):
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.json["choices"][0]["message"]["role"] == "assistant"


def assert_error(response, status, *, code=None, match=None):
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if match is not None:
        assert re.search(match, error["message"]), error["message"]
    return error


# -----------------------------------------------------------------------------
# text

def test_health_and_models_report_capabilities(client):
    health = client.get("/health").json
    assert health["status"] == "ok"
    caps = health["capabilities"]
    assert caps["images"] is False and "vision tower" in caps["images_reason"]
    assert caps["speech"] is (WHISPER_PATH.is_file()) and caps["speech_reason"]
    assert health["limits"]["context"] == 256 and health["queue"] == {"active": 0, "max": 4}
    models = client.get("/v1/models").json
    assert models["object"] == "list" and models["data"][0]["capabilities"] == caps


def test_completion_equals_chat_model_and_counts_usage(client, chat):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 7, "seed": 5, "temperature": 0.8})
    assert r.status_code == 200
    body = r.json
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    expected_usage = {}
    expected = chat.reply(messages, max_tokens=7, seed=5, temperature=0.8, usage=expected_usage)
    assert body["choices"][0]["message"]["content"] == expected
    assert body["choices"][0]["finish_reason"] == expected_usage["finish_reason"]
    n_prompt = len(encode_chat(chat.tokenizer, messages)[0])
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": expected_usage["completion_tokens"],
                             "total_tokens": n_prompt + expected_usage["completion_tokens"]}
    assert body["transcripts"] == []


def test_content_parts_equal_string_content(client):
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    a = client.post("/v1/chat/completions", json=chat_body(parts)).json
    b = client.post("/v1/chat/completions", json=chat_body("Hello\nthere")).json
    assert a["choices"][0]["message"] == b["choices"][0]["message"] and a["usage"] == b["usage"]


def test_streaming_sends_the_same_answer_in_chunks(client):
    full = client.post("/v1/chat/completions", json=chat_body(max_tokens=12)).json
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=12, stream=True,
                                                           stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = sse_events(r.get_data(as_text=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[0]["transcripts"] == []
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) > 1
    assert chunks[-2]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_stop_strings_cut_the_answer(client):
    full = client.post("/v1/chat/completions", json=chat_body(max_tokens=20)).json["choices"][0]["message"]["content"]
    words = full.split()
    stop = words[len(words) // 2]
    cut = client.post("/v1/chat/completions", json=chat_body(max_tokens=20, stop=[stop, "zzzz"])).json
    assert cut["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_seed_makes_answers_repeatable(client):
    body = chat_body(max_tokens=10, temperature=1.0, top_p=0.9)
    answers = {client.post("/v1/chat/completions", json=body).json["choices"][0]["message"]["content"] for _ in range(2)}
    assert len(answers) == 1


def test_a_closed_stream_frees_the_chat_model(chat):
    pieces = chat.stream([{"role": "user", "content": "Count to a hundred."}], max_tokens=100, temperature=1.0)
    next(pieces)
    assert chat.lock.locked()
    pieces.close()
    assert not chat.lock.locked()
    assert all(block.self_attn.kv_cache is None for block in chat.model.model.layers)


# -----------------------------------------------------------------------------
# bad input: 4xx with a clear message, and the server keeps answering

BAD_REQUESTS = [
    ("malformed JSON", dict(data=b'{"messages": [', content_type="application/json"), 400, "invalid_json"),
    ("not JSON content type", dict(data=b"hello", content_type="text/plain"), 415, "unsupported_media_type"),
    ("form upload", dict(data={"file": (io.BytesIO(b"x"), "x.bin")}, content_type="multipart/form-data"), 415, None),
    ("JSON array", dict(json=[1, 2]), 400, None),
    ("no messages", dict(json={"model": "omniphi"}), 400, None),
    ("empty messages", dict(json={"messages": []}), 400, None),
    ("unknown role", dict(json={"messages": [{"role": "tool", "content": "x"}]}), 400, None),
    ("message not an object", dict(json={"messages": ["hi"]}), 400, None),
    ("content a number", dict(json={"messages": [{"role": "user", "content": 5}]}), 400, None),
    ("unknown part type", dict(json={"messages": [{"role": "user", "content": [{"type": "video"}]}]}), 400, None),
    ("text part not text", dict(json={"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}), 400, None),
    ("last message not user", dict(json={"messages": [{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": "b"}]}), 400, None),
    ("system not first", dict(json={"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                                 {"role": "user", "content": "c"}]}), 400, None),
    ("negative max_tokens", dict(json=chat_body(max_tokens=-1)), 400, None),
    ("string max_tokens", dict(json=chat_body(max_tokens="10")), 400, None),
    ("temperature too high", dict(json=chat_body(temperature=7)), 400, None),
    ("top_p zero", dict(json=chat_body(top_p=0)), 400, None),
    ("five stop strings", dict(json=chat_body(stop=["a", "b", "c", "d", "e"])), 400, None),
    ("n=2", dict(json=chat_body(n=2)), 400, None),
    ("stream not bool", dict(json=chat_body(stream="yes")), 400, None),
    ("image to a text model", dict(json=chat_body([{"type": "image_url", "image_url": {"url": data_uri(b"x")}}])),
     400, "images_unsupported"),
    ("prompt longer than the context", dict(json=chat_body("word " * 400)), 400, "context_length_exceeded"),
    ("audio not base64", dict(json=chat_body([{"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}])),
     400, None),
    ("audio format unknown", dict(json=chat_body([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "midi"}}])),
     400, None),
]


@pytest.mark.parametrize("name,request_kwargs,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_a_message(client, name, request_kwargs, status, code):
    assert_error(client.post("/v1/chat/completions", **request_kwargs), status, code=code)
    assert_good_request_works(client)


def test_a_50_mb_body_is_refused_with_413(client):
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * (50 * 2**20) + b'"}]}'
    assert_error(client.post("/v1/chat/completions", data=body, content_type="application/json"), 413,
                 code="request_too_large", match="25 MB")
    assert_good_request_works(client)


def test_unknown_paths_and_methods_are_json_errors(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)
    assert client.get("/").status_code == 200 and b"omniphi" in client.get("/").data
    assert client.get("/static/app.js").status_code == 200
    assert "script-src 'self'" in client.get("/").headers["Content-Security-Policy"]


# -----------------------------------------------------------------------------
# speech

def audio_part(data, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def test_speech_is_transcribed_into_the_user_turn(client, chat, speech_wav):
    r = client.post("/v1/chat/completions", json=chat_body([{"type": "text", "text": "Answer this:"},
                                                            audio_part(speech_wav.read_bytes())]))
    assert r.status_code == 200, r.get_data(as_text=True)
    (heard,) = r.json["transcripts"]
    assert heard["message"] == 0 and heard["part"] == 1
    assert re.sub(r"[^a-z ]", "", heard["text"].lower()).split() == ["what", "color", "is", "the", "sky"]
    user_turn = speech_text(heard["text"], "Answer this:")
    assert r.json["usage"]["prompt_tokens"] == len(encode_chat(chat.tokenizer, [{"role": "user", "content": user_turn}])[0])
    # a transcript sent back for an earlier turn is used as is, without Whisper
    again = client.post("/v1/chat/completions", json=chat_body(
        [{"type": "text", "text": "Answer this:"}, {"type": "input_audio", "input_audio": {"transcript": heard["text"]}}]))
    assert again.json["usage"] == r.json["usage"] and again.json["transcripts"] == [heard]


def test_bad_audio_is_refused(client, speech_wav):
    silence = wav_bytes(np.zeros(16000))
    assert_error(client.post("/v1/chat/completions", json=chat_body([audio_part(silence)])), 400, code="no_speech")
    assert_error(client.post("/v1/chat/completions", json=chat_body([audio_part(b"not audio at all" * 50)])), 400,
                 code="invalid_audio")
    long_noise = wav_bytes(np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 11))
    assert_error(client.post("/v1/chat/completions", json=chat_body([audio_part(long_noise)])), 400,
                 code="audio_too_long", match="10 s")
    assistant_audio = {"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": [audio_part(silence)]},
                                    {"role": "user", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=assistant_audio), 400, match="only allowed in user")
    assert_good_request_works(client)


def test_speech_unavailable_is_reported_and_refused_cleanly(tmp_path):
    app = create_app(ScriptedChat("ok", whisper=tmp_path / "missing.pt"))
    client = app.test_client()
    caps = client.get("/health").json["capabilities"]
    assert caps["speech"] is False and "missing.pt" in caps["speech_reason"]
    assert_error(client.post("/v1/chat/completions", json=chat_body([audio_part(b"RIFF....")])), 400,
                 code="speech_unavailable", match="missing.pt")
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200


# -----------------------------------------------------------------------------
# images

def test_images_become_placeholders_in_order(mm_client, mm_chat):
    from PIL import Image
    red, blue = Image.new("RGB", (40, 30), (220, 20, 20)), Image.new("RGB", (30, 40), (20, 20, 220))
    content = [{"type": "image_url", "image_url": {"url": data_uri(png_bytes(red))}}, {"type": "text", "text": "and"},
               {"type": "image_url", "image_url": {"url": data_uri(png_bytes(blue))}}, {"type": "text", "text": "differ?"}]
    r = mm_client.post("/v1/chat/completions", json=chat_body(content, max_tokens=8))
    assert r.status_code == 200, r.get_data(as_text=True)
    usage = {}
    expected = mm_chat.reply([{"role": "user", "content": "<image>\nand\n<image>\ndiffer?"}], [red, blue], max_tokens=8,
                             seed=1, temperature=0.7, usage=usage)
    assert r.json["choices"][0]["message"]["content"] == expected
    assert r.json["usage"]["prompt_tokens"] == usage["prompt_tokens"]
    ids, _ = encode_chat(mm_chat.tokenizer, [{"role": "user", "content": "<image>\nand\n<image>\ndiffer?"}])
    n_text = sum(i != IMAGE_TOKEN_ID for i in ids)
    assert usage["prompt_tokens"] == n_text + 2 * mm_chat.vision.config.num_patches
    swapped = [content[2], content[1], content[0], content[3]]
    other = mm_client.post("/v1/chat/completions", json=chat_body(swapped, max_tokens=8)).json
    assert other["choices"][0]["message"]["content"] == mm_chat.reply(
        [{"role": "user", "content": "<image>\nand\n<image>\ndiffer?"}], [blue, red], max_tokens=8, seed=1, temperature=0.7)


def test_typed_image_placeholder_is_plain_text(mm_client):
    assert mm_client.post("/v1/chat/completions", json=chat_body("what is <image> here")).status_code == 200


def test_bad_images_are_refused(mm_client):
    from PIL import Image
    image = lambda url: [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]
    post = lambda content: mm_client.post("/v1/chat/completions", json=chat_body(content))
    assert_error(post(image(data_uri(png_bomb()))), 413, code="image_too_large", match="pixels")
    assert_error(post(image(data_uri(b"GIF89a but not really an image" * 10))), 400, code="invalid_image")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert_error(post(image(data_uri(png_bytes(noise)[:2000]))), 400, code="invalid_image")
    assert_error(post(image("data:image/png,rawbytes")), 400, match="base64")
    assert_error(post(image("https://example.com/cat.png")), 400, code="remote_images_disabled")
    assert_error(post(image("file:///etc/passwd")), 400, match="scheme")
    many = [{"type": "image_url", "image_url": {"url": data_uri(png_bytes(Image.new("RGB", (8, 8))))}}] * 4
    assert_error(post(many), 400, code="too_many_images")
    assert_good_request_works(mm_client)


def test_remote_images_are_fetched_when_allowed(mm_chat, tmp_path):
    from PIL import Image
    Image.new("RGB", (32, 32), (0, 200, 0)).save(tmp_path / "green.png")
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        client = create_app(mm_chat, ServeConfig(allow_remote_images=True, allow_private_image_hosts=True)).test_client()
        url = f"http://127.0.0.1:{files.server_port}/green.png"
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "colour?"}]
        r = client.post("/v1/chat/completions", json=chat_body(content))
        assert r.status_code == 200, r.get_data(as_text=True)
        missing = [{"type": "image_url", "image_url": {"url": url.replace("green", "nope")}}]
        assert_error(client.post("/v1/chat/completions", json=chat_body(missing)), 400, match="could not fetch")
    finally:
        files.shutdown()


# -----------------------------------------------------------------------------
# auth and startup rules

def test_api_key_is_required_when_set(chat):
    client = create_app(chat, ServeConfig(api_key="sekret")).test_client()
    assert_error(client.post("/v1/chat/completions", json=chat_body()), 401, code="invalid_api_key")
    assert_error(client.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer nope"}), 401)
    assert_error(client.get("/v1/models"), 401)
    ok = client.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200
    assert client.get("/health").json["auth"] is True and client.get("/").status_code == 200


def test_compiled_decoding_gives_the_same_answers(lm_dir, chat, patch_compile):
    patch_compile()  # the captured graph runs as it is; tests/test_model.py runs inductor
    from multimodal import ChatModel
    compiled = ChatModel(str(lm_dir), compile=True)
    assert compiled.compile == "default"
    messages = [{"role": "user", "content": "Name a colour."}]
    for options in (dict(temperature=0), dict(temperature=0.8, seed=3)):
        assert compiled.reply(messages, max_tokens=9, **options) == chat.reply(messages, max_tokens=9, **options)
    with pytest.raises(ValueError, match="NF4"):
        ChatModel(str(lm_dir), compile=True, quantize="nf4")


def test_startup_rules(lm_dir, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="api_key"):
        serve.resolve_defaults(ServeConfig(model=str(lm_dir), host="0.0.0.0"))
    assert serve.resolve_defaults(ServeConfig(model=str(lm_dir), host="0.0.0.0", api_key="k")).host == "0.0.0.0"
    assert serve.resolve_defaults(ServeConfig(model=str(lm_dir), host="::1")).host == "::1"
    monkeypatch.setattr(serve, "DEMO_MM", tmp_path / "mm")
    monkeypatch.setattr(serve, "DEMO_LM", tmp_path / "lm")
    with pytest.raises(SystemExit, match="run.sh"):
        serve.resolve_defaults(ServeConfig())
    build_tiny_lm(tmp_path / "lm")
    assert serve.resolve_defaults(ServeConfig()).model == str(tmp_path / "lm")
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "mm_config.json").write_text("{}")
    cfg = serve.resolve_defaults(ServeConfig())
    assert cfg.mm == str(tmp_path / "mm") and not cfg.model
    from common import parse_config
    cfg = parse_config(ServeConfig, ["--port=9001", "--allow_remote_images", "--max_queue=3"])
    assert (cfg.port, cfg.allow_remote_images, cfg.max_queue) == (9001, True, 3)
    with pytest.raises(ValueError, match="unknown option"):
        parse_config(ServeConfig, ["--modle=x"])


def test_command_line_serves(lm_dir):
    import sys
    import urllib.request
    script = str(Path(serve.__file__))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, script, f"--model={lm_dir}", f"--port={port}", "--whisper=nowhere.pt"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, health = time.time() + 60, None
        while time.time() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.2)
        assert health is not None, process.stdout.read() if process.poll() is not None else "no answer in 60 s"
        assert health["model"] == str(lm_dir) and health["capabilities"]["speech"] is False
        assert "nowhere.pt" in health["capabilities"]["speech_reason"]
    finally:
        process.terminate()
        process.wait(10)


# -----------------------------------------------------------------------------
# live server: the official openai client, disconnects, load

def openai_client(url, key=API_KEY):
    import openai
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_text_and_streaming(live, client):
    import openai
    url, _ = live
    oa = openai_client(url)
    assert [m.id for m in oa.models.list()] == ["omniphi"]
    expected = client.post("/v1/chat/completions", json=chat_body(max_tokens=8, seed=3)).json
    reply = oa.chat.completions.create(model="omniphi", messages=[{"role": "user", "content": "Hello there"}],
                                       max_tokens=8, seed=3, temperature=0.7)
    assert reply.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert reply.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    stream = oa.chat.completions.create(model="omniphi", messages=[{"role": "user", "content": "Hello there"}],
                                        max_completion_tokens=8, seed=3, temperature=0.7, stream=True,
                                        stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="unknown role|not supported"):
        oa.chat.completions.create(model="omniphi", messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai_client(url, key="wrong").chat.completions.create(model="omniphi", messages=[{"role": "user", "content": "x"}])


def test_openai_client_speech_streaming_returns_the_transcript(live, speech_wav):
    url, _ = live
    data = base64.b64encode(speech_wav.read_bytes()).decode()
    stream = openai_client(url).chat.completions.create(
        model="omniphi", max_tokens=4, stream=True,
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}])
    first = next(iter(stream))
    assert "sky" in first.transcripts[0]["text"].lower()
    stream.close()


def wait_until_idle(app, timeout=10):
    """True once no request holds a place in the queue (a response is closed just after its last byte is sent)."""
    admission, deadline = app.extensions["omniphi"]["admission"], time.time() + timeout
    while admission.active and time.time() < deadline:
        time.sleep(0.02)
    return admission.active == 0


def raw_request(url, body, *, headers=None, timeout=60):
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = json.dumps(body).encode()
    connection.request("POST", "/v1/chat/completions", body=data,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}", **(headers or {})})
    return connection, connection.getresponse()


def test_live_server_survives_bad_requests(live):
    url, _ = live
    host, port = url.removeprefix("http://").split(":")
    for payload, headers, status in [
        (b'{"messages": [', {"Content-Type": "application/json"}, 400),
        (b"\xff\xfe garbage", {"Content-Type": "application/octet-stream"}, 415),
    ]:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("POST", "/v1/chat/completions", body=payload,
                           headers={**headers, "Authorization": f"Bearer {API_KEY}"})
        response = connection.getresponse()
        assert response.status == status and "error" in json.loads(response.read())
        connection.close()
    # a body announced as 50 MB is refused before it is sent
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 52428800\r\n\r\n")
        reply = s.recv(4096).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413")
    connection, response = raw_request(url, chat_body())
    assert response.status == 200
    connection.close()


def test_a_client_that_disconnects_frees_the_model():
    chat = ScriptedChat("word " * 5000, delay=0.005, whisper=None)
    app = create_app(chat, ServeConfig(max_queue=1))
    with live_server(app) as url:
        connection, response = raw_request(url, chat_body(max_tokens=5000, stream=True), headers={"Authorization": ""})
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # the stream is flowing
        response.close()
        connection.close()
        assert chat.closed.wait(10), "the answer generator was not closed after the client left"
        assert wait_until_idle(app)
        connection, response = raw_request(url, chat_body(max_tokens=3))  # the single slot is free again
        assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] == 3


def test_a_stream_the_server_drops_without_closing_frees_the_model():
    # werkzeug skips the WSGI close() when a client resets the connection at the wrong moment; the model and the
    # queue place must come back anyway once the dropped stream is gone
    chat = ScriptedChat("word " * 50, whisper=None)
    app = create_app(chat, ServeConfig(max_queue=1))
    environ = EnvironBuilder(path="/v1/chat/completions", method="POST",
                             json=chat_body(max_tokens=50, stream=True)).get_environ()
    body = app(environ, lambda status, headers, exc_info=None: None)
    assert next(iter(body)).startswith(b"data: ")
    assert app.extensions["omniphi"]["admission"].active == 1
    del body  # dropped mid-stream, never closed
    assert chat.closed.is_set() and app.extensions["omniphi"]["admission"].active == 0


def test_a_full_queue_answers_429_at_once():
    chat = ScriptedChat("word " * 200, delay=0.005, whisper=None)
    app = create_app(chat, ServeConfig(max_queue=2))
    with live_server(app) as url:
        held = [raw_request(url, chat_body(max_tokens=200, stream=True)) for _ in range(2)]
        assert all(response.status == 200 for _, response in held)
        start = time.perf_counter()
        connection, response = raw_request(url, chat_body())
        assert response.status == 429 and time.perf_counter() - start < 2
        assert json.loads(response.read())["error"]["type"] == "rate_limit_error"
        assert app.test_client().get("/health").json["queue"] == {"active": 2, "max": 2}
        for connection, response in held:
            assert response.read().decode().rstrip().endswith("data: [DONE]")
            connection.close()
        assert wait_until_idle(app)
        connection, response = raw_request(url, chat_body())
        assert response.status == 200


def test_concurrent_streaming_clients_all_finish_or_get_429(live):
    psutil = pytest.importorskip("psutil")
    url, app = live

    def one_client(results, barrier):
        barrier.wait()
        try:
            connection, response = raw_request(url, chat_body(max_tokens=16, stream=True, temperature=1.0), timeout=60)
            body = response.read().decode()
            results.append((response.status, body))
            connection.close()
        except Exception as err:  # a timeout or a reset is a failure of the test
            results.append((None, repr(err)))

    def round_of(n=20):
        assert wait_until_idle(app)  # the last round's places are given back just after their last bytes
        results, barrier = [], threading.Barrier(n)
        threads = [threading.Thread(target=one_client, args=(results, barrier)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "a request hung"
        return results

    process = psutil.Process()
    rss = []
    for _ in range(3):
        results = round_of()
        rss.append(process.memory_info().rss)
        statuses = [status for status, _ in results]
        assert len(results) == 20 and set(statuses) <= {200, 429}, [r for r in results if r[0] not in (200, 429)]
        assert statuses.count(200) >= 4
        for status, body in results:
            if status == 200:
                assert body.rstrip().endswith("data: [DONE]")
            else:
                assert json.loads(body)["error"]["code"] == "server_busy"
    assert rss[2] - rss[0] < 64 * 2**20, f"RSS grew by {(rss[2] - rss[0]) / 2**20:.0f} MB over two rounds"
    assert wait_until_idle(app)
