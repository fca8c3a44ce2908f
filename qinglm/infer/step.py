"""The fast decoding step: one token per row of a static KV cache, in as few tensor ops as it takes.

``Transformer.forward`` is written for every use (training, prefill, padded batches, MoE); decoding one
token per row through it costs more in Python and small ops than in arithmetic at QingLM's sizes
(benchmarks/README.md). ``DecodeStep`` computes the same logits for the standard families (modern and
classic, fp32/bf16, GQA, QK-norm, gated attention, int8 weight-only layers, LoRA once merged) with:

- the weights bound once (no module calls, no hooks): each linear is F.linear, addmm into the residual
  stream, or the int8 kernel of qinglm.model.quantize; on a CPU an fp32 weight is read from a contiguous
  (in, out) copy (_Transposed: MKL's small-row GEMM is 1.3-2x faster on it than on the (out, in) weight,
  e.g. tiny's head at 8 rows 415 -> 245 us; the copy costs the weights' memory once more);
- RoPE's cos/sin, the attention bias and the cache's write index computed once per step, not per layer;
  queries and keys rotated together, rotate-half as a flip of the two halves times a signed sin;
- keys/values written into the cache with index_copy_ and attention as baddbmm + softmax + bmm over
  the first `window` positions (an additive -inf bias past each row's length);
- one intra-op thread for a step of little work (ONE_THREAD_MACS): at QingLM's small sizes the
  OpenMP start-up and wake-ups of a second thread cost more than they save, most of all on a busy
  machine; only the matmuls large enough to share (SHARED_MACS: the head) get the caller's threads back.

``DecodeStep.of(model)`` returns None for what it does not handle (MoE, LoRA adapters not merged,
forward hooks, subclasses, other layer types): the engine then runs the model's own forward. It is
decided once, when the engine is built, except for hooks on the model itself, checked every step; the step reads the model's parameters themselves, so training
them in place between generations is seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from qinglm.model.kv_cache import KVCache
from qinglm.model.quantize import Int8Linear
from qinglm.model.transformer import MLP, Attention, Block, Transformer

# A step of fewer multiply-adds (rows x weights) than this runs on one intra-op thread, whatever the
# caller's setting (measured: benchmarks/README.md, "Decoding").
ONE_THREAD_MACS = 2**24
# Inside such a step, a matmul of at least this many multiply-adds runs on the caller's threads
# (measured on 2 cores: 1.6x faster at 2^18, 2-3x at 2^19-2^20; below, no gain).
SHARED_MACS = 2**18

Linear = Callable[[torch.Tensor], torch.Tensor]


def _unsupported(model: nn.Module) -> str | None:
    """Return why DecodeStep cannot run model (None when it can)."""
    if type(model) is not Transformer:
        return "not a plain Transformer"
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return "global forward hooks"
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"forward hooks on {name or 'the model'}"
    for block in model.blocks:
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not MLP:
            return "a block that is not attention + MLP (MoE)"
        for norm in (block.norm1, block.norm2):
            if type(norm) not in (nn.RMSNorm, nn.LayerNorm):
                return "another norm"
    for name, m in model.named_modules():
        if name.endswith(("qkv", "out", "gate", "up", "down", "head")) and type(m) not in (
            nn.Linear,
            Int8Linear,
        ):
            return f"{name} is a {type(m).__name__}"
    return None


def _norm(m: nn.Module) -> Linear:
    """Return m (RMSNorm or LayerNorm) as a function of x."""
    if isinstance(m, nn.RMSNorm):
        shape, w, eps = m.normalized_shape, m.weight, m.eps
        return lambda x: F.rms_norm(x, shape, w, eps)
    shape, w, b, eps = m.normalized_shape, m.weight, m.bias, m.eps
    return lambda x: F.layer_norm(x, shape, w, b, eps)


def _int8(m: Int8Linear) -> Linear:
    """Return Int8Linear m's forward on 2-d inputs as a function (the same ops, no module call)."""
    qweight, scale, bias, pad = m.qweight, m.scale, m.bias, m.pad
    mm, bf16 = torch._weight_int8pack_mm, torch.bfloat16

    def int8(x: torch.Tensor) -> torch.Tensor:
        x2 = x.to(bf16)
        x2 = F.pad(x2, (0, pad)) if pad else x2.contiguous()
        y = mm(x2, qweight, scale).to(x.dtype)
        return y if bias is None else y + bias

    return int8


