"""Fine-tuning through the encoder: trainable counts, gradients, LoRA+, and a resumed run.

The full-size encoders of the paper (WavLM-Large, BEiT-Large, Llama-2-13B) are built from their
published config.json values and counted with ``jax.eval_shape`` (nothing is allocated); the
runs use MiniLM and the offline text set at runlocal size.
"""

from __future__ import annotations

import hashlib
import pathlib
import re

import flax.linen as nn
import gcs_emulator
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from model_folders import tiny_bert_folder
from train_helpers import Stop, stop_after

from gaam_jax.adapters import Adapters, LoRA
from gaam_jax.encoders import configure, heads, registry
from gaam_jax.param_count import count_params
from train import config as config_lib
from train import finetune, trainer

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "encoders"

# Published config.json values of the paper's encoders (only what the ports read).
WAVLM_LARGE = dict(
    model_type="wavlm", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
    intermediate_size=4096, conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2],
    conv_stride=[5, 2, 2, 2, 2, 2, 2], conv_bias=True, feat_extract_norm="layer",
    do_stable_layer_norm=True, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
    num_buckets=320, max_bucket_distance=800, classifier_proj_size=256, layer_norm_eps=1e-5,
    hidden_act="gelu", feat_extract_activation="gelu",
)  # fmt: skip
BEIT_LARGE = dict(
    model_type="beit", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
    intermediate_size=4096, image_size=224, patch_size=16, num_channels=3,
    use_relative_position_bias=True, use_shared_relative_position_bias=False,
    use_absolute_position_embeddings=False, use_mean_pooling=True, layer_scale_init_value=0.1,
    layer_norm_eps=1e-12, hidden_act="gelu", num_labels=100,
)  # fmt: skip
LLAMA_13B = dict(
    model_type="llama", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
    num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
    max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", pad_token_id=2,
)  # fmt: skip


def _trainable(raw: dict, rank: int, num_classes: int, paper_faithful: bool) -> int:
    lora = LoRA(rank=rank, alpha=16.0, scaling="raw_alpha" if paper_faithful else "alpha_over_r")
    _, _, module = configure(raw, adapters=Adapters(lora=lora))
    kind = raw["model_type"]
    if kind == "wavlm":  # transformers' head reads last_hidden_state (final LayerNorm applied)
        module = module.clone(final_norm_on_last_state=True)
    classifier = heads.SequenceClassifier(
        module, num_classes, "auto", heads.head_kwargs_from_hf(kind, raw), parent=None
    )
    example = registry.get(kind).example_inputs(raw)
    shapes = nn.unbox(jax.eval_shape(classifier.init, jax.random.key(0), example))
    pattern = heads.trainable_head_paths(kind, paper_faithful)
    head = {
        p: v for p, v in flatten_dict(shapes["params"]["head"]).items()
        if re.search(pattern, "/".join(p))
    }  # fmt: skip
    return count_params(shapes["adapters"]) + count_params(list(head.values()))


@pytest.mark.parametrize(
    "raw, rank, classes, paper, want",
    [
        (WAVLM_LARGE, 4, 4, True, 394_244),  # 393,216 LoRA + the 1,028-parameter classifier
        (WAVLM_LARGE, 8, 4, True, 787_460),
        (BEIT_LARGE, 8, 100, True, 888_932),  # 786,432 LoRA + classifier 102,500
        (LLAMA_13B, 4, 4, True, 3_276_800),  # LoRA only: the score head is frozen random
        (LLAMA_13B, 8, 4, True, 6_553_600),
        # Corrected (default): every head parameter trains.
        (WAVLM_LARGE, 4, 4, False, 393_216 + 1024 * 256 + 256 + 256 * 4 + 4),
        (LLAMA_13B, 4, 4, False, 3_276_800 + 5120 * 4),
        (BEIT_LARGE, 8, 100, False, 888_932 + 2 * 1024),  # + the pooler's LayerNorm
    ],
    ids=[
        "wavlm-r4",
        "wavlm-r8",
        "beit-r8",
        "llama-r4",
        "llama-r8",
        "wavlm-r4-all",
        "llama-r4-all",
        "beit-r8-all",
    ],  # fmt: skip
)
def test_paper_trainable_parameter_counts(raw, rank, classes, paper, want):
    assert _trainable(raw, rank, classes, paper) == want


