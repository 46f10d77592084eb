"""The embedded sample corpus: story-like documents from a seeded stochastic grammar, with exact entropy.

    python data/synthetic.py --out DIR --docs N [--seed S]

writes DIR/synthetic.jsonl: one document a line, {"text": ..., "entropy_bits": ...}, where
entropy_bits = -log2 P(document) under the generator, the end of the document included.

Every random decision is a `pick` among phrases, and at every pick exactly one phrase can match the
text that follows (the grammar is written so; `parse` checks it at every pick and fails loudly if
not). So the text determines its derivation, P(text) is the product of the picks' probabilities,
and `parse(text)` recomputes entropy_bits from the text alone. See data/SYNTHETIC.md.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import os
import random
import re
import sys
import tempfile
from pathlib import Path

END = "<end>"  # the end of a document: a pick option like any other, matched by the end of the text
TOKEN = re.compile(r"[A-Za-z]+|[.,!?\"]")
SENTENCE_END = {".", "!", "?"}


def zipf(n: int, s: float = 1.0) -> list[float]:
    return [1.0 / (rank + 1) ** s for rank in range(n)]


class Lexicon:
    """A large closed class of one-word phrases with fixed weights, sampled and read back in O(log n).

    A pick may exclude some words (a story never reuses a name or a noun); the others keep their
    weights, renormalised, which is what rejection sampling from the full list gives."""

    def __init__(self, words: list[str], weights: list[float]):
        if len(set(words)) != len(words):
            raise ValueError("a lexicon's words must be distinct")
        self.words, self.weights = words, weights
        self.cumulative = list(itertools.accumulate(weights))
        self.total = self.cumulative[-1]
        self.index = {w: i for i, w in enumerate(words)}

    def sample(self, rng: random.Random, exclude: set[str]) -> int:
        while True:
            i = bisect.bisect_right(self.cumulative, rng.random() * self.total)
            if i < len(self.words) and self.words[i] not in exclude:
                return i

    def bits(self, i: int, exclude: set[str]) -> float:
        excluded = sum(self.weights[self.index[w]] for w in exclude)
        return -math.log2(self.weights[i] / (self.total - excluded))


def made_up_names(count: int, seed: int, avoid: set[str]) -> list[str]:
    """Pronounceable names from syllables: fixed by `seed`, so every document draws from the same list."""
    rng = random.Random(seed)
    onsets = "b br c ch d dr f g gr h j k l m n p pr r s sh st t th tr v w z".split()
    vowels = "a e i o u ai ea ie oo ou".split()
    codas = ["", "", "n", "l", "r", "s", "th", "nd", "ck", "m", "x"]
    names, seen = [], set(avoid)
    while len(names) < count:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice((2, 2, 3)))) + rng.choice(codas)
        if word not in seen and 4 <= len(word) <= 10:
            seen.add(word)
            names.append(word.capitalize())
    return names


# ----------------------------------------------------------------------------------------------
# The lexicon. Kinds carry a pronoun and their own verbs, so verbs depend on who acts.
# ----------------------------------------------------------------------------------------------

PEOPLE = {"girl": "she", "boy": "he", "woman": "she", "man": "he", "princess": "she", "prince": "he",
          "farmer": "he", "baker": "she", "teacher": "she", "sailor": "he", "king": "he", "queen": "she",
          "wizard": "he", "knight": "she", "fisherman": "he", "painter": "she", "doctor": "she", "pilot": "he"}
ANIMALS = {"dog": "barked", "cat": "purred", "bird": "sang", "rabbit": "hopped", "fox": "yelped",
           "bear": "growled", "mouse": "squeaked", "horse": "neighed", "duck": "quacked", "frog": "croaked",
           "owl": "hooted", "lion": "roared", "turtle": "yawned", "pig": "oinked", "cow": "mooed",
           "goat": "bleated", "squirrel": "chattered", "wolf": "howled", "dragon": "roared", "bee": "buzzed"}
CHARACTER_ADJECTIVES = ("little old young brave kind shy happy clever tiny big gentle funny curious lazy "
                        "grumpy quiet wise silly proud friendly").split()
OBJECTS = ("ball kite book hat box cake apple boat key lamp map ring shoe cup drum flute basket blanket bell "
           "bottle brush candle chair clock coin comb crown doll egg feather flower glove horn jar kettle "
           "ladder leaf letter mirror necklace net pan pebble pencil pillow plate puzzle ribbon rope scarf "
           "seed shell shovel sock spoon star stick stone sword teapot ticket toy train trumpet umbrella vase "
           "wagon wheel whistle cookie pie sandwich carrot banana lemon pear melon bucket broom hammer "
           "compass lantern mitten orange pumpkin quilt radio rocket saddle sled tent violin wand").split()
OBJECT_ADJECTIVES = ("red blue green yellow purple pink white black brown golden silver shiny old new big "
                     "small soft heavy broken wooden magic striped dusty tiny bright").split()
PLACES = ("forest park garden beach river lake hill village castle farm school market cave meadow kitchen "
          "library harbor mountain field bridge bakery pond island tower barn valley station zoo").split()
FEELINGS = "happy sad scared excited tired angry surprised proud hungry sleepy worried calm".split()
PERSON_ACTIONS = ("laughed", "smiled", "cried", "waved", "danced", "shouted", "whispered", "sighed", "nodded",
                  "jumped", "sat down", "clapped", "sang a song", "told a joke")
OBJECT_VERBS = ("found", "lost", "picked up", "carried", "painted", "hid", "dropped", "cleaned", "fixed", "opened",
                "wanted", "held", "counted", "hugged", "shook")
GIVE_VERBS = ("gave", "showed", "brought", "threw", "sent")
MOVE_VERBS = ("went", "walked", "ran", "hurried", "wandered", "raced")
ANIMAL_ACTIONS = ("jumped", "slept", "ate", "played", "rolled over", "sniffed the air")
ADVERBS = ("quickly", "slowly", "happily", "quietly", "carefully", "loudly", "sadly", "gently")
ACTIVITIES = ("play", "read", "sing", "swim", "dance", "sleep", "eat", "climb")
OPENERS = ("Later", "Then", "Suddenly", "After that", "The next day", "That night", "Soon", "At last")
WEATHER = ("The sun was bright.", "Rain started to fall.", "The wind was cold.", "The sky was full of stars.",
           "A storm came over the hill.", "Snow fell all day.", "The birds were singing.",
           "Everything was quiet.")
# The opening tells the length class (the chance a story ends after each sentence), so it is visible.
LENGTH_OPENINGS = (("Once upon a time,", 0.03), ("One day,", 0.06), ("Long ago,", 0.12))

NAMES = made_up_names(1500, seed=20240520, avoid=set())
TOWNS = made_up_names(400, seed=7, avoid={n.lower() for n in NAMES})
NAME_LEXICON = Lexicon(NAMES, zipf(len(NAMES), 0.9))
TOWN_LEXICON = Lexicon(TOWNS, zipf(len(TOWNS), 1.0))
OBJECT_LEXICON = Lexicon(OBJECTS, zipf(len(OBJECTS), 0.8))
ADJECTIVE_WEIGHTS = zipf(len(OBJECT_ADJECTIVES), 0.7)
PLACE_WEIGHTS = zipf(len(PLACES), 0.8)
FEELING_WEIGHTS = zipf(len(FEELINGS), 0.5)


# ----------------------------------------------------------------------------------------------
# Sources of decisions: one samples them, the other reads them back from a text
# ----------------------------------------------------------------------------------------------

class Sampler:
    def __init__(self, rng: random.Random):
        self.rng, self.tokens, self.bits = rng, [], 0.0

    def pick(self, options: list[str], weights: list[float]) -> int:
        i = self.rng.choices(range(len(options)), weights=weights)[0]
        self.bits -= math.log2(weights[i] / sum(weights))
        self.say(options[i])
        return i

    def pick_word(self, lexicon: Lexicon, exclude: set[str]) -> str:
        i = lexicon.sample(self.rng, exclude)
        self.bits += lexicon.bits(i, exclude)
        self.tokens.append(lexicon.words[i])
        return lexicon.words[i]

    def say(self, phrase: str):
        if phrase != END:
            self.tokens += TOKEN.findall(phrase)


class Reader:
    """Replays the grammar against a text: at each pick the one option that matches the text wins."""

    def __init__(self, text: str):
        self.tokens, self.pos, self.bits = TOKEN.findall(text), 0, 0.0

    def matches(self, phrase: str) -> bool:
        if phrase == END:
            return self.pos == len(self.tokens)
        want = TOKEN.findall(phrase)
        got = self.tokens[self.pos:self.pos + len(want)]
        return len(got) == len(want) and all(
            g == w or (g == w.capitalize() and self.at_sentence_start(self.pos + k)) for k, (g, w) in enumerate(zip(got, want)))

    def at_sentence_start(self, pos: int) -> bool:
        return pos == 0 or self.tokens[pos - 1] in SENTENCE_END or (
            self.tokens[pos - 1] == '"' and self.tokens[:pos].count('"') % 2 == 1)

    def pick(self, options: list[str], weights: list[float]) -> int:
        found = [i for i, o in enumerate(options) if self.matches(o)]
        if len(found) != 1:
            raise ValueError(f"at token {self.pos}: {len(found)} options match {self.tokens[self.pos:self.pos + 4]}")
        i = found[0]
        self.bits -= math.log2(weights[i] / sum(weights))
        self.say(options[i])
        return i

    def pick_word(self, lexicon: Lexicon, exclude: set[str]) -> str:
        word = self.tokens[self.pos] if self.pos < len(self.tokens) else None
        if word not in lexicon.index or word in exclude:
            raise ValueError(f"at token {self.pos}: {word!r} is not an allowed word here")
        self.bits += lexicon.bits(lexicon.index[word], exclude)
        self.pos += 1
        return word

    def say(self, phrase: str):
        if phrase == END:
            return
        if not self.matches(phrase):
            raise ValueError(f"at token {self.pos}: expected {phrase!r}, found {self.tokens[self.pos:self.pos + 4]}")
        self.pos += len(TOKEN.findall(phrase))


def render(tokens: list[str]) -> str:
    """Tokens to text: sentence-initial capitals, no space before punctuation or inside quotes."""
    out, open_quote = [], False
    for i, tok in enumerate(tokens):
        prev = tokens[i - 1] if i else None
        starts = prev is None or prev in SENTENCE_END or (prev == '"' and open_quote)
        word = tok[0].upper() + tok[1:] if starts else tok
        if tok == '"':
            open_quote = not open_quote
            glue = not open_quote  # a closing quote sticks to what it closes
        else:
            glue = tok in {".", ",", "!", "?"} or (prev == '"' and open_quote)
        out.append(word if (not out or glue) else " " + word)
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# The grammar
# ----------------------------------------------------------------------------------------------

class Story:
    """One document. Its state (cast, objects, focus) is a function of the picks so far, so a Reader
    replaying the picks meets the same options with the same weights as the Sampler did."""

    def __init__(self, src):
        self.src = src
        self.cast: list[dict] = []
        self.objects: list[dict] = []
        self.focus: dict | None = None

    def pick(self, options, weights) -> int:
        return self.src.pick(list(options), list(weights))

    def tell(self):
        openings = [phrase for phrase, _ in LENGTH_OPENINGS]
        end_rate = LENGTH_OPENINGS[self.pick(openings, [1.0] * len(openings))][1]
        self.src.say("there was")
        self.focus = self.new_character()
        self.src.say(".")
        while self.sentence(end_rate):
            pass

    # characters and objects -------------------------------------------------------------------

    def new_character(self) -> dict:
        """'a brave fox named Brox': kinds and names are never repeated within a story."""
        self.pick([("an " if a[0] in "aeiou" else "a ") + a for a in CHARACTER_ADJECTIVES],
                  zipf(len(CHARACTER_ADJECTIVES)))
        kinds = [k for k in list(PEOPLE) + list(ANIMALS) if k not in {c["kind"] for c in self.cast}]
        kind = kinds[self.pick(kinds, [3.0 if k in PEOPLE else 2.0 for k in kinds])]
        self.src.say("named")
        name = self.src.pick_word(NAME_LEXICON, {c["name"] for c in self.cast})
        character = {"kind": kind, "name": name, "pronoun": PEOPLE.get(kind, "it")}
        self.cast.append(character)
        return character

    def new_object(self):
        """'a red ball': nouns are never repeated within a story, so 'the ball' is unambiguous."""
        adjective = OBJECT_ADJECTIVES[self.pick([("an " if a[0] in "aeiou" else "a ") + a for a in OBJECT_ADJECTIVES],
                                                ADJECTIVE_WEIGHTS)]
        noun = self.src.pick_word(OBJECT_LEXICON, {o["noun"] for o in self.objects})
        self.objects.append({"noun": noun, "adjective": adjective})

    def character_options(self, exclude: dict | None = None) -> list[tuple[str, float, dict]]:
        """Ways to name a cast member: its name, 'the <kind>', or its pronoun while it is in focus."""
        out = []
        for c in self.cast:
            if c is exclude:
                continue
            boost = 2.0 if c is self.focus else 1.0
            out += [(c["name"], 3.0 * boost, c), ("the " + c["kind"], 2.0 * boost, c)]
            if c is self.focus and exclude is None:
                out.append((c["pronoun"], 12.0, c))
        return out

    def refer_character(self, exclude: dict | None = None) -> dict:
        options = self.character_options(exclude)
        return options[self.pick([o[0] for o in options], [o[1] for o in options])][2]

    def refer_object(self):
        phrases = [p for o in self.objects for p in ("the " + o["noun"], "the " + o["adjective"] + " " + o["noun"])]
        self.pick(phrases, [3.0, 1.0] * len(self.objects))

    # clauses ----------------------------------------------------------------------------------

    def predicate(self, actor: dict, depth: int):
        """What the actor does; verbs depend on its kind, objects and places come from the story."""
        animal = actor["kind"] in ANIMALS
        options = [(ANIMALS[actor["kind"]], 3.0, None)] if animal else []
        options += [(v, 1.0, None) for v in (ANIMAL_ACTIONS if animal else PERSON_ACTIONS)]
        if self.objects:
            options += [(v, 0.3 if animal else 1.5, "object") for v in OBJECT_VERBS]
        if self.objects and len(self.cast) > 1 and not animal:
            options += [(v, 1.0, "give") for v in GIVE_VERBS]
        options += [(v + " to the", 1.0, "place") for v in MOVE_VERBS]
        options += [("was very", 2.0, "feeling"), ("felt", 1.0, "feeling")]
        role = options[self.pick([o[0] for o in options], [o[1] for o in options])][2]
        if role == "object":
            self.refer_object()
        elif role == "give":
            self.refer_object()
            self.src.say("to")
            self.refer_character(exclude=actor)
        elif role == "place":
            self.pick(PLACES, PLACE_WEIGHTS)
        elif role == "feeling":
            self.pick(FEELINGS, FEELING_WEIGHTS)
        self.tail(depth)

    def tail(self, depth: int):
        """The sentence ends, ends after an adverb, or nests a clause (rarer the deeper it is)."""
        nest = 0.35 / (1 + 2 * depth)
        options = [".", "because", "when", "and then"] + [a + "." for a in ADVERBS]
        weights = [1.0 - nest - 0.2, nest * 0.5, nest * 0.3, nest * 0.2] + [0.2 / len(ADVERBS)] * len(ADVERBS)
        if options[self.pick(options, weights)] in ("because", "when", "and then"):
            self.predicate(self.refer_character(), depth + 1)

    # sentences --------------------------------------------------------------------------------

    def sentence(self, end_rate: float) -> bool:
        """One sentence, chosen by its first words; False when the story ends instead."""
        starts: list[tuple[str, float, object]] = [(s, 0.6 / len(WEATHER), "fixed") for s in WEATHER]
        starts.append(('"', 2.0 if self.objects else 1.0, "dialogue"))
        starts.append(("then along came", 1.0 if len(self.cast) < 4 else 0.0, "meet"))
        starts.append(("there was also", 1.0 if len(self.objects) < 5 else 0.0, "find"))
        starts.append(("they went to the town of", 0.3, "town"))
        starts += [(o + ",", 1.8 / len(OPENERS), "opener") for o in OPENERS]
        subjects = self.character_options()
        total = sum(w for _, w, _ in subjects)
        starts += [(phrase, 4.2 * w / total, who) for phrase, w, who in subjects]
        starts = [s for s in starts if s[1] > 0]
        others = sum(w for _, w, _ in starts)
        starts.append((END, others * end_rate / (1 - end_rate), "end"))
        what = starts[self.pick([s[0] for s in starts], [s[1] for s in starts])][2]
        if what == "end":
            return False
        if what == "opener":
            what = self.refer_character()
        if isinstance(what, dict):
            self.predicate(what, 0)
            self.focus = what
        elif what == "dialogue":
            self.dialogue()
        elif what == "meet":
            self.focus = self.new_character()
            self.src.say(".")
        elif what == "find":
            self.new_object()
            self.src.say(".")
        elif what == "town":
            self.src.pick_word(TOWN_LEXICON, set())
            self.src.say(".")
        return True

    def dialogue(self):
        """'"Look at the kite," said Lily.' or '"Where is the kite?" asked the dog.'"""
        has = 1.0 if self.objects else 0.0
        lines = [("I want to", 1.5, "activity"), ("let us go to the", 1.5, "place"), ("I like the", 2.0 * has, "noun"),
                 ("where is the", 1.0 * has, "noun"), ("look at the", 1.0 * has, "noun")]
        lines = [line for line in lines if line[1] > 0]
        chosen = self.pick([line[0] for line in lines], [line[1] for line in lines])
        phrase, _, slot = lines[chosen]
        if slot == "activity":
            self.pick(ACTIVITIES, [1.0] * len(ACTIVITIES))
        elif slot == "place":
            self.pick(PLACES, PLACE_WEIGHTS)
        else:
            self.pick([o["noun"] for o in self.objects], [1.0] * len(self.objects))
        question = phrase == "where is the"
        self.src.say('?" asked' if question else '," said')
        self.focus = self.refer_character()
        self.src.say(".")


def generate_one(rng: random.Random) -> tuple[str, float]:
    src = Sampler(rng)
    Story(src).tell()
    return render(src.tokens), src.bits


def generate(num_docs: int, seed: int):
    """Yields (text, entropy_bits). Document i depends only on (seed, i), not on num_docs."""
    for i in range(num_docs):
        yield generate_one(random.Random(f"{seed}:{i}"))


def parse(text: str) -> float:
    """-log2 P(text), recomputed from the text alone; raises ValueError if the grammar cannot produce it."""
    src = Reader(text)
    Story(src).tell()
    if src.pos != len(src.tokens):
        raise ValueError(f"text continues after the end of the story at token {src.pos}")
    return src.bits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the embedded synthetic corpus as jsonl.")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--docs", required=True, type=int)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    if args.docs <= 0:
        print(f"error: --docs={args.docs}: must be at least 1", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.out, prefix=".synthetic.jsonl.")
    except OSError as e:
        print(f"error: --out={args.out}: cannot write there ({e.strerror})", file=sys.stderr)
        return 2
    total_bytes, total_bits = 0, 0.0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for text, bits in generate(args.docs, args.seed):
                f.write(json.dumps({"text": text, "entropy_bits": bits}) + "\n")
                total_bytes += len(text.encode("utf-8"))
                total_bits += bits
        os.chmod(tmp, 0o644)  # mkstemp makes files private; the corpus is not
        os.replace(tmp, args.out / "synthetic.jsonl")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"synthetic: docs:{args.docs} bytes:{total_bytes} bits:{total_bits:.0f} "
          f"bits_per_byte:{total_bits / total_bytes:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
