"""Packed (padding-free) forward for Qwen3-style decoders with last-token pooling.

The sequences of a batch are concatenated into one stream of ``T`` tokens; attention stays causal within
each sequence through cumulative sequence lengths (``cu_seqlens``), so no token is ever computed for padding.
On CUDA, attention is the project's Triton kernel (``attention.py``: flash attention on packed tensors, GQA
native, measured 1.4x torch's varlen FlashAttention-2 on an H200), else ``torch.nn.attention.varlen.varlen_attn``;
elsewhere the pack is laid out padded for SDPA (for tests and CPU runs).

What is computed differs from the transformers forward in four ways, none of which changes the result beyond
rounding:
- the projections of each layer are fused: q/k/v as one GEMM and gate/up as one GEMM (the original module
  weights become views of the fused tensors, so no memory is duplicated);
- the last layer computes queries, attention output and MLP only at the pooled (last) positions;
- the residual stream is kept in float32 (``fp32_residual``, the default): each layer's bf16 output is added to
  it without rounding the sum back to bf16, as mixed-precision training computes it, so the vectors are closer
  to the float32 model's than a bf16 residual stream leaves them;
- with ``compile=True``, the work around attention (norms, projections, rope, MLP) is compiled by
  ``torch.compile`` with a dynamic token dimension (one graph for every pack length); attention runs
  eagerly between, so each pack's own lengths go to the kernel without recompiling. With the Triton attention
  kernel, the q/k norms and rope are a Triton kernel of their own too (``rotary.py``), in place in the
  projection's output.

Start-up: the token dimension is marked dynamic before the first call, so one compilation (``warmup``, a small
pack) makes the graph every pack uses, and compiled kernels are kept on disk between runs in
``caches.compile_cache_dir()`` (shared by every worker that sees the same folder).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model import attention, rotary
from pipeline.model.caches import use_compile_cache

log = logging.getLogger(__name__)

PACKED_TYPES = {"qwen3", "qwen2"}


def _dynamic_tokens(*tensors: torch.Tensor) -> None:
    """Mark dimension 0 (tokens) dynamic, so the first compilation is the one every pack length uses (without
    it, the first call compiles for its own length and the second compiles again)."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


