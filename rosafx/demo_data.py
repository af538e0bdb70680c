"""The demo's task: short movie-review sentences with sentiment labels, made here, so the
demo needs no download. Negation ("was not good") flips the label, so the task needs more
than a bag of words. ``read_glue_tsv`` reads a GLUE-style TSV instead (``--data``)."""
from __future__ import annotations

import csv
import random
from pathlib import Path

from .errors import RosafxError

POSITIVE = ["great", "wonderful", "delightful", "brilliant", "charming", "moving", "funny", "superb",
            "beautiful", "gripping", "clever", "touching", "excellent", "enjoyable", "fresh", "lovely"]
NEGATIVE = ["dull", "awful", "boring", "terrible", "clumsy", "tedious", "bland", "painful", "messy",
            "forgettable", "weak", "lifeless", "annoying", "predictable", "silly", "tiresome"]
SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the script", "the ending", "the cast",
            "the soundtrack", "the story", "the direction", "the dialogue", "every scene"]
INTENSIFIERS = ["", "really ", "truly ", "quite ", "very ", "so ", "rather "]
FRAMES = ["{s} was {i}{a}.", "i thought {s} was {i}{a}.", "honestly, {s} is {i}{a}.", "{s} felt {i}{a} to me."]
NEGATED = ["{s} was not {a}.", "i did not think {s} was {a}.", "{s} is never {a}.", "{s} was hardly {a}."]


def make_sentiment_task(n: int = 2400, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        negate = rng.random() < 0.3
        adjective = rng.choice(POSITIVE if positive != negate else NEGATIVE)
        frame = rng.choice(NEGATED if negate else FRAMES)
        text = frame.format(s=rng.choice(SUBJECTS), i=rng.choice(INTENSIFIERS), a=adjective)
        rows.append((text, int(positive)))
    return rows


def read_glue_tsv(path) -> list[tuple[str, int]]:
    """SST-2 style (header with `sentence` and `label`) or CoLA style (no header: source,
    label, mark, sentence)."""
    path = Path(path)
    if not path.exists():
        raise RosafxError(f"--data {path} does not exist.")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise RosafxError(f"{path} is empty.")
    header = [h.strip().lower() for h in rows[0]]
    if "sentence" in header and "label" in header:
        s, l = header.index("sentence"), header.index("label")
        body = rows[1:]
    elif len(rows[0]) == 4:
        s, l, body = 3, 1, rows
    else:
        raise RosafxError(f"{path}: expected a GLUE TSV with 'sentence' and 'label' columns (SST-2) or CoLA's "
                          "four columns.")
    try:
        return [(r[s], int(r[l])) for r in body if len(r) > max(s, l)]
    except ValueError as exc:
        raise RosafxError(f"{path}: labels must be integers ({exc}).") from exc


def split(rows: list, validation_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * (1 - validation_fraction))
    return rows[:cut], rows[cut:]
