"""AG News topic classification on Llama-2-13B features (the paper's Table 4).

Data: 120,000 training texts; the 7,600 test texts are the validation set. Per text (title +
description, no padding, BOS included) the 40 Llama-2-13B hidden states (hidden_states[1:])
averaged over all tokens: ``[40, 5120]``. tfds' ``ag_news_subset`` builder gives the texts;
write the features as ``encoder_features`` shards of both splits into
``out/data/encoder_features/ag_news_llama2_13b_mean{,_test}``.

Recipe (the code): cross-entropy, AdamW lr 5e-5, batch 32, 35 epochs, 3 runs R1..R3 that differ
by seed (the code's 111, then +1 per run).

Fine-tuning variants (:mod:`configs.paper.finetune`): ``lora_r4``, ``lora_r8``,
``loraplus_r4``, ``loraplus_r8``, ``dora_r4`` (not in the paper), ``daam_adapter``
(``,paper_faithful``, ``,runlocal``).

Variants: ``daamv1`` (g 8), ``daamv2`` (g 1: a true single head; the released AG News DAAMv2
passes ``num_heads=8`` and is identical to DAAMv1), ``gqdaam`` (g 8, GQA maps 64 x 8),
``mixture``, ``mha``, ``mha_bn``.
"""

import ml_collections

from configs.paper import base, finetune

DATA = "out/data/encoder_features"
MODEL = {"gqdaam": {"map_shape": (64, 8)}}


def get_config(variant: str = "gqdaam") -> ml_collections.ConfigDict:
    """Returns the config of ``variant`` (see the module docstring)."""
    if finetune.is_variant(variant):
        # The LoRA scripts: Llama-2-13B (fp16 weights; AMP), pad = eos, 128 tokens padded, batch
        # 1, one epoch, AdamW 1e-6 (LoRA+: A 1e-6, B 2.828e-6), the test split validates.
        return finetune.config(
            variant, dataset="ag_news", encoder="TheBloke/Llama-2-13B-fp16", learning_rate=1e-6,
            batch_size=1, loss="cross_entropy", num_epochs=1, seeds=(111, 112, 113),
            cv={"kind": "holdout"}, max_length=128, dtype="bfloat16",
            pooling="mean_with_padding",
        )  # fmt: skip
    return base.config(
        variant,
        dataset="ag_news",
        train_path=f"{DATA}/ag_news_llama2_13b_mean/1.0.0",
        validation_path=f"{DATA}/ag_news_llama2_13b_mean_test/1.0.0",
        learning_rate=5e-5,
        batch_size=32,
        loss="cross_entropy",
        seeds=(111, 112, 113),
        cv={"kind": "holdout"},
        model=MODEL.get(variant.partition(",")[0]),
    )
