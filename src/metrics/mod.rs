//! Task metrics: mIoU (confusion matrix), COCO-style mAP, Top-k accuracy.
