"""
Tests of serve.py's defences and of the OpenAI features chat front-ends rely on. Defences: bad JSON, costly work only
after a request has its place in the queue, limits on audio, work stopped for a client that left, transcripts
treated as typed text, safe remote images, bounded image memory, Host headers, /health, connections. Features:
stream_options.include_usage, max_completion_tokens, seed, response_format, unknown fields, and
/v1/audio/transcriptions through the official openai client. Models are the tiny random ones of test_serve_api.py
(and its scripted stand-in); speech uses the real Whisper tiny.en on espeak-ng audio.
"""

import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pytest
import torch
from PIL import Image

import chat_api
import serve
from serve import ServeConfig, create_app
from test_serve_api import (API_KEY, WHISPER_PATH, ScriptedChat, assert_error, assert_good_request_works, audio_part,
                            build_tiny_mm, chat_body, data_uri, live_server, openai_client, png_bytes, raw_request,
                            speak, sse_events, wait_until_idle, wav_bytes)
from test_serve_api import chat, lm_dir, mm_chat, one_torch_thread, speech_wav  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def client(chat):
    return create_app(chat, ServeConfig(max_queue=4, max_audio_seconds=10)).test_client()


def post(client, body, **kwargs):
    return client.post("/v1/chat/completions", json=body, **kwargs)


def counting(monkeypatch, obj, name):
    """Replace obj.name by a wrapper that counts its calls; returns the list of calls."""
    calls, real = [], getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(obj, name, wrapper)
    return calls


def image_part(data):
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


# -----------------------------------------------------------------------------
# bodies

