"""Development-only: make the small int8 and fp16 TFLite models committed beside this file.

No PyPI package ships an int8 or fp16 TFLite model small enough for the tests, and the agent
never needs TensorFlow, so the models are made once with TensorFlow in a throwaway virtualenv:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
    /tmp/tfvenv/bin/python tests/data/make_tflite_models.py

Writes tiny_int8.tflite (full-integer: int8 input and output) and tiny_fp16.tflite (float16
weights, float32 input and output), each a few KB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

HERE = Path(__file__).resolve().parent


def build() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input(shape=(8, 8, 1), batch_size=1, name="image")
    x = tf.keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = tf.keras.layers.Flatten()(x)
    outputs = tf.keras.layers.Dense(3, activation="softmax", name="scores")(x)
    return tf.keras.Model(inputs, outputs)


def main() -> None:
    model = build()
    rng = np.random.default_rng(0)

    def representative() -> object:
        for _ in range(32):
            yield [rng.random((1, 8, 8, 1), dtype=np.float32)]

    int8 = tf.lite.TFLiteConverter.from_keras_model(model)
    int8.optimizations = [tf.lite.Optimize.DEFAULT]
    int8.representative_dataset = representative
    int8.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    int8.inference_input_type = tf.int8
    int8.inference_output_type = tf.int8
    (HERE / "tiny_int8.tflite").write_bytes(int8.convert())

    fp16 = tf.lite.TFLiteConverter.from_keras_model(model)
    fp16.optimizations = [tf.lite.Optimize.DEFAULT]
    fp16.target_spec.supported_types = [tf.float16]
    (HERE / "tiny_fp16.tflite").write_bytes(fp16.convert())


if __name__ == "__main__":
    main()