def _randomised(tree, key):
    """Adapters moved off the identity (B, DAAM scale and offsets non-zero)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [
            x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=False)
        ]
    )


@pytest.mark.parametrize("arch", ["bert", "llama", "beit", "wavlm"])
def test_every_adapter_parameter_gets_a_gradient(arch):
    """LoRA (q and v) and DAAM on every architecture: no adapter is bypassed (WavLM's q/v are
    in transformers; here every A, B and gate parameter moves the output)."""
    from gaam_jax.encoders import from_pretrained

    folder = {
        "bert": FIXTURES.parent / "peft" / "bert" / "model", "llama": FIXTURES / "llama" / "base",
        "beit": FIXTURES / "beit" / "mim_relbias", "wavlm": FIXTURES / "wavlm" / "base",
    }[arch]  # fmt: skip
    enc = from_pretrained(folder, adapters=Adapters(lora=LoRA(rank=2), daam=True))
    example = jax.tree.map(lambda s: jnp.ones((2, *s.shape[1:]), s.dtype), enc.example_inputs())
    if arch in ("bert", "llama"):
        example = {"input_ids": jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 50}
    else:
        if arch == "wavlm":  # 0.25 s of audio (15 frames), not 1 s: the convolutions dominate
            example = {"input_values": example["input_values"][:, :4000]}
        key = jax.random.key(1)
        example = jax.tree.map(lambda x: jax.random.normal(key, x.shape, x.dtype), example)
    adapters = _randomised(enc.adapters, jax.random.key(0))

    def loss(a):
        out = enc.module.apply({"params": enc.params, "adapters": a}, **example)
        return jnp.sum(jnp.square(out[:, -1]))

    # One compiled program: op by op, the WavLM's convolutions alone took 19 s to dispatch.
    grads = jax.jit(jax.grad(loss))(adapters)
    flat = flatten_dict(grads)
    assert any(k[-1] == "lora_a" for k in flat) and any(k[-1] == "scale" for k in flat)
    for path, g in flat.items():
        per_layer = np.abs(np.asarray(g)).reshape(g.shape[0], -1).max(axis=1)
        assert (per_layer > 0).all(), f"{arch}: {'/'.join(path)} has a zero gradient"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> pathlib.Path:
    return tiny_bert_folder(tmp_path_factory.mktemp("enc") / "bert")


def _model(encoder: pathlib.Path, loraplus: float, paper_faithful: bool):
    c = config_lib.load("configs/finetune.py:loraplus_r4,runlocal")
    c.encoder.path = str(encoder)
    c.optimizer.loraplus_ratio = loraplus
    c.paper_faithful = paper_faithful
    example = {"input_ids": jax.ShapeDtypeStruct((1, 8), jnp.int32),
               "attention_mask": jax.ShapeDtypeStruct((1, 8), jnp.int32)}  # fmt: skip
    return finetune.build_model(c, 2, example)


@pytest.mark.parametrize("paper_faithful", [False, True])
def test_loraplus_groups(paper_faithful, tiny_bert):
    """LoRA+: on equal gradients AdamW's first step moves B 2.828 x as far as A; the head is
    trained (its own group) unless paper-faithful, where LoRA+'s optimiser holds only A and B."""
    from train.config import load

    model = _model(tiny_bert, 2.828, paper_faithful)
    tx = model.optimizer(load("configs/finetune.py:loraplus_r4").optimizer)
    example = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), model.example)
    # Compiled, not op by op: a second instead of ten.
    params = jax.jit(model.init)(jax.random.key(0), example)["params"]
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e-3, x.dtype), params)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    flat = {"/".join(k): np.abs(np.asarray(v)) for k, v in flatten_dict(updates).items()}
    a = [v for k, v in flat.items() if k.endswith("lora_a")]
    b = [v for k, v in flat.items() if k.endswith("lora_b")]
    # |adamw step| = lr * (1 + weight decay * |p| / lr ...): compare where p = 0 (B starts 0).
    lr = 5e-4
    np.testing.assert_allclose(np.concatenate([x.ravel() for x in b]), 2.828 * lr, rtol=1e-3)
    assert all(x.max() > 0 for x in a)
    head = [v for k, v in flat.items() if k.startswith("head/")]
    assert all((x == 0).all() for x in head) == paper_faithful


