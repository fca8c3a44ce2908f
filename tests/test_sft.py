"""SFT: data formats with counted bad lines, assistant-only loss masks, batching, idioms-sft, the sft run."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CHAT  # noqa: E402

import qinglm
from qinglm.cli import main
from qinglm.data import idioms_sft as idioms
from qinglm.errors import QingLMError
from qinglm.infer.chat import encode_chat
from qinglm.model.transformer import IGNORE_INDEX
from qinglm.sft import data as sft_data
from qinglm.sft.config import SFTConfig
from qinglm.sft.train import load_conversations, resolve_sft, run_sft
from qinglm.tokenizer import BOS_ID, IM_END_ID, IM_START_ID


@pytest.fixture(scope="module")
def tok(chat_tok):
    return chat_tok


@pytest.fixture(scope="module")
def base_run(tiny_base_run):
    return tiny_base_run


@pytest.fixture
def one_thread():
    """Run with one torch thread (two on a busy 2-core machine are many times slower), then restore."""
    n = torch.get_num_threads()
    yield 1
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- reading


def test_both_formats_become_messages():
    mm = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
    assert sft_data.to_messages(mm) == mm["conversations"]
    alpaca = {"instruction": "翻译", "input": "cat", "output": "猫"}
    assert sft_data.to_messages(alpaca) == [
        {"role": "user", "content": "翻译\ncat"},
        {"role": "assistant", "content": "猫"},
    ]
    assert sft_data.to_messages({"instruction": "问", "input": "", "output": "答", "system": "S"})[0] == {
        "role": "system",
        "content": "S",
    }


def test_bad_lines_are_counted_and_never_kept(tmp_path):
    good = {"instruction": "问", "output": "答"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"conversations": [{"role": "bot", "content": "x"}]}),
        json.dumps({"conversations": [{"role": "user", "content": "只有问题"}]}),
        json.dumps({"text": "预训练格式"}),
        "",
        json.dumps(good, ensure_ascii=False),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    convs, report = sft_data.read_sft_jsonl(path)
    assert len(convs) == 2 and report.kept == 2 and report.lines == 6
    assert sum(report.skipped.values()) == 4 and report.skipped["invalid JSON"] == 1
    assert report.first_bad[0] == (2, "invalid JSON")
    assert "skipped 4 bad lines" in report.summary() and "line 2" in report.summary()


def test_unreadable_files_are_user_errors(tmp_path):
    with pytest.raises(QingLMError, match="no such file or directory"):
        sft_data.read_sft_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "gbk.jsonl").write_bytes(
        json.dumps({"instruction": "问", "output": "答"}, ensure_ascii=False).encode("gbk")
    )
    convs, _ = sft_data.read_sft_jsonl(tmp_path / "gbk.jsonl")  # detected, as the data tools detect it
    assert convs[0][0]["content"] == "问"
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(QingLMError, match="binary"):
        sft_data.read_sft_jsonl(tmp_path / "binary.jsonl")
    (tmp_path / "bad.jsonl").write_text("{}\n[1]\n", encoding="utf-8")
    with pytest.raises(QingLMError, match="no usable conversation"):
        sft_data.read_sft_jsonl(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------------------- masks


def test_labels_cover_exactly_the_assistant_replies_and_their_im_end(tok):
    ids, labels = sft_data.encode_chat(tok, CHAT)
    assert ids == encode_chat(tok, CHAT).ids  # the ids transformers' apply_chat_template gives
    assert ids[0] == BOS_ID and len(labels) == len(ids)
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(kept) == "比喻做了多余的事。<|im_end|>huà shé tiān zú<|im_end|>"
    assert labels[-1] == IGNORE_INDEX and ids[-1] == tok.encode("\n")[0]  # the "\n" after <|im_end|>


def test_loss_is_the_mean_over_exactly_the_assistant_tokens(tok, base_run):
    """Build the sample by hand, piece by piece, and compare with the model's masked loss."""
    msgs = [{"role": "user", "content": "拼音呢？"}, {"role": "assistant", "content": "huà shé tiān zú"}]
    nl = tok.encode("\n")
    prompt = [BOS_ID, IM_START_ID, *tok.encode("user\n拼音呢？"), IM_END_ID, *nl, IM_START_ID]
    prompt += tok.encode("assistant\n")
    reply = tok.encode("huà shé tiān zú") + [IM_END_ID]
    ids = prompt + reply + tok.encode("\n")
    (sample,), _ = sft_data.make_samples(tok, [msgs], seq_len=64)
    assert sample.x == ids[:-1]
    model = qinglm.load(base_run, device="cpu").model
    x = torch.tensor([sample.x])
    logits = model(x)[0]
    # Position t predicts ids[t + 1]; the reply's tokens are ids[len(prompt) : len(prompt) + len(reply)].
    positions = range(len(prompt) - 1, len(prompt) + len(reply) - 1)
    want = torch.stack([F.cross_entropy(logits[t], torch.tensor(ids[t + 1])) for t in positions]).mean()
    got = model(x, torch.tensor([sample.y]))
    torch.testing.assert_close(got, want)


