"""Every exporter handles or refuses every model option: none exports an option it does not know."""

import dataclasses

import pytest

from qinglm.config import ModelConfig, resolve_model
from qinglm.errors import QingLMError
from qinglm.export.gguf import GGUF_OPTIONS, gguf_arch
from qinglm.export.gpt2 import GPT2_OPTIONS
from qinglm.export.hf_config import HF_OPTIONS, hf_model_type
from qinglm.export.options import ANY, MOE_ONLY

BASE = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
CLASSIC = dict(BASE, family="classic", n_kv_heads=4)
EXPORTERS = {  # name: (table, the check that refuses, a model it exports)
    "hf": (HF_OPTIONS, hf_model_type, BASE),
    "gpt2": (GPT2_OPTIONS, hf_model_type, CLASSIC),
    "gguf": (GGUF_OPTIONS, gguf_arch, BASE),
}


def _other_values(f: dataclasses.Field, value):
    """Return values of field f other than value: its choices, the other bool, or a larger number."""
    if "choices" in f.metadata:
        return [c for c in f.metadata["choices"] if c != value]
    if isinstance(value, bool):
        return [not value]
    return [value * 2 + 1] if isinstance(value, (int, float)) else []


@pytest.mark.parametrize("name", EXPORTERS)
def test_every_model_option_is_handled_or_refused(name):
    table, check, base = EXPORTERS[name]
    check(ModelConfig(**base))  # the base model exports
    for f in dataclasses.fields(ModelConfig):
        cfg = resolve_model(ModelConfig(**base, **({"n_experts": 4} if f.name in MOE_ONLY else {})))
        allowed = table.get(f.name, ())  # a field missing from the table exports at its default only
        for value in _other_values(f, getattr(cfg, f.name)):
            if allowed is ANY or value in allowed:
                continue
            try:
                changed = resolve_model(dataclasses.replace(cfg, **{f.name: value}))
            except QingLMError:
                continue  # not a model at all
            with pytest.raises(QingLMError, match="cannot export"):
                check(changed)


@dataclasses.dataclass
class FutureConfig(ModelConfig):
    """A model option added after the exporters were written."""

    sliding_window: int = 0


@pytest.mark.parametrize("name", EXPORTERS)
def test_an_option_the_exporter_does_not_know_exports_only_at_its_default(name):
    _, check, base = EXPORTERS[name]
    check(FutureConfig(**base))
    with pytest.raises(QingLMError, match="sliding_window"):
        check(FutureConfig(**base, sliding_window=16))
