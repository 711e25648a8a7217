"""The standard metrics of the LLaVA-1.5 evaluation suite, as the official scripts compute them.

* VQA accuracy (TextVQA, VQAv2): answers normalised with the EvalAI / official-VQA processor (lower case,
  punctuation, articles, number words, contractions), then ``min(#humans who gave the answer / 3, 1)`` averaged
  over the 10 leave-one-out subsets of 9 human answers (LLaVA's ``m4c_evaluator.TextVQAAccuracyEvaluator``).
* POPE: LLaVA's ``eval_pope.py`` answer parsing (first sentence; "no"/"No"/"not" as a word means no, anything
  else yes) and accuracy / precision / recall / F1 / yes-ratio; the papers report F1 averaged over the three
  splits (adversarial, popular, random).
* GQA: exact match after LLaVA's ``convert_gqa_for_eval`` normalisation (strip, trailing period, lower case).
* MME: the official ``calculation.py``: per category, accuracy over questions + accuracy+ over images (both
  questions of an image right), x100; the perception score sums the 10 perception categories.
* ScienceQA: LLaVA's ``eval_science_qa.py`` letter parsing ("B", "B. text", "The answer is B.").

All functions are plain Python over strings; ``score_task`` scores the prediction records a run writes.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

# ------------------------------------------------------------------------------------- VQA normalisation

# The official VQA / EvalAI contraction table (its quirks, e.g. "somebody'd" -> "somebodyd", kept for parity).
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_MAP = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
# As in the official code: the look-behind is misspelled "(?!<=\d)" (so a period after a digit is stripped too,
# unless a digit follows) and ``re.UNICODE`` lands in ``sub``'s *count* argument (at most 32 periods removed).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATIONS = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, int(re.UNICODE))


def _process_digit_article(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = NUMBER_MAP.get(w, w)
        if w not in ARTICLES:
            words.append(w)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """The EvalAI answer processor LLaVA's TextVQA evaluation uses (``m4c_evaluator.EvalAIAnswerProcessor``)."""
    a = str(answer).lower()
    a = a.replace(",", "").replace("?", "").replace("'s", " 's").strip()
    a = a.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(a))


