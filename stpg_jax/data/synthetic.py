"""Embedded road scenes: procedurally generated images + labels, deterministic from a seed.

Classes are CamVid's 11 (sky, building, pole, road, pavement, tree, sign_symbol, fence, car, pedestrian,
bicyclist) with a long tail like CamVid/Cityscapes: the thin and small classes cover about 1% of the pixels
or less (measured shares in docs/data.md), yet none is sub-pixel at the demo's scale: poles are at least 5 pixels
wide, fence slats 4-7, pedestrians at least 22 pixels tall, so each spans a few of the decoder's stride-4 cells.
Most rare objects wear a saturated hue of their class that no large class uses (poles yellow, fences turquoise,
pedestrians magenta, bicyclists orange), a cue a demo-sized network learns from few labels; the others (40 %) take the
colours of large classes (grey poles, brown fences, pedestrians and bicyclists in the cars' colours) and only their
shape and context tell them apart, which few labels teach less well. Signs are red, blue or white, as are some cars.
The large classes share their greys and browns, and every image is lit, tinted and noised differently, so colour
alone does not give the class.
Each item is generated on demand from (seed, split, index) in some 15-20 ms of CPU; nothing is stored on disk.
"""

import functools

import numpy as np

from stpg_jax.data import palettes

SKY, BUILDING, POLE, ROAD, PAVEMENT, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST = range(11)
CLASS_NAMES = palettes.SYNTHETIC_CLASSES
_SPLIT_CODES = {'labeled': 1, 'unlabeled': 2, 'val': 3}

# Colours. Most rare objects wear their class's own saturated hue, which no large class uses (poles yellow, fences
# turquoise, pedestrians magenta, bicyclists orange); the others (SHARED_SHARE of them) take colours of large classes,
# as in real streets, and only their shape and context tell them apart: grey poles beside grey road and buildings,
# brown or grey fences beside brown buildings, pedestrians and bicyclists dressed in the cars' colours on black tyres.
# Signs are red, blue or white, and so are some cars.
SHARED_SHARE = 0.4
POLE_COLOURS = {"own": ((235, 200, 20), (250, 215, 60)), "shared": ((150, 150, 155), (95, 95, 100))}
SIGN_COLOURS = ((205, 30, 30), (30, 55, 195), (225, 225, 220))  # red, blue, white
FENCE_COLOURS = {"own": ((15, 185, 170), (40, 200, 190)), "shared": ((135, 100, 65), (185, 185, 180))}
CLOTHES_COLOURS = {"own": ((215, 40, 195), (150, 25, 160)),  # magenta top, darker trousers
                   "shared": ((195, 40, 40), (40, 60, 165), (220, 220, 220), (50, 50, 55), (60, 130, 60))}
SKIN_COLOURS = ((225, 185, 155), (150, 105, 75))
BICYCLE_COLOURS = {"own": ((250, 125, 10), (140, 60, 0)),  # orange frame and rider, dark orange tyres
                   "shared": ((195, 40, 40), (40, 60, 165), (150, 150, 155), (30, 30, 33))}
CAR_COLOURS = ((225, 225, 228), (175, 175, 180), (125, 125, 130), (70, 70, 75), (30, 30, 35), (45, 55, 95),
               (165, 30, 30), (35, 55, 160))


def _colours(rng, palette, count=1):
    """``count`` colours of one object: all from its class's own hues, or (SHARED_SHARE of objects) all shared."""
    choice = palette["shared"] if rng.random() < SHARED_SHARE else palette["own"]
    return [choice[i] for i in rng.integers(len(choice), size=count)]


def _rng_for(seed, split, index):
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODES[split], int(index)]))


