"""Hugging Face PEFT LoRA adapter folders <-> the LoRA variables of the ``gaam_jax`` encoders.

A peft LoRA folder (``PeftModel.save_pretrained``) holds ``adapter_config.json`` (``r``,
``lora_alpha``, ``use_rslora``, ``target_modules``, ...) and ``adapter_model.safetensors`` with,
for every adapted ``torch.nn.Linear`` at module path ``M`` of the wrapped model,
``base_model.model.M.lora_A.weight`` ``[r, in]`` and ``base_model.model.M.lora_B.weight``
``[out, r]``; peft adds ``scale * B(A(x))`` with ``scale = lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` with ``use_rslora``). Here the same update lives in the ``adapters``
collection (:mod:`gaam_jax.adapters.lora`) at the ``Dense``'s module path, stacked over the
scanned layers: ``lora_a[i] = A_i.T`` ``[in, r]``, ``lora_b[i] = B_i.T`` ``[r, out]``.

An adapter made on the transformers **base model** (``BertModel``, ...), which is what the
encoders are, has keys ``base_model.model.<M>`` with ``M`` the base model's module path
(``encoder.layer.0.attention.self.query``); one made on a head model, as peft's
``task_type="SEQ_CLS"`` adapters are (``BertForSequenceClassification``), has the base model's
attribute in front (``base_model.model.bert.encoder...``) and the modules of ``modules_to_save``
(the head: ``base_model.model.classifier.weight``). :func:`read` takes both, with DoRA
(``...lora_magnitude_vector``), ``rank_pattern``/``alpha_pattern`` and ``layers_to_transform``,
and returns the saved modules' tensors; :func:`save` writes either (``task_type``), the
collection's DAAM gates in :data:`DAAM_FILE` and a README.
:func:`gaam_jax.encoders.classifier_from_pretrained` builds a classifier from a base model and
such an adapter.

Module names are the live transformers-5 ones; BEiT's transformers-4 names
(``encoder.layer.N.attention.attention.query`` for ``layers.N.attention.q_proj``) are read too.
The names of each ``Dense``, the head models' prefix and the base model class are the
architecture's (``ARCHITECTURE.peft_module_names`` etc., :mod:`gaam_jax.encoders.registry`);
which ``Dense`` s exist and their shapes come from the Flax module itself (``jax.eval_shape``;
nothing runs).

WavLM: transformers' ``WavLMAttention`` hands ``q_proj.weight``, ``k_proj.weight``, ... to
``F.multi_head_attention_forward`` instead of calling the modules, so an *unmerged* peft LoRA on
those four projections changes nothing in PyTorch, while the merged model
(``merge_and_unload()``) has the update. The encoders here always apply it: they equal peft's
merged model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax.traverse_util import flatten_dict, unflatten_dict

from gaam_jax.adapters import Adapters
from gaam_jax.adapters.lora import COLLECTION, FACTORS, LoRA, init_magnitudes, paths
from gaam_jax.encoders import registry
from gaam_jax.encoders.checkpoint import SafetensorsFile

__all__ = [
    "CONFIG_FILE",
    "DAAM_FILE",
    "PEFT_VERSION",
    "README_FILE",
    "WEIGHTS_FILE",
    "PeftAdapter",
    "hf_module_names",
    "load",
    "read",
    "save",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_VERSION = "0.21.2"  # the version whose format is written (and whose options are known)
KEY_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the wrapped model
_A, _B = ".lora_A.weight", ".lora_B.weight"

Path = tuple[str, ...]

# Options of adapter_config.json that change what the adapter computes and are not read here;
# each is honoured only unset (None, False, empty, or bias "none"), with the reason given when
# refused. (use_dora, rank_pattern, alpha_pattern, layers_to_transform, layers_pattern and
# modules_to_save are read.)
_PLAIN_ONLY = {
    "bias": "trained biases of the base layers",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QA-LoRA input pooling",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings",
    "target_parameters": "LoRA on raw parameters",
    "alora_invocation_tokens": "activated LoRA",
    "velora_config": "a LoRA variant",
    "monteclora_config": "a LoRA variant",
    "use_bdlora": "a LoRA variant",
    "arrow_config": "a LoRA variant",
    "kasa_config": "a LoRA variant",
}
# The adapters of the collection that are no peft type (the DAAM gates), as float32 tensors named
# by their '/'-joined path in the collection (``layers/layer_output/daam_adapter/scale``): peft
# ignores files it does not know; read() loads them back.
DAAM_FILE = "gaam_jax_daam.safetensors"
README_FILE = "README.md"
_M = ".lora_magnitude_vector"  # peft 0.21.2's DoRA magnitude key (no ".weight")

# Every field peft 0.21.2 writes for a LoRA made on a base model, at peft's defaults; save fills
# in the adapter's own (r, lora_alpha, use_rslora, target_modules, auto_mapping, ...).
_PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": PEFT_VERSION,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}


def _hf_names(model_type: str, path: Path, i: int | None) -> tuple[str, ...]:
    """The base model's module names of our Dense at ``path`` (layer ``i``), newest first."""
    return registry.get(model_type).peft_module_names(path, i)


