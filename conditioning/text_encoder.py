"""Frozen CLIP text encoder: prompts -> token embeddings for the U-Net's cross-attention.

Shapes: B prompts, L tokens (padded to the longest prompt of the batch, start/end tokens included),
D text width (`TextEncoder.hidden_size`; the U-Net's `context_dim` follows it).

Any CLIP works: `TextEncoder.from_pretrained` takes a pipeline folder (`text_encoder/` + `tokenizer/`),
a plain CLIP checkpoint folder, or a hub id (only a hub id downloads anything). Besides the embeddings,
`encode` returns what the app needs to label attention maps (token strings and the word each token
belongs to) and what it must tell the user (prompt cut at `max_length`, words that fell to the unknown
token).

    enc = TextEncoder.from_pretrained("weights/default")
    out = enc.encode(["a red circle", ""])   # out.context (2, 5, D), out.mask (2, 5)
"""

import json
import logging as _logging
import os
from dataclasses import dataclass

import torch
import transformers
from tokenizers import decoders
from transformers import CLIPTextModel, CLIPTokenizer

from conditioning.tokenizer import END_OF_WORD, grow_tokenizer, save_clip_tokenizer

# What `TextEncoder.set_trainable` can train: nothing (a pretrained CLIP that already knows the words),
# the token embeddings alone, or the whole text model.
TEXT_TRAINING = ("frozen", "embeddings", "full")


@dataclass
class EncodedPrompts:
    """The output of `TextEncoder.encode` for B prompts.

    Attributes:
        context: (B, L, D) float, the text model's last hidden state; rows past `mask` are padding.
        mask: (B, L) bool, True = real token (start and end tokens included).
        tokens: per prompt, the readable token strings ("</w>" stripped), start/end tokens included,
            padding excluded (so `len(tokens[b]) == mask[b].sum()`).
        word_ids: per prompt and token, the index into `words[b]` (None for start/end tokens).
        words: per prompt, the lowercased words the tokens came from, as the tokenizer splits them
            (whitespace and punctuation); only words with at least one token kept after truncation.
        truncated: per prompt, True when the prompt was longer than `max_length` tokens and was cut.
        unknown_words: per prompt, words that fell (partly) to the unknown token, in prompt order.
    """

    context: torch.Tensor
    mask: torch.Tensor
    tokens: list[list[str]]
    word_ids: list[list[int | None]]
    words: list[list[str]]
    truncated: list[bool]
    unknown_words: list[list[str]]

    def rows(self, rows: slice) -> "EncodedPrompts":
        """The encoding of prompts[rows] alone (e.g. the prompt half of a guided batch)."""
        return EncodedPrompts(self.context[rows], self.mask[rows], self.tokens[rows], self.word_ids[rows],
                              self.words[rows], self.truncated[rows], self.unknown_words[rows])