class _Canvas:
    """An image in float RGB and its label, painted back to front."""

    def __init__(self, height, width, rng):
        self.h, self.w, self.rng = height, width, rng
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.image = np.zeros((height, width, 3), np.float32)
        self.label = np.zeros((height, width), np.uint8)

    def jitter(self, rgb, amount=18.0):
        return np.clip(np.asarray(rgb, np.float32) + self.rng.normal(0, amount, 3), 0, 255)

    def paint(self, mask, cls, colour, texture=None):
        """colour: (3,) or (H, W, 3); texture: optional (H, W) brightness factor."""
        colour = np.broadcast_to(np.asarray(colour, np.float32), self.image.shape)
        if texture is not None:
            colour = colour * texture[..., None]
        self.image[mask] = colour[mask]
        self.label[mask] = cls

    def stripes(self, fx, fy, depth):
        phase = self.rng.uniform(0, 2 * np.pi, 2)
        return 1.0 + depth * np.sin(self.xx * fx + phase[0]) * np.sin(self.yy * fy + phase[1])

    def blobs(self, depth, scale=3.0):
        """Smooth random brightness texture (foliage, plaster)."""
        g = self.rng.normal(0, 1, (int(self.h / scale) + 2, int(self.w / scale) + 2)).astype(np.float32)
        yi = np.minimum((self.yy / scale).astype(int), g.shape[0] - 1)
        xi = np.minimum((self.xx / scale).astype(int), g.shape[1] - 1)
        return 1.0 + depth * np.tanh(g[yi, xi])

    def ellipse(self, cy, cx, ry, rx):
        return ((self.yy - cy) / max(ry, 0.5)) ** 2 + ((self.xx - cx) / max(rx, 0.5)) ** 2 <= 1.0

    def box(self, y0, y1, x0, x1):
        return (self.yy >= y0) & (self.yy < y1) & (self.xx >= x0) & (self.xx < x1)


def generate_scene(rng, height=96, width=128):
    """One road scene: image (H, W, 3) uint8 RGB and label (H, W) uint8 in [0, 11)."""
    c = _Canvas(height, width, rng)
    H, W = float(height), float(width)
    horizon = H * rng.uniform(0.38, 0.52)
    _paint_background(c, rng, horizon)
    ground = _paint_ground(c, rng, horizon)

    def place(lo, hi):
        """A ground point: (y, x, s) with perspective scale s in (0, 1]."""
        y = horizon + rng.uniform(lo, hi) * (H - horizon)
        s = (y - horizon) / max(H - horizon, 1.0)
        return y, s

    # Objects, each drawn when painted (far to near), so the draws of its shape follow the order of depth.
    objects = []  # (base y, painter)
    side = rng.choice([-1.0, 1.0])
    if rng.random() < 0.4:  # a stretch of fence along one side of the road, a top rail over slats
        objects.append((horizon, functools.partial(_paint_fence, c, rng, ground, side)))
    for _ in range(rng.poisson(1.3)):
        y, s = place(0.15, 1.0)
        objects.append((y, functools.partial(_paint_car, c, rng, ground, y, s)))
    for _ in range(1 + (rng.random() < 0.3)):  # one pole, sometimes two
        y, s = place(0.1, 0.9)
        objects.append((y, functools.partial(_paint_pole, c, rng, ground, side, y, s)))
    for _ in range(rng.poisson(0.6)):
        y, s = place(0.1, 1.0)
        objects.append((y, functools.partial(_paint_pedestrian, c, rng, ground, y, s)))
    if rng.random() < 0.35:
        y, s = place(0.1, 0.9)
        objects.append((y, functools.partial(_paint_bicyclist, c, rng, ground, y, s)))
    for _, paint in sorted(objects, key=lambda o: o[0]):
        paint()

    # Lighting: a global gain and colour cast, a soft brightness ramp, sensor noise.
    gain = rng.uniform(0.6, 1.3) * rng.uniform(0.9, 1.1, 3)
    ramp = 1.0 + rng.uniform(-0.25, 0.25) * (c.xx / W - 0.5)[..., None]
    noise = rng.normal(0, rng.uniform(4, 14), c.image.shape)
    image = np.clip(c.image * gain * ramp + noise, 0, 255).astype(np.uint8)
    return image, c.label


