"""The demo dataset, generated in code so an installed package needs no data file.

`demo_path()` returns `demo.txt` (``user item timestamp`` lines), generating it on first use
under ``$SEQREC_CACHE_DIR`` (default ``~/.cache/seqrec``) and reusing it afterwards;
``--dataset demo`` resolves to it from any working directory. `data/make_demo.py` is a
thin script over `generate`, and the checkout's `data/demo.txt` is its output.

Why synthetic: a demo and the tests need data that ships with the package, is small
(< 2 MB), and on which the models have something to learn that a popularity ranking
cannot, so a broken model shows up as "no better than popularity" within a minute of
CPU training.

Generative process (all draws from numpy's Generator(PCG64(seed)), so the file is a
pure function of the seed and the user count):

* Items (600) belong to 20 topics of 30 items. Each topic's items form 4
  *chains* -- ordered series such as seasons of a show -- of 6 to 9 items.
  Topics, and chains within a topic, have Zipf-like popularity, and an item's
  popularity decays along its chain (people start series more often than they
  finish them). Item ids are shuffled so that ids carry no structure.
* Each user has 2 or 3 favourite topics (drawn by topic popularity) with
  Dirichlet preference weights, and a personal session length of 3 to 10.
* A user's history is a series of sessions. A session usually (80%) switches
  to another favourite topic and opens either where the user left that topic's
  chain (resume) or at the head of one of its chains. Inside a session, the next
  item is the chain successor of the previous one (80%), else a random item of
  the session's topic (15%), else a globally popular item (5%).
  -> order matters: a sequential model can predict chain successors, which
     popularity cannot.
* Timestamps (unix seconds from 2020-01-01): minutes between items of a
  session, 8 hours to days between sessions, and sessions mostly keep the
  user's own length. Session breaks, and so the imminent change of chain and
  topic, are visible only in the time intervals.
  -> a time-aware model (TiSASRec) has something to exploit over SASRec.
* History lengths are 20 + Gamma(2, 15), capped at 120 (mean about 50).

NumPy promises stable bit streams but not stable Generator methods across releases: under
another NumPy than `NUMPY_VERSION` the output may differ from the published demo data
(`SHA256`), and `demo_path()` warns when it generates the file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 0
USERS = 1000
NUMPY_VERSION = "2.4.6"  # the NumPy that wrote the published demo data
SHA256 = "af66c05087cb9f7648ebff365cc3065099687e167bff7913082868e93a4a22d0"  # of generate(SEED, USERS)
FORMAT = 1  # bump when the generator's output changes on purpose (and update SHA256)

NUM_TOPICS = 20
CHAIN_LENGTHS = (6, 7, 8, 9)  # per topic, so 30 items a topic
START_TIME = 1577836800  # 2020-01-01T00:00:00Z
P_SWITCH_TOPIC = 0.8
P_RESUME = 0.5
P_SUCCESSOR = 0.8
P_TOPIC_ITEM = 0.15  # the rest (5%) is a globally popular item
P_USUAL_SESSION = 0.8  # a session has the user's own length, else any of 3..10


@dataclass(frozen=True)
class Catalogue:
    """Items with their topic, chain successor and popularity."""

    topic_items: list[np.ndarray]  # item ids of each topic
    topic_weights: list[np.ndarray]  # popularity of those items within the topic
    chain_heads: list[np.ndarray]  # first item of each chain, per topic
    head_weights: list[np.ndarray]
    successor: dict[int, int]  # item -> next item of its chain (absent at a chain's end)
    topic_of: dict[int, int]
    topic_popularity: np.ndarray
    global_weights: np.ndarray  # over item ids 1..num_items, index 0 unused


def zipf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Normalised Zipf weights in a random order, so rank and position are unrelated."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return rng.permutation(weights / weights.sum())


def make_catalogue(rng: np.random.Generator) -> Catalogue:
    per_topic = sum(CHAIN_LENGTHS)
    ids = rng.permutation(NUM_TOPICS * per_topic) + 1
    topic_popularity = zipf(NUM_TOPICS, 0.7, rng)
    global_weights = np.zeros(len(ids) + 1)
    topic_items, topic_weights, chain_heads, head_weights = [], [], [], []
    successor: dict[int, int] = {}
    topic_of: dict[int, int] = {}
    for topic in range(NUM_TOPICS):
        items = ids[topic * per_topic : (topic + 1) * per_topic]
        chain_popularity = zipf(len(CHAIN_LENGTHS), 1.0, rng)
        bounds = np.cumsum((0,) + tuple(rng.permutation(CHAIN_LENGTHS)))
        weights = np.empty(per_topic)
        for chain, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            weights[lo:hi] = chain_popularity[chain] * 0.85 ** np.arange(hi - lo)
            successor.update(zip(items[lo : hi - 1].tolist(), items[lo + 1 : hi].tolist()))
        weights /= weights.sum()
        topic_of.update(dict.fromkeys(items.tolist(), topic))
        global_weights[items] = topic_popularity[topic] * weights
        topic_items.append(items)
        topic_weights.append(weights)
        chain_heads.append(items[bounds[:-1]])
        head_weights.append(chain_popularity)
    return Catalogue(
        topic_items, topic_weights, chain_heads, head_weights, successor, topic_of, topic_popularity,
        global_weights,
    )


def pick(rng: np.random.Generator, items: np.ndarray, weights: np.ndarray) -> int:
    return int(items[rng.choice(len(items), p=weights)])


class User:
    """One user's tastes and chain positions while their history is generated."""

    def __init__(self, cat: Catalogue, rng: np.random.Generator) -> None:
        self.cat, self.rng = cat, rng
        self.topics = rng.choice(NUM_TOPICS, size=rng.integers(2, 4), replace=False, p=cat.topic_popularity)
        self.preference = rng.dirichlet(np.ones(len(self.topics)))
        self.session_length = int(rng.integers(3, 11))
        self.topic = -1  # no session yet
        self.resume: dict[int, int] = {}  # topic -> next item of the chain last followed there

    def next_session_length(self) -> int:
        if self.rng.random() < P_USUAL_SESSION:
            return self.session_length
        return int(self.rng.integers(3, 11))

    def open_session(self) -> int:
        """Pick the session's topic and its first item: a resumed chain or a chain head."""
        switch = self.rng.random() < P_SWITCH_TOPIC
        weights = self.preference * (self.topics != self.topic) if switch else self.preference
        self.topic = int(self.rng.choice(self.topics, p=weights / weights.sum()))
        if self.topic in self.resume and self.rng.random() < P_RESUME:
            return self.resume[self.topic]
        return pick(self.rng, self.cat.chain_heads[self.topic], self.cat.head_weights[self.topic])

    def continue_session(self, previous: int) -> int:
        draw = self.rng.random()
        if draw < P_SUCCESSOR and previous in self.cat.successor:
            return self.cat.successor[previous]
        if draw < P_SUCCESSOR + P_TOPIC_ITEM:
            return pick(self.rng, self.cat.topic_items[self.topic], self.cat.topic_weights[self.topic])
        weights = self.cat.global_weights
        return int(self.rng.choice(len(weights), p=weights))

    def remember(self, item: int) -> None:
        """Chain progress in a topic is what a later session there resumes from."""
        if self.cat.topic_of[item] != self.topic:
            return
        if item in self.cat.successor:
            self.resume[self.topic] = self.cat.successor[item]
        else:
            self.resume.pop(self.topic, None)  # finished that chain


