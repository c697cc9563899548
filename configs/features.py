"""Your own features (``python -m data.import_features``): the cross-validated GAAM decoder.

Import ``[N, layers, d]`` features as ``<data_dir>/encoder_features/<dataset>/1.0.0``, then::

    python -m train --config configs/features.py --workdir out/my_features \
        --config.dataset=my_features --config.data_dir=out/data

``dataset`` and ``data_dir`` name the imported dataset (defaults: ``digits`` in ``out/data``,
the worked example in docs/data_and_encoders.md); ``dataset_paths.features`` follows them.
Stratified k-fold cross-validation (``cv.k`` folds, default 5); with groups imported,
``--config.cv.kind=leave_one_group_out`` holds out one group per fold instead. The model is
the paper's decoder with one GAAM head (g = 1, which divides any number of layers; the paper's
DAAMv1 uses ``--config.model.num_heads=8`` on 24 or 40 layers), the optimiser and schedule are
those of ``configs/default.py`` (AdamW 1e-4, weight decay 0.01, reduce-on-plateau, 35 epochs).
``configs/features.py:runlocal`` is the seconds-long variant.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config; ``arg='runlocal'`` gives the small variant of ``configs/default.py``."""
    c = default.get_config(arg)
    c.dataset = "digits"  # --name given to data.import_features
    c.data_dir = "out/data"  # --data-dir given to data.import_features
    path = c.get_ref("data_dir") + "/encoder_features/" + c.get_ref("dataset") + "/1.0.0"
    # name -> built encoder_features dataset version folder; the name labels the results.
    c.dataset_paths = ml_collections.ConfigDict({"features": path})
    c.model.num_heads = 1  # must divide the number of layers; 1 always does
    # cv: configs/default.py's stratified k-fold (k = 5; 2 in runlocal).
    return c
