"""qinglm.load and the LM object: a run directory in, text and metrics out."""

import shutil
import subprocess
import sys

import pytest
import torch

import qinglm
from qinglm.api import LM
from qinglm.config import SamplingConfig
from qinglm.errors import QingLMError
from qinglm.tokenizer import train_tokenizer
from qinglm.train.checkpoint import save_run

LINES = [
    "今天天气真不错，我们一起去公园散步吧。",
    "人工智能的未来充满了希望和挑战。",
    "中国经济稳步增长，市场信心持续恢复。",
    "春天来了，花儿都开了。",
    "他说：“学习使人进步。”",
]
TEXT = "今天天气真不错，人工智能的未来。"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    """Return (run_dir, the model saved in it), laid out as training leaves it."""
    run_dir = tmp_path_factory.mktemp("run")
    tok = train_tokenizer([f"{LINES[i % 5]}{i}" for i in range(200)], 400, show_progress=False)
    model = tiny_model(tok.vocab_size)
    save_run(run_dir, model, tok)
    return run_dir, model


def test_load_gives_the_saved_model_ready_to_generate(run):
    run_dir, saved = run
    lm = qinglm.load(run_dir, device="cpu")
    assert isinstance(lm, qinglm.LM) and lm.run_dir == run_dir and lm.device == torch.device("cpu")
    assert lm.config == saved.cfg and not lm.model.training
    ids = torch.tensor([[2, 10, 11, 12], [2, 13, 14, 15]])
    logits = lm.model(ids)
    assert logits.shape == (2, 4, lm.config.vocab_size)
    torch.testing.assert_close(logits, saved(ids))  # the weights are the saved ones
    text = lm.generate("今天", max_new_tokens=10, seed=1)
    assert isinstance(text, str) and text
    assert lm.generate("今天", max_new_tokens=10, seed=1) == text
    assert lm.generate(
        "今天", max_new_tokens=20, temperature=1.0, top_k=None, top_p=None, seed=2
    ) != lm.generate("今天", max_new_tokens=20, temperature=1.0, top_k=None, top_p=None, seed=3)
    greedy = lm.generate("今天", max_new_tokens=12, temperature=0)
    assert "".join(lm.stream("今天", max_new_tokens=12, temperature=0)) == greedy
    # loading a weights file inside the run directory works too
    assert (
        qinglm.load(run_dir / "best" / "model.safetensors", device="cpu").generate(
            "今天", max_new_tokens=12, temperature=0
        )
        == greedy
    )


def test_evaluate_text_file_and_builtin(run, tmp_path):
    lm = qinglm.load(run[0], device="cpu")
    m = lm.evaluate(TEXT)
    assert {"loss", "ppl", "bpc"} <= set(m) and m["tokens"] == len(lm.tokenizer.encode(TEXT)) + 1
    assert (
        m["loss"] > 0
        and m["bpc"] > 0
        and abs(m["ppl"] - torch.tensor(m["loss"]).exp().item()) < 1e-3 * m["ppl"]
    )
    path = tmp_path / "val.txt"
    path.write_text(TEXT + "\n", encoding="utf-8")
    assert lm.evaluate(str(path)) == m  # a path is read as documents, the same text gives the same numbers
    builtin = lm.evaluate("reviews", max_tokens=300)  # its val split, not the word "reviews"
    assert builtin["tokens"] >= 300


def test_bpc_of_a_uniform_model_is_log2_vocab_times_tokens_per_character(run):
    import copy
    import math

    _, saved = run
    model = copy.deepcopy(saved)
    with torch.no_grad():
        model.head.weight.zero_()  # every logit 0: each token costs exactly ln(V) nats
    lm = LM(model, qinglm.load(run[0], device="cpu").tokenizer)
    m = lm.evaluate(TEXT)
    tokens = len(lm.tokenizer.encode(TEXT)) + 1  # the text's tokens and [EOS], each predicted once
    chars = len(TEXT) + 1  # the document break counts as a character
    assert m["tokens"] == tokens
    assert m["loss"] == pytest.approx(math.log(lm.config.vocab_size), rel=1e-6)
    assert m["bpc"] == pytest.approx(math.log2(lm.config.vocab_size) * tokens / chars, rel=1e-6)


