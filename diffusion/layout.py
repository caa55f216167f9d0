"""Layout guidance: nudge the noise so the prompt's objects all appear and its relations hold, while sampling.

The shipped model draws the objects of "a red circle above a blue square" and looks at them with the
right words, but where they go is decided in the first, noisiest steps, where the image cannot say
where anything is yet, and there it follows the starting noise about as often as the words (stage 7:
right 89, inverted 43); and now and then one of "a red circle and a blue square" is not drawn at all
(two objects 0.875). Both can be asked of the sampler as Attend-and-Excite (Chefer et al., SIGGRAPH
2023) asks its attention loss: at each of the first steps (t ≥ `WINDOW` · T) take one gradient step on
the noisy image,

    x ← x − (Δt / T₂₀) · ∇ₓ Σ_images [η_rel · relation loss + η_obj · (object + count loss)](maps at x),

Δt the step's stride and T₂₀ a 20-step stride, so the push does not grow with the number of steps.

    relation loss  training's (`diffusion.grounding.relation_loss`): in "A above B", A's word maps must
                   lie half a cell above B's. Prompts with a relation.
    object loss    Attend-and-Excite's: 1 − the peak, over the finest map's positions, of the weakest noun
                   phrase's share of the word attention ("a red circle and a blue square": the share of
                   "red circle" and of "blue square" among the words' attention, start and end tokens
                   left out). A phrase nothing attends to is an object not drawn yet. Prompts naming two
                   objects or more without a relation (with a relation, it made relations hold less often).
    count loss     the share of a counted phrase's attention ("two blue squares") outside its n strongest
                   cells of the 3 × 3 grid the objects sit on: a third blob is a third square being drawn.
                   Phrases with a number word, in prompts without a relation; weighed by η_obj too.

All read only the caption. Prompts with none ("a red circle", "a red circle on the left") are not
touched and cost nothing. The nudge is taken in the model's input space (after the sampler's
`scale_model_input`), so η means the same for every sampler. Each guided step costs one more forward and
backward pass over the prompt half.

It reads prompts in the shapes caption grammar (diffusion/grammar.py: its kinds, colours, number words and
places), so the pipeline runs it only for a model whose captions are written in it (diffusion/vocabulary.py,
`layout_grammar`); on any other model it stays off and the app says so. A relation is read however the
prompt says it ("over", "on top of", "A at the top and B at the bottom": diffusion/relations.py), and a
phrase that sounds like one but is not read ("next to") is reported (`relation_notes`), never guessed. On
the shipped model (16 images a phrasing, benchmarks/phrasings.py) "A at the top and B at the bottom" held in
11 → 15 and "A over B" in 4 → 16 once read as relations ("A above B": 14 either way).

The maps the app shows are still the model's own: the nudge changes the image it denoises, not how
it attends. Tuned on the shipped model with evaluate.py's prompts at seeds 7, 3, 5 and 9 (no evaluation
seed; fp32): the relation held in 46 → 102 of 104 images at η_rel = 50 over the first 3 of 20 steps (101
at 25; η = 200 drew both objects less often, 88). Two-object prompts: 217 → 240 of 256 at η_obj = 20
(every seed better; 40 gave 114 of 128 where 20 gave 117, 80 gave 110). With the object term on
relation prompts too, the relation held in 224 instead of 234 of 256, so those prompts get only theirs.
Counting prompts (seeds 3 and 5, 128 images): the count held in 115 → 123 at η_obj = 20 (122 at 40); the
misses that drew a fourth object went from 9 to 0. The count term with n = 1 on each phrase of "A and
B", beside the object term, gave 118 of 128 two-object images where the object term alone gave 117: not kept.

Shapes: B images, C channels, H, W, L tokens, D text width, Q noun phrases in a batch.
"""

import torch
import torch.nn.functional as F