def supports_packing(model) -> bool:
    """Whether ``model`` is a decoder this module can run packed: transformers' own Qwen2/Qwen3 ``AutoModel``
    (not a model folder's own code: gte-Qwen2 ships one), causal (a config's ``"is_causal": false`` makes
    transformers attend both ways; this forward is causal only), without rope scaling or sliding windows."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", "") not in PACKED_TYPES:
        return False
    if not type(model).__module__.startswith("transformers.models."):
        return False
    if getattr(cfg, "is_causal", True) is False or getattr(cfg, "use_bidirectional_attention", False):
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        return False
    if getattr(cfg, "use_sliding_window", False):
        return False
    return hasattr(model, "layers") and hasattr(model, "embed_tokens")


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Qwen3RMSNorm: statistics in float32, scaled in the weight's dtype (the input's
    for a bf16 stream; a float32 residual stream is normalised back to the compute dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(weight.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _project_qkv(x, ln_w, qkv_w, qkv_b, eps: float):
    """Norm and fused q/k/v projection: x (T, H) -> (T, (n_q + 2 n_kv) D), for ``rotary.qk_norm_rope_``."""
    return F.linear(_rms(x, ln_w, eps), qkv_w, qkv_b)


def _qk_norm_rotate(qkv, qn_w, kn_w, cos, sin, n_q: int, n_kv: int, head_dim: int, eps: float):
    """Per-head q/k norms and rope in torch (what ``rotary.qk_norm_rope_`` does as one kernel): qkv (T, ...) ->
    q (T, n_q, D), k/v (T, n_kv, D)."""
    q, k, v = qkv.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.view(-1, n_q, head_dim)
    k = k.view(-1, n_kv, head_dim)
    v = v.view(-1, n_kv, head_dim)
    if qn_w is not None:
        q = _rms(q, qn_w, eps)
        k = _rms(k, kn_w, eps)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate(q, c, s), _rotate(k, c, s), v


def _pre_attention(x, ln_w, qkv_w, qkv_b, qn_w, kn_w, cos, sin, n_q: int, n_kv: int, head_dim: int, eps: float):
    """Norm, fused q/k/v projection, per-head q/k norms and rope. x (T, H) -> q (T, n_q, D), k/v (T, n_kv, D)."""
    return _qk_norm_rotate(_project_qkv(x, ln_w, qkv_w, qkv_b, eps), qn_w, kn_w, cos, sin, n_q, n_kv, head_dim, eps)


def _pre_attention_padded(x, ln_w, qkv_w, qkv_b, qn_w, kn_w, cos, sin, gather, batch: int, length: int,
                          n_q: int, n_kv: int, head_dim: int, eps: float):
    """``_pre_attention``, then laid out as right-padded (B, heads, L, D) batches for SDPA. Padding rows copy
    some real row: with right padding and a causal mask no real query ever attends to them."""
    q, k, v = _pre_attention(x, ln_w, qkv_w, qkv_b, qn_w, kn_w, cos, sin, n_q, n_kv, head_dim, eps)

    def lay(t: torch.Tensor, heads: int) -> torch.Tensor:
        return t[gather].view(batch, length, heads, head_dim).transpose(1, 2)

    return lay(q, n_q), lay(k, n_kv), lay(v, n_kv)


def _post_attention_padded(x, attn, scatter, o_w, ln_w, gate_up_w, down_w, eps: float):
    """``_post_attention`` on the packed rows of a padded (B, heads, L, D) attention output."""
    b, h, length, d = attn.shape
    packed = attn.transpose(1, 2).reshape(b * length, h * d)[scatter]
    return _post_attention(x, packed, o_w, ln_w, gate_up_w, down_w, eps)


def _post_attention(x, attn, o_w, ln_w, gate_up_w, down_w, eps: float):
    """Output projection, residual, norm, fused SiLU MLP, residual. x (T, H), attn (T, n_q * D) -> (T, H)."""
    h = x + F.linear(attn, o_w)
    gate, up = F.linear(_rms(h, ln_w, eps), gate_up_w).chunk(2, dim=-1)
    return h + F.linear(F.silu(gate) * up, down_w)


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: torch.Tensor
    qkv_b: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qk_norm: torch.Tensor | None  # (2, D): q_norm's weight then k_norm's, for the rope kernel
    o: torch.Tensor
    ln2: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def _fuse(*linears, name: str = "weight") -> torch.Tensor | None:
    """Concatenate the weights (or biases) of several Linear layers along the output dimension and make each
    original tensor a view into the result (no extra memory once the old tensors are freed)."""
    if getattr(linears[0], name) is None:
        return None
    fused = torch.cat([getattr(lin, name).data for lin in linears], dim=0)
    start = 0
    for lin in linears:
        param = getattr(lin, name)
        param.data = fused[start : start + param.shape[0]]
        start += param.shape[0]
    return fused


class PackedDecoder:
    """Runs a Qwen3/Qwen2 ``AutoModel`` on packed sequences and returns last-token hidden states.

    Three attention kernels give the same result:

    - ``"triton"``: ``attention.causal_packed``, the project's flash-attention kernel on the packed tensors
      (CUDA with Triton; the fastest measured, see ``attention.py``);
    - ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` on the packed tensors (FlashAttention-2);
    - ``"sdpa"``: the pack is laid out as right-padded (B, heads, L, D) batches (sequences of a pack have
      similar lengths, since batches are cut from length-sorted windows, so little is padded) and run through
      ``scaled_dot_product_attention(is_causal=True)`` without a mask (right padding + causal: no real query
      sees a pad). Used where neither of the others runs (CPU, older torch). cuDNN attention was measured
      slower end to end: per-shape plans on an H100 (56k vs 72k tok/s, 4B), and on an H200 its ragged
      (packed) form rebuilt its plan on every call (4.9 TFLOP/s).

    Args:
        model: a loaded ``Qwen3Model`` (or ``Qwen2Model``), on its device and dtype, in eval mode.
        compile: compile the per-layer work around attention with ``torch.compile`` (CUDA only).
        kernel: ``"auto"`` (triton, else varlen on CUDA; sdpa elsewhere), ``"triton"``, ``"varlen"`` or ``"sdpa"``.
        fp32_residual: keep the residual stream in float32 (see the module docstring).
        all_dims_dynamic: compile every dimension as dynamic, not only the tokens' (measured slower; kept
            for the benchmark's lever table).
        earlier_tiles: run the attention kernel with the tiles used before 2026-12-01 (one query head per
            program, 64-row tiles in the last layer too; kept for the benchmark's A/B, ``bench.paths.CHANGES``,
            which uses ``variant``).
        compiled_rope: with the Triton kernel, run the q/k norms and rope in the compiled graph (Inductor's
            kernel, the path before ``rotary.qk_norm_rope_``; kept for the same A/B).
    """

    def __init__(self, model, *, compile: bool = False, kernel: str = "auto", fp32_residual: bool = True,
                 all_dims_dynamic: bool = False, earlier_tiles: bool = False, compiled_rope: bool = False) -> None:
        cfg = model.config
        self.model = model
        self.n_q = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.device = next(model.parameters()).device
        self.fp32_residual = fp32_residual
        self.layers = []
        for layer in model.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                ln1=layer.input_layernorm.weight,
                qkv=_fuse(att.q_proj, att.k_proj, att.v_proj),
                qkv_b=_fuse(att.q_proj, att.k_proj, att.v_proj, name="bias"),
                q_norm=att.q_norm.weight if hasattr(att, "q_norm") else None,
                k_norm=att.k_norm.weight if hasattr(att, "k_norm") else None,
                qk_norm=torch.stack([att.q_norm.weight, att.k_norm.weight]) if hasattr(att, "q_norm") else None,
                o=att.o_proj.weight,
                ln2=layer.post_attention_layernorm.weight,
                gate_up=_fuse(mlp.gate_proj, mlp.up_proj),
                down=mlp.down_proj.weight,
            ))
        on_cuda = self.device.type == "cuda"
        dtype = next(model.parameters()).dtype
        can = {
            "triton": attention.available() and attention.supports_head_dim(self.head_dim)
            and ((on_cuda and dtype in (torch.bfloat16, torch.float16)) or attention.interpreted()),
            "varlen": on_cuda and _varlen() is not None,
            "sdpa": True,
        }
        if kernel == "auto":  # Triton's CPU interpreter (tests) only when asked for by name
            kernel = next(k for k in ("triton", "varlen", "sdpa") if can[k] and (on_cuda or k == "sdpa"))
        if kernel not in can:
            raise ValueError(f"unknown attention kernel {kernel!r} (triton, varlen, sdpa)")
        if not can[kernel]:
            need = {"triton": "CUDA, Triton and bf16/fp16 weights", "varlen": "CUDA and torch >= 2.10"}[kernel]
            raise ValueError(f"the {kernel} attention kernel needs {need}")
        self.kernel = kernel
        self._set_tiles(earlier_tiles)
        # q/k norms and rope by the project's kernel wherever its attention kernel runs (same requirements)
        self.rope_kernel = kernel == "triton" and not compiled_rope
        fns = {"pre": _pre_attention, "project": _project_qkv, "post": _post_attention,
               "pre_pad": _pre_attention_padded, "post_pad": _post_attention_padded}
        self.compiled = bool(compile and on_cuda)
        if self.compiled:
            # One graph serves every pack length (packs need no padding to fixed sizes): the token dimension is
            # marked dynamic before the first call (``_dynamic_tokens``), so the first compilation is the one
            # every later pack uses. Only that dimension: with all dimensions dynamic (``dynamic=True``) the
            # generated kernels know no hidden size, and on an H200 the model ran 6% (4B) and 10% (0.6B) slower.
            use_compile_cache()
            fns = {k: torch.compile(f, dynamic=True if all_dims_dynamic else None) for k, f in fns.items()}
        self.pre, self.project, self.post = fns["pre"], fns["project"], fns["post"]
        self.pre_pad, self.post_pad = fns["pre_pad"], fns["post_pad"]
        log.info("packed forward: %s attention%s%s%s", self.kernel, ", q/k rope kernel" if self.rope_kernel else "",
                 ", compiled" if self.compiled else "", ", float32 residual" if fp32_residual else "")

    def _set_tiles(self, earlier: bool) -> None:
        group = self.n_q // self.n_kv
        self._tiles = attention.tiles(group, fold=1 if earlier else None)
        self._last_tiles = self._tiles if earlier else attention.tiles(group, last=True)

    def variant(self, *, earlier_tiles: bool = False, compiled_rope: bool = False) -> PackedDecoder:
        """This decoder with other attention tiles or without the rope kernel, sharing its fused weights and
        compiled graphs (an A/B in one process without a second copy of the weights)."""
        other = copy.copy(self)
        other._set_tiles(earlier_tiles)
        other.rope_kernel = self.rope_kernel and not compiled_rope
        return other

    def warmup(self, lengths: tuple[int, ...] = (200, 61, 1)) -> float:
        """Run one small pack through the forward, so that the compiled graphs and the attention kernel are built
        (or read from the compile cache) before real work starts; every later pack reuses them.

        Returns:
            Seconds it took (compilation included), after a device synchronisation.
        """
        t0 = time.perf_counter()
        lens = np.asarray(lengths, dtype=np.int64)
        positions, cu = pack_arrays(lens)
        vocab = int(self.model.embed_tokens.weight.shape[0])
        ids = torch.arange(int(cu[-1]), device=self.device, dtype=torch.long) * 7919 % vocab
        layout = tuple(torch.from_numpy(a).to(self.device) for a in self.host_layout(lens))
        self.forward(ids, torch.from_numpy(positions).to(self.device), torch.from_numpy(cu).to(self.device),
                     int(lens.max()), layout)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def warm_products(self, max_tokens: int) -> int:
        """Run a layer's matrix products (and the rotary embedding's) once at row counts from 1 to ``max_tokens``,
        ~2% apart (``spaced_counts``), on CUDA; elsewhere nothing.

        In a fresh process, a pack whose products have row counts unlike any run before makes the host wait for
        the device inside the product (cuBLAS), so the device idles between packs until the process has run
        packs of most sizes: the command's first shards ran at 0.75-0.93 of its later rate (0.6B on an H200).
        After this, the packs of a first pass are queued ahead of the device as later ones are
        (``data/benchmarks/h200-probe-prewarm-2026-12-01.txt``). The values computed are thrown away.

        Returns:
            The number of row counts run: fewer where the device ran out of memory (a token budget the forward
            itself only meets by splitting packs); the rest is left undone, with a warning.
        """
        if self.device.type != "cuda":
            return 0
        ly = self.layers[0]
        products = ((ly.qkv, ly.qkv_b), (ly.o, None), (ly.gate_up, None), (ly.down, None))
        widest = max(w.shape[1] for w, _ in products)
        counts = spaced_counts(max_tokens)
        done = 0
        try:
            rows = torch.zeros(max_tokens * widest, device=self.device, dtype=ly.qkv.dtype)
            positions = torch.arange(max_tokens, device=self.device)[None]
            with torch.inference_mode(), torch.cuda.device(self.device):
                for m in counts:
                    for w, b in products:  # each with a contiguous (m, in) input, as the forward's are
                        F.linear(rows[: m * w.shape[1]].view(m, w.shape[1]), w, b)
                    self.model.rotary_emb(rows[:1], positions[:, :m])
                    done += 1
                torch.cuda.synchronize(self.device)
        except torch.OutOfMemoryError:
            rows = positions = None
            torch.cuda.empty_cache()
            log.warning("product warm-up stopped at %d rows (%d of %d row counts run): out of device memory; the "
                        "first packs may run slower", counts[min(done, len(counts) - 1)], done, len(counts))
        return done

    def host_layout(self, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
        """What the kernel needs to know of a pack besides its cumulative lengths, computed on the host: the
        padded layout (sdpa) or the query-block tables of the causal layers and of the last layer (triton)."""
        if self.kernel == "sdpa":
            return padded_layout(lengths)
        if self.kernel == "triton":
            ones = np.ones(len(lengths), dtype=np.int64)  # the last layer: one query, one block per sequence
            return (attention.block_table(lengths, self._tiles["block_m"]),
                    attention.block_table(ones, self._last_tiles["block_m"]))
        return ()

    # -------------------------------------------------------------------------------------------- attention

    def _attention(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, blocks=None, last: bool = False
                   ) -> torch.Tensor:
        """Causal attention within each sequence: q (Tq, n_q, D), k/v (Tk, n_kv, D) -> (Tq, n_q, D). With fewer
        queries than keys (``max_q == 1``: one per sequence), each query is its sequence's last position."""
        if self.kernel == "triton":
            # the tiles ``blocks`` was made for (host_layout): the last layer's, or the causal layers'
            return attention.causal_packed(q, k, v, cu_q, cu_k, blocks, self.scale,
                                           **(self._last_tiles if last else self._tiles))
        return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, self.scale)

    def _heads(self, x, ly: _Layer, cos, sin):
        """q (T, n_q, D), k and v (T, n_kv, D) of a layer: normed, projected, q/k normed and rotated."""
        if self.rope_kernel:
            qkv = self.project(x, ly.ln1, ly.qkv, ly.qkv_b, self.eps)
            return rotary.qk_norm_rope_(qkv, ly.qk_norm, cos, sin, self.n_q, self.n_kv, self.head_dim, self.eps)
        return self.pre(x, ly.ln1, ly.qkv, ly.qkv_b, ly.q_norm, ly.k_norm, cos, sin, self.n_q, self.n_kv,
                        self.head_dim, self.eps)

    # ---------------------------------------------------------------------------------------------- forward

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor, max_len: int,
                layout: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """Hidden states after the final norm at the last token of every packed sequence.

        Args:
            ids: int (T,), the packed token ids, on the model's device.
            positions: int (T,), position of each token within its own sequence.
            cu: int32 (n + 1,), cumulative sequence lengths, ``cu[-1] == T``.
            max_len: the longest sequence of the pack.
            layout: ``host_layout(lengths)``, on the device.

        Returns:
            (n, hidden), float32 with the float32 residual stream, else the model's dtype.
        """
        if self.kernel == "sdpa":
            if len(layout) != 3:
                raise ValueError("the sdpa kernel needs the padded layout of the pack (host_layout)")
            return self._forward_padded(ids, positions, layout, len(cu) - 1, max_len)
        if self.device.type == "cuda":
            # Triton launches its kernels on the current device: make it the model's (``--device cuda:1``)
            with torch.cuda.device(self.device):
                return self._forward_packed(ids, positions, cu, max_len, layout)
        return self._forward_packed(ids, positions, cu, max_len, layout)

    def _forward_packed(self, ids, positions, cu, max_len: int, layout) -> torch.Tensor:
        blocks, last_blocks = layout if self.kernel == "triton" else (None, None)
        m = self.model
        x = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(x, positions.unsqueeze(0))
        cos, sin = cos[0], sin[0]
        if self.fp32_residual:
            x = x.float()
        last = (cu[1:] - 1).long()
        n = len(last)
        *body, final = self.layers
        if self.compiled:
            _dynamic_tokens(x, cos, sin)
        for ly in body:
            q, k, v = self._heads(x, ly, cos, sin)
            a = self._attention(q, k, v, cu, cu, max_len, max_len, blocks)
            a = a.reshape(a.shape[0], -1)
            if self.compiled:
                _dynamic_tokens(a)
            x = self.post(x, a, ly.o, ly.ln2, ly.gate_up, ly.down, self.eps)
        q, k, v = self._heads(x, final, cos, sin)
        # the last layer only at each sequence's last position: one query per sequence, over all its keys
        cu_last = torch.arange(n + 1, device=cu.device, dtype=cu.dtype)
        a = self._attention(q[last].contiguous(), k, v, cu_last, cu, 1, max_len, last_blocks, last=True)
        h = _post_attention(x[last], a.reshape(n, -1), final.o, final.ln2, final.gate_up, final.down, self.eps)
        return m.norm(h)

    def _forward_padded(self, ids, positions, layout, n: int, length: int) -> torch.Tensor:
        gather, scatter, key_mask = layout
        m = self.model
        x = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(x, positions.unsqueeze(0))
        cos, sin = cos[0], sin[0]
        if self.fp32_residual:
            x = x.float()
        *body, final = self.layers
        args = (self.n_q, self.n_kv, self.head_dim, self.eps)
        for ly in body:
            q, k, v = self.pre_pad(x, ly.ln1, ly.qkv, ly.qkv_b, ly.q_norm, ly.k_norm, cos, sin, gather, n, length,
                                   *args)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            x = self.post_pad(x, a, scatter, ly.o, ly.ln2, ly.gate_up, ly.down, self.eps)
        q, k, v = self.pre_pad(x, final.ln1, final.qkv, final.qkv_b, final.q_norm, final.k_norm, cos, sin, gather,
                               n, length, *args)
        # Last layer: only each sequence's last query, over its own keys (a key mask instead of causality).
        lengths = key_mask.sum(-1)
        rows = torch.arange(n, device=q.device)
        q_last = q[rows, :, lengths - 1].unsqueeze(2)
        a = F.scaled_dot_product_attention(q_last, k, v, attn_mask=key_mask[:, None, None, :], scale=self.scale,
                                           enable_gqa=True)
        x_last = x[(torch.cumsum(lengths, 0) - 1)]
        h = _post_attention(x_last, a.reshape(n, -1), final.o, final.ln2, final.gate_up, final.down, self.eps)
        return m.norm(h)


def varlen_attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn``, causal (``max_q == 1``: one query per sequence, its last
    position, which sees every key: no mask), grouped kv heads, through whichever signature this torch has."""
    params = _varlen_params()
    kwargs: dict = {"scale": scale}
    causal = max_q != 1
    if "window_size" in params:  # torch >= 2.11; 2.10 takes is_causal
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return _varlen()(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


@functools.cache
def _varlen_params() -> frozenset[str]:
    return frozenset(inspect.signature(_varlen()).parameters)


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def padded_layout(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index maps between a pack (T rows) and its right-padded layout (n x L rows, L the longest).

    Returns:
        ``gather`` int64 (n * L,): the packed row each padded slot reads (padding slots repeat a real row),
        ``scatter`` int64 (T,): the padded slot of each packed row, ``key_mask`` bool (n, L): real slots.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n, longest = len(lengths), int(lengths.max())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(longest, dtype=np.int64)[None, :]
    key_mask = pos < lengths[:, None]
    gather = np.where(key_mask, starts[:, None] + pos, starts[:, None]).reshape(-1)
    scatter = (np.arange(n, dtype=np.int64)[:, None] * longest + pos)[key_mask]
    return gather, scatter, key_mask


def spaced_counts(top: int, ratio: float = 1.02) -> list[int]:
    """Whole numbers from 1 to ``top`` (included), each at least ``ratio`` times the one before: every number
    while steps of 1 are wider than that, then about ``ratio - 1`` apart (413 numbers up to 65,536)."""
    counts, m = [], 1.0
    while m < top:
        counts.append(int(m))
        m = max(m * ratio, int(m) + 1)
    return counts + [top]


def pack_arrays(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions and cumulative lengths of sequences packed back to back.

    Returns:
        ``(positions int64 (T,), cu_seqlens int32 (n + 1,))``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    starts = np.repeat(cu[:-1].astype(np.int64), lengths)
    positions = np.arange(int(cu[-1]), dtype=np.int64) - starts
    return positions, cu
