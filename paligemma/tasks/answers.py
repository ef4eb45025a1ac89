"""Short answers scored as people report them: VQA accuracy and exact match (questions), ANLS and
character error rate (text reading).

VQA accuracy is the official VQAv2 evaluator's (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py, `VQAEval.evaluate`), which big_vision's
`evaluators/proj/paligemma/transfers/vqav2.py` copies: answers and references lose newlines, tabs
and outer spaces; only when the references disagree are all of them and the answer normalised
(`processPunctuation`, then `processDigitArticle`: lower case, number words to digits, articles
dropped, contractions restored), so an answer "Yes" against ten "yes" scores 0, as officially. The
score of one question is the mean, over the ten ways of leaving one reference out, of
min(1, #matching remaining references / 3) (the "10 choose 9" average). A single reference agrees
with itself, so it is never normalised: there is nothing to leave out, and the score is 1 when the
answer equals it after the space clean-up alone (case, punctuation, articles and number words
count: "Yes" against "yes" scores 0), else 0. big_vision's `vqa.py` compares a single-answer set's
(OCR-VQA's) answer with its reference as exactly (without even the space clean-up).

ANLS (average normalised Levenshtein similarity, Biten et al. 2019, eq. 1; big_vision's
`evaluators/proj/paligemma/transfers/vqa.py`, `anls_metric`): per reference 1 - d / max(len), 0
when that distance is 0.5 or more; the best reference per question; mean over questions. Case and
spaces count. Character error rate: Levenshtein edits to the first reference over its length,
summed over the set (edits / characters, as jiwer's `cer` does).
"""
import re

# vqaEval.py's tables, verbatim: contractions (keys with capitals never match after lower-casing,
# officially too), number words, articles, punctuation
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've"}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, as in vqaEval.py
COMMA_IN_NUMBER = re.compile(r"(\d)(\,)(\d)")


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark next to a space (or any text with a digit comma) is deleted,
    otherwise it becomes a space; periods not followed by a digit go."""
    out = text
    for p in PUNCT:
        if p + " " in text or " " + p in text or COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # vqaEval passes re.UNICODE as `sub`'s third argument, which is `count`: at most 32 periods go
    return PERIOD.sub("", out, count=re.UNICODE)


def _digits_articles(text: str) -> str:
    """vqaEval.processDigitArticle: lower case, number words -> digits, articles out, contractions back."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The official VQA normalisation of one answer (the full one; see vqa_accuracy for when it applies)."""
    return _digits_articles(_punctuation(_strip(text)))


def vqa_accuracy(answer: str, references) -> float:
    """One question's VQAv2 accuracy against its references (VQAv2 has ten); normalised only where the
    references disagree (a single reference: the space clean-up alone, see the module's docstring)."""
    refs = [_strip(r) for r in references]
    if not refs:
        raise ValueError("vqa_accuracy: a question without reference answers")
    answer = _strip(answer)
    if len(set(refs)) > 1:  # vqaEval normalises only when the annotators disagree
        refs, answer = [normalize_answer(r) for r in refs], normalize_answer(answer)
    if len(refs) == 1:
        return float(answer == refs[0])
    matches = [r == answer for r in refs]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(refs)


def exact_match(answer: str, references) -> float:
    """1 when the answer equals one of the references, spaces at either end aside; case counts."""
    return float(answer.strip() in {r.strip() for r in references})


def levenshtein(a: str, b: str) -> int:
    """Edits (insert, delete, substitute one character) that turn a into b."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def anls(answer: str, references, threshold: float = 0.5) -> float:
    """One question's ANLS: the best over references of 1 - normalised edit distance, 0 at or past `threshold`."""
    def one(ref):
        if not ref:
            return float(answer == "")
        d = levenshtein(ref, answer) / max(len(ref), len(answer))
        return 1 - d if d < threshold else 0.0
    return max(one(r) for r in references)


def character_edits(predictions, references) -> tuple[list[int], list[int]]:
    """Per item: Levenshtein edits to its first reference, and that reference's characters (CER's two sums)."""
    return [levenshtein(refs[0], p) for p, refs in zip(predictions, references)], [len(refs[0]) for refs in references]


def character_error_rate(predictions, references) -> float:
    """Corpus CER: edits to each first reference / characters of the first references."""
    return ratio(*character_edits(predictions, references), "character_error_rate: the references hold no characters")


def ratio(numerators, denominators, empty: str = "no items") -> float:
    """sum(numerators) / sum(denominators): a corpus score from its per-item parts (a mean: denominators 1)."""
    if not sum(denominators):
        raise ValueError(empty)
    return sum(numerators) / sum(denominators)


def _items(fn, predictions, references) -> tuple[list[float], list[int]]:
    """fn per item, as (scores, ones): the parts of their mean."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets: one each, at least one")
    return [fn(p, r) for p, r in zip(predictions, references)], [1] * len(predictions)


def answer_items(predictions: list[str], references: list[list[str]]) -> dict:
    """Questions, per question: name -> (scores, weights), each metric sum(scores) / sum(weights)."""
    return {"VQA accuracy": _items(vqa_accuracy, predictions, references),
            "exact match": _items(exact_match, predictions, references),
            "ANLS": _items(anls, predictions, references)}


def ocr_items(predictions: list[str], references: list[list[str]]) -> dict:
    """Text reading, per item: ANLS and exact match (weights 1), CER's edits over characters."""
    return {"ANLS": _items(anls, predictions, references), "CER": character_edits(predictions, references),
            "exact match": _items(exact_match, predictions, references)}


def score_answers(predictions: list[str], references: list[list[str]]) -> dict:
    """Questions: {"VQA accuracy", "exact match", "ANLS"}, means over questions."""
    return scores_of(answer_items(predictions, references))


def score_ocr(predictions: list[str], references: list[list[str]]) -> dict:
    """Text reading: {"ANLS", "CER", "exact match"}."""
    return scores_of(ocr_items(predictions, references))


def scores_of(items: dict) -> dict:
    """name -> (numerators, denominators) -> name -> the corpus score."""
    return {k: ratio(*v, f"{k}: the references hold no characters" if k == "CER" else "no items")
            for k, v in items.items()}
