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
                                stream_options.include_usage
    GET  /v1/models             the one model, with its capabilities
    GET  /health                status, capabilities (images, speech + reason), queue, limits
Extensions to OpenAI's schema:
    - responses (and the first SSE chunk) carry "transcripts": [{"message": i, "part": j, "text": ...}], what
      Whisper heard in each input_audio part, so a client can show it under the recording;
    - an input_audio part may carry "transcript" instead of "data": the server then uses that text as what was
      said (the page does this for earlier turns, so a recording is transcribed once, not on every turn).
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with a 4xx status.

Requests take a place in a bounded queue for the model (--max_queue, generating + waiting); when it is full
the server answers 429 at once. A client that goes away mid-stream closes the response, which closes the
generator chain down to model.generate_stream, so the model is freed at the next token.
"""

import base64
import binascii
import hmac
import io
import ipaddress
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from tokenizer import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, encode_chat, speech_text

ROOT = Path(__file__).resolve().parent
STATIC = ROOT / "static"
DEMO_MM, DEMO_LM = ROOT / "out/mm-demo/instruct/ckpt", ROOT / "out/lm-demo/ckpt"
SHARED_WHISPER = ROOT.parent / "shared/models/whisper-tiny.en.pt"  # offline Whisper weights on the project's machines
AUDIO_FORMATS = ("wav", "mp3", "webm", "ogg", "opus", "flac", "m4a", "mp4", "aac")
log = logging.getLogger("omniphi.serve")


@dataclass
class ServeConfig:
    model: str = ""              # language model folder or hub id (default: the demo checkpoint of run.sh)
    mm: str = ""                 # multimodal checkpoint folder (mm_config.json, projector, adapter)
    whisper: str = ""            # Whisper name or .pt path (default: $OMNIPHI_WHISPER, then ../shared/models/...)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = ""             # default: cuda if available, else cpu
    dtype: str = ""              # default: bfloat16 on cuda, float32 on cpu
    quantize: str = ""           # "", "nf4" or "int8"
    compile: bool = False        # decode with the torch.compile'd step (compiling takes a while, then decodes faster)
    api_key: str = ""            # require "Authorization: Bearer KEY" on /v1/* (required off loopback)
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: only data: URIs are accepted)
    max_queue: int = 8           # requests generating or waiting for the model; more get 429
    max_body_mb: float = 25.0    # request body limit (413 beyond)
    max_image_pixels: int = 16_000_000
    max_images: int = 16         # per request, all turns together
    max_audio_seconds: float = 120.0
    max_prompt_tokens: int = 0   # 0: the model's context length
    max_tokens: int = 512        # default answer length when a request gives none
    temperature: float = 0.7     # default when a request gives none


class APIError(Exception):
    def __init__(self, status, message, *, type="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self):
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code)


def error_response(status, message, *, type="invalid_request_error", param=None, code=None):
    response = jsonify({"error": {"message": message, "type": type, "param": param, "code": code}})
    response.status_code = status
    return response


class Admission:
    """A bounded count of requests holding or waiting for the model; beyond it a request is refused at once."""

    def __init__(self, limit):
        if limit < 1:
            raise ValueError(f"max_queue must be at least 1, got {limit}")
        self.limit, self.active, self.lock = limit, 0, threading.Lock()

    def enter(self):
        with self.lock:
            if self.active >= self.limit:
                return None
            self.active += 1
        return Ticket(self)

    def leave(self):
        with self.lock:
            self.active -= 1


class Ticket:
    """One admitted request; leave() may be called any number of times, it counts once."""

    def __init__(self, admission):
        self.admission, self.left, self.lock = admission, False, threading.Lock()

    def leave(self):
        with self.lock:
            if self.left:
                return
            self.left = True
        self.admission.leave()


@dataclass
class ChatRequest:
    messages: list          # [{"role", "content": str with <image> placeholders}], audio not yet transcribed
    images: list            # image bytes in placeholder order
    audio: list             # (message index, part index, bytes or None, transcript or None)
    stream: bool
    include_usage: bool
    options: dict           # keyword arguments of ChatModel.stream


# -----------------------------------------------------------------------------
# request parsing

def parse_chat_request(body, cfg, context):
    """Validate an OpenAI chat.completions body. Images and audio stay undecoded (they cost time)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", param="messages")
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    messages, images, audio = [], [], []
    for i, m in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role {m.get('role')!r} is not supported (use system, user or assistant)",
                           param=f"{where}.role")
        content = m.get("content")
        if role == "assistant" and content is None:
            content = ""
        if isinstance(content, str):
            messages.append({"role": role, "content": literal(content)})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
        pieces = []
        for j, part in enumerate(content):
            p = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"{p}.text must be a string", param=f"{p}.text")
                pieces.append(literal(part["text"]))
            elif kind in ("image_url", "input_audio") and role != "user":
                raise APIError(400, f"{p}: {kind} parts are only allowed in user messages", param=p)
            elif kind == "image_url":
                images.append(parse_image_url(part.get("image_url"), p, cfg))
                pieces.append(IMAGE_PLACEHOLDER)
            elif kind == "input_audio":
                audio.append((i, j, *parse_input_audio(part.get("input_audio"), p)))
            else:
                raise APIError(400, f"{p}: unsupported content part type {kind!r} (use text, image_url or input_audio)",
                               param=f"{p}.type")
        messages.append({"role": role, "content": "\n".join(pieces)})
    if len(images) > cfg.max_images:
        raise APIError(400, f"too many images: {len(images)} (the limit is {cfg.max_images} per request)",
                       param="messages", code="too_many_images")
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", param="messages")

    options = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise APIError(400, f"max_tokens must be a positive integer, not {max_tokens!r}", param="max_tokens")
        options["max_tokens"] = min(max_tokens, context)
    temperature = body.get("temperature")
    if temperature is not None:
        if not is_number(temperature) or not 0 <= temperature <= 2:
            raise APIError(400, f"temperature must be a number from 0 to 2, not {temperature!r}", param="temperature")
        options["temperature"] = float(temperature)
    top_p = body.get("top_p")
    if top_p is not None:
        if not is_number(top_p) or not 0 < top_p <= 1:
            raise APIError(400, f"top_p must be a number in (0, 1], not {top_p!r}", param="top_p")
        options["top_p"] = float(top_p) if top_p < 1 else None
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
        options["stop"] = tuple(stop)
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise APIError(400, f"seed must be an integer, not {seed!r}", param="seed")
        options["seed"] = seed % 2**63
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    return ChatRequest(messages, images, audio, stream, bool(stream_options.get("include_usage")), options)


