"""A synthetic person re-ID dataset in Market-1501 layout (``isereid demo-data``).

Every identity has a fixed appearance: body shape (height, build, head size, leg length),
skin and hair, top and bottom colours, a clothing pattern (solid, horizontal or vertical
stripes, checks, two-tone), sleeve and trouser type, shoes and sometimes a bag. Every camera
has its own nuisance: a background texture, illumination gain and colour tint, blur, sensor
noise, the typical person scale and a preferred viewpoint (front / back / side, which changes
what is visible: face, backpack, pattern). Each (identity, camera) pair is a short tracklet:
consecutive frames with small changes in position, scale, pose (stride, arm swing) and
lighting, sometimes a change of viewpoint and a partial occluder.

So a random network mostly sees the camera (background and tint) and scores low across
cameras, while appearance features learnt without labels do transfer between cameras.

Layout (Market-1501 names ``PPPP_cCsS_FFFFFF_NN.jpg``: 4-digit pid from 0001, 1-based camera,
sequence 1, 6-digit frame, 2-digit detection index):

* ``bounding_box_train``: half of the identities (chosen at random), all their images;
* ``query``: for each of the other identities, one image per camera it appears in (>= 2);
* ``bounding_box_test``: the rest of the test identities' images plus ~10% distractors
  (pid ``0000``, one-off people).

Output is a pure function of the arguments: one ``numpy.random.Generator(seed)`` drives all
draws and JPEGs are written with fixed settings, so the same seed gives byte-identical files.
A ``demo.json`` written last records the arguments and the summary. An existing non-empty
root is refused, except that re-running with the same arguments on a complete previous
demo dataset returns its summary without rewriting anything.
"""
from __future__ import annotations

import colorsys
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..errors import DatasetError
from ..utils import atomic_write_text

MARKER = "demo.json"
FORMAT_VERSION = 1
SPLITS = ("bounding_box_train", "query", "bounding_box_test")
JPEG_QUALITY = 85


# ---------------------------------------------------------------------------- appearance
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _muted(colour: np.ndarray, keep: float = 0.35) -> np.ndarray:
    """``colour`` pulled towards its grey level, keeping ``keep`` of its saturation."""
    grey = colour.mean()
    return grey + keep * (colour - grey)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    kind = rng.random()
    if kind < 0.22:  # greys, black, white
        return _hsv(0.0, 0.0, float(rng.uniform(0.08, 0.95)))
    if kind < 0.35:  # muted (denim, khaki, brown)
        return _hsv(float(rng.random()), float(rng.uniform(0.2, 0.45)), float(rng.uniform(0.25, 0.7)))
    return _hsv(float(rng.random()), float(rng.uniform(0.45, 1.0)), float(rng.uniform(0.35, 1.0)))


@dataclass
class Identity:
    height: float  # fraction of the camera's person height
    build: float  # torso half-width / person height
    head: float  # head radius / person height
    torso: float  # torso length / person height
    skin: np.ndarray
    hair: np.ndarray
    long_hair: bool
    top: np.ndarray
    top2: np.ndarray  # pattern colour
    pattern: int  # 0 solid, 1 horizontal stripes, 2 vertical stripes, 3 checks, 4 two-tone
    period: float  # pattern period / person height
    long_sleeves: bool
    bottom: np.ndarray
    bottom_kind: int  # 0 trousers, 1 shorts, 2 skirt
    shoes: np.ndarray
    bag: int  # 0 none, 1 backpack, 2 handbag
    bag_colour: np.ndarray
    bag_side: int  # -1 / +1


