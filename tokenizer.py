"""
The Phi-2 tokenizer on tiktoken, built offline, and the one chat template used by training and serving.

Phi-2 is GPT-2's byte-level BPE (the ranks ship inside openai-whisper) plus 38 added whitespace tokens:
ids 50257-50286 are runs of 31 ... 2 spaces and 50287-50294 runs of 9 ... 2 tabs. Like the HF tokenizer,
those runs are split out greedily, longest first, before BPE sees the text.
"""

import hashlib
import os
import re
import struct

import tiktoken
from tiktoken.load import load_tiktoken_bpe

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS = "<|endoftext|>"
IMAGE_TOKEN_ID = -200  # stands for an image's projected features in a token id list (LLaVA's convention)
IMAGE_PLACEHOLDER = "<image>"
SPEECH_MARKER = "(spoken) "

FINGERPRINT_PROBE = "def f(x):\n\tif x:\n\t\t\treturn  x  # é 中文 🙂 don't\n" + " " * 40 + "end" + EOS

WHITESPACE_TOKENS = {" " * n: 50257 + 31 - n for n in range(31, 1, -1)}
WHITESPACE_TOKENS.update({"\t" * n: 50287 + 9 - n for n in range(9, 1, -1)})
WHITESPACE_RUN = re.compile(r"( {2,31}|\t{2,9})")


def gpt2_ranks_path():
    import whisper  # only for the location of its bundled assets
    return os.path.join(os.path.dirname(whisper.__file__), "assets", "gpt2.tiktoken")


class Tokenizer:
    eos_id = 50256
    vocab_size = 50295  # real tokens; the model's embedding table is padded to 51,200

    def __init__(self, ranks_path=None):
        self.bpe = tiktoken.Encoding(name="phi-2", pat_str=GPT2_PATTERN,
                                     mergeable_ranks=load_tiktoken_bpe(ranks_path or gpt2_ranks_path()),
                                     special_tokens={EOS: self.eos_id})
        self.id_to_whitespace = {i: s for s, i in WHITESPACE_TOKENS.items()}

    def encode(self, text, allow_special=True):
        """allow_special=False treats '<|endoftext|>' in the text as plain characters (use it for user input)."""
        ids = []
        for i, piece in enumerate(WHITESPACE_RUN.split(text)):
            if i % 2:
                ids.append(WHITESPACE_TOKENS[piece])
            elif piece:
                ids.extend(self.bpe.encode(piece, allowed_special={EOS} if allow_special else set(), disallowed_special=()))
        return ids

    def decode_bytes(self, ids):
        out = bytearray()
        for i in ids:
            i = int(i)
            if i in self.id_to_whitespace:
                out += self.id_to_whitespace[i].encode()
            elif i == IMAGE_TOKEN_ID:
                out += IMAGE_PLACEHOLDER.encode()
            elif 0 <= i <= self.eos_id:
                out += self.bpe.decode_single_token_bytes(i)
            elif not 0 <= i < 51200:
                raise ValueError(f"token id {i} is outside the vocabulary")
            # ids 50295-51199 are padding rows of the embedding table: they decode to nothing
        return bytes(out)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token_id):
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the next token
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def tokenizer_fingerprint(tokenizer):
    """A short hash of how the tokenizer encodes a fixed probe; token data made by another tokenizer has another one."""
    ids = tokenizer.encode(FINGERPRINT_PROBE)
    return hashlib.sha256(struct.pack(f"<{len(ids)}q", *ids)).hexdigest()[:16]


def speech_text(transcript, typed=""):
    """The user's turn for a spoken message: typed text (if any), then the marked transcript."""
    spoken = SPEECH_MARKER + transcript.strip()
    return f"{typed.strip()}\n{spoken}" if typed.strip() else spoken


def render_chat(messages, add_generation_prompt=True):
    """The chat template as (text, is_target) pieces. Only assistant answers and their <|endoftext|> are targets.

        [system]\\n User: question\\n Assistant: answer<|endoftext|>\\n User: ... Assistant:
    """
    pieces = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string")
        if role == "system":
            if i != 0:
                raise ValueError("a system message may only come first")
            pieces.append((content.strip() + "\n", False))
        elif role == "user":
            pieces.append((f"User: {content.strip()}\nAssistant:", False))
        elif role == "assistant":
            if i == 0 or messages[i - 1].get("role") != "user":
                raise ValueError(f"message {i}: an assistant message must follow a user message")
            pieces += [(" " + content.strip(), True), (EOS, True), ("\n", False)]
        else:
            raise ValueError(f"message {i}: unknown role {role!r} (use system, user or assistant)")
    if add_generation_prompt and (not messages or messages[-1].get("role") != "user"):
        raise ValueError("the last message must be from the user to generate an answer")
    if not add_generation_prompt and messages and messages[-1].get("role") == "user":
        pieces[-1] = (pieces[-1][0].removesuffix("Assistant:"), False)
    return pieces


def encode_chat(tokenizer, messages, add_generation_prompt=True):
    """(ids, target_mask): '<image>' becomes IMAGE_TOKEN_ID; user text can never produce special tokens."""
    ids, target = [], []
    for text, is_target in render_chat(messages, add_generation_prompt):
        if text == EOS:
            piece = [tokenizer.eos_id]
        else:
            piece = []
            for j, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
                if j:
                    piece.append(IMAGE_TOKEN_ID)
                piece += tokenizer.encode(part, allow_special=False)
        ids += piece
        target += [is_target] * len(piece)
    return ids, target