def _digest(tree) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tfds_dir):
    """A finished LoRA + DAAM-adapter fine-tuning workdir (the tiny BERT, runlocal), its config,
    datasets and the program cache (one encoder load and one compile for the module)."""
    c = config_lib.load("configs/finetune.py:daam_adapter_lora,runlocal")
    c.encoder.path = str(tiny_bert_folder(tmp_path_factory.mktemp("enc") / "bert"))  # own copy
    c.dataset_paths.pang_lee_polarity = str(tfds_dir)  # built there once per test session
    workdir = tmp_path_factory.mktemp("finetune") / "a"
    checked = trainer.check(c, workdir)
    cache: dict = {}
    results = trainer.run(c, workdir, progress=False, cache=cache, checked=checked)
    return c, checked.datasets, cache, workdir, results


@pytest.mark.slow
def test_finetune_run_on_gcs_resumes_bit_identically_and_leaves_the_base_unchanged(
    finished, gcs, tmp_path, monkeypatch
):
    """A run on gs:// (the GCS emulator; its raw dataset there too) stopped after its first
    checkpoint and resumed equals the uninterrupted local one bit for bit, PEFT adapters
    included; the base weights are the same bytes afterwards."""
    from etils import epath

    from gaam_jax.encoders import from_pretrained

    c, _, cache, whole_dir, whole = finished
    monkeypatch.setenv("GAAM_JAX_CACHE", str(tmp_path / "cache"))
    # The raw tfds dataset is read from the bucket too (copied to a local cache once).
    data = f"gs://{gcs_emulator.BUCKET}/finetune/data"
    gcs_emulator.upload(pathlib.Path(c.dataset_paths.pang_lee_polarity) / "pang_lee_polarity",
                        f"{data}/pang_lee_polarity")  # fmt: skip
    c = c.copy_and_resolve_references()
    c.dataset_paths.pang_lee_polarity = data
    remote = f"gs://{gcs_emulator.BUCKET}/finetune/b"
    checked = trainer.check(c, remote, cache=cache)
    # The programs of the local run are reused: the dataset's path is not part of them.
    with pytest.raises(Stop):
        trainer.run(c, remote, progress=False, hooks=stop_after(3), cache=cache,
                    checked=checked)  # fmt: skip
    resumed = trainer.run(c, remote, progress=False, cache=cache, checked=checked)
    rec_a = [(r["best_accuracy"], r["best_state_sha256"]) for r in whole["records"]]
    rec_b = [(r["best_accuracy"], r["best_state_sha256"]) for r in resumed["records"]]
    assert rec_a == rec_b
    for fold in (1, 2):
        run = f"pang_lee_polarity/seed0_fold{fold}/adapter"
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            local = (whole_dir / run / name).read_bytes()
            assert (epath.Path(remote) / run / name).read_bytes() == local, (fold, name)
    assert not pathlib.Path("gs:").exists()
    (steps,) = cache.values()
    # One compile for every run and call: the fresh state and sums are placed as the programs
    # return them (uncommitted ones compiled the program a second time).
    assert steps.programs["train_steps"]._cache_size() == 1
    fresh = from_pretrained(finetune.encoder_folder(c)).params
    assert _digest(steps.frozen["encoder"]) == _digest(fresh)


