"""Encoder inputs prepared as the paper's code prepared them, from each model folder's own files.

* :mod:`data.preprocess.text`: ``tokenizer.json`` (tokenizers library), right padding, buckets.
* :mod:`data.preprocess.image`: ``preprocessor_config.json`` as BEiT's PIL image processor.
* :mod:`data.preprocess.audio`: ``preprocessor_config.json`` as the Wav2Vec2 feature extractor.
"""
