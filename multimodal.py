"""
The multimodal model: a Phi language model, a projector and (unless its features are cached) a CLIP vision tower,
LLaVA style. One checkpoint format, written and read here for training, generate.py, serve.py and eval_mm.py alike:

    mm_config.json             which LM and tower, projector kind, feature layer, pad_to_square, template, stage
    projector.safetensors      the projector (never quantized)
    vision/                    the tower, when it was trained here (a pretrained CLIP is named in mm_config.json)
    lm/                        the LM, when its own weights were trained here (train_mm.py --full_lm)
    adapter_config.json + adapter_model.safetensors   the PEFT-layout LoRA adapter (instruction tuning)

One path from images to the language model's input (preprocess, tower features, projector, spliced at <image>), one
greedy answer path for batches of questions, and ChatModel, the streaming chat of the command line and the server.
"""

import json
import threading
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_encoder import CLIP_PRESETS, CLIPVision, CLIPVisionConfig
from decoding import CompiledDecoder, speed_up
from lora import load_adapter, merge_lora, quantizer, save_adapter
from model import Phi, atomic_write
from projector import load_projector, num_image_tokens, save_projector, splice_image_features
from tokenizer import IMAGE_TOKEN_ID, StreamDecoder, Tokenizer, encode_chat

TEMPLATE = "omniphi-chat"
IGNORE = -100


