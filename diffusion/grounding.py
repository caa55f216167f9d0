"""Grounding loss: teach each word's cross-attention to look at the object the word names.

Trained on denoising alone, this small U-Net reads an object's colour and shape from the prompt's end
token (CLIP's summary of the whole prompt) and lets the background attend to the words, so the word
maps are inverted: at step 1,000 of the default run, 0 of 25 colour and shape words peaked inside
their object in the all-layer map (at most 4 of 25 in any one layer). The shapes set knows every
object's mask and the words naming it, so we supervise the maps directly, as TokenCompose does with
segmentation masks (Wang et al., CVPR 2024):

    token loss  (1 − Σ_inside A / Σ A)²   per grounded token and layer: the map's mass lies on the object;
    pixel loss  BCE(A, M)                 per position: the token is attended inside, not outside.

A is the head-mean cross-attention probability of the token at each position of the layer; M is the
object mask area-averaged to the layer's size (soft at the edges). The maps stay the model's own
attention, used in its computation; the loss shapes what they learn, it does not draw them.

Position words ("top", "left", "center" …, with `object_places`) are grounded in the object their
phrase places: "a red circle in the top left" points "top" and "left" at the red circle. Without them
nothing asks the layout to follow those words, and it does not: the shipped stage 3 put the object in
the named cell no more often than chance. In "A to the left of B" the word is a relation, not a place:
it stays free, or with `relations` points at A, the object it places.

A relation word grounded in A still says nothing of where B goes, and "A above B" holds wherever
the pair sits. The relation loss asks for the pair: in "A above B" the centre of mass of A's word
maps (its colour, kind and size tokens) must lie at least `RELATION_MARGIN` of the side above B's,

    relation loss  relu(margin − s·(c_B − c_A))   per relation and layer, c the map's centre on the
                                                  relation's axis, s = +1 for above / left of, −1 for
                                                  below / right of.

It reads only the caption, no mask, so it asks the same at every noise level: at t near 999, where
the image cannot say where A is, the token loss can only ask for a guess, but the pair's order is
known from the words alone.

Shapes: B images, L tokens, R image side, N = h·w positions of a layer, P relations in a batch.
"""

import torch
import torch.nn.functional as F

from diffusion.grammar import COLOURS, COUNTS, NOUNS, PLACE_WORDS, SIZES
from diffusion.relations import read_relations
from unet.attention import AttentionRecorder

RELATION_MARGIN = 1 / 6  # half a grid cell, the offset evaluation's detector asks of a relation


class GroundingRecorder(AttentionRecorder):
    """Keeps each cross-attention layer's probabilities, with their gradient, for one forward pass."""

    def __init__(self):
        self.maps: list[tuple[tuple[int, int], torch.Tensor]] = []  # ((h, w), (B, L, N) head mean)

    def wants(self, kind: str, num_queries: int) -> bool:
        return kind == "cross"

    def record(self, name: str, kind: str, size: tuple[int, int], probs: torch.Tensor) -> None:
        if kind == "cross":  # key-major, the layout attention_probs computes in: (B, h, L, N) → (B, L, N)
            self.maps.append((tuple(size), probs.transpose(-1, -2).float().mean(dim=1)))


def token_targets(encoding, object_masks: list[torch.Tensor], object_words: list[list[set[str]]],
                  num_tokens: int, object_places: list[list[set[str]]] | None = None,
                  relations: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the union mask of the objects its word names.

    Args:
        encoding: the text encoder's EncodedPrompts for the B captions (word_ids, words).
        object_masks: per image (K, R, R) in [0, 1].  object_words: per image and object, its words.
        num_tokens: L, the context length.
        object_places: per image and object, its place words (data.shapes.place_words); None leaves
            position words free.
        relations: also point each relation word ("above", the "left" of "to the left of") at the
            object it places, the phrase before it (A in "A above B"); False leaves them free.
    Returns:
        targets (B, L, R, R) float and valid (B, L) bool: True where the token's word names an object
        (start/end tokens, "a", "above", background words … are left free).
    """
    B = len(object_masks)
    R = object_masks[0].shape[-1] if B else 0
    targets = torch.zeros(B, num_tokens, R, R)
    valid = torch.zeros(B, num_tokens, dtype=torch.bool)
    for b in range(B):
        words = encoding.words[b]
        named_by = [[k for k, ws in enumerate(object_words[b]) if w in ws] for w in words]
        relation_words = {j for r in read_relations(words).relations for j in r.head}  # "above"; "left" of "left of"
        for wid, w in enumerate(words):
            if wid in relation_words:
                named_by[wid] = _subject(words, wid, object_words[b]) if relations else []
            elif w in PLACE_WORDS and object_places is not None:
                there = [k for k, p in enumerate(object_places[b]) if w in p]
                own = set(_subject(words, wid, object_words[b]))
                named_by[wid] = [k for k in there if k in own] or there  # this phrase's object, if it is there
        for i, wid in enumerate(encoding.word_ids[b]):
            if wid is not None and named_by[wid]:
                targets[b, i] = object_masks[b][named_by[wid]].amax(dim=0)
                valid[b, i] = True
    return targets, valid


def _subject(words: list[str], wid: int, object_words: list[set[str]]) -> list[int]:
    """The objects named by the noun phrase before words[wid]: its kind and, if given, its colour
    ("a red circle" in "a red circle in the top left" or "a red circle to the left of …")."""
    j = _noun_before(words, wid)
    if j is None:
        return []
    phrase = {words[j]} | ({words[j - 1]} if j > 0 and words[j - 1] in COLOURS else set())
    return [k for k, ws in enumerate(object_words) if phrase <= ws]


def _noun_before(words: list[str], wid: int) -> int | None:
    """The index of the last kind word (singular or plural) before words[wid], or None."""
    return next((j for j in range(wid - 1, -1, -1) if words[j] in NOUNS), None)


def _phrase(words: list[str], noun: int) -> list[int]:
    """The word ids of the noun phrase ending at words[noun]: its size and colour words, then the kind."""
    start = noun
    while start > 0 and (words[start - 1] in COLOURS or words[start - 1] in SIZES):
        start -= 1
    return list(range(start, noun + 1))


def phrase_count(words: list[str], noun: int) -> int:
    """How many objects the noun phrase ending at words[noun] names: 2 for "two red circles", else 1."""
    start = _phrase(words, noun)[0]
    return COUNTS.get(words[start - 1], 1) if start > 0 else 1


def has_relation(words: list[str], places: bool = False) -> bool:
    """Whether a caption's words hold a relation ("above", "to the left of"; not the place "in the top left"
    alone). places: two placed objects count too ("A at the top and B at the bottom"; diffusion/relations.py)."""
    return bool(read_relations(words, places).relations)


def phrase_tokens(encoding, b: int, noun: int, num_tokens: int) -> torch.Tensor:
    """(L,) float, 1 on the tokens of caption b's noun phrase ending at word `noun` (size, colour, kind)."""
    phrase = _phrase(encoding.words[b], noun)
    row = torch.zeros(num_tokens)
    row[[i for i, wi in enumerate(encoding.word_ids[b]) if wi in phrase]] = 1
    return row