def test_predictor_of_a_finetuned_run(finished, tmp_path):
    """A finished fine-tuning run predicts raw texts, exports encoder + head (LoRA merged, DAAM
    kept) as one jax.export program with the same logits, and refuses base weights that
    changed."""
    import json
    import shutil

    from train.inference import Predictor, load_exported

    run = tmp_path / "run"
    shutil.copytree(finished[3] / "pang_lee_polarity" / "seed0_fold1", run)
    predictor = Predictor.from_run(run)
    texts = ["a moving , beautifully acted film .", "tedious and flat ."]
    inputs = predictor.preprocess(texts)
    assert inputs["input_ids"].shape == (2, predictor.length)
    logits = predictor.logits(**inputs)
    assert predictor.predict_raw(texts).tolist() == logits.argmax(-1).tolist()
    exported = load_exported(predictor.export(tmp_path / "model.jaxexport"))
    # Merging changes the float32 rounding of the q/v kernels only.
    np.testing.assert_allclose(exported(**inputs), logits, rtol=1e-5, atol=1e-5)
    # Its adapter/ (peft SEQ_CLS: LoRA, head in modules_to_save, DAAM gates in their own file)
    # gives the same logits through classifier_from_pretrained.
    from gaam_jax.adapters import peft
    from gaam_jax.encoders import classifier_from_pretrained

    base, revision = finetune.base_model_id(finished[0])
    assert pathlib.Path(base).is_absolute() and revision is None
    raw = json.loads((run / "adapter" / peft.CONFIG_FILE).read_text())
    assert raw["task_type"] == "SEQ_CLS" and raw["base_model_name_or_path"] == base
    assert "classifier" in raw["modules_to_save"] and (run / "adapter" / peft.DAAM_FILE).exists()
    assert peft.DAAM_FILE in (run / "adapter" / peft.README_FILE).read_text()
    clf = classifier_from_pretrained(base, adapter=run / "adapter")
    np.testing.assert_allclose(clf.logits(**inputs), logits, rtol=0, atol=1e-5)
    recorded = json.loads((run / "config.json").read_text())
    recorded["config"]["encoder"]["fingerprint"] = "0" * 64
    (run / "config.json").write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="not the ones this run was trained on"):
        Predictor.from_run(run)


def test_raw_inputs_read_by_grain_train_as_on_device(finished, tmp_path):
    """``data_on_device=False``: the raw examples are read and preprocessed batch by batch by
    the grain feed (train.finetune.RawSource: nothing but labels and ids held), and the runs
    equal those of the inputs held on the device."""
    import json

    c, _, _, whole_dir, whole = finished
    c = c.copy_and_resolve_references()
    c.data_on_device = False
    checked = trainer.check(c, tmp_path / "grain")
    assert isinstance(checked.datasets[0].source, finetune.RawSource)
    got = trainer.run(c, tmp_path / "grain", progress=False, checked=checked)
    keys = ("best_accuracy", "best_epoch", "final_accuracy", "steps")
    assert [[r[k] for k in keys] for r in got["records"]] == [
        [r[k] for k in keys] for r in whole["records"]
    ]
    # The same batches in the same order. Texts are padded to max_length instead of the longest
    # (bucketed) text: masked positions, so the same losses up to float32 summation order.
    for fold in (1, 2):
        lines = [
            [json.loads(x) for x in (d / "pang_lee_polarity" / f"seed0_fold{fold}" /
             "metrics.jsonl").read_text().splitlines()]
            for d in (whole_dir, tmp_path / "grain")
        ]  # fmt: skip
        losses = [[x["val_loss"] for x in run if "val_loss" in x] for run in lines]
        assert len(losses[0]) == len(losses[1]) > 0
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
