"""Kernel self-check: what ``attention_impl=auto`` does before a Pallas kernel's first real use.

The kernels were written to the documented Mosaic / Triton constraints and tested in interpret
mode; a device kind, jax or libtpu version they never ran on may refuse them or compute
something else, and a user's first run should not be where that is found out. So, under
``auto``, the first use of a kernel on a device kind (for one head layout and dtype) runs it
once against its jnp reference on small random inputs on that device; if it raises or disagrees,
``auto`` uses the reference for the rest of the process and says so in one line on stderr.
``pallas`` forces the kernel (no check); on CPU ``auto`` is the reference and nothing runs.

Outcomes are kept per process, and on disk in ``$DFLASH_CACHE/kernel_selfcheck.json``
(default ``~/.cache/dflash``), keyed by the op, the head layout and dtypes, the device kind and
the jax, backend and kernel-source versions, so an upgrade checks again. The check runs in a
thread of its own: it is asked for while a model is being traced, and a fresh thread has no
trace, so the check executes on the device instead of being staged into the caller's program.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dflash.kernels.anchor_attention import reference_anchor_block_attention
from dflash.kernels.prefill_attention import reference_prefill_attention
from dflash.kernels.verify_attention import reference_verify_attention

TOLERANCE = {"float32": 2e-3, "bfloat16": 2e-2}  # abs and rel; GPU float32 dots may run as TF32
SLOTS = 600  # cache / context positions of the check: two TPU tiles (the second partial), many GPU ones
VERIFY_BLOCKS = (1, 5, 16, 128)  # verify blocks checked at once: decode, odd, a draft block, the largest

_RESULTS: dict[str, bool] = {}  # key -> the kernel passed (this process)
_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a kernel call looks like, as far as compiling it goes: heads, head dim, block rows
    (anchor: block size Q; verify and prefill: 0, their checks cover every length they take),
    the query / key dtypes, and the attention layer's options (verify and prefill: a sliding
    window, 0: none; attention sinks or not): each form is a different kernel."""

    heads: int
    kv_heads: int
    head_dim: int
    rows: int
    q_dtype: str
    kv_dtype: str
    window: int = 0
    sinks: bool = False


def device_backend() -> str:
    """The backend programs execute on here (``dflash.kernels.common.platform`` may say otherwise
    while an ahead-of-time plan compiles for a TPU on a CPU host: nothing to run then)."""
    return jax.default_backend()


def passes(op: str, kernel: Callable[..., jax.Array], layout: Layout) -> bool:
    """Whether ``kernel`` (the Pallas ``op``) may serve ``auto`` on this device for ``layout``:
    checked once per process and key (and remembered on disk); a failure is said in one line."""
    if device_backend() not in ("tpu", "gpu"):
        return True  # compiling ahead of time for another platform: nothing here can run it
    key = _key(op, layout)
    with _LOCK:
        if key in _RESULTS:
            return _RESULTS[key]
        stored = _load_disk().get(key)
        problem = stored["problem"] if stored is not None else _run_in_thread(op, kernel, layout)
        if stored is None:
            _store_disk(key, problem)
        _RESULTS[key] = problem is None
    if problem is not None:
        kind = jax.devices()[0].device_kind
        print(f"dflash: the Pallas {op} kernel failed its self-check on {kind} ({_describe(layout)}: "
              f"{problem}){' [cached]' if stored is not None else ''}; attention_impl=auto uses the jnp "
              "reference instead (--attention-impl pallas forces the kernel)", file=sys.stderr, flush=True)
    return problem is None


def clear() -> None:
    """Forgets this process's outcomes (tests; the disk cache is left alone)."""
    with _LOCK:
        _RESULTS.clear()


def check(op: str, kernel: Callable[..., jax.Array], layout: Layout, *,
          interpret: bool = False) -> str | None:
    """Runs ``kernel`` and its reference on small random inputs of ``layout``: None when they
    agree within ``TOLERANCE``, else what went wrong (the error, or the largest difference)."""
    tol = TOLERANCE.get(layout.q_dtype, TOLERANCE["bfloat16"])
    options = {"window": layout.window} if op in ("verify_attention", "prefill_attention") else {}
    for args in _cases(op, layout):
        try:
            got = jax.jit(lambda *a: kernel(*a, **options, interpret=interpret))(*args)
            want = jax.jit(lambda *a: REFERENCES[op](*a, **options))(*args)
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        except Exception as err:  # the point: whatever the compiler or runtime raises
            return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
        shape = f"q {list(args[0].shape)}"
        if got.shape != want.shape:
            return f"{shape}: output shape {got.shape}, reference {want.shape}"
        if not np.all(np.isfinite(got)):
            return f"{shape}: {int(np.sum(~np.isfinite(got)))} non-finite outputs"
        if not np.allclose(got, want, atol=tol, rtol=tol):
            return f"{shape}: max abs difference {float(np.max(np.abs(got - want))):.3g} > {tol}"
    return None


