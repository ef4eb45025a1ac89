"""Images and text -> the exact tensors PaliGemma was trained on.

Layout of one example (big_vision's PaliGemma format):

    <image> x N  <bos>  prompt  \\n  suffix  <eos>
    |------------ prefix: token_type 0 ----|-- 1 --|

`labels` are -100 everywhere but the suffix and its <eos>: the model is trained to write the
caption, never to predict the image placeholders or the prompt. Batches are padded on the *left*,
so every row's last prompt token sits in the same column and generation can append in lockstep.
"""
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import IGNORE
from .tokenizer import Tokenizer


class ImageError(ValueError):
    """An image file that cannot be decoded; `reason` says why without the path."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_image(path: str | Path) -> Image.Image:
    """Decode every byte of an image file (a truncated JPEG fails only here, not at open). Every way
    decoding can fail is the file's fault, and PIL's errors share no base class: UnidentifiedImageError
    and truncation are OSErrors, a decompression bomb (over Image.MAX_IMAGE_PIXELS) is a plain
    Exception, a broken PNG chunk a SyntaxError. So all of them become one ImageError (a ValueError) naming the file;
    a missing file stays a FileNotFoundError."""
    try:
        with Image.open(path) as f:
            f.load()
            return f.copy() if f.mode != "P" else f.convert("RGBA")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"refused as a possible decompression bomb ({e}); raise PIL.Image.MAX_IMAGE_PIXELS "
                               "if the image is genuine") from None
    except Exception as e:  # see the docstring
        raise ImageError(path, f"not a readable image ({type(e).__name__}: {e})") from None


def preprocessor_image_size(path: Path, default: int) -> int:
    """The image side that the hub's preprocessor_config.json gives ("size": {"height": S, "width": S}), or
    `default` (the model config's) where it gives none. A file that is no JSON object, or a size that is no
    object with a positive integer height, is named with the field."""
    from .config import ConfigError
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(settings).__name__}")
    size = settings.get("size", {})
    if not isinstance(size, dict):
        raise ConfigError(f"{path}: field 'size' is {size!r}; expected an object such as "
                          '{"height": 224, "width": 224}')
    height = size.get("height", default)
    if not isinstance(height, int) or isinstance(height, bool) or height < 1:
        raise ConfigError(f"{path}: field 'size.height' is {height!r}; expected a positive integer (pixels)")
    return height


class Processor:
    def __init__(self, tokenizer: Tokenizer, image_size: int, num_image_tokens: int, image_token_index: int | None = None):
        if image_token_index is not None and tokenizer.image_id != image_token_index:
            raise ValueError(f"{tokenizer.path}: <image> has id {tokenizer.image_id} but the model config says "
                             f"image_token_index={image_token_index}: tokenizer and checkpoint do not belong together")
        self.tokenizer, self.image_size, self.num_image_tokens = tokenizer, image_size, num_image_tokens

    @classmethod
    def from_pretrained(cls, path_or_repo_id, revision=None) -> "Processor":
        from .config import PaliGemmaConfig
        from .weights import resolve
        folder = resolve(path_or_repo_id, revision)
        if not (folder / "tokenizer.model").exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.model (PaliGemma's SentencePiece model)")
        config = PaliGemmaConfig.from_json(folder / "config.json")
        size = config.vision.image_size
        pre = folder / "preprocessor_config.json"
        if pre.exists():  # the hub's image processor settings win where they exist
            size = preprocessor_image_size(pre, size)
        return cls(Tokenizer(folder / "tokenizer.model"), size, config.num_image_tokens, config.image_token_index)

    # -- images --------------------------------------------------------------------------------
    def load_image(self, image, name: str = "image") -> Image.Image:
        """A PIL image or a path -> RGB PIL image. Grey, RGBA, palette and 16-bit images are converted."""
        if isinstance(image, (str, Path)):
            name, image = str(image), read_image(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"{name}: expected a PIL image or a path, got {type(image).__name__}")
        if image.mode in ("I;16", "I;16L", "I;16B", "I", "F"):  # 16-bit or float grey: scale to 8 bits
            a = np.asarray(image, dtype=np.float32)
            peak = 65535.0 if image.mode.startswith("I;16") else max(float(a.max()), 1.0)
            image = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))  # -> "L"
        if image.mode in ("RGBA", "LA", "PA", "P"):  # composite over white, as transformers does
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba)
        return image.convert("RGB") if image.mode != "RGB" else image

    def pixel_values(self, images, names=None) -> torch.Tensor:
        """-> (B, 3, S, S) float32 in [-1, 1]: bicubic resize to S x S, then (x / 255 - 0.5) / 0.5."""
        out = []
        for i, im in enumerate(images):
            im = self.load_image(im, names[i] if names else f"image {i}")
            im = im.resize((self.image_size, self.image_size), resample=Image.BICUBIC)
            a = np.asarray(im, dtype=np.float32) / 255.0
            out.append(torch.from_numpy((a - 0.5) / 0.5).permute(2, 0, 1))
        return torch.stack(out)

    # -- text ----------------------------------------------------------------------------------
    def prefix_ids(self, prompt: str, index: int = 0) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {index}: empty prompt (PaliGemma expects a task prefix such as 'caption en')")
        t = self.tokenizer
        return [t.image_id] * self.num_image_tokens + [t.bos_id] + t.encode(prompt + "\n")

    def __call__(self, images, prompts, suffixes=None, max_length: int | None = None) -> dict:
        """Lists of images (PIL or paths) and prompts [and suffixes] -> dict of (B, T) tensors + pixel_values."""
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: one prompt per image")
        if suffixes is not None and len(suffixes) != len(images):
            raise ValueError(f"{len(images)} images but {len(suffixes)} suffixes: one suffix per image")
        names = [str(x) if isinstance(x, (str, Path)) else None for x in images]
        rows, types = [], []
        for i, prompt in enumerate(prompts):
            prefix = self.prefix_ids(prompt, i)
            suffix = [] if suffixes is None else self.tokenizer.encode(suffixes[i]) + [self.tokenizer.eos_id]
            if max_length is not None:
                if len(prefix) > max_length:
                    raise ValueError(f"prompt {i}{f' (image {names[i]})' if names[i] else ''}: {len(prefix)} tokens "
                                     f"({self.num_image_tokens} image + text) do not fit max_length={max_length}")
                cut = len(prefix) + len(suffix) - max_length
                if cut > 0:
                    warnings.warn(f"suffix {i}: truncated by {cut} of {len(suffix)} tokens to fit max_length={max_length}")
                    suffix = suffix[:len(suffix) - cut]
            rows.append(prefix + suffix)
            types.append([0] * len(prefix) + [1] * len(suffix))
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), self.tokenizer.pad_id, dtype=torch.long)
        mask, token_types = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, (r, ty) in enumerate(zip(rows, types)):
            ids[i, T - len(r):], mask[i, T - len(r):], token_types[i, T - len(r):] = torch.tensor(r), 1, torch.tensor(ty)
        out = dict(input_ids=ids, attention_mask=mask, token_type_ids=token_types,
                   pixel_values=self.pixel_values(images, [n or f"image {i}" for i, n in enumerate(names)]))
        if suffixes is not None:
            out["labels"] = ids.masked_fill(token_types == 0, IGNORE)
        return out

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def batch_decode(self, batch) -> list[str]:
        return [self.decode(row) for row in batch]
