"""
The OpenAI chat-completions request as serve.py takes it: the body checked and measured without doing anything costly
(no base64 decoding, no image decoding, no tokenizing, no fetching), so that a request can be refused, or refused a
place in the queue, for almost nothing; and the safe fetch of a remote image, done later, once the request is admitted.
"""

import base64
import binascii
import http.client
import io
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from flask import jsonify

from tokenizer import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, encode_chat, render_chat, speech_text

AUDIO_FORMATS = ("wav", "mp3", "webm", "ogg", "opus", "flac", "m4a", "mp4", "aac")
FETCH_SECONDS = 10.0  # one deadline for fetching a remote image, redirects and DNS included
MAX_REDIRECTS = 3
log = logging.getLogger("omniphi.serve")


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


def too_long(message):
    return APIError(400, message, param="messages", code="context_length_exceeded")


@dataclass
class ChatRequest:
    messages: list          # [{"role", "content": str with <image> placeholders}], speech not yet in it
    images: list            # (where, "data" or "url", base64 payload or URL), in placeholder order
    audio: list             # (message index, part index, base64 audio or None, transcript or None)
    stream: bool
    include_usage: bool
    options: dict           # keyword arguments of ChatModel.stream


def read_json(data):
    """The request body as JSON, or a 400 (a body nested too deeply for Python's parser is one)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError:
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None


def parse_chat_request(body, cfg, *, max_prompt, image_tokens, token_bytes):
    """Check an OpenAI chat.completions body. Besides the schema it refuses, by counting alone, what cannot fit:
    more images or audio parts than allowed, more parts than the prompt has tokens, or more bytes of text than
    max_prompt tokens of token_bytes (the longest token) each could hold, beside image_tokens per image."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", param="messages")
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise APIError(400, f"only n=1 is supported, not {shown(n)}", param="n")
    messages, images, audio = [], [], []
    n_parts, n_bytes = len(raw_messages), 0
    for i, m in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role {shown(m.get('role'))} is not supported (use system, user or assistant)",
                           param=f"{where}.role")
        content = m.get("content")
        if role == "assistant" and content is None:
            content = ""
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
        n_parts += len(content)
        if n_parts > max_prompt:  # no conversation has more parts than tokens; stopping here keeps this loop short
            raise too_long(f"the conversation has more messages and content parts than the {max_prompt} tokens allowed")
        pieces = []
        for j, part in enumerate(content):
            p = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"{p}.text must be a string", param=f"{p}.text")
                pieces.append(literal(part["text"]))
                n_bytes += len(pieces[-1].encode(errors="replace")) + 1
            elif kind in ("image_url", "input_audio") and role != "user":
                raise APIError(400, f"{p}: {kind} parts are only allowed in user messages", param=p)
            elif kind == "image_url":
                images.append((p, *parse_image_url(part.get("image_url"), p, cfg)))
                pieces.append(IMAGE_PLACEHOLDER)
            elif kind == "input_audio":
                data, transcript = parse_input_audio(part.get("input_audio"), p)
                audio.append((i, j, data, transcript))
                n_bytes += len(transcript.encode(errors="replace")) + 1 if transcript is not None else 0
            else:
                raise APIError(400, f"{p}: unsupported content part type {shown(kind)} (use text, image_url or "
                                    "input_audio)", param=f"{p}.type")
        messages.append({"role": role, "content": "\n".join(pieces)})
        n_bytes += 1  # the template's text around it
    if len(images) > cfg.max_images:
        raise APIError(400, f"too many images: {len(images)} (the limit is {cfg.max_images} per request)",
                       param="messages", code="too_many_images")
    n_audio = sum(data is not None for _, _, data, _ in audio)
    if n_audio > cfg.max_audio_parts:
        raise APIError(400, f"too many audio parts: {n_audio} (the limit is {cfg.max_audio_parts} per request)",
                       param="messages", code="too_many_audio_parts")
    if len(images) * image_tokens >= max_prompt:
        raise too_long(f"{len(images)} images take {len(images) * image_tokens} tokens; the limit is {max_prompt - 1}")
    if n_bytes > (max_prompt - 1 - len(images) * image_tokens) * token_bytes:
        raise too_long(f"the conversation's {n_bytes:,} bytes of text are more than the {max_prompt - 1} tokens "
                       "allowed could hold (shorten it or start a new chat)")
    try:
        render_chat(messages)  # the order of roles; cheap now that the text is known to be small
    except ValueError as err:
        raise APIError(400, str(err), param="messages") from None
    options, stream, include_usage = parse_options(body, cfg, max_prompt)
    return ChatRequest(messages, images, audio, stream, include_usage, options)


