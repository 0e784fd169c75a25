"""
The chat: a Flask server with a ChatGPT-like page and an OpenAI-compatible API, one model behind both.

    python serve.py                                    # the offline demo made by `bash run.sh` (out/mm-demo, out/lm-demo)
    python serve.py --mm=out/mm-demo/instruct/ckpt --whisper=../shared/models/whisper-tiny.en.pt
    python serve.py --model=microsoft/phi-2 --quantize=nf4 --device=cuda --dtype=bfloat16
    python serve.py --host=0.0.0.0 --api_key=SECRET    # binding beyond loopback needs a key

API (OpenAI's schema; the page uses the same endpoints):
    POST /v1/chat/completions   messages with string content or content parts:
                                  {"type": "text", "text": ...}
                                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
                                  {"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}
                                stream, max_tokens / max_completion_tokens, temperature, top_p, stop, seed,
                                stream_options.include_usage, response_format {"type": "text"}; other fields are ignored
    POST /v1/audio/transcriptions   multipart form: file (audio), model, response_format json | text | verbose_json,
                                language; answers {"text": ...}
    GET  /v1/models             the one model, with its capabilities
    GET  /health                liveness; with the API key (or when none is set): capabilities, queue, limits
Extensions to OpenAI's schema:
    - responses (and the first SSE chunk) carry "transcripts": [{"message": i, "part": j, "text": ...}], what
      Whisper heard in each input_audio part, so a client can show it under the recording;
    - an input_audio part may carry "transcript" instead of "data": the server then uses that text as what was
      said (the page does this for earlier turns, so a recording is transcribed once, not on every turn).
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with a 4xx status.

A request is checked by counting first (parts, images, bytes of text against what the context can hold), then takes
a place in a bounded queue (--max_queue, generating + waiting; 429 at once when it is full), and only then is the
costly work done: base64, image headers and token counts, audio decoding and Whisper, images decoded one at a time
and cut down to what the tower sees. Work stops for a client that has closed its connection, and a client that goes
away mid-stream closes the generator chain down to model.generate_stream, so the model is freed at the next token.
"""

import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import select
import socket
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from chat_api import (APIError, check_length, decode_base64, error_response, parse_chat_request, read_json,
                      request_images, with_speech)

ROOT = Path(__file__).resolve().parent
STATIC = ROOT / "static"
DEMO_MM, DEMO_LM = ROOT / "out/mm-demo/instruct/ckpt", ROOT / "out/lm-demo/ckpt"
SHARED_WHISPER = ROOT.parent / "shared/models/whisper-tiny.en.pt"  # offline Whisper weights on the project's machines
log = logging.getLogger("omniphi.serve")


@dataclass
class ServeConfig:
    model: str = ""              # language model folder or hub id (default: the demo checkpoint of run.sh)
    mm: str = ""                 # multimodal checkpoint folder (mm_config.json, projector, adapter)
    whisper: str = ""            # Whisper name or .pt path (default: $OMNIPHI_WHISPER, then ../shared/models/...)
    host: str = "127.0.0.1"  # address to listen on (beyond loopback needs --api_key)
    port: int = 8000  # TCP port
    device: str = ""             # default: cuda if available, else cpu
    dtype: str = ""              # default: bfloat16 on cuda, float32 on cpu
    quantize: str = ""           # "", "nf4" or "int8"
    compile: bool = False        # decode with the torch.compile'd step (compiling takes a while, then decodes faster)
    api_key: str = ""            # require "Authorization: Bearer KEY" on /v1/* (required off loopback)
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: only data: URIs are accepted)
    allow_private_image_hosts: bool = False  # let remote image URLs reach private and loopback addresses (intranets)
    max_queue: int = 8           # requests generating or waiting for the model; more get 429
    max_body_mb: float = 25.0    # request body limit (413 beyond)
    max_image_pixels: int = 16_000_000  # largest image accepted, in pixels (width x height)
    max_request_pixels: int = 64_000_000  # all images of a request together, in pixels
    max_images: int = 16         # per request, all turns together
    max_audio_seconds: float = 120.0  # longest audio accepted per request, all parts together
    max_audio_parts: int = 4     # audio parts to transcribe per request
    max_prompt_tokens: int = 0   # 0: the model's context length
    max_tokens: int = 512        # default answer length when a request gives none
    temperature: float = 0.7     # default when a request gives none
    max_connections: int = 64    # open client connections; more are answered 503 and closed
    connection_timeout: float = 60.0  # seconds a connection may sit idle (or a read or write may stall)


