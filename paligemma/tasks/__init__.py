"""Every PaliGemma task, not only captions: the prompt says which, and each has its answer format and metric.

boxes.py              detection answers: boxes <-> <locNNNN> tokens, parsing, drawing
average_precision.py  mAP@0.5 and COCO mAP@[.5:.95], per class, equal to pycocotools
resampled_ap.py       the same mAPs on a thousand bootstrap resamples of the images at once
answers.py            VQA accuracy, exact match, ANLS, character error rate
vqvae.py              the mask VQ-VAE (big_vision's vae-oid.npz): sixteen <seg> codes <-> a 64 x 64 mask
segmentation.py       segment answers: parsed into boxes and image-sized masks, written from masks, scored, drawn
mask_files.py         segment rows with a mask file per object: checked, made into training answers, references
registry.py           task_of(prefix), and the metric of each task
resampling.py         95 % intervals and paired B - A comparisons of every task metric (the captions' draws)
"""
from ..tokenizer import LOC_TOKENS, SEG_TOKENS
from .answers import anls, character_error_rate, exact_match, normalize_answer, score_answers, score_ocr, vqa_accuracy
from .average_precision import average_precision
from .boxes import Detection, Detections, detect_prompt, detection_text, draw, loc_tokens, parse_detections
from .registry import METRICS, TASKS, score, task_of
from .evaluation import score_texts
from .segmentation import (Segmentation, Segmentations, box_iou, draw_segmentations, parse_segmentations,
                           score_segmentations, segment_tokens)
from .vqvae import MaskDecoder, MaskEncoder

__all__ = ["loc_tokens", "parse_detections", "detect_prompt", "detection_text", "draw", "Detection", "Detections",
           "LOC_TOKENS", "SEG_TOKENS", "average_precision", "vqa_accuracy", "exact_match", "normalize_answer", "anls",
           "character_error_rate", "score_answers", "score_ocr", "task_of", "score", "score_texts", "METRICS", "TASKS",
           "MaskDecoder", "MaskEncoder", "Segmentation", "Segmentations", "parse_segmentations", "segment_tokens",
           "score_segmentations", "box_iou", "draw_segmentations"]