def _random_identity(rng: np.random.Generator) -> Identity:
    skin = _hsv(float(rng.uniform(0.02, 0.1)), float(rng.uniform(0.25, 0.6)), float(rng.uniform(0.35, 0.95)))
    hair_value = float(rng.choice([0.1, 0.2, 0.35, 0.6, 0.85]))
    hair = _hsv(float(rng.uniform(0.03, 0.12)), float(rng.uniform(0.2, 0.8)), hair_value)
    top = _random_colour(rng)
    top2 = _random_colour(rng)
    if np.abs(top2 - top).sum() < 120:  # make the pattern visible
        top2 = 255.0 - top
    return Identity(
        height=float(rng.uniform(0.88, 1.04)),
        build=float(rng.uniform(0.15, 0.22)),
        head=float(rng.uniform(0.055, 0.072)),
        torso=float(rng.uniform(0.27, 0.35)),
        skin=skin,
        hair=hair,
        long_hair=bool(rng.random() < 0.35),
        top=top,
        top2=top2,
        pattern=int(rng.choice(5, p=[0.36, 0.2, 0.12, 0.14, 0.18])),
        period=float(rng.uniform(0.035, 0.08)),
        long_sleeves=bool(rng.random() < 0.5),
        bottom=_random_colour(rng),
        bottom_kind=int(rng.choice(3, p=[0.6, 0.25, 0.15])),
        shoes=_hsv(float(rng.random()), float(rng.uniform(0, 0.6)), float(rng.uniform(0.05, 0.95))),
        bag=int(rng.choice(3, p=[0.5, 0.3, 0.2])),
        bag_colour=_random_colour(rng),
        bag_side=int(rng.choice([-1, 1])),
    )


@dataclass
class Camera:
    background: np.ndarray  # (2H, 2W, 3) texture; each image crops a window
    gain: float
    tint: np.ndarray  # (3,)
    blur: float
    noise: float
    scale: float  # person height / image height
    views: np.ndarray  # probabilities of front, back, side
    horizon: float  # fraction of image height where the floor starts


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Smooth random field in [0, 1] of ``shape``: a coarse random grid, bicubic upsampled."""
    coarse = rng.random(cells).astype(np.float32)
    im = Image.fromarray((coarse * 255).astype(np.uint8), mode="L").resize(shape[::-1], Image.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 255.0


def _random_camera(rng: np.random.Generator, height: int, width: int) -> Camera:
    h2, w2 = 2 * height, 2 * width
    # Muted, low-saturation scenery: the camera changes the look of a person without the
    # background dominating the crop (a random network would otherwise group by camera).
    wall, floor = _muted(_random_colour(rng) * 0.6 + 60), _muted(_random_colour(rng) * 0.5 + 50)
    horizon = float(rng.uniform(0.55, 0.8))
    yy = np.arange(h2, dtype=np.float32)[:, None, None] / h2
    base = np.where(yy < horizon * 0.5 + 0.25, wall, floor) * np.ones((1, w2, 1), np.float32)
    blotches = _smooth_noise(rng, (h2, w2), (int(rng.integers(3, 9)), int(rng.integers(3, 9))))
    base = base * (0.85 + 0.3 * blotches[..., None])
    kind = rng.integers(3)
    xx = np.arange(w2, dtype=np.float32)[None, :]
    if kind == 1:  # vertical structures (doors, pillars)
        period = float(rng.uniform(10, 30))
        stripes = (np.sin(2 * np.pi * xx / period + rng.uniform(0, 6.3)) > 0.6).astype(np.float32)
        base = base * (1 - 0.3 * stripes[..., None])
    elif kind == 2:  # tiled floor / brick pattern
        period = float(rng.uniform(6, 14))
        ys = np.arange(h2, dtype=np.float32)[:, None]
        grid = ((np.mod(ys, period) < 1.2) | (np.mod(xx + (ys // period) * period / 2, 2 * period) < 1.2))
        base = base * (1 - 0.25 * grid.astype(np.float32)[..., None])
    views = rng.dirichlet([0.7, 0.7, 0.7])
    return Camera(
        background=np.clip(base, 0, 255).astype(np.float32),
        gain=float(rng.uniform(0.8, 1.15)),
        tint=rng.uniform(0.92, 1.08, size=3).astype(np.float32),
        blur=float(rng.uniform(0.0, 1.1)),
        noise=float(rng.uniform(1.0, 6.0)),
        scale=float(rng.uniform(0.85, 0.97)),
        views=views,
        horizon=horizon,
    )


# ---------------------------------------------------------------------------- drawing
class _Shape:
    """Soft alpha of a shape over its bounding window ``sl`` of the image."""

    __slots__ = ("alpha", "sl")

    def __init__(self, alpha: np.ndarray, sl: tuple):
        self.alpha, self.sl = alpha, sl

    def __mul__(self, factor):  # fade, or cut with a same-window mask
        return _Shape(self.alpha * factor, self.sl)


class _Canvas:
    """Soft-edged shapes composited onto a float image (no per-pixel Python loops); every
    shape is evaluated only on its bounding window."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5

    def _window(self, y0, y1, x0, x1):
        ya, yb = max(0, int(np.floor(y0)) - 1), min(self.height, int(np.ceil(y1)) + 1)
        xa, xb = max(0, int(np.floor(x0)) - 1), min(self.width, int(np.ceil(x1)) + 1)
        yb, xb = max(ya, yb), max(xa, xb)
        sl = (slice(ya, yb), slice(xa, xb))
        return self.yy[sl], self.xx[sl], sl

    def slanted_rect(self, y0, y1, xc0, xc1, half_width) -> _Shape:
        """Band from row y0 to y1 whose centre moves linearly from xc0 to xc1; soft alpha."""
        yy, xx, sl = self._window(y0, y1, min(xc0, xc1) - half_width, max(xc0, xc1) + half_width)
        t = np.clip((yy - y0) / max(y1 - y0, 1e-3), 0, 1)
        centre = xc0 + (xc1 - xc0) * t
        d = np.minimum(np.minimum(yy - y0, y1 - yy), half_width - np.abs(xx - centre))
        return _Shape(np.clip(d + 0.5, 0, 1), sl)

    def rect(self, y0, y1, x0, x1) -> _Shape:
        yy, xx, sl = self._window(y0, y1, x0, x1)
        d = np.minimum(np.minimum(yy - y0, y1 - yy), np.minimum(xx - x0, x1 - xx))
        return _Shape(np.clip(d + 0.5, 0, 1), sl)

    def ellipse(self, cy, cx, ry, rx) -> _Shape:
        yy, xx, sl = self._window(cy - ry, cy + ry, cx - rx, cx + rx)
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        return _Shape(np.clip((1 - r) * min(ry, rx) + 0.5, 0, 1), sl)

    def trapezoid(self, y0, y1, xc, hw0, hw1) -> _Shape:
        yy, xx, sl = self._window(y0, y1, xc - max(hw0, hw1), xc + max(hw0, hw1))
        t = np.clip((yy - y0) / max(y1 - y0, 1e-3), 0, 1)
        hw = hw0 + (hw1 - hw0) * t
        d = np.minimum(np.minimum(yy - y0, y1 - yy), hw - np.abs(xx - xc))
        return _Shape(np.clip(d + 0.5, 0, 1), sl)