class Admission:
    """A bounded count of requests holding or waiting for the model; beyond it a request is refused at once."""

    def __init__(self, limit):
        if limit < 1:
            raise ValueError(f"max_queue must be at least 1, got {limit}")
        self.limit, self.active, self.lock = limit, 0, threading.Lock()

    def enter(self):
        """None when full, else the function that gives the place back (once, however often it is called)."""
        with self.lock:
            if self.active >= self.limit:
                return None
            self.active += 1
        once = threading.Lock()

        def leave():
            if once.acquire(blocking=False):
                with self.lock:
                    self.active -= 1
        return leave


# -----------------------------------------------------------------------------
# images

decoding = threading.Lock()


def decode_image(data, index, mm=None):
    """Image bytes -> RGB PIL image, cut down at once to what the tower of `mm` (a MultimodalLM) sees."""
    from clip_encoder import load_image
    try:
        image = load_image(data)
    except ValueError as err:
        raise APIError(400, f"image {index + 1}: {err}", code="invalid_image") from None
    return image if mm is None else reduce_image(image, mm.processor, mm.pad_to_square)


def reduce_image(image, processor, pad_to_square=False):
    """The part of an image that preprocessing keeps, made with preprocessing's own steps, so that preprocessing the
    result again gives the same pixel values: padded as the model pads, resized so the shorter side is shortest_edge
    and cropped to the crop (or, when the crop is smaller than shortest_edge, to within a pixel of its centre)."""
    from clip_encoder import MAX_RESIZED_PIXELS, expand_to_square, resize_and_crop
    if pad_to_square:
        image = expand_to_square(image, tuple(int(m * 255) for m in processor.image_mean))
    edge, crop = processor.shortest_edge, processor.crop_size
    if edge == crop:
        return resize_and_crop(image, edge, crop, processor.resample)
    w, h = image.size
    new_w, new_h = (edge, int(edge * h / w)) if w <= h else (int(edge * w / h), edge)
    if new_w * new_h > MAX_RESIZED_PIXELS:
        return image
    left, top = (new_w - edge) // 2, (new_h - edge) // 2  # an even cut each side keeps the crop's centre
    return image.resize((new_w, new_h), resample=processor.resample).crop((left, top, new_w - left, new_h - top))


# -----------------------------------------------------------------------------
# speech, and clients that leave

def speech_capability(chat):
    """(available, reason) for speech input with the chat model's Whisper."""
    try:
        from audio import whisper_available
    except ImportError as err:
        return False, f"speech support is not installed ({err})"
    try:
        return whisper_available(getattr(chat, "whisper", None))
    except Exception as err:  # a capability probe must never stop the server
        return False, f"Whisper is not usable: {err}"


class ClientGone(APIError):
    def __init__(self):
        super().__init__(499, "the client closed the connection", code="client_closed")