def literal(text):
    """Typed text as it is, except that a typed '<image>' must not open an image slot."""
    return text.replace(IMAGE_PLACEHOLDER, "<image >")


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_image_url(image_url, where, cfg):
    """An image_url part -> image bytes. data: URIs always; http(s) only with --allow_remote_images."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}.image_url.url must be a data: URI string", param=f"{where}.image_url")
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(400, f"{where}: an image data URI must be base64 (data:image/png;base64,...)",
                           param=f"{where}.image_url")
        return decode_base64(payload, f"{where}.image_url")
    if re.match(r"https?://", url, re.I):
        if not cfg.allow_remote_images:
            raise APIError(400, f"{where}: remote image URLs are refused by this server (send a data: URI, or start "
                                "it with --allow_remote_images)", param=f"{where}.image_url", code="remote_images_disabled")
        return fetch_image(url, int(cfg.max_body_mb * 2**20), where)
    raise APIError(400, f"{where}: unsupported image URL scheme in {url[:40]!r} (use a data: URI)",
                   param=f"{where}.image_url")


def fetch_image(url, max_bytes, where):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "omniphi"}), timeout=10) as r:
            data = r.read(max_bytes + 1)
    except (OSError, ValueError) as err:
        raise APIError(400, f"{where}: could not fetch the image at {url[:200]} ({err})", param=f"{where}.image_url")
    if len(data) > max_bytes:
        raise APIError(413, f"{where}: the image at {url[:200]} is larger than {max_bytes:,} bytes",
                       param=f"{where}.image_url", code="image_too_large")
    return data


def parse_input_audio(input_audio, where):
    """An input_audio part -> (audio bytes or None, transcript or None)."""
    if not isinstance(input_audio, dict):
        raise APIError(400, f"{where}.input_audio must be an object with 'data' (base64) and 'format'",
                       param=f"{where}.input_audio")
    fmt = input_audio.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS):
        raise APIError(400, f"{where}.input_audio.format {fmt!r} is not supported (use one of {', '.join(AUDIO_FORMATS)})",
                       param=f"{where}.input_audio.format")
    transcript = input_audio.get("transcript")
    if transcript is not None:
        if not isinstance(transcript, str):
            raise APIError(400, f"{where}.input_audio.transcript must be a string", param=f"{where}.input_audio.transcript")
        return None, transcript
    data = input_audio.get("data")
    if not isinstance(data, str) or not data:
        raise APIError(400, f"{where}.input_audio.data must be base64-encoded audio", param=f"{where}.input_audio.data")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    return decode_base64(data, f"{where}.input_audio.data"), None


def decode_base64(payload, param):
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: invalid base64 data", param=param) from None
    if not data:
        raise APIError(400, f"{param}: empty data", param=param)
    return data


# -----------------------------------------------------------------------------
# images and speech

def decode_image(data, max_pixels, index):
    """Image bytes -> RGB PIL image, refusing non-images and images over max_pixels before decoding them."""
    from PIL import Image, UnidentifiedImageError

    from clip_encoder import load_image
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
    except Image.DecompressionBombError as err:
        raise APIError(413, f"image {index + 1} has too many pixels ({err})", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise APIError(400, f"image {index + 1} is not an image (or a format the server cannot read)",
                       code="invalid_image") from None
    if width * height > max_pixels:
        raise APIError(413, f"image {index + 1} is {width}x{height} = {width * height:,} pixels; the limit is "
                            f"{max_pixels:,}", code="image_too_large")
    try:
        return load_image(data)
    except ValueError as err:
        raise APIError(400, f"image {index + 1}: {err}", code="invalid_image") from None


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


def transcribe_part(chat, data, max_seconds, where):
    from audio import AudioError, NoSpeechError, WhisperUnavailableError, load_audio
    try:
        return chat.transcribe(load_audio(data, max_seconds=max_seconds))  # refuses non-audio and over-long audio
    except NoSpeechError:
        raise APIError(400, f"{where}: no speech was heard in the audio", param=where, code="no_speech") from None
    except AudioError as err:
        code = "audio_too_long" if "longer than" in str(err) else "invalid_audio"
        raise APIError(400, f"{where}: {err}", param=where, code=code) from None
    except WhisperUnavailableError as err:
        raise APIError(503, f"speech input is unavailable: {err}", type="server_error", code="speech_unavailable") from None


# -----------------------------------------------------------------------------
# the app

def create_app(chat, config=None):
    """The Flask app around `chat`: a generate.ChatModel or any object with its interface (tokenizer, context,
    vision, whisper, transcribe(audio), stream(messages, images, **options))."""
    cfg = config or ServeConfig()
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = int(cfg.max_body_mb * 2**20)
    admission = Admission(cfg.max_queue)
    speech_ok, speech_reason = speech_capability(chat)
    images_ok = getattr(chat, "vision", None) is not None
    model_id = model_name(cfg)
    context = chat.context
    max_prompt = min(cfg.max_prompt_tokens or context, context)

    def capabilities():
        return {"text": True, "images": images_ok,
                "images_reason": "" if images_ok else "this model has no vision tower (start the server with --mm=CKPT)",
                "speech": speech_ok, "speech_reason": speech_reason}

    def limits():
        return {"max_body_bytes": app.config["MAX_CONTENT_LENGTH"], "max_image_pixels": cfg.max_image_pixels,
                "max_images": cfg.max_images, "max_audio_seconds": cfg.max_audio_seconds,
                "max_prompt_tokens": max_prompt, "context": context}

    app.extensions["omniphi"] = {"chat": chat, "config": cfg, "admission": admission, "capabilities": capabilities()}

    @app.before_request
    def check_api_key():
        if cfg.api_key and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
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
        return jsonify({"status": "ok", "model": model_id, "capabilities": capabilities(), "limits": limits(),
                        "queue": {"active": admission.active, "max": admission.limit}, "auth": bool(cfg.api_key)})

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                    "owned_by": "omniphi", "capabilities": capabilities(),
                                                    "context_length": context}]})

    @app.post("/v1/chat/completions")
    def chat_completions():
        if not request.is_json:
            return error_response(415, "Content-Type must be application/json", code="unsupported_media_type")
        body = request.get_json(silent=True)
        if body is None:
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        try:
            req = parse_chat_request(body, cfg, context)
            if req.images and not images_ok:
                raise APIError(400, "this model cannot see images: it has no vision tower (start the server with "
                                    "--mm=CKPT)", param="messages", code="images_unsupported")
            if any(data is not None for _, _, data, _ in req.audio) and not speech_ok:
                raise APIError(400, f"speech input is unavailable on this server: {speech_reason}",
                               param="messages", code="speech_unavailable")
            try:
                text_ids, _ = encode_chat(chat.tokenizer, req.messages)
            except ValueError as err:
                raise APIError(400, str(err), param="messages") from None
            n_text = sum(t != IMAGE_TOKEN_ID for t in text_ids)
            if n_text >= max_prompt:
                raise APIError(400, f"the conversation is {n_text} tokens; the limit is {max_prompt - 1} "
                                    "(shorten it or start a new chat)", param="messages", code="context_length_exceeded")
        except APIError as err:
            return err.response()
        ticket = admission.enter()
        if ticket is None:
            return error_response(429, f"the server is busy ({admission.limit} requests are already running or "
                                       "queued); try again shortly", type="rate_limit_error", code="server_busy")
        try:
            return answer(req, ticket)
        except APIError as err:
            ticket.leave()
            return err.response()
        except BaseException:
            ticket.leave()
            raise

    def answer(req, ticket):
        transcripts, spoken = [], {}
        for i, j, data, transcript in req.audio:
            if data is not None:
                transcript = transcribe_part(chat, data, cfg.max_audio_seconds, f"messages[{i}].content[{j}]")
            transcripts.append({"message": i, "part": j, "text": transcript})
            spoken.setdefault(i, []).append(transcript)
        messages = [dict(m) for m in req.messages]
        for i, heard in spoken.items():
            for transcript in heard:
                messages[i]["content"] = speech_text(transcript, messages[i]["content"])
        images = [decode_image(data, cfg.max_image_pixels, k) for k, data in enumerate(req.images)]
        usage = {}
        pieces = chat.stream(messages, images, usage=usage, **req.options)
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
                text = "" if first is None else first + "".join(pieces)
            finally:
                pieces.close()
                ticket.leave()
            return jsonify({"id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": usage.get("finish_reason", "stop")}],
                            "usage": usage_json(), "transcripts": transcripts})

        def chunk(delta, finish_reason=None, **extra):
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                       "choices": choices, **extra}
            return f"data: {json.dumps(payload)}\n\n"

        def release():
            pieces.close()
            ticket.leave()

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
    if cfg.max_queue < 1:
        raise SystemExit("--max_queue must be at least 1")
    return cfg


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv):
    import torch

    from generate import ChatModel
    from train_lm import parse_config

    try:
        cfg = resolve_defaults(parse_config(ServeConfig, argv))
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"loading {cfg.mm or cfg.model} on {device} ({dtype}{', ' + cfg.quantize if cfg.quantize else ''}) ...",
          file=sys.stderr)
    try:
        chat = ChatModel(cfg.model or None, mm=cfg.mm or None, device=device, dtype=dtype,
                         quantize=cfg.quantize or None, whisper=cfg.whisper or None, compile=cfg.compile)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    app = create_app(chat, cfg)
    caps = app.extensions["omniphi"]["capabilities"]
    print(f"images: {'yes' if caps['images'] else 'no'}; speech: {'yes' if caps['speech'] else 'no'} "
          f"({caps['speech_reason']})", file=sys.stderr)
    print(f"chat on http://{cfg.host}:{cfg.port}/  (API: http://{cfg.host}:{cfg.port}/v1)", file=sys.stderr)
    app.run(host=cfg.host, port=cfg.port, threaded=True)


if __name__ == "__main__":
    main(sys.argv[1:])
