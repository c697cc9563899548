"""tfds dataset builders (array_record, readable without TensorFlow) and the dataset registry."""
