"""Small tasks constructed from templates, for tests, the demo and benchmarks (no datasets offline)."""

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
