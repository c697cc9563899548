"""What the paper's three experiments share: the six decoders and the training recipe.

Each experiment file (``iemocap.py``, ``cifar100.py``, ``ag_news.py``) calls :func:`config`
with its data, and its ``get_config(variant)`` takes one of :data:`VARIANTS`::

    python -m train --config configs/paper/iemocap.py:daamv1 --workdir out/iemocap_daamv1

``<variant>,runlocal`` (``iemocap.py:daamv1,runlocal``) is the same experiment shrunk for tests:
the real input shapes and decoders' structure, 1 epoch, 16 conv channels, batch 2.

Values follow ``docs/design.md`` section 10; where the paper and the authors' code differ the
code's value is used and the paper's is noted beside it.
"""

from __future__ import annotations

import ml_collections

# variant -> (front, GAAM/MHA heads). GQDAAM's GAAM heads are per experiment (CIFAR uses 1).
VARIANTS = ("daamv1", "daamv2", "gqdaam", "mixture", "mha", "mha_bn")
FRONTS = {
    "daamv1": ("gaam", 8),
    "daamv2": ("gaam", 1),
    "gqdaam": ("gqgaam", 8),
    "mixture": ("mixture", 8),  # appendix B, Table 3: g 8, 4 Gaussians each (64 parameters)
    "mha": ("mha", 8),
    "mha_bn": ("mha_bn", 8),
}


def config(
    variant: str,
    *,
    dataset: str,
    train_path: str,
    validation_path: str | None,
    learning_rate: float,
    batch_size: int,
    loss: str,
    seeds: tuple[int, ...],
    cv: dict,
    model: dict | None = None,
) -> ml_collections.ConfigDict:
    """The config of one decoder ``variant`` on one dataset.

    Args:
      variant: one of :data:`VARIANTS`.
      dataset: the name in tables and run folders.
      train_path: built ``encoder_features`` folder (the whole set for fold CV, the training
        split for ``cv.kind == 'holdout'``).
      validation_path: the held-out split's features (holdout only).
      learning_rate: AdamW learning rate.
      batch_size: training batch size.
      loss: ``'cross_entropy'`` or ``'focal'``.
      seeds: one run per seed (and fold).
      cv: the ``cv`` entry (kind, and k / seed for k-fold).
      model: per-experiment overrides of the model entry (map shapes, layer selection, ...).

    Raises:
      ValueError: for an unknown variant.
    """
    variant, _, local = variant.partition(",")
    if variant not in FRONTS or local not in ("", "runlocal"):
        raise ValueError(
            f"variant must be one of {VARIANTS} (optionally ',runlocal'), got {variant!r}."
        )
    front, heads = FRONTS[variant]
    c = ml_collections.ConfigDict()
    c.dataset_paths = ml_collections.ConfigDict({dataset: train_path})
    if validation_path is not None:
        c.validation_paths = ml_collections.ConfigDict({dataset: validation_path})
    c.model = ml_collections.ConfigDict(
        dict(
            front=front,
            num_heads=heads,
            num_gaussians=4,
            attention_dim=512,  # GQDAAM: embed_transform d -> 512, then GQA q 8, kv 2
            query_heads=8,
            kv_heads=2,
            gqa="paper_code",  # the authors' block: it is what the parameter counts describe
            conv_features=512,
            map_shape=(),  # () = most square: 32x32 for 1024, 64x80 for 5120
            variance="shifted",
            dtype="float32",  # the code trains with fp16 autocast; "bfloat16" is the analogue
            layers=(),  # () = all encoder layers
        )
    )
    c.model.update(model or {})
    c.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=learning_rate,
            weight_decay=0.01,  # AdamW's PyTorch default, as the code (the paper: 0.1, "Adam")
            grad_clip=1000.0,  # the code's clip_grad_norm_(1000) on scaled grads: no clipping
            plateau_factor=0.1,  # ReduceLROnPlateau(mode='max') on validation accuracy
            plateau_patience=10,
            frozen=(),
        )
    )
    c.loss = loss
    c.batch_size = batch_size
    c.eval_batch_size = 64
    c.num_epochs = 35
    c.cv = ml_collections.ConfigDict(cv)
    c.seeds = tuple(seeds)
    c.checkpoint_every_epochs = 1  # epochs on the full sets take minutes: lose at most one
    c.checkpoint_every_steps = 0
    c.log_every_steps = 0
    c.max_to_keep = 2
    c.data_on_device = "auto"  # CIFAR-100 and AG News features exceed 1 GiB: grain reads them
    c.runs_per_program = 0  # runs trained as one program (same shape); 0 = all of them
    c.runs_vectorized = "auto"  # runs vmapped at a time inside it; 0 = all; auto: 1 on CPU
    if local:
        c.num_epochs = 1
        c.batch_size = 2
        c.eval_batch_size = 4
        c.model.conv_features = 16
    return c