def _denses(model_type: str, config: Any, rank: int) -> dict[Path, tuple[tuple[int, ...], ...]]:
    """Every ``Dense`` of the encoder: module path -> (``lora_a`` shape, ``lora_b`` shape).

    In the layer stack the shapes are ``[layers, in, r]`` / ``[layers, r, out]``. Traced only
    (``jax.eval_shape`` of an init with a LoRA on every ``Dense``), nothing is computed; cached
    per (frozen, hashable) config.
    """
    try:
        return _cached_denses(model_type, config, rank)
    except TypeError:  # a config holding an unhashable value: trace it again
        return _traced_denses(model_type, config, rank)


def _traced_denses(
    model_type: str, config: Any, rank: int
) -> dict[Path, tuple[tuple[int, ...], ...]]:
    arch = registry.get(model_type)
    module = arch.encoder_cls(config, adapters=Adapters(lora=LoRA(rank=rank, targets=".*")))
    example = arch.example_inputs(dataclasses.asdict(config))

    def init(key: jax.Array, example: dict[str, Any]) -> Any:
        return module.init(key, **example)[COLLECTION]

    flat = flatten_dict(jax.eval_shape(init, jax.random.key(0), example))
    return {
        p: (flat[(*p, "lora_a")].shape, flat[(*p, "lora_b")].shape)
        for p in paths(unflatten_dict(flat))
    }


_cached_denses = functools.cache(_traced_denses)


def hf_module_names(model_type: str, config: Any) -> dict[str, tuple[Path, int | None]]:
    """The base model's module name of every ``Dense`` of the encoder (transformers-5 names).

    Args:
      model_type: ``config.json``'s ``model_type``.
      config: the architecture's config dataclass.

    Returns:
      ``{hf module name: (our module path, layer index or None outside the layer stack)}``,
      e.g. ``{'encoder.layer.0.attention.self.query': (('layers', 'query'), 0), ...}``.
    """
    return _names(model_type, config, _denses(model_type, config, 1), 0)


def _names(
    model_type: str, config: Any, denses: Mapping[Path, Any], naming: int
) -> dict[str, tuple[Path, int | None]]:
    out = {}
    for path in denses:
        layers = range(config.num_hidden_layers) if path[0] == "layers" else [None]
        for i in layers:
            names = _hf_names(model_type, path, i)
            if names:
                out[names[min(naming, len(names) - 1)]] = (path, i)
    return out


def _namings(model_type: str, denses: Mapping[Path, Any]) -> int:
    """How many namings the architecture's module names come in (BEiT: transformers 5 and 4)."""
    counts = [len(_hf_names(model_type, p, 0 if p[0] == "layers" else None)) for p in denses]
    return max(counts, default=1)


def _matches(targets: str | Sequence[str], key: str) -> bool:
    """Whether module ``key`` is selected, as peft 0.21.2's ``check_target_module_exists``.

    A string is a regular expression matched against the whole module name (``'all-linear'``
    selects every ``Dense``); a list names modules or dotted suffixes of module names.
    """
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, key) is not None
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def _unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_config(folder: pathlib.Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist (or is not a folder).")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: not a peft adapter folder.")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {' '.join(str(err).split())}.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object.")
    return raw


@dataclasses.dataclass(frozen=True)
class _Options:
    r: int
    alpha: float
    rslora: bool
    dora: bool
    targets: Any
    excluded: Any
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    layers: tuple[int, ...] | None  # layers_to_transform


