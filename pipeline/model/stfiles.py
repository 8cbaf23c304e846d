"""sentence-transformers' files of a model folder, read the way sentence-transformers reads them.

``modules.json`` names the modules; this module reads the Pooling module's mode (its current ``"pooling_mode"``
or the older flags), the Dense and Normalize modules after it (``Head``: computed here in float32), and the
``sentence_bert_config.json`` flag ``do_lower_case``. A module or mode that is not computed here is refused by
name, never skipped: skipping it would give other vectors than the model's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# sentence-transformers modules computed here (the old per-architecture names of its Transformer module too)
ST_MODULES = {"Transformer", "Pooling", "Dense", "Normalize", "BERT", "RoBERTa", "DistilBERT", "XLMRoBERTa", "ALBERT",
              "CamemBERT"}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


@dataclass(frozen=True)
class STFiles:
    """What a model folder's sentence-transformers files say: pooling mode (None: not given), the
    ``config_sentence_transformers.json`` and ``sentence_bert_config.json`` contents, and what comes after the
    pooling, in order: ``("dense", folder)`` for a Dense module, ``("normalize", None)`` for a Normalize module
    (one at the end is left out where the vectors are L2-normalised after the Matryoshka cut anyway, not with
    ``--no-normalize``: sentence-transformers runs it whatever ``normalize_embeddings`` says)."""

    pooling: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    bert_config: dict[str, Any] = field(default_factory=dict)
    head: tuple[tuple[str, Path | None], ...] = ()
    include_prompt: bool = True  # False: the pooling leaves the prompt's tokens out


def st_files(path: str, computed_here: bool = True) -> STFiles:
    """The sentence-transformers files of a local model folder (or of a hub model, downloaded).

    ``computed_here``: the vectors come from this process's forward, so a module it does not compute is refused
    (not where a server computes them and only the framing is read here)."""
    root = Path(path)
    hub_id = None if root.is_dir() else path
    if hub_id is not None:
        root = _hub_folder(path)
    if root is None:
        return STFiles()
    pooling, pooled, head, include_prompt = None, False, [], True
    for module in read_json(root / "modules.json") if (root / "modules.json").exists() else []:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        where = module.get("path") or module.get("name")
        conf = read_json(root / module.get("path", "") / "config.json")
        if computed_here and kind not in ST_MODULES:  # another module type: other vectors than this forward's
            raise PipelineError(
                f"{root}: modules.json has a {kind} module ({where}); embed-corpus computes only "
                f"{', '.join(sorted(ST_MODULES))}, so its vectors would not be this model's"
            )
        if kind == "Dense":
            if not pooled:
                raise PipelineError(f"{root}: modules.json has a Dense module ({where}) before its Pooling module")
            sub = str(module.get("path", ""))
            head.append(("dense", _module_folder(root, sub, hub_id) if computed_here else root / sub))
        elif kind == "Normalize" and pooled:
            head.append(("normalize", None))
        elif kind == "Pooling":
            pooled = True
            pooling = _pooling_mode(conf, f"{root / module.get('path', '')}/config.json")
            include_prompt = conf.get("include_prompt", True) is not False
        if kind in ("Dense", "Normalize") and computed_here:
            other = {conf.get("module_input_name"), conf.get("module_output_name")} - {None, "sentence_embedding"}
            if other:
                raise PipelineError(f"{root}: the {kind} module ({where}) works on {sorted(other)}, not on the pooled "
                                    "vector; embed-corpus does not compute that")
    return STFiles(pooling, read_json(root / "config_sentence_transformers.json"),
                   read_json(root / "sentence_bert_config.json"), tuple(head), include_prompt)


# sentence-transformers' pooling modes computed here; its older configs name them by flags (before version 6)
POOLING_MODES = {"mean": "mean", "cls": "cls", "lasttoken": "lasttoken"}
LEGACY_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def _pooling_mode(conf: dict[str, Any], where: str) -> str | None:
    """The pooling mode of a sentence-transformers Pooling config (``"pooling_mode": "mean"``, or the older
    ``"pooling_mode_mean_tokens": true`` flags); None for an empty config.

    Raises:
        PipelineError: a mode not computed here (max, weighted mean, ...) or several modes (their vectors are
            concatenated).
    """
    if not conf:
        return None
    mode = conf.get("pooling_mode")
    if mode is None:
        mode = [name for key, name in LEGACY_POOLING_FLAGS.items() if conf.get(key)]
    if isinstance(mode, list | tuple):
        mode = mode[0] if len(mode) == 1 else tuple(mode)
    if isinstance(mode, str) and mode in POOLING_MODES:
        return POOLING_MODES[mode]
    raise PipelineError(f"{where}: pooling {mode!r} is not computed here (embed-corpus computes one of "
                        f"{', '.join(POOLING_MODES)})")


def _module_folder(root: Path, sub: str, hub_id: str | None) -> Path:
    """A module's folder with its weights: for a hub model, downloaded now (the first download took only the
    small JSON files)."""
    folder = root / sub
    if hub_id is not None and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(hub_id, allow_patterns=[f"{sub}/*"])) / sub
    return folder


def _hub_folder(model_id: str) -> Path | None:
    """The local snapshot of a hub model's small sentence-transformers files (downloads them if needed)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*/config.json"]))
    except Exception as exc:  # noqa: BLE001 - offline or private: fall back to the model type
        log.info("no sentence-transformers files for %s (%s); pooling from the model type", model_id, exc)
        return None


