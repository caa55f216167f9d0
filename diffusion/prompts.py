"""Prompt emphasis syntax: "a (red:1.8) circle" → the prompt "a red circle" with red's attention × 1.8.

The syntax is the one Stable Diffusion web UIs use: `(words:weight)`; parentheses without a weight
are kept as text. A weight applies to every token of the words inside the parentheses (and, since
it is matched by word, to the same words elsewhere in the prompt).
"""

import re

import torch

EMPHASIS = re.compile(r"\(([^():]+):\s*([0-9]*\.?[0-9]+)\s*\)")
MAX_WEIGHT = 10.0


def parse_emphasis(prompt: str) -> tuple[str, dict[str, float]]:
    """Strip `(words:weight)` groups; return the plain prompt and {lowercased word: weight}."""
    weights: dict[str, float] = {}

    def plain(match: re.Match) -> str:
        weight = float(match.group(2))
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(
                f"emphasis weight {weight} in '{match.group(0)}' is outside 0..{MAX_WEIGHT}; "
                "use e.g. (red:1.5) to strengthen a word or (red:0.5) to weaken it."
            )
        for word in re.findall(r"\w+", match.group(1).lower()):
            weights[word] = weight
        return match.group(1)

    return EMPHASIS.sub(plain, prompt), weights


def token_weights(words: list[list[str]], word_ids: list[list[int | None]], emphasis: list[dict[str, float]],
                  length: int) -> torch.Tensor:
    """Per-token weights (B, length) from per-prompt {word: weight}; 1 where nothing is emphasised."""
    out = torch.ones(len(words), length)
    for b, (prompt_words, ids, weights) in enumerate(zip(words, word_ids, emphasis, strict=True)):
        for i, word_id in enumerate(ids):
            if word_id is not None and prompt_words[word_id] in weights:
                out[b, i] = weights[prompt_words[word_id]]
    return out
