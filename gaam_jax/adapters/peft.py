"""Hugging Face PEFT LoRA adapter folders <-> the LoRA variables of the ``gaam_jax`` encoders.

A peft LoRA folder (``PeftModel.save_pretrained``) holds ``adapter_config.json`` (``r``,
``lora_alpha``, ``use_rslora``, ``target_modules``, ...) and ``adapter_model.safetensors`` with,
for every adapted ``torch.nn.Linear`` at module path ``M`` of the wrapped model,
``base_model.model.M.lora_A.weight`` ``[r, in]`` and ``base_model.model.M.lora_B.weight``
``[out, r]``; peft adds ``scale * B(A(x))`` with ``scale = lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` with ``use_rslora``). Here the same update lives in the ``adapters``
collection (:mod:`gaam_jax.adapters.lora`) at the ``Dense``'s module path, stacked over the
scanned layers: ``lora_a[i] = A_i.T`` ``[in, r]``, ``lora_b[i] = B_i.T`` ``[r, out]``.

The adapter is for the transformers **base model** (``BertModel``, ``LlamaModel``,
``BeitModel``, ``WavLMModel``), which is what the encoders are: ``M`` is the base model's
module path (``encoder.layer.0.attention.self.query``). :func:`load` also accepts an adapter made
on a head model (``BertForSequenceClassification``, ``LlamaForCausalLM``, ...), whose keys carry
the base model's attribute name (``base_model.model.bert.encoder...``), by stripping that
prefix; :func:`save` writes base-model keys, to be read with
``PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder)``.

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
import os
import pathlib
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from gaam_jax import storage
from gaam_jax.adapters import Adapters
from gaam_jax.adapters.lora import COLLECTION, LoRA, paths
from gaam_jax.encoders import registry
from gaam_jax.encoders.checkpoint import SafetensorsFile

__all__ = ["CONFIG_FILE", "PEFT_VERSION", "WEIGHTS_FILE", "hf_module_names", "load", "save"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_VERSION = "0.21.2"  # the version whose format is written (and whose options are known)
KEY_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the wrapped model
_A, _B = ".lora_A.weight", ".lora_B.weight"

Path = tuple[str, ...]

# Options of adapter_config.json that change what the adapter computes; each is honoured only
# unset (None, False, empty, or bias "none"), with the reason given when refused.
_PLAIN_ONLY = {
    "bias": "trained biases of the base layers",
    "use_dora": "DoRA magnitudes",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QA-LoRA input pooling",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layers_to_transform": "some layers only",
    "layers_pattern": "some layers only",
    "modules_to_save": "fully trained modules such as a classification head",
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


def _check_options(folder: pathlib.Path, raw: dict) -> tuple[int, float, bool, Any, Any]:
    """``(r, lora_alpha, use_rslora, target_modules, exclude_modules)``, or a one-line refusal."""
    where = f"{folder}: {CONFIG_FILE}"
    if raw.get("peft_type") != "LORA":
        raise ValueError(
            f"{where} has peft_type={_short(raw.get('peft_type'))}; only 'LORA' is supported."
        )
    for name, why in _PLAIN_ONLY.items():
        value = raw.get(name)
        if not (value == "none" if name == "bias" else _unset(value)):
            raise ValueError(
                f"{where} sets {name}={_short(value)} ({why}); gaam_jax loads plain LoRA only."
            )
    r = raw.get("r", _PEFT_DEFAULTS["r"])
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{where} has r={_short(r)}; it must be a positive integer.")
    alpha = raw.get("lora_alpha", _PEFT_DEFAULTS["lora_alpha"])
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"{where} has lora_alpha={_short(alpha)}; it must be a number.")
    rslora = raw.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ValueError(f"{where} has use_rslora={_short(rslora)}; it must be true or false.")
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
    return r, float(alpha), rslora, result[0], result[1]


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


def _split_keys(folder: pathlib.Path, keys: Sequence[str], model_type: str) -> tuple[str, dict]:
    """``(head prefix, {module name: {'A': key, 'B': key}})`` of an adapter file's keys."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        kind = "A" if key.endswith(_A) else "B" if key.endswith(_B) else None
        if not key.startswith(KEY_PREFIX) or kind is None:
            raise ValueError(
                f"{folder}: {WEIGHTS_FILE} holds {key!r}, which is not a LoRA A/B weight of "
                f"{KEY_PREFIX}<module> (DoRA magnitudes, LoRA biases, embedding adapters and "
                "saved modules are not supported)."
            )
        modules.setdefault(key[len(KEY_PREFIX) : -len(_A)], {})[kind] = key
    head = registry.get(model_type).hf_prefix
    prefixed = [m.startswith(head) for m in modules]
    prefix = head if prefixed and all(prefixed) else ""
    return prefix, {m[len(prefix) :]: kinds for m, kinds in modules.items()}


