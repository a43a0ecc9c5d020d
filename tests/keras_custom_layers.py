"""A custom Keras layer, as users write them: registered, with its own config. Imported by
tests/corpus_keras.py to build the model, and given to jacli with --custom-objects."""
import keras
from keras import ops


@keras.saving.register_keras_serializable(package="jacli_tests")
class ScaledSoftsign(keras.layers.Layer):
    """y = scale · x / (1 + |x|)."""

    def __init__(self, scale: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, x):
        return self.scale * x / (1 + ops.abs(x))

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}
