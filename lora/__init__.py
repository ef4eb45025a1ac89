"""LoRA for PaliGemma (filled by the LoRA issue)."""