def _paint(img: np.ndarray, shape: _Shape, colour) -> None:
    if shape.alpha.size == 0:
        return
    colour = np.asarray(colour, dtype=np.float32)
    a = shape.alpha[..., None]
    region = img[shape.sl]
    region += a * (colour - region)


def _pattern(canvas: _Canvas, sl: tuple, ident: Identity, ph: float, y0: float, view: int) -> np.ndarray:
    """Colour field of the top over the window ``sl``: solid, stripes, checks or two-tone."""
    period = max(ident.period * ph, 2.5)
    yy, xx = canvas.yy[sl] - y0, canvas.xx[sl]
    if ident.pattern == 1:
        sel = np.mod(yy, period) < period / 2
    elif ident.pattern == 2:
        sel = np.mod(xx, period) < period / 2
    elif ident.pattern == 3:
        sel = (np.mod(yy, period) < period / 2) ^ (np.mod(xx, period) < period / 2)
    elif ident.pattern == 4:  # two-tone: upper part (front) / whole back in the second colour
        sel = yy < (0.12 * ph if view != 1 else 0.3 * ph)
    else:
        return ident.top
    return np.where(sel[..., None], ident.top2, ident.top)


@dataclass(frozen=True)
class Pose:
    """Where the person of one image stands and the size of its body parts, in pixels (rows grow down)."""

    ph: float  # person height
    cx: float  # column of the body's centre line
    view: int  # 0 front, 1 back, 2 side
    facing: int  # -1 / +1: the way a side view looks
    stride: float  # horizontal foot offset of a leg from its hip
    swing: float  # horizontal hand offset of an arm from its shoulder
    head_r: float
    head_cy: float
    shoulder: float  # row of the shoulders
    waist: float
    hip: float
    feet: float
    tw: float  # torso half-width
    leg_w: float
    leg_sep: float  # distance between the two legs' centre lines
    arm_w: float
    arm_len: float
    shoe_h: float