def test_deeply_nested_json_is_a_400(client):
    # (how deep Python's parser gets depends on the stack under it: past 1,000 levels it never does)
    for body in ["[" * 100_000 + "]" * 100_000,
                 '{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + "[" * 5000 + "]" * 5000 + "}",
                 '{"messages": [{"role": "user", "content": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}]}"]:
        r = client.post("/v1/chat/completions", data=body, content_type="application/json")
        assert_error(r, 400, code="invalid_json")
    deep = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "[" * 200 + "]" * 200 + "}"
    error = assert_error(client.post("/v1/chat/completions", data=deep, content_type="application/json"), 400)
    assert "max_tokens" in error["message"] and len(error["message"]) < 120
    assert_good_request_works(client)


def test_a_chunked_body_over_the_limit_is_a_413(chat):
    with live_server(create_app(chat, ServeConfig(max_body_mb=1))) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            piece = b'{"messages": [{"role": "user", "content": "' + b"a" * 65536
            try:
                for _ in range(20):  # 1.25 MB in all
                    s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                    piece = b"a" * 65536
            except OSError:  # the server may answer and close before the body is all sent
                pass
            reply = b""
            while b"request_too_large" not in reply and (data := s.recv(65536)):
                reply += data
    reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert '"request_too_large"' in reply


@pytest.mark.parametrize("n", [True, 1.0, "1", 2, 0])
def test_n_must_be_the_integer_1(client, n):
    assert_error(post(client, chat_body(n=n)), 400)


def test_n_of_1_or_null_is_fine(client):
    assert post(client, chat_body(n=1)).status_code == 200 and post(client, chat_body(n=None)).status_code == 200


# -----------------------------------------------------------------------------
# counting before the queue, costly work after it

def test_a_full_queue_answers_at_once_even_huge_requests(monkeypatch):
    chat = ScriptedChat("word " * 5000, delay=0.01, whisper=None)  # 50 s of answer holds the one place
    encodes = counting(monkeypatch, chat.tokenizer, "encode")
    decodes = counting(monkeypatch, chat_api.base64, "b64decode")
    app = create_app(chat, ServeConfig(max_queue=1))
    with live_server(app) as url:
        held = raw_request(url, chat_body(max_tokens=5000, stream=True))
        assert held[1].status == 200 and held[1].readline().startswith(b"data: ")
        n_encodes, n_decodes = len(encodes), len(decodes)
        huge = [(chat_body("lorem ipsum " * 700_000), 400, "context_length_exceeded"),  # 8.4 MB: cannot fit at all
                (chat_body("lorem ipsum " * 20_000), 429, "server_busy"),  # 240 kB: might fit, so it waits its turn
                (chat_body([image_part(np.random.default_rng(0).bytes(6 * 2**20)), {"type": "text", "text": "?"}]),
                 429, "server_busy")]  # 8 MB of base64
        results = []

        def one(body, status, code):
            start = time.perf_counter()
            connection, response = raw_request(url, body)
            results.append((response.status, status, json.loads(response.read())["error"]["code"], code,
                            time.perf_counter() - start))
            connection.close()
        threads = [threading.Thread(target=one, args=huge[k % 3]) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 6 and all(got == want and code == want_code
                                          for got, want, code, want_code, _ in results), results
        assert max(seconds for *_, seconds in results) < 10  # generous: it is parsing JSON, nothing else
        assert (len(encodes), len(decodes)) == (n_encodes, n_decodes), "a refused request was tokenized or decoded"
        held[1].close()
        held[0].close()
        assert chat.closed.wait(10) and wait_until_idle(app)


def test_prompts_too_long_to_fit_are_refused_without_tokenizing(client, chat, monkeypatch):
    encodes = counting(monkeypatch, chat.tokenizer, "encode")
    for content in ["word " * 200_000,
                    [{"type": "text", "text": ""}] * 300,  # more parts than the 256-token context
                    [{"type": "input_audio", "input_audio": {"transcript": "word " * 200_000}}]]:
        assert_error(post(client, chat_body(content)), 400, code="context_length_exceeded")
    assert encodes == []
    assert_error(post(client, chat_body("word " * 300)), 400, code="context_length_exceeded")  # counted after all
    assert encodes


def test_a_transcript_is_treated_like_typed_text(mm_chat):
    scripted = ScriptedChat("ok", whisper=None)
    said = [{"type": "input_audio", "input_audio": {"transcript": "look <image> here"}}]
    r = post(create_app(scripted).test_client(), chat_body(said))
    assert r.status_code == 200 and r.json["transcripts"][0]["text"] == "look <image> here"
    assert scripted.calls[-1]["messages"][-1]["content"] == "(spoken) look <image > here"
    assert post(create_app(mm_chat).test_client(), chat_body(said)).status_code == 200  # no image slot opened


# -----------------------------------------------------------------------------
# audio

def test_audio_is_limited_per_request_in_seconds_and_parts(client):
    noise = wav_bytes(np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 6))
    # 6 s + 6 s is over the request's 10 s: refused before Whisper runs (noise would be "no_speech" there)
    assert_error(post(client, chat_body([audio_part(noise), audio_part(noise)])), 400, code="audio_too_long",
                 match="10 s")
    blip = wav_bytes(np.zeros(1600))
    app = create_app(client.application.extensions["omniphi"]["chat"], ServeConfig(max_audio_parts=2))
    assert_error(post(app.test_client(), chat_body([audio_part(blip)] * 3)), 400, code="too_many_audio_parts")
    said = [{"type": "input_audio", "input_audio": {"transcript": f"part {k}"}} for k in range(5)]
    assert post(app.test_client(), chat_body(said)).status_code == 200  # transcripts are text, not audio to decode


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory):
    if not WHISPER_PATH.is_file():
        pytest.skip(f"real Whisper weights not found at {WHISPER_PATH}")
    text = ("The quick brown fox jumps over the lazy dog while the weather stays calm and bright. " * 4).strip()
    return speak(text, tmp_path_factory.mktemp("long") / "long.wav")


class WatchedChat(ScriptedChat):
    """ScriptedChat whose transcribe says when it starts and how it ended."""

    def __init__(self):
        super().__init__("ok")
        self.started, self.ended, self.outcome = threading.Event(), threading.Event(), None

    def transcribe(self, audio):
        self.started.set()
        try:
            self.outcome = super().transcribe(audio)
        except BaseException as err:
            self.outcome = err
            raise
        finally:
            self.ended.set()
        return self.outcome


def test_transcription_stops_when_the_client_leaves(long_speech):
    chat = WatchedChat()
    app = create_app(chat, ServeConfig(max_queue=1))
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps(chat_body([audio_part(long_speech.read_bytes())])).encode()
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert chat.started.wait(30), "transcription never started"
        s.close()
        assert chat.ended.wait(30)
        assert isinstance(chat.outcome, Exception) and "closed" in str(chat.outcome), f"Whisper ran on: {chat.outcome!r}"
        assert wait_until_idle(app) and chat.calls == []  # and no answer was generated


