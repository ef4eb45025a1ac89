"""Every PaliGemma task, not only captions: the prompt says which, and each has its answer format and metric.

boxes.py              detection answers: boxes <-> <locNNNN> tokens, parsing, drawing
average_precision.py  mAP@0.5 and COCO mAP@[.5:.95], per class, equal to pycocotools
answers.py            VQA accuracy, exact match, ANLS, character error rate
registry.py           task_of(prefix), and the metric of each task
"""
from .answers import anls, character_error_rate, exact_match, normalize_answer, score_answers, score_ocr, vqa_accuracy
from .average_precision import average_precision
from ..tokenizer import LOC_TOKENS, SEG_TOKENS
from .boxes import (Detection, Detections, detect_prompt, detection_text, draw, loc_tokens,
                    parse_detections)
from .registry import METRICS, TASKS, score, task_of

__all__ = ["loc_tokens", "parse_detections", "detect_prompt", "detection_text", "draw", "Detection", "Detections",
           "LOC_TOKENS", "SEG_TOKENS", "average_precision", "vqa_accuracy", "exact_match", "normalize_answer", "anls",
           "character_error_rate", "score_answers", "score_ocr", "task_of", "score", "METRICS", "TASKS"]