def _pose(ident: Identity, cam: Camera, rng: np.random.Generator, track: dict, height: int, width: int) -> Pose:
    """The body geometry of one frame of ``track``; draws five numbers from ``rng``."""
    scale = cam.scale * ident.height * track["scale"] * float(rng.uniform(0.97, 1.03))
    ph = min(scale * height, height - 2.0)
    bottom = min(height - 1.0, height * 0.97 + track["dy"] + float(rng.uniform(-1.5, 1.5)))
    top = bottom - ph
    cx = width / 2 + track["dx"] + float(rng.uniform(-0.03, 0.03)) * width
    view = track["view"]
    stride = float(rng.uniform(-1, 1)) * (0.16 if view == 2 else 0.06) * ph
    swing = float(rng.uniform(-1, 1)) * (0.1 if view == 2 else 0.03) * ph
    head_r = ident.head * ph
    shoulder = top + 2 * head_r + 0.015 * ph
    waist = shoulder + ident.torso * ph
    tw = ident.build * ph * (0.62 if view == 2 else 1.0)
    leg_w = 0.058 * ph * (1.15 if view == 2 else 1.0)
    return Pose(
        ph=ph, cx=cx, view=view, facing=track["facing"], stride=stride, swing=swing,
        head_r=head_r, head_cy=top + head_r, shoulder=shoulder, waist=waist, hip=waist + 0.04 * ph, feet=bottom,
        tw=tw, leg_w=leg_w, leg_sep=0.0 if view == 2 else max(tw - leg_w * 1.05, leg_w * 0.55),
        arm_w=0.042 * ph, arm_len=0.34 * ph, shoe_h=0.035 * ph,
    )


def _draw_behind(img: np.ndarray, canvas: _Canvas, ident: Identity, p: Pose) -> None:
    """What the body hides partly: long hair in front view, a backpack seen from the side."""
    if ident.long_hair and p.view == 0:
        _paint(img, canvas.rect(p.head_cy, p.shoulder + 0.09 * p.ph, p.cx - p.head_r * 1.15, p.cx + p.head_r * 1.15),
               ident.hair)
    if ident.bag == 1 and p.view == 2:
        back = -p.facing
        _paint(img, canvas.rect(p.shoulder + 0.02 * p.ph, p.waist - 0.04 * p.ph,
                                p.cx + back * (p.tw + 0.1 * p.ph) - 0.07 * p.ph,
                                p.cx + back * (p.tw + 0.1 * p.ph) + 0.07 * p.ph), ident.bag_colour)


def _draw_legs(img: np.ndarray, canvas: _Canvas, ident: Identity, p: Pose) -> None:
    """Legs (trousers, shorts or skin), shoes, then the skirt or the hips."""
    ph, waist = p.ph, p.waist
    lower_colour = ident.bottom if ident.bottom_kind == 0 else ident.skin
    for side, s in ((-1, p.stride), (1, -p.stride)):
        xc0 = p.cx + side * p.leg_sep * 0.5 * (1 if p.view != 2 else 0)
        _paint(img, canvas.slanted_rect(waist, p.feet - p.shoe_h * 0.5, xc0, xc0 + s, p.leg_w / 2), lower_colour)
        if ident.bottom_kind == 1:  # shorts
            _paint(img, canvas.slanted_rect(waist, waist + 0.14 * ph, xc0, xc0 + s * 0.3, p.leg_w / 2 + 0.5),
                   ident.bottom)
        _paint(img, canvas.rect(p.feet - p.shoe_h, p.feet, xc0 + s - p.leg_w * 0.6, xc0 + s + p.leg_w * 0.6),
               ident.shoes)
    if ident.bottom_kind == 2:  # skirt
        _paint(img, canvas.trapezoid(waist - 0.01 * ph, waist + 0.2 * ph, p.cx, p.tw * 0.95, p.tw * 1.35), ident.bottom)
    else:  # hips
        _paint(img, canvas.rect(waist - 0.01 * ph, p.hip, p.cx - p.tw * 0.95, p.cx + p.tw * 0.95), ident.bottom)


def _draw_arm(img: np.ndarray, canvas: _Canvas, ident: Identity, p: Pose, x0: float, sw: float) -> None:
    """One arm from the shoulder at column ``x0``, the hand ``sw`` to the side: skin, then the sleeve."""
    sleeve = 1.0 if ident.long_sleeves else 0.38
    y0 = p.shoulder + 0.01 * p.ph
    _paint(img, canvas.slanted_rect(y0, p.shoulder + p.arm_len, x0, x0 + sw, p.arm_w / 2), ident.skin)
    _paint(img, canvas.slanted_rect(y0, p.shoulder + p.arm_len * sleeve, x0, x0 + sw * sleeve, p.arm_w / 2 + 0.3),
           ident.top)