REFERENCES: dict[str, Callable[..., jax.Array]] = {
    "verify_attention": reference_verify_attention,
    "anchor_block_attention": reference_anchor_block_attention,
    "prefill_attention": reference_prefill_attention,
}


def _cases(op: str, lay: Layout) -> list[tuple[jax.Array, ...]]:
    """Small random inputs of the op at ``lay``'s head layout: two rows, one with an empty prefix
    and one whose prefix ends off the tile grid (every query sees at least itself); for verify
    one case per block length of ``VERIFY_BLOCKS``. With sinks, random ones (std 3) follow the
    op's arguments (the window is the caller's keyword)."""
    if op == "verify_attention":
        return [_inputs(op, dataclasses.replace(lay, rows=t)) for t in VERIFY_BLOCKS]
    return [_inputs(op, lay)]


def _inputs(op: str, lay: Layout) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(0)
    n, kh, h, s = lay.heads, lay.kv_heads, lay.head_dim, SLOTS

    def normal(shape: tuple[int, ...], dtype: str) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape), dtype)

    sinks = (normal((n,), "float32") * 3,) if lay.sinks else ()

    if op == "verify_attention":
        t = lay.rows
        q = normal((2, t, n, h), lay.q_dtype)  # [B, T, N, H]
        k, v = normal((2, s, kh, h), lay.kv_dtype), normal((2, s, kh, h), lay.kv_dtype)  # [B, S, K, H]
        lengths = jnp.asarray([0, s - t - 5], jnp.int32)
        return q, k, v, lengths, jnp.tril(jnp.ones((t, t), bool)), *sinks
    if op == "anchor_block_attention":
        a, qn = 3, lay.rows
        q = normal((2, a, qn, n, h), lay.q_dtype)  # [B, A, Q, N, H]
        kc, vc = normal((2, s, kh, h), lay.kv_dtype), normal((2, s, kh, h), lay.kv_dtype)  # [B, S, K, H]
        kb, vb = normal((2, a, qn, kh, h), lay.q_dtype), normal((2, a, qn, kh, h), lay.q_dtype)
        anchors = jnp.asarray([[0, 37, 300], [5, 517, s]], jnp.int32)  # [B, A]: none, some, all of it
        return q, kc, vc, kb, vb, jnp.arange(s)[None, None] < anchors[..., None]  # mask [B, A, S]
    if op == "prefill_attention":
        q = normal((2, s, n, h), lay.q_dtype)  # [B, S, N, H]
        k, v = normal((2, s, kh, h), lay.kv_dtype), normal((2, s, kh, h), lay.kv_dtype)
        segments = jnp.asarray([np.zeros(s), np.arange(s) >= 333], jnp.int32)  # [B, S]: one doc, two
        return q, k, v, segments, *sinks
    raise ValueError(f"no self-check for {op!r}")


def _run_in_thread(op: str, kernel: Callable[..., jax.Array], layout: Layout) -> str | None:
    out: list[str | None] = []
    worker = threading.Thread(target=lambda: out.append(check(op, kernel, layout)), name=f"dflash-check-{op}")
    worker.start()
    worker.join()
    return out[0] if out else "the self-check thread died"


def _key(op: str, lay: Layout) -> str:
    device = jax.devices()[0]
    backend = (getattr(device.client, "platform_version", "") or "unknown").splitlines()[0]
    versions = f"jax {jax.__version__}, {backend}, kernels {_source()}"
    return f"{op} | {_describe(lay)} | {device.platform} {device.device_kind} | {versions}"


def _describe(lay: Layout) -> str:
    dtypes = lay.q_dtype if lay.q_dtype == lay.kv_dtype else f"{lay.q_dtype}/{lay.kv_dtype}"
    rows = f", block {lay.rows}" if lay.rows else ""
    options = (f", window {lay.window}" if lay.window else "") + (", sinks" if lay.sinks else "")
    return f"heads {lay.heads}/{lay.kv_heads} x {lay.head_dim}{rows}, {dtypes}{options}"


@functools.cache
def _source() -> str:
    """A digest of the kernels' source files: edited kernels are checked again."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _disk_path() -> Path:
    return Path(os.environ.get("DFLASH_CACHE", "~/.cache/dflash")).expanduser() / "kernel_selfcheck.json"


def _load_disk() -> dict[str, Any]:
    try:
        return json.loads(_disk_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_disk(key: str, problem: str | None) -> None:
    """Adds one outcome to the disk cache (atomically; an unwritable cache is only not kept)."""
    path = _disk_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**_load_disk(), key: {"problem": problem}}, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass
