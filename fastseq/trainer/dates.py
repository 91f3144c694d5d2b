"""A generated sequence-to-sequence task: dates written many ways -> ISO dates.

    "3 March 1987", "March 3, 1987", "03/04/1987 (day first)", "1987-3-3", "Tue 3 Mar 1987",
    "the 3rd of March, 1987", "TUESDAY, MARCH 3, 1987", "3.3.1987", "19870303", ...  ->  "1987-03-03"

Dates are uniform between 1900-01-01 and 2099-12-31; each example picks a format and a case
(as written, lower or upper).  A fixed share of the days is held out: the held-out examples are
written from those days only and the training examples never see them, so held-out exact match
measures whether the model learnt to read dates rather than to remember them.  The same seed
always gives the same two sets.
"""
from __future__ import annotations

import datetime
import random
from typing import Callable, List, Tuple

FIRST_DAY = datetime.date(1900, 1, 1)
LAST_DAY = datetime.date(2099, 12, 31)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def ordinal(n: int) -> str:
    """1 -> "1st", 2 -> "2nd", 3 -> "3rd", 11 -> "11th", 22 -> "22nd"."""
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _month(d): return MONTHS[d.month - 1]
def _mon(d): return MONTHS[d.month - 1][:3]
def _weekday(d): return WEEKDAYS[d.weekday()]
def _wkd(d): return WEEKDAYS[d.weekday()][:3]


# name -> how it writes a date; the example in each name is 3 March 1987 (a Tuesday).
FORMATS: Tuple[Tuple[str, Callable[[datetime.date], str]], ...] = (
    ("3 March 1987", lambda d: f"{d.day} {_month(d)} {d.year}"),
    ("March 3, 1987", lambda d: f"{_month(d)} {d.day}, {d.year}"),
    ("03/03/1987 (day first)", lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (day first)"),
    ("03/03/1987 (month first)", lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (month first)"),
    ("1987-3-3", lambda d: f"{d.year}-{d.month}-{d.day}"),
    ("Tue 3 Mar 1987", lambda d: f"{_wkd(d)} {d.day} {_mon(d)} {d.year}"),
    ("3rd of March 1987", lambda d: f"{ordinal(d.day)} of {_month(d)} {d.year}"),
    ("the 3rd of March, 1987", lambda d: f"the {ordinal(d.day)} of {_month(d)}, {d.year}"),
    ("March 3rd, 1987", lambda d: f"{_month(d)} {ordinal(d.day)}, {d.year}"),
    ("Tuesday, March 3, 1987", lambda d: f"{_weekday(d)}, {_month(d)} {d.day}, {d.year}"),
    ("Mar 3 1987", lambda d: f"{_mon(d)} {d.day} {d.year}"),
    ("03 Mar 1987", lambda d: f"{d.day:02d} {_mon(d)} {d.year}"),
    ("3.3.1987", lambda d: f"{d.day}.{d.month}.{d.year}"),
    ("1987/03/03", lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}"),
    ("19870303", lambda d: f"{d.year}{d.month:02d}{d.day:02d}"),
)
CASES = ("as written", "lower", "upper")


def write_date(d: datetime.date, fmt: int, case: int) -> str:
    """``d`` in format ``FORMATS[fmt]`` and case ``CASES[case]``."""
    s = FORMATS[fmt][1](d)
    return s if case == 0 else s.lower() if case == 1 else s.upper()


def iso(d: datetime.date) -> str:
    return d.isoformat()                                                  # "1987-03-03"


def _examples(days: List[datetime.date], n: int, rng: random.Random) -> List[Tuple[str, str]]:
    out = []
    for _ in range(n):
        d = rng.choice(days)
        case = rng.choices(range(len(CASES)), weights=(3, 1, 1))[0]
        out.append((write_date(d, rng.randrange(len(FORMATS)), case), iso(d)))
    return out


def make_dates(train_size: int = 40000, heldout_size: int = 2000, seed: int = 0,
               heldout_days: float = 0.05) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """(train, held_out): lists of (written date, ISO date) pairs.

    ``heldout_days`` of the 73,049 days are reserved for the held-out set; the training set is
    written from the other days only (checked), so the two share no date and no source string.
    """
    for name, v in (("train_size", train_size), ("heldout_size", heldout_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"make_dates: {name} must be a positive int, got {v!r}")
    if not 0.0 < heldout_days < 1.0:
        raise ValueError(f"make_dates: heldout_days must be in (0, 1), got {heldout_days!r}")
    rng = random.Random(seed)
    n_days = (LAST_DAY - FIRST_DAY).days + 1
    order = list(range(n_days))
    rng.shuffle(order)
    n_held = max(1, int(n_days * heldout_days))
    held_days = [FIRST_DAY + datetime.timedelta(days=i) for i in sorted(order[:n_held])]
    train_days = [FIRST_DAY + datetime.timedelta(days=i) for i in sorted(order[n_held:])]
    train = _examples(train_days, train_size, rng)
    held = _examples(held_days, heldout_size, rng)
    overlap = {t for _, t in train} & {t for _, t in held}
    if overlap:                                                           # cannot happen; checked anyway
        raise AssertionError(f"make_dates: {len(overlap)} dates in both sets")
    return train, held