def _draw_upper_body(img: np.ndarray, canvas: _Canvas, ident: Identity, p: Pose) -> None:
    """The far arms, the torso with its pattern and, in side view, the near arm over it."""
    for side in ((-1, 1) if p.view != 2 else (p.facing,)):
        x0 = p.cx + side * (p.tw + p.arm_w * 0.45) if p.view != 2 else p.cx
        _draw_arm(img, canvas, ident, p, x0, p.swing if side < 0 else -p.swing)
    torso = canvas.trapezoid(p.shoulder, p.waist + 0.01 * p.ph, p.cx, p.tw * 1.05, p.tw * 0.92)
    _paint(img, torso, _pattern(canvas, torso.sl, ident, p.ph, p.shoulder, p.view))
    if p.view == 2:
        _draw_arm(img, canvas, ident, p, p.cx, -p.swing)


def _draw_bag(img: np.ndarray, canvas: _Canvas, ident: Identity, p: Pose) -> None:
    """A backpack (its body from behind, its straps from the front) or a handbag at the hip."""
    ph, cx, tw = p.ph, p.cx, p.tw
    if ident.bag == 1:
        if p.view == 1:
            _paint(img, canvas.rect(p.shoulder + 0.02 * ph, p.waist - 0.03 * ph, cx - tw * 0.8, cx + tw * 0.8),
                   ident.bag_colour)
        elif p.view == 0:
            for side in (-1, 1):
                _paint(img, canvas.rect(p.shoulder, p.shoulder + 0.16 * ph, cx + side * tw * 0.55 - 1,
                                        cx + side * tw * 0.55 + 1), ident.bag_colour)
    elif ident.bag == 2:
        side = ident.bag_side * (-1 if p.view == 1 else 1)
        bx = cx + side * (tw + p.arm_w + 0.02 * ph)
        _paint(img, canvas.rect(p.waist - 0.05 * ph, p.waist + 0.08 * ph, bx - 0.055 * ph, bx + 0.055 * ph),
               ident.bag_colour)


def _draw_head(img: np.ndarray, canvas: _Canvas, ident: Identity, p: Pose) -> None:
    """Neck, head (the back of it is hair) and hair."""
    ph, cx, head_r, head_cy = p.ph, p.cx, p.head_r, p.head_cy
    _paint(img, canvas.rect(p.shoulder - 0.03 * ph, p.shoulder + 0.01 * ph, cx - head_r * 0.4, cx + head_r * 0.4),
           ident.skin)
    head_x = cx + (p.facing * head_r * 0.15 if p.view == 2 else 0.0)
    _paint(img, canvas.ellipse(head_cy, head_x, head_r, head_r * 0.8), ident.skin if p.view != 1 else ident.hair)
    if p.view != 1:
        cap_y = head_cy - head_r * 0.35
        hair = canvas.ellipse(head_cy - head_r * 0.1, head_x, head_r * 1.02, head_r * 0.84)
        _paint(img, hair * (canvas.yy[hair.sl] < cap_y), ident.hair)
    if ident.long_hair and p.view == 1:
        _paint(img, canvas.rect(head_cy, p.shoulder + 0.1 * ph, cx - head_r * 0.95, cx + head_r * 0.95), ident.hair)


def _draw_occluder(img: np.ndarray, canvas: _Canvas, rng: np.random.Generator, track: dict) -> None:
    """In some frames another pedestrian's arm, a pole or a bin covers one side of the image."""
    height, width = canvas.yy.shape
    if rng.random() < track["occlusion"]:
        side = 1 if rng.random() < 0.5 else -1
        ow = float(rng.uniform(0.12, 0.3)) * width
        oy0 = float(rng.uniform(0.3, 0.7)) * height
        x0 = width - ow if side > 0 else 0.0
        _paint(img, canvas.rect(oy0, height + 1, x0, x0 + ow), _random_colour(rng) * 0.8)