def _paint_background(c: _Canvas, rng, horizon: float) -> None:
    """Sky, buildings along the horizon, trees in front of them."""
    H, W = float(c.h), float(c.w)
    # Sky: a vertical gradient, bluish to hazy, sometimes overcast grey.
    top = c.jitter(rng.choice([(90, 140, 210), (170, 180, 190), (120, 160, 220)]), 20)
    low = c.jitter((200, 210, 220), 15)
    t = np.clip(c.yy / max(horizon, 1.0), 0, 1)[..., None]
    c.paint(np.ones((c.h, c.w), bool), SKY, top * (1 - t) + low * t)

    # Buildings: blocks along the horizon with window grids; gaps show the sky.
    x = -rng.uniform(0, 0.1) * W
    while x < W:
        bw = rng.uniform(0.12, 0.38) * W
        if rng.random() > 0.12:
            btop = horizon - rng.uniform(0.15, 0.5) * H
            colour = c.jitter(rng.choice([(150, 120, 100), (120, 110, 105), (170, 160, 140), (100, 90, 95)]), 25)
            tex = c.stripes(rng.uniform(0.5, 1.2), rng.uniform(0.5, 1.2), rng.uniform(0.1, 0.3)) * c.blobs(0.08)
            c.paint(c.box(btop, horizon + 2, x, x + bw), BUILDING, colour, tex)
        x += bw

    # Trees: foliage blobs around the horizon, in front of the buildings.
    for _ in range(rng.integers(2, 6)):
        cy = horizon - rng.uniform(0.0, 0.2) * H
        ry, rx = rng.uniform(0.08, 0.22) * H, rng.uniform(0.06, 0.16) * W
        colour = c.jitter(rng.choice([(60, 100, 40), (80, 110, 50), (50, 80, 45)]), 15)
        c.paint(c.ellipse(cy, rng.uniform(0, W), ry, rx), TREE, colour, c.blobs(0.35, 2.0))


def _paint_ground(c: _Canvas, rng, horizon: float) -> dict:
    """Pavement everywhere below the horizon, the road a trapezoid towards a vanishing point, its centre dashes.
    Returns the road's layout: {'horizon', 'vx', 'road', 'left', 'right'} (edges per row, (H, 1))."""
    H, W = float(c.h), float(c.w)
    ground = c.yy >= horizon
    pave = c.jitter((160, 150, 135), 20)
    c.paint(ground, PAVEMENT, pave, c.stripes(1.6, 1.6, 0.12) * c.blobs(0.06))
    vx = rng.uniform(0.35, 0.65) * W
    bl, br = rng.uniform(-0.6, 0.05) * W, rng.uniform(0.95, 1.6) * W
    depth = np.clip((c.yy - horizon) / max(H - horizon, 1.0), 0, 1)
    left, right = vx + (bl - vx) * depth, vx + (br - vx) * depth
    road = ground & (c.xx >= left) & (c.xx <= right)
    c.paint(road, ROAD, c.jitter((110, 105, 110), 12), c.blobs(0.08, 1.5))
    centre = vx + ((bl + br) / 2 - vx) * depth
    dashes = road & (np.abs(c.xx - centre) < 0.5 + 1.5 * depth) & (np.sin(depth * 30 + rng.uniform(0, 6)) > 0.3)
    c.paint(dashes, ROAD, c.jitter((225, 225, 215), 10))
    return {"horizon": horizon, "vx": vx, "road": road, "left": left, "right": right}


def _edges(c: _Canvas, ground: dict, y: float):
    """The road's left and right edge at the row of ``y``."""
    row = int(min(max(y, 0), c.h - 1))
    return ground["left"][row, 0], ground["right"][row, 0]


