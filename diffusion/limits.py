"""The limits of one request, in one place, and the checks that hold a value to them.

The pipeline refuses what the process cannot do (`MAX_STEPS`); the app holds every parameter of every
endpoint to these same numbers (app.py, `validated`), so a limit changes here or nowhere. A check takes
whatever arrived (a JSON value from an API client, the browser's number, a Python call's argument) and
returns the value the code expects, or raises `InvalidInput` naming the parameter, what arrived and what
is allowed:

    Whole(1, MAX_STEPS).parse("steps", 20.0)     # 20
    Whole(1, MAX_STEPS).parse("steps", "NaN")    # InvalidInput: steps must be a whole number from 1 to
                                                 #   100; got 'NaN' (text)

The checks are strict on type: a number must arrive as a number, not as text, and true/false as a
boolean. Coercing "20" to 20 would also coerce "1e308" and "nan", and an API client is better told.
"""

import math
from dataclasses import dataclass

from diffusion.prompts import parse_emphasis

# A 2-vCPU Space runs one request at a time: these bound how long one user holds the queue, and how much
# memory one run's maps take (they grow with images × layers; see diffusion/serving.py's MapsBudget).
MAX_PROMPT_CHARS = 300
MAX_STEPS = 100
MAX_IMAGES = 8
MAX_GUIDANCE = 20.0
MAX_RELATION_GUIDANCE = 200.0  # beyond ~100 the pair is ordered but drawn less often (diffusion/layout.py)
MAX_OBJECT_GUIDANCE = 100.0  # beyond ~40 it draws two objects less often again (diffusion/layout.py)
MAX_SEED = 2**31 - 1
MAX_NAME_CHARS = 100  # a layer or word name: far longer than any real one
SHOWN_CHARS = 40  # how much of a bad value an error message repeats


class InvalidInput(ValueError):
    """A request parameter out of type or range; the message says which, what arrived and what is allowed."""


def shown(value) -> str:
    """A bad value as an error message repeats it: short, with its JSON type ("'NaN' (text)")."""
    if value is None:
        return "nothing (null)"
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "text", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > SHOWN_CHARS:
        text = f"{text[:SHOWN_CHARS]}… ({len(text):,} characters)"
    return f"{text} ({kind})"


def _number(value) -> float | None:
    """The value as a finite float, or None when it is not a finite JSON number (booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):
        return float(value) if abs(value) <= 2**53 else None  # past 2**53 a float loses whole numbers
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Whole:
    """A whole number from low to high (a slider's 20.0 counts as 20)."""

    low: int
    high: int
    note: str = ""  # e.g. " (0: all steps)"

    def describe(self) -> str:
        return f"a whole number from {self.low} to {self.high}{self.note}"

    def parse(self, name: str, value) -> int:
        number = _number(value)
        if number is None or not number.is_integer() or not self.low <= number <= self.high:
            raise InvalidInput(f"{name} must be {self.describe()}; got {shown(value)}.")
        return int(number)


@dataclass(frozen=True)
class Real:
    """A finite number from low to high."""

    low: float
    high: float
    note: str = ""  # e.g. " (0 turns it off)"

    def describe(self) -> str:
        return f"a number from {self.low:g} to {self.high:g}{self.note}"

    def parse(self, name: str, value) -> float:
        number = _number(value)
        if number is None or not self.low <= number <= self.high:
            raise InvalidInput(f"{name} must be {self.describe()}; got {shown(value)}.")
        return float(number)


@dataclass(frozen=True)
class Text:
    """Text of at most max_chars characters; required: not blank; otherwise None reads as ""."""

    max_chars: int
    required: bool = False

    def describe(self) -> str:
        return f"{'non-empty ' if self.required else ''}text of at most {self.max_chars} characters"

    def parse(self, name: str, value) -> str:
        if value is None and not self.required:
            return ""
        if not isinstance(value, str):
            raise InvalidInput(f"{name} must be {self.describe()}; got {shown(value)}.")
        if len(value) > self.max_chars:
            raise InvalidInput(f"{name} has {len(value):,} characters; the limit is {self.max_chars}. Shorten it.")
        if self.required and not value.strip():
            raise InvalidInput(f"{name} is empty: describe the image in words this model knows (see 'What this "
                               "model knows' and the examples).")
        return value


@dataclass(frozen=True)
class Prompt(Text):
    """Prompt text whose (word:weight) emphasis also parses (diffusion/prompts.py), so a bad weight is named
    as the prompt's fault before sampling starts."""

    def parse(self, name: str, value) -> str:
        text = super().parse(name, value)
        try:
            parse_emphasis(text)
        except ValueError as e:
            raise InvalidInput(f"{name}: {e}") from None
        return text


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of values."""

    options: tuple

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)

    def parse(self, name: str, value):
        if isinstance(value, list | dict | bool) or value not in self.options:  # True == 1: not a choice
            raise InvalidInput(f"{name} must be {self.describe()}; got {shown(value)}.")
        return self.options[self.options.index(value)]  # the option itself: 1.0 arrives, 1 goes on


@dataclass(frozen=True)
class Flag:
    """true or false."""

    def describe(self) -> str:
        return "true or false"

    def parse(self, name: str, value) -> bool:
        if not isinstance(value, bool):
            raise InvalidInput(f"{name} must be {self.describe()}; got {shown(value)}.")
        return value


Check = Whole | Real | Text | Prompt | Choice | Flag
