"""Input data for the corpus models, built offline from real material (never random noise).

Material: English sentences from Python stdlib docstrings; speech synthesized from them by Debian's
espeak-ng (``apt-get install -y espeak-ng``); text lines and pages rendered with the DejaVu fonts
that matplotlib ships; bytes of the files inside the corpus wheels; photos inside the
scikit-learn wheel. Every builder is seeded: the same versions give the same arrays.

A builder returns (calib, val): dicts of arrays in onnxcomp's data layouts (README "Data files"):
an array of rank r per input of rank r whose axis 0 is the batch axis, rank r + 1 for one whole
feed per sample (``array[i]`` is sample i's feed), or one array shared by every sample.
"""

from __future__ import annotations

import importlib
import inspect
import io
import re
import shutil
import subprocess
import tempfile
import warnings
import wave
import zipfile
from pathlib import Path

import numpy as np

SR = 16000
_MODULES = """os os.path re json collections itertools functools inspect pathlib string textwrap datetime
random statistics math decimal fractions heapq bisect argparse logging subprocess threading queue
socket csv zipfile tarfile shutil tempfile io codecs unittest pickle copy pprint enum dataclasses
typing contextlib abc operator hashlib base64 struct difflib fnmatch glob gzip calendar locale
platform traceback warnings weakref uuid ipaddress signal shlex sched mimetypes wave zlib tokenize
ast dis timeit cmd numbers graphlib""".split()
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
WAKE_PHRASES = ["hey jarvis", "hey mycroft", "hey jarvis, what time is it", "hey mycroft, play some music",
                "alexa", "set a timer"]


# ---------------------------------------------------------------- material
def sentences() -> list[str]:
    """Prose sentences (4-16 words) from stdlib docstrings, deduplicated, in a fixed order."""
    warnings.simplefilter("ignore", DeprecationWarning)
    seen: dict[str, None] = {}
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [mod.__doc__] + [getattr(o, "__doc__", None) for k, o in sorted(vars(mod).items())
                                if not k.startswith("_") and (inspect.isfunction(o) or inspect.isclass(o))]
        for doc in docs:
            if not isinstance(doc, str):
                continue
            for sent in _SENT.split(" ".join((doc or "").split())):
                words = sent.split()
                if 4 <= len(words) <= 16 and sum(w.strip(".,;:()'\"").isalpha() for w in words) >= 0.8 * len(words) \
                        and not re.search(r">>>|::|[{}=_|\\`<>*#@\[\]]", sent):
                    seen.setdefault(sent, None)
    out = list(seen)
    np.random.default_rng(0).shuffle(out)
    return out


_SENTENCES: list[str] = []


def split_sentences(n_calib: int, n_val: int) -> tuple[list[str], list[str]]:
    if not _SENTENCES:
        _SENTENCES.extend(sentences())
    s = _SENTENCES
    return s[:n_calib], s[n_calib:n_calib + n_val]


