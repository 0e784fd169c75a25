"""
Command-line inference: answer a text, image or spoken prompt, streaming the reply to the terminal.

    python generate.py --model=out/lm-demo --prompt="def fib(n):" --raw
    python generate.py --mm=out/mm-demo --image=shape.png --prompt="What shape is in the image?"
    python generate.py --mm=out/mm-demo --audio=question.wav --image=shape.png

ChatModel (also used by serve.py) holds a language model, optionally a vision tower + projector + LoRA
adapter from a multimodal checkpoint (mm_config.json), and turns chat messages into a token stream.
"""

import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from model import Phi
from projector import splice_image_features
from tokenizer import IMAGE_TOKEN_ID, StreamDecoder, Tokenizer, encode_chat, speech_text
from train_lm import parse_config


class ChatModel:
    def __init__(self, lm, *, mm=None, device="cpu", dtype=None, quantize=None, whisper=None, compile=False):
        self.device, self.whisper = device, whisper
        # compiled decoding: a graph per cache size (the first reply of each size waits for it), CUDA graphs on GPU
        self.compile = ("reduce-overhead" if str(device).startswith("cuda") else "default") if compile else None
        self.tokenizer = Tokenizer()
        self.vision = self.projector = self.mm_config = None
        if mm is not None:
            mm = Path(mm)
            if not (mm / "mm_config.json").is_file():
                raise FileNotFoundError(f"{mm} is not a multimodal checkpoint (no mm_config.json)")
            self.mm_config = json.loads((mm / "mm_config.json").read_text())
            lm = lm or resolve_relative(mm, self.mm_config["lm"])
        if lm is None:
            raise ValueError("no language model given: pass --model=DIR (or --mm=CKPT whose mm_config names one)")
        self.model = Phi.from_pretrained(lm, dtype=dtype, device=device, quantize=quantize)
        if self.mm_config is not None:
            self._load_multimodal(mm, dtype, quantize)
        if self.compile:
            self.model.compiled_decode_step(self.compile)  # refuses what it cannot compile now, not at the first reply
        self.lock = threading.Lock()  # one generation at a time on the model

    def _load_multimodal(self, mm, dtype, quantize):
        from clip_encoder import CLIPVision
        from projector import load_projector
        c = self.mm_config
        self.vision = CLIPVision.from_pretrained(resolve_relative(mm, c["vision"]), dtype=dtype, device=self.device).eval()
        self.projector = load_projector(mm / "projector.safetensors", dtype=self.model.model.embed_tokens.weight.dtype,
                                        device=self.device).eval()
        if (mm / "adapter_config.json").is_file():
            from lora import load_adapter, merge_lora
            load_adapter(self.model, mm, quantize=quantize)
            if quantize is None:
                merge_lora(self.model)  # plain linears decode fastest

    @property
    def context(self):
        return self.model.config.max_position_embeddings

    def transcribe(self, audio):
        """Speech (path, bytes or a decoded 16 kHz array) -> text, with the Whisper of --whisper / OMNIPHI_WHISPER."""
        import numpy as np

        from audio import load_audio, transcribe
        return transcribe(audio if isinstance(audio, np.ndarray) else load_audio(audio), model=self.whisper)

    def prompt_embeddings(self, messages, images=()):
        """Chat messages (content with '<image>' placeholders) + PIL images in order -> (embeddings (1, T, D), T)."""
        ids, _ = encode_chat(self.tokenizer, messages)
        n_placeholders = ids.count(IMAGE_TOKEN_ID)
        if n_placeholders != len(images):
            raise ValueError(f"the messages have {n_placeholders} <image> placeholders but {len(images)} images were given")
        embed = self.model.model.embed_tokens
        if not images:
            return embed(torch.tensor([ids], device=self.device)), len(ids)
        if self.vision is None:
            raise ValueError("this model has no vision tower: start it with a multimodal checkpoint (--mm) to send images")
        c = self.mm_config
        pixels = self.vision.preprocess(list(images), pad_to_square=c.get("pad_to_square", False))
        pixels = pixels.to(self.device, self.vision_dtype)
        features = self.projector(self.vision.features(pixels, layer=c.get("feature_layer", -2)).to(embed.weight.dtype))
        x = splice_image_features([ids], embed, list(features)).inputs_embeds
        return x, x.shape[1]

    @property
    def vision_dtype(self):
        return next(self.vision.parameters()).dtype

    @torch.inference_mode()
    def stream(self, messages, images=(), *, max_tokens=256, temperature=0.7, top_p=None, top_k=None, stop=(),
               seed=None, usage=None):
        """Yields text pieces of the answer. `usage`, a dict if given, receives prompt_tokens,
        completion_tokens and finish_reason ("stop" or "length")."""
        with self.lock:
            x, n_prompt = self.prompt_embeddings(messages, images)
            if n_prompt >= self.context:
                raise ValueError(f"the prompt is {n_prompt} tokens but the context is {self.context}; shorten the conversation")
            max_tokens = min(max_tokens, self.context - n_prompt)
            generator = None
            if seed is not None:
                generator = torch.Generator(self.device).manual_seed(seed)
            decoder, text, n_new, finish = StreamDecoder(self.tokenizer), "", 0, "length"
            sent = 0
            for token in self.model.generate_stream(inputs_embeds=x, max_new_tokens=max_tokens, temperature=temperature,
                                                    top_p=top_p, top_k=top_k, eos_id=self.tokenizer.eos_id,
                                                    generator=generator, compile=self.compile):
                token = int(token[0])
                n_new += 1
                if token == self.tokenizer.eos_id:
                    finish = "stop"
                    break
                text += decoder.push(token)
                if n_new == 1:
                    text = text.lstrip(" ")  # the template puts the space before the answer into its first token
                cut = min((text.find(s) for s in stop if s and s in text), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                # hold back a tail that could still grow into a stop string
                hold = max((len(s) - 1 for s in stop if s), default=0)
                safe = len(text) if finish == "stop" else max(sent, len(text) - hold)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
                if finish == "stop":
                    break
            if sent < len(text):
                yield text[sent:]
            if usage is not None:
                usage.update(prompt_tokens=n_prompt, completion_tokens=n_new, finish_reason=finish)

    def reply(self, messages, images=(), **kwargs):
        return "".join(self.stream(messages, images, **kwargs))


def resolve_relative(folder, path):
    p = Path(path)
    return str(folder / p) if not p.is_absolute() and (folder / p).exists() else str(path)


def load_image_file(path):
    from clip_encoder import load_image
    return load_image(path)


@dataclass
class GenerateConfig:
    model: str = ""            # language model folder or hub id (default: the one the --mm checkpoint names)
    mm: str = ""               # multimodal checkpoint folder (mm_config.json, projector, adapter)
    prompt: str = ""
    image: str = ""
    audio: str = ""
    whisper: str = ""          # Whisper model name or local .pt (default: $OMNIPHI_WHISPER)
    raw: bool = False          # continue the prompt as plain text instead of answering it as a chat
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"
    quantize: str = ""         # "", "nf4" or "int8" weight-only quantization of the block linears (on a
                               # CPU, nf4 with --dtype=bfloat16 decodes fastest: bitsandbytes' 4-bit kernel)
    compile: bool = False      # decode with the torch.compile'd step (compiling takes a while, then decodes faster)


def main(argv):
    cfg = parse_config(GenerateConfig, argv)
    if not (cfg.prompt or cfg.audio):
        raise SystemExit("nothing to answer: pass --prompt=... and/or --audio=PATH")
    torch.manual_seed(cfg.seed)
    chat = ChatModel(cfg.model or None, mm=cfg.mm or None, device=cfg.device, dtype=cfg.dtype,
                     quantize=cfg.quantize or None, whisper=cfg.whisper or None, compile=cfg.compile)
    options = dict(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1 else None)
    if cfg.raw:
        tok = chat.tokenizer
        ids = torch.tensor([tok.encode(cfg.prompt, allow_special=False)], device=cfg.device)
        decoder = StreamDecoder(tok)
        print(cfg.prompt, end="", flush=True)
        for token in chat.model.generate_stream(ids, min(cfg.max_new_tokens, chat.context - ids.shape[1]),
                                                compile=chat.compile, **options):
            if int(token[0]) == tok.eos_id:
                break
            print(decoder.push(token[0]), end="", flush=True)
        print()
        return
    text = cfg.prompt
    if cfg.audio:
        transcript = chat.transcribe(cfg.audio)
        print(f"[heard] {transcript}", file=sys.stderr)
        text = speech_text(transcript, typed=cfg.prompt)
    images = [load_image_file(cfg.image)] if cfg.image else []
    if images and "<image>" not in text:
        text = "<image>\n" + text
    for piece in chat.stream([{"role": "user", "content": text}], images, max_tokens=cfg.max_new_tokens,
                             seed=cfg.seed, **options):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