class _Threads:
    """The caller's intra-op thread count, lent back to large matmuls inside a one-thread step."""

    def __init__(self):
        self.n = 1

    def share(self, f: Linear, macs: int) -> Linear:
        """Return f run on the caller's threads when its rows x macs reach SHARED_MACS."""

        def shared(x: torch.Tensor) -> torch.Tensor:
            if self.n == 1 or x.size(0) * macs < SHARED_MACS:
                return f(x)
            torch.set_num_threads(self.n)
            try:
                return f(x)
            finally:
                torch.set_num_threads(1)

        return shared


class _Transposed:
    """Contiguous (in, out) copies of fp32 CPU weights, refreshed when a weight changes.

    A copy is made when the step is bound and refreshed before each step when its weight's version counter
    or storage moved: what an optimizer without `fused=True` or load_state_dict does in place is seen by a
    running engine. Writes that bypass the version counter (`fused=True` AdamW, `.data`) are seen by the
    next engine (each Generation binds its own step), not by one already running.
    """

    def __init__(self):
        self.items: list[list] = []  # [weight, copy, version, data_ptr]

    @staticmethod
    def applies(w: torch.Tensor) -> bool:
        """Return True for a weight the copy speeds up: a plain fp32 tensor on a CPU (bf16: no gain measured)."""
        return type(w.data) is torch.Tensor and w.device.type == "cpu" and w.dtype == torch.float32

    def of(self, w: torch.Tensor) -> torch.Tensor:
        """Return w's (in, out) copy, kept up to date by refresh()."""
        t = w.detach().t().contiguous()
        self.items.append([w, t, w._version, w.data_ptr()])
        return t

    def refresh(self) -> None:
        """Copy again each weight changed since its copy was made (in place: compiled graphs keep theirs)."""
        for item in self.items:
            w, t, version, ptr = item
            if w._version != version or w.data_ptr() != ptr:
                with torch.no_grad():
                    t.copy_(w.detach().t())
                item[2], item[3] = w._version, w.data_ptr()


