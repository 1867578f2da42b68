"""Generators of circuit tasks (our own templates and word lists, seeded): each returns
:class:`~transcoders.circuits.tasks.TaskItem` s with a target spec and a counterfactual prompt.

- :func:`greater_than`: Hanna et al. 2023 ("How does GPT-2 compute greater-than?"), digit by
  digit. SmolLM2 writes numbers one digit per token, so "The war lasted from 1732 to 17" asks
  for the *tens digit* of the end year; the target is ``group:+4,...,9;-0,...,3`` (the mean
  logit of the digits greater than the start year's tens digit minus that of the others, the
  equal digit counted with the others as the paper counts ``y <= YY``) and the metric is the
  probability difference (:func:`~transcoders.circuits.targets.prob_diff`). The counterfactual
  is the paper's "01" prompt: the same sentence with start year ``XX01``. Dunefsky et al. 2024
  ("Transcoders find interpretable LLM feature circuits") take the same task as their case
  study of GPT-2 small's greater-than circuit through transcoder features.
- :func:`ioi`: indirect object identification (Wang et al. 2022): "When Mary and John went to
  the store, John gave a drink to" -> " Mary"; target ``diff: Mary, John`` (IO - S); the
  counterfactual replaces the second mention of S by a third name (the paper's ABC prompts).
- :func:`capitals`: "Fact: the capital of France is" -> " Paris"; target ``diff: Paris, Rome``
  against the capital of the counterfactual's country.
- :func:`arithmetic`: single-digit sums with single-digit answers, "Calculate: 3 + 4 = " -> "7"
  (SmolLM2 writes " 7" as ``' '`` then ``'7'``, so prompts end with the space); target
  ``group:+7;-0,...,6,8,9`` (the answer's logit minus the mean of the other digits); the
  counterfactual changes one operand so the sum differs.

Names, capitals and digits are single tokens (with their leading space) in SmolLM2's
tokenizer; ``tests/test_tasks.py`` checks it. The templates of ``capitals`` and ``arithmetic``
were chosen among a few we tried for ones SmolLM2-135M-Instruct answers (a 135M model answers
"The capital of Egypt is" with " the"; "Calculate: 3 + 4 = " it gets right).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .tasks import TaskItem

GT_TEMPLATES = (
    "The {noun} lasted from the year {start} to the year {cc}",
    "The {noun} lasted from {start} to {cc}",
    "The {noun} began in {start} and ended in {cc}",
    "The {noun} started in the year {start} and was over by the year {cc}",
    "The {noun} went on from {start} until {cc}",
)
GT_NOUNS = ("war", "siege", "drought", "famine", "expedition", "reign", "plague", "occupation", "rebellion",
            "blockade", "truce", "pilgrimage", "campaign", "feud", "embargo", "dynasty", "voyage", "strike",
            "boom", "exile")
GT_CENTURIES = tuple(range(11, 20))  # years 11xx .. 19xx
GT_YEARS = tuple(range(10, 90))  # last two digits: tens digit 1..8, so both digit sets are non-empty

IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} arrived at the {place}, {S} handed a {object} to",
    "While {A} and {B} were at the {place}, {S} passed a {object} to",
    "{A} and {B} spent the afternoon at the {place}. Later, {S} gave a {object} to",
    "Once {A} and {B} got to the {place}, {S} brought a {object} to",
)
IOI_NAMES = ("Mary", "John", "Michael", "David", "James", "Robert", "William", "Richard", "Thomas", "Charles",
             "Daniel", "Matthew", "Anthony", "Mark", "Paul", "Steven", "Andrew", "Kevin", "Brian", "George",
             "Edward", "Ryan", "Jacob", "Eric", "Peter", "Sarah", "Emily", "Anna", "Laura", "Lisa", "Karen",
             "Susan", "Jessica", "Linda", "Rachel", "Kate", "Alice", "Helen", "Amy", "Rose", "Grace", "Emma",
             "Julia", "Lucy", "Jack", "Tom", "Sam", "Henry", "Adam", "Martin", "Simon", "Victoria")
IOI_PLACES = ("store", "park", "school", "hospital", "office", "restaurant", "station", "market", "library", "beach",
              "garden", "museum")
IOI_OBJECTS = ("drink", "book", "ring", "letter", "key", "bag", "gift", "pencil", "ball", "flower")

CAPITAL_TEMPLATES = (
    "Fact: the capital of {country} is",
    "The capital of {country} is",
    "The capital of {country} is the city of",
    "I spent a week in {country}, mostly in its capital,",
)
# Countries whose capital is one token (with its leading space) in SmolLM2's tokenizer and is
# not also the country's name or a multi-word name ("New Delhi", "Buenos Aires").
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "England": "London", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Poland": "Warsaw", "Hungary": "Budapest", "Canada": "Ottawa", "Australia": "Canberra", "Kenya": "Nairobi",
    "Peru": "Lima", "Cuba": "Havana", "Finland": "Helsinki", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Chile": "Santiago", "Iran": "Tehran", "Iraq": "Baghdad", "Syria": "Damascus",
    "South Korea": "Seoul", "the Philippines": "Manila", "Ukraine": "Kiev", "Switzerland": "Bern",
    "Scotland": "Edinburgh", "Wales": "Cardiff", "Afghanistan": "Kabul", "Bulgaria": "Sofia", "Tunisia": "Tunis",
    "Jamaica": "Kingston",
}

ARITHMETIC_TEMPLATES = (
    "Calculate: {a} + {b} = ",
    "Compute: {a} + {b} = ",
    "Addition: {a} + {b} = ",
    "Exercise: {a} + {b} = ",
    "1 + 2 = 3\n4 + 4 = 8\n{a} + {b} = ",
)
ARITHMETIC_PAIRS = tuple((a, b) for a in range(10) for b in range(10) if a + b <= 9)  # 55 single-digit sums


def _check_n(n: int, total: int, what: str) -> None:
    if n < 1:
        raise ValueError(f"--n must be at least 1 (got {n})")
    if n > total:
        raise ValueError(f"{what} has only {total} distinct items; ask for at most {total} (got --n {n})")


def _digits_spec(plus, minus) -> str:
    return "group:+" + ",".join(str(d) for d in plus) + ";-" + ",".join(str(d) for d in minus)


def greater_than(n: int = 200, seed: int = 0) -> list[TaskItem]:
    """``n`` distinct greater-than prompts (Hanna et al. 2023, adapted to digit tokens; see the
    module docstring): templates x nouns x centuries 11-19 x start years ``XX10``-``XX89``
    (72,000 in all), sampled without replacement.

    Each item: ``target`` ``group:+{d+1..9};-{0..d}`` for the start year's tens digit ``d``;
    ``counterfactual`` the same sentence with start year ``XX01``; ``answer`` None (several
    digits are right); ``meta``: ``template``, ``noun``, ``century``, ``start``, ``tens``.

    Raises:
        ValueError: ``n`` < 1 or more than the distinct prompts there are.
    """
    sizes = (len(GT_TEMPLATES), len(GT_NOUNS), len(GT_CENTURIES), len(GT_YEARS))
    total = sizes[0] * sizes[1] * sizes[2] * sizes[3]
    _check_n(n, total, "greater-than")
    items = []
    for code in random.Random(seed).sample(range(total), n):
        code, yi = divmod(code, sizes[3])
        code, ci = divmod(code, sizes[2])
        ti, ni = divmod(code, sizes[1])
        cc, yy = GT_CENTURIES[ci], GT_YEARS[yi]
        d = yy // 10
        fmt = dict(noun=GT_NOUNS[ni], cc=cc)
        items.append(TaskItem(
            prompt=GT_TEMPLATES[ti].format(start=cc * 100 + yy, **fmt),
            target=_digits_spec(range(d + 1, 10), range(0, d + 1)),
            counterfactual=GT_TEMPLATES[ti].format(start=cc * 100 + 1, **fmt),
            answer=None,
            meta={"template": ti, "noun": GT_NOUNS[ni], "century": cc, "start": cc * 100 + yy, "tens": d},
        ))
    return items


def ioi(n: int = 200, seed: int = 0) -> list[TaskItem]:
    """``n`` distinct indirect-object-identification prompts (Wang et al. 2022; our templates
    and names): IO and S in either order (ABBA / BABA), then S again, e.g. "When Mary and John
    went to the store, John gave a drink to" -> " Mary".

    Each item: ``target`` ``diff: IO, S``; ``counterfactual`` the same prompt with the second
    S replaced by a third name C (ABC); ``answer`` ``" IO"``; ``meta``: ``template``, ``io``,
    ``s``, ``c``, ``order``, ``place``, ``object``.

    Raises:
        ValueError: ``n`` < 1 or absurdly large (more than 100,000).
    """
    _check_n(n, 100_000, "ioi (as generated here)")
    rng = random.Random(seed)
    items, seen = [], set()
    while len(items) < n:
        ti = rng.randrange(len(IOI_TEMPLATES))
        io, s, c = rng.sample(IOI_NAMES, 3)
        order = rng.choice(("ABBA", "BABA"))
        a, b = (io, s) if order == "ABBA" else (s, io)
        place, obj = rng.choice(IOI_PLACES), rng.choice(IOI_OBJECTS)
        prompt = IOI_TEMPLATES[ti].format(A=a, B=b, S=s, place=place, object=obj)
        if prompt in seen:
            continue
        seen.add(prompt)
        items.append(TaskItem(
            prompt=prompt, target=f"diff: {io}, {s}",
            counterfactual=IOI_TEMPLATES[ti].format(A=a, B=b, S=c, place=place, object=obj),
            answer=f" {io}",
            meta={"template": ti, "io": io, "s": s, "c": c, "order": order, "place": place, "object": obj},
        ))
    return items


def capitals(n: int = 200, seed: int = 0) -> list[TaskItem]:
    """``n`` distinct capital-recall items: a template and country, against another country
    (templates x 40 countries x 39 others = 6,240 in all), sampled without replacement.

    Each item: ``prompt`` e.g. "Fact: the capital of France is"; ``target`` ``diff: Paris, Rome``
    (the capital of the other country); ``counterfactual`` the template with the other
    country; ``answer`` ``" Paris"``; ``meta``: ``template``, ``country``, ``capital``, ``other``.

    Raises:
        ValueError: ``n`` < 1 or more than the distinct items there are.
    """
    countries = list(CAPITALS)
    k = len(countries)
    total = len(CAPITAL_TEMPLATES) * k * (k - 1)
    _check_n(n, total, "capitals")
    items = []
    for code in random.Random(seed).sample(range(total), n):
        code, oi = divmod(code, k - 1)
        ti, ci = divmod(code, k)
        oi += oi >= ci  # skip the country itself
        country, other = countries[ci], countries[oi]
        tpl = CAPITAL_TEMPLATES[ti]
        items.append(TaskItem(
            prompt=tpl.format(country=country), target=f"diff: {CAPITALS[country]}, {CAPITALS[other]}",
            counterfactual=tpl.format(country=other), answer=f" {CAPITALS[country]}",
            meta={"template": ti, "country": country, "capital": CAPITALS[country], "other": other},
        ))
    return items


def arithmetic(n: int = 200, seed: int = 0) -> list[TaskItem]:
    """``n`` distinct single-digit sums with a single-digit answer (``a + b <= 9``; templates x
    55 pairs = 275 in all), sampled without replacement.

    Each item: ``prompt`` e.g. "Calculate: 3 + 4 = " (ending in the space SmolLM2 writes before a
    digit); ``target`` ``group:+7;-0,1,2,3,4,5,6,8,9``; ``counterfactual`` the template with one
    operand changed so the sum differs; ``answer`` ``"7"``; ``meta``: ``template``, ``a``, ``b``,
    ``sum``, ``counterfactual_sum``.

    Raises:
        ValueError: ``n`` < 1 or more than the distinct items there are.
    """
    total = len(ARITHMETIC_TEMPLATES) * len(ARITHMETIC_PAIRS)
    _check_n(n, total, "arithmetic")
    rng = random.Random(seed)
    items = []
    for code in rng.sample(range(total), n):
        ti, pi = divmod(code, len(ARITHMETIC_PAIRS))
        a, b = ARITHMETIC_PAIRS[pi]
        others = [(x, b) for x in range(10) if x != a and x + b <= 9] or [(a, y) for y in range(10) if y != b and a + y <= 9]
        ca, cb = rng.choice(others)
        s, tpl = a + b, ARITHMETIC_TEMPLATES[ti]
        items.append(TaskItem(
            prompt=tpl.format(a=a, b=b), target=_digits_spec([s], [d for d in range(10) if d != s]),
            counterfactual=tpl.format(a=ca, b=cb), answer=str(s),
            meta={"template": ti, "a": a, "b": b, "sum": s, "counterfactual_sum": ca + cb},
        ))
    return items


GENERATORS: dict[str, Callable[[int, int], list[TaskItem]]] = {
    "greater-than": greater_than, "ioi": ioi, "capitals": capitals, "arithmetic": arithmetic,
}

__all__ = ["GENERATORS", "arithmetic", "capitals", "greater_than", "ioi"]
