"""Write the synthetic part of the tokenizer corpus: arithmetic, QA and short chat lines.

Deterministic (fixed seed), so rerunning it reproduces `synthetic.txt` byte for byte.
Run: python scripts/corpus/make_synthetic.py
"""

from __future__ import annotations

import random
from pathlib import Path

OUT = Path(__file__).with_name("synthetic.txt")

NAMES = ["Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Luis",
         "Mina", "Noah", "Olga", "Pavel", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wen", "Yusuf"]
THINGS = ["apples", "pencils", "marbles", "books", "stamps", "cookies", "shells", "coins", "cards",
          "stickers", "eggs", "buttons", "oranges", "tickets", "flowers", "candles"]
PLACES = ["the market", "school", "the park", "the library", "the station", "the garden", "the bakery",
          "the museum", "the harbour", "the farm"]
FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which animal is known for its long neck?", "The giraffe is known for its long neck."),
    ("How many months have thirty days?", "Four months have thirty days: April, June, September and November."),
    ("What do bees make?", "Bees make honey and wax."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote the words in a book?", "The author wrote them."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("What is a noun?", "A noun is a word that names a person, place, thing or idea."),
    ("What is a prime number?", "A prime number has exactly two divisors: one and itself."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
]
SYSTEMS = ["You are a helpful assistant.", "You are a careful math tutor. Answer with the number only.",
           "You are a concise assistant.", "Answer the question in one sentence."]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen", "twenty"]


def arithmetic(rng: random.Random) -> str:
    op = rng.choice("+-*/")
    a, b = rng.randint(0, 999), rng.randint(1, 99)
    if op == "+":
        return f"Q: What is {a} + {b}? A: {a + b}"
    if op == "-":
        return f"Q: What is {a} - {b}? A: {a - b}"
    if op == "*":
        a = rng.randint(0, 99)
        return f"Q: What is {a} * {b}? A: {a * b}"
    return f"Q: What is {a * b} / {b}? A: {a}"


def word_problem(rng: random.Random) -> str:
    n, t, p = rng.choice(NAMES), rng.choice(THINGS), rng.choice(PLACES)
    a, b = rng.randint(2, 60), rng.randint(1, 40)
    if rng.random() < 0.5:
        return (f"{n} had {a} {t} and bought {b} more at {p}. How many {t} does {n} have now? "
                f"{n} has {a} + {b} = {a + b} {t}. The answer is {a + b}.")
    a = a + b
    return (f"{n} had {a} {t} and gave {b} to a friend at {p}. How many {t} are left? "
            f"{a} - {b} = {a - b}, so {a - b} {t} are left. The answer is {a - b}.")


def chat(rng: random.Random) -> str:
    if rng.random() < 0.5:
        q, a = rng.choice(FACTS)
    else:
        x, y = rng.randint(0, 50), rng.randint(0, 50)
        q, a = f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."
    system = rng.choice(SYSTEMS)
    return f"system\n{system}\nuser\n{q}\nassistant\n{a}"


def counting(rng: random.Random) -> str:
    i = rng.randint(0, 18)
    return f"After {WORDS[i]} comes {WORDS[i + 1]}, and after {WORDS[i + 1]} comes {WORDS[i + 2]}."


def code_line(rng: random.Random) -> str:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    name = rng.choice(["total", "count", "value", "result", "score", "index"])
    return f"def add_{name}(x, y):\n    return x + y\n\nprint(add_{name}({a}, {b}))  # {a + b}"


def main() -> None:
    rng = random.Random(20240611)
    makers = [arithmetic] * 4 + [word_problem] * 3 + [chat] * 2 + [counting, code_line]
    blocks = [rng.choice(makers)(rng) for _ in range(1200)]
    OUT.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