def test_packing_and_padding_keep_every_target(tok):
    convs = [
        CHAT,
        CHAT[1:3],
        [{"role": "user", "content": "好"}, {"role": "assistant", "content": "好的"}],
    ] * 5
    samples, counts = sft_data.make_samples(tok, convs, seq_len=48)
    assert not counts["no_target"]
    want = sft_data.assistant_tokens(samples)
    for mode in ("pack", "pad"):
        batches = sft_data.epoch_batches(samples, 4, 48, mode, tok.pad_id, seed=0)
        assert sum(int((y != IGNORE_INDEX).sum()) for _, y in batches) == want
        assert all(x.shape[1] <= 48 and x.shape == y.shape for x, y in batches)
    rows = sft_data.pack_rows(samples, 48)
    assert len(rows) < len(samples) and all(len(r.x) <= 48 for r in rows)


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_steps_per_epoch_is_the_number_of_batches_an_epoch_gives(tok, mode):
    # Greedy packing leaves rows part-empty: dividing tokens by the row size undercounted the batches
    # (the run then stopped before the end of its epoch).
    convs = [CHAT, CHAT[1:3], [{"role": "user", "content": "好"}, {"role": "assistant", "content": "好的"}]]
    samples, _ = sft_data.make_samples(tok, [convs[i % 3] for i in range(50)], seq_len=48)
    batches = [len(sft_data.epoch_batches(samples, 4, 48, mode, tok.pad_id, seed=s)) for s in (7, 8, 9)]
    assert sft_data.steps_per_epoch(samples, 4, 48, mode, seed=7) == batches[0]
    assert sft_data.steps_for_epochs(samples, 4, 48, mode, seed=7, num_epochs=1) == batches[0]
    assert sft_data.steps_for_epochs(samples, 4, 48, mode, seed=7, num_epochs=2.5) == (
        batches[0] + batches[1] + math.ceil(0.5 * batches[2])
    )


def test_long_chats_are_cut_and_counted(tok):
    long = [{"role": "user", "content": "天气" * 80}, {"role": "assistant", "content": "好"}]
    wordy = [{"role": "user", "content": "好"}, {"role": "assistant", "content": "好的" * 40}]
    samples, counts = sft_data.make_samples(tok, [long, wordy], seq_len=20)
    assert counts["no_target"] == 1 and counts["truncated"] == 2 and len(samples) == 1
    assert len(samples[0].x) == 20 and samples[0].y[-1] != IGNORE_INDEX


# ---------------------------------------------------------------------------- idioms-sft


def test_idioms_sft_holds_out_whole_idioms():
    train, held = idioms.idioms_sft("train"), idioms.idioms_sft("heldout")
    words = lambda chats: {c[0]["content"].split("“")[1].split("”")[0] for c in chats}  # noqa: E731
    assert not words(train) & words(held)
    assert 0.01 < len(held) / (len(train) + len(held)) < 0.05
    kinds = {idioms.question(k, "画蛇添足") for k in idioms.TEMPLATES}
    assert len(kinds) == 4
    pinyin = [c for c in held if c[0]["content"] == idioms.question("pinyin", c[0]["content"][1:5])]
    assert pinyin and all(idioms.pinyin_format_ok(c[1]["content"], c[0]["content"][1:5]) for c in pinyin[:50])
    assert idioms.idioms_sft("train")[:3] == train[:3]  # deterministic
    with pytest.raises(QingLMError):
        idioms.idioms_sft("val")


def test_pinyin_format_check():
    assert idioms.pinyin_format_ok("huà shé tiān zú", "画蛇添足")
    assert not idioms.pinyin_format_ok("huà shé tiān", "画蛇添足")
    assert not idioms.pinyin_format_ok("画蛇添足", "画蛇添足")


