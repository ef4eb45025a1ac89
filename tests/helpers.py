"""Test helpers: tiny random PaliGemma checkpoints built with transformers and saved in the hub's own
format, inputs in PaliGemma's layout, a toy tokenizer. Imported as `tests.helpers`; the pytest
fixtures built on them live in conftest.py."""
import contextlib
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

IMAGE_TOKEN = 299
VOCAB = 300


def tiny_hf_config(family: str = "gemma", image_size: int = 16, patch_size: int = 4, **text):
    from transformers import PaliGemmaConfig
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, patch_size=patch_size, image_size=image_size, vision_use_head=False)
    if family == "gemma":
        t = dict(model_type="gemma", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=12, vocab_size=VOCAB)
    else:  # PaliGemma 2 quirks switched on hard enough to matter at this size
        t = dict(model_type="gemma2", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=12, vocab_size=VOCAB,
                 query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=1.5,
                 final_logit_softcapping=0.7)
    t.update(text)
    return PaliGemmaConfig(vision_config=vision, text_config=t, image_token_index=IMAGE_TOKEN,
                           projection_dim=t["hidden_size"], hidden_size=2048)


def save_hf(config, folder: Path, seed: int = 0, scale_norms: bool = True, **save_kwargs) -> Path:
    """Random transformers model -> folder. Norm weights are randomised too (they init to 0/1)."""
    from transformers import PaliGemmaForConditionalGeneration
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    if scale_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder, **save_kwargs)
    return folder


def load_hf(folder, dtype=torch.float32):
    from transformers import PaliGemmaForConditionalGeneration
    return PaliGemmaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager", dtype=dtype).eval()


def batch(n_image_tokens: int, prompt_lens=(5,), suffix_len: int = 0, seed: int = 0, image_size: int = 16):
    """Left-padded PaliGemma-layout inputs: [pad] <image>*N <bos> prompt | suffix."""
    g = torch.Generator().manual_seed(seed)
    T = n_image_tokens + max(prompt_lens) + suffix_len
    ids = torch.zeros(len(prompt_lens), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for i, p in enumerate(prompt_lens):
        n = n_image_tokens + p + suffix_len
        row = torch.cat([torch.full((n_image_tokens,), IMAGE_TOKEN), torch.tensor([2]),
                         torch.randint(3, VOCAB - 1, (p - 1 + suffix_len,), generator=g)])
        ids[i, T - n:] = row
        mask[i, T - n:] = 1
        types[i, T - suffix_len:] = 1
    pixels = torch.rand(len(prompt_lens), 3, image_size, image_size, generator=g) * 2 - 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, pixel_values=pixels)


WORDS = ("a an the of with and near two three many some green blue red white grey large small river road "
         "field building plane airport parking lot trees houses bridge lake beach ships stadium church pond").split()


def tiny_tokenizer(folder: Path, vocab_size: int = 299) -> Path:
    """A Gemma-layout SentencePiece model trained on random remote-sensing-like word salad."""
    import random
    from paligemma.tokenizer import train_tokenizer
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", "", " ."])
             for _ in range(3000)]
    return train_tokenizer(texts, folder / "tokenizer", vocab_size=vocab_size)


def hf_processor(folder: Path, image_size: int = 16, n_tokens: int = 16):
    from transformers import GemmaTokenizer, PaliGemmaProcessor, SiglipImageProcessor
    tok = GemmaTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    ip = SiglipImageProcessor(size={"height": image_size, "width": image_size}, resample=3,
                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ip.image_seq_length = n_tokens
    return PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


class Crash(Exception):
    """Stands for the process dying; raised right after a checkpoint is written."""


@contextlib.contextmanager
def crash_after(train_module, step: int):
    """While active, train.main dies with Crash as soon as its checkpoint of `step` (or later) is saved."""
    save = train_module.save_train_state

    def save_then_crash(directory, model, optimizer, saved_step, *args, **kwargs):
        save(directory, model, optimizer, saved_step, *args, **kwargs)
        if saved_step >= step:
            raise Crash(f"simulated crash after the checkpoint of step {saved_step}")

    train_module.save_train_state = save_then_crash
    try:
        yield
    finally:
        train_module.save_train_state = save


def bad_images(folder: Path) -> dict[str, Path]:
    """Image files that fail to decode in each of PIL's ways (issue #27), beside nothing else:
    'truncated' (a JPEG cut in half: OSError at load), 'broken chunk' (a PNG whose second IDAT chunk
    has a garbled type: SyntaxError at load), 'bomb' (a PNG header claiming 20000 x 20000 pixels, over
    twice PIL's MAX_IMAGE_PIXELS: DecompressionBombError, no OSError, at open)."""
    import io
    import struct
    import zlib
    import numpy as np
    from PIL import Image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    image.save(buf, "PNG")
    png = buf.getvalue()
    i = png.find(b"IDAT")
    n = int.from_bytes(png[i - 4:i], "big")
    body = png[i + 4:i + 4 + n]
    two = chunk(b"IDAT", body[:n // 2]) + chunk(b"IDAT", body[n // 2:])
    two = two[:two.rfind(b"IDAT")] + b"I\x00AT" + two[two.rfind(b"IDAT") + 4:]
    (folder / "broken_chunk.png").write_bytes(png[:i - 4] + two + png[i + 8 + n:])
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                      + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return {"truncated": folder / "truncated.jpg", "broken chunk": folder / "broken_chunk.png",
            "bomb": folder / "bomb.png"}