def parse_options(body, cfg, context):
    options = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None:
        if type(max_tokens) is not int or max_tokens < 1:
            raise APIError(400, f"{key} must be a positive integer, not {shown(max_tokens)}", param=key)
        options["max_tokens"] = min(max_tokens, context)
    temperature = body.get("temperature")
    if temperature is not None:
        if not is_number(temperature) or not 0 <= temperature <= 2:
            raise APIError(400, f"temperature must be a number from 0 to 2, not {shown(temperature)}", param="temperature")
        options["temperature"] = float(temperature)
    top_p = body.get("top_p")
    if top_p is not None:
        if not is_number(top_p) or not 0 < top_p <= 1:
            raise APIError(400, f"top_p must be a number in (0, 1], not {shown(top_p)}", param="top_p")
        options["top_p"] = float(top_p) if top_p < 1 else None
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
        options["stop"] = tuple(stop)
    seed = body.get("seed")
    if seed is not None:
        if type(seed) is not int:
            raise APIError(400, f"seed must be an integer, not {shown(seed)}", param="seed")
        options["seed"] = seed % 2**63
    response_format = body.get("response_format")
    if response_format is not None and not (isinstance(response_format, dict) and response_format.get("type") == "text"):
        raise APIError(400, 'only response_format {"type": "text"} is supported: this server cannot constrain answers '
                            "to JSON", param="response_format", code="unsupported_response_format")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or not isinstance(stream_options.get("include_usage", False), bool):
        raise APIError(400, "stream_options must be an object like {\"include_usage\": true}", param="stream_options")
    return options, stream, stream_options.get("include_usage", False)


def literal(text):
    """Typed (or transcribed) text as it is, except that an '<image>' in it must not open an image slot."""
    return text.replace(IMAGE_PLACEHOLDER, "<image >")


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def shown(value):
    """A value for an error message: short, and never the repr of a deep or large structure."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)[:40]
    return repr(value[:40]) if isinstance(value, str) else f"a JSON {'array' if isinstance(value, list) else 'object'}"


def parse_image_url(image_url, where, cfg):
    """An image_url part -> ("data", base64 payload) or ("url", an http(s) URL, with --allow_remote_images)."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}.image_url.url must be a data: URI string", param=f"{where}.image_url")
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(400, f"{where}: an image data URI must be base64 (data:image/png;base64,...)",
                           param=f"{where}.image_url")
        return "data", payload
    if re.match(r"https?://", url, re.I):
        if not cfg.allow_remote_images:
            raise APIError(400, f"{where}: remote image URLs are refused by this server (send a data: URI, or start "
                                "it with --allow_remote_images)", param=f"{where}.image_url", code="remote_images_disabled")
        return "url", url
    raise APIError(400, f"{where}: unsupported image URL scheme in {url[:40]!r} (use a data: URI)",
                   param=f"{where}.image_url")


def parse_input_audio(input_audio, where):
    """An input_audio part -> (base64 audio or None, transcript or None)."""
    if not isinstance(input_audio, dict):
        raise APIError(400, f"{where}.input_audio must be an object with 'data' (base64) and 'format'",
                       param=f"{where}.input_audio")
    fmt = input_audio.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS):
        raise APIError(400, f"{where}.input_audio.format {shown(fmt)} is not supported (use one of "
                            f"{', '.join(AUDIO_FORMATS)})", param=f"{where}.input_audio.format")
    transcript = input_audio.get("transcript")
    if transcript is not None:
        if not isinstance(transcript, str):
            raise APIError(400, f"{where}.input_audio.transcript must be a string", param=f"{where}.input_audio.transcript")
        return None, transcript
    data = input_audio.get("data")
    if not isinstance(data, str) or not data:
        raise APIError(400, f"{where}.input_audio.data must be base64-encoded audio", param=f"{where}.input_audio.data")
    return data.partition(",")[2] if data.startswith("data:") else data, None


def decode_base64(payload, param):
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: invalid base64 data", param=param) from None
    if not data:
        raise APIError(400, f"{param}: empty data", param=param)
    return data


# -----------------------------------------------------------------------------
# the costly checks, once the request has its place in the queue

def request_images(req, cfg, max_bytes):
    """The bytes of the request's images (base64 decoded, or fetched), checked by their headers alone: each one
    within cfg.max_image_pixels, all of them together within cfg.max_request_pixels."""
    images = [decode_base64(source, f"{where}.image_url") if kind == "data" else
              fetch_image(source, where, max_bytes=max_bytes, allow_private=cfg.allow_private_image_hosts)
              for where, kind, source in req.images]
    req.images = []  # the base64 text is not needed any more
    pixels = sum(w * h for w, h in (image_size(data, k, cfg.max_image_pixels) for k, data in enumerate(images)))
    if pixels > cfg.max_request_pixels:
        raise APIError(413, f"the images hold {pixels:,} pixels together; the limit is {cfg.max_request_pixels:,} "
                            "per request", code="image_too_large")
    return images


