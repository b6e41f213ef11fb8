"""Semantic segmentation metrics from one confusion matrix, with mmsegmentation's names and rules.

IoU_c = TP / (TP + FP + FN) and Acc_c = TP / (TP + FN) over the pixels whose label is not the
ignore index; 0/0 is NaN and left out of the means (mIoU, mAcc), as in mmsegmentation: a class
neither labelled nor predicted has no IoU, one predicted but never labelled has IoU 0 and no
Acc. aAcc is all correct pixels over all labelled ones. Values are percentages.
"""

from __future__ import annotations

import math

import torch


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows the label and columns the prediction."""
    keep = label != ignore_index
    index = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def _percent(x: float) -> float | None:
    return None if math.isnan(x) else round(100.0 * x, 2)


def metrics(confusion: torch.Tensor, class_names: list[str]) -> dict:
    """{"mIoU", "mAcc", "aAcc", "per_class": {name: {"IoU", "Acc"}}} in percent (None: the class is absent)."""
    c = confusion.double()
    tp = c.diag()
    labelled, predicted = c.sum(1), c.sum(0)
    iou = tp / (labelled + predicted - tp)  # 0/0 -> nan
    acc = tp / labelled
    total = labelled.sum().item()
    return {
        "mIoU": _percent(torch.nanmean(iou).item()),
        "mAcc": _percent(torch.nanmean(acc).item()),
        "aAcc": _percent(tp.sum().item() / total) if total else None,
        "per_class": {
            name: {"IoU": _percent(iou[i].item()), "Acc": _percent(acc[i].item())} for i, name in enumerate(class_names)
        },
    }