# -----------------------------------------------------------------------------
# remote images

GREEN = png_bytes(Image.new("RGB", (32, 32), (0, 200, 0)))


class ImageHandler(BaseHTTPRequestHandler):
    """/green.png; /to/URL redirects there; /drip sends its body a byte at a time, /drip-head its headers."""

    def do_GET(self):
        self.server.hits.append((self.path, self.headers.get("Host")))
        try:
            if self.path.startswith("/to/"):
                self.send_response(302)
                self.send_header("Location", unquote(self.path[4:]))
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/green.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(GREEN)))
                self.end_headers()
                self.wfile.write(GREEN)
            elif self.path in ("/drip", "/drip-head"):
                head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n" + b"X-Pad: x\r\n" * 50 + b"\r\n"
                body = head if self.path == "/drip-head" else b""
                if self.path == "/drip":
                    self.wfile.write(head)
                    body = GREEN[:1000]
                for k in range(len(body)):
                    self.wfile.write(body[k:k + 1])
                    self.wfile.flush()
                    time.sleep(0.1)
            else:
                self.send_error(404)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    server.hits, server.daemon_threads = [], True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def fetch(client, url):
    return post(client, chat_body([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]))


def refused(response, url):
    error = assert_error(response, 400, code="image_fetch_failed")
    assert error["message"] == f"messages[0].content[0]: could not fetch the image at {url[:200]}"


def test_private_addresses_are_refused(mm_chat, image_server):
    client = create_app(mm_chat, ServeConfig(allow_remote_images=True)).test_client()
    port = image_server.server_port
    image_server.hits.clear()
    for host in ["127.0.0.1", "127.0.0.2", "0x7f000001", "2130706433", "localhost", "[::1]", "0.0.0.0", "10.1.2.3",
                 "192.168.0.1", "169.254.169.254", "[fe80::1]", "224.0.0.1", "[::ffff:127.0.0.1]"]:
        url = f"http://{host}:{port}/green.png"
        refused(fetch(client, url), url)
    assert image_server.hits == []  # not one connection was made
    allowed = create_app(mm_chat, ServeConfig(allow_remote_images=True, allow_private_image_hosts=True)).test_client()
    assert fetch(allowed, f"http://127.0.0.1:{port}/green.png").status_code == 200
    url = f"http://169.254.169.254:{port}/green.png"
    refused(fetch(allowed, url), url)  # link-local (cloud metadata) stays refused


def test_redirects_are_checked_at_every_hop(mm_chat, image_server, monkeypatch):
    real = chat_api.address_allowed
    # 127.0.0.1 stands for a public host here; every other address is judged as the server judges it
    monkeypatch.setattr(chat_api, "address_allowed", lambda ip, private: str(ip) == "127.0.0.1" or real(ip, private))
    client = create_app(mm_chat, ServeConfig(allow_remote_images=True)).test_client()
    base = f"http://127.0.0.1:{image_server.server_port}"

    def hops(target, n):
        for _ in range(n):
            target = f"{base}/to/{quote(target, safe='')}"
        return target
    image_server.hits.clear()
    assert fetch(client, hops(f"{base}/green.png", 3)).status_code == 200
    assert len(image_server.hits) == 4
    for target in [f"http://127.0.0.2:{image_server.server_port}/green.png", "http://0x7f000002/green.png",
                   "http://169.254.169.254/latest/meta-data/", "ftp://127.0.0.1/green.png", "file:///etc/passwd",
                   hops(f"{base}/green.png", 4)]:
        image_server.hits.clear()
        url = hops(target, 1)
        refused(fetch(client, url), url)
        assert all(path.startswith("/to/") for path, _ in image_server.hits)


def test_fetch_failures_all_read_the_same(mm_chat, image_server):
    client = create_app(mm_chat, ServeConfig(allow_remote_images=True, allow_private_image_hosts=True)).test_client()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    for url in [f"http://127.0.0.1:{image_server.server_port}/missing.png", f"http://127.0.0.1:{closed_port}/x.png",
                "http://no-such-host.invalid/x.png", f"https://127.0.0.1:{image_server.server_port}/green.png"]:
        refused(fetch(client, url), url)  # no errno, no reason: nothing to scan ports with


