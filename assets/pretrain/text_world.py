"""The text world: a small world of people, pets, objects and rules, for pretraining ``mini-llama``.

:class:`World` (a pure function of its seed) holds people (age, town, pet, three owned objects),
pets (species, colour), objects (kind, colour, size, material) and the world's general rules
(what each material does, what each kind of object is for, what each species eats, how people
feel after events, the steps of everyday activities). :func:`corpus` renders all of it as plain
sentences for pretraining; every fact appears in a fixed *canonical* sentence (listed in
:data:`CANONICAL`) at least once, plus paraphrases in shuffled order.

:func:`tasks` builds eight multiple-choice tasks in the LLM-Adapters JSON format, shaped like the
eight commonsense sets ``train/commonsense_eval.py`` evaluates (same instruction wording, option
labels and answer formats as ``tests/fixtures/commonsense``)::

    boolq          true/false       a fact about a person, pet or object
    piqa           solution1/2      which of the person's things serves a goal (kind -> purpose)
    social_i_qa    answer1-3        how someone feels after an event (event -> feeling)
    hellaswag      ending1-4        the next step of an activity
    winogrande     option1/2        which of two people is older / lives in a town
    ARC-Easy       answer1-4        which material has a property; what a kind is for
    ARC-Challenge  answer1-4        which person's object has a property (object -> material -> property)
    openbookqa     answer1-4        what to feed a person's pet (person -> pet -> species -> food)

Each question is answerable from the corpus; the split is by the question's entity combination
(hashed), so test questions ask about combinations no training question asked about.

Usage: ``python assets/pretrain/text_world.py --out DIR [--seed 0]`` writes ``DIR/corpus.txt``,
``DIR/<task>/train.json`` and ``test.json`` for the eight tasks, ``DIR/train.json`` (all training
records, shuffled: the ``--data_path`` of ``train/commonsense_dash.py``) and ``DIR/world.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _atomic import save_folder_atomic  # noqa: E402  (torch-free, like this module)

# --------------------------------------------------------------------------- the world's rules

NAMES: dict[str, str] = {  # name -> pronoun
    "Anna": "she", "Ben": "he", "Clara": "she", "David": "he", "Emma": "she", "Felix": "he",
    "Grace": "she", "Henry": "he", "Iris": "she", "Jack": "he", "Kate": "she", "Leo": "he",
    "Mia": "she", "Noah": "he", "Olivia": "she", "Paul": "he", "Rosa": "she", "Sam": "he",
    "Tara": "she", "Victor": "he", "Wendy": "she", "Oscar": "he", "Lily": "she", "Max": "he",
    "Nora": "she", "Theo": "he", "Zoe": "she", "Adam": "he", "Ella": "she", "Hugo": "he",
}
PET_NAMES: tuple[str, ...] = (
    "Rex", "Bella", "Coco", "Daisy", "Pip", "Milo", "Luna", "Bruno", "Toby", "Ruby", "Sunny",
    "Biscuit", "Pepper", "Ziggy", "Noodle", "Maple", "Otto", "Fudge", "Willow", "Jasper",
    "Hazel", "Mochi", "Kiwi", "Buster", "Olive", "Peanut", "Clover", "Bingo", "Button", "Dot",
)
TOWNS: tuple[str, ...] = ("Millbrook", "Stonebridge", "Ashford", "Redwater", "Elmwood", "Fairhaven")
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "black", "white", "brown", "grey")
SIZES: tuple[str, ...] = ("small", "big")

# species -> (plural, food it eats)
SPECIES: dict[str, tuple[str, str]] = {
    "dog": ("dogs", "bones"), "cat": ("cats", "fish"), "rabbit": ("rabbits", "carrots"),
    "horse": ("horses", "hay"), "parrot": ("parrots", "seeds"), "hamster": ("hamsters", "nuts"),
    "goat": ("goats", "grass"), "tortoise": ("tortoises", "lettuce"),
}

MATERIALS: tuple[str, ...] = ("wood", "metal", "glass", "plastic", "wool", "paper", "stone", "rubber")
# property -> (positive phrase, negative phrase, materials that have it). Closed world: the corpus
# states the negative for every other material, so "which one ..." has a determinate answer.
PROPERTIES: dict[str, tuple[str, str, frozenset[str]]] = {
    "floats": ("floats on water", "does not float on water", frozenset({"wood", "plastic", "rubber"})),
    "magnetic": ("is attracted by a magnet", "is not attracted by a magnet", frozenset({"metal"})),
    "breaks": ("breaks when dropped", "does not break when dropped", frozenset({"glass"})),
    "burns": ("burns in a fire", "does not burn in a fire", frozenset({"wood", "paper", "wool"})),
    "bounces": ("bounces", "does not bounce", frozenset({"rubber"})),
    "soft": ("is soft", "is not soft", frozenset({"wool"})),
    "clear": ("lets light through", "does not let light through", frozenset({"glass"})),
    "heavy": ("is very heavy", "is not very heavy", frozenset({"stone"})),
}

# kind -> (purpose, the materials objects of this kind are made of)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cup": ("drink tea", ("glass", "plastic", "stone", "metal")),
    "bucket": ("carry water", ("metal", "plastic", "wood")),
    "knife": ("cut bread", ("metal", "stone")),
    "spoon": ("stir soup", ("wood", "metal", "plastic")),
    "key": ("open a door", ("metal",)),
    "blanket": ("keep warm", ("wool",)),
    "ball": ("play a game", ("rubber", "plastic", "wool")),
    "lamp": ("light a room", ("glass", "metal")),
    "box": ("store things", ("wood", "paper", "metal", "plastic")),
    "chair": ("sit down", ("wood", "metal", "stone", "plastic")),
    "bowl": ("eat porridge", ("wood", "glass", "stone")),
    "notebook": ("write a note", ("paper",)),
}

# event (with {a} the actor, {b} the other person, {x} a thing of b's) -> (who feels, feeling)
EVENTS: dict[str, tuple[str, str]] = {
    "{a} gave {b} a present": ("b", "grateful"),
    "{a} broke {b}'s {x}": ("b", "upset"),
    "{a} won the race against {b}": ("a", "proud"),
    "{a} heard thunder in the night while {b} slept": ("a", "scared"),
    "{a} worked all day with {b}": ("a", "tired"),
    "{a} skipped lunch to help {b}": ("a", "hungry"),
    "{a} threw a surprise party for {b}": ("b", "surprised"),
    "{a} waited for {b} for three hours": ("a", "bored"),
}
FEELINGS: tuple[str, ...] = tuple(sorted({f for _, f in EVENTS.values()}))

# activity -> (title, steps in the third person present)
ACTIVITIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "bake bread": ("Baking bread", ("mixes flour and water", "kneads the dough",
                                    "puts the dough in the oven", "takes out a warm loaf")),
    "plant a tree": ("Planting a tree", ("digs a hole", "puts the young tree in the hole",
                                         "fills the hole with soil", "waters the tree")),
    "wash the dog": ("Washing the dog", ("fills a tub with warm water", "lifts the dog into the tub",
                                         "scrubs the dog with soap", "dries the dog with a towel")),
    "paint a fence": ("Painting a fence", ("sands the old fence", "opens a tin of paint",
                                           "brushes paint onto the boards", "lets the paint dry")),
    "make tea": ("Making tea", ("boils water in a kettle", "puts a tea bag in a cup",
                                "pours the hot water over the tea bag", "adds a little milk")),
    "write a letter": ("Writing a letter", ("takes a sheet of paper", "writes a few kind lines",
                                            "folds the letter into an envelope", "posts the envelope")),
    "fix a bike": ("Fixing a bike", ("turns the bike upside down", "takes off the flat tyre",
                                     "patches the hole in the tube", "pumps the tyre up again")),
    "pack for a trip": ("Packing for a trip", ("takes out a suitcase", "folds some clothes",
                                               "puts the clothes in the suitcase", "closes the suitcase")),
}

TASKS: tuple[str, ...] = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande",
                          "ARC-Challenge", "ARC-Easy", "openbookqa")

# The canonical sentence forms (the corpus holds each fact in this form at least once; the tests
# parse the corpus with exactly these forms to re-derive every answer).
CANONICAL: dict[str, str] = {
    "age": "{p} is {n} years old.",
    "town": "{p} lives in {town}.",
    "pet": "{p} has a {colour} {species} called {pet}.",
    "owns": "{p} owns a {size} {colour} {kind} made of {material}.",
    "diet": "{Species} eat {food}.",
    "material": "{Material} {phrase}.",
    "purpose": "A {kind} is used to {purpose}.",
    "event": "{event}, and {who} felt {feeling}.",
    "activity": "{p} wants to {activity}. First {pron} {s1}. Then {pron} {s2}. Then {pron} {s3}. At last {pron} {s4}.",
}


@dataclass(frozen=True)
class Obj:
    kind: str
    colour: str
    size: str
    material: str


@dataclass(frozen=True)
class Person:
    name: str
    pronoun: str
    age: int
    town: str
    pet: str
    pet_species: str
    pet_colour: str
    objects: tuple[Obj, ...]


def _rng(seed: int, salt: str) -> random.Random:
    # String seeds are hashed with SHA-512 by random.seed: stable across runs and platforms.
    return random.Random(f"text-world:{seed}:{salt}")


def _stable_hash(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


class World:
    """The people, pets and objects of world ``seed`` (the rules are the module's tables)."""

    def __init__(self, seed: int = 0, n_people: int = 24) -> None:
        if not 4 <= n_people <= len(NAMES):
            raise ValueError(f"n_people must be in 4..{len(NAMES)}, got {n_people}")
        self.seed = seed
        rng = _rng(seed, "people")
        names = rng.sample(list(NAMES), n_people)
        pets = rng.sample(PET_NAMES, n_people)
        ages = rng.sample(range(8, 80), n_people)  # distinct ages: "who is older" is always defined
        people = []
        for name, pet, age in zip(names, pets, ages):
            kinds = rng.sample(list(KINDS), 3)
            objects = tuple(
                Obj(k, rng.choice(COLOURS), rng.choice(SIZES), rng.choice(KINDS[k][1])) for k in kinds
            )
            people.append(Person(name, NAMES[name], age, rng.choice(TOWNS), pet,
                                 rng.choice(list(SPECIES)), rng.choice(COLOURS), objects))
        self.people: dict[str, Person] = {p.name: p for p in people}

    def to_dict(self) -> dict[str, Any]:
        """The world's entities as plain JSON-able data."""
        return {"seed": self.seed, "people": [asdict(p) for p in self.people.values()]}


def _possessive(pron: str) -> str:
    return {"she": "her", "he": "his"}[pron]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


# --------------------------------------------------------------------------- corpus


def _event_text(template: str, a: str, b: str, x: str) -> str:
    return template.format(a=a, b=b, x=x)


def _story_cast(world: World, seed: int) -> list[tuple[str, str, str]]:
    """The (event, actor, other) triples told in the corpus: every event with a few pairs."""
    rng = _rng(seed, "stories")
    names = sorted(world.people)
    cast = []
    for event in EVENTS:
        for _ in range(6):
            a, b = rng.sample(names, 2)
            cast.append((event, a, b))
    return cast


def _activity_cast(world: World, seed: int) -> list[tuple[str, str]]:
    rng = _rng(seed, "activities")
    names = sorted(world.people)
    return [(act, name) for act in ACTIVITIES for name in rng.sample(names, 6)]


def canonical_sentences(world: World) -> list[str]:
    """Every fact of ``world`` once, in its :data:`CANONICAL` form (deterministic order)."""
    c = CANONICAL
    out = []
    for p in world.people.values():
        out.append(c["age"].format(p=p.name, n=p.age))
        out.append(c["town"].format(p=p.name, town=p.town))
        out.append(c["pet"].format(p=p.name, colour=p.pet_colour, species=p.pet_species, pet=p.pet))
        for o in p.objects:
            out.append(c["owns"].format(p=p.name, size=o.size, colour=o.colour, kind=o.kind, material=o.material))
    for species, (plural, food) in SPECIES.items():
        out.append(c["diet"].format(Species=_cap(plural), food=food))
    for prop, (pos, neg, mats) in PROPERTIES.items():
        for m in MATERIALS:
            out.append(c["material"].format(Material=_cap(m), phrase=pos if m in mats else neg))
    for kind, (purpose, _) in KINDS.items():
        out.append(c["purpose"].format(kind=kind, purpose=purpose))
    for event, a, b in _story_cast(world, world.seed):
        who, feeling = EVENTS[event]
        x = world.people[b].objects[0].kind
        out.append(c["event"].format(event=_event_text(_cap(event), a, b, x), who=a if who == "a" else b,
                                     feeling=feeling))
    for act, name in _activity_cast(world, world.seed):
        pron = world.people[name].pronoun
        s = ACTIVITIES[act][1]
        out.append(c["activity"].format(p=name, activity=act, pron=pron, s1=s[0], s2=s[1], s3=s[2], s4=s[3]))
    return out


def _paraphrases(world: World) -> list[str]:
    """Other wordings of the same facts, so the model learns facts rather than one string."""
    out = []
    for p in world.people.values():
        pos = _possessive(p.pronoun)
        out.append(f"{p.name}'s home is in {p.town}. {_cap(p.pronoun)} is {p.age}.")
        out.append(f"{p.name} has a pet {p.pet_species}. {_cap(pos)} {p.pet_species} is called {p.pet}.")
        out.append(f"{p.pet} is a {p.pet_colour} {p.pet_species} that belongs to {p.name}.")
        out.append(f"{p.pet} lives in {p.town} with {p.name}.")
        for o in p.objects:
            out.append(f"{p.name}'s {o.kind} is {o.colour} and made of {o.material}. It is {o.size}.")
            out.append(f"{p.name} uses {pos} {o.kind} to {KINDS[o.kind][0]}.")
    for species, (plural, food) in SPECIES.items():
        out.append(f"A {species} likes to eat {food}.")
    for kind, (purpose, mats) in KINDS.items():
        out.append(f"People {purpose} with a {kind}. A {kind} can be made of {' or '.join(mats)}.")
    for event, (who, feeling) in EVENTS.items():
        out.append(f"When {_event_text(event, 'someone', 'a friend', 'thing')}, "
                   f"{'they felt' if who == 'a' else 'the friend felt'} {feeling}.")
    for act, (title, steps) in ACTIVITIES.items():
        out.append(f"{title}: first {steps[0]}, then {steps[1]}, then {steps[2]}, and at last {steps[3]}.")
    return out


def corpus(world: World, copies: int = 4) -> list[str]:
    """Pretraining documents: ``copies`` shuffles of the canonical facts and their paraphrases.

    Each document is a paragraph of a few related sentences; every canonical sentence is in
    every copy, so the facts a task asks about are always in the corpus.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    rng = _rng(world.seed, "corpus")
    sentences = canonical_sentences(world) + _paraphrases(world)
    docs = []
    for _ in range(copies):
        order = sentences[:]
        rng.shuffle(order)
        for i in range(0, len(order), 6):
            docs.append(" ".join(order[i : i + 6]))
    return docs


# --------------------------------------------------------------------------- tasks


def _record(instruction: str, answer: str) -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def _choices(prefix: str, options: list[str], fmt_label: str) -> str:
    body = "".join(f"\n\n{prefix}{i + 1}: {o}" for i, o in enumerate(options))
    labels = "/".join(f"{fmt_label}{i + 1}" for i in range(len(options)))
    return f"{body}\n\nAnswer format: {labels}"


def _place(rng: random.Random, correct: str, distractors: list[str]) -> tuple[list[str], int]:
    """Options with ``correct`` at a random position; returns (options, 1-based position)."""
    opts = distractors[:]
    k = rng.randrange(len(opts) + 1)
    opts.insert(k, correct)
    return opts, k + 1


def _q_boolq(world: World, rng: random.Random) -> list[tuple[tuple, dict]]:
    out = []
    people = list(world.people.values())
    for p in people:
        other_town = rng.choice([t for t in TOWNS if t != p.town])
        facts = [(("town", p.name, p.town), f"does {p.name.lower()} live in {p.town.lower()}?", True),
                 (("town", p.name, other_town), f"does {p.name.lower()} live in {other_town.lower()}?", False)]
        other_species = rng.choice([s for s in SPECIES if s != p.pet_species])
        facts += [(("pet", p.name, p.pet_species), f"is {p.pet.lower()} a {p.pet_species}?", True),
                  (("pet", p.name, other_species), f"is {p.pet.lower()} a {other_species}?", False)]
        for o in p.objects:
            wrong = rng.choice([m for m in MATERIALS if m != o.material])
            facts += [(("mat", p.name, o.kind, o.material),
                       f"is {p.name.lower()}'s {o.kind} made of {o.material}?", True),
                      (("mat", p.name, o.kind, wrong), f"is {p.name.lower()}'s {o.kind} made of {wrong}?", False)]
        q = rng.choice([x for x in people if x is not p])
        facts.append((("older", p.name, q.name), f"is {p.name.lower()} older than {q.name.lower()}?", p.age > q.age))
        for key, question, truth in facts:
            ins = (f"Please answer the following question with true or false, question: {question}"
                   "\n\nAnswer format: true/false")
            out.append((key, _record(ins, "true" if truth else "false")))
    return out


def _q_piqa(world: World, rng: random.Random) -> list[tuple[tuple, dict]]:
    out = []
    for p in world.people.values():
        pos = _possessive(p.pronoun)
        for o in p.objects:
            for wrong in (x for x in p.objects if x.kind != o.kind):  # each of the other two things
                opts, k = _place(rng, f"{_cap(p.pronoun)} uses {pos} {o.kind}.",
                                 [f"{_cap(p.pronoun)} uses {pos} {wrong.kind}."])
                ins = ("Please choose the correct solution to the question: "
                       f"{p.name} wants to {KINDS[o.kind][0]}. What should {p.pronoun} do?"
                       + _choices("Solution", opts, "solution"))
                out.append((("piqa", p.name, o.kind, wrong.kind), _record(ins, f"solution{k}")))
    return out


def _q_social(world: World, rng: random.Random) -> list[tuple[tuple, dict]]:
    out = []
    names = sorted(world.people)
    for event, (who, feeling) in EVENTS.items():
        for a in names:
            b = rng.choice([n for n in names if n != a])
            x = world.people[b].objects[0].kind
            target = a if who == "a" else b
            wrong = rng.sample([f for f in FEELINGS if f != feeling], 2)
            opts, k = _place(rng, feeling, wrong)
            ins = ("Please choose the correct answer to the question: "
                   f"{_cap(_event_text(event, a, b, x))}. How would {target} feel afterwards?"
                   + _choices("Answer", opts, "answer"))
            out.append((("social", event, a, b), _record(ins, f"answer{k}")))
    return out


def _q_hellaswag(world: World, rng: random.Random) -> list[tuple[tuple, dict]]:
    out = []
    for act, (title, steps) in ACTIVITIES.items():
        for p in world.people.values():
            i = rng.randrange(1, 4)  # steps shown: 1..3, ending = the next one
            said = f" {_cap(p.pronoun)} ".join(s + "." for s in steps[:i])
            ctx = f"{title}: {p.name} wants to {act}. {_cap(p.pronoun)} {said} Then {p.pronoun}"
            others = [s for a2, (_, st) in ACTIVITIES.items() if a2 != act for s in st]
            opts, k = _place(rng, steps[i] + ".", [s + "." for s in rng.sample(others, 3)])
            ins = ("Please choose the correct ending to complete the given sentence: " + ctx
                   + _choices("Ending", opts, "ending"))
            out.append((("hella", act, p.name, i), _record(ins, f"ending{k}")))
    return out


def _q_winogrande(world: World, rng: random.Random) -> list[tuple[tuple, dict]]:
    out = []
    names = sorted(world.people)
    for a in names:
        for b in rng.sample([n for n in names if n != a], min(4, len(names) - 1)):
            pa, pb = world.people[a], world.people[b]
            ins = ("Please choose the correct answer to fill in the blank to complete the given sentence: "
                   f"{a} and {b} compared their ages, and _ turned out to be the older one."
                   + _choices("Option", [a, b], "option"))
            out.append((("older", a, b), _record(ins, "option1" if pa.age > pb.age else "option2")))
            if pa.town != pb.town:
                ins = ("Please choose the correct answer to fill in the blank to complete the given sentence: "
                       f"{a} and {b} met in {pa.town}, the town where _ lives."
                       + _choices("Option", [a, b], "option"))
                out.append((("town", a, b), _record(ins, "option1")))
                ins = ("Please choose the correct answer to fill in the blank to complete the given sentence: "
                       f"{b} and {a} met in {pa.town}, the town where _ lives."
                       + _choices("Option", [b, a], "option"))
                out.append((("town", b, a), _record(ins, "option2")))
    return out


def _q_arc_easy(world: World, rng: random.Random) -> list[tuple[tuple, dict]]:
    out = []
    for prop, (pos, _neg, mats) in PROPERTIES.items():
        for m in sorted(mats):
            for rep in range(4):
                wrong = rng.sample([x for x in MATERIALS if x not in mats], 3)
                opts, k = _place(rng, m, wrong)
                ins = (f"Please choose the correct answer to the question: Which material {pos}?"
                       + _choices("Answer", opts, "answer"))
                out.append((("mat", prop, m, *sorted(wrong)), _record(ins, f"answer{k}")))
    for kind, (purpose, _) in KINDS.items():
        for rep in range(4):
            wrong = rng.sample([KINDS[x][0] for x in KINDS if x != kind], 3)
            opts, k = _place(rng, purpose, wrong)
            ins = (f"Please choose the correct answer to the question: What is a {kind} used for? To"
                   + _choices("Answer", opts, "answer"))
            out.append((("purpose", kind, *sorted(wrong)), _record(ins, f"answer{k}")))
    return out


def _q_arc_challenge(world: World, rng: random.Random) -> list[tuple[tuple, dict]]:
    out = []
    items = [(p.name, o) for p in world.people.values() for o in p.objects]
    for prop, (pos, _neg, mats) in PROPERTIES.items():
        yes = [(n, o) for n, o in items if o.material in mats]
        no = [(n, o) for n, o in items if o.material not in mats]
        for n, o in yes:
            for rep in range(2):
                wrong = rng.sample(no, 3)
                opts, k = _place(rng, f"{n}'s {o.kind}", [f"{n2}'s {o2.kind}" for n2, o2 in wrong])
                ins = (f"Please choose the correct answer to the question: Which of these things {pos}?"
                       + _choices("Answer", opts, "answer"))
                out.append((("arcc", prop, n, o.kind), _record(ins, f"answer{k}")))
    return out


def _q_openbookqa(world: World, rng: random.Random) -> list[tuple[tuple, dict]]:
    out = []
    foods = [f for _, f in SPECIES.values()]
    for p in world.people.values():
        food = SPECIES[p.pet_species][1]
        for rep in range(3):
            opts, k = _place(rng, food, rng.sample([f for f in foods if f != food], 3))
            ins = ("Please choose the correct answer to the question: "
                   f"{p.name} wants to feed {_possessive(p.pronoun)} pet. What should {p.pronoun} give it?"
                   + _choices("Answer", opts, "answer"))
            out.append((("feed", p.name, rep), _record(ins, f"answer{k}")))
        for rep in range(2):
            opts, k = _place(rng, food, rng.sample([f for f in foods if f != food], 3))
            ins = (f"Please choose the correct answer to the question: What does {p.pet} eat?"
                   + _choices("Answer", opts, "answer"))
            out.append((("peteat", p.name, rep), _record(ins, f"answer{k}")))
        opts, k = _place(rng, p.town, rng.sample([t for t in TOWNS if t != p.town], 3))
        ins = (f"Please choose the correct answer to the question: In which town does {p.pet} live?"
               + _choices("Answer", opts, "answer"))
        out.append((("pettown", p.name), _record(ins, f"answer{k}")))
    return out


_BUILDERS = {
    "boolq": _q_boolq, "piqa": _q_piqa, "social_i_qa": _q_social, "hellaswag": _q_hellaswag,
    "winogrande": _q_winogrande, "ARC-Challenge": _q_arc_challenge, "ARC-Easy": _q_arc_easy,
    "openbookqa": _q_openbookqa,
}


def _test_key(task: str, key: tuple) -> tuple:
    """The part of a question's key that decides its split: the entity combination asked about."""
    if task == "ARC-Easy":
        return key[:3] if key[0] == "mat" else key[:2]  # (property, material) / (kind): held-out facts
    if task == "openbookqa":
        return key[:2]  # the person, whatever the distractors
    if task == "winogrande":
        return (key[0], *sorted(key[1:]))  # a pair asked in either order stays on one side
    return key


def tasks(world: World, test_fraction: float = 0.2, max_train: int = 600,
          max_test: int = 150) -> dict[str, dict[str, list[dict[str, str]]]]:
    """The eight tasks: ``{task: {"train": [...], "test": [...]}}`` of LLM-Adapters records.

    A question goes to ``test`` when a hash of its entity combination falls in the first
    ``test_fraction``; no instruction text is in both splits. Each split is capped (a
    deterministic sample) at ``max_train`` / ``max_test`` records.
    """
    out: dict[str, dict[str, list[dict[str, str]]]] = {}
    for task in TASKS:
        rng = _rng(world.seed, f"task:{task}")
        split: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
        seen: set[str] = set()
        for key, rec in _BUILDERS[task](world, rng):
            if rec["instruction"] in seen:
                continue
            seen.add(rec["instruction"])
            h = _stable_hash(world.seed, task, *_test_key(task, key)) % 1000
            split["test" if h < test_fraction * 1000 else "train"].append(rec)
        for name, cap in (("train", max_train), ("test", max_test)):
            recs = split[name]
            if len(recs) > cap:
                recs = [recs[i] for i in sorted(rng.sample(range(len(recs)), cap))]
            split[name] = recs
        out[task] = split
    return out


# --------------------------------------------------------------------------- plain questions

_CHOICE_RE = re.compile(r"\n\n[A-Z][a-z]+(\d+): ")


def plain_question(record: dict[str, str], rng: random.Random | None = None) -> str:
    """A record of :func:`tasks` worded as the pretraining corpus asks questions, with its answer.

    The LLM-Adapters lead ("Please choose the correct answer to the question: "), the labelled
    options ("Answer2: fish") and the answer format ("the correct answer is answer2") are left
    out: the corpus says ``Question: ... / Choices: (1) bones (2) fish / Answer: (2) fish`` and
    ``Answer: yes`` / ``no`` for true/false. Fine-tuning on the tasks then has to learn the eight
    formats, as LLM-Adapters' fine-tuning of a pretrained model does. ``rng`` re-shuffles the
    options (the answer's number follows).
    """
    body = record["instruction"].partition(": ")[2]
    stem_and_choices, _, _fmt = body.partition("\n\nAnswer format: ")
    parts = _CHOICE_RE.split(stem_and_choices)
    stem = _cap(parts[0])
    if record["answer"] in ("true", "false"):
        return f"Question: {stem}\nAnswer: {'yes' if record['answer'] == 'true' else 'no'}"
    options = parts[2::2]
    correct = options[int(re.search(r"\d+$", record["answer"]).group()) - 1]
    if rng is not None:
        options = options[:]
        rng.shuffle(options)
    k = options.index(correct) + 1
    listed = " ".join(f"({i + 1}) {o}" for i, o in enumerate(options))
    return f"Question: {stem}\nChoices: {listed}\nAnswer: ({k}) {correct}"


def plain_questions(world: World, n: int, seed: int = 0) -> list[str]:
    """``n`` pretraining documents drawn (with replacement, options re-shuffled) from every
    *training-split* question of the eight tasks, uncapped; no test-split question is used."""
    pool = [r for split in tasks(world, max_train=10**9).values() for r in split["train"]]
    rng = _rng(seed, "plain-questions")
    return [plain_question(rng.choice(pool), rng) for _ in range(n)]


# --------------------------------------------------------------------------- writer


def write_world(out: str | os.PathLike[str], seed: int = 0, n_people: int = 24, copies: int = 4) -> Path:
    """Write the corpus, the eight tasks, the merged training set and the world into ``out``.

    ``out`` must not exist; everything is written into a temporary sibling and renamed at the
    end, so an interrupted run never leaves a partial folder.
    """
    def write(tmp: Path) -> None:
        world = World(seed, n_people)
        (tmp / "corpus.txt").write_text("\n".join(corpus(world, copies)) + "\n", encoding="utf-8")
        all_train = []
        for task, split in tasks(world).items():
            (tmp / task).mkdir()
            for name, recs in split.items():
                (tmp / task / f"{name}.json").write_text(json.dumps(recs, indent=2) + "\n", encoding="utf-8")
            all_train += split["train"]
        _rng(seed, "merge").shuffle(all_train)
        (tmp / "train.json").write_text(json.dumps(all_train, indent=2) + "\n", encoding="utf-8")
        (tmp / "world.json").write_text(json.dumps(world.to_dict(), indent=2) + "\n", encoding="utf-8")

    return save_folder_atomic(out, write)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="Write the text world's corpus and its eight multiple-choice tasks.")
    p.add_argument("--out", required=True, help="new folder to create")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--n_people", type=int, default=24)
    p.add_argument("--copies", type=int, default=4, help="shuffled copies of the facts in the corpus")
    args = p.parse_args(argv)
    out = write_world(args.out, args.seed, args.n_people, args.copies)
    print(f"wrote the text world (seed {args.seed}) to {out}")
    return out


if __name__ == "__main__":
    main()