def load(folder: str | os.PathLike, model_type: str, config: Any) -> tuple[LoRA, dict]:
    """Reads a peft LoRA adapter folder as a :class:`~gaam_jax.adapters.lora.LoRA` and variables.

    Honours ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules`` (a list of module names or
    dotted suffixes, a regular expression, or ``'all-linear'``) and ``exclude_modules``, as peft
    0.21.2 matches them; ``lora_dropout`` and the initialisation options do nothing at
    inference and are ignored. The adapter must have been made on the base model (or on a head
    model whose keys carry the base model's prefix, which is stripped) with transformers 5
    names, or for BEiT transformers 4 names. Adapters initialised by PiSSA, OLoRA, CorDA or LoftQ
    expect a base model modified by that initialisation: load them with that base.

    Args:
      folder: the adapter folder (``adapter_config.json``, ``adapter_model.safetensors``).
      model_type: the base model's ``config.json`` ``model_type``.
      config: the encoder's config dataclass (``BertConfig``, ...).

    Returns:
      ``(lora, variables)``: ``lora.targets`` selects exactly the adapted ``Dense`` s; the
      variables (the ``adapters`` collection) hold float32 ``lora_a`` ``[layers, in, r]`` and
      ``lora_b`` ``[layers, r, out]`` (``[in, r]``/``[r, out]`` outside the layer stack) as
      jax arrays.

    Raises:
      FileNotFoundError: one line: no such folder, no ``adapter_config.json`` or no
        ``adapter_model.safetensors``.
      ValueError: one line naming the folder and the option or tensor: another ``peft_type``,
        an option that changes the computation (``bias``, ``use_dora``, ``fan_in_fan_out``,
        ``rank_pattern``, ``alpha_pattern``, ``layers_to_transform``, ``layers_pattern``,
        ``modules_to_save``, ...), a target that is not a ``Dense`` of the encoder or selects
        only some layers, or tensors missing, misshapen or unexpected.
    """
    folder = pathlib.Path(folder).expanduser()
    raw = _read_config(folder)
    r, alpha, rslora, targets, excluded = _check_options(folder, raw)
    tensors = _open_weights(folder)
    prefix, modules = _split_keys(folder, list(tensors), model_type)
    denses = _denses(model_type, config, r)
    # The naming (transformers 5, or BEiT's transformers 4) that names most of the file's modules.
    namings = range(_namings(model_type, denses))
    tables = [_names(model_type, config, denses, n) for n in namings]
    table = max(tables, key=lambda t: sum(m in t for m in modules))
    where = f"{folder}: {CONFIG_FILE}"

    def selected(name: str) -> bool:
        full = prefix + name
        return _matches(targets, full) and not (excluded and _matches(excluded, full))

    if isinstance(targets, list):
        for target in targets:
            if not any(_matches([target], prefix + name) for name in table):
                raise ValueError(
                    f"{where}: target_modules entry {target!r} names no Dense of the {model_type} "
                    "encoder."
                )
    adapted: dict[Path, list[int | None]] = {}
    for name, (path, i) in table.items():
        if selected(name):
            adapted.setdefault(path, []).append(i)
    if not adapted:
        raise ValueError(
            f"{where}: target_modules={_short(targets)} selects no Dense of the {model_type} "
            "encoder."
        )
    for path, layers in adapted.items():
        if path[0] == "layers" and len(layers) != config.num_hidden_layers:
            raise ValueError(
                f"{where}: target_modules adapts {'/'.join(path)} in layers {layers} of "
                f"{config.num_hidden_layers} only; gaam_jax adapts every layer or none."
            )
    for name in modules:
        if name not in table:
            raise ValueError(
                f"{folder}: {WEIGHTS_FILE} adapts {prefix + name}, which is not a Dense of the "
                f"{model_type} encoder."
            )
        if not selected(name):
            raise ValueError(
                f"{folder}: {WEIGHTS_FILE} adapts {prefix + name}, which target_modules does "
                "not select."
            )

    by_path: dict[Path, dict[int | None, str]] = {}
    for name, (path, i) in table.items():
        if path in adapted:
            by_path.setdefault(path, {})[i] = name
    flat = {}
    for path, names in by_path.items():
        shape_a, shape_b = denses[path]
        n_in, n_out = shape_a[-2], shape_b[-1]
        parts_a, parts_b = [], []
        for _, name in sorted(names.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
            for kind, shape, parts in (("A", (r, n_in), parts_a), ("B", (n_out, r), parts_b)):
                key = f"{KEY_PREFIX}{prefix}{name}.lora_{kind}.weight"
                if kind not in modules.get(name, {}):
                    raise ValueError(f"{folder}: {WEIGHTS_FILE} is missing {key}.")
                value = tensors[key]
                if tuple(value.shape) != shape:
                    raise ValueError(
                        f"{folder}: {WEIGHTS_FILE} {key} has shape {tuple(value.shape)}, "
                        f"expected {shape}."
                    )
                if not np.issubdtype(value.dtype, np.floating) and value.dtype.kind != "V":
                    raise ValueError(f"{folder}: {WEIGHTS_FILE} {key} is {value.dtype}, not float.")
                parts.append(np.asarray(value, np.float32).T)
        stacked = path[0] == "layers"
        flat[(*path, "lora_a")] = jnp.asarray(np.stack(parts_a) if stacked else parts_a[0])
        flat[(*path, "lora_b")] = jnp.asarray(np.stack(parts_b) if stacked else parts_b[0])
    chosen = "|".join(re.escape("/".join(p)) for p in sorted(adapted))
    lora = LoRA(
        rank=r,
        alpha=alpha,
        targets=f"^(?:{chosen})$",
        scaling="rslora" if rslora else "alpha_over_r",
    )
    return lora, unflatten_dict(flat)


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


def save(
    folder: str | os.PathLike,
    lora: LoRA,
    adapters: Any,
    model_type: str,
    config: Any,
    *,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes LoRA variables as a peft LoRA adapter folder for the transformers base model.

    ``adapter_model.safetensors`` gets, per adapted ``Dense`` and layer ``i``,
    ``base_model.model.<module>.lora_A.weight`` = ``lora_a[i].T`` ``[r, in]`` and
    ``...lora_B.weight`` = ``lora_b[i].T`` ``[out, r]`` (float32), with transformers-5 module
    names; ``adapter_config.json`` every field peft 0.21.2 writes, ``task_type`` null and
    ``auto_mapping`` naming the base model class, ``target_modules`` the shortest list of module
    suffixes selecting exactly the adapted modules (full module names where no suffix does).
    The scale is kept: ``alpha_over_r`` writes ``lora_alpha = alpha``, ``rslora``
    ``lora_alpha = alpha`` with ``use_rslora``, ``raw_alpha`` ``lora_alpha = alpha * r`` (so
    :func:`load` gives back ``alpha_over_r`` with the same scale, up to the rounding of
    ``alpha * r / r``). Other adapters in the collection (DAAM gates) are not a peft type and
    are not written. Each file is written whole (:func:`gaam_jax.storage.write_atomic`: renamed
    into place locally, one upload on an object store), the config last.

    Args:
      folder: the adapter folder, local or a URL such as ``gs://bucket/adapter`` (created if
        missing; existing adapter files are replaced).
      lora: the adapters' :class:`~gaam_jax.adapters.lora.LoRA` (rank and scale).
      adapters: the ``adapters`` collection: ``lora_a`` ``[layers, in, r]`` / ``lora_b``
        ``[layers, r, out]`` leaves at the adapted ``Dense`` s' module paths.
      model_type: the base model's ``model_type`` (``bert``, ``llama``, ``beit``, ``wavlm``).
      config: the encoder's config dataclass.
      base_model_name_or_path: recorded in ``adapter_config.json`` (peft's field of that name).

    Raises:
      ValueError: no LoRA variables, or ones that are not at a ``Dense`` of the encoder or do
        not have its shapes and ``lora.rank``.
    """
    adapted_paths = paths(adapters)
    if not adapted_paths:
        raise ValueError("peft.save: the adapter variables hold no lora_a/lora_b.")
    denses = _denses(model_type, config, lora.rank)
    flat = flatten_dict(adapters)
    tensors: dict[str, np.ndarray] = {}
    per_module: list[list[str]] = []
    for path in adapted_paths:
        where = f"peft.save: {'/'.join(path)}"
        if path not in denses:
            raise ValueError(f"{where} is not a Dense of the {model_type} encoder.")
        a, b = (np.asarray(flat[(*path, n)], np.float32) for n in ("lora_a", "lora_b"))
        if (a.shape, b.shape) != tuple(denses[path]):
            raise ValueError(
                f"{where} has lora_a {a.shape} and lora_b {b.shape}; rank {lora.rank} on this "
                f"encoder needs {denses[path][0]} and {denses[path][1]}."
            )
        layers = range(config.num_hidden_layers) if path[0] == "layers" else [None]
        names = []
        for i in layers:
            name = _hf_names(model_type, path, i)[0]
            names.append(name)
            pa, pb = (a, b) if i is None else (a[i], b[i])
            tensors[f"{KEY_PREFIX}{name}{_A}"] = pa.T
            tensors[f"{KEY_PREFIX}{name}{_B}"] = pb.T
        per_module.append(names)
    arch = registry.get(model_type)
    universe = set(_names(model_type, config, denses, 0)) | set(arch.hf_other_linears)
    targets = _target_modules({n for ns in per_module for n in ns}, universe, per_module)

    if lora.scaling == "raw_alpha":
        alpha = float(lora.alpha) * lora.rank
    else:
        alpha = float(lora.alpha)
    raw = dict(_PEFT_DEFAULTS)
    raw.update(
        auto_mapping={
            "base_model_class": arch.hf_base_class,
            "parent_library": f"transformers.models.{model_type}.modeling_{model_type}",
        },
        base_model_name_or_path=base_model_name_or_path,
        lora_alpha=int(alpha) if alpha.is_integer() else alpha,
        r=lora.rank,
        target_modules=targets,
        use_rslora=lora.scaling == "rslora",
    )
    folder = storage.path(os.path.expanduser(folder))
    folder.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(folder / WEIGHTS_FILE, _safetensors_bytes(tensors, {"format": "pt"}))
    storage.write_atomic(
        folder / CONFIG_FILE, (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode()
    )