class DecodeStep:
    """The logits of one token per row at its own position, on a model's bound weights (see the module doc)."""

    def __init__(self, model: Transformer):
        cfg = self.cfg = model.cfg
        self.model = model
        self.threads = _Threads()
        self.layout = _Transposed()
        self.H, self.Hkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = self.hd**-0.5
        self.embed = model.embed.weight
        self.pos = cfg.pos_encoding
        if self.pos == "rope":
            half = self.hd // 2
            self.sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(self.embed.device)
        self.blocks = [self._bind_block(b) for b in model.blocks]
        self.norm = _norm(model.norm)
        self.head = self._linear(model.head)
        self.macs = sum(
            m.in_features * m.out_features for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear))
        )
        self._views: tuple | None = None
        self.traced = False  # set by the compiled engine: the cache written in place, not through views

    def _linear(self, m: nn.Module) -> Linear:
        """Return m (Linear or Int8Linear) as a function of 2-d x (on the caller's threads when large)."""
        macs = m.in_features * m.out_features
        if isinstance(m, Int8Linear):
            return self.threads.share(_int8(m), macs)
        w, b = m.weight, m.bias
        if not self.layout.applies(w):
            return self.threads.share(lambda x: F.linear(x, w, b), macs)
        wt = self.layout.of(w)
        if b is None:
            return self.threads.share(lambda x: torch.mm(x, wt), macs)
        return self.threads.share(lambda x: torch.addmm(b, x, wt), macs)

    def _residual(self, m: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Return (x, y) -> x + m(y): one addmm for a plain Linear without bias."""
        # A quantized tensor subclass (torchao's) has no transpose for addmm: it goes through F.linear.
        plain = type(m) is nn.Linear and type(m.weight.data) is torch.Tensor
        if plain and m.bias is None and m.weight.numel() < SHARED_MACS:
            wt = self.layout.of(m.weight) if self.layout.applies(m.weight) else m.weight.t()
            return lambda x, y: torch.addmm(x, y.to(x.dtype), wt)
        f = self._linear(m)
        return lambda x, y: x + f(y)

    def _bind_block(self, b: Block) -> tuple:
        a, m = b.attn, b.mlp
        qk_norm = (_norm(a.q_norm), _norm(a.k_norm)) if a.use_qk_norm else None
        gate = self._linear(a.gate) if a.use_gate else None
        act = (lambda h: F.silu(h[:, : h.size(1) // 2]) * h[:, h.size(1) // 2 :]) if m.swiglu else F.gelu
        return (
            _norm(b.norm1),
            self._linear(a.qkv),
            qk_norm,
            gate,
            self._residual(a.out),
            _norm(b.norm2),
            self._linear(m.up),
            act,
            self._residual(m.down),
        )

    def hooked(self) -> bool:
        """Return True while the model itself has forward hooks (or global ones are set): checked every step, so
        a hook added after the engine was built (a test slowing the model down, a tracer) still runs."""
        hooks, m = nn.modules.module, self.model
        return bool(
            m._forward_hooks
            or m._forward_pre_hooks
            or hooks._global_forward_hooks
            or hooks._global_forward_pre_hooks
        )

    @classmethod
    def of(cls, model: nn.Module) -> DecodeStep | None:
        """Return a DecodeStep for model, or None when model needs its own forward (see _unsupported)."""
        return None if _unsupported(model) else cls(model)

    def _layer_views(self, cache: KVCache) -> tuple:
        """Return per layer the cache's keys and values as (rows * n_kv_heads, positions, head_dim) and
        their flat (rows * n_kv_heads * positions, head_dim) views; rebuilt when the cache is reallocated."""
        if self._views is None or self._views[0] is not cache.k:
            L, rows, Hkv, P, hd = cache.k.shape
            k3 = cache.k.view(L, rows * Hkv, P, hd).unbind(0)
            v3 = cache.v.view(L, rows * Hkv, P, hd).unbind(0)
            flat = [(k.view(-1, hd), v.view(-1, hd)) for k, v in zip(k3, v3)]
            self._views = (cache.k, list(zip(k3, v3, flat)), P)
        return self._views

    def _writes(
        self, cache: KVCache, B: int, positions: torch.Tensor, T: int = 1
    ) -> tuple[list[Callable], int]:
        """Return per layer a function (k, v, window) -> (keys, values) that stores the step's keys/values
        (B * T, n_kv_heads, head_dim) at each row's positions (T > 1: positions[b]..positions[b]+T-1, a draft
        verified) and returns the layer's first window positions of rows 0..B-1 as (B * n_kv_heads, window,
        head_dim); and the cache's positions.

        Eager: index_copy_ into each layer's flat view (one op). Traced (``traced``, for torch.compile): index_put_
        into cache.k and cache.v themselves, since views of the cache among a graph's inputs make inductor copy
        the whole cache in and out of every step (measured: 8 MB a step for tiny at 32 rows, 3x slower than eager).
        """
        L, _, Hkv, P, hd = cache.k.shape
        if self.traced:
            where = (
                torch.arange(B, device=positions.device)[:, None],
                torch.arange(Hkv, device=positions.device)[None, :],
                positions[:, None],
            )
            if T > 1:  # (B, T, n_kv_heads) indices for (B * T, n_kv_heads, head_dim) values
                at = positions[:, None] + torch.arange(T, device=positions.device)
                where = (where[0][:, :, None], where[1][None], at[:, :, None])

            def traced(i: int) -> Callable:
                layer = torch.tensor(i, device=positions.device)

                def store(k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
                    if T > 1:
                        k, v = k.view(B, T, Hkv, hd), v.view(B, T, Hkv, hd)
                    cache.k.index_put_((layer, *where), k.to(cache.k.dtype))
                    cache.v.index_put_((layer, *where), v.to(cache.v.dtype))
                    keys = cache.k[i, :B].reshape(B * Hkv, P, hd)[:, :window]
                    return keys, cache.v[i, :B].reshape(B * Hkv, P, hd)[:, :window]

                return store

            return [traced(i) for i in range(L)], P
        write = torch.arange(B * Hkv, device=positions.device) * P + positions.repeat_interleave(Hkv)
        if T > 1:  # in the order of the keys (b, t, kv head): row b's head at position positions[b] + t
            at = torch.arange(T, device=positions.device)[None, :, None]
            write = (write.view(B, 1, Hkv) + at).reshape(-1)

        def flat(kc, vc, kflat, vflat) -> Callable:
            def store(k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
                kflat.index_copy_(0, write, k.reshape(-1, hd).to(kflat.dtype))
                vflat.index_copy_(0, write, v.reshape(-1, hd).to(vflat.dtype))
                return kc[: B * Hkv, :window], vc[: B * Hkv, :window]

            return store

        return [flat(kc, vc, kf, vf) for kc, vc, (kf, vf) in self._layer_views(cache)[1]], P

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, window: int
    ) -> torch.Tensor:
        """Return the logits (B, vocab) of token b at positions[b] in row b of cache, attending to its
        positions 0..positions[b] within the first window positions; the keys/values are stored. tokens
        (B, T): T tokens per row from positions[b] (a draft verified), logits (B * T, vocab)."""
        self.layout.refresh()
        caller = torch.get_num_threads()
        if caller == 1 or tokens.numel() * self.macs >= ONE_THREAD_MACS:
            return self._step(tokens, positions, cache, window)
        torch.set_num_threads(1)
        self.threads.n = caller
        try:
            return self._step(tokens, positions, cache, window)
        finally:
            self.threads.n = 1
            torch.set_num_threads(caller)

    def _step(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, window: int
    ) -> torch.Tensor:
        B, H, Hkv, hd = tokens.size(0), self.H, self.Hkv, self.hd
        group, dev = H // Hkv, tokens.device
        T = 1 if tokens.dim() == 1 else tokens.size(1)
        layers, P = self._writes(cache, B, positions, T)
        at = positions  # each query's own position, (B) or (B * T)
        if T > 1:
            at = (positions[:, None] + torch.arange(T, device=dev)).reshape(-1)
        tokens = tokens.reshape(-1)
        x = F.embedding(tokens, self.embed)  # (B, d_model)
        if self.pos == "learned":
            x = x + self.model.pos_embed.weight[at]
        elif self.pos == "sinusoidal":
            x = x * math.sqrt(self.cfg.d_model) + self.model.pos_table[at]
        else:
            cos, sin = self.model.rope_at(at, window)  # (B * T, head_dim)
            cos, sin = (
                cos[:, None],
                (sin * self.sign)[:, None],
            )  # (B * T, 1, head_dim): sin signed for the flip
        # What each query may attend to: (B * n_kv_heads, T * group or 1, W), beyond its own position masked.
        past = torch.arange(window, device=dev) > at[:, None]  # (B * T, W)
        bias = torch.zeros(B * T, window, device=dev).masked_fill_(past, float("-inf"))
        if T == 1:
            bias = bias.repeat_interleave(Hkv, dim=0)[:, None]
        else:  # query (t, g) of kv head h of row b at index t * group + g
            bias = bias.view(B, 1, T, 1, window).expand(B, Hkv, T, group, window).reshape(B * Hkv, -1, window)
        N = B * T
        fp32 = self.embed.dtype == torch.float32
        n_qk = (H + Hkv) * hd
        for (norm1, qkv, qk_norm, gate, out, norm2, up, act, down), store in zip(self.blocks, layers):
            xn = norm1(x)
            h = qkv(xn)  # (N, (n_heads + 2 n_kv_heads) head_dim)
            if qk_norm is None:
                qk = h[:, :n_qk].view(N, H + Hkv, hd)
                if self.pos == "rope":
                    qk = self._rope(qk, cos, sin)
                q, k = qk[:, :H], qk[:, H:]
            else:
                q = qk_norm[0](h[:, : H * hd].view(N, H, hd))
                k = qk_norm[1](h[:, H * hd : n_qk].view(N, Hkv, hd))
                if self.pos == "rope":
                    q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            keys, values = store(k.reshape(N, Hkv, hd), h[:, n_qk:].view(N, Hkv, hd), window)
            if T == 1:
                q = q.reshape(B * Hkv, group, hd)
            else:  # (b, t, h, g) -> (b, h, t, g): a kv head's queries of every position together
                q = q.reshape(B, T, Hkv, group, hd).transpose(1, 2).reshape(B * Hkv, T * group, hd)
            if fp32:
                scores = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=self.scale)
            else:
                scores = torch.bmm(q, keys.to(q.dtype).transpose(1, 2)).float() * self.scale + bias
            y = torch.bmm(scores.softmax(dim=-1).to(values.dtype), values).to(x.dtype)  # (B*Hkv, T*group, hd)
            if T > 1:
                y = y.view(B, Hkv, T, group, hd).transpose(1, 2)
            if gate is not None:
                y = y.reshape(N, H, hd) * torch.sigmoid(gate(xn))[:, :, None]
            x = out(x, y.reshape(N, H * hd))
            x = down(x, act(up(norm2(x))))
        return self.head(self.norm(x))

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Return x (B, heads, head_dim) rotated: x cos + rotate_half(x) sin, rotate_half as a flip."""
        B, n, hd = x.shape
        flipped = x.reshape(B, n, 2, hd // 2).flip(2).view(B, n, hd)  # (x2, x1); sin's first half is negated
        return (x * cos).addcmul_(flipped, sin).to(x.dtype)


def tokens_logits(
    model: Transformer,
    fast: DecodeStep | None,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    window: int,
) -> torch.Tensor:
    """Return the logits (n, T, vocab) of T tokens (n, T) a row from each row's position (n,) in cache, stored
    there: through fast when it runs (no hooks on the model), else the model's own forward."""
    if fast is not None and not fast.hooked():
        return fast(tokens, positions, cache, window).view(tokens.size(0), tokens.size(1), -1)
    return model(tokens, cache=cache, start=positions, window=window)