def _check_options(folder: pathlib.Path, raw: dict) -> _Options:
    """The options this loader reads, checked, or a one-line refusal."""
    where = f"{folder}: {CONFIG_FILE}"
    if raw.get("peft_type") != "LORA":
        raise ValueError(
            f"{where} has peft_type={_short(raw.get('peft_type'))}; only 'LORA' is supported."
        )
    for name, why in _PLAIN_ONLY.items():
        value = raw.get(name)
        if not (value == "none" if name == "bias" else _unset(value)):
            raise ValueError(
                f"{where} sets {name}={_short(value)} ({why}), which gaam_jax does not support."
            )
    r = raw.get("r", _PEFT_DEFAULTS["r"])
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{where} has r={_short(r)}; it must be a positive integer.")
    alpha = raw.get("lora_alpha", _PEFT_DEFAULTS["lora_alpha"])
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"{where} has lora_alpha={_short(alpha)}; it must be a number.")
    flags = {}
    for name in ("use_rslora", "use_dora"):
        flags[name] = raw.get(name, False)
        if not isinstance(flags[name], bool):
            raise ValueError(f"{where} has {name}={_short(flags[name])}; it must be true or false.")
    patterns = {}
    for name, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        value = raw.get(name) or {}
        ok = isinstance(value, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
        )
        if not ok or (
            kind is int and not all(isinstance(v, int) and v > 0 for v in value.values())
        ):
            raise ValueError(f"{where} has {name}={_short(value)}; expected module -> number.")
        for key in value:
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(
                    f"{where}: {name} key {key!r} is not a regular expression: {err}."
                ) from None
        patterns[name] = {k: kind(v) for k, v in value.items()}
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (
        isinstance(layers, list) and all(isinstance(i, int) and i >= 0 for i in layers)
    ):
        raise ValueError(f"{where} has layers_to_transform={_short(layers)}; expected layer ints.")
    layers_pattern = raw.get("layers_pattern")
    if not _unset(layers_pattern):
        names = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        if not (isinstance(names, list) and set(names) <= {"layer", "layers"}):
            raise ValueError(
                f"{where} sets layers_pattern={_short(layers_pattern)}; only the encoders' own "
                "layer lists ('layer', 'layers') are supported."
            )
    result = []
    for name in ("target_modules", "exclude_modules"):
        value = raw.get(name)
        if value is None and name == "exclude_modules":
            result.append(())
            continue
        if value is None:
            raise ValueError(
                f"{where} has target_modules=None (peft's per-architecture default is not "
                "resolved here); list the adapted modules."
            )
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(
                    f"{where} has {name}={_short(value)}, not a regular expression: {err}."
                ) from None
        elif not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
            raise ValueError(f"{where} has {name}={_short(value)}; expected a string or a list.")
        result.append(value)
    return _Options(
        r=r,
        alpha=float(alpha),
        rslora=flags["use_rslora"],
        dora=flags["use_dora"],
        targets=result[0],
        excluded=result[1],
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
        layers=None if layers is None else tuple(layers),
    )


def _pattern_key(pattern: Mapping[str, Any], name: str) -> str | None:
    # peft 0.21.2's get_pattern_key: the first key matching the name or a dotted suffix of it.
    return next((k for k in pattern if re.match(rf"(.*\.)?({k})$", name)), None)


def _open_weights(folder: pathlib.Path) -> SafetensorsFile:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        hint = ""
        if (folder / "adapter_model.bin").is_file():
            hint = (
                " (only adapter_model.bin: save it with save_pretrained(safe_serialization=True))"
            )
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}{hint}.")
    try:
        return SafetensorsFile(path)
    except ValueError as err:
        raise ValueError(f"{folder}: {' '.join(str(err).split())}") from None


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
    """A peft LoRA adapter folder as read by :func:`read`.

    Attributes:
      lora: the :class:`~gaam_jax.adapters.lora.LoRA` (targets exactly the adapted ``Dense`` s;
        a ``rank_pattern``/``alpha_pattern`` entry per module path whose rank or alpha is not
        the default; ``use_dora``).
      variables: the ``adapters`` collection: float32 ``lora_a`` ``[layers, in, r]``,
        ``lora_b`` ``[layers, r, out]`` and with DoRA ``lora_magnitude`` ``[layers, out]``
        (no layer axis outside the layer stack), as jax arrays.
      saved: the tensors peft saved through ``modules_to_save`` (a classification head, BERT's
        pooler, ...), float32 numpy, by their module path in the wrapped model
        (``classifier.weight``, ``bert.pooler.dense.bias``).
      config: the parsed ``adapter_config.json``.
      daam: whether the folder holds DAAM gates (:data:`DAAM_FILE`, in ``variables``).
    """

    lora: LoRA
    variables: Any
    saved: dict[str, np.ndarray]
    config: dict
    daam: bool = False


def _split_keys(
    folder: pathlib.Path, keys: Sequence[str], model_type: str, names: set[str]
) -> tuple[str, dict, list[str]]:
    """``(head prefix, {module: {'A'|'B'|'M': key}}, other keys)`` of an adapter file's keys."""
    modules: dict[str, dict[str, str]] = {}
    others = []
    for key in keys:
        if not key.startswith(KEY_PREFIX):
            raise ValueError(
                f"{folder}: {WEIGHTS_FILE} holds {key!r}, which is not under {KEY_PREFIX}."
            )
        for kind, suffix in (("A", _A), ("B", _B), ("M", _M)):
            if key.endswith(suffix):
                modules.setdefault(key[len(KEY_PREFIX) : -len(suffix)], {})[kind] = key
                break
        else:
            others.append(key)
    head = registry.get(model_type).hf_prefix
    prefixed = [m.startswith(head) and m[len(head) :] in names for m in modules]
    prefix = head if prefixed and all(prefixed) else ""
    return prefix, {m[len(prefix) :]: kinds for m, kinds in modules.items()}, others


