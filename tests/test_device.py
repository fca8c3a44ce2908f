"""Device, precision and compile choices."""

import pytest
import torch

from qinglm import device as dev
from qinglm.errors import QingLMError


def test_auto_dtype_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)
    assert dev.resolve_dtype("auto", cpu) == "bf16"
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: False)
    assert dev.resolve_dtype("auto", cpu) == "fp32"
    assert dev.resolve_dtype("fp32", cpu) == "fp32"
    with pytest.raises(QingLMError, match="fp16"):
        dev.resolve_dtype("fp16", cpu)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    model = torch.nn.Linear(3, 2)

    def broken_compile(m):
        def fn(*a, **k):
            raise RuntimeError("no C++ compiler found")

        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    messages = []
    forward = dev.compiled(model, True, messages.append)
    x = torch.randn(4, 3)
    torch.testing.assert_close(forward(x), model(x))
    assert len(messages) == 1 and "no C++ compiler" in messages[0]
    forward(x)
    assert len(messages) == 1  # warned once, then eager for good
    assert dev.compiled(model, False) is model


def test_compile_default(monkeypatch):
    assert dev.resolve_compile(False, torch.device("cpu")) is False
    monkeypatch.setattr(dev.shutil, "which", lambda name: None)
    assert dev.resolve_compile(None, torch.device("cpu")) is False
    monkeypatch.setattr(dev.shutil, "which", lambda name: "/usr/bin/" + name)
    assert dev.resolve_compile(None, torch.device("cpu")) is True


def test_unavailable_device_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(QingLMError, match="no CUDA"):
        dev.resolve_device("cuda")
