"""Tasks for RL with verifiable rewards: a prompt source with train / held-out splits and a verifier.

A `Task` holds `examples(split)` -> the `Example`s of "train" or "heldout" (chat messages ending in a
user turn, and the reference answer) and `verify(prompt, completion, reference)` -> a reward in [0, 1]
(prompt is the example's messages, completion the model's reply text). Built-in tasks (`TASKS`):

- ``idioms-pinyin``: "“X”的拼音是什么？"; reward = syllables right in their place over the longer of
  the reply and the pinyin (`qinglm.data.idioms_sft.syllable_accuracy`), so only the exact pinyin gets 1.
  Held-out = SFT's held-out idioms (the ones its pinyin evaluation asks), never trained on.
- ``arithmetic``: Chinese word problems (+ - × ÷ on whole numbers) generated from a seed; reward 1 when
  the last number of the reply is the answer. Train problems come from seeds 0, 1, 2, ...; held-out ones
  from seeds HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + 1, ...; a problem is held out when a hash of its
  text says so (HELD_OUT_PERCENT %), and each split keeps only its own kind, so no held-out question
  is ever a training question, whichever seeds produced it.

- ``tools``: tools-sft's chats (a system turn with the tool list, a question; qinglm.data.tools_sft) played
  as multi-turn episodes that call the built-in tools (`Task.multi_turn`); reward 1 when the final answer
  equals the reference's, spaces aside. Held-out = tools-sft's held-out split.

Here, below the stages and the evaluation suite, so that GRPO trains on these tasks and the suite's
chat tasks (qinglm.evals.chat) score their held-out splits with the same verifiers. Your own task
for GRPO: see qinglm.post.tasks.load_task.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qinglm.data.sources import normalize_text
from qinglm.errors import QingLMError

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Example:
    """One prompt: chat messages that end in a user turn, and the answer the verifier checks against."""

    messages: list[dict[str, str]]
    reference: str


Verifier = Callable[[Sequence[Mapping[str, str]], str, str], float]


@dataclass(frozen=True)
class Task:
    """A prompt source with train and held-out splits, and a verifier; see the module doc."""

    name: str
    examples: Callable[[str], Sequence[Example]]  # split ("train" | "heldout") -> examples
    verify: Verifier  # (prompt messages, completion, reference) -> reward in [0, 1]
    pass_reward: float = 1.0  # a completion passes (held-out pass rate) when its reward reaches this
    multi_turn: bool = False  # episodes with tools (qinglm.infer.episodes): completion = the final answer

    def split(self, split: str) -> list[Example]:
        """Return the examples of split, checked; QingLMError when the task gives none or bad ones, or its
        examples function raises."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        out = list(_call(self, "examples function", self.examples, split))
        if not out:
            raise QingLMError(f"task {self.name} has no {split} examples; give it some")
        for ex in out:
            if not isinstance(ex, Example):
                raise QingLMError(
                    f"task {self.name}: {split} examples must be Example objects, got {ex!r:.60}"
                )
        return out

    def reward(self, ex: Example, completion: str) -> float:
        """Return the verifier's reward of completion; QingLMError when the verifier raises or returns
        anything but a real number in [0, 1]: an int, a float, a bool (True is 1: `return answer == ref`
        is a verifier), a NumPy scalar or a 0-d array or tensor; NaN never."""
        r = _call(self, "verifier", self.verify, ex.messages, completion, ex.reference)
        if getattr(r, "shape", None) == () and hasattr(r, "item"):  # a NumPy scalar, a 0-d array or tensor
            r = r.item()
        if not isinstance(r, numbers.Real) or not 0.0 <= r <= 1.0:  # NaN fails too
            raise QingLMError(
                f"task {self.name}'s verifier {_name(self.verify)} returned {r!r:.40}; "
                "it must return a number in [0, 1]"
            )
        return float(r)