def test_a_dripping_server_meets_one_deadline(mm_chat, image_server, monkeypatch):
    monkeypatch.setattr(chat_api, "FETCH_SECONDS", 1.0)
    client = create_app(mm_chat, ServeConfig(allow_remote_images=True, allow_private_image_hosts=True)).test_client()
    for path in ["/drip", "/drip-head"]:  # 100 s of drip either way, one byte every 0.1 s
        url = f"http://127.0.0.1:{image_server.server_port}{path}"
        start = time.perf_counter()
        refused(fetch(client, url), url)
        assert time.perf_counter() - start < 5


def test_a_host_is_resolved_once_and_the_checked_address_used(mm_chat, image_server, monkeypatch):
    real, lookups = socket.getaddrinfo, []

    def rebinding(host, *args, **kwargs):  # the first answer is loopback, later ones another address
        if host != "images.test":
            return real(host, *args, **kwargs)
        lookups.append(host)
        address = "127.0.0.1" if len(lookups) == 1 else "203.0.113.7"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, args[0]))]
    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    client = create_app(mm_chat, ServeConfig(allow_remote_images=True, allow_private_image_hosts=True)).test_client()
    image_server.hits.clear()
    url = f"http://images.test:{image_server.server_port}/green.png"
    assert fetch(client, url).status_code == 200
    assert lookups == ["images.test"] and image_server.hits == [("/green.png", f"images.test:{image_server.server_port}")]
    lookups.clear()
    refused(fetch(create_app(mm_chat, ServeConfig(allow_remote_images=True)).test_client(), url), url)


# -----------------------------------------------------------------------------
# images: counted before decoding, one at a time, cut down at once

def test_images_are_counted_before_any_is_decoded(mm_chat, monkeypatch):
    import clip_encoder
    loads = counting(monkeypatch, clip_encoder, "load_image")
    client = create_app(mm_chat, ServeConfig(max_images=20, max_request_pixels=10_000_000)).test_client()
    small = png_bytes(Image.new("RGB", (40, 30), "red"))
    n_fit = (mm_chat.context - 1) // mm_chat.mm.image_tokens
    assert_error(post(client, chat_body([image_part(small)] * (n_fit + 1))), 400, code="context_length_exceeded")
    assert_error(post(client, chat_body([image_part(small)] * n_fit + [{"type": "text", "text": "word " * 40}])),
                 400, code="context_length_exceeded")  # counted with the text's tokens, still before decoding
    big = png_bytes(Image.new("RGB", (2000, 2000), "red"))
    assert_error(post(client, chat_body([image_part(big)] * 3)), 413, code="image_too_large", match="together")
    assert loads == []
    assert post(client, chat_body([image_part(small)] * 2)).status_code == 200 and len(loads) == 2


@pytest.mark.parametrize("edge,crop", [(32, 32), (40, 32), (336, 336)])
@pytest.mark.parametrize("pad", [False, True])
def test_cutting_an_image_down_leaves_preprocessing_unchanged(edge, crop, pad):
    from clip_encoder import ImageProcessorConfig, preprocess
    processor = ImageProcessorConfig(crop_size=crop, shortest_edge=edge)
    rng = np.random.default_rng(edge + pad)
    for w, h in [(1000, 750), (751, 1003), (640, 640), (33, 500), (edge, edge + 1), (3, 2)]:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        small = serve.reduce_image(image, processor, pad)
        assert small.width * small.height <= (edge + 1) ** 2  # what the tower sees, and a pixel more at most
        assert torch.equal(preprocess([small], processor, pad), preprocess([image], processor, pad)), (w, h)


def test_a_big_image_gets_the_same_answer(mm_chat):
    from skimage import data
    photo = Image.fromarray(data.chelsea()).resize((1800, 1200))
    client = create_app(mm_chat).test_client()
    r = post(client, chat_body([image_part(png_bytes(photo)), {"type": "text", "text": "what is it?"}], max_tokens=8))
    assert r.status_code == 200, r.get_data(as_text=True)
    expected = mm_chat.reply([{"role": "user", "content": "<image>\nwhat is it?"}], [photo], max_tokens=8, seed=1,
                             temperature=0.7)
    assert r.json["choices"][0]["message"]["content"] == expected


