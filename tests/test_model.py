"""build_cnn: shapes, parameter counts, layer names, depth limit, seeding, reload for Grad-CAM."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from cxrexp.config import TrainConfig
from cxrexp.evaluation.gradcam import last_conv_layer_name
from cxrexp.learn.model import build_cnn, build_cnn_from_config, max_conv_blocks


@pytest.mark.parametrize(
    ("image_size", "filters", "dense", "params", "last_conv_shape"),
    [
        # conv1 9*1*4+4 = 40; conv2 9*4*8+8 = 296; flatten 8*8*8 = 512; dense1 512*16+16 = 8208;
        # logit 16+1 = 17 -> 8561
        (32, (4, 8), (16,), 8561, (16, 16, 8)),
        # conv1 9*2+2 = 20; flatten 16*16*2 = 512; logit 513 -> 533
        (32, (2,), (), 533, (32, 32, 2)),
        # odd size floors: 33 -> 16 -> 8 -> 4. conv1 40; conv2 9*4*4+4 = 148; conv3 148;
        # flatten 4*4*4 = 64; dense1 64*8+8 = 520; dense2 8*4+4 = 36; logit 5 -> 897
        (33, (4, 4, 4), (8, 4), 897, (8, 8, 4)),
    ],
)
def test_build_cnn_shapes_and_parameter_counts(image_size, filters, dense, params, last_conv_shape):
    model = build_cnn(image_size, filters, dense, dropout=0.2, seed=0)
    assert model.count_params() == params
    assert tuple(model.input.shape) == (None, image_size, image_size, 1)
    assert tuple(model.output.shape) == (None, 1)
    conv = model.get_layer(last_conv_layer_name(model))
    assert tuple(conv.output.shape[1:]) == last_conv_shape


def test_layer_names_and_order():
    model = build_cnn(32, (4, 8), (16, 8), dropout=0.1, seed=0)
    assert [layer.name for layer in model.layers] == [
        "image",
        "block1_conv", "block1_pool",
        "block2_conv", "block2_pool",
        "flatten", "dropout",
        "dense1", "dense2",
        "logit", "probability",
    ]
    assert model.get_layer("block1_conv").activation.__name__ == "relu"
    assert model.get_layer("dense2").activation.__name__ == "relu"
    assert model.get_layer("logit").activation.__name__ == "linear"
    assert model.get_layer("probability").activation.__name__ == "sigmoid"
    assert model.input.dtype == "float32"
    assert last_conv_layer_name(model) == "block2_conv"


def test_output_is_sigmoid_of_logit():
    model = build_cnn(32, (4,), (8,), dropout=0.5, seed=2)
    x = np.random.default_rng(0).random((3, 32, 32, 1), dtype=np.float32)
    logit_model = keras.Model(model.input, [model.get_layer("logit").output, model.output])
    logits, probabilities = (np.asarray(t) for t in logit_model(x, training=False))
    assert probabilities.shape == (3, 1)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), atol=1e-6)


@pytest.mark.parametrize(
    ("image_size", "n_blocks", "ok"),
    [
        (16, 4, True),  # 16 -> 8 -> 4 -> 2 -> 1
        (16, 5, False),  # ... -> 0
        (17, 4, True),
        (31, 5, False),  # 31 -> 15 -> 7 -> 3 -> 1 -> 0
        (32, 5, True),
        (299, 8, True),  # the published 299 px input: 299 -> ... -> 1 after 8 pools
        (299, 9, False),
    ],
)
def test_too_many_pool_layers_fail_clearly(image_size, n_blocks, ok):
    filters = (2,) * n_blocks
    if ok:
        assert max_conv_blocks(image_size) >= n_blocks
        build_cnn(image_size, filters, (), 0.0, seed=0)
        return
    with pytest.raises(ValueError, match=rf"{n_blocks} conv blocks.*{image_size}x{image_size}"):
        build_cnn(image_size, filters, (), 0.0, seed=0)


@pytest.mark.parametrize(
    ("filters", "dense", "dropout", "message"),
    [
        ((), (8,), 0.2, "filters is empty"),
        ((4, 0), (8,), 0.2, "positive"),
        ((4,), (-1,), 0.2, "positive"),
        ((4,), (8,), 1.0, "dropout"),
    ],
)
def test_bad_architecture_arguments(filters, dense, dropout, message):
    with pytest.raises(ValueError, match=message):
        build_cnn(32, filters, dense, dropout, seed=0)


def test_seeded_initialisers():
    first = build_cnn(32, (4, 4, 4), (8,), 0.2, seed=5)
    again = build_cnn(32, (4, 4, 4), (8,), 0.2, seed=5)
    other = build_cnn(32, (4, 4, 4), (8,), 0.2, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(first.get_weights(), again.get_weights()))
    assert not np.array_equal(first.get_weights()[0], other.get_weights()[0])
    # block2_conv and block3_conv have the same kernel shape (3, 3, 4, 4) but must not start equal.
    kernel2 = first.get_layer("block2_conv").get_weights()[0]
    kernel3 = first.get_layer("block3_conv").get_weights()[0]
    assert kernel2.shape == kernel3.shape
    assert not np.array_equal(kernel2, kernel3)


def test_build_cnn_from_config_uses_config_fields():
    cfg = TrainConfig(filters=(4, 8), dense=(16,), dropout=0.3, seed=9, batch_norm=False)
    model = build_cnn_from_config(cfg, 32)
    assert model.count_params() == 8561
    assert model.get_layer("dropout").rate == pytest.approx(0.3)
    reference = build_cnn(32, (4, 8), (16,), 0.3, seed=9)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), reference.get_weights()))


def test_batch_norm_adds_one_layer_per_block_after_the_relu():
    model = build_cnn_from_config(TrainConfig(filters=(4, 8), dense=(16,), dropout=0.3, seed=9, batch_norm=True), 32)
    # 8561 weights without it, plus gamma, beta, moving mean and variance per channel (4 + 8 channels).
    assert model.count_params() == 8561 + 4 * (4 + 8)
    names = [layer.name for layer in model.layers]
    assert names.index("block1_conv") < names.index("block1_bn") < names.index("block1_pool")
    assert last_conv_layer_name(model) == "block2_conv"


def test_last_conv_layer_name_without_conv_layers():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="logit")(inputs))
    with pytest.raises(ValueError, match="no Conv2D layer"):
        last_conv_layer_name(model)


def test_reloaded_model_gives_gradients_for_gradcam(tmp_path):
    """The point of the functional API: after load_model, conv maps and logit stay reachable."""
    model = build_cnn(32, (4, 8), (8,), 0.2, seed=1)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    conv_name = last_conv_layer_name(reloaded)
    grad_model = keras.Model(
        reloaded.inputs, [reloaded.get_layer(conv_name).output, reloaded.get_layer("logit").output]
    )
    x = tf.constant(np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32))
    with tf.GradientTape() as tape:
        feature_maps, logits = grad_model(x, training=False)
        target = tf.reduce_sum(logits)
    gradients = tape.gradient(target, feature_maps)
    assert gradients is not None
    assert tuple(gradients.shape) == (2, 16, 16, 8)
    assert float(tf.reduce_sum(tf.abs(gradients))) > 0
