"""
Command-line inference: answer a text, image or spoken prompt, streaming the reply to the terminal, or chat.

    python generate.py --model=out/lm-demo --prompt="def fib(n):" --raw
    python generate.py --mm=out/mm-demo --image=shape.png --prompt="What shape is in the image?"
    python generate.py --mm=out/mm-demo --audio=question.wav --image=shape.png
    python generate.py --model=checkpoints/phi-2 --chat --system="You are a helpful assistant."
    python generate.py --model=checkpoints/phi-2 --prompt="Write a haiku." --num_samples=3 --seed=7

--model and --mm take a checkpoint folder or the run folder that holds it. In --chat, each line you type is a turn
(the conversation so far is the prompt); an empty line or Ctrl-D ends it, /reset starts again, /image PATH attaches an
image to the next turn.
"""

import sys
from dataclasses import dataclass

import torch

from clip_encoder import load_image
from common import fail, parse_config, resolve_device
from multimodal import ChatModel
from tokenizer import StreamDecoder, speech_text


@dataclass
class GenerateConfig:
    model: str = ""  # language model folder (or run folder) or hub id; default: the one the --mm checkpoint names
    mm: str = ""  # multimodal checkpoint folder (or run folder): mm_config.json, projector, adapter
    prompt: str = ""  # the text to answer (or, with --raw, to continue)
    image: str = ""  # an image file for the prompt (needs --mm)
    audio: str = ""  # a spoken prompt (any audio file), transcribed by Whisper
    whisper: str = ""  # Whisper model name or local .pt (default: $OMNIPHI_WHISPER)
    chat: bool = False  # an interactive multi-turn conversation on the terminal
    system: str = ""  # a system message before the conversation
    raw: bool = False  # continue the prompt as plain text instead of answering it as a chat
    num_samples: int = 1  # answers to the same prompt, one after the other (seed, seed + 1, ...)
    max_new_tokens: int = 256  # longest answer in tokens
    temperature: float = 0.7  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # nucleus sampling; 1: off
    seed: int = 0  # sampling seed (sample k uses seed + k)
    device: str = "auto"  # auto (cuda if there is one) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on a GPU, float32 on a CPU) | float32 | bfloat16 | float16
    quantize: str = ""  # "", nf4 or int8 weight-only quantization of the block linears (on a CPU, nf4 with
    # --dtype=bfloat16 decodes fastest: bitsandbytes' 4-bit kernel)
    compile: bool = False  # decode with the torch.compile'd step (compiling takes a while, then decodes faster)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0 (0 is greedy), not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], not {self.top_p}")
        for name in ("top_k", "max_new_tokens", "num_samples"):
            if getattr(self, name) < (0 if name == "top_k" else 1):
                raise ValueError(f"--{name} must be at least {0 if name == 'top_k' else 1}, not {getattr(self, name)}")
        if self.quantize not in ("", "nf4", "int8"):
            raise ValueError(f"--quantize must be nf4 or int8, not {self.quantize!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if not (self.model or self.mm):
            raise ValueError("no model: pass --model=DIR (a language model) or --mm=DIR (a multimodal checkpoint)")
        if not (self.prompt or self.audio or self.chat):
            raise ValueError("nothing to answer: pass --prompt=..., --audio=PATH or --chat")


def sampling(cfg):
    return dict(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1 else None)


def raw_continuation(chat, cfg, seed):
    tok = chat.tokenizer
    ids = torch.tensor([tok.encode(cfg.prompt, allow_special=False)], device=chat.device)
    decoder = StreamDecoder(tok)
    generator = torch.Generator(chat.device).manual_seed(seed)
    print(cfg.prompt, end="", flush=True)
    for token in chat.model.generate_stream(ids, min(cfg.max_new_tokens, chat.context - ids.shape[1]),
                                            decoder=chat.decoder, generator=generator, **sampling(cfg)):
        if int(token[0]) == tok.eos_id:
            break
        print(decoder.push(token[0]), end="", flush=True)
    print()


def answer(chat, cfg, messages, images, seed):
    for piece in chat.stream(messages, images, max_tokens=cfg.max_new_tokens, seed=seed, **sampling(cfg)):
        print(piece, end="", flush=True)
    print()


def converse(chat, cfg):
    """The --chat loop: the conversation so far is the prompt of every turn."""
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages, images, pending, turn = list(system), [], [load_image(cfg.image)] if cfg.image else [], 0
    print("chat: type a message (empty line or Ctrl-D to quit, /reset, /image PATH)", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        if text == "/reset":
            messages, images, pending = list(system), [], []
            continue
        if text.startswith("/image "):
            try:
                pending.append(load_image(text.removeprefix("/image ").strip()))
            except (ValueError, FileNotFoundError) as err:
                print(f"error: {err}", file=sys.stderr)
            continue
        content = "<image>\n" * len(pending) + text
        messages.append({"role": "user", "content": content})
        try:
            reply = "".join(piece for piece in _printed(chat.stream(
                messages, images + pending, max_tokens=cfg.max_new_tokens, seed=cfg.seed + turn, **sampling(cfg))))
        except ValueError as err:  # e.g. the conversation outgrew the context
            print(f"error: {err}", file=sys.stderr)
            messages.pop()
            continue
        images, pending, turn = images + pending, [], turn + 1
        messages.append({"role": "assistant", "content": reply})


def _printed(pieces):
    for piece in pieces:
        print(piece, end="", flush=True)
        yield piece
    print()


def main(argv):
    cfg = parse_config(GenerateConfig, argv, doc=__doc__)
    device = resolve_device(cfg.device)
    dtype = ("bfloat16" if device.type == "cuda" else "float32") if cfg.dtype == "auto" else cfg.dtype
    chat = ChatModel(cfg.model or None, mm=cfg.mm or None, device=str(device), dtype=dtype,
                     quantize=cfg.quantize or None, whisper=cfg.whisper or None, compile=cfg.compile)
    if cfg.chat:
        return converse(chat, cfg)
    if cfg.raw:
        for k in range(cfg.num_samples):
            raw_continuation(chat, cfg, cfg.seed + k)
        return
    text = cfg.prompt
    if cfg.audio:
        transcript = chat.transcribe(cfg.audio)
        print(f"[heard] {transcript}", file=sys.stderr)
        text = speech_text(transcript, typed=cfg.prompt)
    images = [load_image(cfg.image)] if cfg.image else []
    if images and "<image>" not in text:
        text = "<image>\n" + text
    for k in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {k + 1} of {cfg.num_samples} (seed {cfg.seed + k})", file=sys.stderr)
        answer(chat, cfg, [{"role": "user", "content": text}], images, cfg.seed + k)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as err:
        fail("generate.py", err)
