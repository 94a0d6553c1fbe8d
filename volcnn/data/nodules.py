"""Synthetic lung nodules: sampling of benign / malignant shapes and textures, placement, rendering.

Benign nodules are mostly small, smooth and round, sometimes calcified (+200..+600 HU); malignant ones
are larger, lobulated and often spiculated (thin tapered spikes radiating out). Sizes, textures and
shapes overlap between the two classes so that "malignant vs benign" is learnable but not trivial.
Textures: solid (~30 HU), part-solid (solid core in a ground-glass halo) and ground-glass
(-650..-400 HU). Rendering is vectorised over a box around the nodule, with a soft edge one voxel
wide for partial volume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from volcnn.data.phantom import Phantom, box_coords, index_box, tube_occupancy

__all__ = ["TEXTURES", "Nodule", "place_nodules", "render_nodule", "sample_candidates", "sample_nodule"]

logger = logging.getLogger(__name__)

TEXTURES = ("solid", "part-solid", "ground-glass")


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``(n, 3)`` unit vectors spread evenly over the sphere."""
    k = np.arange(n) + 0.5
    phi, theta = np.arccos(1 - 2 * k / n), np.pi * (1 + 5**0.5) * k
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


_SPHERE = _fibonacci_sphere(48)


@dataclass(frozen=True)
class Nodule:
    """One nodule, in RAS world mm.

    Attributes:
        center: RAS centre ``(x, y, z)`` in mm (rounded to 1e-3 mm before rendering, so it is exact).
        diameter_mm: nominal diameter (twice the base radius).
        texture: one of :data:`TEXTURES`.
        malignant: malignancy label.
        calcified: benign calcification present.
        solid_hu: HU of the solid part; ggo_hu: HU of the ground-glass part; calc_hu: HU of calcification.
        core_fraction: solid core radius / radius (part-solid only).
        calc_fraction: radius of the central calcification / radius (1.0: diffuse).
        lobes: ``(M, 5)`` rows of (direction xyz, amplitude, concentration) of surface bumps.
        spikes: ``(S, 5)`` rows of (direction xyz, length mm, base radius mm).
        juxtavascular: placed against a pulmonary vessel, which runs into it (see :func:`place_nodules`).
    """

    center: tuple[float, float, float]
    diameter_mm: float
    texture: str
    malignant: bool
    calcified: bool = False
    solid_hu: float = 30.0
    ggo_hu: float = -550.0
    calc_hu: float = 400.0
    core_fraction: float = 0.5
    calc_fraction: float = 0.5
    lobes: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    spikes: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    juxtavascular: bool = False

    @property
    def radius(self) -> float:
        """Base radius in mm."""
        return self.diameter_mm / 2.0

    @property
    def extent(self) -> float:
        """Radius in mm of a ball that contains the whole nodule, spikes included."""
        lob = 1.0 + float(np.sum(np.abs(self.lobes[:, 3]))) if len(self.lobes) else 1.0
        spk = float(self.spikes[:, 3].max()) if len(self.spikes) else 0.0
        return self.radius * lob + spk


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sample_nodule(rng: np.random.Generator, malignant: bool, diameter_range: tuple[float, float]) -> Nodule:
    """Draw the shape, size and texture of one nodule (its centre is set by :func:`place_nodules`).

    Args:
        rng: random generator.
        malignant: class of the nodule.
        diameter_range: ``(min, max)`` diameter in mm; the class distributions are clipped to it.

    Returns:
        A :class:`Nodule` centred at the origin.
    """
    lo, hi = diameter_range
    if malignant:
        diam = rng.lognormal(np.log(11.0), 0.45)
        texture = str(rng.choice(TEXTURES, p=[0.55, 0.3, 0.15]))
        n_lobes = int(rng.integers(2, 7)) if rng.random() < 0.75 else 0
        lobe_amp = (0.12, 0.32)
        n_spikes = int(rng.integers(6, 20)) if rng.random() < 0.55 else 0
    else:
        diam = rng.lognormal(np.log(7.5), 0.45)
        texture = str(rng.choice(TEXTURES, p=[0.7, 0.1, 0.2]))
        n_lobes = int(rng.integers(1, 4)) if rng.random() < 0.3 else 0
        lobe_amp = (0.03, 0.10)
        n_spikes = int(rng.integers(1, 4)) if rng.random() < 0.1 else 0
    diam = float(np.clip(diam, lo, hi))
    r = diam / 2.0
    calcified = (not malignant) and texture == "solid" and rng.random() < 0.35
    lobes = np.zeros((n_lobes, 5))
    if n_lobes:
        lobes[:, :3] = _unit(rng, n_lobes)
        lobes[:, 3] = rng.uniform(*lobe_amp, n_lobes)
        lobes[:, 4] = rng.uniform(3.0, 8.0, n_lobes)
    spikes = np.zeros((n_spikes, 5))
    if n_spikes:
        spikes[:, :3] = _unit(rng, n_spikes)
        spikes[:, 3] = r * rng.uniform(0.5, 1.5, n_spikes) + 2.0
        spikes[:, 4] = rng.uniform(0.5, 1.2, n_spikes)
    return Nodule(
        center=(0.0, 0.0, 0.0),
        diameter_mm=round(diam, 3),
        texture=texture,
        malignant=bool(malignant),
        calcified=bool(calcified),
        solid_hu=float(rng.uniform(10.0, 50.0)),
        ggo_hu=float(rng.uniform(-650.0, -400.0)),
        calc_hu=float(rng.uniform(200.0, 600.0)),
        core_fraction=float(rng.uniform(0.35, 0.65)),
        calc_fraction=float(1.0 if rng.random() < 0.35 else rng.uniform(0.3, 0.6)),
        lobes=lobes,
        spikes=spikes,
    )


