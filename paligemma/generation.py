"""Decoding with the static KV cache: greedy, sampling (temperature, top-k, top-p) and beam search.

One prefill over image + prompt fills the cache; then one token per step. Rows stop at <eos>
independently; the result holds only the new tokens, `pad_id` after each row's <eos>.

return_scores=True also returns each new token's probability: the softmax at temperature 1 of the
logits it was chosen from (before temperature, top-k and top-p, which shape the draw, not the
model's belief), 0 after <eos>. Beam search gives each token of the returned hypothesis its
probability given that hypothesis' own earlier tokens. A detection box's score is the mean of its
four <loc> tokens' (tasks/confidence.py).

Every one-token step is `decode_step`, eager or compiled (`compile=True`): its shapes never change
(the mask spans all of the cache's slots), the slot it writes arrives as a tensor, and nothing in it
reads a value back to the host, so torch.compile traces it once for the whole decode and
mode="reduce-overhead" replays it as one CUDA graph (gpt-fast's recipe). The loop around it (the
cache's host count, the stop test) stays in Python.
"""
import functools

import torch
import torch.nn.functional as F


COMPILE_SLOTS = 64  # compile=True sizes the cache in multiples of this (unused slots are masked)


@torch.no_grad()
def generate(model, input_ids, pixel_values, attention_mask=None, token_type_ids=None, max_new_tokens=32,
             do_sample=False, temperature=1.0, top_k=None, top_p=None, num_beams=1, length_penalty=1.0,
             seed=None, eos_id=None, pad_id=None, compile: bool | str = False, return_scores: bool = False):
    """(B, T) prompt -> (B, <= max_new_tokens) new tokens; with return_scores, (tokens, probabilities),
    both (B, L), each probability float32 (see the module docstring). compile: run each one-token step
    under torch.compile (True: mode "reduce-overhead" on CUDA, inductor's default elsewhere; or a mode
    name); the first call compiles (seconds to minutes), later calls with the same shapes reuse it."""
    eos_id = model.config.eos_token_id if eos_id is None else eos_id
    pad_id = model.config.pad_token_id if pad_id is None else pad_id
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not bool(attention_mask[:, -1].all()):  # the next token is read at the last position: a pad there is garbage
        rows = attention_mask[:, -1].eq(0).nonzero()[:, 0].tolist()
        raise ValueError(f"generate: rows {rows} end in padding (attention_mask 0 at the last position); pad prompts "
                         "on the left, as Processor does")
    if max_new_tokens <= 0:
        empty = input_ids.new_empty(B, 0)
        return (empty, empty.float()) if return_scores else empty
    if compile and num_beams > 1:
        raise ValueError("compile=True compiles the greedy / sampling step; beam search reorders the cache at "
                         "every step: use num_beams=1, or compile=False")
    slots = T + max_new_tokens
    if compile:  # the step's shapes include the cache's length: round it up so that other prompts reuse the graph
        slots = -(-slots // COMPILE_SLOTS) * COMPILE_SLOTS
    cache = model.new_cache(B, slots)
    # the prefill needs only the last position's logits: (T, 257k) more per row would cost ~10% of the
    # prefill's FLOPs and gigabytes of memory at batch 8
    h = model.hidden_states(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                            token_type_ids=token_type_ids, cache=cache)  # (B, T, D)
    logits = model.language_model.logits(h[:, -1])  # (B, V)
    if num_beams > 1:
        if do_sample:
            raise ValueError("beam search with sampling is not supported: choose num_beams=1 or do_sample=False")
        return _beam_search(model, cache, logits, B, num_beams, max_new_tokens, length_penalty, eos_id, pad_id,
                            return_scores)
    step = compiled_step(model, compile, logits.device) if compile else decode_step
    gen = torch.Generator(device=logits.device).manual_seed(seed) if seed is not None else None
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=logits.device)
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    probs = torch.zeros(B, max_new_tokens, device=logits.device) if return_scores else None  # (B, L)
    for t in range(max_new_tokens):
        if do_sample:
            token = _sample(logits.float(), temperature, top_k, top_p, gen)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(done, pad_id)
        out[:, t] = token
        if return_scores:
            p = logits.float().softmax(-1).gather(1, token[:, None])[:, 0]  # (B,)
            probs[:, t] = p.masked_fill(done, 0.0)
        done |= token == eos_id
        if t + 1 == max_new_tokens or bool(done.all()):  # one host sync per step: cheap next to a decoder pass
            return (out[:, :t + 1], probs[:, :t + 1]) if return_scores else out[:, :t + 1]
        logits = step(model, cache, token, cache.reserve(1))
    return (out, probs) if return_scores else out


