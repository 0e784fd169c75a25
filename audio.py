"""
Speech input for omniphi: decode any common audio file to 16 kHz mono float32, and turn speech into text
with openai-whisper. The transcript is then tokenized and embedded like any typed message.

Decoding uses PyAV's bundled FFmpeg libraries (wav, mp3, ogg/opus, browser webm/opus, m4a/aac, flac, ...),
so no `ffmpeg` program is needed; channels are averaged to mono. A file that is cut short yields the audio
before the cut (browser uploads are sometimes truncated) and damaged packets are skipped, as ffmpeg does; a
file with no decodable audio at all raises AudioError. Decoding stops as soon as the audio exceeds
`max_seconds`.

Silence and noise raise NoSpeechError instead of returning invented text: a cheap energy/spectrum check
runs before Whisper, and Whisper's own no-speech probability is checked after it.

    audio = load_audio("question.webm")                 # np.float32, 16 kHz mono
    text = transcribe(audio, "tiny.en")                # or a local .pt path, or $OMNIPHI_WHISPER
    ok, reason = whisper_available("path/to/tiny.en.pt")  # cheap check for a server deciding "speech off"

Models are loaded once per (checkpoint, device) and shared by all threads; decoding with one model is
serialised by a per-model lock because whisper's KV cache hooks live on the model.
"""

import io
import os
import re
import socket
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import av
import numpy as np

SAMPLE_RATE = 16000
MAX_SECONDS = 300
DEFAULT_WHISPER = "tiny.en"
WHISPER_HINT = "pass a local Whisper .pt checkpoint via --whisper=PATH or OMNIPHI_WHISPER=PATH"

# voice activity check before decoding (30 ms frames)
VAD_FRAME = 480
VAD_MIN_RMS = 10 ** (-55 / 20)  # frames quieter than -55 dBFS are silence
VAD_MAX_FLATNESS = 0.3  # spectral flatness: ~0.56 for white noise, ~0.01-0.1 for voiced speech
VAD_MIN_SECONDS = 0.15  # at least this much loud, tonal audio
VAD_MIN_SPREAD_DB = 6.0  # speech rises and falls by syllable; steady tones, hum and hiss do not
# after decoding, a segment is dropped as non-speech when whisper thinks so and its text is unsure or repetitive
NO_SPEECH_PROB = 0.6
MIN_AVG_LOGPROB = -1.0
MAX_COMPRESSION_RATIO = 2.4
TEMPERATURES = (0.0, 0.4, 0.8)  # fallback when a decode is repetitive or unsure; bounded for latency
NON_SPEECH_MARKUP = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*|♪")


class AudioError(ValueError):
    """The input is not usable audio."""


class NoSpeechError(AudioError):
    """The audio holds only silence or noise."""


class WhisperUnavailableError(RuntimeError):
    """No Whisper weights can be had (missing file, offline, or openai-whisper not installed)."""


@dataclass
class Transcript:
    text: str
    language: str  # ISO code, detected when the model is multilingual
    duration: float  # seconds of audio


# -----------------------------------------------------------------------------
# decoding

def load_audio(source, *, max_seconds=MAX_SECONDS):
    """Decode a path, bytes or binary file object to a float32 array at 16 kHz mono."""
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    name, file = _open_source(source)
    try:
        container = av.open(file, mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise AudioError(f"not an audio file: {name} ({e.strerror})") from None
    with container:
        return _decode(container, name, max_seconds)


def _open_source(source):
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"audio file not found: {path}")
        if not path.is_file():
            raise AudioError(f"not an audio file: {path} is not a regular file")
        if path.stat().st_size == 0:
            raise AudioError(f"empty audio file: {path} has 0 bytes")
        return str(path), str(path)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioError("empty audio: got 0 bytes")
        return "<bytes>", io.BytesIO(bytes(source))
    if hasattr(source, "read"):
        return str(getattr(source, "name", "<file object>")), source
    raise TypeError(f"load_audio expects a path, bytes or a binary file object, got {type(source).__name__}")