def memory_mb(pid, field):
    return int(re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def test_image_memory_stays_bounded_and_comes_back(lm_dir, tmp_path):
    import urllib.request

    mm = build_tiny_mm(tmp_path / "mm", lm_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"--mm={mm}", f"--port={port}",
                                "--whisper=nowhere.pt", "--max_request_pixels=300000000"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def ask(images):
        body = json.dumps(chat_body([image_part(d) for d in images] + [{"type": "text", "text": "?"}])).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={
                "Content-Type": "application/json"}), timeout=120) as r:
            return r.status
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        ramp = np.linspace(0, 255, 4000, dtype=np.uint8)
        big = png_bytes(Image.fromarray(np.stack([np.tile(ramp, (4000, 1)), np.tile(ramp[:, None], (1, 4000)),
                                                  np.full((4000, 4000), 90, np.uint8)], axis=-1)))
        assert ask([big]) == 200  # warm: the first big image sizes the allocator's pools
        baseline = memory_mb(process.pid, "VmRSS")
        Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # VmHWM starts again from here
        assert ask([big] * 12) == 200  # 12 images of 4000x4000: 576 MB decoded, were they all held at once
        peak, after = memory_mb(process.pid, "VmHWM") - baseline, memory_mb(process.pid, "VmRSS") - baseline
        assert peak < 300, f"the request's peak was {peak:.0f} MB over the baseline"
        assert after < 100, f"{after:.0f} MB were still held after the request"
    finally:
        process.terminate()
        process.wait(10)


# -----------------------------------------------------------------------------
# hosts, /health, connections

@pytest.mark.parametrize("host,status", [("evil.example", 421), ("evil.example:8000", 421), ("127.0.0.1.nip.io", 421),
                                         ("localhost", 200), ("LOCALHOST:8000", 200), ("127.0.0.1:8000", 200),
                                         ("127.9.9.9", 200), ("[::1]:8000", 200)])
def test_a_loopback_server_answers_only_to_loopback_host_names(host, status):
    client = create_app(ScriptedChat("ok", whisper=None)).test_client()
    assert client.get("/health", headers={"Host": host}).status_code == status
    assert post(client, chat_body(), headers={"Host": host}).status_code == status
    wide = create_app(ScriptedChat("ok", whisper=None), ServeConfig(host="0.0.0.0", api_key="k")).test_client()
    assert wide.get("/health", headers={"Host": host}).status_code == 200  # bound beyond loopback: the key guards it


def test_health_without_the_key_says_only_that_it_is_alive(chat, lm_dir):
    client = create_app(chat, ServeConfig(api_key="k", model=str(lm_dir))).test_client()
    r = client.get("/health")
    assert r.status_code == 200 and r.json == {"status": "ok", "auth": True}
    full = client.get("/health", headers={"Authorization": "Bearer k"}).json
    assert full["model"] == str(lm_dir) and "capabilities" in full and "limits" in full


