"""The shapes caption grammar: the words the grounding loss and layout guidance know how to read.

"a small red circle above two blue squares", "a green cross in the top left": kinds (singular and
plural), colours, sizes, number words, position phrases and relations. `data/shapes.py` writes its
captions with these words and imports them from here, not the other way round: `diffusion/` reads a
grammar it is told about (a model's caption summary names it, diffusion/vocabulary.py) and never
imports a data set. Only the word lists live here; what the generator draws with them (RGB values,
size ranges) stays in data/shapes.py.
"""

NAME = "shapes"  # the `grammar` a caption summary names when its captions are written in this one

KINDS = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "large")
NUMBER_WORDS = {2: "two", 3: "three"}
RELATIONS = ("above", "below", "left of", "right of")
CONVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}  # A rel B == B conv A
POSITION_WORDS = {(0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
                  (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
                  (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right"}
PLACE_WORDS = ("top", "bottom", "left", "right", "center")  # the words of POSITION_WORDS that name a place

NOUNS = frozenset(KINDS) | frozenset(PLURALS.values())
COUNTS = {word: n for n, word in NUMBER_WORDS.items()}  # "two" -> 2

# The words a tokenizer must hold whole for a model without a caption summary to count as speaking
# this grammar (diffusion/vocabulary.py, layout_grammar): every kind and colour, and the relation words.
CORE_WORDS = frozenset(KINDS) | frozenset(COLOURS) | {"above", "below", "left", "right"}

# Prompts that show what a model of this grammar does (the app's examples when its folder has no
# caption summary): a relation, two objects, a count, a place and an emphasised word.
EXAMPLES = (
    "a red circle",
    "a blue square above a yellow triangle",
    "a yellow cross and a red square",
    "three yellow circles",
    "a large orange diamond in the center",
    "a (red:2) triangle to the right of an orange cross",
)
