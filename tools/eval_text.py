"""Task metrics, offline, for the real text models of the corpus (``tools/fetch_corpus.py --only text``).

Each model has a seeded data maker, ``data(n, seed, dense)``, whose result carries the inputs, the ground truth
where one exists and the dense model's own answers, and a ``metric(model_path, data) -> float`` (higher is
better) to call on the dense file and on a pruned one. ``make_calibration(name, n, out)`` writes realistic
calibration inputs (tokenized sentences, concatenated words, Arabic names, rendered lines) as an ``.npz`` keyed
by input name, for ``onnxprune --calibration``.

| name | model | data (generated, seeded) | metric |
|---|---|---|---|
| minilm | all-MiniLM-L6-v2 int8 | sentence pairs from a small grammar; each pair is a paraphrase (synonyms, word order) | retrieval: share of queries whose nearest neighbour (mean-pooled embedding, cosine) among all second halves is their own paraphrase; also ``minilm_cosine`` (embedding cosine vs dense) and ``minilm_agreement`` (top-1 neighbour unchanged vs dense) |
| flan_t5 | flan-t5-small encoder (dynamic int8) | sentences | mean hidden-state cosine vs dense over unmasked tokens |
| dksplit | int8 BiLSTM-CRF | 2-3 English words concatenated (``"openmailbox"``) | exact split accuracy vs the known words (Viterbi with the wheel's CRF); ``dksplit_agreement`` vs dense |
| romanizer | BiGRU encoder (+ the dense decoder) | 40 common Arabic name units | greedy-decode top-1 agreement with the dense encoder's transliteration |
| svtrv2 | SVTRv2 text recognizer | rendered lines (digits, Latin, punctuation; ``tools/render_text_lines.py``) | character accuracy vs the rendered text: 1 - edit distance / length |
| khmersm, text2tashkeel | char transformer / int8 BiLSTM | random character sequences from the model's own vocabulary (not real text) | per-character tag agreement with dense |

    python tools/eval_text.py minilm --pruned /tmp/minilm.pruned.onnx      # dense and pruned metric
    python tools/eval_text.py romanizer --calibration /tmp/names.npz --n 128

Needs ``tokenizers`` (``pip install -e ".[tools]"``) for minilm and flan_t5, Pillow for svtrv2; never imported by
the onnxprune package or its tests.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fetch_corpus import default_corpus_dir  # noqa: E402


def corpus_dir() -> Path:
    return default_corpus_dir()


def text_file(rel: str) -> Path:
    path = corpus_dir() / "text" / rel
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run python tools/fetch_corpus.py --only text")
    return path


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------------------------
# generated text
# ---------------------------------------------------------------------------------------------------------------

SUBJECTS = [("the dog", "the puppy"), ("my sister", "my sibling"), ("the teacher", "the instructor"),
            ("a doctor", "a physician"), ("the children", "the kids"), ("our team", "our group"),
            ("the old man", "the elderly man"), ("this company", "this firm"), ("the cat", "the kitten"),
            ("a student", "a pupil"), ("the farmer", "the grower"), ("my friend", "my pal")]
VERBS = [("bought", "purchased"), ("fixed", "repaired"), ("started", "began"), ("liked", "enjoyed"),
         ("found", "discovered"), ("built", "constructed"), ("wanted", "desired"), ("showed", "displayed"),
         ("needed", "required"), ("ended", "finished")]
OBJECTS = [("a big car", "a large automobile"), ("the broken window", "the damaged window"),
           ("a new house", "a new home"), ("the long trip", "the lengthy journey"),
           ("a quick answer", "a fast reply"), ("the red apple", "the crimson apple"),
           ("some cold water", "some chilly water"), ("the small boat", "the little boat"),
           ("a funny movie", "an amusing film"), ("the hard exam", "the difficult test"),
           ("a warm coat", "a heavy jacket"), ("the main road", "the primary street")]
TIMES = [("yesterday", "the day before"), ("last week", "seven days ago"), ("this morning", "earlier today"),
         ("in the evening", "at night"), ("on monday", "on monday")]

WORDS = ("open mail box chat login cloud music video game store shop book news time home page web file data "
         "search photo travel food bank card pay money city park sun moon star blue red green fast smart "
         "super best free live play team work job help care health sport car bike road map link code "
         "dev tech net app hub lab soft ware fire water light dark night day world life love happy").split()

ARABIC_NAMES = ["محمد", "أحمد", "علي", "حسن", "حسين", "عمر", "خالد", "يوسف", "إبراهيم", "عبدالله", "فاطمة",
                "عائشة", "مريم", "زينب", "سارة", "ليلى", "نور", "سلمى", "كريم", "سعيد", "منصور", "ناصر",
                "جمال", "رشيد", "طارق", "هاني", "وليد", "سمير", "عادل", "فيصل", "الحسيني", "العلي",
                "المصري", "الخطيب", "الشامي", "حداد", "نجار", "عثمان", "صالح", "مصطفى"]


def sentence_pairs(n: int, seed: int) -> List[tuple]:
    """``n`` (sentence, paraphrase) pairs: synonyms swapped, the time moved to the front."""
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < n:
        s, v, o, t = (p[rng.integers(len(p))] for p in (SUBJECTS, VERBS, OBJECTS, TIMES))
        pair = (f"{s[0]} {v[0]} {o[0]} {t[0]}.", f"{t[1]}, {s[1]} {v[1]} {o[1]}.")
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def concatenated_words(n: int, seed: int) -> List[List[str]]:
    rng = np.random.default_rng(seed)
    return [list(rng.choice(WORDS, size=int(rng.integers(2, 4)))) for _ in range(n)]


def arabic_names(n: int, seed: int) -> List[str]:
    """Single name units (the romanizer reads one unit at a time), shuffled; repeats only past the list."""
    rng = np.random.default_rng(seed)
    names = []
    while len(names) < n:
        names += list(rng.permutation(ARABIC_NAMES))
    return names[:n]


# ---------------------------------------------------------------------------------------------------------------
# MiniLM sentence embeddings
# ---------------------------------------------------------------------------------------------------------------

def _tokenizer(rel: str, length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(text_file(rel)))
    tok.enable_truncation(length)
    tok.enable_padding(length=length, pad_id=0)
    return tok


def tokenize(rel: str, texts: Sequence[str], length: int = 32) -> Dict[str, np.ndarray]:
    encoded = _tokenizer(rel, length).encode_batch(list(texts))
    ids = np.array([e.ids for e in encoded], np.int64)
    mask = np.array([e.attention_mask for e in encoded], np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


MINILM, MINILM_TOK = "minilm/model.onnx", "minilm/tokenizer.json"


def minilm_embed(model_path, feed: Dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    sess = session(model_path)
    names = {i.name for i in sess.get_inputs()}
    out = []
    for start in range(0, len(feed["input_ids"]), batch):
        part = {k: v[start:start + batch] for k, v in feed.items() if k in names}
        hidden = sess.run(None, part)[0]
        mask = part["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def minilm_data(n: int = 64, seed: int = 0, dense=None) -> dict:
    pairs = sentence_pairs(n, seed)
    feed = tokenize(MINILM_TOK, [a for a, _ in pairs] + [b for _, b in pairs])
    data = {"feed": feed, "n": n}
    data["dense"] = minilm_embed(dense or text_file(MINILM), feed)
    return data


def _neighbours(emb: np.ndarray, n: int) -> np.ndarray:
    return (emb[:n] @ emb[n:].T).argmax(axis=1)


def minilm_metric(model_path, data) -> float:
    """Retrieval accuracy: each query's nearest neighbour is its own paraphrase."""
    emb = minilm_embed(model_path, data["feed"])
    return float((_neighbours(emb, data["n"]) == np.arange(data["n"])).mean())


