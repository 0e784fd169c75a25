"""
Benchmark speech input: real-time factor (processing seconds / audio seconds) of audio.load_audio (PyAV)
+ audio.transcribe against openai-whisper's own path, whisper.transcribe(model, file), which decodes with
the ffmpeg program. Same Whisper weights, same espeak-ng clip as WAV, browser-style WebM/Opus and MP3.

    python bench/bench_audio.py [--whisper=path/to/whisper-tiny.en.pt] [--repeats=3] [--device=cpu]
"""

import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import whisper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import audio  # noqa: E402
from common import parse_config  # noqa: E402


SHARED_WHISPER = Path(__file__).resolve().parents[2] / "shared/models/whisper-tiny.en.pt"


@dataclass
class BenchConfig:
    whisper: str = os.environ.get("OMNIPHI_WHISPER", str(SHARED_WHISPER))  # Whisper name or .pt file
    repeats: int = 3  # interleaved runs of each path; the median counts
    device: str = "cpu"  # cpu | cuda | cuda:N

SENTENCES = [
    "Please open the window and let some fresh air into the room.",
    "My favorite color is blue and I like to read books.",
    "Thank you very much for your help yesterday.",
    "We are going to the park this afternoon.",
    "Good morning, how are you today?",
    "Can you tell me where the nearest station is?",
]


def word_error_rate(reference, hypothesis):
    normalize = lambda s: re.sub(r"[^\w\s']", " ", s.lower()).split()
    ref, hyp = normalize(reference), normalize(hypothesis)
    distance = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, distance[0] = distance[0], i
        for j, h in enumerate(hyp, 1):
            previous, distance[j] = distance[j], min(distance[j] + 1, distance[j - 1] + 1, previous + (r != h))
    return distance[-1] / len(ref)


def encode(samples, rate, container_format, codec, out_rate):
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32), format="fltp", layout="mono")
    frame.sample_rate = rate
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=out_rate, layout="mono")
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=out_rate)
        for f in [*resampler.resample(frame), *resampler.resample(None), None]:
            for packet in stream.encode(f):
                container.mux(packet)
    return buffer.getvalue()


def cpu_seconds():
    t = os.times()  # includes finished child processes, so whisper's ffmpeg runs are counted too
    return t.user + t.system + t.children_user + t.children_system


def measure(fn):
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def main():
    args = parse_config(BenchConfig, sys.argv[1:], doc=__doc__)

    workdir = Path(tempfile.mkdtemp(prefix="bench_audio_"))
    wav = workdir / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), " ".join(SENTENCES)], check=True)
    with av.open(str(wav)) as container:
        original = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1) / 32768
    files = {"wav (22.05 kHz s16)": wav}
    for label, suffix, fmt, codec, rate in [("webm/opus (browser)", ".webm", "webm", "libopus", 48000),
                                            ("mp3", ".mp3", "mp3", "libmp3lame", 22050)]:
        files[label] = workdir / f"speech{suffix}"
        files[label].write_bytes(encode(original, 22050, fmt, codec, rate))
    seconds = original.shape[1] / 22050
    reference = " ".join(SENTENCES)

    model = audio.load_whisper(args.whisper, device=args.device)
    fp16 = model.device.type == "cuda"
    audio.transcribe(audio.load_audio(wav), model)  # warm up
    has_ffmpeg = shutil.which("ffmpeg") is not None

    paths = {  # name -> (decode only, decode + transcribe -> text)
        "omniphi load_audio (PyAV) + transcribe": (
            audio.load_audio, lambda path: audio.transcribe(audio.load_audio(path), model)),
        "whisper.transcribe(model, path) (ffmpeg CLI)": (
            lambda path: whisper.load_audio(str(path)),
            lambda path: whisper.transcribe(model, str(path), fp16=fp16, verbose=None)["text"]),
    }
    rows = []
    for label, path in files.items():
        runs = {name: [] for name in paths}
        for _ in range(args.repeats):  # interleaved, so both paths see the same machine load
            for name, (decode, full) in paths.items():
                if name.startswith("whisper") and not has_ffmpeg:
                    continue
                decode_wall, _, _ = measure(lambda: decode(path))
                wall, cpu, text = measure(lambda: full(path))
                runs[name].append((decode_wall, wall, cpu, word_error_rate(reference, text)))
        for name, results in runs.items():
            medians = [statistics.median(column) for column in zip(*results)] if results else None
            rows.append((name, label, medians))

    device = torch.cuda.get_device_name() if fp16 else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    print(f"\nWhisper {Path(args.whisper).name} on {device}; {seconds:.1f} s espeak-ng clip; median of "
          f"{args.repeats} interleaved runs; load average {os.getloadavg()[0]:.2f} (the machine is shared)\n")
    print("| path | input | decode s | decode + transcribe s | RTF (wall) | RTF (CPU s / audio s) | WER |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, label, medians in rows:
        if medians is None:
            print(f"| {name} | {label} | n/a: no ffmpeg on PATH | | | | |")
            continue
        decode_s, wall, cpu, wer = medians
        print(f"| {name} | {label} | {decode_s:.3f} | {wall:.2f} | {wall / seconds:.3f} | {cpu / seconds:.3f} | {wer:.1%} |")
    shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