# Activations a Dense module may name (its config's "activation_function", a torch.nn class), made with no arguments.
DENSE_ACTIVATIONS = {"Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU", "Softplus", "ELU", "LeakyReLU", "Mish"}


class Head:
    """The sentence-transformers modules between the pooling and the vectors: Dense projections (a linear map, then
    an activation; sentence-transformers' ``Dense``) and a Normalize before one, computed in float32.

    ``steps``: ``("dense", (weight, bias or None, activation))`` or ``("normalize", None)``; ``width``: the size of
    the vectors it returns; ``described``: one line per step, for the job record.
    """

    def __init__(self, steps: tuple, width: int = 0, described: tuple[str, ...] = ()) -> None:
        self.steps = steps
        self.width = width
        self.described = described

    @classmethod
    def load(cls, modules: tuple[tuple[str, Path | None], ...], hidden: int, device: str | None) -> Head:
        """The head of a model from its sentence-transformers modules (``STFiles.head``) and its hidden size;
        weights on ``device`` (None: sizes only, no weights read: the framing of a model a server runs).

        Raises:
            PipelineError: a module's config or weights are missing, do not fit together, or name an activation
                that is not one of ``DENSE_ACTIVATIONS``.
        """
        steps, described, width = [], [], hidden
        for kind, folder in modules:
            if kind == "normalize":
                steps.append(("normalize", None))
                described.append("Normalize")
                continue
            assert folder is not None
            conf = read_json(folder / "config.json")
            n_in, n_out = conf.get("in_features"), conf.get("out_features")
            activation = str(conf.get("activation_function") or "torch.nn.modules.activation.Tanh")
            name = activation.rsplit(".", 1)[-1]
            if not isinstance(n_in, int) or not isinstance(n_out, int):
                raise PipelineError(f"{folder}/config.json: a Dense module needs in_features and out_features ({conf})")
            if n_in != width:
                raise PipelineError(f"{folder}: this Dense module takes {n_in} values, the module before it gives "
                                    f"{width}")
            if not activation.startswith("torch.nn.") or name not in DENSE_ACTIVATIONS:
                raise PipelineError(f"{folder}/config.json: activation {activation!r} is not computed here (known: "
                                    f"{', '.join(sorted(DENSE_ACTIVATIONS))} of torch.nn)")
            described.append(f"{folder.name}: {n_in} -> {n_out}, {name}")
            width = n_out
            if device is not None:
                steps.append(("dense", _dense_weights(folder, n_in, n_out, bool(conf.get("bias", True)), name,
                                                      device)))
            else:
                steps.append(("dense", None))
        return cls(tuple(steps), width, tuple(described))

    def __call__(self, pooled):
        """float32 (B, hidden) pooled states -> float32 (B, width)."""
        import torch

        for kind, dense in self.steps:
            if kind == "normalize":
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            else:
                weight, bias, activation = dense
                pooled = activation(torch.nn.functional.linear(pooled, weight, bias))
        return pooled


def _dense_weights(folder: Path, n_in: int, n_out: int, has_bias: bool, activation: str, device: str):
    """(weight, bias, activation) of a Dense module, float32 on ``device``, from ``model.safetensors`` or
    ``pytorch_model.bin`` (keys ``linear.weight``, ``linear.bias``)."""
    import torch

    try:
        if (folder / "model.safetensors").is_file():
            from safetensors.torch import load_file

            state = load_file(str(folder / "model.safetensors"))
        else:
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise PipelineError(f"{folder}: cannot read the Dense module's weights ({exc})") from exc
    weight, bias = state.get("linear.weight"), state.get("linear.bias")
    if weight is None or tuple(weight.shape) != (n_out, n_in) or (bias is None) == has_bias or (
            bias is not None and tuple(bias.shape) != (n_out,)):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        raise PipelineError(f"{folder}: the Dense module's weights {shapes} do not fit its config ({n_in} -> {n_out}, "
                            f"bias {has_bias})")
    dev = torch.device(device)  # copies: safetensors' tensors are views of the file's memory map (own_weights)
    return (weight.to(dev, torch.float32, copy=True), None if bias is None else bias.to(dev, torch.float32, copy=True),
            getattr(torch.nn, activation)())


def lowercase_first(tokenizer) -> None:
    """Make ``tokenizer`` lowercase text before anything else, as sentence-transformers does for a model whose
    ``sentence_bert_config.json`` says ``do_lower_case`` (whatever the tokenizer's own files say): a Lowercase
    normalizer in front of a fast tokenizer's own (special tokens stay as they are), the flag on a slow one."""
    if not getattr(tokenizer, "is_fast", False):
        try:
            tokenizer.do_lower_case = True
        except AttributeError:
            tokenizer.basic_tokenizer.do_lower_case = True
        return
    from tokenizers.normalizers import Lowercase, Sequence

    backend = tokenizer.backend_tokenizer  # lowercasing twice (its own normalizer may too) changes nothing
    backend.normalizer = Sequence([Lowercase(), *([backend.normalizer] if backend.normalizer is not None else [])])
