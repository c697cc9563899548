"""abstract_from_pretrained: from_pretrained's shapes, dtypes and shardings, no weight read.

Every committed encoder fixture and the packaged MiniLM: the abstract params (and adapters)
equal the loaded ones leaf by leaf; on a mesh of 8 fake CPU devices (conftest.py sets
XLA_FLAGS) the shardings too; a checkpoint that does not match its config.json fails with
from_pretrained's error; and no tensor byte is read (every memory-mapped view is poisoned).
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from gaam_jax.adapters import Adapters, LoRA
from gaam_jax.encoders import abstract_from_pretrained, bert, checkpoint, from_pretrained, heads
from gaam_jax.sharding import make_mesh

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "encoders"
FOLDERS = {
    f"{p.parent.name}/{p.name}": p
    for p in sorted(FIXTURES.glob("*/*"))
    if (p / "config.json").is_file()
}
FOLDERS["bert/minilm"] = pathlib.Path(bert.minilm_dir())
LLAMA = FIXTURES / "llama" / "base"
VARIANTS = {
    "float32": {},
    "bfloat16": {"dtype": jnp.bfloat16},
    "lora_daam": {"adapters": Adapters(lora=LoRA(rank=4), daam=True), "adapter_seed": 3},
}


def _described(tree):
    """``{path: (shape, dtype, sharding)}`` of concrete arrays or ``ShapeDtypeStruct`` s."""
    return {k: (tuple(v.shape), v.dtype, v.sharding) for k, v in flatten_dict(tree).items()}


def _assert_same(abstract, loaded):
    assert abstract.is_abstract and not loaded.is_abstract
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.params))
    assert _described(abstract.params) == _described(loaded.params)
    assert (abstract.adapters is None) == (loaded.adapters is None)
    if loaded.adapters is not None:
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.adapters))
        assert _described(abstract.adapters) == _described(loaded.adapters)
    assert abstract.module == loaded.module
    assert (abstract.model_type, abstract.dtype, abstract.rules) == (
        loaded.model_type,
        loaded.dtype,
        loaded.rules,
    )
    assert abstract.config == loaded.config and abstract.config_json == loaded.config_json
    assert abstract.bytes_per_device() == loaded.bytes_per_device()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(FOLDERS))
def test_abstract_equals_loaded(name, variant):
    kwargs = VARIANTS[variant]
    abstract = abstract_from_pretrained(FOLDERS[name], **kwargs)
    _assert_same(abstract, from_pretrained(FOLDERS[name], **kwargs))
    if variant == "bfloat16":  # floating params in the compute dtype
        assert {v.dtype for v in jax.tree.leaves(abstract.params)} == {jnp.dtype(jnp.bfloat16)}


def test_dora_magnitudes_are_shapes_too():
    kwargs = {"adapters": Adapters(lora=LoRA(rank=4, use_dora=True))}
    abstract = abstract_from_pretrained(LLAMA, **kwargs)
    _assert_same(abstract, from_pretrained(LLAMA, **kwargs))
    assert any(k[-1] == "lora_magnitude" for k in flatten_dict(abstract.adapters))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")
@pytest.mark.parametrize("name", ["llama/base", "bert/minilm"])
@pytest.mark.parametrize("data,model", [(4, 2), (2, 4)])
def test_abstract_shardings_equal_loaded_on_a_mesh(name, data, model):
    mesh = make_mesh({"data": data, "model": model})
    kwargs = {"mesh": mesh, "adapters": Adapters(lora=LoRA(rank=4), daam=True)}
    abstract = abstract_from_pretrained(FOLDERS[name], **kwargs)
    loaded = from_pretrained(FOLDERS[name], **kwargs)
    _assert_same(abstract, loaded)
    assert abstract.mesh is mesh
    # Something is split over the model axis (else the comparison proves little).
    assert any(
        "model" in jax.tree.leaves(tuple(s.sharding.spec)) for s in jax.tree.leaves(abstract.params)
    )


def _edited(tmp_path, **changes):
    folder = shutil.copytree(LLAMA, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    for key, change in changes.items():
        config[key] = change(config[key])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "changes",
    [
        {"num_hidden_layers": lambda n: n + 1},  # a missing tensor
        {"hidden_size": lambda d: 2 * d},  # misshapen tensors
        {"intermediate_size": lambda n: n + 8},
    ],
    ids=["layers", "hidden", "intermediate"],
)
def test_a_mismatching_checkpoint_raises_from_pretrained_error(tmp_path, changes):
    folder = _edited(tmp_path, **changes)
    with pytest.raises(ValueError) as loaded:
        from_pretrained(folder)
    with pytest.raises(ValueError) as abstract:
        abstract_from_pretrained(folder)
    assert str(abstract.value) == str(loaded.value)
    assert "\n" not in str(abstract.value)


def test_other_errors_are_from_pretrained_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        abstract_from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="mesh axes"):
        abstract_from_pretrained(LLAMA, mesh=jax.sharding.Mesh(np.array(jax.devices()), ("x",)))


class _Untouchable(np.ndarray):
    """A memory-mapped view whose data may not be read: indexing or converting it fails.

    Views of it (``.T``, ``transpose``, ``reshape``) stay untouchable; shapes and dtypes read.
    """

    def _refuse(self, *args, **kwargs):
        raise AssertionError("a tensor's data was read")

    __getitem__ = __array__ = __array_ufunc__ = __array_function__ = _refuse
    __iter__ = __bytes__ = tobytes = tolist = item = copy = astype = _refuse


@pytest.fixture
def untouchable(monkeypatch):
    """Every view the safetensors files hand out is :class:`_Untouchable`."""
    original = checkpoint.SafetensorsFile.__getitem__
    monkeypatch.setattr(
        checkpoint.SafetensorsFile,
        "__getitem__",
        lambda self, name: original(self, name).view(_Untouchable),
    )


@pytest.mark.parametrize("name", ["llama/base", "wavlm/stable", "beit/mim_relbias", "bert/minilm"])
def test_no_tensor_data_is_read(untouchable, name):
    kwargs = {"dtype": jnp.bfloat16, "adapters": Adapters(lora=LoRA(rank=4), daam=True)}
    abstract = abstract_from_pretrained(FOLDERS[name], **kwargs)
    assert abstract.is_abstract
    # The poison works: loading the weights reads them.
    with pytest.raises(Exception, match="a tensor's data was read"):
        from_pretrained(FOLDERS[name], **kwargs)


def test_head_params_shapes_read_no_data(untouchable):
    """head_params_from_hf takes views only: mapped to ShapeDtypeStructs, nothing is read."""
    folder = FOLDERS["bert/minilm"]
    raw = checkpoint.read_config(folder)
    found = heads.head_params_from_hf("bert", raw, checkpoint.open_tensors(folder))
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), found)
    assert shapes["pooler"]["kernel"].shape == (384, 384)
    with pytest.raises(AssertionError, match="data was read"):
        found["pooler"]["kernel"][0]


def test_an_abstract_encoder_does_not_run():
    abstract = abstract_from_pretrained(LLAMA, adapters=Adapters(lora=LoRA(rank=4)))
    with pytest.raises(ValueError, match="shapes only"):
        abstract.hidden_states(input_ids=np.ones((1, 4), np.int32))
    with pytest.raises(ValueError, match="shapes only"):
        abstract.merged()