def minilm_agreement(model_path, data) -> float:
    emb = minilm_embed(model_path, data["feed"])
    return float((_neighbours(emb, data["n"]) == _neighbours(data["dense"], data["n"])).mean())


def minilm_cosine(model_path, data) -> float:
    emb = minilm_embed(model_path, data["feed"])
    return float((emb * data["dense"]).sum(1).mean())


# ---------------------------------------------------------------------------------------------------------------
# flan-t5 encoder
# ---------------------------------------------------------------------------------------------------------------

T5_ENCODER, T5_TOK = "flan_t5/encoder.onnx", "flan_t5/tokenizer.json"


def t5_hidden(model_path, feed) -> np.ndarray:
    sess = session(model_path)
    return sess.run(None, {"input_ids": feed["input_ids"], "attention_mask": feed["attention_mask"]})[0]


def flan_t5_data(n: int = 32, seed: int = 0, dense=None) -> dict:
    feed = tokenize(T5_TOK, [a for a, _ in sentence_pairs(n, seed)])
    return {"feed": feed, "dense": t5_hidden(dense or text_file(T5_ENCODER), feed)}


def flan_t5_metric(model_path, data) -> float:
    """Mean cosine of each unmasked token's hidden state with the dense one."""
    hidden, dense = t5_hidden(model_path, data["feed"]), data["dense"]
    cos = (hidden * dense).sum(-1) / (np.linalg.norm(hidden, axis=-1) * np.linalg.norm(dense, axis=-1) + 1e-12)
    mask = data["feed"]["attention_mask"].astype(bool)
    return float(cos[mask].mean())


