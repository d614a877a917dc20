"""Render seeded text lines with known ground truth for OCR accuracy checks (needs Pillow).

Lines mix digits, Latin letters, punctuation and common Chinese characters, all present in the
recognizer's CTC dictionary and drawn by the font used for them (DejaVu for Latin, a CJK font
for lines with Chinese). Colours are random dark text on random light paper, so RGB and BGR
inputs differ. :func:`preprocess` turns a line into what PP-OCR's recognizer reads.

    python tools/render_text_lines.py --out /tmp/lines --n 20      # PNGs + labels.tsv to look at

Only the tools import Pillow; the onnxprune package does not need it.
"""

from __future__ import annotations

import argparse
import math
import string
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEJAVU_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu",
               "/usr/local/share/fonts/dejavu")
DEJAVU_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf",
                "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf", "DejaVuSerif-Bold.ttf")
#: CJK fonts tried for the Chinese lines (first found are used); DejaVu has no Han glyphs.
CJK_FONTS = ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
             "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
             "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
             "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")
#: A few hundred of the most frequent Chinese characters (filtered by dictionary and font).
COMMON_HAN = (
    "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年"
    "过发后作里用道行所然家种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心"
    "她本前开但因只从想实日军者意无力它与长把机十民第公此已工使情明性知全三又关点正业外将两高间"
    "由问很最重并物手应战向头文体政美相见被利什二等产或新己制身果加西斯月话合回特代内信表化老给"
    "世位次度门任常先海通教儿原东声提立及比员解水名真论处走义各入几口认条平系气题活尔更别打女变"
    "四神总何电数安少报才结反受目太量再感建务做接必场件计管期市直德资命山金指克许统区保至队形社"
    "便空决治展马科司五基眼书非则听白却界达光放强即像难且权思王象完设式色路记南品住告类求据程北"
    "边死张该交规万取拉格望觉术领共确传师观清今切院让识候带导争运笑飞风步改收根干造言联持组每济"
    "车亲极林服快办议往元英士证近失转夫令准布始怎呢存未远叫台单影具罗字爱击流备兵连调深商算质团"
    "集百需价花党华城石级整府离况亚请技际约示复病息究线似官火断精满支视消越器容照须九增研写称企")
LATIN_PUNCT = ".,:;!?-()/%&+#@'\"$*="
HAN_PUNCT = "，。：；！？、（）《》“”"


def find_fonts() -> Tuple[List[str], List[str]]:
    """(Latin font paths, CJK font paths) present on this machine."""
    latin = []
    for d in DEJAVU_DIRS:
        for f in DEJAVU_FILES:
            p = Path(d) / f
            if p.exists():
                latin.append(str(p))
        if latin:
            break
    cjk = [p for p in CJK_FONTS if Path(p).exists()]
    return latin, cjk


def load_classes(keys_path) -> List[str]:
    """CTC classes of a PP-OCR recognizer: 0 = blank, then the dictionary lines, then ' '."""
    keys = Path(keys_path).read_text(encoding="utf-8").split("\n")
    if keys and keys[-1] == "":
        keys = keys[:-1]
    return ["<blank>"] + keys + [" "]


def _signature(font: ImageFont.FreeTypeFont, ch: str) -> tuple:
    mask = font.getmask(ch)
    return mask.size, bytes(mask)


def _has_glyph(font: ImageFont.FreeTypeFont, ch: str, notdef: tuple) -> bool:
    sig = _signature(font, ch)
    return min(sig[0]) > 0 and sig != notdef


def covered(chars: Sequence[str], font_paths: Sequence[str], size: int = 32) -> str:
    """The characters every one of these fonts draws (not as the missing-glyph box)."""
    out = []
    fonts = [ImageFont.truetype(p, size) for p in font_paths]
    notdefs = [_signature(f, "\U0010fffd") for f in fonts]
    for ch in chars:
        if all(_has_glyph(f, ch, n) for f, n in zip(fonts, notdefs)):
            out.append(ch)
    return "".join(out)


