"""PaliGemma's task formats: what the answers of each task mean, and how they are scored.

vqvae.py          the mask VQ-VAE (big_vision's vae-oid.npz): sixteen <seg> codes <-> a 64 x 64 mask
segmentation.py   segment answers: parsed into boxes and image-sized masks, written from masks, scored, drawn
"""
from .segmentation import (Segmentation, Segmentations, box_iou, draw_segmentations, parse_segmentations,
                           score_segmentations, segment_tokens)
from .vqvae import MaskDecoder, MaskEncoder

__all__ = ["MaskDecoder", "MaskEncoder", "Segmentation", "Segmentations", "parse_segmentations", "segment_tokens",
           "score_segmentations", "box_iou", "draw_segmentations"]
