"""The Gated DeltaNet mixer kind ("gdn"): Qwen3-Next's and Qwen3.5's linear-attention layers.

Per token: projections ``q, k`` (``G`` key heads of ``K`` channels), ``v, z`` (``H`` value heads of
``V`` channels), ``b, a`` (one per value head); a causal depthwise convolution (``kernel`` taps)
with SiLU over q, k and v; q and k L2-normalised and repeated to the value heads (key head ``i``
serves value heads ``i*r .. i*r + r - 1``, ``r = H / G``), q scaled by ``K^-1/2``; the decay
``g = -exp(A_log) * softplus(a + dt_bias)`` and the write strength ``beta = sigmoid(b)``; the
gated delta rule on a float32 state ``S [H, K, V]``::

    S <- S * exp(g);  S <- S + k (beta * (v - S^T k))^T;  o = S^T q

then a gated RMSNorm ``norm(o) * silu(z)`` per head and ``out_proj``. Two forms compute the
recurrence, both equal to it token by token: ``chunked_delta_rule`` (chunks of ``chunk`` tokens,
the UT transform inside a chunk, a scan over chunks: prefill and training) and
``recurrent_delta_rule`` (a scan over tokens that also returns the state after every token:
decode and verify, whose rollback selects one of them). Packed rows (``Context.segment_ids``)
reset the state and the convolution at every document start by masks, never by a large negative
decay (which would lose float32 precision).

Options (``LayerSpec.mixer_options``, filled from the HF config): ``key_heads``
(linear_num_key_heads), ``value_heads`` (linear_num_value_heads), ``key_dim``
(linear_key_head_dim), ``value_dim`` (linear_value_head_dim), ``conv_kernel``
(linear_conv_kernel_dim), ``layout`` (the checkpoint's tensors: ``qwen3_next`` fused
``in_proj_qkvz`` / ``in_proj_ba`` per key-head group, or ``qwen3_5`` separate ``in_proj_qkv``,
``in_proj_z``, ``in_proj_b``, ``in_proj_a``), ``chunk`` (the chunked form's chunk length).

Cache state (``GDNState``): the last ``kernel - 1`` inputs of each convolution and the recurrent
state; after a cached pass without ``Context.valid_B``, their trail over the block (rolled back by
selecting, docs/design.md §3).

Shape letters: B batch, T tokens, D width, G key heads, H value heads, K key dim, V value dim,
C channels of one convolution, W = kernel - 1 window, N chunks, L chunk length.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash.config import LayerSpec, ModelConfig
from dflash.errors import ConfigError
from dflash.models.cache import LayerState
from dflash.models.kinds import MixerKind, WeightRow, option, register_mixer
from dflash.models.layers import Context, Linear, RMSNorm, normal
from dflash.sharding import ShardingError, constrain

OPTIONS = {"key_heads": 16, "value_heads": 32, "key_dim": 128, "value_dim": 128, "conv_kernel": 4,
           "layout": "qwen3_next", "chunk": 64}
LAYOUTS = ("qwen3_next", "qwen3_5")
PARTS = ("q", "k", "v")  # the convolved projections, in the order of HF's conv channels


@dataclasses.dataclass(frozen=True)
class Dims:
    """A GDN layer's sizes, read once from its options."""

    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    kernel: int
    chunk: int
    layout: str

    @classmethod
    def of(cls, spec: LayerSpec) -> Dims:
        opt = {name: option(spec, name) for name in OPTIONS}
        dims = cls(int(opt["key_heads"]), int(opt["value_heads"]), int(opt["key_dim"]),
                   int(opt["value_dim"]), int(opt["conv_kernel"]), int(opt["chunk"]), str(opt["layout"]))
        for name in ("key_heads", "value_heads", "key_dim", "value_dim", "conv_kernel", "chunk"):
            if int(opt[name]) < 1:
                raise ConfigError(f"gdn option {name} must be a positive int, got {opt[name]!r}")
        if dims.value_heads % dims.key_heads:
            raise ConfigError(f"gdn option value_heads ({dims.value_heads}) must be a multiple of key_heads "
                              f"({dims.key_heads})")
        if dims.layout not in LAYOUTS:
            raise ConfigError(f"gdn option layout must be one of {', '.join(LAYOUTS)}, got {dims.layout!r}")
        return dims

    @property
    def ratio(self) -> int:
        return self.value_heads // self.key_heads

    @property
    def width(self) -> dict[str, int]:
        """Channels of each projection."""
        qk, vz = self.key_heads * self.key_dim, self.value_heads * self.value_dim
        return {"q": qk, "k": qk, "v": vz, "z": vz, "b": self.value_heads, "a": self.value_heads}

    @property
    def heads(self) -> dict[str, int]:
        """Heads of each projection (what tensor parallelism splits)."""
        return {"q": self.key_heads, "k": self.key_heads, "v": self.value_heads, "z": self.value_heads,
                "b": self.value_heads, "a": self.value_heads}