def _decode(container, name, max_seconds):
    if not container.streams.audio:
        found = ", ".join(s.type for s in container.streams) or "no streams"
        raise AudioError(f"not an audio file: {name} has no audio stream ({found})")
    stream = container.streams.audio[0]
    if stream.codec_context is None:
        raise AudioError(f"unsupported audio codec in {name}: no decoder for it in PyAV's FFmpeg build")
    resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)  # keeps the channels; we average them
    max_samples = int(max_seconds * SAMPLE_RATE)
    chunks, n_samples, first_error = [], 0, None

    def take(frames):
        nonlocal n_samples
        for frame in frames:
            chunk = frame.to_ndarray().mean(axis=0, dtype=np.float32)
            chunks.append(chunk)
            n_samples += len(chunk)
        if n_samples > max_samples:
            raise AudioError(f"audio in {name} is longer than the {max_seconds:g} s limit (max_seconds)")

    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.FFmpegError as e:  # damaged container: keep what came before
            first_error = first_error or e
            break
        try:
            for frame in packet.decode():
                take(resampler.resample(frame))
        except av.error.FFmpegError as e:  # damaged packet: skip it, as ffmpeg does
            first_error = first_error or e
    take(resampler.resample(None))
    if n_samples == 0:
        if first_error is not None:
            raise AudioError(f"no decodable audio in {name}: {first_error.strerror}")
        raise AudioError(f"empty audio: {name} holds no audio samples")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def might_be_speech(audio):
    """Cheap voice activity check: enough loud frames whose spectrum is tonal rather than flat like noise,
    in audio whose loudness varies as speech does."""
    n_frames = len(audio) // VAD_FRAME
    if n_frames == 0:
        return False
    frames = audio[: n_frames * VAD_FRAME].reshape(n_frames, VAD_FRAME).astype(np.float64)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    loud = frames[rms > VAD_MIN_RMS]
    if len(loud) == 0:
        return False
    level_db = 20 * np.log10(rms + 1e-10)
    if np.percentile(level_db, 90) - np.percentile(level_db, 10) < VAD_MIN_SPREAD_DB:
        return False
    power = np.abs(np.fft.rfft(loud * np.hanning(VAD_FRAME), axis=1)) ** 2
    freqs = np.fft.rfftfreq(VAD_FRAME, 1 / SAMPLE_RATE)
    power = power[:, (freqs >= 80) & (freqs <= 4000)] + 1e-12
    flatness = np.exp(np.mean(np.log(power), axis=1)) / np.mean(power, axis=1)
    return np.sum(flatness < VAD_MAX_FLATNESS) * VAD_FRAME / SAMPLE_RATE >= VAD_MIN_SECONDS


# -----------------------------------------------------------------------------
# whisper weights

_models = {}  # (checkpoint, device) -> Whisper
_models_lock = threading.Lock()
_decode_locks = weakref.WeakKeyDictionary()  # Whisper -> Lock held while it decodes
_decode_locks_lock = threading.Lock()


def _import_whisper():
    try:
        import whisper
    except ImportError as e:
        raise WhisperUnavailableError(f"openai-whisper is not installed ({e}); pip install openai-whisper") from None
    return whisper


