"""The chat format: one definition, rendered identically by QingLM and by transformers."""

import pytest

from qinglm.errors import QingLMError
from qinglm.infer.chat import encode_chat, prompt_budget, render_chat
from qinglm.tokenizer import BOS_ID, IM_END_ID, IM_START_ID, train_tokenizer

CHAT = [
    {"role": "system", "content": "你是一个助手。"},
    {"role": "user", "content": "“画蛇添足”是什么意思？"},
    {"role": "assistant", "content": "比喻做了多余的事，反而不恰当。"},
    {"role": "user", "content": "它的拼音呢？\n请写出来。"},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["今天天气很好。", "画蛇添足，多此一举。"] * 50, 300, show_progress=False)


def test_render_is_chatml_with_bos():
    text = render_chat(CHAT[:2], add_generation_prompt=True)
    assert text == (
        "[BOS]<|im_start|>system\n你是一个助手。<|im_end|>\n"
        "<|im_start|>user\n“画蛇添足”是什么意思？<|im_end|>\n<|im_start|>assistant\n"
    )


def test_special_markers_are_single_reserved_ids_and_contents_are_text(tok):
    chat = encode_chat(tok, CHAT[:1])
    assert chat.ids[:2] == [BOS_ID, IM_START_ID] and chat.ids[-2] == IM_END_ID
    assert tok.decode(chat.ids) == render_chat(CHAT[:1])
    content = [t for t, c in zip(chat.ids, chat.content) if c]
    assert tok.decode(content) == CHAT[0]["content"]


@pytest.mark.parametrize("bad", [[], "hi", [{"role": "bot", "content": "x"}], [{"role": "user"}]])
def test_bad_messages_are_user_errors(bad):
    with pytest.raises(QingLMError):
        render_chat(bad)


@pytest.mark.parametrize("gen", [False, True])
def test_transformers_renders_the_saved_template_identically(tok, tmp_path, gen):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf_text = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
    assert hf_text == render_chat(CHAT, add_generation_prompt=gen)
    assert hf(hf_text, add_special_tokens=False)["input_ids"] == encode_chat(tok, CHAT, gen).ids


def test_the_reply_gets_max_new_tokens_but_at_most_half_the_context():
    assert prompt_budget(64, 10) == 54
    assert prompt_budget(64, 1000) == 32  # a long reply still leaves the prompt half the context
    assert prompt_budget(65, 1000) == 33
