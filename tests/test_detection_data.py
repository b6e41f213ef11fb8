"""Detection data: digit scenes, COCO reading and cleaning, transforms, multi-scale batches, COCO scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from helpers import one_thread  # noqa: F401
from swinx.detection import scenes
from swinx.detection.data import (
    CocoDetection,
    MultiScaleCollate,
    collate,
    eval_transforms,
    find_splits,
    load_instances,
    train_transforms,
)
from swinx.detection.evaluate import coco_evaluate, to_coco_results
from swinx.engine.data import DataError, Unreadable

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(train_scenes=8, val_scenes=4, size=96, digits=(2, 5), scale=(16, 40), seed=3)


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory) -> Path:
    return scenes.make_scenes(tmp_path_factory.mktemp("scenes") / "digits", **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tight_box(mask: np.ndarray) -> list[float]:
    """xyxy of the nonzero pixels of a (H, W) mask."""
    rows, cols = np.nonzero(mask)
    return [cols.min(), rows.min(), cols.max() + 1.0, rows.max() + 1.0]


# ---------------------------------------------------------------------------------------------
# Digit scenes


def test_scenes_are_deterministic(scene_dir, tmp_path):
    again = scenes.make_scenes(tmp_path / "again", **SMALL)
    first, second = _files(scene_dir), _files(again)
    assert len(first) == SMALL["train_scenes"] + SMALL["val_scenes"] + 2
    assert first == second
    other = scenes.make_scenes(tmp_path / "other", **dict(SMALL, seed=4, train_scenes=2, val_scenes=1))
    assert _files(other)["train/000000.png"] != first["train/000000.png"]
    assert not list(scene_dir.rglob("*.tmp")), "temporary files left behind"


def test_scenes_use_disjoint_digit_pools(scene_dir):
    pools = scenes.digit_pools()
    used = {}
    for split in ("train", "val"):
        doc = json.loads((scene_dir / "annotations" / f"instances_{split}.json").read_text())
        used[split] = set()
        for image in doc["images"]:
            assert image["digit_pool"] == split
            assert image["digits"] == [a["source_index"] for a in doc["annotations"] if a["image_id"] == image["id"]]
        for a in doc["annotations"]:
            # The recorded source digit, re-rendered at the recorded place, is exactly the stored mask:
            # the provenance is true, so the pool it names is the pool that was used.
            mask = mask_utils.decode(a["segmentation"])
            h, w = a["sprite_hw"]
            x, y = a["paste_xy"]
            sprite = scenes.digit_sprite(pools[split][a["source_index"]], max(h, w))
            assert sprite.shape == (h, w)
            expected = np.zeros_like(mask)
            expected[y : y + h, x : x + w] = sprite > scenes.MASK_THRESHOLD
            assert np.array_equal(mask, expected)
            assert a["category_id"] == int(pools[f"{split}_labels"][a["source_index"]]) + 1
            used[split].add(pools[split][a["source_index"]].tobytes())
    assert used["train"] and used["val"]
    assert not used["train"] & used["val"], "a digit image appears in both train and val scenes"
    assert len(pools["train"]) == 4000 and len(pools["val"]) == 1000


def test_scene_annotations_are_tight_and_consistent(scene_dir):
    size = SMALL["size"]
    for split, count in (("train", SMALL["train_scenes"]), ("val", SMALL["val_scenes"])):
        doc = json.loads((scene_dir / "annotations" / f"instances_{split}.json").read_text())
        assert [c["name"] for c in doc["categories"]] == [str(d) for d in range(10)]
        assert [c["id"] for c in doc["categories"]] == list(range(1, 11))
        assert len(doc["images"]) == count
        hi = SMALL["digits"][1]
        for image in doc["images"]:
            png = Image.open(scene_dir / split / image["file_name"])
            assert png.mode == "RGB" and png.size == (size, size) == (image["width"], image["height"])
            pixels = np.asarray(png).max(axis=2).astype(float)
            anns = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
            assert 1 <= len(anns) <= hi
            union = np.zeros((size, size), bool)
            for a in anns:
                mask = mask_utils.decode(a["segmentation"])
                assert mask.shape == (size, size)
                x0, y0, x1, y1 = _tight_box(mask)
                assert a["bbox"] == [x0, y0, x1 - x0, y1 - y0]
                assert a["area"] == int(mask.sum()) and a["iscrowd"] == 0
                assert SMALL["scale"][0] * 0.5 <= max(x1 - x0, y1 - y0) <= SMALL["scale"][1]
                union |= mask.astype(bool)
            # Digits are bright strokes on a dark canvas.
            assert pixels[union].mean() > 120 and pixels[~union].mean() < 40
            boxes = [np.array(a["bbox"][:2] + [a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]) for a in anns]
            for i, box in enumerate(boxes):
                iou, _ = scenes._box_iou_cover(box, boxes[:i])
                assert iou <= scenes.MAX_IOU + 1e-9


def test_digit_sprite_keeps_shape():
    digit = scenes.digit_pools()["train"][0]
    for side in (12, 28, 75):
        sprite = scenes.digit_sprite(digit, side)
        assert max(sprite.shape) == side and sprite.dtype == np.uint8
    rows, cols = np.nonzero(digit)
    crop = digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    back = np.asarray(Image.fromarray(scenes.digit_sprite(digit, 80)).resize(crop.shape[::-1], Image.BILINEAR))
    assert np.corrcoef(back.ravel().astype(float), crop.ravel().astype(float))[0, 1] > 0.9


def test_ensure_scenes_reuses_complete_sets_only(scene_dir, tmp_path):
    assert scenes.scenes_complete(scene_dir, **SMALL)
    assert not scenes.scenes_complete(scene_dir, **dict(SMALL, seed=5))
    stamp = (scene_dir / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert scenes.ensure_scenes(scene_dir, **SMALL) == scene_dir
    assert (scene_dir / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp
    partial = scenes.make_scenes(tmp_path / "partial", **dict(SMALL, train_scenes=1, val_scenes=1))
    (partial / "annotations" / "instances_val.json").unlink()
    assert not scenes.scenes_complete(partial, **dict(SMALL, train_scenes=1, val_scenes=1))


# ---------------------------------------------------------------------------------------------
# A hand-made COCO file with every blemish


def _tiny_coco(root: Path, **changes) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(images / "a.png")
    Image.fromarray(np.full((24, 32), 200, np.uint8), "L").save(images / "negative.jpg")
    (images / "broken.png").write_bytes(b"this is not a png")
    Image.new("RGBA", (20, 16), (255, 0, 0, 128)).save(images / "rgba.png")
    document = {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 20, "file_name": "negative.jpg", "width": 32, "height": 24},
            {"id": 30, "file_name": "broken.png", "width": 40, "height": 30},
            {"id": 40, "file_name": "rgba.png"},  # no size: read from the file's header
        ],
        "categories": [{"id": 90, "name": "zebra"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 10,
                "category_id": 7,
                "bbox": [2, 3, 10, 8],
                "area": 40,
                "iscrowd": 0,
                "segmentation": [[2, 3, 12, 3, 2, 11]],
            },
            {"id": 2, "image_id": 10, "category_id": 90, "bbox": [30, 20, 20, 20], "iscrowd": 0},  # reaches outside
            {"id": 3, "image_id": 10, "category_id": 5, "bbox": [1, 1, 5, 5], "iscrowd": 0},  # unknown category
            {"id": 4, "image_id": 10, "category_id": 3, "bbox": [5, 5, 0, 4], "iscrowd": 0},  # zero width
            {
                "id": 5,
                "image_id": 10,
                "category_id": 3,
                "bbox": [0, 0, 10, 10],
                "iscrowd": 1,
                "segmentation": {"size": [30, 40], "counts": [100, 20, 1080]},
            },
            {"id": 6, "image_id": 40, "category_id": 3, "bbox": [-9, -9, 4, 4], "iscrowd": 0},  # wholly outside
            {"id": 7, "image_id": 40, "category_id": 3, "bbox": [4, 2, 6, 6], "iscrowd": 0},
            {"id": 8, "image_id": 30, "category_id": 3, "bbox": [4, 2, 6, 6], "iscrowd": 0},
        ],
    }
    document.update(changes)
    ann = root / "instances.json"
    ann.write_text(json.dumps(document))
    return images, ann


def test_coco_cleaning_and_samples(tmp_path, capsys):
    images, ann = _tiny_coco(tmp_path)
    ds = CocoDetection(images, ann)
    assert capsys.readouterr().out == ""  # pycocotools' index messages are silenced
    assert ds.label_to_cat_id == {1: 3, 2: 7, 3: 90} and ds.class_names == ["cat", "dog", "zebra"]
    assert ds.stats["unknown_category"] == 1
    assert ds.stats["clipped_boxes"] == 1
    assert ds.stats["dropped_boxes"] == 2  # zero width, and wholly outside
    assert ds.stats["crowd"] == 1
    assert ds.stats["negative_images"] == 1 and ds.stats["objects"] == 4
    assert any("category_id" in line for line in ds.problems())

    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert target["image_id"] == 10 and target["orig_size"] == (30, 40)
    assert target["labels"].tolist() == [2, 3] and target["labels"].dtype == torch.int64
    assert target["boxes"].format.value == "XYXY" and tuple(target["boxes"].canvas_size) == (30, 40)
    assert target["boxes"].tolist() == [[2, 3, 12, 11], [30, 20, 40, 30]]
    masks = target["masks"]
    assert masks.shape == (2, 30, 40) and masks.dtype == torch.uint8
    assert masks[0, 4, 3] == 1 and masks[0, 10, 11] == 0  # polygon (triangle), not its box
    assert masks[1].sum() == 100 and masks[1, 20:30, 30:40].all()  # no segmentation: the box

    negative_image, negative = ds[1]
    assert negative_image.shape == (3, 24, 32)  # gray JPEG decoded to RGB
    assert negative["boxes"].shape == (0, 4) and negative["labels"].shape == (0,)
    assert negative["masks"].shape == (0, 24, 32)

    # A negative stays a negative through flips, resizes and batching.
    flipped = CocoDetection(images, ann, transforms=train_transforms(hflip=1.0))[1]
    (resized,), (resized_target,) = MultiScaleCollate(sizes=(48,))([flipped])[0]
    assert resized.shape == (3, 48, 64) and resized_target["boxes"].shape == (0, 4)
    assert resized_target["masks"].shape == (0, 48, 64) and resized_target["labels"].shape == (0,)

    broken = ds[2]
    assert isinstance(broken, Unreadable) and broken.path.endswith("broken.png")

    rgba_image, rgba = ds[3]
    assert rgba_image.shape == (3, 16, 20) and rgba["boxes"].tolist() == [[4, 2, 10, 8]]

    (batch_images, batch_targets), bad = collate([ds[0], ds[2], ds[1]])
    assert len(batch_images) == len(batch_targets) == 2 and bad == [broken]
    assert batch_targets[1]["image_id"] == 20
    assert collate([ds[2]]) == (None, [broken])

    # The val split shares the train split's label mapping, even listing categories in another order.
    val = CocoDetection(images, ann, categories=[{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}])
    assert val.label_to_cat_id == {1: 7, 2: 3} and val.stats["unknown_category"] == 2
    assert val[0][1]["labels"].tolist() == [1]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "not a COCO instances file: its top level is a JSON list"),
        ('{"annotations": [], "categories": []}', "not a COCO instances file: missing 'images'"),
        ('{"images": {}, "annotations": [], "categories": []}', "'images' is a dict"),
    ],
)
def test_malformed_json_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        CocoDetection(tmp_path, path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        load_instances(tmp_path / "absent.json")


def test_annotation_naming_absent_image(tmp_path):
    images, ann = _tiny_coco(tmp_path)
    document = json.loads(ann.read_text())
    document["annotations"].append({"id": 12, "image_id": 99, "category_id": 3, "bbox": [0, 0, 2, 2]})
    ann.write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"annotation 12 names image_id 99, which is not in 'images'"):
        CocoDetection(images, ann)


def test_missing_image_file(tmp_path):
    images, ann = _tiny_coco(tmp_path)
    (images / "a.png").unlink()
    (images / "rgba.png").unlink()
    with pytest.raises(DataError, match=r"2 of 4 images .* missing .*a\.png"):
        CocoDetection(images, ann)


def test_find_splits(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    with pytest.raises(DataError, match="instances_train"):
        find_splits(root)
    (root / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(DataError, match="no image folder"):
        find_splits(root)
    (root / "train2017").mkdir()
    assert find_splits(root) == {
        "train": (root / "train2017", root / "annotations" / "instances_train2017.json"),
        "val": None,
    }
    with pytest.raises(DataError, match="no COCO val split"):
        find_splits(root, require_val=True)
    (root / "annotations" / "instances_val2017.json").write_text("{}")
    (root / "images" / "val2017").mkdir(parents=True)
    assert find_splits(root)["val"] == (root / "images" / "val2017", root / "annotations" / "instances_val2017.json")
    other = tmp_path / "elsewhere.json"
    other.write_text("{}")
    explicit = find_splits(train_images=root / "train2017", train_ann=other)
    assert explicit == {"train": (root / "train2017", other), "val": None}
    assert find_splits(root, val_ann=other)["val"] == (root / "images" / "val2017", other)
    with pytest.raises(DataError, match="does not exist"):
        find_splits(train_images=root / "nope", train_ann=other)
    with pytest.raises(DataError, match="does not exist"):
        find_splits(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------
# Transforms and multi-scale batches keep boxes and masks together


def _assert_boxes_fit_masks(target, tol: float):
    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) > 0
    for box, mask in zip(target["boxes"].tolist(), target["masks"].numpy()):
        assert np.abs(np.array(box) - np.array(_tight_box(mask))).max() <= tol, (box, _tight_box(mask))


def test_flip_and_resize_keep_boxes_on_masks(scene_dir):
    split = scene_dir / "train", scene_dir / "annotations" / "instances_train.json"
    plain = CocoDetection(*split)
    flipped = CocoDetection(*split, transforms=train_transforms(hflip=1.0))
    image, target = flipped[0]
    raw_image, raw_target = plain[0]
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert target["masks"].dtype == torch.uint8
    assert torch.allclose(image, raw_image.flip(-1) / 255.0)
    assert torch.equal(target["masks"], raw_target["masks"].flip(-1))
    _assert_boxes_fit_masks(target, 0)

    multi = MultiScaleCollate(sizes=(173,))
    (images, targets), bad = multi([flipped[i] for i in range(3)] + [Unreadable("x.png", "broken")])
    assert len(images) == 3 and len(bad) == 1 and multi.last_size == 173
    for image, target in zip(images, targets):
        assert min(image.shape[-2:]) == 173 and target["masks"].shape[-2:] == image.shape[-2:]
        assert tuple(target["boxes"].canvas_size) == tuple(image.shape[-2:])
        _assert_boxes_fit_masks(target, 2)

    evaluated = CocoDetection(*split, transforms=eval_transforms(), masks=False)[0]
    assert "masks" not in evaluated[1] and evaluated[0].shape == raw_image.shape


def test_multiscale_draws_one_size_per_batch_reproducibly(scene_dir):
    ds = CocoDetection(
        scene_dir / "val",
        scene_dir / "annotations" / "instances_val.json",
        transforms=train_transforms(0.5),
        masks=False,
    )
    batch = [ds[0], ds[1]]

    def sizes():
        torch.manual_seed(0)
        multi, seen = MultiScaleCollate(sizes=(64, 80, 96)), []
        for _ in range(12):
            (images, _), _ = multi(batch)
            assert len({tuple(i.shape[-2:]) for i in images}) == 1  # square scenes: one size per batch
            seen.append(images[0].shape[-1])
        return seen

    first = sizes()
    assert first == sizes() and set(first) == {64, 80, 96}
    seeded = MultiScaleCollate(sizes=(64, 80, 96), generator=torch.Generator().manual_seed(1))
    assert seeded(batch)[0][0][0].shape[-1] in (64, 80, 96)


# ---------------------------------------------------------------------------------------------
# COCO scoring


def _truth_as_predictions(ds) -> list[dict]:
    out = []
    for i in range(len(ds)):
        sample = ds[i]
        if isinstance(sample, Unreadable):
            continue
        _, target = sample
        n = len(target["labels"])
        out.append(
            dict(
                image_id=target["image_id"],
                boxes=target["boxes"].clone(),
                scores=torch.linspace(1, 0.5, n),
                labels=target["labels"].clone(),
                masks=target["masks"][:, None].float(),
            )
        )
    return out


def test_evaluate_perfect_garbage_and_empty(scene_dir, capsys):
    ds = CocoDetection(scene_dir / "val", scene_dir / "annotations" / "instances_val.json")
    perfect = _truth_as_predictions(ds)
    scores = coco_evaluate(ds, perfect)
    present = {ds.class_names[label - 1] for p in perfect for label in p["labels"].tolist()}
    for kind in ("bbox", "segm"):
        assert scores[kind]["AP"] == pytest.approx(1.0) and scores[kind]["AP50"] == pytest.approx(1.0)
        assert list(scores[kind]["per_class"]) == ds.class_names
        for name, ap in scores[kind]["per_class"].items():
            assert ap == (pytest.approx(1.0) if name in present else None)

    generator = torch.Generator().manual_seed(0)
    garbage = []
    for p in perfect:
        n, size = 20, SMALL["size"]
        xy = torch.rand(n, 2, generator=generator) * (size - 6)
        garbage.append(
            dict(
                image_id=p["image_id"],
                boxes=torch.cat([xy, xy + 5], 1),
                scores=torch.rand(n),
                labels=torch.randint(1, 11, (n,), generator=generator),
                masks=torch.rand(n, 1, size, size, generator=generator) ** 8,
            )
        )
    bad = coco_evaluate(ds, garbage)
    assert bad["bbox"]["AP"] < 0.02 and bad["segm"]["AP"] < 0.02

    empty = coco_evaluate(ds, [])
    assert empty["bbox"]["AP"] == 0.0 and empty["segm"]["AP"] == 0.0
    # Images with no prediction at all count as misses, not as errors.
    half = coco_evaluate(ds, perfect[:2], iou_types=("bbox",))
    assert set(half) == {"bbox"} and 0 < half["bbox"]["AR100"] < 1
    assert capsys.readouterr().out == ""


def test_evaluate_maps_labels_back_to_category_ids(tmp_path):
    images, ann = _tiny_coco(tmp_path)
    ds = CocoDetection(images, ann)
    perfect = _truth_as_predictions(ds)
    results = to_coco_results(perfect, ds.label_to_cat_id)
    assert sorted({r["category_id"] for r in results["bbox"]}) == [3, 7, 90]
    assert json.dumps(results)  # RLE counts are JSON-ready
    read = [p["image_id"] for p in perfect]  # the broken image's object cannot be found ...
    scores = coco_evaluate(ds, perfect, image_ids=read)
    assert scores["bbox"]["AP"] == pytest.approx(1.0) and scores["segm"]["AP"] == pytest.approx(1.0)
    assert set(scores["bbox"]["per_class"]) == {"cat", "dog", "zebra"}
    assert coco_evaluate(ds, perfect, iou_types=("bbox",))["bbox"]["AP"] < 1  # ... and by default counts as missed
    # Swapping two labels must cost: the mapping back to ids is what is being scored.
    swapped = [
        dict(p, labels=torch.where(p["labels"] == 2, 3, torch.where(p["labels"] == 3, 2, p["labels"]))) for p in perfect
    ]
    assert coco_evaluate(ds, swapped, iou_types=("bbox",), image_ids=read)["bbox"]["per_class"]["dog"] == 0.0
    # A bare pycocotools COCO works too (labels then follow its sorted category ids).
    assert isinstance(ds.coco, COCO)
    assert coco_evaluate(ds.coco, perfect, iou_types=("bbox",), image_ids=read)["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(ds, [dict(perfect[0], image_id=12345)])