class LineMaker:
    """Seeded text + image generator; every character is in ``classes`` and drawn by its font."""

    def __init__(self, classes: Sequence[str], latin_fonts: Sequence[str],
                 cjk_fonts: Sequence[str], max_ratio: float = 320 / 48):
        if not latin_fonts:
            raise SystemExit("no DejaVu fonts found: apt-get install -y fonts-dejavu-core")
        vocab = set(classes[1:])
        self.latin_fonts, self.cjk_fonts = list(latin_fonts), list(cjk_fonts)
        self.digits = "".join(c for c in string.digits if c in vocab)
        self.letters = covered([c for c in string.ascii_letters if c in vocab], latin_fonts)
        self.punct = covered([c for c in LATIN_PUNCT if c in vocab], latin_fonts)
        self.han = covered([c for c in dict.fromkeys(COMMON_HAN) if c in vocab], cjk_fonts) \
            if cjk_fonts else ""
        self.han_punct = covered([c for c in HAN_PUNCT if c in vocab], cjk_fonts) \
            if cjk_fonts else ""
        self.max_ratio = max_ratio
        self._fonts = {}
        self._cover = {}

    def draws(self, font_path: str, text: str) -> bool:
        """Whether this font draws every character of ``text`` (cached per character)."""
        if font_path not in self._fonts:
            f = ImageFont.truetype(font_path, 32)
            self._fonts[font_path] = (f, _signature(f, "\U0010fffd"))
        font, notdef = self._fonts[font_path]
        for ch in set(text) - {" "}:
            key = (font_path, ch)
            if key not in self._cover:
                self._cover[key] = _has_glyph(font, ch, notdef)
            if not self._cover[key]:
                return False
        return True

    def describe(self) -> str:
        return (f"{len(self.digits)} digits, {len(self.letters)} letters, {len(self.punct)} "
                f"punctuation, {len(self.han)} Chinese characters (+{len(self.han_punct)} "
                f"CJK punctuation); Latin fonts: {', '.join(Path(p).name for p in self.latin_fonts)}"
                f"; CJK fonts: {', '.join(Path(p).name for p in self.cjk_fonts) or 'none'}")

    def text(self, rng: np.random.Generator) -> Tuple[str, bool]:
        """A random line and whether it needs the CJK font."""
        pick = lambda s, n: "".join(rng.choice(list(s), size=n))  # noqa: E731
        kinds = ["digits", "latin", "mixed"] + (["han", "han_mixed"] if self.han else [])
        kind = kinds[rng.integers(len(kinds))]
        if kind == "digits":
            forms = [lambda: pick(self.digits, rng.integers(4, 12)),
                     lambda: f"{pick(self.digits, 4)}-{pick(self.digits, 2)}-{pick(self.digits, 2)}",
                     lambda: f"{pick(self.digits, rng.integers(1, 6))}.{pick(self.digits, 2)}",
                     lambda: f"{pick(self.digits, 2)}:{pick(self.digits, 2)}:{pick(self.digits, 2)}"]
            return forms[rng.integers(len(forms))](), False
        if kind == "latin":
            words = [pick(self.letters, rng.integers(2, 8)) for _ in range(rng.integers(1, 3))]
            s = " ".join(words)
            if rng.random() < 0.5:
                s += pick(self.punct, 1)
            return s, False
        if kind == "mixed":
            parts = [pick(self.letters, rng.integers(1, 5)), pick(self.punct, 1),
                     pick(self.digits, rng.integers(1, 5))]
            rng.shuffle(parts)
            return "".join(parts), False
        if kind == "han":
            s = pick(self.han, rng.integers(2, 7))
            if self.han_punct and rng.random() < 0.4:
                s += pick(self.han_punct, 1)
            return s, True
        parts = [pick(self.han, rng.integers(1, 5)), pick(self.digits, rng.integers(1, 4))]
        if rng.random() < 0.5:
            parts.append(pick(self.letters, rng.integers(1, 3)))
        rng.shuffle(parts)
        return "".join(parts), True

    def render(self, text: str, font_path: str, size: int, rng: np.random.Generator
               ) -> Image.Image:
        font = ImageFont.truetype(font_path, size)
        left, top, right, bottom = font.getbbox(text)
        mx, my = int(rng.integers(2, 10)), int(rng.integers(2, 8))
        w, h = right - left + 2 * mx, bottom - top + 2 * my
        paper = tuple(int(v) for v in rng.integers(170, 256, size=3))
        ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
        img = Image.new("RGB", (w, h), paper)
        ImageDraw.Draw(img).text((mx - left, my - top), text, font=font, fill=ink)
        return img

    def lines(self, n: int, seed: int) -> List[Tuple[str, Image.Image]]:
        """``n`` (text, RGB image) pairs; lines wider than ``max_ratio`` are redrawn."""
        rng = np.random.default_rng(seed)
        out = []
        while len(out) < n:
            text, han = self.text(rng)
            fonts = [f for f in (self.cjk_fonts if han else self.latin_fonts)
                     if self.draws(f, text)]
            if not fonts:
                continue
            font = fonts[rng.integers(len(fonts))]
            img = self.render(text, font, int(rng.integers(18, 44)), rng)
            if img.width / img.height > self.max_ratio:
                continue  # would be squeezed into 320 columns: draw another
            out.append((text, img))
        return out


def preprocess(img: Image.Image, order: str = "BGR", height: int = 48, width: int = 320
               ) -> np.ndarray:
    """PP-OCR recognizer input for one line: [3, height, width] float32.

    Height resized to ``height`` keeping the aspect ratio (bilinear, width capped at
    ``width``), pixels / 255, (x - 0.5) / 0.5, channels in ``order``, zero-padded on the right
    after normalization (PaddleOCR's ``resize_norm_img``)."""
    w = min(width, int(math.ceil(height * img.width / img.height)))
    arr = np.asarray(img.convert("RGB").resize((w, height), Image.BILINEAR), dtype=np.float32)
    if order == "BGR":
        arr = arr[..., ::-1]
    arr = (arr / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :w] = arr.transpose(2, 0, 1)
    return out


def ctc_greedy(probs: np.ndarray, classes: Sequence[str]) -> List[str]:
    """Greedy CTC decoding of [N, T, C] scores: argmax, collapse repeats, drop blank (0)."""
    best = probs.argmax(axis=-1)
    texts = []
    for row in best:
        chars, prev = [], -1
        for k in row:
            if k != prev and k != 0:
                chars.append(classes[k])
            prev = k
        texts.append("".join(chars))
    return texts


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", default=str(Path.home() / ".cache/onnxprune/corpus/ppocr/"
                                          "ch_PP-OCRv4_rec_keys.txt"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    latin, cjk = find_fonts()
    maker = LineMaker(load_classes(a.keys), latin, cjk)
    print(maker.describe())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "labels.tsv", "w", encoding="utf-8") as f:
        for i, (text, img) in enumerate(maker.lines(a.n, a.seed)):
            img.save(out / f"line_{i:04d}.png")
            f.write(f"line_{i:04d}.png\t{text}\n")
    print(f"{a.n} lines in {out}")


if __name__ == "__main__":
    main()