def _radius_field(nod: Nodule, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
    """Surface radius (mm) in the unit directions ``(ux, uy, uz)``: base radius plus lobulation bumps."""
    rad = np.full(np.broadcast_shapes(ux.shape, uy.shape, uz.shape), nod.radius, dtype=np.float64)
    for dx, dy, dz, amp, kappa in nod.lobes:
        cos = ux * dx + uy * dy + uz * dz
        mean = (1.0 - np.exp(-2.0 * kappa)) / (2.0 * kappa)  # mean of exp(kappa (cos - 1)) over the sphere
        rad = rad + nod.radius * amp * (np.exp(kappa * (cos - 1.0)) - mean)
    return rad


def render_nodule(ph: Phantom, nod: Nodule) -> None:
    """Paint ``nod`` into ``ph.volume`` in place (values only rise: vessels and bone stay visible).

    Args:
        ph: phantom whose ``volume`` ``(Z, Y, X)`` is modified.
        nod: nodule with its final centre.
    """
    geom = ph.geometry
    c = np.asarray(nod.center, dtype=np.float64)
    edge = float(min(geom.spacing))
    pad = nod.extent + 2.0 * edge
    box = index_box(geom, c - pad, c + pad)
    if box is None:
        return
    z, y, x = box_coords(geom, box)
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz)
    safe = np.maximum(dist, 1e-6)
    rad = _radius_field(nod, dx / safe, dy / safe, dz / safe)
    ggo_edge = edge * (2.0 if nod.texture == "ground-glass" else 1.0)
    occ = np.clip((rad - dist) / ggo_edge + 0.5, 0.0, 1.0)
    spike_occ = np.zeros_like(occ)
    for sx, sy, sz, length, r0 in nod.spikes:
        d = np.array([sx, sy, sz])
        base_r = float(_radius_field(nod, np.array(sx), np.array(sy), np.array(sz)))
        p0, p1 = c + d * 0.7 * base_r, c + d * (base_r + length)
        spike_occ = np.maximum(spike_occ, tube_occupancy((z, y, x), p0, p1, r0, 0.2, edge))
    if nod.texture == "solid":
        target = np.full_like(occ, nod.solid_hu)
    else:
        target = np.full_like(occ, nod.ggo_hu)
        if nod.texture == "part-solid":
            core = np.clip((nod.core_fraction * rad - dist) / edge + 0.5, 0.0, 1.0)
            target += core * (nod.solid_hu - nod.ggo_hu)
    spike_hu = nod.solid_hu if nod.texture != "ground-glass" else 0.5 * (nod.solid_hu + nod.ggo_hu)
    target = np.where(spike_occ > occ, spike_hu, target)
    occ = np.maximum(occ, spike_occ)
    if nod.calcified:
        calc = np.clip((nod.calc_fraction * rad - dist) / edge + 0.5, 0.0, 1.0)
        target += calc * (nod.calc_hu - target)
    sub = ph.volume[box]
    new = sub + occ * (target - sub)
    np.maximum(sub, new.astype(np.float32), out=sub)


