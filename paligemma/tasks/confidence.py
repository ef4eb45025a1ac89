"""How sure the model was of each `<locNNNN>` it wrote: the per-token probabilities of a generation
(generate(..., return_scores=True)) lined up with the `<loc>` tokens of its decoded text.

A detection box's score is the mean probability of its four `<loc>` tokens (boxes.parse_detections'
`loc_probs`): the model's own confidence in where it put the box, which ranks boxes for mAP.

PaliGemma's tokenizer holds each `<locNNNN>` as one piece, so the usual case is a direct lookup. A
model can still spell one out of smaller pieces ("<", "loc", "0", ...; byte fallback makes any text
possible): that `<loc>` then gets the probability of writing all its pieces, their product, found by
where each piece's text ends in the decoded answer.
"""
import math
import re

LOC = re.compile(r"<loc\d{4}>")


def loc_probabilities(tokenizer, ids, probs) -> list[float]:
    """ids, probs: one generated row (L,) and each token's probability -> the probability of each
    `<locNNNN>` in tokenizer.decode(ids), in order of appearance."""
    kept = []  # (id, probability) of the tokens the decoded text is made of (decode's own filter)
    for i, p in zip(map(int, ids), map(float, probs)):
        if i == tokenizer.eos_id:
            break
        if i not in tokenizer.special_ids and i < tokenizer.sp.get_piece_size():
            kept.append((i, p))
    sp = tokenizer.sp
    single = [p for i, p in kept if LOC.fullmatch(sp.id_to_piece(i))]
    text = sp.decode([i for i, _ in kept])
    spans = [m.span() for m in LOC.finditer(text)]
    if len(single) == len(spans):  # every <loc> of the text is one piece
        return single
    ends = [len(sp.decode([i for i, _ in kept[:k + 1]])) for k in range(len(kept))]  # text length after piece k
    starts = [0] + ends[:-1]
    return [math.prod(p for (_, p), s, e in zip(kept, starts, ends) if s < end and e > start) for start, end in spans]