def speak(text: str, speed: int = 160, voice: str = "en-us") -> np.ndarray:
    """espeak-ng speech of ``text`` as float32 [-1, 1] at 16 kHz."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("bench/corpus.py needs espeak-ng for its speech data: apt-get install -y espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True,
                       capture_output=True)
        with wave.open(str(path)) as w:
            rate, raw = w.getframerate(), w.readframes(w.getnframes())
    x = np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0
    from scipy.signal import resample_poly
    g = np.gcd(SR, rate)
    return resample_poly(x, SR // g, rate // g).astype(np.float32)


def speech_stream(texts: list[str], seed: int) -> np.ndarray:
    """Utterances with 0.2-0.9 s pauses between them and a -60 dB floor (a microphone's)."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, text in enumerate(texts):
        parts.append(np.zeros(int(SR * rng.uniform(0.2, 0.9)), np.float32))
        parts.append(speak(text, speed=int(rng.integers(140, 185))) * rng.uniform(0.3, 0.9))
    x = np.concatenate(parts)
    return (x + rng.normal(0, 1e-3, x.shape)).astype(np.float32)


def font(size: int, mono: bool = False):
    from matplotlib import font_manager
    from PIL import ImageFont
    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans Mono" if mono else "DejaVu Sans"))
    return ImageFont.truetype(path, size)


def text_lines(texts: list[str], width: int = 34) -> list[str]:
    import textwrap
    return [line for t in texts for line in textwrap.wrap(t, width)]


def render_line(text: str, size: int, rng) -> "Image":
    from PIL import Image, ImageDraw
    f = font(size, mono=bool(rng.integers(0, 2)))
    box = f.getbbox(text)
    pad = int(size * 0.3)
    img = Image.new("RGB", (box[2] + 2 * pad, size + 2 * pad), tuple(int(v) for v in rng.integers(215, 256, 3)))
    ImageDraw.Draw(img).text((pad, pad - box[1] // 2), text, font=f, fill=tuple(int(v) for v in rng.integers(0, 70, 3)))
    return img


def fit_line(img, height: int, width: int, fill=0.0) -> np.ndarray:
    """Resize to ``height`` keeping the aspect ratio, right-pad to ``width``: CHW in [-1, 1]."""
    from PIL import Image
    w = min(width, max(1, round(img.width * height / img.height)))
    x = np.asarray(img.resize((w, height), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255.0
    x = (x - 0.5) / 0.5
    out = np.full((3, height, width), fill, np.float32)
    out[:, :, :w] = x
    return out


# ---------------------------------------------------------------- builders
def vad_stream(ctx):
    """silero-vad v5 style: 512-sample chunks with 64 samples of context, the real state before each
    chunk (from running the fp32 model over the stream), sr shared. input/state: one feed per sample."""
    out = []
    for seed, texts in enumerate(split_sentences(24, 40)):
        audio = speech_stream(texts, seed)
        x, states = [], []
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros(64, np.float32)
        with ctx.session() as sess:
            for start in range(0, len(audio) - 512, 512):
                chunk = np.concatenate([context, audio[start:start + 512]])[None]
                x.append(chunk)
                states.append(state)
                _, state = sess.run(None, {"input": chunk, "state": state, "sr": np.array(SR, np.int64)})
                context = audio[start + 448:start + 512]
        n = 128 if seed == 0 else 256
        pick = np.linspace(0, len(x) - 1, n).round().astype(int)
        out.append({"input": np.stack([x[i] for i in pick]), "state": np.stack([states[i] for i in pick]),
                    "sr": np.array(SR, np.int64)})
    return out[0], out[1]


def vad_windows(ctx):
    """faster-whisper style: 32 consecutive 576-sample windows per sample ([N, 32, 576]: one feed per
    sample), h/c zeros shared by all samples (the state faster-whisper starts from)."""
    out = []
    for seed, texts in enumerate(split_sentences(24, 40)):
        audio = speech_stream(texts, seed)
        padded = np.concatenate([np.zeros(64, np.float32), audio])
        windows = np.stack([padded[s:s + 576] for s in range(0, len(audio) - 512, 512)])
        n = 48 if seed == 0 else 96
        starts = np.linspace(0, len(windows) - 32, n).round().astype(int)
        out.append({"input": np.stack([windows[s:s + 32] for s in starts]),
                    "h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)})
    return out[0], out[1]


def _wake_stream(seed: int) -> np.ndarray:
    texts = split_sentences(16, 24)[seed]
    mixed = []
    for i, t in enumerate(texts):
        mixed += [WAKE_PHRASES[(i + seed) % len(WAKE_PHRASES)], t]
    return speech_stream(mixed, seed + 10)


def wake_audio(ctx):
    """1 s clips of speech in int16 scale (what openwakeword feeds its melspectrogram model)."""
    out = []
    for seed in (0, 1):
        audio = _wake_stream(seed) * 32767.0
        n = 64 if seed == 0 else 128
        starts = np.linspace(0, len(audio) - SR, n).round().astype(int)
        out.append({"input": np.stack([audio[s:s + SR] for s in starts]).astype(np.float32)})
    return out[0], out[1]


def _mels(ctx, seed):
    with ctx.session("oww_melspectrogram") as sess:
        audio = (_wake_stream(seed) * 32767.0).astype(np.float32)
        spec = sess.run(None, {"input": audio[None]})[0]
    return np.squeeze(spec) / 10.0 + 2.0  # openwakeword's transform: [frames, 32]


def wake_mels(ctx):
    """76-frame mel windows (stride 8 frames) as the embedding model reads them: [N, 76, 32, 1]."""
    out = []
    for seed in (0, 1):
        mel = _mels(ctx, seed)
        windows = np.stack([mel[s:s + 76] for s in range(0, len(mel) - 76, 8)])[..., None].astype(np.float32)
        n = 64 if seed == 0 else 128
        out.append({"input_1": windows[np.linspace(0, len(windows) - 1, n).round().astype(int)]})
    return out[0], out[1]


def _features(ctx, seed):
    mel = _mels(ctx, seed)
    windows = np.stack([mel[s:s + 76] for s in range(0, len(mel) - 76, 8)])[..., None].astype(np.float32)
    with ctx.session("oww_embedding") as sess:
        emb = np.concatenate([sess.run(None, {"input_1": windows[i:i + 64]})[0] for i in range(0, len(windows), 64)])
    emb = emb.reshape(len(emb), 96)
    feats = np.stack([emb[s:s + 16] for s in range(0, len(emb) - 16)]).astype(np.float32)
    n = 64 if seed == 0 else 128
    return feats[np.linspace(0, len(feats) - 1, n).round().astype(int)]


def wake_features(ctx):
    """16 consecutive speech embeddings per sample, batch layout [N, 16, 96]."""
    return {"input_1": _features(ctx, 0)}, {"input_1": _features(ctx, 1)}


def wake_features_feedwise(ctx):
    """The same features for a model whose batch is fixed to 1: one feed per sample, [N, 1, 16, 96]."""
    return {"x.1": _features(ctx, 0)[:, None]}, {"x.1": _features(ctx, 1)[:, None]}


def text_lines_cls(ctx):
    """Rendered text lines, half of them upside down (the classifier's task): [N, 3, 48, 192]."""
    out = []
    for seed, texts in enumerate(split_sentences(30, 60)):
        rng = np.random.default_rng(seed)
        lines = text_lines(texts, 24)[: 64 if seed == 0 else 128]
        xs = []
        for i, line in enumerate(lines):
            img = render_line(line, int(rng.integers(22, 36)), rng)
            xs.append(fit_line(img.rotate(180) if i % 2 else img, 48, 192))
        out.append({"x": np.stack(xs)})
    return out[0], out[1]


def text_lines_rec(ctx):
    """Rendered text lines for recognition: [N, 3, 48, 320]."""
    out = []
    for seed, texts in enumerate(split_sentences(30, 40)):
        rng = np.random.default_rng(seed + 5)
        lines = text_lines(texts, 30)[: 32 if seed == 0 else 64]
        out.append({"x": np.stack([fit_line(render_line(l, int(rng.integers(22, 36)), rng), 48, 320) for l in lines])})
    return out[0], out[1]


def text_pages(ctx):
    """320x320 pages of text lines at random places and sizes, ImageNet-normalized: [N, 3, 320, 320]."""
    from PIL import Image, ImageDraw
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    out = []
    for seed, texts in enumerate(split_sentences(40, 60)):
        rng = np.random.default_rng(seed + 7)
        lines = text_lines(texts, 26)
        pages = []
        for p in range(16 if seed == 0 else 24):
            img = Image.new("RGB", (320, 320), tuple(int(v) for v in rng.integers(200, 256, 3)))
            draw = ImageDraw.Draw(img)
            y = int(rng.integers(4, 30))
            while y < 290:
                size = int(rng.integers(12, 26))
                draw.text((int(rng.integers(2, 40)), y), lines[int(rng.integers(len(lines)))], font=font(size),
                          fill=tuple(int(v) for v in rng.integers(0, 80, 3)))
                y += size + int(rng.integers(4, 30))
            x = (np.asarray(img, np.float32) / 255.0 - mean) / std
            pages.append(x.transpose(2, 0, 1))
        out.append({"x": np.stack(pages).astype(np.float32)})
    return out[0], out[1]


def captcha_lines(ctx):
    """Short words rendered grey-scale at height 64, width 160 ([N, 1, 64, 160]; the model's batch is 1)."""
    from PIL import Image
    out = []
    for seed, texts in enumerate(split_sentences(30, 60)):
        rng = np.random.default_rng(seed + 3)
        words = [w.strip(".,;:()'\"") for t in texts for w in t.split() if 4 <= len(w.strip(".,;:()'\"")) <= 9]
        xs = []
        for word in words[: 48 if seed == 0 else 96]:
            img = render_line(word, int(rng.integers(26, 40)), rng).convert("L")
            img = img.resize((160, 64), Image.BILINEAR)
            xs.append(((np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5)[None])
        out.append({"input1": np.stack(xs).astype(np.float32)})
    return out[0], out[1]


def file_bytes(ctx):
    """magika's features of the files inside the corpus wheels: the first and last 1024 bytes of each
    (after stripping whitespace, padded with token 256), int32 [N, 2048]."""
    contents = []
    for wheel in sorted(ctx.wheels()):
        if wheel.suffix != ".whl":
            continue
        with zipfile.ZipFile(wheel) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                if 16 <= info.file_size:
                    with z.open(info) as f:
                        head = f.read(4096)
                    contents.append((head, _tail(z, info)))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(contents))
    feats = []
    for i in order[:192]:
        head, tail = contents[i]
        beg = np.frombuffer(head.lstrip()[:1024], np.uint8).astype(np.int32)
        end = np.frombuffer(tail.rstrip()[-1024:], np.uint8).astype(np.int32)
        row = np.full(2048, 256, np.int32)
        row[:len(beg)] = beg
        row[2048 - len(end):] = end
        feats.append(row)
    x = np.stack(feats)
    return {"bytes": x[:64]}, {"bytes": x[64:]}


def _tail(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    if info.file_size <= 4096:
        with z.open(info) as f:
            return f.read()
    with z.open(info) as f:  # zip members are streams: read through (files here are small)
        data = f.read()
    return data[-4096:]


def photo_crops(ctx):
    """48x48 crops of the two photos inside the scikit-learn wheel (china.jpg, flower.jpg), NHWC,
    (x - 127.5) / 128 as MTCNN expects."""
    from PIL import Image
    photos = []
    with zipfile.ZipFile(ctx.wheel("scikit-learn")) as z:
        for name in sorted(n for n in z.namelist() if n.endswith((".jpg", ".jpeg")) and "/images/" in n):
            photos.append(Image.open(io.BytesIO(z.read(name))).convert("RGB"))
    out = []
    for seed, n in ((0, 64), (1, 128)):
        rng = np.random.default_rng(seed + 11)
        xs = []
        for i in range(n):
            img = photos[i % len(photos)]
            s = int(rng.integers(40, 220))
            x0, y0 = int(rng.integers(0, img.width - s)), int(rng.integers(0, img.height - s))
            crop = img.crop((x0, y0, x0 + s, y0 + s)).resize((48, 48), Image.BILINEAR)
            xs.append((np.asarray(crop, np.float32) - 127.5) / 128.0)
        out.append({"input_3": np.stack(xs).astype(np.float32)})
    return out[0], out[1]


BUILDERS = {f.__name__: f for f in (vad_stream, vad_windows, wake_audio, wake_mels, wake_features,
                                     wake_features_feedwise, text_lines_cls, text_lines_rec, text_pages,
                                     captcha_lines, file_bytes, photo_crops)}