def decode_step(model, cache, token: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) after one new token per row, token (B,), written at cache slot `slot` ((1,) long,
    taken with cache.reserve(1)). The same as model(token[:, None], attention_mask=1, token_type_ids=1,
    cache=cache)[:, -1] (each new token is real and in the suffix), with the slot given as a tensor:
    the function torch.compile sees reads no host int, so one graph serves every position."""
    real = torch.ones_like(token)[:, None]  # (B, 1)
    x = model.hook_embed(model.embed(token[:, None], None))  # (B, 1, D)
    _, positions = cache.append(real, torch.zeros_like(real, dtype=torch.bool), slot)
    masks = model.masks(slot, 1, cache.valid, cache.prefix)
    h = model.language_model.model(x, positions, masks, cache, slot)  # (B, 1, D)
    return model.language_model.logits(h[:, -1])


def compiled_step(model, mode: bool | str, device: torch.device):
    """decode_step under torch.compile, whole (fullgraph: a graph break would be an error, not a slow path)."""
    from .packing import unpack
    unpack(model)  # inductor cannot trace oneDNN's blocked weights (inference=True packs them on CPU)
    if device.type == "cpu":  # int8 layers on fbgemm: packed now, outside the graph (quantize.fbgemm_int8)
        from .quantize import FbgemmInt8
        for m in model.modules():
            if isinstance(m, FbgemmInt8):
                m.pack()
    if mode is True:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    return _compiled(mode)


@functools.cache
def _compiled(mode: str):
    return torch.compile(decode_step, mode=mode, fullgraph=True)


def _sample(logits, temperature, top_k, top_p, gen):
    """transformers' order: temperature, then top-k, then top-p (nucleus), then a draw."""
    logits = logits / max(temperature, 1e-5)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


def _beam_search(model, cache, logits, B, n_beams, max_new_tokens, length_penalty, eos_id, pad_id,
                 return_scores=False):
    """Beam search with transformers' scoring: sum of log-probs / length**length_penalty, the 2 * n_beams best
    candidates per step, finished hypotheses kept in a per-row pool of n_beams, and its early-stop rule.
    return_scores: each token's probability travels with its hypothesis (reordered, pooled as it is).

    Axes: B prompts, n_beams beams per prompt, V vocabulary, L = max_new_tokens; C = 2 * n_beams
    candidates per prompt and step."""
    dev, V = logits.device, logits.shape[-1]
    cache.reorder(torch.arange(B, device=dev).repeat_interleave(n_beams))  # each row's prompt, n_beams times
    logits = logits.repeat_interleave(n_beams, 0)  # (B*n_beams, V)
    running = torch.full((B, n_beams, max_new_tokens), pad_id, dtype=torch.long, device=dev)  # (B, n_beams, L) live beams
    run_scores = torch.zeros(B, n_beams, device=dev)  # (B, n_beams) sum of log-probs
    run_scores[:, 1:] = -1e9  # all beams start identical: let only the first one expand at step 0
    finished = running.clone()  # (B, n_beams, L) pool of finished hypotheses, best first
    fin_scores = torch.full((B, n_beams), -1e9, device=dev)  # (B, n_beams) their length-normalised scores
    fin_full = torch.zeros(B, n_beams, dtype=torch.bool, device=dev)  # (B, n_beams) pool slot holds a real hypothesis
    open_rows = torch.ones(B, 1, dtype=torch.bool, device=dev)  # rows whose pool can still improve
    top_half = torch.arange(2 * n_beams, device=dev) < n_beams  # only the n_beams best candidates may finish
    rows = torch.arange(B, device=dev)[:, None]
    if return_scores:  # (B, n_beams, L) each token's probability, beside `running` and `finished`
        run_probs = torch.zeros(B, n_beams, max_new_tokens, device=dev)
        fin_probs = run_probs.clone()
    for t in range(max_new_tokens):
        log_probs = F.log_softmax(logits.float(), -1).view(B, n_beams, V)
        scores = log_probs + run_scores[..., None]
        cand_scores, idx = scores.view(B, -1).topk(2 * n_beams)  # (B, C) best scores, flat index beam * V + token
        beam, token = idx // V, idx % V  # (B, C) each
        cand = running[rows, beam]  # (B, C, L) each candidate's tokens so far
        cand[..., t] = token
        if return_scores:
            cand_probs = run_probs[rows, beam]  # (B, C, L)
            cand_probs[..., t] = log_probs.view(B, -1).gather(1, idx).exp()
        stops = (token == eos_id) | (t + 1 == max_new_tokens)  # (B, C)
        # the n_beams best candidates that go on
        live_scores = cand_scores - 1e9 * stops
        pick = live_scores.topk(n_beams).indices  # (B, n_beams) into C
        running, run_scores, src = cand[rows, pick], live_scores.gather(1, pick), beam.gather(1, pick)
        if return_scores:
            run_probs = cand_probs[rows, pick]
        # candidates that just finished compete for the pool of n_beams finished hypotheses
        new_fin = cand_scores / (t + 1) ** length_penalty  # (B, C)
        new_fin = new_fin - 1e9 * ~(stops & top_half) - 1e9 * ~open_rows
        merged = torch.cat([fin_scores, new_fin], 1)  # (B, n_beams + C): old pool, then candidates
        keep = merged.topk(n_beams).indices  # (B, n_beams)
        fin_scores = merged.gather(1, keep)
        finished = torch.cat([finished, cand], 1)[rows, keep]
        if return_scores:
            fin_probs = torch.cat([fin_probs, cand_probs], 1)[rows, keep]
        fin_full = torch.cat([fin_full, stops & top_half], 1).gather(1, keep)
        worst = torch.where(fin_full, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, -1e9))
        open_rows &= (run_scores[:, :1] / (t + 1) ** length_penalty > worst).any(-1, keepdim=True)
        if not bool(open_rows.any()) or bool(stops.all()):
            break
        cache.reorder((src + rows * n_beams).view(-1))
        logits = decode_step(model, cache, running[..., t].reshape(-1), cache.reserve(1))
    best = finished[:, 0]  # (B, L), pool sorted best first
    length = int(((best == eos_id).cumsum(-1) == 0).sum(-1).add(1).clamp(max=t + 1).max())
    if return_scores:
        return best[:, :length], fin_probs[:, 0, :length]
    return best[:, :length]