def _name(fn: Callable) -> str:
    """Return module.qualname of a function, for messages."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _call(task: Task, role: str, fn: Callable, *args: object) -> Any:
    """Return fn(*args); a task's function is the user's code, so what it raises becomes a QingLMError
    naming the function and the error (a QingLMError of its own passes unchanged)."""
    try:
        return fn(*args)
    except QingLMError:
        raise
    except Exception as e:
        raise QingLMError(
            f"task {task.name}'s {role} {_name(fn)} raised {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        ) from None


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16)


# ---------------------------------------------------------------------------- idioms-pinyin


@functools.cache
def _pinyin_examples(split: str) -> tuple[Example, ...]:
    from qinglm.data.idioms_sft import idioms, is_held_out, question

    held = split == "heldout"
    return tuple(
        Example(_user(question("pinyin", i.word)), i.pinyin)
        for i in idioms()
        if i.pinyin and is_held_out(i.word) == held
    )


def _pinyin_reward(prompt: Sequence[Mapping[str, str]], completion: str, reference: str) -> float:
    from qinglm.data.idioms_sft import syllable_accuracy

    # Extra syllables count against the reply, so only the exact pinyin earns 1 (SFT's exact match).
    got, n_want = normalize_text(completion), len(reference.split())
    return syllable_accuracy(got, reference) * n_want / max(n_want, len(got.split()))


def idioms_pinyin() -> Task:
    """Return the idioms-pinyin task (held-out idioms are SFT's, never trained on)."""
    return Task("idioms-pinyin", _pinyin_examples, _pinyin_reward)


# ---------------------------------------------------------------------------- arithmetic

HELD_OUT_PERCENT = 10
HELDOUT_SEED_BASE = 1_000_000_000
N_TRAIN = 5000
N_HELDOUT = 200
_NAMES = ("小明", "小红", "小华", "小丽", "小刚", "小芳")
_THINGS = ("苹果", "橘子", "糖果", "铅笔", "气球", "贴纸")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def arithmetic_problem(seed: int) -> tuple[str, int]:
    """Return (question, answer) of the word problem of seed; the same seed gives the same problem."""
    rng = random.Random(seed)
    name, other = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return f"{name}有{a}个{thing}，{other}又给了{name}{b}个。{name}现在有多少个{thing}？", a + b
    if op == "-":
        a = rng.randint(2, 99)
        b = rng.randint(1, a - 1)
        return f"{name}有{a}个{thing}，送给{other}{b}个。{name}还剩多少个{thing}？", a - b
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    if op == "*":
        return f"每袋有{a}个{thing}，{name}买了{b}袋。{name}一共有多少个{thing}？", a * b
    return f"{name}把{a * b}个{thing}平均分给{b}个小朋友，每人分到多少个{thing}？", a


def arithmetic_held_out(question: str) -> bool:
    """Return True when the problem belongs to the held-out split (a hash of its text, so stable)."""
    return _hash(question) % 100 < HELD_OUT_PERCENT


@functools.cache
def _arithmetic_examples(split: str) -> tuple[Example, ...]:
    held = split == "heldout"
    seed = HELDOUT_SEED_BASE if held else 0
    out: list[Example] = []
    seen: set[str] = set()
    while len(out) < (N_HELDOUT if held else N_TRAIN):
        q, answer = arithmetic_problem(seed)
        seed += 1
        if arithmetic_held_out(q) == held and q not in seen:
            seen.add(q)
            out.append(Example(_user(q), str(answer)))
    return tuple(out)


def _arithmetic_reward(prompt: Sequence[Mapping[str, str]], completion: str, reference: str) -> float:
    numbers = _NUMBER.findall(normalize_text(completion).replace(",", ""))
    if not numbers:
        return 0.0
    got, want = float(numbers[-1]), float(reference)
    return 1.0 if math.isclose(got, want) else 0.0


def arithmetic() -> Task:
    """Return the arithmetic task (generated word problems; held-out problems never in train)."""
    return Task("arithmetic", _arithmetic_examples, _arithmetic_reward)


# ---------------------------------------------------------------------------- tools


@functools.cache
def _tools_examples(split: str) -> tuple[Example, ...]:
    from qinglm.data.tools_sft import tools_sft

    out = []
    for chat in tools_sft(split):
        first = next(i for i, m in enumerate(chat) if m["role"] == "assistant")
        out.append(Example(chat[:first], chat[-1]["content"]))
    return tuple(out)


def _tools_reward(prompt: Sequence[Mapping[str, str]], completion: str, reference: str) -> float:
    return 1.0 if "".join(completion.split()) == "".join(reference.split()) else 0.0


def tools() -> Task:
    """Return the tools task: tools-sft's chats played as episodes with the built-in tools (multi-turn);
    reward 1 when the final answer is the reference's (spaces aside). Held-out: tools-sft's held-out split."""
    return Task("tools", _tools_examples, _tools_reward, multi_turn=True)


# ---------------------------------------------------------------------------- the built-in tasks

TASKS: dict[str, Callable[[], Task]] = {
    "idioms-pinyin": idioms_pinyin,
    "arithmetic": arithmetic,
    "tools": tools,
}
