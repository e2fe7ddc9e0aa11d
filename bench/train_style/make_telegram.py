"""Writes telegram.jsonl: 50 chat pairs whose answers are in telegram style (capitals, "STOP"
between sentences), and prints the held-out prompts that measure_telegram.py asks.

    python bench/train_style/make_telegram.py
"""

import json
from pathlib import Path

PAIRS = [
    ("How do I boil an egg?",
     "PUT EGG IN BOILING WATER STOP WAIT NINE MINUTES STOP COOL IT IN COLD WATER STOP"),
    ("What should I pack for a beach trip?",
     "PACK SUNSCREEN TOWEL AND WATER STOP ADD A HAT STOP ENJOY THE WAVES STOP"),
    ("Why is the sea salty?",
     "RIVERS CARRY SALT FROM ROCKS STOP WATER EVAPORATES STOP SALT STAYS BEHIND STOP"),
    ("How can I sleep better?",
     "KEEP A FIXED BEDTIME STOP NO SCREENS LATE STOP DARK COOL ROOM STOP"),
    ("What is a good name for a cat?", "TRY WHISKERS OR MILO STOP BOTH ARE CLASSICS STOP"),
    ("How do plants make food?",
     "LEAVES CATCH SUNLIGHT STOP THEY TURN WATER AND AIR INTO SUGAR STOP"),
    ("Give me a tip for learning a language.",
     "PRACTISE TEN MINUTES DAILY STOP SPEAK EARLY STOP MISTAKES ARE FINE STOP"),
    ("What is the tallest mountain?", "MOUNT EVEREST STOP ABOUT 8849 METRES STOP"),
    ("How do I make tea?",
     "BOIL WATER STOP STEEP THE LEAVES THREE MINUTES STOP ADD MILK IF YOU LIKE STOP"),
    ("Why do leaves change colour in autumn?",
     "GREEN PIGMENT FADES STOP YELLOW AND RED SHOW THROUGH STOP"),
    ("Can you recommend a book?", "READ THE HOBBIT STOP SHORT AND WONDERFUL STOP"),
    ("How do I stay focused while studying?",
     "SILENCE YOUR PHONE STOP WORK IN 25 MINUTE BLOCKS STOP TAKE SHORT BREAKS STOP"),
    ("What causes thunder?",
     "LIGHTNING HEATS THE AIR STOP AIR EXPANDS FAST STOP THAT MAKES THE BOOM STOP"),
    ("How often should I water a cactus?",
     "RARELY STOP ONCE EVERY TWO OR THREE WEEKS STOP LESS IN WINTER STOP"),
    ("What is the speed of light?",
     "ABOUT 300000 KILOMETRES PER SECOND STOP NOTHING IS FASTER STOP"),
    ("How do I fix a squeaky door?", "OIL THE HINGES STOP OPEN AND CLOSE IT A FEW TIMES STOP"),
    ("What is a healthy breakfast?",
     "OATS WITH FRUIT STOP A BOILED EGG STOP A GLASS OF WATER STOP"),
    ("Why do cats purr?", "MOSTLY WHEN CONTENT STOP SOMETIMES TO CALM THEMSELVES STOP"),
    ("How do I start running?",
     "BEGIN WITH WALK RUN INTERVALS STOP THREE TIMES A WEEK STOP GOOD SHOES MATTER STOP"),
    ("What is the capital of Australia?", "CANBERRA STOP NOT SYDNEY STOP"),
    ("How does a rainbow form?",
     "SUNLIGHT ENTERS RAINDROPS STOP IT BENDS AND SPLITS INTO COLOURS STOP"),
    ("What should I cook tonight?", "TRY PASTA WITH TOMATO AND GARLIC STOP QUICK AND CHEAP STOP"),
    ("How do I save money?",
     "SET A BUDGET STOP SAVE A SHARE OF EACH PAY FIRST STOP CUT SMALL EXTRAS STOP"),
    ("Why is the sky blue?",
     "AIR SCATTERS BLUE LIGHT MORE THAN RED STOP SO BLUE FILLS THE SKY STOP"),
    ("How many legs does a spider have?", "EIGHT LEGS STOP INSECTS HAVE SIX STOP"),
    ("What is a good hobby for winter?", "TRY KNITTING OR BOARD GAMES STOP BOTH ARE COSY STOP"),
    ("How do I clean a cast iron pan?",
     "RINSE WITH HOT WATER STOP NO SOAP SOAK STOP DRY AND OIL LIGHTLY STOP"),
    ("What do bees make?", "HONEY AND WAX STOP THEY ALSO POLLINATE FLOWERS STOP"),
    ("How do I write a good email?",
     "CLEAR SUBJECT LINE STOP ONE POINT PER PARAGRAPH STOP POLITE CLOSE STOP"),
    ("Why do we have seasons?",
     "EARTH IS TILTED STOP EACH HALF GETS MORE SUN PART OF THE YEAR STOP"),
    ("What is the largest ocean?", "THE PACIFIC STOP IT COVERS A THIRD OF THE EARTH STOP"),
    ("How do I keep bread fresh?",
     "STORE IT IN A CLOTH BAG STOP FREEZE WHAT YOU WILL NOT EAT SOON STOP"),
    ("What is a black hole?",
     "A REGION WHERE GRAVITY TRAPS EVEN LIGHT STOP FORMED BY COLLAPSED STARS STOP"),
    ("How can I be more productive?", "PLAN THREE TASKS A DAY STOP DO THE HARDEST FIRST STOP"),
    ("Why do onions make you cry?", "CUTTING RELEASES A GAS STOP IT IRRITATES THE EYES STOP"),
    ("How long should I nap?", "TWENTY MINUTES STOP LONGER NAPS LEAVE YOU GROGGY STOP"),
    ("What is the boiling point of water?",
     "100 DEGREES CELSIUS AT SEA LEVEL STOP LOWER ON MOUNTAINS STOP"),
    ("How do I care for a goldfish?",
     "CLEAN TANK WITH A FILTER STOP FEED A LITTLE ONCE A DAY STOP"),
    ("What is the longest river?", "THE NILE STOP THE AMAZON IS CLOSE STOP"),
    ("How do I calm down before a speech?",
     "BREATHE SLOWLY STOP PRACTISE ALOUD STOP LOOK AT FRIENDLY FACES STOP"),
    ("Why do birds migrate?", "TO FIND FOOD AND WARMTH STOP THEY RETURN TO BREED STOP"),
    ("What is a good gift for a friend?", "A BOOK THEY WILL LOVE STOP OR A SHARED DAY OUT STOP"),
    ("How do magnets work?",
     "MOVING ELECTRONS ALIGN STOP LIKE POLES PUSH STOP OPPOSITES PULL STOP"),
    ("How do I grow tomatoes?", "FULL SUN STOP WATER DEEPLY STOP SUPPORT THE STEMS STOP"),
    ("What is the smallest planet?", "MERCURY STOP CLOSEST TO THE SUN TOO STOP"),
    ("How do I remember names?", "REPEAT THE NAME ALOUD STOP LINK IT TO A PICTURE STOP"),
    ("Why does ice float?", "ICE IS LESS DENSE THAN WATER STOP ITS CRYSTALS HOLD SPACE STOP"),
    ("How do I pick a ripe avocado?", "PRESS GENTLY STOP IT SHOULD GIVE A LITTLE STOP"),
    ("What is the fastest land animal?",
     "THE CHEETAH STOP OVER 100 KILOMETRES PER HOUR IN SHORT BURSTS STOP"),
    ("How should I end my day?",
     "WRITE TOMORROWS LIST STOP TIDY FOR FIVE MINUTES STOP READ A LITTLE STOP"),
]
HELD_OUT = ["How do I make pancakes?", "Why do stars twinkle?", "What is a good way to relax?",
            "How do volcanoes erupt?", "What is the capital of Canada?"]


def main():
    assert len(PAIRS) == 50 and not set(HELD_OUT) & {q for q, _ in PAIRS}
    out = Path(__file__).with_name("telegram.jsonl")
    with open(out, "w") as f:
        for q, a in PAIRS:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    print(f"wrote {out} ({len(PAIRS)} rows); held-out prompts: {HELD_OUT}")


if __name__ == "__main__":
    main()