from diffusion.grammar import NOUNS
from diffusion.grounding import (
    GroundingRecorder,
    has_relation,
    phrase_count,
    phrase_tokens,
    relation_loss,
    relation_pairs,
)
from diffusion.relations import read_relations
from unet import UNet

RELATION_GUIDANCE = 50.0  # η_rel, the app's and evaluate.py's default: the step size at 20 sampler steps
OBJECT_GUIDANCE = 20.0  # η_obj, the same for the object term
WINDOW = 0.85  # guide the steps whose timestep is at least this fraction of the training schedule
REFERENCE_STEPS = 20  # η is the step size at this many sampler steps; other counts scale it by their stride
CELLS = 3  # the count term's grid: the shapes set draws each object in a cell of its own of a 3 × 3 grid


def object_phrases(encoding, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every noun phrase of the captions that name two objects or more without a relation ("a red circle
    and a blue square"; not "two red circles", one phrase, nor "a red circle above a blue square", which is
    the relation term's: with both terms, relations held less often, 234 → 224 of 256 probe images).

    Returns:
        tokens (Q, L) float, 1 on the phrase's tokens (its size, colour and kind words); prompt (Q,) long,
        the caption each phrase is in.
    """
    rows, prompt = [], []
    for b, words in enumerate(encoding.words):
        nouns = [j for j, w in enumerate(words) if w in NOUNS]
        if len(nouns) < 2 or has_relation(words, places=True):
            continue
        rows += [phrase_tokens(encoding, b, noun, num_tokens) for noun in nouns]
        prompt += [b] * len(nouns)
    return (torch.stack(rows) if rows else torch.zeros(0, num_tokens)), torch.tensor(prompt, dtype=torch.long)


def word_tokens(encoding, num_tokens: int) -> torch.Tensor:
    """(B, L) float, 1 on the tokens of a word (not start, end or padding): those the object term shares among."""
    return torch.tensor([[float(w is not None) for w in ids] + [0.0] * (num_tokens - len(ids))
                         for ids in encoding.word_ids])[:, :num_tokens]


def finest_maps(maps: list[tuple[tuple[int, int], torch.Tensor]]) -> tuple[tuple[int, int] | None, torch.Tensor | None]:
    """The finest cross-attention layers' size (h, w) and their mean map (B, L, h·w), as Attend-and-Excite
    aggregates; (None, None) without maps."""
    finest = max((size for size, _ in maps), default=None, key=lambda s: s[0] * s[1])
    layers = [a for size, a in maps if size == finest]
    return (finest, torch.stack(layers).mean(0)) if layers else (None, None)


def object_loss(maps: list[tuple[tuple[int, int], torch.Tensor]], phrases, words: torch.Tensor) -> torch.Tensor:
    """Σ over captions with phrases of 1 − the peak share of their weakest phrase; zero if none.

    maps: GroundingRecorder.maps.  phrases: object_phrases(...).  words (B, L): word_tokens(...), the
    tokens whose attention the shares are of. Read at the finest
    cross-attention layers (16×16 in the shipped model, as Attend-and-Excite reads 16×16 in Stable Diffusion).
    """
    tokens, prompt = phrases
    _, a = finest_maps(maps)
    if a is None or len(prompt) == 0:
        return maps[0][1].sum() * 0 if maps else torch.zeros(())
    device = a.device
    L = a.shape[1]
    word = a * words[:, :L, None].to(device)
    share = word / word.sum(1, keepdim=True).clamp_min(1e-8)  # (B, L, N): each word token's share at each position
    per_phrase = torch.einsum("ql,qln->qn", tokens[:, :L].to(device), share[prompt.to(device)])  # (Q, N)
    peaks = per_phrase.amax(-1)  # (Q,)
    weakest = torch.full((a.shape[0],), float("inf"), device=device).scatter_reduce(
        0, prompt.to(device), peaks, reduce="amin")  # (B,), inf where a caption has no phrases
    guided = torch.isfinite(weakest)
    return (1 - weakest[guided]).sum()


def counted_phrases(encoding, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every noun phrase with a number word ("two red circles", "three crosses"), in captions without a
    relation, with the number of objects it names.

    Returns:
        tokens (Q, L) float, 1 on the phrase's tokens; prompt (Q,) long, its caption; count (Q,) long.
    """
    rows, prompt, count = [], [], []
    for b, words in enumerate(encoding.words):
        if has_relation(words, places=True):
            continue
        for noun in (j for j, w in enumerate(words) if w in NOUNS):
            n = phrase_count(words, noun)
            if n > 1:
                rows.append(phrase_tokens(encoding, b, noun, num_tokens))
                prompt.append(b)
                count.append(n)
    return ((torch.stack(rows) if rows else torch.zeros(0, num_tokens)), torch.tensor(prompt, dtype=torch.long),
            torch.tensor(count, dtype=torch.long))


def count_loss(maps: list[tuple[tuple[int, int], torch.Tensor]], counted) -> torch.Tensor:
    """Σ over counted phrases of the share of their attention outside their n strongest grid cells; zero if none.

    "three red diamonds" drawn as four has a fourth place the phrase attends to. The phrase's attention
    (its tokens' softmax weights, so the background, which attends to the start token, weighs little) at
    the finest layers is pooled to the `CELLS` × `CELLS` grid the objects sit on, normalised to sum to 1,
    and what lies beyond its n largest cells is the loss (0 when n cells hold it all).
    maps: GroundingRecorder.maps.  counted: counted_phrases(...).
    """
    tokens, prompt, count = counted
    finest, a = finest_maps(maps)
    if a is None or len(prompt) == 0:
        return maps[0][1].sum() * 0 if maps else torch.zeros(())
    device, L = a.device, a.shape[1]
    per_phrase = torch.einsum("ql,qln->qn", tokens[:, :L].to(device), a[prompt.to(device)])  # (Q, N)
    cells = F.adaptive_avg_pool2d(per_phrase.reshape(-1, 1, *finest), CELLS).flatten(1)  # (Q, CELLS²)
    cells = cells / cells.sum(1, keepdim=True).clamp_min(1e-8)
    ranked = cells.sort(1, descending=True).values
    beyond = torch.arange(ranked.shape[1], device=device) >= count.to(device)[:, None]  # (Q, CELLS²)
    return (ranked * beyond).sum()


class LayoutGuide:
    """The sampling loop's guide: guide(step, t, x (B, C, H, W)) → the nudged x, or x itself outside the window.
    `relations` / `objects`: whether the relation / object terms (object or count) apply to any of the B
    prompts; `counts`: whether the count term does."""

    def __init__(self, unet: UNet, context, mask, token_weights, scheduler, num_train_timesteps: int,
                 pairs, phrases, words, counted, relation: float, objects: float):
        self.unet, self.context, self.mask, self.token_weights = unet, context, mask, token_weights
        self.scheduler, self.pairs, self.phrases, self.words, self.counted = scheduler, pairs, phrases, words, counted
        self.eta_relation, self.eta_objects = relation, objects
        self.relations = pairs is not None and len(pairs[2]) > 0
        self.counts = counted is not None and len(counted[1]) > 0
        self.objects = (phrases is not None and len(phrases[1]) > 0) or self.counts
        timesteps = [int(t) for t in scheduler.timesteps]
        stride = num_train_timesteps / REFERENCE_STEPS
        self.scales = {i: (t - (timesteps[i + 1] if i + 1 < len(timesteps) else 0)) / stride
                       for i, t in enumerate(timesteps) if t >= WINDOW * num_train_timesteps}

    def loss(self, maps) -> torch.Tensor:
        """η_rel · P · relation loss (an average over the P relations: × P gives each its own gradient, in a
        batch where some prompts have none too) + η_obj · (object loss + count loss) (sums over images)."""
        total = maps[0][1].sum() * 0
        if self.relations:
            total = total + self.eta_relation * len(self.pairs[2]) * relation_loss(maps, self.pairs)
        if self.phrases is not None and len(self.phrases[1]):
            total = total + self.eta_objects * object_loss(maps, self.phrases, self.words)
        if self.counts:
            total = total + self.eta_objects * count_loss(maps, self.counted)
        return total

    def __call__(self, step: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if step not in self.scales:
            return x
        scheduler, context = self.scheduler, self.context
        with torch.inference_mode(False), torch.enable_grad():
            x_in = scheduler.scale_model_input(x.clone(), t).detach().requires_grad_(True)  # (B, C, H, W)
            recorder = GroundingRecorder()
            with self.unet.record_attention(recorder):
                self.unet(x_in.to(context.dtype), torch.full((x.shape[0],), int(t), device=x.device),
                          context, self.mask, self.token_weights)
            (grad,) = torch.autograd.grad(self.loss(recorder.maps), x_in)
        input_scale = float(scheduler.scale_model_input(torch.ones(1, device=x.device), t))  # x_in = s · x
        return x - self.scales[step] * grad.to(x.dtype) / input_scale


def layout_guide(unet: UNet, encoding, context: torch.Tensor, mask: torch.Tensor,
                 token_weights: torch.Tensor | None, scheduler, num_train_timesteps: int,
                 relation: float = 0.0, objects: float = 0.0) -> LayoutGuide | None:
    """The sampling loop's guide for B prompts, or None when no term applies to any of them.

    Args:
        unet: the denoiser, called as unet(x, t, context, mask, token_weights) with grad enabled.
        encoding: the text encoder's EncodedPrompts of the B prompts (words and word ids find the phrases).
        context: (B, L, D), mask (B, L), token_weights (B, L) or None: the prompt half of the guided batch.
        scheduler: the sampling scheduler, after set_timesteps (its timesteps, its input scaling).
        num_train_timesteps: T of the training schedule.
        relation: η_rel ≥ 0 (0 off).  objects: η_obj ≥ 0 (0 off).
    """
    check_strengths(relation, objects)
    if relation == 0 and objects == 0:
        return None
    # Inputs of a call under inference_mode are inference tensors: autograd needs ordinary ones.
    with torch.inference_mode(False):
        L = context.shape[1]
        pairs = relation_pairs(encoding, L, places=True) if relation else None
        phrases = object_phrases(encoding, L) if objects else None
        counted = counted_phrases(encoding, L) if objects else None
        if (pairs is None or len(pairs[2]) == 0) and all(t is None or len(t[1]) == 0 for t in (phrases, counted)):
            return None
        words = word_tokens(encoding, L) if phrases is not None else None
        context, mask = context.clone(), mask.clone()
        token_weights = None if token_weights is None else token_weights.clone()
    return LayoutGuide(unet, context, mask, token_weights, scheduler, num_train_timesteps,
                       pairs, phrases, words, counted, relation, objects)


def check_strengths(relation: float, objects: float) -> None:
    """Refuse a negative or NaN η: the nudge would push the layout the wrong way, or poison the image."""
    for name, strength in (("relation_guidance", relation), ("object_guidance", objects)):
        if not strength >= 0:  # NaN too
            raise ValueError(f"{name} must be >= 0 (0 turns it off), got {strength}.")


def relation_notes(encoding) -> list[str]:
    """One line per phrase of the prompts that sounds like a relation but is none the guidance reads
    ("next to", "behind", "at the top of"), so the user learns it was not guided rather than guessing."""
    notes = []
    for words in encoding.words:
        reading = read_relations(words, places=True)
        outcome = ("only the relations it reads were guided" if reading.relations
                   else "it ran without relation guidance")
        notes += [f"guidance: '{phrase}' is not a relation this model's guidance understands; {outcome}."
                  for phrase in reading.unread]
    return list(dict.fromkeys(notes))
