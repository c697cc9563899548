"""The project's main job (``make run``): GAAM decoders on frozen MiniLM features, offline.

Data: the two offline real text datasets (200 movie-review sentences, 200 newsgroup posts),
each example encoded by all-MiniLM-L6-v2 into its 6 layer outputs mean-pooled over tokens:
``[6, 384]``. Model: the paper's Gaussian Adaptive Transformer with a GAAM front, 2 heads of 3
layers each (with 6 layers the paper's 8 heads cannot divide; 2-layer heads would make every
standardised value +-1). Stratified 5-fold cross-validation, the paper's optimiser and schedule.

Run: ``python -m train --config configs/default.py --workdir out/default`` after
``python -m data.extract --dataset <name> --data-dir out/data`` for both datasets (``make run``
does both). About a minute on 2 CPU cores.

``configs/default.py:runlocal`` is the same job shrunk to seconds (2 folds, 3 epochs, 8 conv
channels), for tests and trying changes; as big_vision's ``runlocal``.
"""

import ml_collections

DATA = "out/data/encoder_features"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; ``arg='runlocal'`` gives the small variant."""
    if arg not in (None, "runlocal"):
        raise ValueError(f"the only variant is 'runlocal', got {arg!r}.")
    c = ml_collections.ConfigDict()
    # name -> built encoder_features dataset version folder.
    c.dataset_paths = ml_collections.ConfigDict(
        {
            "pang_lee_polarity": f"{DATA}/pang_lee_polarity_minilm_mean/1.0.0",
            "mini_newsgroup": f"{DATA}/mini_newsgroup_minilm_mean/1.0.0",
        }
    )
    c.model = ml_collections.ConfigDict(
        dict(
            front="gaam",  # gaam | gqgaam | mixture | mha | mha_bn | none
            num_heads=2,  # GAAM heads g (or MHA heads)
            num_gaussians=4,  # mixture front only
            attention_dim=512,  # GQGAAM width
            query_heads=8,
            kv_heads=2,
            gqa="paper_code",  # paper_code | textbook
            conv_features=128,  # the paper: 512; 128 keeps the 2-core main job at ~2 min
            map_shape=(),  # () = most square factorisation of d (16 x 24 for 384)
            variance="shifted",
            dtype="float32",  # float32 | bfloat16
            layers=(),  # encoder layers to keep, 0-based; () = all
        )
    )
    c.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-4,  # the paper's IEMOCAP value
            weight_decay=0.01,  # AdamW, as the authors' code
            grad_clip=1000.0,  # the code clips at 1000 (effectively off)
            plateau_factor=0.1,  # ReduceLROnPlateau on validation accuracy
            plateau_patience=10,
            frozen=(),  # regexes of parameter paths not to train, e.g. "^attention/"
        )
    )
    c.loss = "cross_entropy"  # cross_entropy | focal (alpha 0.25, gamma 2.5)
    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_epochs = 35
    c.cv = ml_collections.ConfigDict(dict(kind="stratified_kfold", k=5, seed=0))
    c.seeds = (0,)
    c.checkpoint_every_epochs = 35  # a run takes ~1 s and a save ~0.1 s: once per run (its end)
    c.checkpoint_every_steps = 0  # 0 = only at epoch ends
    c.log_every_steps = 0  # training lines in metrics.jsonl every N steps; 0 = epoch lines only
    c.max_to_keep = 2
    c.data_on_device = "auto"  # True | False | "auto" (device memory when under 1 GiB)
    c.runs_per_program = 0  # runs trained as one program (same shape); 0 = all of them
    c.runs_vectorized = "auto"  # runs vmapped at a time inside it; 0 = all; auto: 1 on CPU
    if arg == "runlocal":
        runlocal(c)
    return c


def runlocal(c: ml_collections.ConfigDict) -> None:
    """Shrinks a config to a seconds-long run on the same data (in place)."""
    c.num_epochs = 3
    c.model.conv_features = 8
    c.model.attention_dim = 16
    c.cv.k = 2
    c.checkpoint_every_epochs = 1
