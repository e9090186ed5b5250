"""mAP@50 (mergebench.tasks._detr) on hand-made COCO cases with known answers, and the
conversion of DETR outputs to COCO result entries."""
from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch

pytest.importorskip("pycocotools")

from mergebench.tasks._detr import detections_from_detr, map50  # noqa: E402

# 3 images; category 0 is a Roboflow super-category without annotations (left out of the mean)
GROUND_TRUTH = {
    "images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 80} for i in (1, 2, 3)],
    "categories": [{"id": 0, "name": "things"}, {"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [50, 40, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 2, "bbox": [20, 20, 40, 40], "area": 1600, "iscrowd": 0},
    ],
}


def perfect(score: float = 0.9) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score}
            for a in GROUND_TRUTH["annotations"]]


def test_perfect_detections_score_one():
    assert map50(GROUND_TRUTH, perfect()) == pytest.approx(1.0)


def test_annotation_id_zero_is_matched_like_any_other():
    # Roboflow numbers annotations from 0; pycocotools alone would never match id 0 (its "unmatched" value)
    renumbered = {**GROUND_TRUTH, "annotations": [{**a, "id": a["id"] - 1} for a in GROUND_TRUTH["annotations"]]}
    assert map50(renumbered, perfect()) == pytest.approx(1.0)


def test_one_missed_object_gives_the_interpolated_value():
    # category a: 2 of 3 objects found, no false positive -> precision 1 up to recall 2/3, i.e. at
    # 67 of COCO's 101 recall points (0, 0.01, ..., 0.66); category b perfect
    detections = [d for d in perfect() if d["bbox"] != [50, 40, 20, 10]]
    assert map50(GROUND_TRUTH, detections) == pytest.approx((67 / 101 + 1.0) / 2)


def test_a_higher_scored_false_positive_halves_the_precision():
    # category b: a wrong box (IoU 0) above the right one -> precision 1/2 at every recall point
    detections = perfect(score=0.5) + [{"image_id": 3, "category_id": 2, "bbox": [70, 0, 20, 20], "score": 0.9}]
    assert map50(GROUND_TRUTH, detections) == pytest.approx((1.0 + 0.5) / 2)


def test_iou_threshold_is_one_half():
    def shifted(dx: float) -> list[dict]:  # image 3's box moved right by dx: IoU = (40 - dx) / (40 + dx)
        detections = perfect()
        detections[3]["bbox"] = [20 + dx, 20, 40, 40]
        return detections

    assert map50(GROUND_TRUTH, shifted(10)) == pytest.approx(1.0)  # IoU 0.6: a hit
    assert map50(GROUND_TRUTH, shifted(16)) == pytest.approx(0.5)  # IoU 0.43: category b has AP 0


def test_wrong_category_and_unknown_category_do_not_count():
    detections = perfect()
    detections[3].update(category_id=1, score=0.5)  # b's object labelled a: a's lowest-ranked false positive
    assert map50(GROUND_TRUTH, detections) == pytest.approx((1.0 + 0.0) / 2)  # a still perfect, b missed
    detections = perfect() + [{"image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "score": 1.0}]
    assert map50(GROUND_TRUTH, detections) == pytest.approx(1.0)


def test_agrees_with_cocoeval_stats_at_iou_half():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    generator = torch.Generator().manual_seed(0)
    detections = []
    for annotation in GROUND_TRUTH["annotations"]:  # jittered boxes, random scores, and some noise boxes
        for _ in range(3):
            x, y, w, h = (torch.tensor(annotation["bbox"], dtype=torch.float) + 6 * torch.randn(4, generator=generator)).tolist()
            detections.append({"image_id": annotation["image_id"], "category_id": annotation["category_id"],
                               "bbox": [x, y, abs(w) + 1, abs(h) + 1], "score": float(torch.rand(1, generator=generator))})
    gt = COCO()
    gt.dataset = copy.deepcopy(GROUND_TRUTH)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(copy.deepcopy(detections)), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    value = map50(GROUND_TRUTH, detections)
    assert 0.0 < value < 1.0
    assert value == pytest.approx(evaluation.stats[1])  # AP @ IoU=0.50, area all, maxDets 100


def test_no_detections_and_no_ground_truth():
    assert map50(GROUND_TRUTH, []) == 0.0
    assert math.isnan(map50({**GROUND_TRUTH, "annotations": []}, perfect()[:1]))


def test_missing_iscrowd_and_area_default():
    bare = {**GROUND_TRUTH, "annotations": [{k: v for k, v in a.items() if k not in ("iscrowd", "area")}
                                            for a in GROUND_TRUTH["annotations"]]}
    assert map50(bare, perfect()) == pytest.approx(1.0)


def test_detr_outputs_to_coco_results():
    # one image 80 x 100 (h x w), two queries; classes: 0, 1, "no object"
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 5.0]]])
    boxes = torch.tensor([[[0.5, 0.25, 0.2, 0.5], [0.1, 0.2, 0.2, 0.2]]])  # cx, cy, w, h
    results = detections_from_detr(logits, boxes, [7], [(80, 100)])
    probabilities = logits.softmax(-1)
    assert [r["category_id"] for r in results] == [1, 0]  # "no object" is never a class
    assert results[0]["score"] == pytest.approx(float(probabilities[0, 0, 1]))
    assert results[1]["score"] == pytest.approx(float(probabilities[0, 1, 0]))
    assert results[0]["bbox"] == pytest.approx([40.0, 0.0, 20.0, 40.0])  # x = (0.5 - 0.1) * 100, h = 0.5 * 80
    assert results[1]["bbox"] == pytest.approx([0.0, 8.0, 20.0, 16.0])  # y = (0.2 - 0.1) * 80
    assert {r["image_id"] for r in results} == {7}


def test_detr_conversion_matches_transformers_post_processing():
    from types import SimpleNamespace

    try:
        from transformers import DetrImageProcessorPil as Processor
    except ImportError:
        from transformers import DetrImageProcessor as Processor
    generator = torch.Generator().manual_seed(1)
    logits, boxes = torch.randn(2, 4, 5, generator=generator), torch.rand(2, 4, 4, generator=generator) * 0.5 + 0.1
    sizes = [(60, 90), (33, 41)]
    ours = detections_from_detr(logits, boxes, [1, 2], sizes)
    theirs = Processor().post_process_object_detection(SimpleNamespace(logits=logits, pred_boxes=boxes),
                                                       threshold=0.0, target_sizes=sizes)
    for image, result in enumerate(theirs):
        mine = ours[4 * image : 4 * image + 4]
        assert [d["category_id"] for d in mine] == result["labels"].tolist()
        assert [d["score"] for d in mine] == pytest.approx(result["scores"].tolist())
        x0, y0, x1, y1 = result["boxes"].unbind(-1)
        expected = torch.stack([x0, y0, x1 - x0, y1 - y0], -1).flatten().tolist()
        assert [value for d in mine for value in d["bbox"]] == pytest.approx(expected, abs=1e-4)


def test_mismatched_outputs_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        detections_from_detr(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), [1], [(1, 1), (1, 1)])