def _fits(ph: Phantom, center: np.ndarray, radius: float, min_inside: float) -> bool:
    """Whether ``center`` is in the lung and at least ``min_inside`` of a sphere of ``radius`` around it too."""
    if not ph.lookup(center)[0]:
        return False
    shell = ph.lookup(center + radius * _SPHERE)
    half = ph.lookup(center + 0.5 * radius * _SPHERE)
    return bool(half.all() and shell.mean() >= min_inside)


def place_nodules(
    ph: Phantom,
    rng: np.random.Generator,
    nodules: list[Nodule],
    tries: int = 400,
    juxtavascular: float = 0.0,
    attach_rng: np.random.Generator | None = None,
) -> list[Nodule]:
    """Give each nodule a centre in the lungs, apart from the others, and render it.

    Most nodules are fully inside the lung; about 15% may touch the pleura (juxta-pleural). A nodule
    that does not fit after ``tries`` proposals is shrunk by 20% and tried again (up to 3 times), then
    dropped with a warning. Then each nodule is, with probability ``juxtavascular``, moved against a pulmonary
    vessel (see :func:`_attach_to_vessel`): the vessel-attached nodules that LIDC-IDRI holds many of and that whole-CT
    detectors miss most, because their outline merges with the vessel's. Those draws come from ``attach_rng``, so a
    nodule that stays where it was has the same centre, and the image the same voxels, whatever the share.

    Args:
        ph: phantom to paint into.
        rng: random generator.
        nodules: nodules from :func:`sample_nodule`.
        tries: proposals per attempt.
        juxtavascular: share of nodules moved against a vessel, in [0, 1].
        attach_rng: generator of those draws (required when ``juxtavascular`` > 0).

    Returns:
        The placed nodules, with their exact RAS centres (3-decimal floats).
    """
    if not 0.0 <= juxtavascular <= 1.0:
        raise ValueError(f"juxtavascular must be a share in [0, 1], got {juxtavascular!r}")
    if juxtavascular > 0 and attach_rng is None:
        raise ValueError("juxtavascular > 0 needs attach_rng")
    lung_idx = np.argwhere(ph.lung[:: max(1, ph.lung.shape[0] // 64)].any(axis=0))  # (y, x) columns with lung
    zs = np.flatnonzero(ph.lung.any(axis=(1, 2)))
    if len(lung_idx) == 0 or len(zs) == 0:
        logger.warning("no lung in phantom; nodules dropped")
        return []
    geom = ph.geometry
    lo = geom.origin + np.array([lung_idx[:, 1].min(), lung_idx[:, 0].min(), zs.min()]) * np.array(geom.spacing)
    hi = geom.origin + np.array([lung_idx[:, 1].max(), lung_idx[:, 0].max(), zs.max()]) * np.array(geom.spacing)
    placed: list[Nodule] = []
    for nod in nodules:
        cur = nod
        done = False
        for _attempt in range(4):
            min_inside = 0.6 if rng.random() < 0.15 else 1.0
            for _ in range(tries):
                cand = np.round(rng.uniform(lo, hi), 3)
                if any(np.linalg.norm(cand - np.array(o.center)) < cur.radius + o.radius + 5.0 for o in placed):
                    continue
                if _fits(ph, cand, cur.radius + min(geom.spacing), min_inside):
                    cur = replace(cur, center=(float(cand[0]), float(cand[1]), float(cand[2])))
                    done = True
                    break
            if done:
                break
            scale = 0.8
            cur = replace(
                cur, diameter_mm=round(max(4.0, cur.diameter_mm * scale), 3), spikes=cur.spikes * [1, 1, 1, scale, 1]
            )
        if not done:
            logger.warning("could not place a %.1f mm nodule; dropped", nod.diameter_mm)
            continue
        placed.append(cur)
    if juxtavascular > 0 and attach_rng is not None:
        for i, nod in enumerate(placed):
            if attach_rng.random() < juxtavascular:
                others = placed[:i] + placed[i + 1 :]
                placed[i] = _attach_to_vessel(ph, attach_rng, nod, others, tries) or nod
    for nod in placed:
        render_nodule(ph, nod)
    return placed


def _attach_to_vessel(
    ph: Phantom, rng: np.random.Generator, nod: Nodule, others: list[Nodule], tries: int
) -> Nodule | None:
    """``nod`` moved so that a pulmonary vessel runs into it, or ``None`` when no vessel has room for it.

    A segment is drawn with probability proportional to its radius among those at least 1 mm thick (hilar and
    segmental vessels; the thin peripheral ones barely mark a nodule), a point on its middle 60%, and a direction
    perpendicular to it; the centre lies (vessel radius + 0.2-0.8 nodule radius) from the axis, so the vessel's edge
    sinks into the nodule. The nodule must fit inside the lung as at first placement and stay 5 mm clear of the
    other nodules.
    """
    vt = ph.vessels
    radius = 0.5 * (vt.r0 + vt.r1)
    pool = np.flatnonzero(radius >= 1.0)
    if not len(pool):
        return None
    weights = radius[pool] / radius[pool].sum()
    edge = min(ph.geometry.spacing)
    for _ in range(tries):
        k = int(rng.choice(pool, p=weights))
        axis = vt.p1[k] - vt.p0[k]
        length = float(np.linalg.norm(axis))
        if length < 1e-6:
            continue
        axis /= length
        t = rng.uniform(0.2, 0.8)
        on_axis = vt.p0[k] + t * length * axis
        side = _unit(rng, 1)[0]
        side -= side.dot(axis) * axis
        if np.linalg.norm(side) < 1e-3:
            continue
        side /= np.linalg.norm(side)
        vessel_r = vt.r0[k] + t * (vt.r1[k] - vt.r0[k])
        cand = np.round(on_axis + side * (vessel_r + nod.radius * rng.uniform(0.2, 0.8)), 3)
        if any(np.linalg.norm(cand - np.array(o.center)) < nod.radius + o.radius + 5.0 for o in others):
            continue
        if _fits(ph, cand, nod.radius + edge, 1.0):
            return replace(nod, center=_tuple(cand), juxtavascular=True)
    return None


def _far(points: np.ndarray, nodules: list[Nodule], margin: float) -> np.ndarray:
    """Mask ``(N,)`` of points at least (nodule radius + ``margin``) mm away from every nodule."""
    ok = np.ones(len(points), dtype=bool)
    for nod in nodules:
        ok &= np.linalg.norm(points - np.asarray(nod.center), axis=1) >= nod.radius + margin
    return ok


def sample_candidates(
    ph: Phantom,
    rng: np.random.Generator,
    nodules: list[Nodule],
    n_negatives: int,
    margin: float = 10.0,
    n_junctions: int = 0,
) -> list[tuple[tuple[float, float, float], int, str]]:
    """LUNA16-style candidates: jittered nodule centres (class 1) and negatives (class 0).

    Negatives are, in order of preference: points on vessel centrelines in the lung (about half: the
    hard negatives), random points in lung parenchyma, and a few points in other tissue. Every negative
    lies at least (nodule radius + ``margin``) mm from every nodule.

    ``n_junctions`` more negatives lie at vessel branch points (see :func:`sample_junctions`), where the
    candidate detectors behind LUNA16's candidate lists fire most and a model trained only on vessel
    segments mistakes thick hilar bifurcations for nodules. They are drawn from a child generator
    (``rng.spawn``), so asking for them leaves ``rng``'s stream, and hence the case's image, unchanged.

    Args:
        ph: the phantom (lung mask and vessels are used; ``volume`` is read before noise).
        rng: random generator.
        nodules: placed nodules.
        n_negatives: number of negatives wanted (fewer when the lungs are too small to fit them).
        margin: clearance from nodules in mm.
        n_junctions: extra negatives at vessel branch points (fewer when the tree has fewer in the lung).

    Returns:
        ``[(center_ras, label, kind)]`` with centres rounded to 1e-3 mm, kind in
        {"nodule", "vessel", "parenchyma", "tissue", "junction"}; the first kinds in a random order, then the
        junctions.
    """
    out: list[tuple[tuple[float, float, float], int, str]] = []
    for nod in nodules:
        jitter = _unit(rng, 1)[0] * rng.uniform(0.0, 0.95)
        out.append((_tuple(np.asarray(nod.center) + jitter), 1, "nodule"))
    n_vessel = (n_negatives + 1) // 2
    n_tissue = max(1, n_negatives // 6) if n_negatives >= 3 else 0
    n_lung = n_negatives - n_vessel - n_tissue
    vt = ph.vessels
    if len(vt.r0) and n_vessel:
        big = np.flatnonzero(vt.r0 >= 0.75)
        pool = big if len(big) else np.arange(len(vt.r0))
        seg = pool[rng.integers(0, len(pool), 40 * n_vessel)]
        t = rng.uniform(0.2, 0.8, len(seg))[:, None]
        pts = np.round(vt.p0[seg] + t * (vt.p1[seg] - vt.p0[seg]), 3)
        pts = pts[ph.lookup(pts) & _far(pts, nodules, margin)]
        _, first = np.unique(np.round(pts, 0), axis=0, return_index=True)  # no duplicates
        pts = pts[np.sort(first)][:n_vessel]
        out += [(_tuple(p), 0, "vessel") for p in pts]
        n_lung += n_vessel - len(pts)
    else:
        n_lung += n_vessel
    lo, hi = ph.body_box
    for kind, n in (("parenchyma", n_lung), ("tissue", n_tissue)):
        if n <= 0:
            continue
        pts = np.round(rng.uniform(lo, hi, size=(200 * n, 3)), 3)
        hu = ph.lookup(pts, ph.volume)
        lung = ph.lookup(pts)
        ok = (lung & (hu < -700)) if kind == "parenchyma" else (~lung & (hu > -200))
        pts = pts[ok & _far(pts, nodules, margin)][:n]
        out += [(_tuple(p), 0, kind) for p in pts]
    if len(out) < len(nodules) + n_negatives:
        logger.debug("only %d of %d negatives fit", len(out) - len(nodules), n_negatives)
    order = rng.permutation(len(out))
    shuffled = [out[i] for i in order]
    if n_junctions > 0:
        pts = sample_junctions(ph, rng.spawn(1)[0], nodules, n_junctions, margin)
        shuffled += [(_tuple(p), 0, "junction") for p in pts]
    return shuffled


def sample_junctions(
    ph: Phantom, rng: np.random.Generator, nodules: list[Nodule], n: int, margin: float = 10.0, jitter_mm: float = 1.5
) -> np.ndarray:
    """Up to ``n`` points ``(M, 3)`` (RAS mm) at branch points of the vessel tree, inside the lung.

    A branch point is where a segment starts from another's end (the hila, where the trees start, count too).
    Points are drawn without replacement with probability proportional to the parent vessel's radius (the thick
    hilar bifurcations are the blob-like ones), moved by up to ``jitter_mm`` in a random direction (a candidate
    detector does not hit the exact centre), and kept when inside the lung and at least (nodule radius +
    ``margin``) mm from every nodule.
    """
    vt = ph.vessels
    if n <= 0 or not len(vt.p0):
        return np.zeros((0, 3))
    starts, index = np.unique(np.round(vt.p0, 3), axis=0, return_inverse=True)
    radius = np.zeros(len(starts))
    np.maximum.at(radius, index.ravel(), vt.r0)
    order = rng.choice(len(starts), size=len(starts), replace=False, p=radius / radius.sum())
    pts = starts[order] + _unit(rng, len(order)) * rng.uniform(0.0, jitter_mm, (len(order), 1))
    pts = np.round(pts, 3)
    return pts[ph.lookup(pts) & _far(pts, nodules, margin)][:n]


def _tuple(p: np.ndarray) -> tuple[float, float, float]:
    q = np.round(np.asarray(p, dtype=np.float64), 3)
    return (float(q[0]), float(q[1]), float(q[2]))