def load(folder: str | os.PathLike, model_type: str, config: Any) -> tuple[LoRA, dict]:
    """:func:`read`'s ``(lora, variables)``: the encoder's adapters (saved modules are left out).

    Raises:
      As :func:`read` (without ``params``: DoRA adapters must adapt every layer they target).
    """
    adapter = read(folder, model_type, config)
    return adapter.lora, adapter.variables


def read(
    folder: str | os.PathLike, model_type: str, config: Any, *, params: Any = None
) -> PeftAdapter:
    """Reads a peft LoRA adapter folder: the LoRA, its variables and the saved modules.

    Honours ``r``, ``lora_alpha``, ``use_rslora``, ``use_dora`` (``lora_magnitude_vector``),
    ``rank_pattern`` and ``alpha_pattern`` (matched against the module names as peft 0.21.2
    does), ``layers_to_transform``, ``target_modules`` (a list of module names or dotted
    suffixes, a regular expression, or ``'all-linear'``) and ``exclude_modules``; tensors of
    ``modules_to_save`` are returned as :attr:`PeftAdapter.saved`. ``lora_dropout`` and the
    initialisation options do nothing at inference and are ignored. The scanned layers share one
    rank and scale per module path: a layer of lower rank is zero-padded, a layer of another
    scale has it folded into ``lora_b``, and a layer that is not adapted gets zero factors (and,
    with DoRA, the magnitude ``||W||`` of ``params``, so that its factor is 1). The adapter may
    be for the base model or for a head model (``BertForSequenceClassification``: keys with the
    base model's prefix, which is stripped), with transformers 5 names, or for BEiT
    transformers 4 names. Adapters initialised by PiSSA, OLoRA, CorDA or LoftQ expect a base
    model modified by that initialisation: load them with that base.

    Args:
      folder: the adapter folder (``adapter_config.json``, ``adapter_model.safetensors``).
      model_type: the base model's ``config.json`` ``model_type``.
      config: the encoder's config dataclass (``BertConfig``, ...).
      params: the encoder's params; needed only for DoRA on some layers only.

    Returns:
      The :class:`PeftAdapter`.

    Raises:
      FileNotFoundError: one line: no such folder, no ``adapter_config.json`` or no
        ``adapter_model.safetensors``.
      ValueError: one line naming the folder and the option or tensor: another ``peft_type``,
        an unsupported option (``bias``, ``lora_bias``, ``fan_in_fan_out``,
        ``trainable_token_indices``, ...), a target that is not a ``Dense`` of the encoder, or
        tensors missing, misshapen or unexpected.
    """
    folder = pathlib.Path(folder).expanduser()
    raw = _read_config(folder)
    opt = _check_options(folder, raw)
    tensors = _open_weights(folder)
    denses = _denses(model_type, config, 1)
    # The naming (transformers 5, or BEiT's transformers 4) that names most of the file's modules.
    namings = range(_namings(model_type, denses))
    tables = [_names(model_type, config, denses, n) for n in namings]
    every = set().union(*tables)
    prefix, modules, others = _split_keys(folder, list(tensors), model_type, every)
    table = max(tables, key=lambda t: sum(m in t for m in modules))
    where = f"{folder}: {CONFIG_FILE}"

    def selected(name: str) -> bool:
        full = prefix + name
        if opt.layers is not None and table[name][1] not in opt.layers:
            return False
        return _matches(opt.targets, full) and not (opt.excluded and _matches(opt.excluded, full))

    if isinstance(opt.targets, list):
        for target in opt.targets:
            if not any(_matches([target], prefix + name) for name in table):
                raise ValueError(
                    f"{where}: target_modules entry {target!r} names no Dense of the {model_type} "
                    "encoder."
                )
    adapted: dict[Path, dict[int | None, str]] = {}
    for name, (path, i) in table.items():
        if selected(name):
            adapted.setdefault(path, {})[i] = name
    if not adapted:
        raise ValueError(
            f"{where}: target_modules={_short(opt.targets)} selects no Dense of the {model_type} "
            "encoder."
        )
    for name in modules:
        if name not in table:
            raise ValueError(
                f"{folder}: {WEIGHTS_FILE} adapts {prefix + name}, which is not a Dense of the "
                f"{model_type} encoder."
            )
        if not selected(name):
            raise ValueError(
                f"{folder}: {WEIGHTS_FILE} adapts {prefix + name}, which target_modules (with "
                "layers_to_transform) does not select."
            )
        if "M" in modules[name] and not opt.dora:
            raise ValueError(
                f"{folder}: {WEIGHTS_FILE} holds {KEY_PREFIX}{prefix}{name}{_M} but use_dora is "
                "false."
            )

    def rank_alpha(name: str) -> tuple[int, float]:
        full = prefix + name
        rk, ak = _pattern_key(opt.rank_pattern, full), _pattern_key(opt.alpha_pattern, full)
        return (
            opt.r if rk is None else opt.rank_pattern[rk],
            opt.alpha if ak is None else opt.alpha_pattern[ak],
        )

    def scale(rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if opt.rslora else alpha / rank

    def tensor(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in tensors:
            raise ValueError(f"{folder}: {WEIGHTS_FILE} is missing {key}.")
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{folder}: {WEIGHTS_FILE} {key} has shape {tuple(value.shape)}, expected {shape}."
            )
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.kind != "V":
            raise ValueError(f"{folder}: {WEIGHTS_FILE} {key} is {value.dtype}, not float.")
        return np.asarray(value, np.float32)

    flat: dict[tuple[str, ...], Any] = {}
    rank_pattern, alpha_pattern = {}, {}
    missing_magnitudes: dict[Path, list[int]] = {}
    for path, names in adapted.items():
        shape_a, shape_b = denses[path]
        n_in, n_out = shape_a[-2], shape_b[-1]
        stacked = path[0] == "layers"
        layers = list(range(config.num_hidden_layers)) if stacked else [None]
        ranks = {i: rank_alpha(n) for i, n in names.items()}
        rank = max(r for r, _ in ranks.values())
        alpha = ranks[min(names, key=lambda i: -1 if i is None else i)][1]
        path_scale = scale(rank, alpha)
        key = re.escape("/".join(path))
        if rank != opt.r:
            rank_pattern[key] = rank
        if alpha != opt.alpha:
            alpha_pattern[key] = alpha
        parts_a, parts_b, parts_m = [], [], []
        for i in layers:
            a = np.zeros((n_in, rank), np.float32)
            b = np.zeros((rank, n_out), np.float32)
            m = np.zeros((n_out,), np.float32)
            if i in names:
                full = f"{KEY_PREFIX}{prefix}{names[i]}"
                r_i, alpha_i = ranks[i]
                a[:, :r_i] = tensor(full + _A, (r_i, n_in)).T
                # Another scale on this layer than the path's: folded into B, exactly what
                # peft computes (s_i A B = s (s_i / s) A B).
                ratio = scale(r_i, alpha_i) / path_scale
                b[:r_i] = tensor(full + _B, (n_out, r_i)).T * np.float32(ratio)
                if opt.dora:
                    m = tensor(full + _M, (n_out,))
            elif opt.dora:
                missing_magnitudes.setdefault(path, []).append(i)
            parts_a.append(a)
            parts_b.append(b)
            parts_m.append(m)
        flat[(*path, "lora_a")] = np.stack(parts_a) if stacked else parts_a[0]
        flat[(*path, "lora_b")] = np.stack(parts_b) if stacked else parts_b[0]
        if opt.dora:
            flat[(*path, "lora_magnitude")] = np.stack(parts_m) if stacked else parts_m[0]
    chosen = "|".join(re.escape("/".join(p)) for p in sorted(adapted))
    lora = LoRA(
        rank=opt.r,
        alpha=opt.alpha,
        targets=f"^(?:{chosen})$",
        scaling="rslora" if opt.rslora else "alpha_over_r",
        use_dora=opt.dora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    variables = unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    if missing_magnitudes:
        if params is None:
            path, layers = next(iter(missing_magnitudes.items()))
            raise ValueError(
                f"{where}: DoRA leaves {'/'.join(path)} in layers {layers} unadapted; their "
                "magnitudes need the base weights (pass params)."
            )
        # Unadapted layers: m = ||W|| (their factor is 1); the adapted keep the file's.
        filled = flatten_dict(init_magnitudes(params, variables, lora))
        out = dict(flatten_dict(variables))
        for path, layers in missing_magnitudes.items():
            key = (*path, "lora_magnitude")
            rows = np.zeros(out[key].shape[:1], bool)
            rows[[i for i in layers if i is not None]] = True
            out[key] = jnp.where(
                jnp.asarray(rows)[:, None], jnp.asarray(filled[key], jnp.float32), out[key]
            )
        variables = unflatten_dict(out)
    for key in others:
        if re.search(r"\.lora_[A-Za-z_]+", key):  # LoRA biases, embedding adapters, ...
            raise ValueError(
                f"{folder}: {WEIGHTS_FILE} holds {key!r}, a LoRA tensor that is not supported "
                "(only lora_A, lora_B and lora_magnitude_vector are)."
            )
    saved = {k[len(KEY_PREFIX) :]: np.asarray(tensors[k], np.float32) for k in others}
    daam = (folder / DAAM_FILE).is_file()
    if daam:
        try:
            gates = SafetensorsFile(folder / DAAM_FILE)
        except ValueError as err:
            raise ValueError(f"{folder}: {' '.join(str(err).split())}") from None
        out = dict(flatten_dict(variables))
        for key in gates:
            path = tuple(key.split("/"))
            if path[-1] in FACTORS:
                raise ValueError(f"{folder}: {DAAM_FILE} holds a LoRA variable, {key}.")
            out[path] = jnp.asarray(np.asarray(gates[key], np.float32))
        variables = unflatten_dict(out)
    return PeftAdapter(lora=lora, variables=variables, saved=saved, config=raw, daam=daam)


def _target_modules(
    adapted: set[str], universe: set[str], per_module: list[list[str]]
) -> list[str]:
    """The shortest peft ``target_modules`` list that selects exactly ``adapted`` in ``universe``.

    For each adapted ``Dense`` (its module names over the layers), the shortest dotted suffix
    shared by its layers (``query``, then ``self.query``, ...) that selects nothing else; where
    none does, its full module names, one entry per layer.
    """
    entries: set[str] = set()
    for names in per_module:
        parts = [n.split(".") for n in names]
        suffix = None
        for k in range(1, min(len(p) for p in parts) + 1):
            candidates = {".".join(p[-k:]) for p in parts}
            if len(candidates) > 1:
                break  # the suffix reaches the layer index
            (candidate,) = candidates
            if {n for n in universe if _matches([candidate], n)} <= adapted:
                suffix = candidate
                break
        entries |= {suffix} if suffix else set(names)
    chosen = sorted(entries)
    assert {n for n in universe if _matches(chosen, n)} == adapted, chosen
    return chosen


def _safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding of float32 tensors (sorted by name, contiguous, header padded)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(tensors):
        blob = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        shape = list(tensors[name].shape)
        header[name] = {
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def _pattern_keys(names: list[str], universe: set[str]) -> list[str]:
    """The peft pattern keys (regular expressions) that select exactly ``names`` in ``universe``.

    The shortest dotted suffix shared by the names that no other module name ends with (peft's
    ``get_pattern_key`` matches a key against a name or a dotted suffix of it), else the names.
    """
    parts = [n.split(".") for n in names]
    for k in range(1, min(len(p) for p in parts) + 1):
        candidates = {".".join(p[-k:]) for p in parts}
        if len(candidates) > 1:
            break
        (candidate,) = candidates
        if {n for n in universe if _matches([candidate], n)} <= set(names):
            return [re.escape(candidate)]
    return [re.escape(n) for n in names]


def _readme(raw: Mapping[str, Any], keys: Sequence[str], notes: Sequence[str]) -> str:
    """The folder's README: what it holds, how peft and gaam_jax load it, what peft lacks."""
    base = raw["base_model_name_or_path"] or "<the base model>"
    seq_cls = raw["task_type"] == "SEQ_CLS"
    kind = "DoRA" if raw["use_dora"] else "LoRA"
    lines = [
        "# A peft LoRA adapter written by gaam_jax",
        "",
        f"- {kind}, r={raw['r']}, lora_alpha={raw['lora_alpha']}, use_rslora={raw['use_rslora']}"
        f", target_modules={raw['target_modules']}, rank_pattern={raw['rank_pattern']}, "
        f"alpha_pattern={raw['alpha_pattern']}",
        f"- task_type={raw['task_type']}, modules_to_save={raw['modules_to_save']}",
        f"- base model: {base}" + (f" (revision {raw['revision']})" if raw["revision"] else ""),
        f"- {len(keys)} tensors in {WEIGHTS_FILE} (peft {PEFT_VERSION}'s format)",
        "",
        "Load it with peft:",
        "",
        "```python",
    ]
    if seq_cls:
        lines += [
            "from peft import AutoPeftModelForSequenceClassification",
            'model = AutoPeftModelForSequenceClassification.from_pretrained("<this folder>")',
            "# or: PeftModel.from_pretrained(",
            f'#     AutoModelForSequenceClassification.from_pretrained("{base}", num_labels=C),',
            '#     "<this folder>")',
        ]
    else:
        lines += [
            "from peft import PeftModel",
            f'model = PeftModel.from_pretrained(AutoModel.from_pretrained("{base}"), '
            '"<this folder>")',
        ]
    lines += [
        "```",
        "",
        "With gaam_jax: `gaam_jax.encoders.classifier_from_pretrained(base, adapter=folder)`"
        if seq_cls
        else "With gaam_jax: `gaam_jax.encoders.from_pretrained(base, adapter=folder)`",
        "",
        "What peft users do not get:",
        "",
    ]
    lines += [f"- {n}" for n in notes] or ["- nothing: the file holds the whole adapted model."]
    return "\n".join(lines) + "\n"


def save(
    folder: str | os.PathLike,
    lora: LoRA,
    adapters: Any,
    model_type: str,
    config: Any,
    *,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
    task_type: str | None = None,
    saved: Mapping[str, np.ndarray] | None = None,
    notes: Sequence[str] = (),
) -> None:
    """Writes LoRA (or DoRA) variables as a peft LoRA adapter folder, with its README.

    ``adapter_model.safetensors`` gets, per adapted ``Dense`` and layer ``i``,
    ``base_model.model.<module>.lora_A.weight`` = ``lora_a[i].T`` ``[r, in]``,
    ``...lora_B.weight`` = ``lora_b[i].T`` ``[out, r]`` and with DoRA
    ``...lora_magnitude_vector`` = ``lora_magnitude[i]`` ``[out]`` (float32), with
    transformers-5 module names: the base model's (``task_type`` None, ``auto_mapping`` naming
    the base model class) or, with ``task_type='SEQ_CLS'``, the classification model's
    (``bert.encoder.layer.0...``), as peft names them. ``saved`` tensors (a head, by their names
    in that model: ``classifier.weight``) are written as peft writes ``modules_to_save``
    (``base_model.model.classifier.weight``), their modules listed in ``modules_to_save``.
    ``adapter_config.json`` gets every field peft 0.21.2 writes; ``target_modules`` the shortest
    list of module suffixes selecting exactly the adapted modules (full module names where no
    suffix does); per-module ranks and alphas (``lora.rank_pattern``/``alpha_pattern``) become
    ``rank_pattern``/``alpha_pattern`` entries keyed by such suffixes. The scale is kept:
    ``alpha_over_r`` writes ``lora_alpha = alpha``, ``rslora`` ``lora_alpha = alpha`` with
    ``use_rslora``, ``raw_alpha`` ``lora_alpha = alpha * r`` (per module with patterns). Other
    adapters in the collection (DAAM gates) are no peft type: they go to :data:`DAAM_FILE`
    (float32, by their path in the collection), which peft ignores and :func:`read` loads.
    ``README.md`` says what the folder holds, how peft loads it and what peft users do not get.
    Each file is written whole (:func:`_write_whole`), the config last.

    Args:
      folder: the adapter folder, local or a URL such as ``gs://bucket/adapter`` (created if
        missing; existing adapter files are replaced).
      lora: the adapters' :class:`~gaam_jax.adapters.lora.LoRA` (ranks, scales, DoRA).
      adapters: the ``adapters`` collection: ``lora_a`` ``[layers, in, r]`` / ``lora_b``
        ``[layers, r, out]`` (and ``lora_magnitude`` ``[layers, out]``) leaves at the adapted
        ``Dense`` s' module paths.
      model_type: the base model's ``model_type`` (``bert``, ``llama``, ``beit``, ``wavlm``).
      config: the encoder's config dataclass.
      base_model_name_or_path: recorded in ``adapter_config.json`` (what
        ``AutoPeftModel*.from_pretrained`` loads).
      revision: the base model's hub revision, recorded as peft's ``revision``.
      task_type: None (an adapter of the base model) or ``'SEQ_CLS'``.
      saved: tensors of modules_to_save by their module path in the wrapped model.
      notes: lines for the folder's README about what a peft user does not get (the run's
        other trained parts); the DAAM gates are listed there without being asked.

    Raises:
      ValueError: no LoRA variables, or ones that are not at a ``Dense`` of the encoder or do
        not have its shapes and ranks, or an unknown ``task_type``.
    """
    if task_type not in (None, "SEQ_CLS"):
        raise ValueError(f"peft.save: task_type must be None or 'SEQ_CLS', got {task_type!r}.")
    adapted_paths = paths(adapters)
    if not adapted_paths:
        raise ValueError("peft.save: the adapter variables hold no lora_a/lora_b.")
    arch = registry.get(model_type)
    prefix = arch.hf_prefix if task_type == "SEQ_CLS" else ""
    denses = _denses(model_type, config, 1)
    flat = flatten_dict(adapters)
    tensors: dict[str, np.ndarray] = {}
    per_module: list[list[str]] = []
    by_path: dict[Path, list[str]] = {}
    for path in adapted_paths:
        where = f"peft.save: {'/'.join(path)}"
        if path not in denses:
            raise ValueError(f"{where} is not a Dense of the {model_type} encoder.")
        rank = lora.rank_for("/".join(path))
        a, b = (np.asarray(flat[(*path, n)], np.float32) for n in ("lora_a", "lora_b"))
        shape_a, shape_b = denses[path]
        want = ((*shape_a[:-1], rank), (*shape_b[:-2], rank, shape_b[-1]))
        if (a.shape, b.shape) != want:
            raise ValueError(
                f"{where} has lora_a {a.shape} and lora_b {b.shape}; rank {rank} on this "
                f"encoder needs {want[0]} and {want[1]}."
            )
        m = flat.get((*path, "lora_magnitude"))
        if (m is not None) != lora.use_dora:
            raise ValueError(f"{where}: a DoRA magnitude must be there exactly with use_dora.")
        m = None if m is None else np.asarray(m, np.float32)
        layers = range(config.num_hidden_layers) if path[0] == "layers" else [None]
        names = []
        for i in layers:
            name = prefix + _hf_names(model_type, path, i)[0]
            names.append(name)
            pa, pb = (a, b) if i is None else (a[i], b[i])
            tensors[f"{KEY_PREFIX}{name}{_A}"] = pa.T
            tensors[f"{KEY_PREFIX}{name}{_B}"] = pb.T
            if m is not None:
                tensors[f"{KEY_PREFIX}{name}{_M}"] = (m if i is None else m[i]).reshape(-1)
        per_module.append(names)
        by_path[path] = names
    base_names = set(_names(model_type, config, denses, 0)) | set(arch.hf_other_linears)
    universe = {prefix + n for n in base_names}
    targets = _target_modules({n for ns in per_module for n in ns}, universe, per_module)

    def peft_alpha(rank: int, alpha: float) -> float:
        return float(alpha) * rank if lora.scaling == "raw_alpha" else float(alpha)

    def number(x: float) -> int | float:
        return int(x) if float(x).is_integer() else x

    alpha = peft_alpha(lora.rank, lora.alpha)
    rank_pattern, alpha_pattern = {}, {}
    for path, names in by_path.items():
        where = "/".join(path)
        rank, path_alpha = (
            lora.rank_for(where),
            peft_alpha(lora.rank_for(where), lora.alpha_for(where)),
        )
        for key in _pattern_keys(names, universe):
            if rank != lora.rank:
                rank_pattern[key] = rank
            if path_alpha != alpha:
                alpha_pattern[key] = number(path_alpha)
    modules = sorted({k.rsplit(".", 1)[0] for k in saved or {}})
    if task_type == "SEQ_CLS":  # peft adds the heads' names to every SEQ_CLS adapter
        modules = sorted({*modules, "classifier", "score"})
    for key, value in (saved or {}).items():
        tensors[f"{KEY_PREFIX}{key}"] = np.asarray(value, np.float32)
    raw = dict(_PEFT_DEFAULTS)
    raw.update(
        alpha_pattern=alpha_pattern,
        auto_mapping=None
        if task_type
        else {
            "base_model_class": arch.hf_base_class,
            "parent_library": f"transformers.models.{model_type}.modeling_{model_type}",
        },
        base_model_name_or_path=base_model_name_or_path,
        lora_alpha=number(alpha),
        modules_to_save=modules or None,
        r=lora.rank,
        rank_pattern=rank_pattern,
        revision=revision,
        target_modules=targets,
        task_type=task_type,
        use_dora=lora.use_dora,
        use_rslora=lora.scaling == "rslora",
    )
    gates = {
        "/".join(k): np.asarray(v, np.float32) for k, v in flat.items() if k[-1] not in FACTORS
    }
    folder = epath.Path(os.path.expanduser(str(folder)))  # a local folder or a URL
    folder.mkdir(parents=True, exist_ok=True)
    notes = list(notes)
    if gates:
        _write_whole(folder / DAAM_FILE, _safetensors_bytes(gates, {"format": "gaam_jax"}))
        notes.insert(
            0,
            f"The DAAM gates ({len(gates)} tensors) are in {DAAM_FILE}, which peft ignores: "
            "peft's model lacks them. gaam_jax loads them with the LoRA.",
        )
    _write_whole(folder / README_FILE, _readme(raw, sorted(tensors), notes).encode())
    _write_whole(folder / WEIGHTS_FILE, _safetensors_bytes(tensors, {"format": "pt"}))
    _write_whole(folder / CONFIG_FILE, (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode())


def _write_whole(path: epath.Path, data: bytes) -> None:
    """Writes ``data`` so that a reader sees the old file or the new one, never part of one.

    A local file is written beside the target and renamed over it; an object store's object
    appears only once its upload is complete, so it is written in place.
    """
    if "://" in str(path):
        path.write_bytes(data)
        return
    tmp = pathlib.Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, str(path))
