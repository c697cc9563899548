"""IEMOCAP speech emotion recognition on WavLM-Large features (the paper's Table 2).

Data: 4 classes (neutral, happiness+excited, anger, sadness), utterances cut into <= 5 s chunks
zero-padded to 80,000 samples; per chunk the 24 WavLM-Large hidden states (hidden_states[1:])
averaged over all 249 frames, padding included: ``[24, 1024]``. The ``group`` of each example
is its session, and the folds leave one session out (fold k = Session k). Build the feature
dataset with :mod:`data.datasets.iemocap` and an extractor that writes ``encoder_features``
shards (``data/datasets/encoder_features.py`` describes the format) into
``out/data/encoder_features/iemocap_wavlm_large_mean_with_padding``.

Recipe (the code's ``iemocap`` scripts): focal loss (alpha 0.25, gamma 2.5), AdamW lr 1e-4,
batch 8, 35 epochs, seed 1. The code's IEMOCAP "MHA" decoder sees only layer 22 (0-based);
``mha`` reproduces that with ``model.layers = (22,)``.

Fine-tuning variants (:mod:`configs.paper.finetune`): ``lora_r4``, ``lora_r8``,
``loraplus_r4``, ``loraplus_r8``, ``dora_r4`` (not in the paper), ``daam_adapter``
(``,paper_faithful``, ``,runlocal``).

Variants: ``daamv1`` (g 8), ``daamv2`` (g 1), ``gqdaam`` (g 8, GQA maps 8 x 64), ``mixture``,
``mha``, ``mha_bn``.
"""

import ml_collections

from configs.paper import base, finetune

DATA = "out/data/encoder_features"
MODEL = {
    "gqdaam": {"map_shape": (8, 64)},
    "mha": {"layers": (22,)},  # the code's IEMOCAP MHA uses the 23rd layer alone
}


def get_config(variant: str = "daamv1") -> ml_collections.ConfigDict:
    """Returns the config of ``variant`` (see the module docstring)."""
    if finetune.is_variant(variant):
        # The LoRA scripts: WavLM-Large on raw 5-s chunks (no mask, as the features), batch 4,
        # AdamW 1e-4, focal loss, 35 epochs, leave one session out.
        return finetune.config(
            variant, dataset="iemocap", encoder="microsoft/wavlm-large", learning_rate=1e-4,
            batch_size=4, loss="focal", num_epochs=35, seeds=(42,),
            cv={"kind": "leave_one_group_out"}, pooling="mean_with_padding",
        )  # fmt: skip
    return base.config(
        variant,
        dataset="iemocap",
        train_path=f"{DATA}/iemocap_wavlm_large_mean_with_padding/1.0.0",
        validation_path=None,
        learning_rate=1e-4,
        batch_size=8,
        loss="focal",
        seeds=(1,),
        cv={"kind": "leave_one_group_out"},
        model=MODEL.get(variant.partition(",")[0]),
    )
