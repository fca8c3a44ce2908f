"""Exporters as allow-lists: each names the ModelConfig options it reproduces, and with which values.

An exporter's table maps a field to ANY (every value: written into the target's config, or used in
training only) or to the values it reproduces. A field missing from the table, such as an option added
after the exporter was written, exports only at its default (which keeps the network as it was); any
other value is refused in one line, never exported with wrong numbers. tests/test_export_fields.py walks
every field against every table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

from qinglm.config import FAMILIES, ModelConfig

ANY = None
Table = Mapping[str, Collection | None]

# Options that change how a model trains, not what it computes.
TRAINING_ONLY: Table = dict.fromkeys(
    (
        "family",
        "dropout",
        "attention_dropout",
        "init",
        "init_std",
        "gradient_checkpointing",
        "moe_aux_coef",
        "moe_z_coef",
    ),
    ANY,
)
# Options a dense model (n_experts 0) does not use: no table needs to list their values for it.
MOE_ONLY = ("experts_per_token", "shared_experts", "moe_every", "router")
# Sizes every target writes into its config.
SHAPE: Table = dict.fromkeys(
    ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len", "norm_eps"), ANY
)


def unreproduced(cfg: ModelConfig, table: Table) -> str | None:
    """Return why a resolved cfg has an option value that table does not list, or None when it has none."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in MOE_ONLY and not cfg.n_experts:
            continue
        if f.name in table:
            allowed = table[f.name]
            if allowed is not ANY and value not in allowed:
                listed = ", ".join(map(repr, allowed))
                return f"{f.name} {value!r} is not reproduced (only {listed})"
        elif value not in (f.default, FAMILIES[cfg.family].get(f.name, f.default)):
            return f"the option {f.name} ({value!r}) is not reproduced; only its default exports"
    return None