def _paint_fence(c: _Canvas, rng, ground: dict, side: float) -> None:
    H, W, horizon, vx = float(c.h), float(c.w), ground["horizon"], ground["vx"]
    fh = rng.uniform(0.08, 0.12) * H
    lo, hi = (0.0, vx - 0.05 * W) if side < 0 else (vx + 0.05 * W, W)
    length = rng.uniform(0.2, 0.4) * W
    x0 = rng.uniform(lo, max(lo, hi - length))
    slats = np.sin(c.xx * rng.uniform(0.6, 0.9) + rng.uniform(0, 2 * np.pi)) > -0.5
    top = horizon - fh
    rail = c.box(top, top + max(2.0, 0.25 * fh), x0, x0 + length)
    mask = (rail | (c.box(top, horizon + 0.02 * H, x0, x0 + length) & slats)) & ~ground["road"]
    c.paint(mask, FENCE, c.jitter(_colours(rng, FENCE_COLOURS)[0], 15), c.blobs(0.08))


def _paint_car(c: _Canvas, rng, ground: dict, y: float, s: float) -> None:
    cw = (0.1 + 0.36 * s) * float(c.w) * rng.uniform(0.8, 1.1)
    ch = cw * rng.uniform(0.45, 0.6)
    lo, hi = _edges(c, ground, y)
    cx = rng.uniform(lo + cw / 2, max(lo + cw / 2, hi - cw / 2))
    body = c.box(y - ch * 0.6, y, cx - cw / 2, cx + cw / 2)
    cabin = c.box(y - ch, y - ch * 0.55, cx - cw * 0.32, cx + cw * 0.32)
    colour = c.jitter(CAR_COLOURS[rng.integers(len(CAR_COLOURS))], 12)
    c.paint(body | cabin, CAR, colour, c.blobs(0.05))
    c.paint(c.box(y - ch * 0.95, y - ch * 0.6, cx - cw * 0.27, cx + cw * 0.27), CAR, c.jitter((40, 45, 55), 8))


def _paint_pole(c: _Canvas, rng, ground: dict, side: float, y: float, s: float) -> None:
    """A pole beside the road, mostly with a sign on top."""
    H, W = float(c.h), float(c.w)
    left, right = _edges(c, ground, y)
    px = (left if side < 0 else right) + side * rng.uniform(2.0, 6.0) * (0.5 + s)
    # At least 5 pixels wide: thinner poles fall between the decoder's stride-4 cells.
    ph, pw = (0.18 + 0.27 * s) * H, 5.0 + 4.0 * s
    colour = c.jitter(_colours(rng, POLE_COLOURS)[0], 15)
    c.paint(c.box(y - ph, y, px - pw / 2, px + pw / 2), POLE, colour, c.blobs(0.08))
    if rng.random() < 0.8:
        sz = (0.07 + 0.08 * s) * W
        sign_colour = c.jitter(SIGN_COLOURS[rng.integers(len(SIGN_COLOURS))], 15)
        shape = (
            c.ellipse(y - ph, px, sz / 2, sz / 2)
            if rng.random() < 0.5
            else c.box(y - ph - sz / 2, y - ph + sz / 2, px - sz / 2, px + sz / 2)
        )
        c.paint(shape, SIGN, sign_colour)


def _paint_pedestrian(c: _Canvas, rng, ground: dict, y: float, s: float) -> None:
    left, right = _edges(c, ground, y)
    edge = left if rng.random() < 0.5 else right
    px = edge + rng.choice([-1, 1]) * rng.uniform(2, 10) * (0.5 + s)
    ph = (0.2 + 0.3 * s) * float(c.h)  # s >= 0.1: at least 22 pixels tall, 7 wide
    shirt, trousers = (c.jitter(colour, 12) for colour in _colours(rng, CLOTHES_COLOURS, 2))
    head = c.jitter(SKIN_COLOURS[rng.integers(len(SKIN_COLOURS))], 12)
    body = c.ellipse(y - ph * 0.55, px, ph * 0.3, ph * 0.16)
    legs = c.box(y - ph * 0.3, y, px - ph * 0.12, px - ph * 0.02)
    legs |= c.box(y - ph * 0.3, y, px + ph * 0.02, px + ph * 0.12)
    c.paint(body, PEDESTRIAN, shirt)
    c.paint(legs, PEDESTRIAN, trousers)
    c.paint(c.ellipse(y - ph * 0.9, px, ph * 0.12, ph * 0.1), PEDESTRIAN, head)