def test_lm_can_be_built_without_a_run_directory(run):
    _, saved = run
    tok_dir = run[0] / "tokenizer"
    from qinglm.tokenizer import Tokenizer

    lm = LM(saved, Tokenizer.load(tok_dir))
    assert lm.run_dir is None and isinstance(lm.generate("中国", max_new_tokens=5), str)


def test_missing_or_incomplete_run_directory_names_what_is_missing(run, tmp_path):
    with pytest.raises(QingLMError, match="run directory not found"):
        qinglm.load(tmp_path / "nope", device="cpu")
    with pytest.raises(QingLMError, match="config.json"):
        qinglm.load(tmp_path, device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(run[0], broken)
    shutil.rmtree(broken / "best")
    with pytest.raises(QingLMError, match="no weights"):
        qinglm.load(broken, device="cpu")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(QingLMError, match="tokenizer"):
        qinglm.load(broken, device="cpu")


def test_importing_qinglm_does_not_import_torch():
    code = "import sys, qinglm; assert 'torch' not in sys.modules; print(qinglm.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.1.0"


def test_evaluate_builtin_uses_the_runs_own_val_fraction(run, tmp_path):
    from qinglm.config import to_dict
    from qinglm.data.builtin import builtin_documents
    from qinglm.data.sources import split_of
    from qinglm.evaluate import evaluate_documents
    from qinglm.train.config import TrainConfig

    _, model = run
    tok = qinglm.load(run[0], device="cpu").tokenizer
    train = to_dict(TrainConfig(data=["pd1998"], val_fraction=0.01))
    run_dir = save_run(tmp_path / "run", model, tok, {"train": train})
    sft_dir = save_run(tmp_path / "sft", model, tok, {"train": None, "sft": {}, "base": str(run_dir)})
    val = builtin_documents("pd1998", "val", 0.01)
    assert not set(val) & set(builtin_documents("pd1998", "train", 0.01))
    assert set(builtin_documents("pd1998", "val")) - set(val)  # 2% would leak
    kw = dict(seq_len=64, batch_size=32, max_tokens=2048)
    want = evaluate_documents(model, tok, val, **kw)
    assert evaluate_documents(model, tok, builtin_documents("pd1998", "val"), **kw) != want
    for d in (run_dir, sft_dir):  # an SFT run is held to its base's split
        lm = qinglm.load(d, device="cpu")
        assert lm.val_fraction == 0.01 and lm.evaluate("pd1998", **kw) == want
    # A run saved before split_by existed held out single paragraphs: it is scored on those.
    del train["split_by"]
    old_dir = save_run(tmp_path / "old", model, tok, {"train": train})
    old_val = [d for d in builtin_documents("pd1998") if split_of(d, 0.01) == "val"]
    lm = qinglm.load(old_dir, device="cpu")
    assert lm.split_by == "document"
    assert lm.evaluate("pd1998", **kw) == evaluate_documents(model, tok, old_val, **kw)


def test_sampling_is_a_config_plus_keyword_overrides(run):
    lm = qinglm.load(run[0], device="cpu")
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    assert lm.generate("今天", greedy) == lm.generate("今天", max_new_tokens=12, temperature=0)
    assert lm.generate("今天", greedy, max_new_tokens=5) == lm.generate(
        "今天", max_new_tokens=5, temperature=0
    )
    assert "".join(lm.stream("今天", greedy)) == lm.generate("今天", greedy)
    with pytest.raises(TypeError, match="temprature"):
        lm.generate("今天", temprature=0)