def _whisper_cache_dir():
    return os.path.join(os.getenv("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "whisper")


def resolve_whisper(spec=None):
    """Turn a model name or path (default: $OMNIPHI_WHISPER, then tiny.en) into a local checkpoint path,
    or into a model name that whisper will download on first use."""
    spec = str(spec or os.environ.get("OMNIPHI_WHISPER") or DEFAULT_WHISPER)
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path.resolve())
    whisper = _import_whisper()
    if spec in whisper.available_models():
        cached = os.path.join(_whisper_cache_dir(), os.path.basename(whisper._MODELS[spec]))
        return cached if os.path.isfile(cached) else spec
    if os.sep in spec or spec.endswith(".pt"):
        raise FileNotFoundError(f"Whisper checkpoint not found: {path}; {WHISPER_HINT}")
    names = ", ".join(whisper.available_models())
    raise ValueError(f"unknown Whisper model {spec!r}: expected one of {names}, or a .pt path; {WHISPER_HINT}")


def whisper_available(spec=None, *, timeout=3.0):
    """(True, what will be used) or (False, why not), without loading any weights."""
    try:
        source = resolve_whisper(spec)
    except (WhisperUnavailableError, FileNotFoundError, ValueError) as e:
        return False, str(e)
    if os.path.isfile(source):
        with open(source, "rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
            return False, f"{source} is not a PyTorch checkpoint; {WHISPER_HINT}"
        return True, f"Whisper weights at {source}"
    host = urlparse(_import_whisper()._MODELS[source]).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False, (f"Whisper model {source!r} is not cached in {_whisper_cache_dir()} and {host} cannot be "
                       f"reached (offline?); {WHISPER_HINT}")
    return True, f"Whisper model {source!r} will be downloaded from {host} on first use"


def load_whisper(spec=None, *, device=None):
    """The Whisper model for `spec` on `device`, loaded once and then reused."""
    import torch
    whisper = _import_whisper()
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = resolve_whisper(spec)
    key = (source, device)
    with _models_lock:
        if key not in _models:
            try:
                model = whisper.load_model(source, device=device)
            except OSError as e:  # includes urllib's URLError when the download fails
                if os.path.isfile(source):
                    raise
                raise WhisperUnavailableError(f"cannot download Whisper model {source!r} ({e}); {WHISPER_HINT}") from None
            except Exception as e:
                raise WhisperUnavailableError(f"cannot load Whisper checkpoint {source}: {e}") from None
            _models[key] = model.eval()
        return _models[key]


# -----------------------------------------------------------------------------
# transcription

def transcribe_full(audio, model=None, *, language=None, device=None, max_seconds=MAX_SECONDS):
    """Transcribe speech to a Transcript. `audio` is a 16 kHz mono float array or anything load_audio
    takes; `model` is a loaded Whisper, a model name or a .pt path. Raises NoSpeechError on silence/noise."""
    audio = _as_audio(audio, max_seconds)
    whisper = _import_whisper()
    model = model if isinstance(model, whisper.Whisper) else load_whisper(model, device=device)
    language = _language_code(whisper, model, language)
    duration = len(audio) / SAMPLE_RATE
    if not might_be_speech(audio):
        raise NoSpeechError("no speech detected")
    with _decode_locks_lock:
        lock = _decode_locks.setdefault(model, threading.Lock())
    with lock:
        result = whisper.transcribe(
            model, audio, language=language, verbose=None, fp16=model.device.type == "cuda",
            temperature=TEMPERATURES, no_speech_threshold=NO_SPEECH_PROB, logprob_threshold=MIN_AVG_LOGPROB,
            compression_ratio_threshold=MAX_COMPRESSION_RATIO, condition_on_previous_text=False,
        )
    segments = [s for s in result["segments"] if not _is_non_speech(s)]
    text = "".join(s["text"] for s in segments).strip()
    if not re.search(r"\w", NON_SPEECH_MARKUP.sub("", text)):
        raise NoSpeechError("no speech detected")
    return Transcript(text=text, language=result["language"], duration=duration)


def transcribe(audio, model=None, *, language=None, device=None, max_seconds=MAX_SECONDS):
    """Transcribe speech to stripped text; see transcribe_full."""
    return transcribe_full(audio, model, language=language, device=device, max_seconds=max_seconds).text


def _as_audio(audio, max_seconds):
    if not isinstance(audio, np.ndarray):
        return load_audio(audio, max_seconds=max_seconds)
    if audio.ndim != 1 or audio.dtype.kind != "f":
        raise AudioError(f"audio array must be 1-D float at {SAMPLE_RATE} Hz, got {audio.dtype} {audio.shape}")
    if len(audio) == 0:
        raise AudioError("empty audio: the array has no samples")
    if not np.isfinite(audio).all():
        raise AudioError("audio array holds NaN or infinite samples")
    return audio.astype(np.float32, copy=False)


def _language_code(whisper, model, language):
    if language is None:
        return None  # whisper detects it on multilingual models and uses "en" on English-only ones
    key = language.lower()
    code = whisper.tokenizer.TO_LANGUAGE_CODE.get(key, key)
    if code not in whisper.tokenizer.LANGUAGES:
        raise ValueError(f"unknown language {language!r} for Whisper")
    if code != "en" and not model.is_multilingual:
        raise ValueError(f"language {language!r} needs a multilingual Whisper model; this one is English-only")
    return code


def _is_non_speech(segment):
    unsure = segment["avg_logprob"] < MIN_AVG_LOGPROB or segment["compression_ratio"] > MAX_COMPRESSION_RATIO
    return segment["no_speech_prob"] > NO_SPEECH_PROB and unsure