# ---------------------------------------------------------------------------------------------------------------
# dksplit
# ---------------------------------------------------------------------------------------------------------------

DKSPLIT = "dksplit/dksplit-int8.onnx"
DK_VOCAB = "abcdefghijklmnopqrstuvwxyz0123456789"


def dk_ids(text: str) -> np.ndarray:
    return np.array([[DK_VOCAB.index(c) + 2 if c in DK_VOCAB else 1 for c in text]], np.int64)


def _viterbi(emissions: np.ndarray, trans: np.ndarray, start: np.ndarray, end: np.ndarray) -> List[int]:
    score, history = start + emissions[0], []
    for t in range(1, len(emissions)):
        nxt = score[:, None] + trans + emissions[t][None, :]
        history.append(nxt.argmax(0))
        score = nxt.max(0)
    best = [int((score + end).argmax())]
    for h in reversed(history):
        best.append(int(h[best[-1]]))
    return best[::-1]


def dksplit_split(model_path, texts: Sequence[str]) -> List[List[str]]:
    sess = session(model_path)
    crf = np.load(text_file("dksplit/dksplit.npz"))
    out = []
    for text in texts:
        emissions = sess.run(None, {"chars": dk_ids(text)})[0][0]
        tags = _viterbi(emissions, crf["transitions"], crf["start_transitions"], crf["end_transitions"])
        words, current = [], []
        for ch, tag in zip(text, tags):
            if tag == 1 and current:
                words.append("".join(current))
                current = [ch]
            else:
                current.append(ch)
        words.append("".join(current))
        out.append(words)
    return out


def dksplit_data(n: int = 200, seed: int = 0, dense=None) -> dict:
    truth = concatenated_words(n, seed)
    texts = ["".join(w) for w in truth]
    return {"texts": texts, "truth": truth, "dense": dksplit_split(dense or text_file(DKSPLIT), texts)}


def dksplit_metric(model_path, data) -> float:
    """Share of concatenations split exactly into their words."""
    got = dksplit_split(model_path, data["texts"])
    return float(np.mean([g == t for g, t in zip(got, data["truth"])]))


def dksplit_agreement(model_path, data) -> float:
    got = dksplit_split(model_path, data["texts"])
    return float(np.mean([g == d for g, d in zip(got, data["dense"])]))