def _camera_look(img: np.ndarray, cam: Camera, rng: np.random.Generator, track: dict) -> np.ndarray:
    """The camera's illumination, tint, blur and noise over the drawn scene; uint8 pixels."""
    gain = cam.gain * track["gain"] * float(rng.uniform(0.94, 1.06))
    img = img * (gain * cam.tint)
    if track["flip"]:
        img = img[:, ::-1]
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    radius = cam.blur + float(rng.uniform(0, 0.4))
    if radius > 0.15:
        out = out.filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(out, dtype=np.float32)
    arr = arr + cam.noise * rng.standard_normal(size=arr.shape, dtype=np.float32)
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


def _render(ident: Identity, cam: Camera, canvas: _Canvas, rng: np.random.Generator, track: dict) -> np.ndarray:
    """One image of ``ident`` seen by ``cam`` in the current frame of ``track``; the draws from ``rng``
    come in a fixed order (pose, background window, occluder, camera), so a seed gives the same pixels."""
    height, width = canvas.yy.shape
    pose = _pose(ident, cam, rng, track, height, width)
    oy = int(rng.integers(0, cam.background.shape[0] - height + 1))
    ox = int(rng.integers(0, cam.background.shape[1] - width + 1))
    img = cam.background[oy:oy + height, ox:ox + width].copy()
    # back to front: each part is painted over the ones it hides
    for draw in (_draw_behind, _draw_legs, _draw_upper_body, _draw_bag, _draw_head):
        draw(img, canvas, ident, pose)
    _draw_occluder(img, canvas, rng, track)
    return _camera_look(img, cam, rng, track)


def _new_track(ident: Identity, cam: Camera, rng: np.random.Generator, width: int) -> dict:
    return {
        "view": int(rng.choice(3, p=cam.views)),
        "facing": int(rng.choice([-1, 1])),
        "flip": bool(rng.random() < 0.5),
        "dx": float(rng.uniform(-0.08, 0.08)) * width,
        "dy": float(rng.uniform(-3, 1)),
        "scale": float(rng.uniform(0.93, 1.05)),
        "gain": float(rng.uniform(0.9, 1.1)),
        "occlusion": float(rng.choice([0.0, 0.0, 0.15, 0.35])),
    }


def _next_frame(track: dict, ident: Identity, cam: Camera, rng: np.random.Generator, width: int) -> None:
    """Small drift between consecutive frames of a tracklet, occasionally a new viewpoint."""
    track["dx"] = float(np.clip(track["dx"] + rng.uniform(-0.03, 0.03) * width, -0.12 * width, 0.12 * width))
    track["scale"] = float(np.clip(track["scale"] * rng.uniform(0.97, 1.03), 0.88, 1.08))
    if rng.random() < 0.25:
        track["view"] = int(rng.choice(3, p=cam.views))
        track["flip"] = bool(rng.random() < 0.5)


# ---------------------------------------------------------------------------- layout
def _check_args(identities: int, cameras: int, height: int, width: int) -> None:
    if not 2 <= identities <= 9999:
        raise DatasetError(f"demo data: --identities must be between 2 and 9999 (got {identities})")
    if not 2 <= cameras <= 9:
        raise DatasetError(f"demo data: --cameras must be between 2 and 9 (Market names use one digit; got {cameras})")
    if height < 32 or width < 16:
        raise DatasetError(f"demo data: image size {height}x{width} is too small (at least 32x16)")


