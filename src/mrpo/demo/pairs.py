"""Built-in preference pairs whose chosen answer is checkably right and whose rejected answer is checkably wrong.

The demo needs data that is small, offline and honest: a pair where code can tell which answer is correct, so a
trained policy's preference can be judged without a human. Six kinds, each a one-sentence answer to a
one-sentence question, in conversational form::

    {"prompt": [{"role": "user", "content": "What is 23 + 45?"}],
     "chosen": [{"role": "assistant", "content": "23 + 45 = 68."}],
     "rejected": [{"role": "assistant", "content": "23 + 45 = 86."}],
     "kind": "arithmetic", "answer": "68"}

* ``arithmetic``: a + b, a - b, a × b with small numbers; rejected is off by one, off by ten, has its digits
  swapped, or (for products) uses a neighbouring factor;
* ``units``: km→m, hours→minutes, kg→g, ...; rejected uses a wrong conversion factor;
* ``capitals``: rejected is a famous non-capital city (Sydney for Australia) or another capital of the continent;
* ``elements``: chemical symbols; rejected is the naive abbreviation of the name (Go for gold, So for sodium);
* ``opposites``: rejected is a synonym instead of an antonym (hot → warm);
* ``letters``: letter counts of words; rejected is off by one.

``kind`` and ``answer`` (the key fact of the chosen answer) are extra columns: :func:`mrpo.data.sources.load_pairs` keeps
them in ``PreferencePair.metadata``. Everything is deterministic given the seed.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "CAPITALS",
    "ELEMENTS",
    "KINDS",
    "OPPOSITES",
    "UNIT_CONVERSIONS",
    "WORDS",
    "arithmetic_problems",
    "generate_pairs",
    "train_test_split",
    "unit_problems",
    "write_jsonl",
    "write_demo_data",
]

KINDS = ("arithmetic", "units", "capitals", "elements", "opposites", "letters")
ARITHMETIC_PAIRS = 90
UNIT_PAIRS = 60

# (country, capital, continent, a famous city often mistaken for the capital or None)
CAPITALS = (
    ("France", "Paris", "Europe", "Lyon"),
    ("Germany", "Berlin", "Europe", "Munich"),
    ("Italy", "Rome", "Europe", "Milan"),
    ("Spain", "Madrid", "Europe", "Barcelona"),
    ("Portugal", "Lisbon", "Europe", "Porto"),
    ("Poland", "Warsaw", "Europe", "Krakow"),
    ("Austria", "Vienna", "Europe", None),
    ("Greece", "Athens", "Europe", None),
    ("Sweden", "Stockholm", "Europe", None),
    ("Norway", "Oslo", "Europe", None),
    ("Ireland", "Dublin", "Europe", None),
    ("Netherlands", "Amsterdam", "Europe", "Rotterdam"),
    ("Switzerland", "Bern", "Europe", "Zurich"),
    ("Hungary", "Budapest", "Europe", None),
    ("Russia", "Moscow", "Europe", "Saint Petersburg"),
    ("Japan", "Tokyo", "Asia", "Osaka"),
    ("China", "Beijing", "Asia", "Shanghai"),
    ("India", "New Delhi", "Asia", "Mumbai"),
    ("South Korea", "Seoul", "Asia", "Busan"),
    ("Thailand", "Bangkok", "Asia", None),
    ("Vietnam", "Hanoi", "Asia", "Ho Chi Minh City"),
    ("Indonesia", "Jakarta", "Asia", None),
    ("Turkey", "Ankara", "Asia", "Istanbul"),
    ("Pakistan", "Islamabad", "Asia", "Karachi"),
    ("Egypt", "Cairo", "Africa", "Alexandria"),
    ("Kenya", "Nairobi", "Africa", "Mombasa"),
    ("Nigeria", "Abuja", "Africa", "Lagos"),
    ("Ethiopia", "Addis Ababa", "Africa", None),
    ("Morocco", "Rabat", "Africa", "Casablanca"),
    ("Ghana", "Accra", "Africa", None),
    ("South Africa", "Pretoria", "Africa", "Johannesburg"),
    ("Canada", "Ottawa", "North America", "Toronto"),
    ("United States", "Washington, D.C.", "North America", "New York"),
    ("Mexico", "Mexico City", "North America", "Guadalajara"),
    ("Cuba", "Havana", "North America", None),
    ("Brazil", "Brasília", "South America", "Rio de Janeiro"),
    ("Argentina", "Buenos Aires", "South America", "Córdoba"),
    ("Peru", "Lima", "South America", None),
    ("Chile", "Santiago", "South America", "Valparaíso"),
    ("Colombia", "Bogotá", "South America", "Medellín"),
    ("Australia", "Canberra", "Oceania", "Sydney"),
    ("New Zealand", "Wellington", "Oceania", "Auckland"),
)

# (element, symbol)
ELEMENTS = (
    ("hydrogen", "H"),
    ("helium", "He"),
    ("lithium", "Li"),
    ("beryllium", "Be"),
    ("boron", "B"),
    ("carbon", "C"),
    ("nitrogen", "N"),
    ("oxygen", "O"),
    ("fluorine", "F"),
    ("neon", "Ne"),
    ("sodium", "Na"),
    ("magnesium", "Mg"),
    ("aluminium", "Al"),
    ("silicon", "Si"),
    ("phosphorus", "P"),
    ("sulfur", "S"),
    ("chlorine", "Cl"),
    ("argon", "Ar"),
    ("potassium", "K"),
    ("calcium", "Ca"),
    ("titanium", "Ti"),
    ("chromium", "Cr"),
    ("manganese", "Mn"),
    ("iron", "Fe"),
    ("cobalt", "Co"),
    ("nickel", "Ni"),
    ("copper", "Cu"),
    ("zinc", "Zn"),
    ("arsenic", "As"),
    ("bromine", "Br"),
    ("krypton", "Kr"),
    ("silver", "Ag"),
    ("tin", "Sn"),
    ("antimony", "Sb"),
    ("iodine", "I"),
    ("xenon", "Xe"),
    ("tungsten", "W"),
    ("platinum", "Pt"),
    ("gold", "Au"),
    ("mercury", "Hg"),
    ("lead", "Pb"),
    ("uranium", "U"),
)

# (word, its opposite, a synonym: the plausible wrong answer)
OPPOSITES = (
    ("hot", "cold", "warm"),
    ("big", "small", "large"),
    ("fast", "slow", "quick"),
    ("happy", "sad", "cheerful"),
    ("old", "young", "elderly"),
    ("tall", "short", "high"),
    ("hard", "soft", "firm"),
    ("light", "dark", "bright"),
    ("wet", "dry", "damp"),
    ("rich", "poor", "wealthy"),
    ("strong", "weak", "powerful"),
    ("empty", "full", "vacant"),
    ("clean", "dirty", "tidy"),
    ("loud", "quiet", "noisy"),
    ("thick", "thin", "dense"),
    ("brave", "cowardly", "bold"),
    ("true", "false", "correct"),
    ("wide", "narrow", "broad"),
    ("deep", "shallow", "profound"),
    ("smooth", "rough", "sleek"),
    ("sharp", "dull", "keen"),
    ("begin", "end", "start"),
    ("win", "lose", "triumph"),
    ("buy", "sell", "purchase"),
    ("love", "hate", "adore"),
    ("accept", "reject", "approve"),
    ("remember", "forget", "recall"),
    ("arrive", "depart", "reach"),
    ("increase", "decrease", "grow"),
    ("ancient", "modern", "old"),
    ("friend", "enemy", "companion"),
    ("polite", "rude", "courteous"),
    ("simple", "complex", "easy"),
    ("safe", "dangerous", "secure"),
    ("cheap", "expensive", "inexpensive"),
    ("asleep", "awake", "sleeping"),
    ("inside", "outside", "within"),
    ("first", "last", "initial"),
    ("near", "far", "close"),
    ("difficult", "easy", "hard"),
    ("question", "answer", "query"),
    ("victory", "defeat", "success"),
)

# (from unit, to unit, factor, wrong factors a hurried answer might use)
UNIT_CONVERSIONS = (
    ("kilometres", "metres", 1000, (100, 10000)),
    ("metres", "centimetres", 100, (10, 1000)),
    ("centimetres", "millimetres", 10, (100,)),
    ("kilograms", "grams", 1000, (100,)),
    ("litres", "millilitres", 1000, (100,)),
    ("hours", "minutes", 60, (100, 24)),
    ("minutes", "seconds", 60, (100,)),
    ("days", "hours", 24, (12, 60)),
    ("weeks", "days", 7, (5, 10)),
    ("years", "months", 12, (10, 52)),
)

WORDS = (
    "cat",
    "tree",
    "house",
    "river",
    "banana",
    "orange",
    "window",
    "garden",
    "pencil",
    "rocket",
    "sun",
    "moon",
    "planet",
    "castle",
    "dragon",
    "bottle",
    "guitar",
    "island",
    "jacket",
    "kitchen",
    "letter",
    "mountain",
    "number",
    "ocean",
    "pocket",
    "question",
    "rabbit",
    "school",
    "table",
    "umbrella",
    "village",
    "winter",
    "yellow",
    "zebra",
    "apple",
    "bridge",
    "candle",
    "doctor",
    "engine",
    "forest",
)


def generate_pairs(seed: int = 0) -> list[dict]:
    """All built-in pairs (one per distinct prompt, about 300), in a seed-determined order mixing the kinds."""
    records = (
        _arithmetic(_rng(seed, "arithmetic"), ARITHMETIC_PAIRS)
        + _units(_rng(seed, "units"), UNIT_PAIRS)
        + _capitals(_rng(seed, "capitals"))
        + _elements()
        + _opposites()
        + _letters(_rng(seed, "letters"))
    )
    _rng(seed, "order").shuffle(records)
    return records


def train_test_split(
    records: list[dict], test_fraction: float = 0.3, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Split ``records`` stratified by ``kind`` so that no prompt appears in both parts.

    Records sharing a prompt stay together. Within each kind, ``round(test_fraction * prompts)`` prompts (at
    least one, and never all: a kind with a single prompt stays in train) go to test. Both parts keep the input
    order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    prompts_by_kind: dict[str, list[str]] = defaultdict(list)
    for record in records:
        key = _prompt_key(record)
        prompts = prompts_by_kind[record.get("kind", "")]
        if key not in prompts:
            prompts.append(key)
    rng = _rng(seed, "split")
    test_prompts: set[str] = set()
    for kind in sorted(prompts_by_kind):
        prompts = prompts_by_kind[kind]
        if len(prompts) < 2:
            continue
        count = min(len(prompts) - 1, max(1, round(test_fraction * len(prompts))))
        test_prompts.update(rng.sample(prompts, count))
    train = [record for record in records if _prompt_key(record) not in test_prompts]
    test = [record for record in records if _prompt_key(record) in test_prompts]
    return train, test


def write_demo_data(
    directory: str | os.PathLike,
    seed: int = 0,
    *,
    train_pairs: int | None = None,
    test_pairs: int | None = None,
    test_fraction: float = 0.3,
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` of the built-in pairs into ``directory``; returns their paths.

    ``train_pairs``/``test_pairs`` keep that many pairs of each part (all when None), drawn evenly across kinds,
    so a small demo still sees every kind. Files are written to a temporary name and renamed.
    """
    train, test = train_test_split(generate_pairs(seed), test_fraction=test_fraction, seed=seed)
    train = _take_per_kind(train, train_pairs, _rng(seed, "train subset"), "train_pairs")
    test = _take_per_kind(test, test_pairs, _rng(seed, "test subset"), "test_pairs")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / "train.jsonl", directory / "test.jsonl")
    for path, records in zip(paths, (train, test), strict=True):
        write_jsonl(path, records)
    return paths


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """One JSON object per line, written to a temporary name and renamed (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with temporary.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# The kinds


def arithmetic_problems(rng: random.Random) -> Iterator[tuple[int, str, int, int]]:
    """Endless distinct problems ``(a, operator, b, result)``: sums and differences below 100, products of small
    factors. Drawn lazily, so a caller may draw from ``rng`` between two problems."""
    seen: set[tuple[int, str, int]] = set()
    while True:
        operator = rng.choice("+-×")
        if operator == "+":
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            result = a + b
        elif operator == "-":
            a = rng.randint(10, 99)
            b = rng.randint(1, a - 1)
            result = a - b
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            result = a * b
        if (a, operator, b) in seen:
            continue
        seen.add((a, operator, b))
        yield a, operator, b, result


def unit_problems(rng: random.Random, count: int) -> Iterator[tuple[str, str, int, int, int]]:
    """``count`` distinct conversions ``(source unit, target unit, amount, right result, wrong result)``; the wrong
    one uses a factor a hurried answer might."""
    questions = [(conversion, amount) for conversion in UNIT_CONVERSIONS for amount in range(2, 16)]
    for (source, target, factor, wrong_factors), amount in rng.sample(questions, count):
        yield source, target, amount, amount * factor, amount * rng.choice(wrong_factors)


def _arithmetic(rng: random.Random, count: int) -> list[dict]:
    records: list[dict] = []
    for a, operator, b, result in itertools.islice(arithmetic_problems(rng), count):
        wrong = rng.choice(_wrong_results(a, b, operator, result))
        records.append(
            _record(
                "arithmetic",
                f"What is {a} {operator} {b}?",
                f"{a} {operator} {b} = {result}.",
                f"{a} {operator} {b} = {wrong}.",
                str(result),
            )
        )
    return records


def _wrong_results(a: int, b: int, operator: str, result: int) -> list[int]:
    """Plausible slips: off by one or ten, digits swapped, a neighbouring factor (never the right result)."""
    candidates = [result + 1, result - 1, result + 10, result - 10]
    digits = str(result)
    if len(digits) == 2 and digits[0] != digits[1] and digits[1] != "0":
        candidates.append(int(digits[::-1]))
    if operator == "×":
        candidates += [a * (b + 1), a * (b - 1)]
    return sorted({value for value in candidates if value > 0 and value != result})


def _units(rng: random.Random, count: int) -> list[dict]:
    return [
        _record(
            "units",
            f"How many {target} are in {amount} {source}?",
            f"{amount} {source} is {right} {target}.",
            f"{amount} {source} is {wrong} {target}.",
            str(right),
        )
        for source, target, amount, right, wrong in unit_problems(rng, count)
    ]


def _capitals(rng: random.Random) -> list[dict]:
    records = []
    for country, capital, continent, mistaken_city in CAPITALS:
        if mistaken_city is None:
            mistaken_city = rng.choice(
                [other for _, other, where, _ in CAPITALS if where == continent and other != capital]
            )
        records.append(
            _record(
                "capitals",
                f"What is the capital of {country}?",
                f"The capital of {country} is {capital}.",
                f"The capital of {country} is {mistaken_city}.",
                capital,
            )
        )
    return records


def _elements() -> list[dict]:
    records = []
    for name, symbol in ELEMENTS:
        naive = next(
            guess
            for guess in (name[:2].title(), name[0].upper(), (name[0] + name[2]).title())
            if guess != symbol
        )
        records.append(
            _record(
                "elements",
                f"What is the chemical symbol for {name}?",
                f"The chemical symbol for {name} is {symbol}.",
                f"The chemical symbol for {name} is {naive}.",
                symbol,
            )
        )
    return records


def _opposites() -> list[dict]:
    return [
        _record(
            "opposites",
            f'What is the opposite of "{word}"?',
            f'The opposite of "{word}" is "{opposite}".',
            f'The opposite of "{word}" is "{synonym}".',
            opposite,
        )
        for word, opposite, synonym in OPPOSITES
    ]


def _letters(rng: random.Random) -> list[dict]:
    records = []
    for word in WORDS:
        wrong = len(word) + rng.choice((-1, 1))
        records.append(
            _record(
                "letters",
                f'How many letters are in the word "{word}"?',
                f'The word "{word}" has {len(word)} letters.',
                f'The word "{word}" has {wrong} letters.',
                str(len(word)),
            )
        )
    return records


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _record(kind: str, question: str, chosen: str, rejected: str, answer: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "kind": kind,
        "answer": answer,
    }


def _rng(seed: int, purpose: str) -> random.Random:
    # One stream per purpose, so adding pairs of one kind does not reshuffle the others.
    return random.Random(f"mrpo-demo-{purpose}-{seed}")


def _prompt_key(record: dict) -> str:
    return json.dumps(record["prompt"], sort_keys=True, ensure_ascii=False)


def _take_per_kind(records: list[dict], count: int | None, rng: random.Random, label: str) -> list[dict]:
    """``count`` records drawn round-robin over the kinds (each kind in a random order), in input order."""
    if count is None:
        return records
    if not 0 < count <= len(records):
        raise ValueError(f"{label} must be between 1 and {len(records)} (the pairs available), got {count}")
    by_kind: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_kind[record.get("kind", "")].append(index)
    queues = [rng.sample(indices, len(indices)) for _, indices in sorted(by_kind.items())]
    chosen: list[int] = []
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return [records[index] for index in sorted(chosen)]