def test_pinyin_accuracy_counts_exact_answers(monkeypatch):
    from qinglm.evals import chat

    first, second = idioms.held_out_idioms()[:2]

    def replies(model, tokenizer, chats, max_new_tokens):
        """The first held-out idiom right, the second with one syllable wrong, the rest in Chinese."""
        assert all(c[0]["content"].endswith(("拼音是什么？", "怎么读？")) for c in chats)
        return [f" {first.pinyin}\n", "xx " + second.pinyin.split(" ", 1)[1]] + ["不知道"] * (len(chats) - 2)

    monkeypatch.setattr(chat, "greedy_replies", replies)
    res = chat.pinyin_accuracy(None, None, n=4)
    assert res["n"] == 4 and res["exact"] == 1 and res["accuracy"] == 0.25 and res["format_ok"] == 0.5
    want = (1 + (len(second.word) - 1) / len(second.word)) / 4
    assert abs(res["syllable_accuracy"] - want) < 1e-9
    assert res["examples"][0] == {"idiom": first.word, "want": first.pinyin, "got": first.pinyin}


# ---------------------------------------------------------------------------- the run


def _jsonl(path, n=40):
    chats = [
        {"conversations": CHAT[1:3]},
        {"instruction": "你好", "input": "", "output": "好的"},
    ]
    path.write_text(
        "\n".join(json.dumps(chats[i % 2], ensure_ascii=False) for i in range(n)), encoding="utf-8"
    )
    return path


def _tiny_sft(base_run, data, out, threads, **kw) -> SFTConfig:
    """Return the SFT config of these tests: CPU, fp32, batch 4, quiet (kw overrides)."""
    defaults = dict(max_steps=60, batch_size=4, lr=3e-3, warmup_steps=5, log_every=100)
    return SFTConfig(
        base=str(base_run), data=str(data), out=str(out), device="cpu", dtype="fp32",
        num_threads=threads, **{**defaults, **kw},
    )  # fmt: skip