class TextEncoder:
    """A `CLIPTextModel` with its `CLIPTokenizer` (the fast, `tokenizers`-backed one); frozen unless
    `set_trainable` says otherwise (fine-tuning on someone's own captions).

    Args:
        model: the text model; it is put in eval mode and its parameters stop requiring grad.
        tokenizer: a fast tokenizer (word ids and offsets come from it).
    """

    def __init__(self, model: CLIPTextModel, tokenizer: CLIPTokenizer):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; word ids need one. "
                "Load it with CLIPTokenizer.from_pretrained (transformers >= 5) or CLIPTokenizerFast."
            )
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the text model embeds only "
                f"{model.config.vocab_size}; the tokenizer and text model come from different checkpoints."
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.hidden_size: int = model.config.hidden_size
        # Tokenizers saved without model_max_length report a huge sentinel; the position table is the limit.
        self.max_length: int = min(tokenizer.model_max_length, model.config.max_position_embeddings)
        self._byte_decoder = decoders.ByteLevel()  # CLIP's BPE runs on byte-level characters
        self._special_tokens = set(tokenizer.all_special_tokens)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        *,
        subfolder_text_encoder: str = "text_encoder",
        subfolder_tokenizer: str = "tokenizer",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "TextEncoder":
        """Load from a pipeline folder, a plain CLIP checkpoint folder, or a hub id.

        A pipeline folder has `text_encoder/` and `tokenizer/` subfolders; a plain CLIP checkpoint
        (e.g. `openai/clip-vit-base-patch32`, or `clip/` written by `pretrain_clip`) has the weights of
        a full `CLIPModel` or a `CLIPTextModel` and the tokenizer files at the top level.
        """
        local = os.path.isdir(path_or_hub_id)
        if not local and (os.path.isabs(path_or_hub_id) or path_or_hub_id.startswith((".", "~"))):
            raise ValueError(f"text encoder folder {path_or_hub_id!r} does not exist; check the path.")
        model = _load_with_fallback(_load_text_model, path_or_hub_id, subfolder_text_encoder, local)
        tokenizer = _load_with_fallback(CLIPTokenizer.from_pretrained, path_or_hub_id, subfolder_tokenizer, local)
        return cls(model, tokenizer).to(device, dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextEncoder":
        """Move the text model (in place) to `device` and/or floating `dtype`; returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def grow(self, captions: list[str], min_count: int = 1) -> list[str]:
        """Make the captions' words whole tokens (`conditioning.tokenizer.grow_tokenizer`); returns the words added.

        The embedding table grows to the new vocabulary. Each new token (a word, or a piece on the way
        to one) starts as the mean of the two tokens its merge joins, so a new word starts near what the
        model read from its letters; old tokens keep their rows and their ids.
        """
        tokenizer, added = grow_tokenizer(self.tokenizer, captions, min_count=min_count)
        if not added:
            return added
        old = self.tokenizer.get_vocab()
        merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
        new_vocab = tokenizer.get_vocab()
        self.use_tokenizer(tokenizer)
        table = self.model.get_input_embeddings().weight  # (V, D)
        with torch.no_grad():
            for pair in merges:  # merge order: a token's two parts always come before it
                a, b = pair if isinstance(pair, list) else pair.split(" ")
                if a + b not in old:
                    table[new_vocab[a + b]] = (table[new_vocab[a]] + table[new_vocab[b]]) / 2
        return added

    def use_tokenizer(self, tokenizer: CLIPTokenizer) -> None:
        """Switch to a grown copy of this tokenizer (e.g. a fine-tune's checkpoint): the embedding table
        takes its size; rows of new tokens are whatever is loaded into them next."""
        self.model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.tokenizer = tokenizer
        self._special_tokens = set(tokenizer.all_special_tokens)

    def set_trainable(self, what: str) -> list[torch.nn.Parameter]:
        """Train `what` of TEXT_TRAINING ("frozen", "embeddings" or "full"); returns the trainable parameters.

        "embeddings" trains the token table only (Textual-Inversion-like: the words move, the
        transformer that reads them stays); "full" trains every weight of the text model.
        """
        if what not in TEXT_TRAINING:
            raise ValueError(f"text encoder training {what!r}: choose one of {', '.join(TEXT_TRAINING)}.")
        self.model.requires_grad_(what == "full")
        self.model.get_input_embeddings().requires_grad_(what != "frozen")
        self.model.train(what != "frozen")
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    def encode(self, prompts: list[str] | str) -> EncodedPrompts:
        """Tokenise and embed prompts; "" gives the unconditional embedding (start + end tokens).

        Returns context (B, L, D) and mask (B, L) with L = the longest (truncated) prompt of the batch,
        plus per-prompt tokens, word ids, words, truncation flags and unknown words. The context carries
        gradients only while the text encoder is being trained (`set_trainable`).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"encode expects a string or a non-empty list of strings, got {prompts!r}.")
        # Untruncated pass: tells which prompts get cut, and gives the full span of a word cut in half.
        full = self.tokenizer(prompts, verbose=False)  # verbose=False: no "longer than max length" log
        batch = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        input_ids = batch["input_ids"].to(self.device)  # (B, L)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, L)
        # no_grad rather than inference_mode: the context feeds the U-Net's trainable k/v projections,
        # and autograd refuses to save inference-mode tensors for backward.
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            context = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)

        truncated = [len(ids) > self.max_length for ids in full["input_ids"]]
        out = EncodedPrompts(context, mask, [], [], [], truncated, [])
        for b, prompt in enumerate(prompts):
            tokens, word_ids, words, unknown = self._describe(prompt, batch.encodings[b], full.encodings[b])
            out.tokens.append(tokens)
            out.word_ids.append(word_ids)
            out.words.append(words)
            out.unknown_words.append(unknown)
        return out

    def _describe(self, prompt: str, encoding, full) -> tuple[list[str], list[int | None], list[str], list[str]]:
        """Readable tokens, token -> word ids, words and unknown words of one prompt.

        `encoding` is its (truncated, padded) `tokenizers.Encoding`, `full` the untruncated one.
        """
        n = int(sum(encoding.attention_mask))  # padding is at the end (CLIP pads right)
        ids, raw_word_ids = encoding.ids[:n], encoding.word_ids[:n]
        # Renumber words 0.. in order of appearance, keeping only words that still have a token.
        index: dict[int, int] = {}
        words: list[str] = []
        for w in raw_word_ids:
            if w is not None and w not in index:
                start, end = full.word_to_chars(w)
                index[w] = len(words)
                words.append(self._normalize(prompt[start:end]))
        word_ids = [None if w is None else index[w] for w in raw_word_ids]
        unk_id = self.tokenizer.unk_token_id
        # CLIP's own unk token is <|endoftext|> (= the end token), so only tokens inside words count.
        unknown_idx = sorted({w for i, w in zip(ids, word_ids, strict=True) if w is not None and i == unk_id})
        tokens = [self._readable(t) for t in self.tokenizer.convert_ids_to_tokens(ids)]
        return tokens, word_ids, words, [words[w] for w in unknown_idx]

    def _normalize(self, text: str) -> str:
        normalizer = self.tokenizer.backend_tokenizer.normalizer
        return normalizer.normalize_str(text) if normalizer is not None else text

    def _readable(self, token: str) -> str:
        if token in self._special_tokens:
            return token
        # Byte-level characters back to text (a lone byte of a multi-byte character shows as U+FFFD).
        return self._byte_decoder.decode([token]).removesuffix(END_OF_WORD)

    def save_pretrained(self, pipeline_dir: str | os.PathLike) -> None:
        """Write `text_encoder/` (config + safetensors) and `tokenizer/` (CLIP's vocab.json + merges.txt
        and transformers' tokenizer.json + tokenizer_config.json) into a pipeline folder."""
        self.model.save_pretrained(os.path.join(pipeline_dir, "text_encoder"), safe_serialization=True)
        save_clip_tokenizer(self.tokenizer, os.path.join(pipeline_dir, "tokenizer"))


def _load_with_fallback(load, path_or_hub_id: str, subfolder: str, local: bool):
    """`load(path, subfolder=...)` from the pipeline layout if it is there, else from the top level."""
    if local:
        has_sub = bool(subfolder) and os.path.isdir(os.path.join(path_or_hub_id, subfolder))
        return load(path_or_hub_id, subfolder=subfolder if has_sub else "")
    # A hub repo's layout is only known by asking: try the pipeline layout, then the plain checkpoint.
    try:
        return load(path_or_hub_id, subfolder=subfolder)
    except OSError:
        return load(path_or_hub_id, subfolder="")


def _load_text_model(path: str, subfolder: str) -> CLIPTextModel:
    """Load a CLIPTextModel, also out of a full CLIPModel checkpoint, refusing partially random weights."""
    # transformers prints a long report listing the vision tower as "unexpected" when loading the text
    # half of a full CLIP; that is expected, so silence it and check for missing weights here instead.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(_logging.ERROR)
    hint = f"{path!r} (subfolder {subfolder!r}) is not a CLIP text model checkpoint"
    try:
        model, info = CLIPTextModel.from_pretrained(path, subfolder=subfolder, output_loading_info=True)
    except RuntimeError as err:  # transformers raises this for weights of the wrong shape
        raise ValueError(f"{hint}: {err}. Point at a CLIP checkpoint.") from err
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
    if missing:
        raise ValueError(
            f"{hint}: {len(missing)} weights are missing or mis-shaped (e.g. {sorted(missing)[:3]}), they would "
            "be random. Point at a CLIP checkpoint."
        )
    return model
