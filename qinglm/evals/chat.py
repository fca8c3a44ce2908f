"""Chat models answering held-out questions: greedy replies, checked against the true answers.

One path for every such figure: the suite's chat tasks (chat-pinyin, chat-arithmetic), SFT's pinyin
exact match after training and GRPO's held-out reward all decode greedily through the batched engine
(qinglm.infer.rollout) and score replies with the verifiers of qinglm.data.verifiable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qinglm.config import SamplingConfig
from qinglm.data.idioms_sft import held_out_idioms, pinyin_format_ok, question, syllable_accuracy
from qinglm.data.verifiable import Example, Task
from qinglm.infer.rollout import rollout
from qinglm.model.transformer import Transformer
from qinglm.tokenizer import Tokenizer

BATCH = 16  # chats decoded together


def greedy_replies(
    model: Transformer,
    tokenizer: Tokenizer,
    chats: Sequence[Sequence[Mapping[str, str]]],
    max_new_tokens: int,
    batch_size: int = BATCH,
    thinking: bool | None = None,
) -> list[str]:
    """Return the greedy reply to each chat (ending at <|im_end|>, [EOS] or max_new_tokens), in order.

    thinking: the chat template's thinking switch (qinglm.chat_template).
    """
    greedy = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0
    )
    texts: list[str] = []
    for i in range(0, len(chats), batch_size):
        # Greedy replies need no random numbers: a generator of its own leaves the global RNG alone.
        batch = chats[i : i + batch_size]
        texts += rollout(model, tokenizer, batch, 1, greedy, torch.Generator(), thinking).texts
    return texts


def held_out_rewards(
    model: Transformer, tokenizer: Tokenizer, task: Task, examples: Sequence[Example], max_new_tokens: int
) -> tuple[list[str], list[float]]:
    """Return (greedy replies, the task verifier's rewards) of the examples."""
    replies = greedy_replies(model, tokenizer, [ex.messages for ex in examples], max_new_tokens)
    return replies, [task.reward(ex, text) for ex, text in zip(examples, replies)]


def pass_rate(
    model: Transformer, tokenizer: Tokenizer, task: Task, examples: Sequence[Example], max_new_tokens: int
) -> dict[str, Any]:
    """Return {"n", "passed", "pass_rate", "mean_reward", "examples"} of greedy replies to examples.

    A reply passes when its reward reaches task.pass_reward; "examples" holds the first three replies.
    """
    replies, rewards = held_out_rewards(model, tokenizer, task, examples, max_new_tokens)
    n = max(1, len(rewards))
    passed = sum(r >= task.pass_reward for r in rewards)
    shown = [{"question": ex.messages[-1]["content"], "want": ex.reference, "got": text}
             for ex, text in zip(examples[:3], replies)]  # fmt: skip
    return {
        "n": len(rewards),
        "passed": passed,
        "pass_rate": passed / n,
        "mean_reward": sum(rewards) / n,
        "examples": shown,
    }


def pinyin_accuracy(
    model: Transformer, tokenizer: Tokenizer, n: int = 100, max_new_tokens: int = 40
) -> dict[str, Any]:
    """Return {"n", "exact", "accuracy", "format_ok", "syllable_accuracy", "examples"} of greedy answers.

    The first n held-out idioms (dictionary order; n = 0: all) are asked "“X”的拼音是什么？"-style
    questions and an answer counts when it equals the dictionary's pinyin exactly (after strip()).
    format_ok: one tone-marked syllable per character; syllable_accuracy: syllables right in their place.
    """
    items = held_out_idioms()[:n] if n > 0 else held_out_idioms()
    chats = [[{"role": "user", "content": question("pinyin", i.word)}] for i in items]
    answers = [a.strip() for a in greedy_replies(model, tokenizer, chats, max_new_tokens)]
    total = max(1, len(items))
    exact = sum(got == i.pinyin for got, i in zip(answers, items))
    return {
        "n": len(items),
        "exact": exact,
        "accuracy": exact / total,
        "format_ok": sum(pinyin_format_ok(got, i.word) for got, i in zip(answers, items)) / total,
        "syllable_accuracy": sum(syllable_accuracy(got, i.pinyin) for got, i in zip(answers, items)) / total,
        "examples": [{"idiom": i.word, "want": i.pinyin, "got": got} for got, i in zip(answers[:5], items)],
    }
