"""The built-in synthetic chest X-ray set: frontal-chest-like images with lung masks.

Each image is a pure function of ``(seed, index)``, so any worker can make any image in any order
and the set is identical across runs and machines. Labels are fixed for the whole set by one
seeded permutation (``labels_for``), so the class count is exact.

What an image holds (all geometry in normalised coordinates, so every ``size`` looks the same):
soft tissue thinning towards the body outline; two dark lung fields of varying size, position
and taper, cut below by the diaphragm domes (the right one higher) and medially by the
mediastinum and a left-bulging heart; spine, trachea, posterior and fainter anterior ribs,
optional clavicles, breast shadows and gastric bubble; vessel markings fanning out from the
hila; exposure, gamma, blur and noise that vary per image. Positives add patchy opacities,
mostly peripheral and lower-zone, confined to the lungs, from barely visible to obvious.

The optional shortcut burns a bright "L" or "R" into a corner of the border band, correlated
with the label, to test whether a model (and its Grad-CAM) looks at the lungs or at the marker.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from cxrexp.config import BORDER_FRACTION, REAL_PREVALENCE, SYNTHETIC_FAINTEST

# Markers live in the outer band of this width (fraction of the side); lungs never reach it.

_MARKER_LETTERS = ("L", "R")
_MARKER_PLACES = ("top-left", "top-right", "bottom-left", "bottom-right", "top")


@dataclass(frozen=True)
class SyntheticSpec:
    """How many images, which class balance, what size, which seed, how strong a shortcut.

    ``shortcut`` = 0 draws no marker at all; in (0, 1] a marker appears on a positive with
    probability ``shortcut`` and on a negative with probability ``1 - shortcut`` (1.0: exactly
    the positives carry it; 0.5: marker and label are independent).
    """

    count: int = 1200
    prevalence: float = REAL_PREVALENCE
    size: int = 256
    seed: int = 42
    shortcut: float = 0.0
    # The opacity strength of the faintest positive (amplitude = faintest + 0.30 * severity, severity
    # ~ Beta(1.6, 1.6)): the built-in task's difficulty. Part of the spec, hence of every synthetic
    # cache key and digest. The default's reason is at config.SYNTHETIC_FAINTEST.
    faintest: float = SYNTHETIC_FAINTEST

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count={self.count}: need at least one synthetic image")
        if not 0.0 <= self.prevalence <= 1.0:
            raise ValueError(f"prevalence={self.prevalence} must be in [0, 1]")
        if not 32 <= self.size <= 1024:
            raise ValueError(f"size={self.size} must be between 32 and 1024 pixels")
        if not 0.0 <= self.shortcut <= 1.0:
            raise ValueError(f"shortcut={self.shortcut} must be in [0, 1]")
        if not 0.0 <= self.faintest <= 1.0:
            raise ValueError(f"faintest={self.faintest} must be in [0, 1]")


@dataclass(frozen=True)
class SyntheticImage:
    """One synthetic radiograph.

    image: uint8 (size, size); mask: uint8 (size, size) in {0, 1}, the lung fields (heart and
    mediastinum excluded, as in the Kaggle masks); label: 1 for the positive class; has_marker:
    whether a burned-in letter was drawn.
    """

    index: int
    image: np.ndarray
    mask: np.ndarray
    label: int
    has_marker: bool


def labels_for(spec: SyntheticSpec) -> np.ndarray:
    """int64[count] in {0, 1}: exactly ``round(count * prevalence)`` ones at seeded positions."""
    return _labels(spec.count, spec.prevalence, spec.seed).copy()


@lru_cache(maxsize=16)
def _labels(count: int, prevalence: float, seed: int) -> np.ndarray:
    positives = int(round(count * prevalence))
    # Three seed words keep this stream apart from every per-image stream [seed, index].
    order = np.random.default_rng([seed, count, 0x1ABE1]).permutation(count)
    labels = (order < positives).astype(np.int64)
    labels.setflags(write=False)
    return labels


def generate(spec: SyntheticSpec) -> Iterator[SyntheticImage]:
    """Every image of the set, in index order."""
    for index in range(spec.count):
        yield make_image(spec, index)


def make_image(spec: SyntheticSpec, index: int) -> SyntheticImage:
    """The image at ``index``: a pure function of (spec, index)."""
    if not 0 <= index < spec.count:
        raise IndexError(f"index={index} is outside the synthetic set of {spec.count} images")
    label = int(_labels(spec.count, spec.prevalence, spec.seed)[index])
    rng = np.random.default_rng([spec.seed, index])

    # Marker draws come first and always happen, so the anatomy of an index is the same whatever
    # the shortcut: two specs differing only in shortcut differ only in marker pixels.
    marker_draw = rng.random()
    letter = _MARKER_LETTERS[int(rng.integers(len(_MARKER_LETTERS)))]
    place = _MARKER_PLACES[int(rng.integers(len(_MARKER_PLACES)))]
    place_jitter = rng.random(3)

    density, mask = _render_chest(rng, spec.size, positive=label == 1, faintest=spec.faintest)
    image = np.clip(np.rint(density * 255.0), 0, 255).astype(np.uint8)

    has_marker = spec.shortcut > 0 and (marker_draw < spec.shortcut) == (label == 1)
    if has_marker:
        image = _burn_marker(image, mask, letter, place, place_jitter)
    return SyntheticImage(index=index, image=image, mask=mask, label=label, has_marker=bool(has_marker))


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


def _low_frequency_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """float32 (size, size), zero mean and roughly unit spread, smooth at ``size / cells`` scale."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _render_chest(rng: np.random.Generator, size: int, *, positive: bool,
                  faintest: float) -> tuple[np.ndarray, np.ndarray]:
    """(density float32 (S, S) in [0, 1], lung mask uint8 (S, S) in {0, 1}).

    Long: it draws the chest in order (positioning, soft tissue, lungs, heart and mediastinum, trachea
    and spine, bones, vessels, normal variants, lesions, exposure), each step a few lines that read best
    in sequence.
    """
    s = size
    px = 1.0 / s  # one pixel in normalised units

    # Patient positioning: a small rotation, shift and zoom of the whole chest.
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    shift_x, shift_y = rng.uniform(-0.03, 0.03, 2)
    zoom = rng.uniform(0.93, 1.05)
    coords = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
    gx, gy = np.meshgrid(coords, coords)
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    xx = ((cos_a * gx - sin_a * gy) / zoom + 0.5 - shift_x).astype(np.float32)
    yy = ((sin_a * gx + cos_a * gy) / zoom + 0.5 - shift_y).astype(np.float32)

    # Soft tissue: a torso whose thickness falls off towards its outline.
    body_hw = rng.uniform(0.45, 0.53)
    body_hh = rng.uniform(0.72, 0.85)
    body_cy = rng.uniform(0.58, 0.66)
    # A squarish outline (superellipse): shoulders keep the top of the image wide.
    squareness = rng.uniform(2.6, 3.4)
    body_r = (np.abs((xx - 0.5) / body_hw) ** squareness + np.abs((yy - body_cy) / body_hh) ** squareness) ** (
        1.0 / squareness
    )
    thickness = np.sqrt(np.clip(1.0 - body_r**2, 0.0, 1.0))
    body = _sigmoid((1.0 - body_r) / 0.015)
    tissue_level = rng.uniform(0.46, 0.58)
    density = 0.04 + body * (0.12 + tissue_level * thickness**0.6)

    # Lungs: tapered ellipses (wider at the base), wobbly outlines, cut by the diaphragm domes.
    lung_cy = rng.uniform(0.43, 0.49)
    right_dome_lift = rng.uniform(0.01, 0.045)  # the patient's right (image left) dome sits higher
    lungs = np.zeros((s, s), dtype=np.float32)
    lung_core = np.zeros((s, s), dtype=np.float32)
    domes = []  # dome height (normalised y) per pixel column: image-left (patient right), image-right
    for side in (-1.0, 1.0):
        cx = 0.5 + side * rng.uniform(0.19, 0.23)
        cy = lung_cy + rng.uniform(-0.015, 0.015)
        half_w = rng.uniform(0.14, 0.18)
        half_h = rng.uniform(0.26, 0.32)
        taper = rng.uniform(0.15, 0.35)
        t = (yy - cy) / half_h
        local_w = half_w * (1.0 + taper * np.clip(t, -1.0, 1.0))
        theta = np.arctan2(t, (xx - cx) / half_w)
        wobble = 1.0
        for harmonic in (2, 3, 4):
            wobble = wobble + rng.uniform(0.0, 0.04) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
        r = np.sqrt(((xx - cx) / local_w) ** 2 + t**2) / wobble
        dome_base = cy + half_h * rng.uniform(0.72, 0.85) - (right_dome_lift if side < 0 else 0.0)
        dome_height = rng.uniform(0.05, 0.09)
        dome_w = half_w * rng.uniform(1.2, 1.5)
        dome_x = cx + side * rng.uniform(-0.02, 0.02)
        dome_y = dome_base - dome_height * np.clip(1.0 - ((xx - dome_x) / dome_w) ** 2, 0.0, 1.0)
        field = _sigmoid((1.0 - r) / 0.03) * _sigmoid((dome_y - yy) / (1.5 * px + 0.004))
        lungs = np.maximum(lungs, field)
        lung_core = np.maximum(lung_core, field * np.clip(1.0 - r**2, 0.0, 1.0) ** 0.35)
        domes.append(dome_y)

    # Mediastinum and heart: bright, in front of the lungs' medial parts; the heart sits on the
    # left dome and bulges to the patient's left (image right).
    mediastinum_hw = rng.uniform(0.045, 0.065)
    mediastinum = _sigmoid((mediastinum_hw - np.abs(xx - 0.5 - 0.01)) / 0.012) * _sigmoid((0.75 - yy) / 0.02)
    heart_cx = 0.5 + rng.uniform(0.03, 0.07)
    heart_hw = rng.uniform(0.14, 0.18)
    heart_hh = rng.uniform(0.12, 0.15)
    heart_cy = lung_cy + rng.uniform(0.17, 0.22)
    heart_x = xx - heart_cx
    heart_scale_x = np.where(heart_x > 0, np.float32(heart_hw * 1.1), np.float32(heart_hw * 0.75))
    heart_r = np.sqrt((heart_x / heart_scale_x) ** 2 + ((yy - heart_cy) / heart_hh) ** 2)
    heart = _sigmoid((1.0 - heart_r) / 0.05)
    occluder = np.maximum(mediastinum, heart)
    lungs = lungs * (1.0 - occluder)
    lung_core = lung_core * (1.0 - occluder)
    mask = (lungs > 0.5).astype(np.uint8)

    lung_darkness = rng.uniform(0.30, 0.42)
    density = density - lung_darkness * lung_core - 0.08 * lungs
    # Below the domes the heart merges with the abdomen, so only its upper part shows.
    heart_visible = heart * _sigmoid((domes[1] + 0.03 - yy) / 0.015)
    density = density + rng.uniform(0.08, 0.13) * np.maximum(mediastinum, heart_visible)

    # Trachea (dark) and spine (bright, with vertebral rhythm), along the midline.
    trachea_x = 0.5 + rng.uniform(-0.01, 0.01)
    trachea = _sigmoid((0.016 - np.abs(xx - trachea_x)) / 0.004) * _sigmoid((lung_cy - 0.06 - yy) / 0.01)
    density = density - rng.uniform(0.06, 0.10) * trachea * body
    vertebra_period = rng.uniform(0.05, 0.06)
    spine = _sigmoid((0.035 - np.abs(xx - 0.5)) / 0.006) * body
    density = density + spine * (0.035 + 0.012 * np.cos(2 * np.pi * yy / vertebra_period))

    lateral = np.abs(xx - 0.5)
    bones = _bones(rng, xx, yy, body, lungs, domes, lung_cy)
    density = density + rng.uniform(0.05, 0.085) * bones
    density = density + _vessels(rng, xx, yy, lungs, lung_cy)

    # Normal variants that look a little like disease: breast shadows and lung texture.
    if rng.random() < 0.4:
        breast_y = lung_cy + rng.uniform(0.16, 0.24)
        breast = _sigmoid((0.16 - np.sqrt((lateral - 0.27) ** 2 + ((yy - breast_y) / 0.8) ** 2)) / 0.02)
        density = density + rng.uniform(0.03, 0.07) * breast * body
    if rng.random() < 0.5:  # gastric bubble under the left dome
        bubble_cx = 0.5 + rng.uniform(0.12, 0.2)
        bubble_cy = float(domes[1][min(s - 1, int(lung_cy * s)), min(s - 1, int(bubble_cx * s))]) + 0.05
        bubble = _sigmoid((1.0 - np.sqrt(((xx - bubble_cx) / 0.05) ** 2 + ((yy - bubble_cy) / 0.03) ** 2)) / 0.1)
        density = density - rng.uniform(0.06, 0.12) * bubble * (1.0 - lungs)
    texture = _low_frequency_noise(rng, s, 14)
    density = density + rng.uniform(0.015, 0.03) * texture * lungs

    # Lesions get a stream of their own, seeded by one draw taken for every image: a positive and
    # a negative with the same seed then differ only by the lesions, not by shifted noise.
    lesion_rng = np.random.default_rng(int(rng.integers(2**63)))
    if positive:
        density = density + _opacities(lesion_rng, xx, yy, lungs, mask, s, faintest)

    # Exposure and detector: gain/offset, gamma, unsharpness, quantum noise.
    density = np.clip(density, 0.0, 1.0)
    density = rng.uniform(-0.04, 0.04) + rng.uniform(0.9, 1.12) * density
    density = np.clip(density, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    density = cv2.GaussianBlur(density, (0, 0), sigmaX=rng.uniform(0.5, 1.3) * s / 256)
    density = density + rng.uniform(0.006, 0.02) * rng.standard_normal((s, s), dtype=np.float32)
    return np.clip(density, 0.0, 1.0).astype(np.float32), mask


def _bones(
    rng: np.random.Generator,
    xx: np.ndarray,
    yy: np.ndarray,
    body: np.ndarray,
    lungs: np.ndarray,
    domes: list[np.ndarray],
    lung_cy: float,
) -> np.ndarray:
    """float32 (S, S) bone map, about 0..1: ribs and (usually) clavicles.

    Posterior ribs rise a little from the spine then sweep down laterally; fainter anterior ribs
    slope down towards the sternum. Ribs stand out over air, much less over soft tissue.
    """
    bones = np.zeros(xx.shape, dtype=np.float32)
    lateral = np.abs(xx - 0.5)
    d = np.clip(lateral - 0.04, 0.0, None)
    d2 = d * d
    lowest_dome = np.maximum(domes[0], domes[1])
    cage_width = rng.uniform(0.40, 0.44)
    thorax = _sigmoid((cage_width - lateral) / 0.015) * _sigmoid((lowest_dome + 0.06 - yy) / 0.03) * body
    rib_spacing = rng.uniform(0.050, 0.060)
    rib_top = lung_cy - 0.31 + rng.uniform(-0.01, 0.01)
    rib_curve = rng.uniform(1.1, 1.6)
    rib_width = rng.uniform(0.010, 0.013)
    anterior_slope = 0.10 + 0.4 * (0.40 - np.clip(lateral, 0.0, 0.40))
    anterior_fade = 0.3 * _sigmoid((0.36 - lateral) / 0.02)
    for k in range(11):
        # Lower ribs are spaced wider and hang flatter.
        y0 = rib_top + k * rib_spacing * (1.0 + 0.03 * k) + rng.uniform(-0.004, 0.004)
        centre = y0 - 0.15 * d + rib_curve * (1.0 - 0.03 * k) * d2
        bones += np.exp(-(((yy - centre) / rib_width) ** 2))
        anterior = y0 + anterior_slope
        bones += anterior_fade * np.exp(-(((yy - anterior) / (0.9 * rib_width)) ** 2))
    bones *= thorax * (0.45 + 0.55 * lungs)
    if rng.random() < 0.85:  # clavicles, unless the image is collimated below them
        clavicle_y = rib_top + rng.uniform(0.02, 0.05)
        clavicle_centre = clavicle_y - 0.32 * d + 0.25 * d2
        clavicles = np.exp(-(((yy - clavicle_centre) / 0.014) ** 2)) * _sigmoid((0.36 - d) / 0.02)
        bones += 1.2 * clavicles * _sigmoid((d - 0.03) / 0.01) * body
    return bones


def _vessels(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, lungs: np.ndarray, lung_cy: float) -> np.ndarray:
    """float32 (S, S) extra density: vessel markings fanning out from each hilum, inside the lungs."""
    s = xx.shape[0]
    lateral = np.abs(xx - 0.5)
    vessels = np.zeros((s, s), dtype=np.float32)
    for side in (-1.0, 1.0):
        hilum = np.array([0.5 + side * rng.uniform(0.08, 0.11), lung_cy + rng.uniform(0.0, 0.04)])
        for _ in range(int(rng.integers(6, 11))):
            direction = np.deg2rad(rng.uniform(-70.0, 80.0))
            point = hilum + rng.normal(0.0, 0.01, 2)
            width = max(1, int(round(rng.uniform(2.0, 3.2) * s / 256)))
            for _segment in range(3):
                length = rng.uniform(0.05, 0.10)
                direction += np.deg2rad(rng.normal(0.0, 20.0))
                step = np.array([side * np.cos(direction), np.sin(direction)]) * length
                nxt = point + step
                cv2.line(vessels, _pixel(point, s), _pixel(nxt, s), 1.0, thickness=width, lineType=cv2.LINE_AA)
                point = nxt
                width = max(1, width - 1)
    vessels = cv2.GaussianBlur(vessels, (0, 0), sigmaX=1.2 * s / 256)
    hila = np.exp(-(((lateral - 0.1) / 0.035) ** 2 + ((yy - lung_cy - 0.02) / 0.06) ** 2))
    return rng.uniform(0.05, 0.09) * vessels * lungs + rng.uniform(0.04, 0.08) * hila * lungs


def _opacities(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, lungs: np.ndarray, mask: np.ndarray, s: int,
    faintest: float,
) -> np.ndarray:
    """float32 (S, S) extra density: patchy blobs, mostly peripheral and lower-zone, in the lungs."""
    # One severity per image, spread over faint to marked, so some positives are hard to call.
    severity = rng.beta(1.6, 1.6)
    amplitude = faintest + 0.30 * severity
    lateral = np.abs(xx - 0.5)
    # Where blobs start: inside the mask, favouring the lower zones and the lateral edges.
    weight = mask * np.clip(yy - 0.1, 0.0, None) ** 2 * np.clip(lateral - 0.05, 0.0, None) ** 1.5
    flat = weight.ravel().astype(np.float64)
    total = flat.sum()
    if total <= 0:  # no lung (cannot happen with the ranges above, but never divide by zero)
        return np.zeros((s, s), dtype=np.float32)
    count = int(rng.integers(2, 7))
    starts = rng.choice(flat.size, size=count, p=flat / total)
    blobs = np.zeros((s, s), dtype=np.float32)
    for start in starts:
        row, col = divmod(int(start), s)
        cx, cy = float(xx[row, col]), float(yy[row, col])
        sigma_x, sigma_y = (float(v) for v in rng.uniform(0.035, 0.08, 2))
        blob = np.exp(-0.5 * (((xx - cx) / sigma_x) ** 2 + ((yy - cy) / sigma_y) ** 2))
        blobs += rng.uniform(0.5, 1.0) * blob
    # Patchy, ground-glass texture rather than smooth balls.
    patchiness = np.clip(0.65 + 0.35 * _low_frequency_noise(rng, s, 24), 0.0, 1.2)
    return (amplitude * np.clip(blobs, 0.0, 1.3) * patchiness * lungs).astype(np.float32)


def _pixel(point: np.ndarray, s: int) -> tuple[int, int]:
    return int(round(point[0] * s)), int(round(point[1] * s))


# --------------------------------------------------------------------------------------------
# The shortcut marker
# --------------------------------------------------------------------------------------------


def border_band(size: int) -> np.ndarray:
    """bool (size, size): True in the outer ``BORDER_FRACTION`` of each side, floored: where markers are
    drawn. (The audit's ``evaluation.gradcam.border_band`` rounds instead; changing either would change
    every synthetic dataset's digest or every audit figure recorded so far.)"""
    band = max(1, int(BORDER_FRACTION * size))
    inside = np.zeros((size, size), dtype=bool)
    inside[band : size - band, band : size - band] = True
    return ~inside


def _burn_marker(image: np.ndarray, mask: np.ndarray, letter: str, place: str, jitter: np.ndarray) -> np.ndarray:
    """uint8 (S, S) with a bright letter drawn in the border band, clear of the lungs."""
    s = image.shape[0]
    band = max(1, int(BORDER_FRACTION * s))
    font = cv2.FONT_HERSHEY_SIMPLEX
    thickness = max(1, int(round(s / 110)))
    margin = max(1, int(round(0.012 * s + jitter[0] * 0.01 * s)))
    # About 6% of the side, at least 5 px so it survives the model's resize, and never taller
    # than the band leaves room for.
    letter_height = min(max(0.06 * s, 5.0), max(band - 2 * margin - thickness, 2))
    scale = letter_height / cv2.getTextSize(letter, font, 1.0, thickness)[0][1]
    (width, height), baseline = cv2.getTextSize(letter, font, scale, thickness)
    left = margin
    right = max(margin, s - margin - width - thickness)
    top_y = margin + height
    bottom_y = s - margin - baseline - thickness
    origins = {
        "top-left": (left, top_y),
        "top-right": (right, top_y),
        "bottom-left": (left, bottom_y),
        "bottom-right": (right, bottom_y),
        "top": (int(left + jitter[1] * (right - left)), top_y),
    }
    allowed = border_band(s) & (mask == 0)
    strokes = _draw_letter(s, letter, origins[place], font, scale, thickness)
    if (strokes & ~allowed).any():
        strokes = _draw_letter(s, letter, origins["top-left"], font, scale, thickness)
    # Whatever the font does at tiny sizes, the marker never leaves the band or touches a lung.
    strokes &= allowed
    burned = image.copy()
    burned[strokes] = int(round(225 + 30 * jitter[2]))
    return burned


def _draw_letter(s: int, letter: str, origin: tuple[int, int], font: int, scale: float, thickness: int) -> np.ndarray:
    """bool (s, s): the letter's strokes.

    Thresholded rather than blended: a burned-in annotation is crisp, and at 32-64 px an
    antialiased letter would fade into a few grey pixels.
    """
    canvas = np.zeros((s, s), dtype=np.uint8)
    cv2.putText(canvas, letter, origin, font, scale, 255, thickness, cv2.LINE_8)
    return canvas > 0


__all__ = [
    "BORDER_FRACTION",
    "SyntheticImage",
    "SyntheticSpec",
    "border_band",
    "generate",
    "labels_for",
    "make_image",
]