# ----------------------------------------------------------------------------- cache state
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GDNState(LayerState):
    """One GDN layer's cache: the last ``W = kernel - 1`` inputs of each convolution
    (``conv_q``, ``conv_k``: ``[B, W, G*K]``, ``conv_v``: ``[B, W, H*V]``, the cache's dtype) and
    the recurrent state ``rec [B, H, K, V]`` (float32).

    After a cached pass over ``T`` tokens without ``Context.valid_B`` it is in *trail* form:
    ``conv_*`` hold the ``W + T`` inputs (window then block: the window after ``j`` tokens is rows
    ``j .. j + W - 1``) and ``rec [B, T + 1, H, K, V]`` the state before the block and after each
    token; ``rollback`` selects each row's. With ``valid_B`` the pass returns it committed (the
    state after each row's real tokens) and ``rollback`` is the identity.
    """

    conv_q: jax.Array
    conv_k: jax.Array
    conv_v: jax.Array
    rec: jax.Array
    AXES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **{f"conv_{p}": ("batch", ..., "heads") for p in PARTS}, "rec": ("batch", ..., "heads", None, None)}

    @property
    def trail(self) -> bool:
        return self.rec.ndim == 5

    @property
    def convs(self) -> tuple[jax.Array, ...]:
        return tuple(getattr(self, f"conv_{p}") for p in PARTS)

    @classmethod
    def zeros(cls, batch: int, dims: Dims, dtype: Any) -> GDNState:
        w, width = dims.kernel - 1, dims.width
        return cls(*(jnp.zeros((batch, w, width[p]), dtype) for p in PARTS),
                   rec=jnp.zeros((batch, dims.value_heads, dims.key_dim, dims.value_dim), jnp.float32)
                   ).constrained()

    def rollback(self, kept_B: jax.Array, block_len: int) -> GDNState:
        if not self.trail:
            return self  # committed by the pass (valid_B): the caller kept exactly its real tokens
        w = self.conv_q.shape[1] - block_len
        rows_BW = kept_B[:, None] + jnp.arange(w, dtype=kept_B.dtype)[None]
        convs = (jnp.take_along_axis(c, rows_BW[..., None], axis=1) for c in self.convs)
        rec = jnp.take_along_axis(self.rec, kept_B[:, None, None, None, None], axis=1)[:, 0]
        return GDNState(*convs, rec=rec).constrained()


def state_bytes(cfg: ModelConfig, spec: LayerSpec, dtype: Any) -> int:
    """Bytes of one row's committed ``GDNState`` (the convolution windows in ``dtype``, the
    recurrence in float32); a verify pass over T tokens holds ``T + 1`` recurrences transiently."""
    dims = Dims.of(spec)
    conv = (dims.kernel - 1) * sum(dims.width[p] for p in PARTS) * np.dtype(dtype).itemsize
    return conv + 4 * dims.value_heads * dims.key_dim * dims.value_dim