def client_gone(environ):
    """True once the client of this request has closed its connection (the socket reads end-of-file)."""
    sock = environ.get("werkzeug.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except ValueError:  # a socket select cannot watch: assume the client is there
        return False
    except OSError:
        return True


watched = threading.local()  # .environ: the request whose thread is transcribing
watched_lock = threading.Lock()


def check_client(module, args):  # a forward pre-hook of Whisper's decoder
    environ = getattr(watched, "environ", None)
    if environ is not None and client_gone(environ):
        raise ClientGone()


def speech_error(where, err):
    """The APIError for an error of audio.py, or None for any other."""
    from audio import AudioError, NoSpeechError, WhisperUnavailableError
    if isinstance(err, NoSpeechError):
        return APIError(400, f"{where}: no speech was heard in the audio", param=where, code="no_speech")
    if isinstance(err, AudioError):
        return APIError(400, f"{where}: {err}", param=where, code="invalid_audio")
    if isinstance(err, WhisperUnavailableError):
        return APIError(503, f"speech input is unavailable: {err}", type="server_error", code="speech_unavailable")
    return None


def decode_audio(data, seconds, limit, where):
    """Audio bytes -> 16 kHz samples, refused when longer than `seconds` (what is left of the request's `limit`)."""
    from audio import AudioError, load_audio
    if seconds > 0:
        try:
            return load_audio(data, max_seconds=seconds)
        except AudioError as err:
            if "longer than" not in str(err):
                raise speech_error(where, err) from None
    raise APIError(400, f"{where}: the audio is longer than the {limit:g} s limit of a request (max_audio_seconds, "
                        "all parts together)", param=where, code="audio_too_long")


def transcribe(chat, samples, where, full=False, language=None):
    """Whisper's text for the samples (its Transcript if full). Whisper's decoder checks at every step whether the
    client of this request is still there, and stops (ClientGone) when it is not."""
    from audio import load_whisper, transcribe_full
    watched.environ = request.environ
    try:
        model = load_whisper(getattr(chat, "whisper", None))  # the one chat.transcribe uses: loaded once, shared
        with watched_lock:
            if not getattr(model, "omniphi_watched", False):
                model.decoder.register_forward_pre_hook(check_client)
                model.omniphi_watched = True
        return transcribe_full(samples, model, language=language) if full else chat.transcribe(samples)
    except Exception as err:
        raise (speech_error(where, err) or err) from None
    finally:
        watched.environ = None


# -----------------------------------------------------------------------------
# the app

def create_app(chat, config=None):
    """The Flask app around `chat`: a multimodal.ChatModel or any object with its interface (tokenizer, context,
    vision, whisper, transcribe(audio), stream(messages, images, **options); and mm, its MultimodalLM, if any)."""
    cfg = config or ServeConfig()
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = int(cfg.max_body_mb * 2**20)
    admission = Admission(cfg.max_queue)
    speech_ok, speech_reason = speech_capability(chat)
    images_ok = getattr(chat, "vision", None) is not None
    mm = getattr(chat, "mm", None)
    image_tokens = getattr(mm, "image_tokens", 0)
    model_id = model_name(cfg)
    context = chat.context
    max_prompt = min(cfg.max_prompt_tokens or context, context)
    token_bytes = max(len(chat.tokenizer.decode_bytes([i])) for i in range(chat.tokenizer.vocab_size))
    loopback_only = is_loopback(cfg.host)

    def capabilities():
        return {"text": True, "images": images_ok,
                "images_reason": "" if images_ok else "this model has no vision tower (start the server with --mm=CKPT)",
                "speech": speech_ok, "speech_reason": speech_reason}

    def limits():
        return {"max_body_bytes": app.config["MAX_CONTENT_LENGTH"], "max_image_pixels": cfg.max_image_pixels,
                "max_request_pixels": cfg.max_request_pixels, "max_images": cfg.max_images,
                "max_audio_seconds": cfg.max_audio_seconds, "max_audio_parts": cfg.max_audio_parts,
                "max_prompt_tokens": max_prompt, "context": context}

    app.extensions["omniphi"] = {"chat": chat, "config": cfg, "admission": admission, "capabilities": capabilities()}

    def authorized():
        given = request.headers.get("Authorization", "")
        return not cfg.api_key or hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode())

    def busy():
        return error_response(429, f"the server is busy ({admission.limit} requests are already running or queued); "
                                   "try again shortly", type="rate_limit_error", code="server_busy")

    @app.before_request
    def check_host_and_key():
        if loopback_only and not is_loopback(request.host):  # a page of another site, by DNS rebinding
            return error_response(421, "this server answers only to loopback host names (localhost, 127.0.0.1, [::1])",
                                  code="invalid_host")
        if request.path.startswith("/v1/") and not authorized():
            return error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                  type="authentication_error", code="invalid_api_key")

    @app.after_request
    def security_headers(response):
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; style-src 'self'; "
            "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
        return response

    @app.errorhandler(HTTPException)
    def http_error(err):
        if err.code == 413:
            message = f"the request body is larger than the server's limit of {cfg.max_body_mb:g} MB"
            return error_response(413, message, code="request_too_large")
        kind = "not_found_error" if err.code == 404 else "invalid_request_error"
        return error_response(err.code, err.description or err.name, type=kind)

    @app.errorhandler(Exception)
    def server_error(err):
        log.exception("unexpected error while serving %s", request.path)
        return error_response(500, f"internal server error ({type(err).__name__})", type="server_error")

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/static/<path:name>")
    def static_file(name):
        return send_from_directory(STATIC, name)

    @app.get("/health")
    def health():
        if not authorized():  # liveness only: the details name files on this machine
            return jsonify({"status": "ok", "auth": True})
        return jsonify({"status": "ok", "model": model_id, "capabilities": capabilities(), "limits": limits(),
                        "queue": {"active": admission.active, "max": admission.limit}, "auth": bool(cfg.api_key)})

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                    "owned_by": "omniphi", "capabilities": capabilities(),
                                                    "context_length": context}]})

    @app.post("/v1/audio/transcriptions")
    def transcriptions():
        if request.mimetype != "multipart/form-data":
            return error_response(415, "send a multipart/form-data form with the audio as 'file'",
                                  code="unsupported_media_type")
        upload, fmt = request.files.get("file"), request.form.get("response_format", "json")  # 413 past the limit
        if fmt not in ("json", "text", "verbose_json"):
            return error_response(400, f"response_format {fmt[:20]!r} is not supported (use json, text or "
                                       "verbose_json)", param="response_format")
        if upload is None:
            return error_response(400, "the form has no 'file' field with the audio", param="file")
        if not speech_ok:
            return error_response(400, f"speech input is unavailable on this server: {speech_reason}",
                                  code="speech_unavailable")
        leave = admission.enter()
        if leave is None:
            return busy()
        try:
            samples = decode_audio(upload.read(), cfg.max_audio_seconds, cfg.max_audio_seconds, "file")
            heard = transcribe(chat, samples, "file", full=True, language=request.form.get("language") or None)
        except APIError as err:
            return err.response()
        except ValueError as err:  # an unknown language
            return error_response(400, str(err), param="language")
        finally:
            leave()
        if fmt == "text":
            return Response(heard.text + "\n", mimetype="text/plain")
        if fmt == "json":
            return jsonify({"text": heard.text})
        from whisper.tokenizer import LANGUAGES
        return jsonify({"task": "transcribe", "language": LANGUAGES.get(heard.language, heard.language),
                        "duration": heard.duration, "text": heard.text, "segments": []})

    @app.post("/v1/chat/completions")
    def chat_completions():
        if not request.is_json:
            return error_response(415, "Content-Type must be application/json", code="unsupported_media_type")
        try:
            data = request.get_data(cache=False)
            if len(data) >= app.config["MAX_CONTENT_LENGTH"]:
                request.stream.read(1)  # a chunked body is cut at the limit: reading on past it raises the 413
            req = parse_chat_request(read_json(data), cfg, max_prompt=max_prompt, image_tokens=image_tokens,
                                     token_bytes=token_bytes)
            del data  # the body lives on only in what req keeps of it
            if req.images and not images_ok:
                raise APIError(400, "this model cannot see images: it has no vision tower (start the server with "
                                    "--mm=CKPT)", param="messages", code="images_unsupported")
            if any(data is not None for _, _, data, _ in req.audio) and not speech_ok:
                raise APIError(400, f"speech input is unavailable on this server: {speech_reason}",
                               param="messages", code="speech_unavailable")
        except APIError as err:
            return err.response()
        leave = admission.enter()
        if leave is None:
            return busy()
        try:
            return answer(req, leave)
        except APIError as err:
            leave()
            if isinstance(err, ClientGone):
                log.info("client left before its answer; its request was dropped")
            return err.response()
        except BaseException:
            leave()
            raise

    def answer(req, leave):
        """The costly part of a request, in order of cost, each step refusing what it can before the next."""
        def stop_if_gone():
            if client_gone(request.environ):
                raise ClientGone()

        images = request_images(req, cfg, app.config["MAX_CONTENT_LENGTH"])  # bytes, sizes checked from headers
        check_length(chat.tokenizer, with_speech(req.messages, req.audio), len(images), image_tokens, max_prompt)
        budget, samples = cfg.max_audio_seconds, {}
        for k, (i, j, data, _) in enumerate(req.audio):  # all decoded first: audio over the limit costs no Whisper time
            if data is not None:
                where = f"messages[{i}].content[{j}]"
                samples[k] = decode_audio(decode_base64(data, f"{where}.input_audio.data"), budget,
                                          cfg.max_audio_seconds, where)
                budget -= len(samples[k]) / 16000
        heard = []
        for k, (i, j, _, transcript) in enumerate(req.audio):
            if k in samples:
                stop_if_gone()
                transcript = transcribe(chat, samples.pop(k), f"messages[{i}].content[{j}]")
            heard.append((i, j, None, transcript))
        messages = with_speech(req.messages, heard)
        if any(data is not None for _, _, data, _ in req.audio):
            check_length(chat.tokenizer, messages, len(images), image_tokens, max_prompt)
        transcripts = [{"message": i, "part": j, "text": t} for i, j, _, t in heard]
        decoded = []
        for k in range(len(images)):
            stop_if_gone()
            with decoding:  # one image at a time across requests too: the peak is one image, however many wait
                decoded.append(decode_image(images[k], k, mm))
            images[k] = None  # its bytes are not needed any more
        stop_if_gone()
        usage = {}
        pieces = chat.stream(messages, decoded, usage=usage, **req.options)
        try:
            first = next(pieces, None)  # waits for the model; prompt errors surface here as clean 400s
        except ValueError as err:
            pieces.close()
            code = "context_length_exceeded" if "context" in str(err) else None
            raise APIError(400, str(err), param="messages", code=code) from None
        except BaseException:
            pieces.close()
            raise
        completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def usage_json():
            p, c = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not req.stream:
            try:
                text = [] if first is None else [first]
                for piece in pieces:
                    text.append(piece)
                    stop_if_gone()
            finally:
                pieces.close()
                leave()
            return jsonify({"id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                         "finish_reason": usage.get("finish_reason", "stop")}],
                            "usage": usage_json(), "transcripts": transcripts})

        def chunk(delta, finish_reason=None, **extra):
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                       "choices": choices, **({"usage": None} if req.include_usage else {}), **extra}
            return f"data: {json.dumps(payload)}\n\n"

        def release():
            pieces.close()
            leave()

        def events():
            # The finally frees the model even when the server drops the stream without closing it (werkzeug
            # skips close() when a client resets the connection); the generator's finalizer then runs it.
            try:
                yield chunk({"role": "assistant", "content": ""}, transcripts=transcripts)
                try:
                    if first is not None:
                        yield chunk({"content": first})
                        for piece in pieces:
                            yield chunk({"content": piece})
                except Exception as err:
                    log.exception("generation failed mid-stream")
                    error = {"message": f"generation failed: {err}", "type": "server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield chunk({}, usage.get("finish_reason", "stop"))
                if req.include_usage:
                    yield chunk(None, usage=usage_json())
                yield "data: [DONE]\n\n"
            finally:
                release()

        response = Response(events(), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response.call_on_close(release)  # the client went away before the stream started, or it ended
        return response

    return app


def model_name(cfg):
    """The model id the API reports: the checkpoint as it was given (a folder or a hub id)."""
    return (cfg.mm or cfg.model).rstrip("/") or "omniphi"


def make_server(app, cfg):
    """werkzeug's threaded server, with a timeout on every connection and at most cfg.max_connections open."""
    from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

    class Handler(WSGIRequestHandler):
        timeout = cfg.connection_timeout

    class Server(ThreadedWSGIServer):
        slots = threading.BoundedSemaphore(cfg.max_connections)

        def process_request(self, connection, client_address):
            if not self.slots.acquire(blocking=False):  # full: say so without starting a thread, and close
                connection.setblocking(False)
                with suppress(OSError):
                    connection.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return self.shutdown_request(connection)
            super().process_request(connection, client_address)

        def process_request_thread(self, connection, client_address):
            try:
                super().process_request_thread(connection, client_address)
            finally:
                self.slots.release()

    return Server(cfg.host, cfg.port, app, handler=Handler)


# -----------------------------------------------------------------------------
# command line

def resolve_defaults(cfg):
    """Fill in the demo checkpoint and Whisper weights when they are not given; refuse an unsafe bind."""
    if not cfg.model and not cfg.mm:
        if (DEMO_MM / "mm_config.json").is_file():
            cfg.mm = str(DEMO_MM)
        elif (DEMO_LM / "config.json").is_file():
            cfg.model = str(DEMO_LM)
        else:
            raise SystemExit(f"no model to serve: {DEMO_MM} and {DEMO_LM} do not exist. Run `bash run.sh` first to "
                             "build the offline demo, or pass --model=DIR (or --model=microsoft/phi-2) / --mm=CKPT")
    if not cfg.whisper:
        cfg.whisper = os.environ.get("OMNIPHI_WHISPER") or (str(SHARED_WHISPER) if SHARED_WHISPER.is_file() else "")
    if not is_loopback(cfg.host) and not cfg.api_key:
        raise SystemExit(f"refusing to listen on {cfg.host} without --api_key: anyone who can reach it could use the "
                         "model. Pass --api_key=SECRET (clients send 'Authorization: Bearer SECRET') or bind 127.0.0.1")
    if cfg.quantize not in ("", "nf4", "int8"):
        raise SystemExit(f"--quantize must be nf4 or int8, not {cfg.quantize!r}")
    if cfg.max_queue < 1 or cfg.max_connections < 1:
        raise SystemExit("--max_queue and --max_connections must be at least 1")
    return cfg


def is_loopback(host):
    """Whether a host ('localhost', '127.0.0.1', '::1') or a Host header ('localhost:8000', '[::1]:80') is loopback."""
    name = re.sub(r"^\[(.*)\](:\d*)?$|^([^:]*):\d*$", r"\1\3", host or "").lower()
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def main(argv):
    from common import fail, parse_config, resolve_device, return_freed_memory
    from multimodal import ChatModel

    try:
        cfg = resolve_defaults(parse_config(ServeConfig, argv, doc=__doc__))
        device = str(resolve_device(cfg.device or "auto"))
    except ValueError as err:
        fail("serve.py", err)
    return_freed_memory()  # decoded images and their features go back to the system after each request
    dtype = cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"loading {cfg.mm or cfg.model} on {device} ({dtype}{', ' + cfg.quantize if cfg.quantize else ''}) ...",
          file=sys.stderr)
    try:
        chat = ChatModel(cfg.model or None, mm=cfg.mm or None, device=device, dtype=dtype,
                         quantize=cfg.quantize or None, whisper=cfg.whisper or None, compile=cfg.compile)
    except (ValueError, FileNotFoundError) as err:
        fail("serve.py", err)
    app = create_app(chat, cfg)
    caps = app.extensions["omniphi"]["capabilities"]
    print(f"images: {'yes' if caps['images'] else 'no'}; speech: {'yes' if caps['speech'] else 'no'} "
          f"({caps['speech_reason']})", file=sys.stderr)
    server = make_server(app, cfg)
    print(f"chat on http://{cfg.host}:{server.server_port}/  (API: http://{cfg.host}:{server.server_port}/v1)",
          file=sys.stderr)
    server.serve_forever()  # until Ctrl-C


if __name__ == "__main__":
    main(sys.argv[1:])