# ---------------------------------------------------------------------------------------------------------------
# arabic-name-romanizer: BiGRU encoder + GRU decoder, greedy
# ---------------------------------------------------------------------------------------------------------------

ROM_ENCODER, ROM_DECODER, ROM_VOCAB = "romanizer/encoder.onnx", "romanizer/decoder.onnx", "romanizer/vocab.json"


def _rom_vocab() -> List[str]:
    return json.loads(text_file(ROM_VOCAB).read_text(encoding="utf-8"))["tokens"]


def rom_encode(names: Sequence[str], length: Optional[int] = None) -> Dict[str, np.ndarray]:
    """``src`` (country + role prefix, characters, EOS; PAD after) and ``src_mask`` (true on PAD)."""
    tokens = _rom_vocab()
    index = {t: i for i, t in enumerate(tokens)}
    prefix = [index["<UNK_COUNTRY>"]] + ([index["<ROLE_UNKNOWN>"]] if "<ROLE_UNKNOWN>" in index else [])
    seqs = [prefix + [index.get(c, 3) for c in name] + [2] for name in names]
    width = length or max(len(s) for s in seqs)
    src = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        src[i, :min(width, len(s))] = s[:width]
    return {"src": src, "src_mask": src == 0}


def romanize(encoder, names: Sequence[str], decoder=None, max_len: int = 32) -> List[str]:
    tokens = _rom_vocab()
    enc, dec = session(encoder), session(decoder or text_file(ROM_DECODER))
    out = []
    for name in names:
        feed = rom_encode([name])
        memory, src_mask, hidden = enc.run(None, feed)
        prefix, ids = np.array([[1]], np.int64), []
        for t in range(max_len):
            logprobs, hidden = dec.run(None, {"prefix": prefix, "memory": memory, "src_mask": src_mask,
                                              "hidden": hidden})
            if t == 0:
                logprobs[:, 2] = -np.inf  # no empty output
            tok = int(logprobs[0].argmax())
            if tok == 2:
                break
            ids.append(tok)
            prefix = np.concatenate([prefix, [[tok]]], axis=1)
        out.append("".join(tokens[i] for i in ids if not (tokens[i].startswith("<") and tokens[i].endswith(">"))))
    return out


def rom_joint_calibration(n: int, seed: int = 0, steps: int = 1) -> Dict[str, np.ndarray]:
    """Inputs of the encoder and ``steps`` runs of the decoder joined (``onnxprune encoder.onnx
    --with decoder.onnx`` given ``steps`` times): ``src``/``src_mask`` of ``n`` names and each
    run's ``prefix`` (``prefix``, ``decoder#2/prefix``, ...) as one token, the decoder reading
    the last: the start token, then the dense transliteration's characters (teacher forcing;
    the end token past its end)."""
    names = arabic_names(n, seed)
    arrays = rom_encode(names, length=16)
    index = {t: i for i, t in enumerate(_rom_vocab())}
    dense = romanize(text_file(ROM_ENCODER), names)
    for k in range(steps):
        key = "prefix" if k == 0 else f"decoder#{k + 1}/prefix"
        arrays[key] = np.array([[1 if k == 0 else index.get(t[k - 1], 2) if k <= len(t) else 2]
                                for t in dense], np.int64)
    return arrays


def romanizer_data(n: int = 40, seed: int = 0, dense=None) -> dict:
    names = arabic_names(n, seed)
    return {"names": names, "dense": romanize(dense or text_file(ROM_ENCODER), names)}


def romanizer_metric(model_path, data) -> float:
    """Greedy top-1 agreement with the dense encoder (the decoder stays dense)."""
    got = romanize(model_path, data["names"])
    return float(np.mean([g == d for g, d in zip(got, data["dense"])]))


# ---------------------------------------------------------------------------------------------------------------
# SVTRv2 on rendered lines
# ---------------------------------------------------------------------------------------------------------------

