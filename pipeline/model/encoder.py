"""Encoder: load a model, find how it pools and frames its inputs, and turn token batches into vectors.

Pooling comes from the model's sentence-transformers files (``modules.json`` -> ``1_Pooling/config.json``)
where present, else from its type (decoder models such as Qwen3 pool the last token, encoders mean-pool).
The forward pass is padded on the right with an attention mask: for causal models the last real token never
sees the padding after it, and for bidirectional models the mask hides it. Vectors are pooled in float32,
cut to ``dims`` (Matryoshka), and L2-normalised; a non-finite vector raises instead of being written.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import EncodeError, PipelineError
from pipeline.model.identity import own_weights
from pipeline.model.stfiles import Head, lowercase_first, st_files
from pipeline.model.tokens import Encoded, SequenceFormat, TextTokenizer

log = logging.getLogger(__name__)

QWEN_EOS = "<|endoftext|>"
DECODER_TYPES = {"qwen2", "qwen3", "qwen3_moe", "mistral", "llama", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3"}
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384, "packed": 32768}
# Packed batches of small models (hidden size up to this) get twice the packed budget: the benchmarks of the
# 0.6B model ran at 64K tokens, so the default is the setting that was measured. The speed is the same at 32K
# (H200, 2026-11-30: 419,602 vs 419,286 tok/s, model alone) and its peak memory at 64K is 4.4 GiB.
SMALL_HIDDEN = 1024


def default_batch_tokens(path: str, device: str, hidden_size: int) -> int:
    """The token budget per forward when none is given: ``path`` is the forward path (``packed``/``padded``)."""
    if path == "packed":
        return DEFAULT_BATCH_TOKENS["packed"] * (2 if hidden_size <= SMALL_HIDDEN else 1)
    return DEFAULT_BATCH_TOKENS["cuda" if device.startswith("cuda") else "cpu"]


def format_instruction(instruction: str) -> str:
    """The Qwen3-Embedding query prompt for a task instruction (no space after ``Query:``)."""
    return f"Instruct: {instruction}\nQuery:"


def check_prompt(info: ModelInfo, prompt: str) -> None:
    """Refuse to frame text with ``prompt`` for a model whose pooling leaves the prompt's tokens out
    (sentence-transformers' ``include_prompt: false``): this forward would pool them in, other vectors than the
    model's. Last-token pooling never sees the prompt anyway.

    Raises:
        PipelineError: a non-empty prompt with such a model.
    """
    if prompt and not info.include_prompt and info.pooling != "lasttoken":
        raise PipelineError(f"{info.path}: this model's pooling leaves the prompt's tokens out (include_prompt: "
                            f"false), which embed-corpus does not compute; its {info.pooling} pooling would take the "
                            f"prompt {prompt!r} in")


def resolve_model_path(model: str) -> str:
    """``pkg:PACKAGE/sub/path`` -> a folder inside an installed Python package; other values pass through
    (a local folder, or a hub id that transformers downloads as usual)."""
    if not model.startswith("pkg:"):
        return model
    package, _, sub = model[4:].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"model {model!r}: Python package {package!r} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise PipelineError(f"model {model!r}: {path} does not exist")
    return str(path)


@dataclass(frozen=True)
class ModelOptions:
    """How to load a model and frame its inputs, as plain values (a job's settings, or a query side's).

    ``device`` None: CUDA where present; ``compute_dtype`` auto: bfloat16 on GPU, float32 on CPU; ``pooling`` auto:
    from the model's sentence-transformers files or its type; ``max_length`` None: the model's limit; ``dims``
    None: the model's size; ``batch_tokens`` None: ``default_batch_tokens`` of the forward path; ``attention``
    auto: packed for Qwen on CUDA; ``compile`` None: on for CUDA.
    """

    model: str
    device: str | None = None
    compute_dtype: str = "auto"
    pooling: str = "auto"
    max_length: int | None = None
    dims: int | None = None
    normalize: bool = True
    instruction: str | None = None
    prompt_name: str | None = None
    long_docs: str = "truncate"
    chunk_tokens: int = 512
    chunk_overlap: int = 0
    batch_tokens: int | None = None
    attention: str = "auto"
    compile: bool | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """What a job recorded about its model, so queries can later be embedded exactly the same way."""

    model: str
    path: str
    model_type: str
    hidden_size: int
    dims: int
    pooling: str
    normalize: bool
    max_length: int
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    prompt: str
    prompts: dict[str, str]
    compute_dtype: str
    width: int  # the vectors' size before the Matryoshka cut: hidden_size, or the last Dense module's output
    head: tuple[str, ...] = ()  # the sentence-transformers modules after the pooling ("2_Dense: 768 -> 3072, Tanh")
    include_prompt: bool = True  # False: the model's pooling leaves the prompt's tokens out (not computed here)
    lowercase: bool = False  # texts lowercased before the tokenizer (sentence-transformers' do_lower_case)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def output_width(model: str, hidden: int) -> int:
    """The size of a model's vectors before any Matryoshka cut, from its files alone: ``hidden``, or its last
    sentence-transformers Dense module's output (a local folder's; a hub model's are read at load)."""
    path = Path(resolve_model_path(model))
    if not path.is_dir():
        return hidden
    head = Head.load(st_files(str(path), computed_here=False).head, hidden, None)
    return head.width if head.steps else hidden


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def import_generation_code_lazily() -> None:
    """Import transformers' assisted-decoding code with its scikit-learn import put off until it is used.

    transformers 5.17 (the H200 image's) imports ``sklearn.metrics.roc_curve`` at the top of
    ``generation.candidate_generator``, which every model class imports: 3.6 s of a worker's start-up there, for
    a function of assisted decoding that embedding never calls (later releases import it inside that function).
    Here that module is imported while transformers' check says scikit-learn is absent; then the check is
    given back, and ``roc_curve`` becomes a stand-in that imports scikit-learn's on its first call. Nothing
    changes but when scikit-learn is imported. Does nothing once that module is imported, or where transformers
    has no such module or check.
    """
    import sys

    if "transformers.generation.candidate_generator" in sys.modules:
        return
    import transformers.utils as hf_utils

    available = getattr(hf_utils, "is_sklearn_available", None)
    if available is None:  # a transformers without that check: nothing to put off
        return
    hf_utils.is_sklearn_available = lambda: False
    try:
        from transformers.generation import candidate_generator
    except ImportError:  # a transformers without that module: its model classes do not import it either
        return
    finally:
        hf_utils.is_sklearn_available = available
    candidate_generator.is_sklearn_available = available
    if available() and not hasattr(candidate_generator, "roc_curve"):

        def roc_curve(*args, **kwargs):
            from sklearn.metrics import roc_curve as sklearn_roc_curve

            return sklearn_roc_curve(*args, **kwargs)

        candidate_generator.roc_curve = roc_curve


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """A model, its tokenizer and its framing: text in, vectors out.

    Use ``Embedder.load(...)`` (or ``from_loaded`` with a model already in memory); ``embed_texts`` for a
    list of strings, ``embed_encoded`` for tokenized input.

    Two forward paths give the same vectors: ``padded`` (right padding, attention mask, transformers SDPA;
    any model) and ``packed`` (padding-free varlen attention, Qwen2/Qwen3 with last-token pooling; see
    ``packed.py``). ``attention="auto"`` takes packed on CUDA where the model allows it.
    """

    def __init__(self, model, tokenizer: TextTokenizer, info: ModelInfo, device: str, batch_tokens: int,
                 *, pad_id: int = 0, packed=None, head: Head | None = None) -> None:
        self.model = model
        self.head = head or Head(())
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.batch_tokens = batch_tokens
        self.pad_id = pad_id
        self.packed = packed
        # The benchmark's lever for what waiting on the device after every batch costs (the old behaviour).
        self.sync_each_batch = False
        self._staging = HostStaging()

    @property
    def attention(self) -> str:
        return "packed" if self.packed is not None else "padded"

    @classmethod
    def from_options(cls, opts: ModelOptions) -> Embedder:
        """Load ``opts.model`` with the framing and forward path ``opts`` describe (see ``load``)."""
        return cls.load(**asdict(opts))

    @classmethod
    def load(cls, model: str, *, device: str | None = None, compute_dtype: str = "auto",
             trust_remote_code: bool = False, **options: Any) -> Embedder:
        """Load a model and its tokenizer through transformers (a local folder, ``pkg:``, or a hub id), then
        ``from_loaded``. ``options`` are those of ``from_loaded``.

        On CUDA the weights go from the checkpoint straight to the GPU in the compute dtype (where ``accelerate``
        is installed: transformers needs it for that; else through host memory), and a compiled packed forward
        is warmed up (compiled, or read from the compile cache) before this returns, so a run's first shard
        does not pay for it.

        Raises:
            PipelineError: the model cannot be loaded, or an option does not fit it.
        """
        import time

        from pipeline.util import process_age

        steps: dict[str, float] = {}
        mark = time.perf_counter()

        def step(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            steps[name] = now - mark
            mark = now

        import torch

        import_generation_code_lazily()  # before anything imports transformers' model classes (AutoModel does)
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        step("import torch")
        hf_logging.disable_progress_bar()  # our own progress bar is the one to watch
        path = resolve_model_path(model)
        device = device or default_device()
        if compute_dtype == "auto":
            compute_dtype = "float32" if device == "cpu" else "bfloat16"
        if device.startswith("cuda"):
            torch.empty(0, device=device)  # the CUDA context, timed on its own
            step("CUDA context")
        direct = device.startswith("cuda") and importlib.util.find_spec("accelerate") is not None
        try:
            hf_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            step("tokenizer")
            net = AutoModel.from_pretrained(
                path, dtype=_torch_dtype(compute_dtype), trust_remote_code=trust_remote_code,
                attn_implementation="sdpa", **({"device_map": device} if direct else {}),
            )
        except (OSError, ValueError) as exc:
            raise PipelineError(f"model {model!r}: cannot load ({exc})") from exc
        net.eval().to(torch.device(device))
        own_weights(net)
        step("weights")
        log.info("model %s loaded in %.1fs (%s)", model, steps["tokenizer"] + steps["weights"],
                 "straight to the device" if direct else "through host memory")
        emb = cls.from_loaded(net, hf_tok, model=model, path=path, device=device, **options)
        step("forward built")
        if emb.packed is not None and emb.packed.compiled:
            log.info("compiled forward warmed up in %.1fs", emb.packed.warmup())
            step("warm-up")
            emb.packed.warm_products(emb.batch_tokens)
            step("products")
        age = process_age()
        log.info("model start-up: %s%s", ", ".join(f"{k} {v:.1f}s" for k, v in steps.items()),
                 f"; {age:.1f}s after the process started" if age is not None else "")
        return emb

    @classmethod
    def from_loaded(
        cls,
        net,
        hf_tok,
        *,
        model: str,
        path: str,
        device: str,
        pooling: str = "auto",
        max_length: int | None = None,
        dims: int | None = None,
        normalize: bool = True,
        instruction: str | None = None,
        prompt_name: str | None = None,
        long_docs: str = "truncate",
        chunk_tokens: int = 512,
        chunk_overlap: int = 0,
        batch_tokens: int | None = None,
        attention: str = "auto",
        compile: bool | None = None,
        packed_options: dict[str, Any] | None = None,
        framing_only: bool = False,
    ) -> Embedder:
        """Work out pooling, framing and prompts for a model already in memory (on ``device``, in eval mode).

        ``path`` is where its sentence-transformers files (pooling, prompts, max length) are looked up;
        ``packed_options`` go to ``PackedDecoder`` (``kernel``, ``fp32_residual``, ``all_dims_dynamic``,
        ``earlier_tiles``). ``framing_only``: only the tokenizer and framing will be used (a server embeds), so
        sentence-transformers modules this forward does not compute are no reason to refuse the model.
        """
        from pipeline.model.packed import PackedDecoder, supports_packing

        config = net.config
        compute_dtype = str(next(net.parameters()).dtype).removeprefix("torch.")
        st = st_files(path, computed_here=not framing_only)
        st_pooling, st_config, bert_config = st.pooling, st.config, st.bert_config
        model_type = getattr(config, "model_type", "")
        is_decoder = model_type in DECODER_TYPES or bool(getattr(config, "is_decoder", False))
        if pooling == "auto":
            pooling = st_pooling or ("lasttoken" if is_decoder else "mean")
            if not st_pooling:  # a guess from the architecture: the wrong one gives other vectors, no error
                log.warning("model %s names no pooling (no sentence-transformers Pooling config): %s pooling, as for "
                            "a %s; pass --pooling if its card says otherwise", model, pooling,
                            "decoder" if is_decoder else "bidirectional encoder")
        hidden = int(config.hidden_size)
        modules = st.head
        while normalize and modules and modules[-1][0] == "normalize":  # the final normalisation after the cut
            modules = modules[:-1]  # gives what normalising before it would (sentence-transformers' own order)
        head = Head.load(modules, hidden, None if framing_only else device)
        width = head.width if head.steps else hidden
        if dims is not None and dims > width:
            raise PipelineError(f"dims: {dims} is larger than the model's {width} dimensions")
        max_length = _max_length(config, hf_tok, bert_config, max_length)
        hf_tok.model_max_length = 1 << 30  # we truncate ourselves; silence the tokenizer's length warning
        lowercase = bool(bert_config.get("do_lower_case"))
        if lowercase:
            lowercase_first(hf_tok)
        fmt = _sequence_format(hf_tok, model_type, max_length)
        prompts = dict(st_config.get("prompts") or {})
        if instruction is not None:
            prompt = format_instruction(instruction)
        elif prompt_name is not None:
            if prompt_name not in prompts:
                known = ", ".join(prompts) or "none"
                raise PipelineError(f"prompt_name: the model defines no prompt {prompt_name!r} (it has: {known})")
            prompt = prompts[prompt_name]
        else:
            default = st_config.get("default_prompt_name")
            prompt = prompts.get(default, "") if default else ""
        tok = TextTokenizer(hf_tok, fmt, prompt=prompt, long_docs=long_docs, chunk_tokens=chunk_tokens,
                            chunk_overlap=chunk_overlap)
        info = ModelInfo(
            model=model, path=path, model_type=model_type, hidden_size=hidden, dims=dims or width,
            pooling=pooling, normalize=normalize, max_length=max_length, prefix=fmt.prefix, suffix=fmt.suffix,
            prompt=prompt, prompts=prompts, compute_dtype=compute_dtype, width=width, head=head.described,
            include_prompt=st.include_prompt, lowercase=lowercase,
        )
        if not framing_only:
            check_prompt(info, prompt)
        can_pack = supports_packing(net) and pooling == "lasttoken"
        if attention == "packed" and not can_pack:
            raise PipelineError(
                f"attention: packed needs a causal Qwen2/Qwen3 model of transformers with last-token pooling "
                f"({model_type}, {pooling})"
            )
        packed = None
        if attention == "packed" or (attention == "auto" and can_pack and device.startswith("cuda")):
            packed = PackedDecoder(net, compile=device.startswith("cuda") if compile is None else compile,
                                   **(packed_options or {}))
        if batch_tokens is None:  # measured: small padded batches suit CPU caches; packed GPU batches want more
            batch_tokens = default_batch_tokens("packed" if packed else "padded", device, hidden)
        pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else 0
        log.info("model %s: %s, pooling %s, dims %d, max_length %d, %s on %s, %s attention", model, model_type,
                 pooling, info.dims, max_length, compute_dtype, device, "packed" if packed else "padded")
        return cls(net, tok, info, device, batch_tokens, pad_id=pad_id, packed=packed, head=head)

    # ------------------------------------------------------------------------------------------ batching

    def plan_batches(self, lengths: np.ndarray, window: int | None = None) -> list[np.ndarray]:
        """Token-budget batches for this forward path (packed: sum of lengths; padded: count x longest)."""
        from pipeline.model.batching import token_budget_batches

        cost = "packed" if self.packed is not None else "padded"
        return token_budget_batches(lengths, self.batch_tokens, window=window, cost=cost)

    # ------------------------------------------------------------------------------------------ forward

    def _forward(self, enc: Encoded, idx: np.ndarray):
        """Pooled float32 hidden states (len(idx), hidden) of the sequences ``idx``, on the model's device."""
        import torch

        dev = torch.device(self.device)
        lengths = enc.lengths[idx]
        if self.packed is not None:
            from pipeline.model.packed import pack_arrays

            positions, cu = pack_arrays(lengths)
            ids = np.concatenate([enc.sequence(int(i)) for i in idx]).astype(np.int64)
            ids_d, positions_d, cu_d, *layout = self._staging.send(dev, ids, positions, cu,
                                                                   *self.packed.host_layout(lengths))
            out = self.packed.forward(ids_d, positions_d, cu_d, int(lengths.max()), tuple(layout))
            return out.float()
        longest = int(lengths.max())
        ids = np.full((len(idx), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), longest), dtype=np.int64)
        for row, i in enumerate(idx):
            seq = enc.sequence(int(i))
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        ids_d, attention, lengths_d = self._staging.send(dev, ids, mask, lengths.astype(np.int64))
        hidden = self.model(input_ids=ids_d, attention_mask=attention).last_hidden_state
        return pool(hidden, attention, lengths_d, self.info.pooling)

    def _forward_safe(self, enc: Encoded, idx: np.ndarray) -> list[tuple[np.ndarray, Any]]:
        """Forward a batch; on out-of-memory split it in halves and retry (a single sequence that does not fit
        raises)."""
        import torch

        try:
            return [(idx, self._forward(enc, idx))]
        except torch.OutOfMemoryError as exc:
            if len(idx) == 1:
                raise EncodeError(
                    f"one sequence of {int(enc.lengths[idx[0]])} tokens does not fit in GPU memory; "
                    "lower --max-length or use --long-docs chunk"
                ) from exc
            torch.cuda.empty_cache()
            half = len(idx) // 2
            log.warning("out of memory on a batch of %d sequences; splitting it", len(idx))
            return self._forward_safe(enc, idx[:half]) + self._forward_safe(enc, idx[half:])

    def embed_encoded(self, enc: Encoded, *, window: int | None = None, on_batch=None) -> np.ndarray:
        """Vectors for every sequence of ``enc``, computed in token-budget batches.

        Vectors stay on the device until the whole input is done: one copy back, and no wait on the device
        between batches (each batch's inputs go through pinned memory asynchronously), so the host prepares and
        queues the next batch while the device works on this one.

        Args:
            enc: tokenized sequences.
            window: sequences sorted by length together (default: all).
            on_batch: called with each batch's index array after it is queued.

        Returns:
            float32 (len(enc), dims), in the order of ``enc``; normalised if the job says so.

        Raises:
            EncodeError: a vector has NaN or infinite values (the sequence index is in the message).
        """
        import torch

        dev = torch.device(self.device)
        out = torch.empty((len(enc), self.info.dims), dtype=torch.float32, device=dev)
        with torch.inference_mode():
            for batch in self.plan_batches(enc.lengths, window):
                for idx, pooled in self._forward_safe(enc, batch):
                    (rows,) = self._staging.send(dev, idx.astype(np.int64))
                    out[rows] = finish(self.head(pooled), self.info.dims, self.info.normalize)
                if self.sync_each_batch and dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if on_batch is not None:
                    on_batch(batch)
            bad = ~torch.isfinite(out).all(dim=1)
            result = out.cpu().numpy()
        if bad.any():
            first = int(torch.nonzero(bad)[0, 0])
            raise EncodeError(f"{int(bad.sum())} non-finite vectors (NaN/inf), the first for sequence {first}",
                              index=first)
        return result

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed a list of texts (one vector per text; with chunking, the first chunk's)."""
        enc = self.tokenizer.encode(texts)
        vecs = self.embed_encoded(enc)
        return vecs[np.flatnonzero(enc.chunk == 0)]


class HostStaging:
    """Host arrays to the device in one asynchronous copy from pinned memory the embedder keeps.

    A pack's inputs (token ids, positions, cumulative lengths, the attention kernel's block tables, the rows its
    vectors go to) are packed into one pinned buffer and sent in one copy, without waiting on the device: a copy
    from pageable memory (``torch.from_numpy(a).to(dev)``) waits for the device, and pinning each array on its own
    (``a.pin_memory()``) allocates pinned memory for every new size until torch's pinned-memory cache holds them
    all (``cudaHostAlloc``, slow). ``SLOTS`` buffers are used in turn; a buffer is written again only after its
    last copy has finished (an event), which on one stream is long done: the host runs at most a pack or two ahead.
    Calls from several threads take turns (a lock), so no buffer is filled by two at once.
    """

    SLOTS = 4
    ALIGN = 256  # each array starts on this many bytes, as a fresh device allocation would

    def __init__(self) -> None:
        self._buffers: list = [None] * self.SLOTS
        self._events: list = [None] * self.SLOTS
        self._turn = 0
        self._lock = threading.Lock()

    def send(self, dev, *arrays: np.ndarray) -> list:
        """Device tensors with the contents, dtypes and shapes of ``arrays`` (views of one device buffer on CUDA;
        elsewhere the arrays themselves as tensors)."""
        import torch

        arrays = tuple(np.require(a, requirements="C") for a in arrays)  # 0-d arrays stay 0-d
        if dev.type != "cuda":
            return [torch.from_numpy(a) for a in arrays]
        starts, total = [], 0
        for a in arrays:
            starts.append(total)
            total += -(-a.nbytes // self.ALIGN) * self.ALIGN
        with self._lock:
            slot = self._turn % self.SLOTS
            self._turn += 1
            if self._events[slot] is not None:
                self._events[slot].synchronize()
            host = self._buffers[slot]
            if host is None or host.numel() < total:  # grown by powers of two: a few allocations per slot, ever
                host = torch.empty(1 << max(total - 1, 1 << 16).bit_length(), dtype=torch.uint8, pin_memory=True)
                self._buffers[slot] = host
            staged = host.numpy()
            for a, start in zip(arrays, starts, strict=True):
                staged[start : start + a.nbytes] = a.reshape(-1).view(np.uint8)
            on_device = torch.empty(total, dtype=torch.uint8, device=dev)
            on_device.copy_(host[:total], non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dev))  # the copy's stream: dev's, not the current device's
            self._events[slot] = event
        return [on_device[start : start + a.nbytes].view(torch.from_numpy(np.empty(0, a.dtype)).dtype).view(a.shape)
                for a, start in zip(arrays, starts, strict=True)]


def pool(hidden, mask, lengths, mode: str):
    """Pool right-padded hidden states (B, L, H) into float32 (B, H).

    ``lasttoken``: each sequence's own last position; ``mean``: average over the attention mask (special
    tokens included, as sentence-transformers does); ``cls``: the first position.
    """
    import torch

    hidden = hidden.float()
    if mode == "lasttoken":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, lengths - 1]
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if mode == "cls":
        return hidden[:, 0]
    raise PipelineError(f"pooling: unknown mode {mode!r}")


def finish(pooled, dims: int, normalize: bool):
    """Matryoshka cut to ``dims`` then L2-normalise (float32)."""
    import torch

    vec = pooled[:, :dims]
    if normalize:
        vec = torch.nn.functional.normalize(vec, p=2, dim=-1)
    return vec


def _max_length(config, tokenizer, bert_config: dict[str, Any], asked: int | None) -> int:
    """The tokens a sequence may have: ``asked`` (``--max-length``) up to the model's positions, else the model's
    default: sentence-transformers' ``max_seq_length`` where it gives one (Qwen3-Embedding: 8192 of 32768
    positions; MiniLM: 256 of 512), else the smaller of its positions and its tokenizer's limit. A length asked
    above the default is honoured as sentence-transformers honours a raised ``max_seq_length``; above the
    positions it is cut to them (``job.sizing`` warns of that before a run plans)."""

    def sane(value: Any) -> int | None:
        return int(value) if value and int(value) < 1_000_000 else None

    positions = sane(getattr(config, "max_position_embeddings", None))
    if bert_config.get("max_seq_length"):
        default = int(bert_config["max_seq_length"])
    else:
        known = [v for v in (positions, sane(getattr(tokenizer, "model_max_length", None))) if v]
        default = min(known) if known else 512
    if not asked:
        return default
    ceiling = positions or default
    if asked > ceiling:
        log.info("max_length %d is above the model's %d positions: cut to %d", asked, ceiling, ceiling)
        return ceiling
    return asked


def _sequence_format(tokenizer, model_type: str, max_length: int) -> SequenceFormat:
    """Find the special tokens the tokenizer puts around content; Qwen models get exactly one EOS."""
    if model_type.startswith("qwen"):
        eos = tokenizer.convert_tokens_to_ids(QWEN_EOS)
        if eos is None or eos == tokenizer.unk_token_id:
            raise PipelineError(f"the tokenizer has no {QWEN_EOS} token")
        return SequenceFormat((), (int(eos),), max_length, strip_suffix=True)
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return SequenceFormat(tuple(full[:i]), tuple(full[i + len(bare) :]), max_length)
    raise PipelineError("cannot tell where the tokenizer puts its special tokens")