def test_full_sft_writes_a_run_that_loads_and_chats(tmp_path, base_run, one_thread):
    data = _jsonl(tmp_path / "chat.jsonl")
    out = tmp_path / "sft"
    cfg = _tiny_sft(base_run, data, out, one_thread)
    res = run_sft(cfg, log=lambda s: None)
    assert res["val_loss_after"] < 0.5 * res["val_loss_before"]
    assert res["trainable_params"] == res["total_params"]
    assert (out / "config.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    assert len(list((out / "checkpoints").glob("step-*"))) == 1
    saved = json.loads((out / "config.json").read_text())
    assert saved["sft"]["lr"] == 3e-3 and saved["sft"]["seq_len"] == 64 and saved["base"] == str(base_run)
    lm = qinglm.load(out, device="cpu")
    assert lm.chat([{"role": "user", "content": "你好"}], temperature=0.0) == "好的"  # stops at <|im_end|>
    pieces = list(lm.stream_chat([{"role": "user", "content": "你好"}], temperature=0.0))
    assert "".join(pieces) == "好的"
    with pytest.raises(QingLMError, match="already holds a run"):
        run_sft(cfg, log=lambda s: None)


def test_one_epoch_of_packed_sft_trains_on_every_batch_exactly_once(
    tmp_path, base_run, one_thread, monkeypatch
):
    data = _jsonl(tmp_path / "chat.jsonl", n=60)
    cfg = SFTConfig(
        base=str(base_run),
        data=str(data),
        out=str(tmp_path / "sft"),
        batch_size=4,
        seq_len=40,  # a row holds one or two chats: greedy packing leaves many rows part-empty
        device="cpu",
        dtype="fp32",
        log_every=100,
        num_threads=one_thread,
    )  # --num-epochs 1, the default, in pack mode
    seen: list[tuple[int, int]] = []
    from qinglm.sft.stage import SFTStage

    loss = SFTStage.loss

    def counted(self, forward, model, batch):  # every micro-batch the engine trains on
        seen.append((self._batches.epoch, int((batch[1] != IGNORE_INDEX).sum())))
        return loss(self, forward, model, batch)

    monkeypatch.setattr(SFTStage, "loss", counted)
    lines: list[str] = []
    res = run_sft(cfg, log=lines.append)
    lm = qinglm.load(base_run, device="cpu")
    convs, _ = load_conversations(resolve_sft(cfg, 64), lambda _: None)
    train, _ = sft_data.make_samples(lm.tokenizer, convs, 40)
    batches = sft_data.epoch_batches(train, 4, 40, "pack", lm.tokenizer.pad_id, cfg.seed)
    assert res["steps"] == len(batches) == len(seen) and {e for e, _ in seen} == {0}
    assert sum(n for _, n in seen) == sft_data.assistant_tokens(train)  # every target, once
    assert any(f"{len(batches):,} steps per epoch" in line for line in lines)
    assert res["time_per_epoch_s"] == pytest.approx(res["train_s"])  # one whole epoch


def test_sft_scales_the_loss_when_the_dtype_needs_a_grad_scaler(tmp_path, base_run, one_thread, monkeypatch):
    # fp16 on CUDA gets the GradScaler pretraining uses; here a CPU scaler stands in for it.
    import qinglm.train.session as session

    made: list[torch.amp.GradScaler] = []

    class Scaler(torch.amp.GradScaler):
        def __init__(self) -> None:
            super().__init__("cpu", init_scale=1024.0)
            self.scaled = self.updates = 0
            made.append(self)

        def scale(self, outputs):
            self.scaled += 1
            return super().scale(outputs)

        def update(self, new_scale=None):
            self.updates += 1
            super().update(new_scale)

    cfg = _tiny_sft(base_run, _jsonl(tmp_path / "chat.jsonl"), tmp_path / "plain", one_thread, max_steps=30)
    plain = run_sft(cfg, log=lambda s: None)
    monkeypatch.setattr(session, "grad_scaler", lambda dtype, device: Scaler())
    scaled = run_sft(dataclasses.replace(cfg, out=str(tmp_path / "scaled")), log=lambda s: None)
    assert len(made) == 1 and made[0].scaled == made[0].updates == 30
    assert made[0].get_scale() == 1024.0  # no overflow in fp32: every update was applied
    # scaling by a power of two and back is exact: the same training as without a scaler
    assert scaled["val_loss_after"] == plain["val_loss_after"] < 0.6 * plain["val_loss_before"]


def test_lora_sft_and_merge_from_the_cli(tmp_path, base_run, capsys, one_thread):
    data = _jsonl(tmp_path / "chat.jsonl")
    base_bytes = (base_run / "best" / "model.safetensors").read_bytes()
    out = tmp_path / "lora"
    argv = [
        "sft",
        "--base",
        str(base_run),
        "--data",
        str(data),
        "--out",
        str(out),
        "--lora",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q_proj",
        "v_proj",
        "down_proj",
        "--max-steps",
        "20",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--num-threads",
        "1",
    ]
    assert main(argv) == 0
    assert (base_run / "best" / "model.safetensors").read_bytes() == base_bytes  # the base run is untouched
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    res = json.loads((out / "sft_results.json").read_text())
    assert res["trainable_params"] == 2 * (4 * (32 + 32) * 2 + 4 * (128 + 32))  # d_ff 128
    merged_run = tmp_path / "merged"
    assert main(["lora", "merge", "--adapter", str(out), "--out", str(merged_run)]) == 0
    x = torch.tensor([[BOS_ID, 10, 11, 12, 13]])
    a, b = qinglm.load(out, device="cpu").model(x), qinglm.load(merged_run, device="cpu").model(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, qinglm.load(base_run, device="cpu").model(x))
    capsys.readouterr()
    assert (
        main(
            [
                "sft",
                "--base",
                str(base_run),
                "--data",
                str(tmp_path / "nope.jsonl"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "qinglm: error: SFT data file " in capsys.readouterr().err


def test_grad_accum_weighs_micro_batches_by_their_reply_tokens(tmp_path, base_run, one_thread, monkeypatch):
    # Replies of 1 to 24 characters: a step's micro-batches hold unequal numbers of reply tokens, and
    # the step's loss must still be the mean over all of them, as one batch of the same rows gives.
    data = tmp_path / "chat.jsonl"
    lines = [{"instruction": "你好", "input": "", "output": "好的天气"[i % 4] * (1 + i)} for i in range(24)]
    data.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in lines), encoding="utf-8")
    import qinglm.train.loop as loop
    from qinglm.sft.stage import SFTStage

    grads: list[list[torch.Tensor]] = []
    units: list[int] = []
    step_optimizer, loss_units = loop.step_optimizer, SFTStage.loss_units

    def record_grads(optimizer, scaler, ok):
        grads.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]])
        return step_optimizer(optimizer, scaler, ok)

    def record_units(self, batch):
        units.append(loss_units(self, batch))
        return units[-1]

    monkeypatch.setattr(loop, "step_optimizer", record_grads)
    monkeypatch.setattr(SFTStage, "loss_units", record_units)
    losses = []
    for name, batch_size, grad_accum in (("accum", 2, 2), ("one", 4, 1)):
        out = tmp_path / name
        cfg = _tiny_sft(base_run, data, out, one_thread, max_steps=1, log_every=1, max_grad_norm=0.0)
        cfg = dataclasses.replace(cfg, batch_size=batch_size, grad_accum=grad_accum, batching="pad")
        run_sft(cfg, log=lambda s: None)
        losses.append(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"])
    assert units[0] != units[1] and units[0] + units[1] == units[2]  # unequal halves of the same rows
    accum, one = grads
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(accum, one))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    weights = [qinglm.load(tmp_path / name, device="cpu").model.state_dict() for name in ("accum", "one")]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])