# ----------------------------------------------------------------------------- the recurrence
def doc_starts(segment_ids: jax.Array | None, shape: tuple[int, int]) -> jax.Array | None:
    """``[B, T]`` bool: tokens that start a document of a packed row (the first token of a row
    too), or None without packing."""
    if segment_ids is None:
        return None
    first = jnp.ones((shape[0], 1), bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def recurrent_delta_rule(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHV: jax.Array, g_BTH: jax.Array,
                         beta_BTH: jax.Array, s0_BHKV: jax.Array,
                         starts_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule token by token (float32): outputs ``[B, T, H, V]`` and the state after
    every token ``[B, T, H, K, V]``. ``starts_BT``: the state is zeroed before those tokens."""
    f32 = lambda x: x.astype(jnp.float32).swapaxes(0, 1)  # noqa: E731  time first, for the scan
    keep_TB = (jnp.ones(g_BTH.shape[:2], jnp.float32) if starts_BT is None
               else 1.0 - starts_BT.astype(jnp.float32)).swapaxes(0, 1)

    def step(s_BHKV, xs):
        q, k, v, g, beta, keep = xs
        s_BHKV = s_BHKV * (keep[:, None, None, None] * jnp.exp(g)[..., None, None])
        delta_BHV = beta[..., None] * (v - jnp.einsum("bhkv,bhk->bhv", s_BHKV, k))
        s_BHKV = s_BHKV + k[..., :, None] * delta_BHV[..., None, :]
        return s_BHKV, (jnp.einsum("bhkv,bhk->bhv", s_BHKV, q), s_BHKV)

    xs = (f32(q_BTHK), f32(k_BTHK), f32(v_BTHV), f32(g_BTH), f32(beta_BTH), keep_TB)
    _, (o_TBHV, s_TBHKV) = jax.lax.scan(step, s0_BHKV.astype(jnp.float32), xs)
    return o_TBHV.swapaxes(0, 1), s_TBHKV.swapaxes(0, 1)


def unit_lower_solve(system: jax.Array, rhs: jax.Array) -> jax.Array:
    """``x`` with ``system @ x = rhs`` for a unit lower-triangular ``system [..., L, L]``, ``rhs
    [..., L, D]``: forward substitution, one row per step (L steps, every chunk and head at once).
    Plain jnp instead of ``solve_triangular``, whose CPU LAPACK call deadlocked a batch-sharded
    backward pass on the host platform's virtual devices."""
    n = system.shape[-1]

    def row(i, x):
        below = jnp.where(jnp.arange(n) < i, system[..., i, :], 0.0)  # [..., L]: the solved rows' weights
        return x.at[..., i, :].set(rhs[..., i, :] - jnp.einsum("...j,...jd->...d", below, x))

    return jax.lax.fori_loop(0, n, row, jnp.zeros_like(rhs))


def chunked_delta_rule(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHV: jax.Array, g_BTH: jax.Array,
                       beta_BTH: jax.Array, s0_BHKV: jax.Array, starts_BT: jax.Array | None = None,
                       chunk: int = 64) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule over chunks of ``chunk`` tokens (float32): outputs ``[B, T, H, V]`` and
    the final state ``[B, H, K, V]``, equal to ``recurrent_delta_rule``.

    Inside a chunk the delta rule's writes solve one unit lower-triangular system (the UT
    transform), so a chunk is a few matmuls; a scan carries the state from chunk to chunk. Any
    ``T`` (padded to whole chunks with tokens that change nothing: ``g = 0``, ``beta = 0``, ``k = 0``).
    ``starts_BT``: document starts; two tokens interact only inside one document, the incoming
    state reaches only the chunk's tokens before its first start, and only the last document's
    tokens reach the outgoing state (masks, so decays never cross a document).
    """
    b, t, h, kd = k_BTHK.shape
    vd = v_BTHV.shape[-1]
    n = -(-t // chunk)
    pad = n * chunk - t

    def chunks(x, fill=0.0):  # [B, T, H, ...] -> [B, H, N, L, ...] float32, padded
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        x = x.reshape(b, n, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 3, 1)

    q, k, v = chunks(q_BTHK), chunks(k_BTHK), chunks(v_BTHV)
    g, beta = chunks(g_BTH), chunks(beta_BTH)  # [B, H, N, L]
    starts = jnp.zeros((b, t), bool) if starts_BT is None else starts_BT
    doc_BT = jnp.cumsum(jnp.pad(starts, [(0, 0), (0, pad)]).astype(jnp.int32), axis=1)
    doc_BNL = doc_BT.reshape(b, n, chunk)
    # The document of the token before each chunk (0: the incoming state's, before any start).
    before_BN = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), doc_BNL[:, :-1, -1]], axis=1)
    first = (doc_BNL == before_BN[..., None])[:, None].astype(jnp.float32)  # [B, 1, N, L]: sees the state
    last = (doc_BNL == doc_BNL[..., -1:])[:, None].astype(jnp.float32)  # reaches the outgoing state
    carries = (doc_BNL[..., -1] == before_BN)[:, None].astype(jnp.float32)  # [B, 1, N]: no start inside

    gamma = jnp.cumsum(g, axis=-1)  # [B, H, N, L] log-decay from the chunk's start through each token
    same = doc_BNL[..., :, None] == doc_BNL[..., None, :]  # [B, N, L, L]
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    pair = (same & causal)[:, None]  # [B, 1, N, L, L]: j <= i in one document
    diff = gamma[..., :, None] - gamma[..., None, :]
    decay_pair = jnp.where(pair, jnp.exp(jnp.where(pair, diff, 0.0)), 0.0)  # exp(gamma_i - gamma_j), masked

    eye = jnp.eye(chunk, dtype=jnp.float32)
    kk = jnp.einsum("bhnik,bhnjk->bhnij", k, k)
    system = eye + (beta[..., :, None] * kk * decay_pair) * (1.0 - eye)  # unit lower triangular
    rhs = jnp.concatenate([beta[..., None] * v, (beta * jnp.exp(gamma) * first)[..., None] * k], axis=-1)
    solved = unit_lower_solve(system, rhs)
    u, w = solved[..., :vd], solved[..., vd:]  # the block's writes, and how they read the incoming state
    attn = jnp.einsum("bhnik,bhnjk->bhnij", q, k) * decay_pair
    q_in = q * (jnp.exp(gamma) * first)[..., None]
    k_out = k * (jnp.exp(gamma[..., -1:] - gamma) * last)[..., None]
    chunk_decay = jnp.exp(gamma[..., -1]) * carries  # [B, H, N]

    def step(s_BHKV, xs):
        u, w, attn, q_in, k_out, decay = xs
        v_new = u - jnp.einsum("bhlk,bhkv->bhlv", w, s_BHKV)
        o = jnp.einsum("bhlk,bhkv->bhlv", q_in, s_BHKV) + jnp.einsum("bhij,bhjv->bhiv", attn, v_new)
        s_BHKV = s_BHKV * decay[..., None, None] + jnp.einsum("bhlk,bhlv->bhkv", k_out, v_new)
        return s_BHKV, o

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u, w, attn, q_in, k_out, chunk_decay))
    s_BHKV, o_NBHLV = jax.lax.scan(step, s0_BHKV.astype(jnp.float32), xs)
    o_BTHV = jnp.moveaxis(o_NBHLV, 0, 1).swapaxes(2, 3).reshape(b, n * chunk, h, vd)  # [B, N, L, H, V]
    return o_BTHV[:, :t], s_BHKV


# ----------------------------------------------------------------------------- the module
def _causal_conv(x_BTC: jax.Array, w_C1W: jax.Array, window_BWC: jax.Array,
                 starts_BT: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """SiLU of the causal depthwise convolution of ``x`` (kernel ``w [C, 1, W + 1]``, the last tap
    on the current token) continuing from ``window`` (the ``W`` inputs before the block); also
    returns the inputs window + block ``[B, W + T, C]``. ``starts_BT``: no tap reaches across a
    document start (nor into the window)."""
    w_ = window_BWC.shape[1]
    t = x_BTC.shape[1]
    xs_BSC = jnp.concatenate([window_BWC.astype(x_BTC.dtype), x_BTC], axis=1)
    taps = w_C1W[:, 0, :].astype(jnp.float32)
    out = xs_BSC[:, w_:].astype(jnp.float32) * taps[:, w_]
    if starts_BT is not None:
        doc_BT = jnp.cumsum(starts_BT.astype(jnp.int32), axis=1)
    for lag in range(1, w_ + 1):
        x_lag = xs_BSC[:, w_ - lag:w_ - lag + t].astype(jnp.float32)
        if starts_BT is not None:  # the tap's token must be in the same document (window: never)
            src = jnp.pad(doc_BT, [(0, 0), (lag, 0)], constant_values=-1)[:, :t]
            x_lag = x_lag * (src == doc_BT)[..., None]
        out = out + x_lag * taps[:, w_ - lag]
    return jax.nn.silu(out).astype(x_BTC.dtype), xs_BSC


def _l2norm(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def check_mesh(dims: Dims) -> None:
    """Tensor parallelism splits whole heads: a clear error when the mesh's ``tensor`` axis does
    not divide the key or the value heads (checked when a forward is traced under a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    ways = 1 if mesh.empty or "tensor" not in mesh.axis_names else mesh.shape["tensor"]
    for name in ("key_heads", "value_heads"):
        if getattr(dims, name) % ways:
            raise ShardingError(f"gdn option {name} ({getattr(dims, name)}) is not divisible by mesh axis "
                                f"tensor of size {ways}; tensor parallelism splits whole heads")


class GatedDeltaNet(nnx.Module):
    """One GDN layer: parameters split per projection so tensor parallelism can shard heads."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dims = dims = Dims.of(spec)
        d = cfg.hidden_size
        for p, width in dims.width.items():
            setattr(self, f"in_proj_{p}", Linear(d, width, bias=False, dtype=dtype, rngs=rngs))
        for p in PARTS:  # HF's depthwise conv1d.weight [C, 1, kernel], split per part
            setattr(self, f"conv_{p}", normal(rngs, (dims.width[p], 1, dims.kernel), dtype, std=0.5))
        a_H = jax.random.uniform(rngs.params(), (dims.value_heads,), dtype, 1.0, 16.0)
        self.A_log = nnx.Param(jnp.log(a_H))
        self.dt_bias = nnx.Param(jnp.ones((dims.value_heads,), dtype))
        self.norm = GatedRMSNorm(dims.value_dim, cfg.rms_norm_eps, dtype)
        self.out_proj = Linear(dims.value_heads * dims.value_dim, d, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, *, ctx: Context,
                 state: GDNState | None) -> tuple[jax.Array, GDNState | None]:
        dims = self.dims
        check_mesh(dims)
        b, t, _ = x_BTD.shape
        if state is not None and state.trail:
            raise ConfigError("a GDN cache state still holds a pass's trail: call Cache.keep after every "
                              "cached pass")
        starts_BT = doc_starts(ctx.segment_ids, (b, t))
        state_in = GDNState.zeros(b, dims, x_BTD.dtype) if state is None else state
        valid_BT = None if ctx.valid_B is None else jnp.arange(t)[None] < ctx.valid_B[:, None]
        convolved, inputs = [], []
        for p, window in zip(PARTS, state_in.convs, strict=True):
            y, xs = _causal_conv(getattr(self, f"in_proj_{p}")(x_BTD), getattr(self, f"conv_{p}")[...],
                                 window, starts_BT)
            convolved.append(y)
            inputs.append(xs.astype(window.dtype))  # the cache keeps its dtype
        q_BTC, k_BTC, v_BTE = convolved
        heads = lambda x, n: constrain(x.reshape(b, t, n, -1), "heads")  # noqa: E731
        q = jnp.repeat(_l2norm(heads(q_BTC, dims.key_heads)), dims.ratio, axis=2) * (dims.key_dim ** -0.5)
        k = jnp.repeat(_l2norm(heads(k_BTC, dims.key_heads)), dims.ratio, axis=2)
        v = heads(v_BTE, dims.value_heads)
        a_BTH = self.in_proj_a(x_BTD).astype(jnp.float32)
        g_BTH = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a_BTH + self.dt_bias[...].astype(jnp.float32))
        beta_BTH = jax.nn.sigmoid(self.in_proj_b(x_BTD).astype(jnp.float32))
        if valid_BT is not None:  # right padding: the state holds still past each row's real tokens
            g_BTH, beta_BTH = g_BTH * valid_BT[..., None], beta_BTH * valid_BT[..., None]
        s0 = state_in.rec
        if state is not None and ctx.valid_B is None:  # decode / verify: the trail, for rollback
            o_BTHV, s_BTHKV = recurrent_delta_rule(q, k, v, g_BTH, beta_BTH, s0, starts_BT)
            new_state = GDNState(*inputs, rec=jnp.concatenate([s0[:, None], s_BTHKV], axis=1)).constrained()
        else:
            o_BTHV, s_BHKV = chunked_delta_rule(q, k, v, g_BTH, beta_BTH, s0, starts_BT, dims.chunk)
            new_state = None
            if state is not None:  # committed: each row's window ends at its last real token
                rows_BW = ctx.valid_B[:, None] + jnp.arange(dims.kernel - 1)[None]
                convs = (jnp.take_along_axis(xs, rows_BW[..., None], axis=1) for xs in inputs)
                new_state = GDNState(*convs, rec=s_BHKV).constrained()
        z_BTHV = self.in_proj_z(x_BTD).reshape(b, t, dims.value_heads, dims.value_dim)
        out_BTHV = self.norm(o_BTHV.astype(x_BTD.dtype), z_BTHV)
        return self.out_proj(out_BTHV.reshape(b, t, -1)), new_state


class GatedRMSNorm(RMSNorm):
    """``weight * rmsnorm(x) * silu(z)`` per head: the plain RMSNorm (never zero-centred here, as in
    HF), times the gate in float32, cast back."""

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:  # type: ignore[override]
        return (super().__call__(x) * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)


# ----------------------------------------------------------------------------- the kind
def _weights(cfg: ModelConfig, spec: LayerSpec) -> tuple[WeightRow, ...]:
    """HF tensors <-> our per-projection parameters, in the layout the option names."""
    dims = Dims.of(spec)
    width = dims.width
    rows: list[WeightRow] = []
    if dims.layout == "qwen3_next":  # per key-head group: [q K, k K, v r*V, z r*V] and [b r, a r]
        group = {"q": dims.key_dim, "k": dims.key_dim, "v": dims.ratio * dims.value_dim,
                 "z": dims.ratio * dims.value_dim}
        rows += _column_rows("in_proj_qkvz.weight", group, lambda p: f"in_proj_{p}.kernel", transpose=True)
        rows += _column_rows("in_proj_ba.weight", {"b": dims.ratio, "a": dims.ratio},
                             lambda p: f"in_proj_{p}.kernel", transpose=True)
    else:  # one group of unequal widths, then separate tensors
        rows += _column_rows("in_proj_qkv.weight", {p: width[p] for p in PARTS},
                             lambda p: f"in_proj_{p}.kernel", transpose=True)
        rows += [WeightRow(f"in_proj_{p}.weight", f"in_proj_{p}.kernel", transpose=True) for p in "zba"]
    rows += _column_rows("conv1d.weight", {p: width[p] for p in PARTS}, lambda p: f"conv_{p}", axis=0)
    return (*rows, WeightRow("A_log", "A_log"), WeightRow("dt_bias", "dt_bias"),
            WeightRow("norm.weight", "norm.weight"),
            WeightRow("out_proj.weight", "out_proj.kernel", transpose=True))


def _column_rows(hf: str, group: dict[str, int], ours: Any, **kw: Any) -> list[WeightRow]:
    """One row per part of a fused HF tensor whose groups hold the parts' columns in ``group``'s order."""
    every, lo, rows = sum(group.values()), 0, []
    for p, n in group.items():
        rows.append(WeightRow(hf, ours(p), cols=(lo, lo + n, every), **kw))
        lo += n
    return rows


def _flops(cfg: ModelConfig, spec: LayerSpec, rows: int, keys: float) -> float:
    """Projections and ``out_proj`` (``2 m n k`` each), the convolution (2 per tap and channel) and
    the recurrence (about 7 per state entry and token: decay, read, write, output); ``keys`` does
    not matter (the state is the same size whatever came before)."""
    dims, d = Dims.of(spec), cfg.hidden_size
    width = dims.width
    proj = d * sum(width.values()) + width["v"] * d
    conv = dims.kernel * sum(width[p] for p in PARTS)
    rec = 7 * dims.value_heads * dims.key_dim * dims.value_dim
    return 2.0 * rows * (proj + conv) + float(rows) * rec


GDN = register_mixer(MixerKind(
    name="gdn", module=GatedDeltaNet, attr="linear_attn", options=OPTIONS, weights=_weights,
    sharding=(
        (r"(^|\.)linear_attn\.in_proj_[qkvzba]\.kernel$", ("embed", "heads")),
        (r"(^|\.)linear_attn\.conv_[qkv]$", ("heads", None, None)),
        (r"(^|\.)linear_attn\.(A_log|dt_bias)$", ("heads",)),
        (r"(^|\.)linear_attn\.out_proj\.kernel$", ("heads", "embed")),
    ),
    flops=_flops,
    state=lambda cfg, spec, batch, max_len, dtype: GDNState.zeros(batch, Dims.of(spec), dtype),
))