def vqa_answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft score of every distinct normalised human answer: mean over the leave-one-out subsets of
    ``min(1, #matches among the other answers / 3)`` (10 answers -> 10 subsets of 9)."""
    norm = [normalize_vqa_answer(a) for a in answers]
    n = len(norm)
    if n == 0:
        return {}
    if n == 1:
        return {norm[0]: 1.0}
    scores = {}
    for cand in set(norm):
        total = 0.0
        for i in range(n):
            matches = sum(1 for j in range(n) if j != i and norm[j] == cand)
            total += min(1.0, matches / 3.0)
        scores[cand] = total / n
    return scores


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction in [0, 1]."""
    return vqa_answer_scores(answers).get(normalize_vqa_answer(prediction), 0.0)


# ------------------------------------------------------------------------------------------------- POPE


def parse_pope(text: str) -> str:
    """LLaVA ``eval_pope.py``: keep the first sentence, drop commas; "No", "no" or "not" as a word -> "no"."""
    text = str(text)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 (positive = "yes") and yes-ratio of parsed predictions, as fractions."""
    tp = fp = tn = fn = 0
    for p, y in zip(preds, labels, strict=True):
        p_pos, y_pos = p != "no", str(y).strip().lower() != "no"
        if p_pos and y_pos:
            tp += 1
        elif p_pos:
            fp += 1
        elif y_pos:
            fn += 1
        else:
            tn += 1
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(
        accuracy=(tp + tn) / n if n else 0.0,
        precision=precision,
        recall=recall,
        f1=f1,
        yes_ratio=(tp + fp) / n if n else 0.0,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        n=n,
    )


def pope_scores(predictions: Sequence[str], labels: Sequence[str], categories: Sequence[str] | None = None) -> dict:
    """POPE metrics x100, overall and per category; ``f1`` (headline) is the mean F1 over the categories."""
    parsed = [parse_pope(p) for p in predictions]
    categories = list(categories) if categories is not None else ["all"] * len(parsed)
    by_cat = defaultdict(lambda: ([], []))
    for p, y, c in zip(parsed, labels, categories, strict=True):
        by_cat[c][0].append(p)
        by_cat[c][1].append(y)
    per = {c: _pct(binary_metrics(*by_cat[c])) for c in sorted(by_cat)}
    overall = _pct(binary_metrics(parsed, labels))
    mean_f1 = sum(m["f1"] for m in per.values()) / len(per) if per else 0.0
    mean_acc = sum(m["accuracy"] for m in per.values()) / len(per) if per else 0.0
    return dict(f1=mean_f1, accuracy=mean_acc, overall=overall, categories=per)


def _pct(m: dict) -> dict:
    return {k: (100.0 * v if k in ("accuracy", "precision", "recall", "f1", "yes_ratio") else v) for k, v in m.items()}


# ------------------------------------------------------------------------------------------------- GQA


def normalize_gqa_answer(text: str) -> str:
    """LLaVA ``convert_gqa_for_eval.py`` (``text.rstrip('.').lower()``), also stripping surrounding spaces."""
    return str(text).strip().rstrip(".").strip().lower()


def gqa_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Exact match x100 after normalisation."""
    if not predictions:
        return 0.0
    hits = sum(normalize_gqa_answer(p) == normalize_gqa_answer(a) for p, a in zip(predictions, answers, strict=True))
    return 100.0 * hits / len(predictions)


# ------------------------------------------------------------------------------------------------- MME

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme(text: str) -> str:
    """MME ``calculation.py``: "yes"/"no" exactly, else whichever of them the first 4 characters contain, else
    "other" (always wrong)."""
    t = str(text).strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(
    predictions: Sequence[str], answers: Sequence[str], categories: Sequence[str], pairs: Sequence[str]
) -> dict:
    """Per category ``100·acc + 100·acc+`` (acc over questions, acc+ over images with every question right);
    ``perception`` / ``cognition`` sum the categories of each group that are present."""
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for p, a, c, k in zip(predictions, answers, categories, pairs, strict=True):
        groups[c][k].append(parse_mme(p) == str(a).strip().lower())
    per = {}
    for c in sorted(groups):
        images = groups[c]
        questions = [r for v in images.values() for r in v]
        acc = 100.0 * sum(questions) / len(questions)
        acc_plus = 100.0 * sum(all(v) for v in images.values()) / len(images)
        per[c] = dict(acc=acc, acc_plus=acc_plus, score=acc + acc_plus, questions=len(questions), images=len(images))
    perception = sum(per[c]["score"] for c in MME_PERCEPTION if c in per)
    cognition = sum(per[c]["score"] for c in MME_COGNITION if c in per)
    return dict(perception=perception, cognition=cognition, categories=per)


# ------------------------------------------------------------------------------------------------- ScienceQA

LETTERS = "ABCDEFGHIJ"


def parse_sqa(text: str, num_choices: int) -> int:
    """LLaVA ``eval_science_qa.py``: "B", "B. ...", or a single "The answer is B." -> index; -1 if unparsable
    or out of range (scored wrong)."""
    t = str(text).strip()
    options = LETTERS[:5] if num_choices <= 5 else LETTERS[:num_choices]
    if t in options:
        letter = t
    elif len(t) >= 3 and t[0] in options and t[1:3] == ". ":
        letter = t[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", t)
        letter = found[0] if len(found) == 1 else None
    if letter is None or letter not in LETTERS[:num_choices]:
        return -1
    return LETTERS.index(letter)


def sqa_accuracy(predictions: Sequence[str], answers: Sequence[int], num_choices: Sequence[int]) -> float:
    if not predictions:
        return 0.0
    hits = sum(parse_sqa(p, n) == int(a) for p, a, n in zip(predictions, answers, num_choices, strict=True))
    return 100.0 * hits / len(predictions)


# ------------------------------------------------------------------------------------------------- records

HEADLINE = {"pope": "f1", "textvqa": "accuracy", "gqa": "accuracy", "mme": "perception", "scienceqa_img": "accuracy"}


def score_task(task: str, records: Iterable[dict]) -> dict:
    """Score prediction records ``{"prediction": str, "reference": {...}}`` of one task.

    Returns the task's metrics with ``headline`` = the number the papers report (POPE mean F1, VQA accuracy,
    GQA / SQA accuracy, MME perception score), all in percent (MME in points).
    """
    records = list(records)
    preds = [r["prediction"] for r in records]
    refs = [r["reference"] for r in records]
    if task == "pope":
        out = pope_scores(preds, [r["answer"] for r in refs], [r.get("category", "all") for r in refs])
    elif task == "textvqa":
        out = dict(
            accuracy=100.0 * sum(vqa_accuracy(p, r["answers"]) for p, r in zip(preds, refs)) / max(len(preds), 1)
        )
    elif task == "gqa":
        out = dict(accuracy=gqa_accuracy(preds, [r["answer"] for r in refs]))
    elif task == "mme":
        out = mme_scores(preds, [r["answer"] for r in refs], [r["category"] for r in refs], [r["pair"] for r in refs])
    elif task == "scienceqa_img":
        out = dict(accuracy=sqa_accuracy(preds, [r["answer"] for r in refs], [r["num_choices"] for r in refs]))
    else:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(HEADLINE)}")
    out["headline"] = out[HEADLINE[task]]
    out["headline_metric"] = HEADLINE[task]
    out["num_samples"] = len(records)
    return out


def image_digest(image) -> str:
    """A stable key for an image (used to pair MME questions when the data has no ``question_id``)."""
    import numpy as np

    arr = np.asarray(image.convert("RGB"))
    return hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest()[:16]
