"""Weight-only int8 and bf16 weights, and `qinglm generate` with --batch-size / --quantize / --stop."""

import copy

import pytest
import torch
import torch.nn as nn

import qinglm
from qinglm.cli import main
from qinglm.config import ModelConfig, SamplingConfig
from qinglm.errors import QingLMError
from qinglm.infer.engine import Generation, Request
from qinglm.model.quantize import Int8Linear, quantize
from qinglm.model.transformer import Transformer
from qinglm.tokenizer import train_tokenizer


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    layer = nn.Linear(100, 30)  # odd sizes (the kernel needs in_features padded to 16s), with a bias
    q = Int8Linear(layer)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (30, 112) and q.scale.shape == (30,)
    x = torch.randn(3, 5, 100)
    want, got = layer(x), q(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() < 0.02 * want.abs().max()  # int8 weights, bf16 activations
    w = q.qweight[:, :100].float() * q.scale.float()[:, None]
    # Dequantized with the scale the kernel uses, each weight is within half a step of the float one.
    assert ((w - layer.weight).abs() <= q.scale.float()[:, None] / 2 * (1 + 1e-6)).all()
    assert (q.qweight.abs().amax(dim=1) >= 126).all()  # and the steps are not wasted


def peaked_model(family: str, ids: torch.Tensor) -> Transformer:
    """Return a small model trained to predict ids almost surely: its distributions are far from uniform."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, family=family, dropout=0.0
    )
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(30):
        model(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def kl_to(want: torch.Tensor, model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        got = model(ids).log_softmax(-1)
    return float((want.exp() * (want - got)).sum(-1).mean())


@pytest.mark.parametrize("family", ["modern", "classic"])
def test_quantized_model_predicts_like_the_float_model(family):
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    model = peaked_model(family, ids)
    x = ids[:, :-1]
    with torch.no_grad():
        want = model(x).log_softmax(-1)
    assert want.exp().amax(-1).mean() > 0.8  # peaked: a near-uniform model would hide a broken layer
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for m in zeroed.modules():
            if isinstance(m, nn.Linear):
                m.weight.zero_()
    assert kl_to(want, zeroed, x) > 1.0  # so the check below can tell a wrong layer from a right one
    quantize(model, "int8")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.head, Int8Linear)
    assert kl_to(want, model, x) < 1e-2
    with torch.no_grad():
        assert torch.equal(model(x).argmax(-1), want.argmax(-1))
    greedy = SamplingConfig(max_new_tokens=5, temperature=0.0, stop_at_eos=False)
    events = list(Generation(model, [Request([2, 5, 6], greedy), Request([2, 7], greedy)]))
    assert len(events) == 5  # the engine decodes with the quantized layers


def decode(model: nn.Module, prompts: list[list[int]], n: int, **kw) -> list[list[int]]:
    """Return each prompt's n greedy tokens from the engine."""
    greedy = SamplingConfig(max_new_tokens=n, temperature=0.0, stop_at_eos=False)
    ids: list[list[int]] = [[] for _ in prompts]
    for events in Generation(model, [Request(p, greedy) for p in prompts], **kw):
        for ev in events:
            ids[ev.row] += ev.ids
    return ids


@pytest.mark.parametrize("compile", [False, True])
def test_bf16_weights_predict_like_the_float_model_through_the_engine(compile):
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    model = peaked_model("modern", ids)
    x = ids[:, :-1]
    with torch.no_grad():
        want = model(x).log_softmax(-1)
    prompts = [ids[0, :5].tolist(), ids[1, :3].tolist()]
    fp32 = decode(model, prompts, 8)
    quantize(model, "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert kl_to(want, model, x) < 1e-2
    # A peaked model: bf16's rounding does not change its choices, eager or compiled.
    assert decode(model, prompts, 8, compile=compile) == fp32


def test_unknown_quantization_is_a_user_error():
    model = Transformer(ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    with pytest.raises(QingLMError, match="unknown quantization 'int4'"):
        quantize(model, "int4")


# ---------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_run):
    """Return a run directory with a tiny random model, laid out as training leaves it."""
    run = tmp_path_factory.mktemp("run")
    lines = [
        "今天天气真不错，我们一起去公园散步吧。",
        "人工智能的未来充满了希望和挑战。",
        "春天来了，花儿都开了。",
    ]
    tok = train_tokenizer([f"{lines[i % 3]}{i}" for i in range(150)], 400, show_progress=False)
    tiny_run(run, tok)
    return run


def generate_lines(capsys, run, prompts_file, *flags) -> list[str]:
    args = ["generate", "--model", str(run), "--prompts-file", str(prompts_file), "--device", "cpu"]
    assert main([*args, "--max-new-tokens", "12", "--temperature", "0", *flags]) == 0
    return capsys.readouterr().out.splitlines()


def test_cli_batched_generation_keeps_order_and_equals_one_at_a_time(run_dir, tmp_path, capsys):
    prompts = ["春天", "人工智能的未来充满了", "今天天气", "花儿都开了", "我们"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    one = generate_lines(capsys, run_dir, path, "--batch-size", "1")
    batched = generate_lines(capsys, run_dir, path, "--batch-size", "3")
    assert batched == one and len(one) == 5
    assert all(line.startswith(p) for line, p in zip(one, prompts))
    lm = qinglm.load(run_dir, device="cpu")
    assert one[1] == prompts[1] + lm.generate(prompts[1], max_new_tokens=12, temperature=0)
    int8 = generate_lines(capsys, run_dir, path, "--batch-size", "3", "--quantize", "int8")
    assert len(int8) == 5 and all(line.startswith(p) for line, p in zip(int8, prompts))
    bf16 = generate_lines(capsys, run_dir, path, "--batch-size", "3", "--quantize", "bf16")
    assert len(bf16) == 5 and all(line.startswith(p) for line, p in zip(bf16, prompts))


def test_cli_stop_string_and_quantized_load(run_dir, tmp_path, capsys):
    lm = qinglm.load(run_dir, device="cpu", quantize="int8")
    assert isinstance(lm.model.head, Int8Linear)
    path = tmp_path / "p.txt"
    path.write_text("春天\n", encoding="utf-8")
    full = generate_lines(capsys, run_dir, path)[0][len("春天") :]
    stop = full[3:5]  # a piece of what the model says anyway
    cut = generate_lines(capsys, run_dir, path, "--stop", stop)[0][len("春天") :]
    assert cut == full[: full.index(stop)]
    assert generate_lines(capsys, run_dir, path, "--stop", stop, "--stream")[0] == "春天" + cut
    assert main(["generate", "--model", str(run_dir), "--prompt", "x", "--batch-size", "0"]) == 2
    assert "batch size must be 1 or more" in capsys.readouterr().err
