"""
Tests for audio.py: decoding every common format with PyAV (no ffmpeg program), the documented errors for
bad input, and transcription with the real Whisper tiny.en weights on espeak-ng speech.
"""

import inspect
import io
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest

import audio
from audio import AudioError, NoSpeechError, WhisperUnavailableError, load_audio, transcribe, transcribe_full

WHISPER_PATH = Path(__file__).resolve().parents[1].parent / "shared/models/whisper-tiny.en.pt"
SENTENCES = [
    "Please open the window and let some fresh air into the room.",
    "My favorite color is blue and I like to read books.",
    "Thank you very much for your help yesterday.",
]


def word_error_rate(reference, hypothesis):
    normalize = lambda s: re.sub(r"[^\w\s']", " ", s.lower()).split()
    ref, hyp = normalize(reference), normalize(hypothesis)
    distance = list(range(len(hyp) + 1))  # Levenshtein over words, one row at a time
    for i, r in enumerate(ref, 1):
        previous, distance[0] = distance[0], i
        for j, h in enumerate(hyp, 1):
            previous, distance[j] = distance[j], min(distance[j] + 1, distance[j - 1] + 1, previous + (r != h))
    return distance[-1] / len(ref)


def encode(samples, rate, container_format, codec, *, out_rate=None, layout="mono"):
    """Encode float samples (channels, n) or (n,) to bytes with PyAV."""
    samples = np.ascontiguousarray(np.atleast_2d(samples), dtype=np.float32)
    frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
    frame.sample_rate = rate
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=out_rate or rate, layout=layout)
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=out_rate or rate)
        for f in [*resampler.resample(frame), *resampler.resample(None), None]:
            for packet in stream.encode(f):
                container.mux(packet)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def whisper_model():
    if not WHISPER_PATH.is_file():
        pytest.skip(f"real Whisper weights not found at {WHISPER_PATH}")
    return audio.load_whisper(WHISPER_PATH, device="cpu")


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    """Three English sentences from espeak-ng at its native 22,050 Hz."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), " ".join(SENTENCES)], check=True)
    return path


@pytest.fixture(scope="module")
def speech(speech_wav):
    return load_audio(speech_wav)


# -----------------------------------------------------------------------------
# decoding


def test_wav_decodes_to_16k_mono_float32(speech_wav, speech):
    with av.open(str(speech_wav)) as container:
        stream = container.streams.audio[0]
        assert stream.rate == 22050
        seconds = stream.duration * stream.time_base
    assert speech.dtype == np.float32 and speech.ndim == 1
    assert abs(len(speech) - seconds * 16000) <= 2
    assert 0.1 < np.abs(speech).max() <= 1.0


@pytest.mark.parametrize("container_format, codec, rate", [
    ("mp3", "libmp3lame", 22050), ("webm", "libopus", 48000), ("ogg", "libopus", 48000),
    ("ipod", "aac", 22050), ("flac", "flac", 22050),  # "ipod" is the muxer for .m4a
])
def test_common_formats_decode_to_the_same_audio(speech, container_format, codec, rate):
    data = encode(speech, 16000, container_format, codec, out_rate=rate)
    decoded = load_audio(data)
    assert abs(len(decoded) - len(speech)) < 0.15 * 16000  # encoders pad by a few frames
    n = min(len(decoded), len(speech))
    xcorr = np.fft.irfft(np.fft.rfft(decoded[:n], 2 * n) * np.conj(np.fft.rfft(speech[:n], 2 * n)))
    lag = int(np.argmax(xcorr[:n]))  # aac's priming delay (1024 samples) is left in
    assert lag < 0.1 * 16000
    assert np.corrcoef(speech[: n - lag], decoded[lag:n])[0, 1] > (0.999 if codec == "flac" else 0.9)


def test_path_bytes_and_file_object_give_the_same_array(speech_wav, speech):
    data = speech_wav.read_bytes()
    np.testing.assert_array_equal(load_audio(data), speech)
    np.testing.assert_array_equal(load_audio(bytearray(data)), speech)
    np.testing.assert_array_equal(load_audio(str(speech_wav)), speech)
    with open(speech_wav, "rb") as f:
        np.testing.assert_array_equal(load_audio(f), speech)


def test_stereo_44k_averages_to_mono_16k():
    t = np.arange(2 * 44100) / 44100
    left, right = np.sin(2 * np.pi * 440 * t), np.zeros_like(t)
    decoded = load_audio(encode(np.stack([left, right]), 44100, "wav", "pcm_s16le", layout="stereo"))
    assert len(decoded) == 2 * 16000
    assert abs(np.abs(decoded).max() - 0.5) < 0.01  # mean of the two channels
    spectrum = np.abs(np.fft.rfft(decoded))
    assert np.fft.rfftfreq(len(decoded), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=1)


def test_no_ffmpeg_program_needed(speech_wav, monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert shutil.which("ffmpeg") is None
    assert len(load_audio(speech_wav)) > 0


# -----------------------------------------------------------------------------
# bad input


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="audio file not found"):
        load_audio(tmp_path / "nope.wav")


def test_text_file_renamed_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are my meeting notes, not a recording\n" * 20)
    with pytest.raises(AudioError, match="not an audio file"):
        load_audio(path)


def test_random_bytes_and_empty_input(tmp_path):
    with pytest.raises(AudioError, match="not an audio file"):
        load_audio(np.random.default_rng(0).bytes(20000))
    with pytest.raises(AudioError, match="empty audio"):
        load_audio(b"")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty audio file"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(TypeError, match="path, bytes or a binary file object"):
        load_audio(12345)


def test_unsupported_codec(speech_wav):
    data = bytearray(speech_wav.read_bytes())
    data[20:22] = (0x1234).to_bytes(2, "little")  # WAVE format tag no decoder knows
    with pytest.raises(AudioError, match="unsupported audio codec"):
        load_audio(bytes(data))


def test_truncated_files_keep_the_decodable_prefix(speech_wav, speech):
    wav = speech_wav.read_bytes()
    half = load_audio(wav[: len(wav) // 2])
    assert abs(len(half) - len(speech) / 2) < 0.05 * 16000
    np.testing.assert_allclose(half[:16000], speech[:16000], atol=1e-6)
    for container_format, codec in [("mp3", "libmp3lame"), ("webm", "libopus")]:
        data = encode(speech, 16000, container_format, codec)
        assert abs(len(load_audio(data[: len(data) // 2])) - len(speech) / 2) < 0.25 * 16000
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(wav[:44])  # a WAVE header and nothing after it
    with pytest.raises(AudioError, match="not an audio file"):
        load_audio(wav[:20])  # cut inside the header


def test_corrupt_middle_skips_the_damage(speech):
    data = bytearray(encode(speech, 16000, "mp3", "libmp3lame"))
    middle = len(data) // 2
    data[middle: middle + 2000] = np.random.default_rng(0).bytes(2000)
    decoded = load_audio(bytes(data))
    assert len(decoded) > 0.8 * len(speech)


def test_over_long_audio_is_refused_without_decoding_it_all():
    assert inspect.signature(load_audio).parameters["max_seconds"].default == 300
    minute = 0.1 * np.sin(2 * np.pi * 220 * np.arange(60 * 16000) / 16000)
    data = encode(minute, 16000, "wav", "pcm_s16le")

    class CountingReader(io.BytesIO):
        bytes_read = 0

        def read(self, n=-1):
            chunk = super().read(n)
            self.bytes_read += len(chunk)
            return chunk

    reader = CountingReader(data)
    with pytest.raises(AudioError, match="longer than the 2 s limit"):
        load_audio(reader, max_seconds=2)
    assert reader.bytes_read < 0.2 * len(data)
    assert len(load_audio(data, max_seconds=61)) == 60 * 16000


# -----------------------------------------------------------------------------
# transcription


@pytest.mark.parametrize("container_format, codec", [("wav", "pcm_s16le"), ("mp3", "libmp3lame"), ("webm", "libopus")])
def test_transcribes_speech_in_each_format(whisper_model, speech_wav, container_format, codec):
    source = speech_wav
    if container_format != "wav":
        with av.open(str(speech_wav)) as container:  # re-encode the original 22,050 Hz speech
            original = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1) / 32768
        source = encode(original, 22050, container_format, codec, out_rate=48000 if codec == "libopus" else 22050)
    result = transcribe_full(source, whisper_model)
    assert word_error_rate(" ".join(SENTENCES), result.text) <= 0.15, result.text
    assert result.text == result.text.strip()
    assert result.language == "en"
    assert result.duration == pytest.approx(len(load_audio(source)) / 16000)


def test_silence_and_noise_raise_no_speech(whisper_model):
    rng = np.random.default_rng(0)
    silence = np.zeros(3 * 16000, np.float32)
    hiss = (0.1 * rng.standard_normal(3 * 16000)).astype(np.float32)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(3 * 16000) / 16000)).astype(np.float32)
    rumble = np.cumsum(rng.standard_normal(3 * 16000)).astype(np.float32)
    rumble = 0.3 * rumble / np.abs(rumble).max()
    for noise in (silence, hiss, tone, rumble):
        with pytest.raises(NoSpeechError, match="no speech detected"):
            transcribe(noise, whisper_model)
    assert audio.might_be_speech(rumble)  # so this one is rejected by whisper's no_speech_prob, after decoding
    assert issubclass(NoSpeechError, AudioError) and issubclass(AudioError, ValueError)


def test_model_is_cached_and_shared_across_threads(whisper_model, speech):
    assert audio.load_whisper(str(WHISPER_PATH), device="cpu") is whisper_model
    clip = speech[: 4 * 16000]  # "Please open the window and let some fresh air..."
    texts = [None, None]

    def work(i):
        texts[i] = transcribe(clip, str(WHISPER_PATH), device="cpu")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert texts[0] == texts[1] and "window" in texts[0].lower()


def test_bad_arrays_and_languages(whisper_model):
    with pytest.raises(AudioError, match="1-D float"):
        transcribe(np.zeros((2, 16000), np.float32), whisper_model)
    with pytest.raises(AudioError, match="NaN"):
        transcribe(np.full(16000, np.nan, np.float32), whisper_model)
    with pytest.raises(ValueError, match="English-only"):
        transcribe(np.zeros(16000, np.float32), whisper_model, language="french")
    with pytest.raises(ValueError, match="unknown language"):
        transcribe(np.zeros(16000, np.float32), whisper_model, language="klingon")


# -----------------------------------------------------------------------------
# finding weights


def test_whisper_available_and_resolve(tmp_path, monkeypatch):
    if not WHISPER_PATH.is_file():
        pytest.skip(f"real Whisper weights not found at {WHISPER_PATH}")
    real = WHISPER_PATH.resolve()  # paths are reported with symlinks resolved
    assert audio.whisper_available(WHISPER_PATH) == (True, f"Whisper weights at {real}")
    monkeypatch.setenv("OMNIPHI_WHISPER", str(WHISPER_PATH))
    assert audio.resolve_whisper(None) == str(real)

    ok, reason = audio.whisper_available(tmp_path / "missing.pt")
    assert not ok and "not found" in reason and "--whisper" in reason and "OMNIPHI_WHISPER" in reason
    (tmp_path / "fake.pt").write_text("not weights")
    ok, reason = audio.whisper_available(tmp_path / "fake.pt")
    assert not ok and "not a PyTorch checkpoint" in reason
    ok, reason = audio.whisper_available("tiny.fr")
    assert not ok and "unknown Whisper model" in reason

    # a model name that is neither cached nor downloadable (offline)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(audio.socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    ok, reason = audio.whisper_available("base.en")
    assert not ok and "cannot be reached" in reason and "OMNIPHI_WHISPER" in reason

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(WhisperUnavailableError, match="--whisper"):
        audio.load_whisper("base.en", device="cpu")


def test_language_detection_and_segment_filter_use_whisper_results(speech, monkeypatch):
    import whisper
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=8, n_audio_head=1, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=448, n_text_state=8, n_text_head=1, n_text_layer=1)
    multilingual = Whisper(dims)
    assert multilingual.is_multilingual
    calls, segments = [], []

    def fake_transcribe(model, samples, **options):
        calls.append(options)
        return {"language": options["language"] or "de", "segments": segments}

    monkeypatch.setattr(whisper, "transcribe", fake_transcribe)
    segments[:] = [{"text": " Guten Tag.", "no_speech_prob": 0.1, "avg_logprob": -0.3, "compression_ratio": 1.0}]
    result = transcribe_full(speech, multilingual)
    assert calls[-1]["language"] is None  # whisper detects the language itself
    assert (result.text, result.language) == ("Guten Tag.", "de")
    assert transcribe_full(speech, multilingual, language="German").language == "de"

    unsure = {"text": " Thank you.", "no_speech_prob": 0.9, "avg_logprob": -1.5, "compression_ratio": 1.0}
    for kept in ([unsure], [dict(unsure, avg_logprob=-0.2, text=" [BLANK_AUDIO]")], []):
        segments[:] = kept
        with pytest.raises(NoSpeechError, match="no speech detected"):
            transcribe(speech, multilingual)
    segments[:] = [dict(unsure, avg_logprob=-0.2)]  # whisper's rule keeps a confident segment
    assert transcribe(speech, multilingual) == "Thank you."
