"""Write conversations.jsonl, the small conversation file that config/sft_gpt2.py finetunes on:
`python data/chat/generate.py` (the same file every time: the choices come from a fixed seed).

Every answer is computed here or taken from the short tables below, so each one is correct:
arithmetic, comparisons, word tasks (letters, spelling backwards, capitals), capitals of
countries, chemical symbols, units, shapes, days and months, opposites. Some conversations open
with a system prompt, some have two exchanges. The file and this script are part of the project
and under its MIT licence.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1729
COUNT = 240

SYSTEMS = ["You are a helpful assistant.", "Answer in one short sentence.", "You are a patient tutor. Be clear and brief.",
           "You are a friendly assistant who answers questions correctly."]
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
            ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
            ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"),
            ("Australia", "Canberra"), ("Russia", "Moscow"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Ireland", "Dublin"),
            ("the United Kingdom", "London"), ("the Netherlands", "Amsterdam"), ("Austria", "Vienna"), ("Peru", "Lima"),
            ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Turkey", "Ankara"), ("Chile", "Santiago")]
ELEMENTS = [("hydrogen", "H"), ("helium", "He"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"), ("sodium", "Na"),
            ("iron", "Fe"), ("gold", "Au"), ("silver", "Ag"), ("potassium", "K"), ("calcium", "Ca"), ("copper", "Cu")]
SHAPES = [("triangle", 3), ("square", 4), ("pentagon", 5), ("hexagon", 6), ("heptagon", 7), ("octagon", 8)]
UNITS = [("metres", "a kilometre", 1000), ("centimetres", "a metre", 100), ("minutes", "an hour", 60),
         ("seconds", "a minute", 60), ("hours", "a day", 24), ("days", "a week", 7), ("months", "a year", 12),
         ("grams", "a kilogram", 1000), ("millilitres", "a litre", 1000)]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("open", "closed"),
             ("early", "late"), ("full", "empty"), ("up", "down"), ("old", "new"), ("hard", "soft"), ("wet", "dry")]
WORDS = ["apple", "garden", "river", "window", "planet", "music", "pencil", "yellow", "bridge", "forest", "candle",
         "orange", "silver", "rabbit", "winter", "camera", "ladder", "island", "market", "stone", "cloud", "tiger"]


def arithmetic(r):
    a, b = r.randint(2, 99), r.randint(2, 99)
    op = r.choice("+-*")
    if op == "-" and b > a:
        a, b = b, a
    if op == "*":
        a, b = r.randint(2, 12), r.randint(2, 12)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    sign = {"+": "+", "-": "-", "*": "x"}[op]
    q = r.choice(["What is %d %s %d?", "Compute %d %s %d.", "%d %s %d = ?"]) % (a, sign, b)
    return q, "%d %s %d = %d." % (a, sign, b, value)


def compare(r):
    a, b = r.sample(range(1, 200), 2)
    if r.random() < 0.5:
        return "Which is larger, %d or %d?" % (a, b), "%d is larger than %d." % (max(a, b), min(a, b))
    return "Which is smaller, %d or %d?" % (a, b), "%d is smaller than %d." % (min(a, b), max(a, b))


def parity(r):
    n = r.randint(1, 500)
    return "Is %d even or odd?" % n, "%d is %s." % (n, "even" if n % 2 == 0 else "odd")


def letters(r):
    w = r.choice(WORDS)
    return "How many letters are in the word \"%s\"?" % w, "The word \"%s\" has %d letters." % (w, len(w))


def backwards(r):
    w = r.choice(WORDS)
    return "Spell \"%s\" backwards." % w, "\"%s\" backwards is \"%s\"." % (w, w[::-1])


def upper(r):
    w = r.choice(WORDS)
    return "Write \"%s\" in capital letters." % w, w.upper()


def first_letter(r):
    w = r.choice(WORDS)
    return "What is the first letter of \"%s\"?" % w, "The first letter of \"%s\" is \"%s\"." % (w, w[0])


def capital(r):
    country, city = r.choice(CAPITALS)
    q = r.choice(["What is the capital of %s?", "Name the capital city of %s.", "Which city is the capital of %s?"]) % country
    return q, "The capital of %s is %s." % (country, city)


def element(r):
    name, symbol = r.choice(ELEMENTS)
    if r.random() < 0.5:
        return "What is the chemical symbol for %s?" % name, "The chemical symbol for %s is %s." % (name, symbol)
    return "Which element has the symbol %s?" % symbol, "%s is the symbol for %s." % (symbol, name)


def shape(r):
    name, sides = r.choice(SHAPES)
    return "How many sides does a %s have?" % name, "A %s has %d sides." % (name, sides)


def unit(r):
    small, big, k = r.choice(UNITS)
    return "How many %s are in %s?" % (small, big), "There are %d %s in %s." % (k, small, big)


def day_after(r):
    i = r.randrange(7)
    return "What day comes after %s?" % DAYS[i], "%s comes after %s." % (DAYS[(i + 1) % 7], DAYS[i])


def month_after(r):
    i = r.randrange(12)
    return "Which month comes after %s?" % MONTHS[i], "%s comes after %s." % (MONTHS[(i + 1) % 12], MONTHS[i])


def opposite(r):
    a, b = r.choice(OPPOSITES)
    if r.random() < 0.5:
        a, b = b, a
    return "What is the opposite of \"%s\"?" % a, "The opposite of \"%s\" is \"%s\"." % (a, b)


def count_list(r):
    k = r.randint(3, 6)
    items = r.sample(WORDS, k)
    return "How many words are in this list: %s?" % ", ".join(items), "The list has %d words." % k


TASKS = [arithmetic, compare, parity, letters, backwards, upper, first_letter, capital, element, shape, unit, day_after,
         month_after, opposite, count_list]


def conversation(r) -> dict:
    messages = []
    if r.random() < 0.3:
        messages.append({"role": "system", "content": r.choice(SYSTEMS)})
    for _ in range(2 if r.random() < 0.25 else 1):
        q, a = r.choice(TASKS)(r)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def main() -> None:
    r = random.Random(SEED)
    path = os.path.join(HERE, "conversations.jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(COUNT):
            f.write(json.dumps(conversation(r), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print("wrote %d conversations to %s" % (COUNT, path))


if __name__ == "__main__":
    main()
