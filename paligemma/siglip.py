"""SigLIP vision tower: a ViT that turns an image into one token per patch.

PaliGemma uses SigLIP's encoder output for every patch and drops its attention-pooling head, so
the head is not built here (its weights are skipped by name when loading). Module names follow the
hub keys `vision_tower.vision_model.*`.

Axes: B batch, S image side in pixels, p patch side, N = (S / p)^2 patches, D hidden size,
H heads, hd = D / H head dimension. Hook points (hookpoint.py) on each layer: `self_attn.hook_pattern`,
`hook_resid_post`.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .checkpointing import checkpoint
from .config import VisionConfig
from .hookpoint import HookPoint


class SiglipEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        # learned, one per patch; no random init (see GemmaModel.embed_tokens)
        self.position_embedding = nn.Embedding(c.num_patches, c.hidden_size,
                                               _weight=torch.zeros(c.num_patches, c.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.n_head = c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.hook_pattern = HookPoint()  # (B, H, N, N) probabilities; computed only when listened to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = attention(q, k, v, hook_pattern=self.hook_pattern)  # (B, H, N, hd); no mask: every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class SiglipMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c)
        self.hook_resid_post = HookPoint()  # (B, N, D) the layer's output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return self.hook_resid_post(x + self.mlp(self.layer_norm2(x)))


class SiglipEncoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(c) for _ in range(c.num_hidden_layers))


class SiglipVisionModel(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(c)
        self.encoder = SiglipEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, N, D) with N = (S / patch)^2."""
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = checkpoint(layer, x) if self.gradient_checkpointing and self.training else layer(x)
        return self.post_layernorm(x)


class SiglipVisionTower(nn.Module):
    """Exists only so that parameter names read `vision_tower.vision_model.*`, as in the hub files."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionModel(c)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)
