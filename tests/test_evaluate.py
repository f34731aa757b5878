"""Evaluation: window placement, confusion matrix / IoU by hand, and the sliding-window predictor against loops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stpg_jax.models.inputs import MEAN_RGB_UINT8
from stpg_jax.evaluate import confusion_matrix, evaluate, iou_from_confusion, summarize
from stpg_jax.inference import WindowPredictor, window_origins
from stpg_jax.models import DeepLabV3Plus

WINDOW = 32
NUM_CLASSES = 3


@pytest.mark.parametrize("size,window", [(512, 512), (100, 512), (1024, 800), (2048, 800), (500, 96), (97, 96)])
def test_window_origins_cover_the_image(size, window):
    stride = math.ceil(window * 2 / 3)
    origins = window_origins(size, window, stride)
    assert origins[0] == 0
    if size <= window:
        assert origins == [0]
        return
    assert origins[-1] == size - window  # last window flush with the border
    assert all(0 < b - a <= stride for a, b in zip(origins, origins[1:]))
    assert all(b - a == stride for a, b in zip(origins[:-2], origins[1:-1]))
    covered = np.zeros(size, bool)
    for o in origins:
        covered[o:o + window] = True
    assert covered.all()


def test_window_origins_cityscapes_frame():
    assert window_origins(1024, 800, 534) == [0, 224]
    assert window_origins(2048, 800, 534) == [0, 534, 1068, 1248]


def test_confusion_iou_and_summary_by_hand():
    label = np.array([[0, 0, 1, 1],
                      [0, 255, 1, 3],
                      [255, 255, 3, 3]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 3],
                     [1, 1, 3, 0]])
    cm = confusion_matrix(pred, label, num_classes=5)
    expected = np.zeros((5, 5), np.int64)
    expected[0, 0], expected[0, 1] = 2, 1
    expected[1, 1], expected[1, 0] = 2, 1
    expected[3, 3], expected[3, 0] = 2, 1
    np.testing.assert_array_equal(cm, expected)
    iou = iou_from_confusion(cm)
    # class 0: tp 2, gt 3, pred 4 -> 2/5; class 1: 2/(3+3-2); class 2: predicted only on ignored pixels -> absent;
    # class 3: 2/(3+2-2); class 4: absent.
    np.testing.assert_allclose(iou[[0, 1, 3]], [2 / 5, 2 / 4, 2 / 3])
    assert np.isnan(iou[2]) and np.isnan(iou[4])
    summary = summarize(cm)
    assert summary["miou"] == pytest.approx((2 / 5 + 2 / 4 + 2 / 3) / 3)
    assert summary["pixel_accuracy"] == pytest.approx(6 / 9)


def test_class_predicted_but_absent_counts_as_zero():
    cm = confusion_matrix(np.array([0, 1, 1]), np.array([0, 0, 0]), num_classes=2)
    iou = iou_from_confusion(cm)
    assert iou[0] == pytest.approx(1 / 3) and iou[1] == 0.0
    assert summarize(cm)["miou"] == pytest.approx(1 / 6)


def test_confusion_rejects_labels_out_of_range():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0]), np.array([7]), num_classes=3)


@pytest.fixture(scope="module")
def tiny():
    model = DeepLabV3Plus(num_classes=NUM_CLASSES, stage_blocks=(1, 1, 1, 1), width=8, aspp_channels=16,
                          decoder_channels=16, low_level_channels=8, proj_dim=16)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.PRNGKey(0), jnp.zeros((1, WINDOW, WINDOW, 3)))
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"])
    predictor = WindowPredictor(model, WINDOW, windows_per_batch=4)
    return model, variables, forward, predictor


def test_image_smaller_than_window_is_mean_padded_and_cropped(tiny):
    _, variables, forward, predictor = tiny
    image = np.random.default_rng(0).integers(0, 256, (20, 27, 3), dtype=np.uint8)
    padded = np.empty((WINDOW, WINDOW, 3), np.uint8)
    padded[...] = MEAN_RGB_UINT8
    padded[:20, :27] = image
    expected = np.asarray(forward(variables, padded[None]))[0, :20, :27]
    got = predictor(variables, image)
    assert got.shape == (20, 27, NUM_CLASSES)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def loop_reference(forward, variables, image):
    """Window logits summed, one window at a time."""
    h, w = image.shape[:2]
    stride = math.ceil(WINDOW * 2 / 3)
    ys = list(range(0, h - WINDOW, stride)) + [h - WINDOW]
    xs = list(range(0, w - WINDOW, stride)) + [w - WINDOW]
    total = np.zeros((h, w, NUM_CLASSES), np.float64)
    for y in ys:
        for x in xs:
            total[y:y + WINDOW, x:x + WINDOW] += np.asarray(forward(variables, image[None, y:y + WINDOW, x:x + WINDOW]))[0]
    return total, len(ys) * len(xs)


@pytest.fixture(scope="module")
def large_image():
    return np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8)


def test_larger_image_sums_window_logits(tiny, large_image):
    _, variables, forward, predictor = tiny
    expected, windows = loop_reference(forward, variables, large_image)
    assert windows == 2 * 3  # not a multiple of windows_per_batch: the last batch is partly empty
    got = predictor(variables, large_image)
    assert got.shape == large_image.shape[:2] + (NUM_CLASSES,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_sharded_window_batch_matches_unsharded(tiny, large_image):
    model, variables, _, predictor = tiny
    assert jax.device_count() == 4
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = WindowPredictor(model, WINDOW, windows_per_batch=4,
                                    sharding=NamedSharding(mesh, PartitionSpec("data")))
    replicated = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    np.testing.assert_allclose(sharded(replicated, large_image), predictor(variables, large_image),
                               rtol=1e-5, atol=1e-4)
    small = np.random.default_rng(4).integers(0, 256, (20, 27, 3), dtype=np.uint8)
    for a, b in zip(sharded.labels(replicated, [small, large_image, small]),
                    predictor.labels(variables, [small, large_image, small])):
        np.testing.assert_array_equal(a, b)


def test_label_stream_shares_batches_across_images_and_matches_each_image_alone(tiny, large_image):
    _, variables, _, predictor = tiny
    rng = np.random.default_rng(2)
    small = [rng.integers(0, 256, (20 + i, 27, 3), dtype=np.uint8) for i in range(5)]  # one window each
    images = [small[0], small[1], large_image, small[2], small[3], small[4]]  # 1 + 1 + 6 + 1 + 1 + 1 windows
    expected = [predictor(variables, image).argmax(-1) for image in images]
    batches = []
    forward = predictor._forward
    predictor._forward = lambda v, b: batches.append(b.shape[0]) or forward(v, b)
    try:
        got = list(predictor.labels(variables, iter(images)))
    finally:
        predictor._forward = forward
    assert batches == [4, 4, 4]  # 11 windows in 3 batches; one image a batch would have taken 1 + 1 + 2 + 1 + 1 + 1
    assert len(got) == len(images)
    for image, g, e in zip(images, got, expected):
        assert g.shape == image.shape[:2]
        np.testing.assert_array_equal(g, e)


def test_evaluate_streams_through_the_predictor_as_through_a_plain_function(tiny, large_image):
    _, variables, _, predictor = tiny
    rng = np.random.default_rng(3)
    source = [{"image": im, "label": rng.integers(0, NUM_CLASSES, im.shape[:2]).astype(np.uint8)}
              for im in (large_image, rng.integers(0, 256, (30, 31, 3), dtype=np.uint8), large_image[:25])]
    streamed = evaluate(predictor, variables, source, NUM_CLASSES, progress=False)
    per_image = evaluate(lambda v, image: predictor(v, image), variables, source, NUM_CLASSES, progress=False)
    np.testing.assert_array_equal(streamed["confusion"], per_image["confusion"])
    assert streamed["confusion"].sum() == sum(item["label"].size for item in source)


def test_flip_adds_each_windows_mirror_image(tiny, large_image):
    model, variables, forward, _ = tiny
    flipping = WindowPredictor(model, WINDOW, windows_per_batch=4, flip=True)
    h, w = large_image.shape[:2]
    stride = math.ceil(WINDOW * 2 / 3)
    expected = np.zeros((h, w, NUM_CLASSES), np.float64)
    for y in window_origins(h, WINDOW, stride):
        for x in window_origins(w, WINDOW, stride):
            window = large_image[None, y:y + WINDOW, x:x + WINDOW]
            mirrored = np.asarray(forward(variables, window[:, :, ::-1]))[0, :, ::-1]
            expected[y:y + WINDOW, x:x + WINDOW] += np.asarray(forward(variables, window))[0] + mirrored
    np.testing.assert_allclose(flipping(variables, large_image), expected, rtol=1e-5, atol=1e-4)
    (labels,) = flipping.labels(variables, [large_image])
    np.testing.assert_array_equal(labels, flipping(variables, large_image).argmax(-1))