def image_size(data, index, max_pixels):
    """(width, height) from the image's header alone; refuses non-images and images over max_pixels."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as err:
        raise APIError(413, f"image {index + 1} has too many pixels ({err})", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise APIError(400, f"image {index + 1} is not an image (or a format the server cannot read)",
                       code="invalid_image") from None
    if width * height > max_pixels:
        raise APIError(413, f"image {index + 1} is {width}x{height} = {width * height:,} pixels; the limit is "
                            f"{max_pixels:,}", code="image_too_large")
    return width, height


def with_speech(messages, audio):
    """The messages with each known transcript of `audio` (see ChatRequest) in its user's turn, escaped like text."""
    messages = [dict(m) for m in messages]
    for i, _, _, transcript in audio:
        if transcript is not None:
            messages[i]["content"] = speech_text(literal(transcript), messages[i]["content"])
    return messages


def check_length(tokenizer, messages, n_images, image_tokens, max_prompt):
    """Refuse a prompt of max_prompt tokens or more: the messages' tokens and image_tokens per image."""
    ids, _ = encode_chat(tokenizer, messages)
    n = len(ids) - ids.count(IMAGE_TOKEN_ID) + n_images * image_tokens
    if n >= max_prompt:
        raise too_long(f"the conversation is {n} tokens; the limit is {max_prompt - 1} (shorten it or start a new chat)")


# -----------------------------------------------------------------------------
# remote images

_dns = ThreadPoolExecutor(4, thread_name_prefix="omniphi-dns")  # a lookup that hangs must not hold the request


def fetch_image(url, where, *, max_bytes, allow_private=False):
    """The bytes of the image at an http(s) URL. Every hop's host is resolved once and its addresses checked (no
    private, loopback, link-local, multicast, reserved or unspecified ones unless allow_private allows the first two
    kinds), and the connection goes to the address checked. At most MAX_REDIRECTS redirects, FETCH_SECONDS in all,
    and one message for every failure, so the answers tell nothing about the network behind the server."""
    deadline, first = time.monotonic() + FETCH_SECONDS, url
    try:
        for _ in range(MAX_REDIRECTS + 1):
            location, data = fetch_once(url, deadline, max_bytes, allow_private)
            if location is None:
                return data
            url = urljoin(url, location)
        raise OSError("too many redirects")
    except ImageTooLarge:
        raise APIError(413, f"{where}: the image at {first[:200]} is larger than {max_bytes:,} bytes",
                       param=f"{where}.image_url", code="image_too_large") from None
    except (OSError, ValueError, http.client.HTTPException, ssl.SSLError) as err:
        log.info("remote image %s not fetched (%s: %s)", url[:200], type(err).__name__, err)
        raise APIError(400, f"{where}: could not fetch the image at {first[:200]}", param=f"{where}.image_url",
                       code="image_fetch_failed") from None


class ImageTooLarge(Exception):
    pass


def fetch_once(url, deadline, max_bytes, allow_private):
    """(redirect location, None) or (None, body) of one GET."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url[:100]}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = _dns.submit(socket.getaddrinfo, parts.hostname, port, type=socket.SOCK_STREAM).result(left(deadline))
    for *_, sockaddr in infos:
        if not address_allowed(ipaddress.ip_address(sockaddr[0].split("%")[0]), allow_private):
            raise OSError(f"{parts.hostname} has the address {sockaddr[0]}, which is not public")
    family, *_, sockaddr = infos[0]
    held = {"sock": socket.socket(family, socket.SOCK_STREAM)}
    # the deadline holds even for a server that drips its headers a byte at a time
    timer = threading.Timer(left(deadline), lambda: shutdown(held["sock"]))
    timer.start()
    try:
        held["sock"].settimeout(left(deadline))
        held["sock"].connect(sockaddr)
        if parts.scheme == "https":
            held["sock"] = ssl.create_default_context().wrap_socket(held["sock"], server_hostname=parts.hostname)
        connection = http.client.HTTPConnection(parts.hostname, port)
        connection.sock = held["sock"]  # already connected, to the address checked: http.client will not resolve
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        connection.request("GET", target, headers={"User-Agent": "omniphi", "Accept": "image/*"})
        response = connection.getresponse()
        if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
            return response.getheader("Location"), None
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
        if int(response.getheader("Content-Length") or 0) > max_bytes:
            raise ImageTooLarge()
        chunks, size = [], 0
        while chunk := response.read1(65536):
            size += len(chunk)
            if size > max_bytes:
                raise ImageTooLarge()
            chunks.append(chunk)
            held["sock"].settimeout(left(deadline))
        left(deadline)  # the timer may have cut the body short
        if response.length:
            raise OSError("the body was cut short")
        return None, b"".join(chunks)
    finally:
        timer.cancel()
        held["sock"].close()


def left(deadline):
    seconds = deadline - time.monotonic()
    if seconds <= 0:
        raise TimeoutError("the fetch took too long")
    return seconds


def shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in another thread
    except OSError:
        pass


def address_allowed(ip, allow_private):
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_multicast or ip.is_unspecified or ip.is_link_local or ip.is_reserved:
        return False
    return ip.is_global or allow_private