def relation_pairs(encoding, num_tokens: int, places: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every "A <relation> B" in the B captions, as the tokens of A's and B's noun phrases.

    Relations are read however they are said ("over", "on top of", "to the left of" …; with places=True
    also "A at the top and B at the bottom"): diffusion/relations.py.

    Returns:
        a_tokens, b_tokens (P, L) float, 1 on the tokens of A's (B's) phrase; prompt (P,) long, the
        caption each relation is in; axis (P,) long, 0 for above/below and 1 for left/right of;
        sign (P,) float, +1 where A's coordinate is the smaller ("above", "left of").
    """
    a_tokens, b_tokens, prompt, axis, sign = [], [], [], [], []
    for b, words in enumerate(encoding.words):
        for relation in read_relations(words, places).relations:
            a_tokens.append(phrase_tokens(encoding, b, relation.a, num_tokens))
            b_tokens.append(phrase_tokens(encoding, b, relation.b, num_tokens))
            prompt.append(b)
            axis.append(relation.axis)
            sign.append(relation.sign)
    none = torch.zeros(0, num_tokens)
    return (torch.stack(a_tokens) if prompt else none, torch.stack(b_tokens) if prompt else none,
            torch.tensor(prompt, dtype=torch.long), torch.tensor(axis, dtype=torch.long),
            torch.tensor(sign, dtype=torch.float))


def relation_loss(maps: list[tuple[tuple[int, int], torch.Tensor]], pairs, margin: float = RELATION_MARGIN
                  ) -> torch.Tensor:
    """Hinge on the order of A's and B's map centres, averaged over layers and relations; zero if none.

    maps: GroundingRecorder.maps.  pairs: relation_pairs(...).
    """
    a_tokens, b_tokens, prompt, axis, sign = pairs
    if not maps or len(prompt) == 0:
        return maps[0][1].sum() * 0 if maps else torch.zeros(())
    terms = []
    for (h, w), a in maps:  # a: (B, L, N)
        L, device = a.shape[1], a.device
        ys, xs = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h,
                                (torch.arange(w, device=device) + 0.5) / w, indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()], dim=-1)  # (N, 2), fractions of the side
        per_prompt = a[prompt.to(device)]  # (P, L, N)
        centres = []
        for tokens in (a_tokens, b_tokens):
            m = torch.einsum("pl,pln->pn", tokens[:, :L].to(device), per_prompt)  # (P, N)
            m = m / m.sum(-1, keepdim=True).clamp_min(1e-8)
            centres.append((m @ coords).gather(1, axis.to(device)[:, None])[:, 0])  # (P,)
        gap = sign.to(device) * (centres[1] - centres[0])
        terms.append(F.relu(margin - gap).mean())
    return torch.stack(terms).mean()


def grounding_loss(maps: list[tuple[tuple[int, int], torch.Tensor]], targets: torch.Tensor,
                   valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token loss, pixel loss), each averaged over layers and grounded tokens; zeros if none is grounded.

    maps: GroundingRecorder.maps.  targets (B, L, R, R), valid (B, L) from token_targets.
    """
    if not maps or not bool(valid.any()):
        zero = maps[0][1].sum() * 0 if maps else torch.zeros(())
        return zero, zero
    token_terms, pixel_terms = [], []
    for (h, w), a in maps:  # a: (B, L, N)
        L = a.shape[1]
        m = F.interpolate(targets[:, :L].to(a.device), size=(h, w), mode="area").flatten(2)  # (B, L, N)
        keep = valid[:, :L].to(a.device)
        inside = (a * m).sum(-1) / a.sum(-1).clamp_min(1e-8)  # (B, L)
        token_terms.append((1 - inside[keep]).square().mean())
        # BCE written out: F.binary_cross_entropy refuses to run under autocast.
        a = a.clamp(1e-6, 1 - 1e-6)
        bce = -(m * a.log() + (1 - m) * (1 - a).log()).mean(-1)  # (B, L)
        pixel_terms.append(bce[keep].mean())
    return torch.stack(token_terms).mean(), torch.stack(pixel_terms).mean()