def find_mm_checkpoint(path):
    """The multimodal checkpoint in path: path itself, or the final checkpoint of a run folder (ckpt/, or the
    instruct stage's, else the align stage's, of a train_mm.py run)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"multimodal checkpoint {path} does not exist")
    for candidate in (path, path / "ckpt", path / "instruct" / "ckpt", path / "align" / "ckpt"):
        if (candidate / "mm_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{path} is not a multimodal checkpoint (no mm_config.json in it, nor in a ckpt/, "
                            "instruct/ckpt/ or align/ckpt/ under it)")


def read_mm_config(folder):
    return json.loads((Path(folder) / "mm_config.json").read_text())


def resolve_ref(folder, ref):
    """A path in an mm_config: relative paths are relative to the checkpoint folder."""
    p = Path(ref)
    return str(folder / p) if not p.is_absolute() and (folder / p).exists() else str(ref)


def portable_ref(ref):
    """What an mm_config records for a model: an absolute path for a local folder, else the hub id as given."""
    return str(Path(ref).resolve()) if Path(ref).is_dir() else str(ref)


def load_vision(ref, *, dtype=None, device="cpu", seed=None, overrides=None):
    """(tower, source): a CLIP folder or hub id, or a clip_encoder preset name for random weights (source None)."""
    if ref in CLIP_PRESETS and not Path(ref).exists():
        vision = CLIPVision(CLIPVisionConfig.from_preset(ref, **(overrides or {})))
        vision.init_weights(seed=seed)
        return vision.to(device=device, dtype=dtype), None
    return CLIPVision.from_pretrained(ref, dtype=dtype, device=device), ref


class MultimodalLM(nn.Module):
    """Vision tower (frozen; absent when features are cached), projector and language model. forward gives the summed
    cross-entropy of a batch's target tokens; the output head runs only on those positions.
    lm_ref / vision_ref are what the checkpoint records: vision_ref "" means the tower is saved inside it."""

    def __init__(self, lm, projector, vision=None, feature_layer=-2, *, pad_to_square=False, lm_ref="", vision_ref="",
                 vision_config=None, processor=None):
        super().__init__()
        self.lm, self.projector, self.vision = lm, projector, vision
        self.feature_layer, self.pad_to_square, self.lm_ref, self.vision_ref = feature_layer, pad_to_square, lm_ref, vision_ref
        self.vision_config = vision_config or vision.config
        self.processor = processor or vision.processor
        if (projector.vision_dim, projector.lm_dim) != (self.vision_config.hidden_size, lm.config.hidden_size):
            raise ValueError(f"the projector maps {projector.vision_dim} -> {projector.lm_dim}, but the tower is "
                             f"{self.vision_config.hidden_size} wide and the LM {lm.config.hidden_size}")
        speed_up(lm)  # one-query attention while answering; training never has a single query

    @property
    def image_tokens(self):
        return num_image_tokens(self.projector.kind, self.vision_config.num_patches)

    @property
    def device(self):
        return self.lm.model.embed_tokens.weight.device

    def pixels(self, images):
        """PIL images -> pixel values for the tower (its preprocessing, with LLaVA's pad_to_square if set)."""
        return self.vision.preprocess(list(images), pad_to_square=self.pad_to_square)

    def image_embeddings(self, pixels=None, features=None):
        """(n_images, image_tokens, lm_dim) from pixels (the frozen tower runs) or from cached features."""
        if features is None:
            with torch.no_grad():
                features = self.vision.features(pixels.to(self.vision.device, self.vision.dtype), layer=self.feature_layer)
        return self.projector(features)

    def splice(self, ids, image_index, images, labels=None, padding_side="right"):
        """Token rows with IMAGE_TOKEN_ID placeholders -> projector.Spliced embeddings; image_index[k] is the row of
        images (a dict of 'pixels' or 'features') that the k-th placeholder stands for."""
        embeds = self.image_embeddings(**images) if image_index else None
        return splice_image_features(ids, self.lm.model.embed_tokens, [embeds[k] for k in image_index],
                                     targets=labels, pad_id=Tokenizer.eos_id, padding_side=padding_side)

    def forward(self, ids, labels, image_index, images):
        spliced = self.splice(ids, image_index, images, labels)
        # right padding: causal attention alone already keeps every real position away from the padding after it
        hidden = self.lm.hidden_states(inputs_embeds=spliced.inputs_embeds)
        rows = spliced.targets != IGNORE
        if not rows.any():
            return hidden.sum() * 0.0
        logits = self.lm.lm_head(hidden[rows]).float()
        return F.cross_entropy(logits, spliced.targets[rows], reduction="sum")

    @torch.no_grad()
    def answer(self, prompts, images, max_new_tokens, tokenizer):
        """Greedy answers to prompts [(messages, image key or None)] in one left-padded batch; images maps keys to
        pixels or features (llava_data.ImageSource). The text of each up to <|endoftext|>."""
        ids, keys, image_index = [], [], []
        for messages, key in prompts:
            row, _ = encode_chat(tokenizer, messages)
            if IMAGE_TOKEN_ID in row:
                if key is None:
                    raise ValueError("a prompt has an <image> placeholder but no image")
                if key not in keys:
                    keys.append(key)
                image_index.append(keys.index(key))
            ids.append(row)
        spliced = self.splice(ids, image_index, images.get(keys, self.device), padding_side="left")
        room = self.lm.config.max_position_embeddings - spliced.inputs_embeds.shape[1]
        if room < 1:
            raise ValueError(f"a prompt of {spliced.inputs_embeds.shape[1]} positions leaves no room to answer in the "
                             f"context of {self.lm.config.max_position_embeddings}")
        new = self.lm.generate(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                               max_new_tokens=min(max_new_tokens, room), temperature=0, eos_id=tokenizer.eos_id)
        answers = []
        for row in new.tolist():
            row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
            answers.append(tokenizer.decode(row).strip())
        return answers

    # ---- the checkpoint folder ----------------------------------------------------------------------------------

    def mm_config(self, stage):
        return {"lm": self.lm_ref or "lm", "vision": self.vision_ref or "vision", "projector": self.projector.kind,
                "vision_dim": self.projector.vision_dim, "lm_dim": self.projector.lm_dim,
                "feature_layer": self.feature_layer, "pad_to_square": self.pad_to_square, "template": TEMPLATE,
                "stage": stage, "image_tokens": self.image_tokens}

    def save(self, folder, stage, train_state=None):
        """Fill a checkpoint folder: vision/ (a tower of our own), projector.safetensors, the PEFT adapter (when the LM
        has one), train_state.pt (when given) and mm_config.json, written last."""
        folder = Path(folder)
        if not self.vision_ref:
            self.vision.save_pretrained(folder / "vision")
        if not self.lm_ref:
            self.lm.save_pretrained(folder / "lm")
        save_projector(self.projector, folder / "projector.safetensors")
        if getattr(self.lm, "lora_config", None) is not None:
            save_adapter(self.lm, folder, base_model_name_or_path=self.lm_ref)
        if train_state is not None:
            torch.save(train_state, folder / "train_state.pt")
        atomic_write(folder / "mm_config.json", json.dumps(self.mm_config(stage), indent=2))

    @classmethod
    def load(cls, folder, *, device="cpu", dtype=None, quantize=None, lm=None):
        """The model of a checkpoint folder (or run folder, see find_mm_checkpoint), for inference: lm replaces the LM
        it names; quantize="nf4"|"int8" quantizes the LM's block linears while loading; the adapter is merged into an
        unquantized LM, and the projector takes the LM's dtype."""
        folder = find_mm_checkpoint(folder)
        c = read_mm_config(folder)
        lm_ref, vision_ref = lm or resolve_ref(folder, c["lm"]), resolve_ref(folder, c["vision"])
        lm_model = Phi.from_pretrained(lm_ref, dtype=dtype, device=device, quantize=quantizer(quantize))
        tower = CLIPVision.from_pretrained(vision_ref, dtype=dtype, device=device).eval().requires_grad_(False)
        projector = load_projector(folder / "projector.safetensors", device=device,
                                   dtype=lm_model.model.embed_tokens.weight.dtype).eval()
        if (folder / "adapter_config.json").is_file():
            load_adapter(lm_model, folder, quantize=quantize)
            if quantize is None:
                merge_lora(lm_model)  # plain linears decode fastest
        def inside(ref):
            return Path(ref).resolve().is_relative_to(folder.resolve())
        return cls(lm_model, projector, tower, feature_layer=c.get("feature_layer", -2),
                   pad_to_square=c.get("pad_to_square", False), lm_ref="" if inside(lm_ref) else portable_ref(lm_ref),
                   vision_ref="" if inside(vision_ref) else portable_ref(vision_ref))


class ChatModel:
    """A language model, optionally with the tower, projector and adapter of a multimodal checkpoint, that turns chat
    messages (and images, and speech through Whisper) into a stream of answer text. One answer at a time."""

    def __init__(self, lm=None, *, mm=None, device="cpu", dtype=None, quantize=None, whisper=None, compile=False):
        self.device, self.whisper = device, whisper
        self.tokenizer = Tokenizer()
        self.mm = self.mm_config = None
        if mm is not None:
            self.mm = MultimodalLM.load(mm, device=device, dtype=dtype, quantize=quantize, lm=lm)
            self.mm_config = read_mm_config(find_mm_checkpoint(mm))
            self.model = self.mm.lm
        elif lm is None:
            raise ValueError("no language model given: pass --model=DIR (or --mm=CKPT whose mm_config names one)")
        else:
            self.model = speed_up(Phi.from_pretrained(lm, dtype=dtype, device=device, quantize=quantizer(quantize)))
        # compiled decoding: a graph per cache size (the first reply of each size waits for it), CUDA graphs on GPU
        self.compile = ("reduce-overhead" if str(device).startswith("cuda") else "default") if compile else None
        self.decoder = CompiledDecoder(self.model, self.compile) if compile else None  # refuses NF4 it cannot compile
        self.lock = threading.Lock()  # one generation at a time on the model

    @property
    def vision(self):
        return None if self.mm is None else self.mm.vision

    @property
    def projector(self):
        return None if self.mm is None else self.mm.projector

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
        if not images:
            return self.model.model.embed_tokens(torch.tensor([ids], device=self.device)), len(ids)
        if self.vision is None:
            raise ValueError("this model has no vision tower: start it with a multimodal checkpoint (--mm) to send images")
        x = self.mm.splice([ids], list(range(len(images))), {"pixels": self.mm.pixels(images)}).inputs_embeds
        return x, x.shape[1]

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
                                                    generator=generator, decoder=self.decoder):
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