def _paint_bicyclist(c: _Canvas, rng, ground: dict, y: float, s: float) -> None:
    bx = rng.uniform(*_edges(c, ground, y))
    r = (0.04 + 0.05 * s) * float(c.h)  # s >= 0.1: wheels at least 4 pixels in radius, their tyres 2 thick
    wheels = c.ellipse(y - r, bx - 1.6 * r, r, r) ^ c.ellipse(y - r, bx - 1.6 * r, 0.5 * r, 0.5 * r)
    wheels |= c.ellipse(y - r, bx + 1.6 * r, r, r) ^ c.ellipse(y - r, bx + 1.6 * r, 0.5 * r, 0.5 * r)
    frame = c.box(y - 1.4 * r, y - 0.9 * r, bx - 1.6 * r, bx + 1.6 * r)
    rider = c.ellipse(y - 3.0 * r, bx, 1.4 * r, 0.7 * r) | c.ellipse(y - 4.8 * r, bx, 0.5 * r, 0.45 * r)
    frame_colour, rider_colour, tyre_colour = (c.jitter(colour, 12) for colour in _colours(rng, BICYCLE_COLOURS, 3))
    c.paint(frame, BICYCLIST, frame_colour)
    c.paint(rider, BICYCLIST, rider_colour)
    c.paint(c.ellipse(y - 4.8 * r, bx, 0.5 * r, 0.45 * r), BICYCLIST, c.jitter(SKIN_COLOURS[rng.integers(2)], 10))
    c.paint(wheels, BICYCLIST, tyre_colour)


class SyntheticSource:
    """Random-access source of embedded road scenes: src[i] → {'image', 'label', 'id'}."""

    def __init__(self, split, num_items, height=96, width=128, seed=0, with_label=True):
        if split not in _SPLIT_CODES:
            raise ValueError(f'split must be one of {sorted(_SPLIT_CODES)}, got {split!r}')
        self.split, self.num_items = split, int(num_items)
        self.height, self.width, self.seed, self.with_label = int(height), int(width), int(seed), with_label
        self._cache = {}  # index → (image, label); a few MB for the default sizes, filled on first use

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_cache'] = {}
        return state

    def __len__(self):
        return self.num_items

    def __getitem__(self, index):
        index = int(index)
        if not 0 <= index < self.num_items:
            raise IndexError(f'index {index} out of range for {self.num_items} {self.split} items')
        if index not in self._cache:
            self._cache[index] = generate_scene(_rng_for(self.seed, self.split, index), self.height, self.width)
        image, label = self._cache[index]
        item = {'image': image, 'id': f'synthetic_{self.split}_{index:06d}'}
        if self.with_label:
            item['label'] = label
        return item

    def __repr__(self):
        return f'SyntheticSource({self.split!r}, {self.num_items}, {self.height}x{self.width}, seed={self.seed})'


def class_shares(source, num_classes=len(CLASS_NAMES)):
    """Pixel share of each class over a labelled source (fractions summing to 1 over non-ignored pixels)."""
    counts = np.zeros(num_classes, np.int64)
    for i in range(len(source)):
        lab = source[i]['label']
        counts += np.bincount(lab[lab != 255].ravel(), minlength=num_classes)[:num_classes]
    return counts / max(counts.sum(), 1)