def user_history(user: User) -> tuple[list[int], list[int]]:
    rng = user.rng
    length = min(20 + int(rng.gamma(2.0, 15.0)), 120)
    items: list[int] = []
    times: list[int] = []
    clock = START_TIME + int(rng.integers(0, 30 * 86400))
    while len(items) < length:
        if items:
            clock += 8 * 3600 + int(rng.exponential(2 * 86400))
        item = user.open_session()
        for step in range(min(user.next_session_length(), length - len(items))):
            if step:
                clock += 60 + int(rng.exponential(240))
                item = user.continue_session(item)
            user.remember(item)
            items.append(item)
            times.append(clock)
    return items, times


def generate(seed: int, num_users: int) -> str:
    """The dataset as text: one `user item timestamp` line per interaction, users in order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    cat = make_catalogue(rng)
    lines = []
    for user_id in range(1, num_users + 1):
        items, times = user_history(User(cat, rng))
        lines.extend(f"{user_id} {item} {time}\n" for item, time in zip(items, times))
    return "".join(lines)


def cache_dir() -> Path:
    """Where generated data is kept: $SEQREC_CACHE_DIR, default ~/.cache/seqrec (as the mHC kernels)."""
    return Path(os.environ.get("SEQREC_CACHE_DIR", Path.home() / ".cache" / "seqrec"))


def write(path: Path, text: str) -> None:
    """Write to a temporary name, then rename, so concurrent writers (ranks) never read a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".demo-", suffix=".tmp", delete=False) as tmp:
        tmp.write(text.encode())  # bytes: the same file on every platform
    try:
        os.replace(tmp.name, path)
    finally:
        Path(tmp.name).unlink(missing_ok=True)


def demo_path(seed: int = SEED, users: int = USERS) -> Path:
    """The demo data file, generated on first use and cached (an unwritable cache falls back
    to the temporary directory). It is named demo.txt, so default run directories are runs/demo."""
    name = Path(f"demo-v{FORMAT}-seed{seed}-users{users}") / "demo.txt"
    user = os.getuid() if hasattr(os, "getuid") else "user"
    bases = [cache_dir(), Path(tempfile.gettempdir()) / f"seqrec-{user}"]
    for base in bases:
        if (base / name).exists():
            return base / name
    text = generate(seed, users)
    if (seed, users) == (SEED, USERS) and hashlib.sha256(text.encode()).hexdigest() != SHA256:
        warnings.warn(f"NumPy {np.__version__} generates demo data that differs from the published one "
                      f"(written with NumPy {NUMPY_VERSION}), so demo metrics will not match the docs",
                      RuntimeWarning, stacklevel=2)
    for base in bases:
        try:
            write(base / name, text)
        except OSError:
            continue
        return base / name
    raise OSError(f"cannot write the demo data under {bases[0]} or {bases[1]}")
