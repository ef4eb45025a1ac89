"""Token groups: which slots of a PaliGemma sequence hold the image, <bos>, the prompt, the suffix.

The processor lays every row out as (model.py)

    [pad ...] <image> x N  <bos>  prompt ... \\n | suffix ...  (generated tokens are suffix too)
              '---------- prefix: token_type 0 ----------'   '---- token_type 1 ----'

so the groups follow from the two facts the attention masks are built from, per slot: real (not
padding) and in the prefix. Of each row's real prefix tokens the first N are the image, the next one
is <bos>, the rest the prompt; real tokens outside the prefix are the suffix. Padding is in no group.
Knockout (which sees only those facts while decoding), patch sweeps and the report's attention
shares all read the groups from here, so the three agree on what "the prompt" is.

Axes: B batch, S slots (positions of the padded sequence; while decoding, the KV cache's slots,
generated token i at slot T + i for a prompt of T tokens).
"""
import torch

GROUPS = ("image", "bos", "prompt", "suffix")
PAD = -1  # the label of padding and of cache slots not yet written


def slot_groups(valid: torch.Tensor, prefix: torch.Tensor, n_image: int) -> torch.Tensor:
    """valid, prefix (B, S) bool -> (B, S) long: the index in GROUPS of each slot's group, PAD for padding.
    A row whose prefix is too short to hold the image and <bos> is an error (not PaliGemma's layout)."""
    real_prefix = valid & prefix
    count = real_prefix.sum(-1)  # (B,)
    short = (count < n_image + 1).nonzero()
    if len(short):
        b = int(short[0, 0])
        raise ValueError(f"row {b} has {int(count[b])} real prefix tokens (token_type 0): fewer than PaliGemma's "
                         f"layout of {n_image} image tokens and <bos> that the token groups {GROUPS} are read from")
    rank = real_prefix.long().cumsum(-1) - 1  # 0-based order among the row's real prefix tokens
    labels = torch.full(valid.shape, PAD, dtype=torch.long, device=valid.device)
    labels[real_prefix & (rank < n_image)] = 0
    labels[real_prefix & (rank == n_image)] = 1
    labels[real_prefix & (rank > n_image)] = 2
    labels[valid & ~prefix] = 3
    return labels


def token_groups(model, input_ids, attention_mask=None, token_type_ids=None, **_) -> torch.Tensor:
    """(B, T) inputs -> (B, T) group labels (slot_groups), checked against input_ids: the image group must be
    exactly the <image> tokens and <bos> the bos id. Extra keyword arguments (pixel_values) are ignored, so
    `token_groups(model, **inputs)` works."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    valid = attention_mask.bool()
    prefix = valid if token_type_ids is None else valid & (token_type_ids == 0)
    labels = slot_groups(valid, prefix, model.config.num_image_tokens)
    c = model.config
    wrong = ((labels == 0) != (input_ids == c.image_token_index)) | ((labels == 1) & (input_ids != c.bos_token_id))
    if wrong.any():
        b, t = (int(i) for i in wrong.nonzero()[0])
        raise ValueError(f"input_ids row {b}, position {t} (id {int(input_ids[b, t])}) breaks PaliGemma's layout that "
                         f"the token groups are read from: {c.num_image_tokens} <image> tokens "
                         f"(id {c.image_token_index}), then <bos> (id {c.bos_token_id}) first among the real tokens")
    return labels


def group_positions(labels: torch.Tensor) -> dict:
    """(1, T) labels of one row -> {group name: [positions]} for the groups present, in GROUPS order."""
    row = labels[0]
    return {name: (row == g).nonzero()[:, 0].tolist() for g, name in enumerate(GROUPS) if bool((row == g).any())}
