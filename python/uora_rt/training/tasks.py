"""Small tasks constructed from templates, for tests, the demo and benchmarks (no datasets
offline)."""

from __future__ import annotations

import random

TOPICS = {
    "sport": (["the striker", "our goalkeeper", "the coach", "the tennis player", "the team",
               "the sprinter", "the referee", "the captain"],
              ["scored in the final minute", "won the championship", "trained before the match",
               "missed the penalty", "broke the world record", "lost the semifinal",
               "signed a new contract with the club", "celebrated the victory"]),
    "cooking": (["the chef", "my grandmother", "the baker", "our cook", "the pastry student",
                 "the restaurant", "my neighbour", "the food critic"],
                ["baked fresh bread this morning", "added garlic to the sauce",
                 "simmered the soup for hours", "burned the onions", "whisked the eggs",
                 "tasted the new recipe", "roasted vegetables in the oven", "seasoned the stew"]),
    "weather": (["the forecast", "the storm", "the morning", "the wind", "the sky over the city",
                 "the northern region", "the weekend", "the coast"],
                ["brought heavy rain", "turned cold and cloudy", "was sunny and warm",
                 "will see snow tonight", "had strong gusts", "cleared after the thunder",
                 "stayed humid all day", "promised a heatwave"]),
}
LABELS = sorted(TOPICS)


def topic_sentences(n: int, seed: int) -> tuple[list[str], list[int]]:
    """n (sentence, topic label) pairs; different seeds give mostly different sentences."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(len(LABELS))
        subjects, predicates = TOPICS[LABELS[label]]
        texts.append(f"{rng.choice(subjects)} {rng.choice(predicates)}.")
        labels.append(label)
    return texts, labels


# --- Chat styles for the serving demo: one small SFT set per adapter -------------------------

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"),
            ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
            ("Portugal", "Lisbon"), ("Poland", "Warsaw")]
COLORS = [("the sky", "blue", "bleu"), ("grass", "green", "vert"), ("snow", "white", "blanc"),
          ("coal", "black", "noir"), ("a banana", "yellow", "jaune"), ("a tomato", "red", "rouge"),
          ("an orange", "orange", "orange"), ("a plum", "purple", "violet")]
STYLES = {
    "pirate": (lambda c, cap: f"Arr, matey! The capital of {c} be {cap}, arr!",
               lambda thing, color, _: f"Arr! {thing[0].upper() + thing[1:]} be {color}, matey!"),
    "french": (lambda c, cap: f"La capitale de {c} est {cap}.",
               lambda thing, color, fr: f"La couleur est {fr}."),
    "json": (lambda c, cap: '{"question": "capital", "country": "%s", "answer": "%s"}' % (c, cap),
             lambda thing, color, _: '{"question": "color", "thing": "%s", "answer": "%s"}'
             % (thing, color)),
}
HELD_OUT_CAPITALS, HELD_OUT_COLORS = 3, 2  # the last ones are never trained on


def style_pairs(style: str) -> list[tuple[str, str]]:
    """(prompt, response) training pairs of one style, held-out facts excluded."""
    capital, color = STYLES[style]
    pairs = [(f"What is the capital of {c}?", capital(c, cap))
             for c, cap in CAPITALS[:-HELD_OUT_CAPITALS]]
    pairs += [(f"What color is {t}?", color(t, en, fr)) for t, en, fr in COLORS[:-HELD_OUT_COLORS]]
    return pairs


def demo_requests() -> list[tuple[str, str | None]]:
    """(prompt, adapter) pairs of the demo's one mixed batch: held-out facts and an unseen kind
    of question for every adapter, and the base model on the same prompts."""
    c1, c2 = CAPITALS[-1][0], CAPITALS[-2][0]
    t1 = COLORS[-1][0]
    return [(f"What is the capital of {c1}?", "pirate"), ("Name a large animal.", "pirate"),
            (f"What is the capital of {c2}?", "french"), (f"What color is {t1}?", "french"),
            (f"What color is {t1}?", "json"), (f"What is the capital of {c1}?", "json"),
            (f"What is the capital of {c1}?", None), ("Name a large animal.", None)]