def test_connections_are_capped_and_idle_ones_time_out():
    app = create_app(ScriptedChat("ok", whisper=None))
    server = serve.make_server(app, ServeConfig(port=0, max_connections=4, connection_timeout=1.0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", server.server_port), timeout=10) for _ in range(10)]
        time.sleep(0.5)
        assert threading.active_count() - before <= 4
        replies = [s.recv(200) for s in idle]  # at once for the refused, after the timeout for the others
        assert sum(r.startswith(b"HTTP/1.1 503") for r in replies) == 6 and replies.count(b"") == 4
        for s in idle:
            s.close()
        connection, response = raw_request(f"http://127.0.0.1:{server.server_port}", chat_body())
        assert response.status == 200
        connection.close()
    finally:
        server.shutdown()
        server.server_close()


# -----------------------------------------------------------------------------
# the API features chat front-ends rely on

def test_stream_usage_comes_last_and_is_right(client):
    full = post(client, chat_body(max_tokens=9)).json
    events = sse_events(post(client, chat_body(max_tokens=9, stream=True, stream_options={"include_usage": True}))
                        .get_data(as_text=True))
    *chunks, last, done = events
    assert done == "[DONE]" and last["choices"] == [] and last["usage"] == full["usage"]
    assert all(c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full["choices"][0]["message"]["content"]
    plain = sse_events(post(client, chat_body(max_tokens=9, stream=True)).get_data(as_text=True))
    assert all("usage" not in c for c in plain[:-1])
    assert_error(post(client, chat_body(stream=True, stream_options={"include_usage": "yes"})), 400)


def test_max_completion_tokens_is_max_tokens(client):
    usage = lambda body: post(client, body).json["usage"]["completion_tokens"]  # noqa: E731
    assert usage(chat_body(max_completion_tokens=3, max_tokens=None)) == 3
    assert usage({**chat_body(max_tokens=4), "max_completion_tokens": None}) == 4
    assert usage(chat_body(max_completion_tokens=2, max_tokens=5)) == 2
    assert_error(post(client, chat_body(max_completion_tokens=0)), 400, match="max_completion_tokens")


def test_unknown_fields_are_ignored_and_response_format_is_checked(client):
    extra = {"user": "u1", "metadata": {"a": "b"}, "store": False, "frequency_penalty": 0, "presence_penalty": 0,
             "logit_bias": {}, "parallel_tool_calls": False, "service_tier": "auto", "a_future_field": [1, {"x": 2}]}
    plain = post(client, chat_body(seed=4)).json
    r = post(client, chat_body(seed=4, response_format={"type": "text"}, **extra))
    assert r.status_code == 200 and r.json["choices"] == plain["choices"]
    for fmt in [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}, "json"]:
        assert_error(post(client, chat_body(response_format=fmt)), 400, code="unsupported_response_format")


def test_openai_client_options(chat):
    import openai
    with live_server(create_app(chat, ServeConfig(api_key=API_KEY))) as url:
        oa = openai_client(url)
        ask = dict(model="omniphi", messages=[{"role": "user", "content": "Hello there"}], temperature=1.0)
        one = oa.chat.completions.create(**ask, seed=11, max_completion_tokens=6)
        assert one.usage.completion_tokens == 6
        assert oa.chat.completions.create(**ask, seed=11, max_completion_tokens=6).choices[0].message.content == \
            one.choices[0].message.content
        chunks = list(oa.chat.completions.create(**ask, seed=11, max_completion_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == one.usage.total_tokens
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == one.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="response_format"):
            oa.chat.completions.create(**ask, response_format={"type": "json_object"})
        one_more = oa.chat.completions.create(**ask, max_tokens=2, extra_body={"top_k": 5, "repetition_penalty": 1.1})
        assert one_more.usage.completion_tokens == 2


def test_transcriptions_with_the_openai_client(chat, speech_wav):
    import openai
    with live_server(create_app(chat, ServeConfig(api_key=API_KEY))) as url:
        oa = openai_client(url)
        heard = oa.audio.transcriptions.create(model="whisper-1", file=speech_wav.open("rb"))
        assert re.sub(r"[^a-z ]", "", heard.text.lower()).split() == ["what", "color", "is", "the", "sky"]
        text = oa.audio.transcriptions.create(model="whisper-1", file=speech_wav.open("rb"), response_format="text")
        assert text.strip() == heard.text
        verbose = oa.audio.transcriptions.create(model="whisper-1", file=speech_wav.open("rb"),
                                                 response_format="verbose_json", language="en")
        assert verbose.text == heard.text and verbose.language == "english" and 0.5 < verbose.duration < 5
        with pytest.raises(openai.BadRequestError, match="response_format"):
            oa.audio.transcriptions.create(model="whisper-1", file=speech_wav.open("rb"), response_format="srt")
        with pytest.raises(openai.BadRequestError, match="not an audio file|no decodable audio"):
            oa.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"not audio at all" * 50))
        with pytest.raises(openai.BadRequestError, match="no speech"):
            oa.audio.transcriptions.create(model="whisper-1", file=("quiet.wav", wav_bytes(np.zeros(16000))))
        with pytest.raises(openai.AuthenticationError):
            openai_client(url, key="wrong").audio.transcriptions.create(model="whisper-1", file=speech_wav.open("rb"))
    client = create_app(chat, ServeConfig(max_audio_seconds=2)).test_client()
    assert_error(client.post("/v1/audio/transcriptions", json={"file": "x"}), 415)
    assert_error(client.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, content_type="multipart/form-data"), 400, match="'file'")
    long = wav_bytes(np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 3))
    assert_error(client.post("/v1/audio/transcriptions", data={"file": (io.BytesIO(long), "a.wav")}), 400,
                 code="audio_too_long")
    unavailable = create_app(ScriptedChat("ok", whisper=Path("missing.pt"))).test_client()
    assert_error(unavailable.post("/v1/audio/transcriptions", data={"file": (io.BytesIO(long), "a.wav")}), 400,
                 code="speech_unavailable")