SVTR = "svtrv2/svtrv2.onnx"
SVTR_CHARSET = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation
SVTR_BANDS = ((64, 64), (48, 96), (40, 112), (32, 128))  # (height, width) by round(w / h), as the wheel's reader


def svtr_input(img) -> np.ndarray:
    from PIL import Image

    band = SVTR_BANDS[min(4, max(1, round(img.width / max(1, img.height)))) - 1]
    resized = img.convert("RGB").resize((band[1], band[0]), Image.Resampling.BICUBIC)
    return ((np.asarray(resized, np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]


def svtr_read(model_path, images) -> List[str]:
    sess = session(model_path)
    out = []
    for img in images:
        idx = sess.run(None, {"image": svtr_input(img)})[0][0].argmax(-1)
        keep = np.ones(len(idx), bool)
        keep[1:] = idx[1:] != idx[:-1]
        out.append("".join(SVTR_CHARSET[i - 1] for i in idx[keep & (idx != 0)]))
    return out


def svtr_lines(n: int, seed: int):
    sys.path.insert(0, str(HERE))
    from render_text_lines import LineMaker, find_fonts

    latin, _ = find_fonts()
    maker = LineMaker(["<blank>"] + list(SVTR_CHARSET), latin, [], max_ratio=4.0)
    return maker.lines(n, seed)


def svtrv2_data(n: int = 64, seed: int = 0, dense=None) -> dict:
    lines = svtr_lines(n, seed)
    return {"truth": [t for t, _ in lines], "images": [im for _, im in lines]}




def svtrv2_metric(model_path, data) -> float:
    """Character accuracy vs the rendered text: 1 - total edit distance / total length."""
    got = svtr_read(model_path, data["images"])
    sys.path.insert(0, str(HERE))
    from eval_accuracy import edit_distance

    errors = sum(edit_distance(g, t) for g, t in zip(got, data["truth"]))
    return 1.0 - errors / sum(len(t) for t in data["truth"])


# ---------------------------------------------------------------------------------------------------------------
# khmersm, text2tashkeel: tag agreement on random in-vocabulary characters
# ---------------------------------------------------------------------------------------------------------------

def _random_chars(n: int, seed: int, high: int, length: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, high, size=(n, length)).astype(np.int64)


def _tags(model_path, feeds: Sequence[Dict[str, np.ndarray]]) -> List[np.ndarray]:
    sess = session(model_path)
    return [sess.run(None, f)[0].argmax(-1) for f in feeds]


def khmersm_data(n: int = 64, seed: int = 0, dense=None) -> dict:
    ids = _random_chars(n, seed, 126)
    feeds = [{"x": row[None], "mask": np.ones((1, row.size), bool)} for row in ids]
    return {"feeds": feeds, "dense": _tags(dense or text_file("khmersm/model.onnx"), feeds)}


def text2tashkeel_data(n: int = 64, seed: int = 0, dense=None) -> dict:
    feeds = [{"input": row[None]} for row in _random_chars(n, seed, 236)]
    return {"feeds": feeds, "dense": _tags(dense or text_file("text2tashkeel/rawi_v2.int8.onnx"), feeds)}


def tag_agreement(model_path, data) -> float:
    got = _tags(model_path, data["feeds"])
    return float(np.mean(np.concatenate([(g == d).ravel() for g, d in zip(got, data["dense"])])))


# ---------------------------------------------------------------------------------------------------------------
# registry, calibration files, CLI
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    file: str  # under <corpus>/text/
    data: Callable[..., dict]
    metric: Callable[[object, dict], float]
    metric_name: str
    extra: Dict[str, Callable[[object, dict], float]]


TASKS: Dict[str, Task] = {
    "minilm": Task(MINILM, minilm_data, minilm_metric, "paraphrase retrieval top-1",
                   {"top-1 neighbour agreement": minilm_agreement, "embedding cosine": minilm_cosine}),
    "flan_t5": Task(T5_ENCODER, flan_t5_data, flan_t5_metric, "hidden-state cosine", {}),
    "dksplit": Task(DKSPLIT, dksplit_data, dksplit_metric, "exact split accuracy",
                    {"split agreement": dksplit_agreement}),
    "romanizer": Task(ROM_ENCODER, romanizer_data, romanizer_metric, "greedy top-1 agreement", {}),
    "svtrv2": Task(SVTR, svtrv2_data, svtrv2_metric, "character accuracy", {}),
    "khmersm": Task("khmersm/model.onnx", khmersm_data, tag_agreement, "tag agreement", {}),
    "text2tashkeel": Task("text2tashkeel/rawi_v2.int8.onnx", text2tashkeel_data, tag_agreement,
                          "tag agreement", {}),
}


def evaluate(name: str, pruned, dense=None, n: Optional[int] = None, seed: int = 1) -> Dict[str, float]:
    """``{"dense": x, "pruned": y, ...extras}`` of task ``name`` for a pruned file (seed 1: not the calibration's)."""
    task = TASKS[name]
    dense = dense or text_file(task.file)
    data = task.data(**({"n": n} if n else {}), seed=seed, dense=dense)
    result = {"metric": task.metric_name, "dense": task.metric(dense, data), "pruned": task.metric(pruned, data)}
    for label, fn in task.extra.items():
        result[label] = fn(pruned, data)
    return result


def make_calibration(name: str, n: int, out, seed: int = 0) -> Path:
    """Write ``n`` realistic calibration samples for model ``name`` to ``out`` (.npz keyed by input name)."""
    if name == "minilm":
        arrays = tokenize(MINILM_TOK, [a for a, _ in sentence_pairs(n, seed)])
    elif name == "flan_t5":
        feed = tokenize(T5_TOK, [a for a, _ in sentence_pairs(n, seed)])
        arrays = {"input_ids": feed["input_ids"], "attention_mask": feed["attention_mask"]}
    elif name == "dksplit":
        texts = ["".join(w) * 3 for w in concatenated_words(n, seed)]
        arrays = {"chars": np.concatenate([dk_ids(t[:16]) for t in texts])}
    elif name == "romanizer":
        arrays = rom_encode(arabic_names(n, seed), length=16)
    elif name.startswith("romanizer_joint"):  # romanizer_joint<steps>
        arrays = rom_joint_calibration(n, seed, int(name[len("romanizer_joint"):] or 1))
    elif name == "svtrv2":
        images = [im for _, im in svtr_lines(4 * n, seed)]
        wide = [im for im in images if round(im.width / max(1, im.height)) >= 4][:n]  # one band: one shape
        arrays = {"image": np.concatenate([svtr_input(im) for im in wide])}
    elif name == "khmersm":
        ids = _random_chars(n, seed, 126)
        arrays = {"x": ids, "mask": np.ones(ids.shape, bool)}
    elif name == "text2tashkeel":
        arrays = {"input": _random_chars(n, seed, 236)}
    else:
        raise SystemExit(f"no calibration maker for {name}; choose from {', '.join(TASKS)}")
    out = Path(out)
    np.savez(out, **arrays)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(TASKS))
    parser.add_argument("--pruned", type=Path, help="pruned model file: print the dense and pruned metric")
    parser.add_argument("--dense", type=Path, help="dense model (default: the corpus file)")
    parser.add_argument("--calibration", type=Path, help="write calibration inputs to this .npz")
    parser.add_argument("--n", type=int, default=None, help="samples")
    args = parser.parse_args(argv)
    if args.calibration:
        path = make_calibration(args.model, args.n or 64, args.calibration)
        print(f"wrote {path}: " + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in np.load(path).items()))
    if args.pruned:
        print(json.dumps(evaluate(args.model, args.pruned, args.dense, args.n), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
