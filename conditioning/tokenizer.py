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
import os
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
