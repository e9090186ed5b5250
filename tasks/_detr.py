"""The rf100 suite's scoring: DETR outputs -> COCO result entries -> mAP@50 with pycocotools.

mAP@50 is COCO's average precision at IoU 0.5, the metric of the RF100 benchmark
(Ciaglia et al. 2022) and of Auto-FlexSwitch Table VII: per category, precision
interpolated at 101 recall points, up to 100 detections per image, area 'all'; the mean
over the categories that have ground truth. It is ``COCOeval.stats[1]``; here COCOeval
runs with the single IoU threshold 0.5, which gives the same number without the nine
other thresholds.

DETR predictions (Carion et al. 2020; transformers' ``post_process_object_detection``
with threshold 0): each object query is one detection, its class the most probable
real class (the last logit is "no object"), its score that probability, its box the
predicted (cx, cy, w, h), normalised to the image, scaled to the original image size.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np
import torch


def detections_from_detr(
    logits: torch.Tensor, boxes: torch.Tensor, image_ids: Sequence[int], sizes: Sequence[tuple[int, int]]
) -> list[dict[str, Any]]:
    """COCO result entries {image_id, category_id, bbox: [x, y, w, h] in pixels, score} of a
    batch of DETR outputs: logits (B, Q, C + 1), boxes (B, Q, 4) normalised (cx, cy, w, h),
    sizes (height, width) of the original images. Class index c is category id c."""
    if logits.shape[:2] != boxes.shape[:2] or boxes.shape[-1] != 4 or not len(image_ids) == len(logits) == len(sizes):
        raise ValueError(f"DETR outputs do not match: logits {tuple(logits.shape)}, boxes {tuple(boxes.shape)}, "
                         f"{len(image_ids)} image ids, {len(sizes)} sizes")
    scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)
    cx, cy, w, h = boxes.float().unbind(-1)
    size = torch.tensor([list(s) for s in sizes], dtype=torch.float32)  # (B, 2): height, width
    height, width = size[:, :1], size[:, 1:]
    xywh = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height], -1)
    return [
        {"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)}
        for image_id, image_scores, image_labels, image_boxes in zip(image_ids, scores, labels, xywh.tolist())
        for score, label, box in zip(image_scores.tolist(), image_labels.tolist(), image_boxes)
    ]


def _ground_truth(dataset: dict[str, Any]):
    """A pycocotools COCO object of a COCO json dict. Annotations are renumbered from 1:
    COCOeval marks a detection matched by storing the ground truth's id, so a ground truth
    with id 0 (Roboflow exports number from 0) would count as never matched. ``iscrowd``
    and ``area`` default to 0 and w * h where an export leaves them out (COCOeval reads both)."""
    from pycocotools.coco import COCO

    annotations = []
    for number, annotation in enumerate(dataset["annotations"], start=1):
        annotation = {**annotation, "id": number}
        annotation.setdefault("iscrowd", 0)
        annotation.setdefault("area", float(annotation["bbox"][2] * annotation["bbox"][3]))
        annotations.append(annotation)
    coco = COCO()
    coco.dataset = {**dataset, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def map50(ground_truth: dict[str, Any], detections: list[dict[str, Any]]) -> float:
    """COCO AP at IoU 0.5 (area all, 100 detections per image) of ``detections`` (COCO
    result entries) against ``ground_truth`` (a COCO json dict); NaN without ground truth."""
    from pycocotools.cocoeval import COCOeval

    gt = _ground_truth(ground_truth)
    if not gt.getAnnIds():
        return float("nan")
    if not detections:  # pycocotools cannot load an empty result list; nothing found is AP 0
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluation.params.iouThrs = np.array([0.5])
        evaluation.evaluate()
        evaluation.accumulate()
    area_all, max_dets_100 = 0, evaluation.params.maxDets.index(100)
    precision = evaluation.eval["precision"][0, :, :, area_all, max_dets_100]  # (recall points, categories)
    precision = precision[:, (precision > -1).all(0)]  # -1: a category without ground truth
    return float(precision.mean()) if precision.size else float("nan")
