"""Facts asked in five wordings, for a study whose test set can tell what preference training did.

Each *fact* has a right and a wrong answer (a plausible slip: a famous non-capital city, a naive element symbol, a
synonym for an antonym, a count off by one, a wrong conversion factor, an arithmetic slip) and five wordings of the
same question and answer (three for the students and their tests, two more for the teachers of round three). Training uses wording 0; the *reworded* test asks the same facts in wordings 1 and 2 with
the same right and wrong answers, so whatever training taught about a fact -- including a wrong answer from a
flipped label -- shows up there. The *disjoint* test asks other facts in wording 0, as the first study did.

The fact tables are the demo's (``mrpo.demo.pairs``); only the wordings are added here.

    facts = all_facts()                        # about 290 facts, deterministic
    pool, disjoint = split_facts(facts)        # by fact, stratified by kind
    record = facts[0].pair(wording=1)          # a conversational pair in the demo's format
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mrpo.demo.pairs import CAPITALS, ELEMENTS, OPPOSITES, WORDS, arithmetic_problems, unit_problems

WORDINGS = 3
"""Wordings 0..2: training (0) and the reworded test (1, 2)."""
TEACHER_WORDINGS = (3, 4)
"""Wordings no student trains on and no test asks: the teachers of round three (``teacher_study.py``) learn from them."""

Template = tuple[str, Callable[[str], str]]
"""A question and the answer sentence built around an answer (the right or the wrong one)."""


@dataclass(frozen=True)
class Fact:
    kind: str
    key: str
    """Unique across facts, e.g. ``capitals:France``."""
    right: str
    wrong: str
    templates: tuple[Template, ...]

    def pair(self, wording: int, *, flipped: bool = False) -> dict:
        """The fact as a conversational pair; ``flipped`` swaps chosen and rejected (a wrong label)."""
        question, answer = self.templates[wording]
        chosen, rejected = answer(self.right), answer(self.wrong)
        if flipped:
            chosen, rejected = rejected, chosen
        return {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "kind": self.kind,
            "fact": self.key,
            "wording": wording,
            "flipped": flipped,
        }


def _capitals(rng: random.Random) -> list[Fact]:
    facts = []
    for country, capital, continent, mistaken in CAPITALS:
        if mistaken is None:
            mistaken = rng.choice([c for _, c, where, _ in CAPITALS if where == continent and c != capital])
        facts.append(
            Fact(
                "capitals",
                f"capitals:{country}",
                capital,
                mistaken,
                (
                    (
                        f"What is the capital of {country}?",
                        lambda x, c=country: f"The capital of {c} is {x}.",
                    ),
                    (
                        f"Which city is the capital of {country}?",
                        lambda x, c=country: f"{x} is the capital of {c}.",
                    ),
                    (
                        f"Name the capital city of {country}.",
                        lambda x, c=country: f"The capital city of {c} is called {x}.",
                    ),
                    (
                        f"Where does the government of {country} sit?",
                        lambda x, c=country: f"The government of {c} sits in {x}.",
                    ),
                    (
                        f"{country}'s capital: which city is it?",
                        lambda x, c=country: f"It is {x}, the capital of {c}.",
                    ),
                ),
            )
        )
    return facts


def _elements() -> list[Fact]:
    facts = []
    for name, symbol in ELEMENTS:
        naive = next(
            g for g in (name[:2].title(), name[0].upper(), (name[0] + name[2]).title()) if g != symbol
        )
        facts.append(
            Fact(
                "elements",
                f"elements:{name}",
                symbol,
                naive,
                (
                    (
                        f"What is the chemical symbol for {name}?",
                        lambda x, n=name: f"The chemical symbol for {n} is {x}.",
                    ),
                    (
                        f"Which symbol stands for {name} on the periodic table?",
                        lambda x, n=name: f"On the periodic table, {n} is written {x}.",
                    ),
                    (
                        f"How is the element {name} abbreviated?",
                        lambda x, n=name: f"The element {n} is abbreviated as {x}.",
                    ),
                    (
                        f"Write the element symbol of {name}.",
                        lambda x, n=name: f"{x} is the element symbol of {n}.",
                    ),
                    (
                        f"Chemists write {name} as which symbol?",
                        lambda x, n=name: f"Chemists write {n} as {x}.",
                    ),
                ),
            )
        )
    return facts


def _opposites() -> list[Fact]:
    return [
        Fact(
            "opposites",
            f"opposites:{word}",
            opposite,
            synonym,
            (
                (f'What is the opposite of "{word}"?', lambda x, w=word: f'The opposite of "{w}" is "{x}".'),
                (
                    f'Give an antonym of the word "{word}".',
                    lambda x, w=word: f'An antonym of "{w}" is "{x}".',
                ),
                (
                    f'Which word means the reverse of "{word}"?',
                    lambda x, w=word: f'"{x}" means the reverse of "{w}".',
                ),
                (
                    f'What word is contrary to "{word}"?',
                    lambda x, w=word: f'The word contrary to "{w}" is "{x}".',
                ),
                (
                    f'"{word}" is the opposite of which word?',
                    lambda x, w=word: f'"{w}" is the opposite of "{x}".',
                ),
            ),
        )
        for word, opposite, synonym in OPPOSITES
    ]


def _letters(rng: random.Random) -> list[Fact]:
    facts = []
    for word in WORDS:
        wrong = len(word) + rng.choice((-1, 1))
        facts.append(
            Fact(
                "letters",
                f"letters:{word}",
                str(len(word)),
                str(wrong),
                (
                    (
                        f'How many letters are in the word "{word}"?',
                        lambda x, w=word: f'The word "{w}" has {x} letters.',
                    ),
                    (
                        f'Count the letters in "{word}".',
                        lambda x, w=word: f'"{w}" is spelled with {x} letters.',
                    ),
                    (
                        f'What is the length of the word "{word}" in letters?',
                        lambda x, w=word: f'The length of "{w}" is {x} letters.',
                    ),
                    (
                        f'Spell out "{word}": how many letters does that take?',
                        lambda x, w=word: f'Spelling "{w}" takes {x} letters.',
                    ),
                    (
                        f'Give the letter count of "{word}".',
                        lambda x, w=word: f'The letter count of "{w}" is {x}.',
                    ),
                ),
            )
        )
    return facts


def _units(rng: random.Random, count: int) -> list[Fact]:
    return [
        Fact(
            "units",
            f"units:{amount} {source}->{target}",
            str(right),
            str(wrong),
            (
                (
                    f"How many {target} are in {amount} {source}?",
                    lambda x, a=amount, s=source, t=target: f"{a} {s} is {x} {t}.",
                ),
                (
                    f"Convert {amount} {source} to {target}.",
                    lambda x, a=amount, s=source, t=target: f"{a} {s} equals {x} {t}.",
                ),
                (
                    f"{amount} {source} make how many {target}?",
                    lambda x, a=amount, s=source, t=target: f"In {t}, {a} {s} make {x}.",
                ),
                (
                    f"Express {amount} {source} in {target}.",
                    lambda x, a=amount, s=source, t=target: f"Expressed in {t}, {a} {s} is {x}.",
                ),
                (
                    f"If I have {amount} {source}, how many {target} is that?",
                    lambda x, a=amount, s=source, t=target: f"That is {x} {t}.",
                ),
            ),
        )
        for source, target, amount, right, wrong in unit_problems(rng, count)
    ]


def _arithmetic(rng: random.Random, count: int) -> list[Fact]:
    facts: list[Fact] = []
    for a, operator, b, result in itertools.islice(arithmetic_problems(rng), count):
        expression = f"{a} {operator} {b}"
        wrong = rng.choice(sorted({result + 1, result - 1, result + 10, result - 10} - {result, 0}))
        facts.append(
            Fact(
                "arithmetic",
                f"arithmetic:{expression}",
                str(result),
                str(wrong),
                (
                    (f"What is {expression}?", lambda x, e=expression: f"{e} = {x}."),
                    (f"Compute {expression}.", lambda x, e=expression: f"The result of {e} is {x}."),
                    (f"Calculate {expression} for me.", lambda x, e=expression: f"{e} equals {x}."),
                    (f"Work out {expression}.", lambda x, e=expression: f"Working it out, {e} gives {x}."),
                    (f"{expression} is what number?", lambda x, e=expression: f"{e} is the number {x}."),
                ),
            )
        )
    return facts


def all_facts(seed: int = 0, units: int = 60, arithmetic: int = 60) -> list[Fact]:
    """Every fact, in a fixed order (the seed only picks distractors, unit questions and sums)."""
    rng = random.Random(f"reworded-facts-{seed}")
    return (
        _capitals(rng)
        + _elements()
        + _opposites()
        + _letters(rng)
        + _units(rng, units)
        + _arithmetic(rng, arithmetic)
    )


def split_facts(
    facts: Sequence[Fact], disjoint_fraction: float = 1 / 3, seed: int = 0
) -> tuple[list[Fact], list[Fact]]:
    """(train pool, disjoint test facts), stratified by kind; no fact is in both."""
    by_kind: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        by_kind[fact.kind].append(fact)
    rng = random.Random(f"reworded-split-{seed}")
    pool, disjoint = [], []
    for kind in sorted(by_kind):
        members = list(by_kind[kind])
        rng.shuffle(members)
        cut = round(disjoint_fraction * len(members))
        disjoint += members[:cut]
        pool += members[cut:]
    return pool, disjoint


def sample_stratified(facts: Sequence[Fact], count: int, rng: random.Random) -> list[Fact]:
    """``count`` facts drawn round-robin over the kinds (each kind in a random order)."""
    if not 0 < count <= len(facts):
        raise ValueError(f"count must be between 1 and {len(facts)}, got {count}")
    by_kind: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        by_kind[fact.kind].append(fact)
    queues = [rng.sample(members, len(members)) for _, members in sorted(by_kind.items())]
    chosen: list[Fact] = []
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    return chosen