def _existing(root: Path, params: dict):
    """Summary of a complete previous demo dataset with the same parameters, else None;
    DatasetError when ``root`` holds anything else."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise DatasetError(f"demo data: {root} exists and is not a folder; choose another path")
    entries = sorted(p.name for p in root.iterdir())
    if not entries:
        return None
    marker = root / MARKER
    if marker.is_file():
        try:
            stored = json.loads(marker.read_text())
        except (OSError, ValueError):
            stored = {}
        if stored.get("parameters") == params and all((root / s).is_dir() for s in SPLITS):
            return dict(stored.get("summary", {}), reused=True)
        raise DatasetError(f"demo data: {root} already holds a demo dataset made with other parameters "
                           f"({stored.get('parameters')}); delete it or choose another folder")
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise DatasetError(f"demo data: {root} is not empty ({shown}); delete it or choose a new folder")


class _SplitWriter:
    """Writes the JPEGs of the three splits and counts what each split holds."""

    def __init__(self, root: Path):
        self.root = root
        self.counts = {s: 0 for s in SPLITS}
        self.ids: dict[str, set] = {s: set() for s in SPLITS}
        self.names: set[str] = set()
        for split in SPLITS:
            (root / split).mkdir(parents=True, exist_ok=True)

    def write(self, split: str, pid: int, cam: int, frame: int, det: int, pixels: np.ndarray) -> None:
        name = f"{pid:04d}_c{cam + 1}s1_{frame:06d}_{det:02d}.jpg"
        while name in self.names:  # only possible for distractors; move to the next frame
            frame += 1
            name = f"{pid:04d}_c{cam + 1}s1_{frame:06d}_{det:02d}.jpg"
        self.names.add(name)
        Image.fromarray(pixels).save(self.root / split / name, format="JPEG", quality=JPEG_QUALITY, optimize=False)
        self.counts[split] += 1
        self.ids[split].add(pid)

    def summary(self, distractors: int, cameras: int, height: int, width: int) -> dict:
        size = sum(f.stat().st_size for s in SPLITS for f in (self.root / s).iterdir())
        return {
            "train_images": self.counts["bounding_box_train"],
            "train_ids": len(self.ids["bounding_box_train"]),
            "query_images": self.counts["query"],
            "query_ids": len(self.ids["query"]),
            "gallery_images": self.counts["bounding_box_test"],
            "gallery_ids": len(self.ids["bounding_box_test"] - {0}),
            "distractors": distractors,
            "cameras": cameras,
            "image_size": f"{height}x{width}",
            "megabytes": round(size / 1e6, 2),
        }


def _write_people(out: _SplitWriter, people: list, pids: np.ndarray, train_pids: set, cams: list,
                  canvas: "_Canvas", rng: np.random.Generator, cameras: int, width: int) -> None:
    """Every identity in 2..5 cameras, 3..8 frames of one track each; training identities go to the
    training split, the others give one query per camera and the rest to the gallery."""
    for pid, ident in zip(pids.tolist(), people):
        n_cams = int(rng.integers(2, min(cameras, 5) + 1))
        cam_ids = np.sort(rng.choice(cameras, size=n_cams, replace=False)).tolist()
        is_train = pid in train_pids
        for cam in cam_ids:
            n_images = int(rng.integers(3, 9))
            track = _new_track(ident, cams[cam], rng, width)
            frame = int(rng.integers(100, 900_000))
            query_at = int(rng.integers(n_images))
            for j in range(n_images):
                pixels = _render(ident, cams[cam], canvas, rng, track)
                split = "bounding_box_train" if is_train else ("query" if j == query_at else "bounding_box_test")
                out.write(split, pid, cam, frame, 1, pixels)
                frame += int(rng.integers(4, 40))
                _next_frame(track, ident, cams[cam], rng, width)


def generate_demo_data(root, identities: int = 200, cameras: int = 6, seed: int = 0,
                       height: int = 128, width: int = 64) -> dict:
    """Write the synthetic dataset under ``root`` (see module doc); returns a summary dict."""
    identities, cameras, seed, height, width = int(identities), int(cameras), int(seed), int(height), int(width)
    _check_args(identities, cameras, height, width)
    root = Path(root)
    params = {"identities": identities, "cameras": cameras, "seed": seed, "height": height, "width": width,
              "version": FORMAT_VERSION}
    previous = _existing(root, params)
    if previous is not None:
        return previous
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    cams = [_random_camera(rng, height, width) for _ in range(cameras)]
    people = [_random_identity(rng) for _ in range(identities)]
    pids = np.arange(1, identities + 1)
    train_pids = set(int(p) for p in rng.permutation(pids)[: identities // 2])
    canvas = _Canvas(height, width)
    out = _SplitWriter(root)
    _write_people(out, people, pids, train_pids, cams, canvas, rng, cameras, width)

    n_distractors = max(1, round(0.1 * out.counts["bounding_box_test"]))
    for k in range(n_distractors):
        cam = int(rng.integers(cameras))
        ident = _random_identity(rng)
        track = _new_track(ident, cams[cam], rng, width)
        out.write("bounding_box_test", 0, cam, int(rng.integers(100, 999_000)), 1 + k % 99,
                  _render(ident, cams[cam], canvas, rng, track))

    summary = out.summary(n_distractors, cameras, height, width)
    atomic_write_text(root / MARKER, json.dumps({"parameters": params, "summary": summary}, indent=2) + "\n")
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary
