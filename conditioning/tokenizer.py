"""A BPE tokenizer in CLIP's format (vocab.json + merges.txt), trained on our captions.

CLIP's tokenizer lowercases, splits words and punctuation, maps text to byte-level characters and runs
BPE whose last piece of every word carries the `</w>` suffix. Its vocabulary is laid out as
`alphabet + alphabet</w> + one token per merge + special tokens`. We train the merges with the
`tokenizers` library using exactly CLIP's normalizer and pre-tokenizer (taken from `CLIPTokenizer`
itself, so they cannot drift), and lay the vocabulary out the same way, so
`CLIPTokenizer.from_pretrained(dir)` loads it like any CLIP tokenizer.

Unknown words. OpenAI's CLIP has all 256 bytes in its alphabet, so nothing is ever unknown, and its
unknown token is `<|endoftext|>` (= the end and pad token), which makes an unknown piece look like the
end of the prompt. Ours differs on purpose, so the app can tell the user what the model cannot read:
- the alphabet is printable ASCII (lowercase) plus any other character seen in the captions; any other
  character (accents, emoji, CJK, ...) becomes the unknown token;
- the unknown token is a dedicated `<|unk|>` (declared in tokenizer_config.json), never the end token,
  so it is identifiable and the text model's pooled output (read at the first end token) stays put.
A word spelled only with known characters (e.g. "giraffe") is always representable, as in any BPE:
it is split into known pieces, never reported as unknown, even if no caption ever used it.
"""

import json
import math
import os
import re
from collections.abc import Iterable

from tokenizers import Tokenizer, models, trainers
from transformers import CLIPTokenizer

END_OF_WORD = "</w>"
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
PRINTABLE_ASCII = [chr(c) for c in range(ord("!"), ord("~") + 1) if not chr(c).isupper()]  # CLIP lowercases


def train_clip_bpe(captions: Iterable[str], *, vocab_size: int = 2048, model_max_length: int = 32) -> CLIPTokenizer:
    """Train CLIP-format BPE merges on `captions` and return the tokenizer.

    Args:
        captions: training texts (all of them; they are read twice).
        vocab_size: upper bound for the trainer; captions with a small vocabulary stop earlier, once
            every frequent word is a single token.
        model_max_length: tokens per prompt including start/end; prompts beyond it get truncated.
    """
    captions = list(captions)
    if not captions:
        raise ValueError("train_clip_bpe got no captions; check the caption column of the data.")
    reference = CLIPTokenizer().backend_tokenizer  # CLIP's normalizer + pre-tokenizer, from transformers
    alphabet = _alphabet(captions, reference)

    bpe = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix=END_OF_WORD, continuing_subword_prefix=""))
    bpe.normalizer, bpe.pre_tokenizer = reference.normalizer, reference.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 2 * len(alphabet) + 3),
        min_frequency=2,
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer)
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]

    # CLIP's layout: every alphabet symbol with and without </w> (a word may end in any character),
    # then one token per merge in merge order, then the special tokens.
    vocab: dict[str, int] = {}
    for symbol in alphabet + [a + END_OF_WORD for a in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in (BOS, EOS, UNK):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=UNK, model_max_length=model_max_length)

    ids = tokenizer(captions, verbose=False)["input_ids"]
    unk_captions = [c for c, i in zip(captions, ids, strict=True) if tokenizer.unk_token_id in i]
    if unk_captions:  # cannot happen unless the pre-tokenizer and the alphabet disagree
        raise ValueError(f"trained tokenizer cannot represent captions such as {unk_captions[:2]!r}.")
    return tokenizer


def _alphabet(captions: list[str], reference: Tokenizer) -> list[str]:
    """Printable ASCII plus every byte-level character the captions use, sorted."""
    seen = set(PRINTABLE_ASCII)
    for caption in captions:
        for piece, _ in reference.pre_tokenizer.pre_tokenize_str(reference.normalizer.normalize_str(caption)):
            seen.update(piece)
    seen -= {BOS, EOS}
    return sorted(seen)


def save_clip_tokenizer(tokenizer: CLIPTokenizer, directory: str | os.PathLike) -> None:
    """Save in both layouts: CLIP's vocab.json + merges.txt and transformers' tokenizer.json.

    transformers 5 `save_pretrained` writes only tokenizer.json + tokenizer_config.json; vocab.json and
    merges.txt are what CLIP checkpoints ship and what other CLIP tooling reads.
    """
    tokenizer.save_pretrained(directory)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        return  # not a CLIP-style BPE tokenizer: tokenizer.json alone describes it
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")  # the header line CLIP's merges.txt starts with
        f.writelines(f"{' '.join(pair) if isinstance(pair, list) else pair}\n" for pair in model["merges"])


def caption_words(captions: Iterable[str], tokenizer: CLIPTokenizer) -> dict[str, int]:
    """How often each word occurs in `captions`, split the way `tokenizer` splits (lowercased)."""
    backend = tokenizer.backend_tokenizer
    counts: dict[str, int] = {}
    for caption in captions:
        text = backend.normalizer.normalize_str(caption) if backend.normalizer is not None else caption
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            counts[piece] = counts.get(piece, 0) + 1
    return counts


def grow_tokenizer(tokenizer: CLIPTokenizer, captions: Iterable[str], *, min_count: int = 1,
                   max_new: int = 4096) -> tuple[CLIPTokenizer, list[str]]:
    """A tokenizer that also reads the captions' words as whole tokens, and the words it added.

    The old vocabulary keeps its ids (new tokens are appended after the special tokens) and its merges
    keep their ranks, so every text the old tokenizer read splits the same way unless it contains a new
    word. A new word is spelt by appending merges to the end of the list: BPE first applies the old
    merges, which split the word into the pieces the old tokenizer gave it, then the new ones join those
    pieces left to right into one token. Words are added most frequent first, each spelt with the merges
    of the words before it, so they cannot interfere.

    Args:
        tokenizer: a CLIP-format BPE tokenizer (ours, `train_clip_bpe`'s).
        captions: the user's captions.
        min_count: words used fewer times stay split into pieces.
        max_new: at most this many new words (the most frequent).
    Only lowercase ASCII words of letters and digits are added (their byte-level spelling is themselves).
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
        raise ValueError("grow_tokenizer needs a CLIP-format BPE tokenizer (vocab.json + merges.txt with </w>).")
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    ranks = {pair: i for i, pair in enumerate(merges)}
    counts = caption_words(captions, tokenizer)
    wanted = sorted((w for w, n in counts.items() if n >= min_count and re.fullmatch(r"[a-z0-9]{2,}", w)
                     and w + END_OF_WORD not in vocab), key=lambda w: (-counts[w], w))[:max_new]
    added = []
    for word in wanted:
        pieces = _bpe(word, ranks)
        if any(p not in vocab for p in pieces):
            continue  # a character outside the alphabet: the word stays as it was
        while len(pieces) > 1:  # join left to right: (p1, p2) -> p1p2, then (p1p2, p3) ...
            pair = (pieces[0], pieces[1])
            merged = pair[0] + pair[1]
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
        added.append(word)
    grown = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=tokenizer.unk_token,
                          model_max_length=tokenizer.model_max_length)
    split = [w for w in added if len(grown.tokenize(w)) != 1]
    if split:  # cannot happen if _bpe agrees with the tokenizers library
        raise RuntimeError(f"grow_tokenizer: {split[:3]} still split into several tokens.")
    return grown, added


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces CLIP's BPE splits `word` into with merges `ranks` (lowest rank merged first)."""
    pieces = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:], strict=False))]
        rank, _ = min(pairs)
        if rank == math.inf:
            break
        best = next(pair for pair in zip(pieces, pieces[1:], strict=False) if ranks.get(pair) == rank)
        out, i = [], 0
        while i < len(pieces):  # merge every occurrence of the best pair, left to right
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                out.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
    return pieces
