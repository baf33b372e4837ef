"""Probe math (probes.py): metrics against hand-computed values, the heads on features with known content, the
probe-set writer and reader."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation import probes
from evaluation.probes import ProbeConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def test_depth_metrics_hand_computed():
    gt = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])  # one image; the 0 is unknown depth and is left out
    pred = torch.tensor([[[1.1, 2.0], [2.0, 9.0]]])
    m = probes.depth_metrics(pred, gt)
    assert m["rmse"] == pytest.approx(math.sqrt((0.01 + 0 + 4) / 3))
    assert m["absrel"] == pytest.approx((0.1 + 0 + 0.5) / 3)
    assert m["d1"] == pytest.approx(2 / 3)  # ratios 1.1, 1, 2
    assert m["d2"] == pytest.approx(2 / 3)  # 2 > 1.5625
    assert m["d3"] == pytest.approx(2 / 3)  # 2 > 1.953125
    d = np.log([1.1, 1.0, 0.5])
    assert m["si_rmse"] == pytest.approx(math.sqrt((d**2).mean() - d.mean() ** 2))


def test_depth_metrics_average_per_image_and_alignment():
    gt = torch.stack([torch.full((2, 2), 2.0), torch.tensor([[1.0, 2.0], [3.0, 4.0]])])
    pred = torch.stack([torch.full((2, 2), 3.0), 0.5 * torch.tensor([[1.0, 2.0], [3.0, 4.0]]) + 1])
    m = probes.depth_metrics(pred, gt)
    rmse2 = math.sqrt(((0.5 * np.array([1, 2, 3, 4]) + 1 - np.array([1, 2, 3, 4])) ** 2).mean())
    assert m["rmse"] == pytest.approx((1.0 + rmse2) / 2)  # per image, then the mean of the two
    assert m["rmse_aligned"] == pytest.approx(0.0, abs=1e-9)  # a scale and shift fit both images exactly
    assert m["d1_aligned"] == 1.0


def test_miou_matches_hand_built_confusion():
    gt = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 4, -1])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 4, 3])  # the -1 is unlabeled: ignored
    conf = probes.confusion_matrix(pred, gt, n_classes=5)
    expected = torch.tensor([[2, 1, 0, 0, 0], [0, 1, 1, 0, 0], [1, 0, 2, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    assert torch.equal(conf, expected)
    # IoU: class 0 2/(3+3-2), class 1 1/(2+2-1), class 2 2/(3+3-2), class 3 absent from both: left out, class 4 1
    m = probes.miou(conf)
    assert m["miou"] == pytest.approx((2 / 4 + 1 / 3 + 2 / 4 + 1) / 4)
    assert m["pixel_acc"] == pytest.approx(6 / 9)


def test_retrieval_map_hand_computed():
    # four crops in three images; crops 0 and 2 are one object, crops 1 and 3 another
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    key, image = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 2])
    r = probes.retrieval_map(x, key, image)
    # query 0 (image 0) ranks crops 2, 3 (own image excluded): positive at rank 1 -> AP 1
    # query 1 ranks 2 (0.96), 3 (0.6): positive 3 at rank 2 -> AP 1/2
    # query 2 ranks 1 (0.96), 3 (0.8), 0 (0.6): positive 0 at rank 3 -> AP 1/3
    # query 3 ranks 2 (0.8), 1 (0.6), 0 (0): positive 1 at rank 2 -> AP 1/2
    assert r["map"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert r["recall@1"] == pytest.approx(1 / 4)
    assert r["queries"] == 4


def test_knn_weighted_votes():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[0.95, 0.05], [0.1, 1.0]])
    assert probes.knn_accuracy(train, labels, test, torch.tensor([0, 1]), k=3) == 1.0
    # k=3 with equal weights would let two far votes win; the exp(sim/T) weights keep the nearest one in charge
    assert probes.knn_accuracy(train, labels, test, torch.tensor([0, 1]), k=3, temperature=0.01) == 1.0


def test_resized_rows_are_rows_of_the_resized_map():
    v = torch.randn(2, 5, 3, 7)  # (B, K, h, w)
    full = F.interpolate(v, size=(20, 28), mode="bilinear", align_corners=False)  # (B, K, 20, 28)
    rows = torch.tensor([[0, 7, 19], [3, 4, 11]])
    got = probes.resized_rows(v.permute(0, 2, 3, 1), rows, (20, 28))  # (B, 3, 28, K)
    want = full.permute(0, 2, 3, 1)[torch.arange(2)[:, None], rows]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_depth_from_bins_linear_normalization():
    cfg = ProbeConfig(depth_bins=4, min_depth=1.0, max_depth=4.0)  # bin centres 1, 2, 3, 4
    logits = torch.tensor([-5.0, 9.6, -1.0, -2.0])  # relu + 0.1 -> weights (0.1, 9.7, 0.1, 0.1)
    assert probes.depth_from_bins(logits, cfg).item() == pytest.approx((0.1 + 19.4 + 0.3 + 0.4) / 10.0)
    soft = probes.depth_from_bins(logits, ProbeConfig(depth_bins=4, min_depth=1.0, max_depth=4.0, depth_norm="softmax"))
    assert soft.item() == pytest.approx((logits.softmax(0) * torch.arange(1.0, 5.0)).sum().item())


def _planar_depth(n, h, w, size, seed):
    """Per-image depth a + b*row at the patch centres, and the ground truth at full size as its bilinear resize
    (so a probe on the right features can be exact)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, generator=g) * 4 + 1, torch.rand(n, generator=g) * 4
    rows = (torch.arange(h) + 0.5) / h
    patch_depth = (a[:, None] + b[:, None] * rows)[:, :, None].expand(n, h, w)
    gt = F.interpolate(patch_depth[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return patch_depth, gt


def test_depth_probe_exact_features_vs_random():
    n, h, w, size = 40, 4, 4, (32, 32)
    patch_depth, gt = _planar_depth(n, h, w, size, seed=0)
    cfg = ProbeConfig(depth_steps=300, batch=8, depth_rows=8)
    exact = torch.stack([patch_depth / 10, 1 - patch_depth / 10], -1)  # (n, h, w, 2): depth, linearly
    noise = torch.randn(n, h, w, 16)
    tr, te = slice(0, 30), slice(30, None)
    scores = {}
    for name, feats in (("exact", exact), ("random", noise)):
        head = probes.fit_depth(feats[tr], None, gt[tr], cfg)
        scores[name] = probes.depth_metrics(probes.predict_depth(head, feats[te], None, cfg, size), gt[te])
    assert scores["exact"]["rmse"] < 0.1, scores
    assert scores["exact"]["d1"] > 0.99
    assert scores["random"]["rmse"] > 5 * scores["exact"]["rmse"], scores


def test_depth_probe_uses_cls_and_is_seeded():
    n, h, w, size = 24, 2, 2, (8, 8)
    g = torch.Generator().manual_seed(1)
    depth_per_image = torch.rand(n, generator=g) * 6 + 1
    gt = depth_per_image[:, None, None].expand(n, *size).contiguous()
    patches = torch.randn(n, h, w, 4, generator=g)  # carries nothing
    cls = torch.stack([depth_per_image / 10, 1 - depth_per_image / 10], -1)  # carries the depth
    cfg = ProbeConfig(depth_steps=200, batch=8, depth_rows=4)
    with_cls = probes.fit_depth(patches[:16], cls[:16], gt[:16], cfg)
    m = probes.depth_metrics(probes.predict_depth(with_cls, patches[16:], cls[16:], cfg, size), gt[16:])
    without = probes.fit_depth(patches[:16], None, gt[:16], cfg)
    m0 = probes.depth_metrics(probes.predict_depth(without, patches[16:], None, cfg, size), gt[16:])
    assert m["rmse"] < 0.5 < 1.0 < m0["rmse"], (m, m0)
    again = probes.fit_depth(patches[:16], cls[:16], gt[:16], cfg)
    assert all(torch.equal(p, q) for p, q in zip(with_cls.state_dict().values(), again.state_dict().values()))


def test_segmentation_probe_learns_separable_classes():
    n, h, w, size, C = 12, 4, 4, (16, 16), 3
    g = torch.Generator().manual_seed(0)
    classes = torch.randint(0, C, (n, h, w), generator=g)
    feats = F.one_hot(classes, C).float() + 0.05 * torch.randn(n, h, w, C, generator=g)
    labels = F.interpolate(classes[:, None].float(), size=size, mode="nearest")[:, 0].long()
    labels[:, 0, 0] = -1  # unlabeled pixels are ignored
    cfg = ProbeConfig(seg_steps=150, batch=4, seg_rows=8)
    head = probes.fit_segmentation(feats[:8], labels[:8], C, cfg)
    pred = probes.predict_segmentation(head, feats[8:], size)
    assert probes.miou(probes.confusion_matrix(pred, labels[8:], C))["miou"] > 0.6


def test_classifier_fits_separable_data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=g)
    x = F.one_hot(y, 4).float() * 3 + torch.randn(200, 4, generator=g)
    head = probes.fit_classifier(x[:150], y[:150], 4, ProbeConfig(cls_steps=100))
    assert (head(x[150:]).argmax(1) == y[150:]).float().mean() > 0.9


# ----------------------------------------------------------------------------------------------------------------
# Probe sets.


def test_depth_heads_average_the_maps_of_heads_seeded_apart():
    n, h, w, size = 24, 4, 4, (16, 16)
    patch_depth, gt = _planar_depth(n, h, w, size, seed=2)
    feats = torch.stack([patch_depth / 10, torch.randn(n, h, w)], -1)
    cfg = ProbeConfig(depth_steps=40, batch=8, depth_rows=4, seed=5)
    one = lambda seed: probes.predict_depth(probes.fit_depth(feats[:16], None, gt[:16], replace(cfg, seed=seed)),
                                            feats[16:], None, cfg, size)
    assert torch.equal(probes.fit_predict_depth(feats[:16], None, gt[:16], feats[16:], None, cfg, size), one(5))
    both = probes.fit_predict_depth(feats[:16], None, gt[:16], feats[16:], None, replace(cfg, depth_heads=2), size)
    assert torch.allclose(both, (one(5) + one(1005)) / 2, atol=1e-6) and not torch.allclose(one(5), one(1005))


def test_object_views_limit_which_views_give_objects(tmp_path):
    ps = probes.make_probe_sets(tmp_path / "p", n_images=12, seed=3, size=64, min_pixels=12, object_views=4,
                                log=None)
    index = json.loads((ps / "index.json").read_text())
    assert len(index["images"]) == 12 and index["objects"]
    assert {o["image"] for o in index["objects"]} <= {0, 1, 2, 3}
    full = json.loads((probes.make_probe_sets(tmp_path / "q", n_images=12, seed=3, size=64, min_pixels=12,
                                              log=None) / "index.json").read_text())
    assert index["objects"] == [o for o in full["objects"] if o["image"] < 4]  # the same views, the same objects


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    return probes.make_probe_sets(tmp_path_factory.mktemp("p") / "probes", n_images=16, seed=3, size=64,
                                  min_pixels=12, log=None)


def test_probe_set_roundtrip(probe_dir):
    index = json.loads((probe_dir / "index.json").read_text())
    assert index["format"] == probes.FORMAT and len(index["images"]) == 16
    ps = probes.load_probe_set(probe_dir, crop_size=24)
    assert ps.images.shape == (16, 64, 64, 3) and ps.images.dtype == np.uint8
    assert ps.depth.shape == (16, 64, 64) and (ps.depth > 0).all()
    assert ps.labels.min() >= 0 and ps.labels.max() < len(ps.classes)  # every synthetic pixel has a class
    # whole scenes are test scenes: scene 3 of 0..7 (views 6, 7) and scene 7 (views 14, 15)
    assert ps.train.tolist() == [s % 4 != 3 for s in range(8) for _ in range(2)]
    assert ps.crops.shape[1:] == (24, 24, 3) and len(ps.crops) == len(index["objects"]) > 0
    for o, label, key in zip(index["objects"], ps.obj_label, ps.obj_key):
        assert ps.object_classes[label] == o["category"]
        same = [k for oo, k in zip(index["objects"], ps.obj_key) if oo["key"] == o["key"]]
        assert set(same) == {key}
    with pytest.raises(FileExistsError):
        probes.make_probe_sets(probe_dir, n_images=2, size=64, log=None)


def test_probe_scenes_are_deterministic_and_held_out(probe_dir, tmp_path):
    again = probes.make_probe_sets(tmp_path / "again", n_images=4, seed=3, size=64, min_pixels=12, log=None)
    first = probes.load_probe_set(probe_dir)
    second = probes.load_probe_set(again)
    assert np.array_equal(first.images[:4], second.images)
    # the training data draws scenes from default_rng([seed, index]); the probe namespace never does
    from dataengine import scenes

    train_like = scenes.random_scene(np.random.default_rng([3, 0]))
    probe = scenes.random_scene(np.random.default_rng([probes.PROBE_TAG, 3, 0]))
    assert not np.allclose(train_like.room, probe.room)


def test_object_crop_masks_everything_but_the_object():
    image = np.full((20, 20, 3), 200, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    image[5:10, 5:10] = (255, 0, 0)
    crop = probes.object_crop(image, mask, (5, 5, 10, 10), size=10, margin=0.5)  # a 10x10 window around the box
    assert (crop[4:6, 4:6] == (255, 0, 0)).all()
    assert (crop[0, 0] == probes.GRAY).all()


def write_rgbd_frames(root, n=8, size=(30, 40)):
    """n RGB-D frame folders in scenes.load_rgbd's format: depth in uint16 millimetres, a plane tilted along rows."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        f = root / f"frame{i:02d}"
        f.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(f / "rgb.png")
        depth = (1000 * (1 + i * 0.1 + np.linspace(0, 2, size[0])[:, None] * np.ones(size[1]))).astype(np.uint16)
        Image.fromarray(depth).save(f / "depth.png")
        (f / "intrinsics.json").write_text(json.dumps({"fx": 30, "fy": 30, "cx": 20, "cy": 15}))
        instance = np.zeros(size, np.uint8)
        instance[5:15, 5:15] = 1
        Image.fromarray(instance).save(f / "instance.png")
        (f / "labels.json").write_text(json.dumps({"1": "box"}))
    return root


def test_rgbd_set(tmp_path):
    ps = probes.load_rgbd_set(write_rgbd_frames(tmp_path / "frames"), size=32, test_every=4)
    assert ps.images.shape == (8, 32, 32, 3) and ps.depth.shape == (8, 32, 32)
    assert ps.labels is None and ps.crops is None
    assert ps.train.tolist() == [True, True, True, False] * 2
    assert ps.depth[0, 0, 0] == pytest.approx(1.0, abs=0.05) and ps.depth[0, -1, 0] == pytest.approx(3.0, abs=0.05)
    with pytest.raises(FileNotFoundError, match="RGB-D frame folders"):
        probes.load_rgbd_set(tmp_path / "nothing")
