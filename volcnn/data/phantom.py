"""Synthetic chest anatomy in Hounsfield units, built on a canonical RAS grid.

The phantom is computed in a canonical grid whose voxel ``(i, j, k)`` lies at RAS world position
``origin + (i * sx, j * sy, k * sz)``. Arrays are held in ``(Z, Y, X)`` C order, so ``volume.T`` is the
``(X, Y, Z)`` RAS array in the Fortran order that NIfTI writes without a copy. Everything is vectorised
per chunk of slices; the only Python loops run over slice chunks and vessel segments, never voxels.

Tissues (HU): air -1000, skin ~10, subcutaneous fat ~-100, muscle ~40, lung parenchyma ~-850 with
low-frequency texture and a dependent (posterior) density gradient, ribs and sternum, a spine (cortical
~700, cancellous ~250, discs, canal), mediastinum, heart, descending aorta, abdomen below the
diaphragm, and branching, tapering pulmonary vessels (~40 HU, 1-6 mm) that are the hard negatives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SIZES",
    "CaseGeometry",
    "Phantom",
    "SizeSpec",
    "VesselTree",
    "box_coords",
    "build_phantom",
    "chunk_slices",
    "index_box",
    "tube_occupancy",
]

logger = logging.getLogger(__name__)

_CHUNK_VOXELS = 4_000_000


@dataclass(frozen=True)
class SizeSpec:
    """Size parameters of one cohort preset.

    Attributes:
        name: preset name.
        matrix: in-plane matrix sizes to choose from (square, voxels).
        inplane_mm: range of in-plane spacing (same for x and y), mm.
        slice_mm: range of slice spacing, mm.
        slices: range of the number of slices.
        z_over_fov: range of the ratio (z extent / in-plane field of view) before clipping to ``slices``.
        nodule_mm: nodule diameter range, mm (caps the benign and malignant distributions).
        negatives: range of negative candidates per case.
        vessel_min_mm: diameter under which vessel branches stop.
        max_segments: cap on vessel segments per case.
    """

    name: str
    matrix: tuple[int, ...]
    inplane_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    slices: tuple[int, int]
    z_over_fov: tuple[float, float]
    nodule_mm: tuple[float, float]
    negatives: tuple[int, int]
    vessel_min_mm: float
    max_segments: int


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec("tiny", (64,), (1.2, 1.6), (1.5, 2.5), (24, 48), (0.8, 1.1), (4.0, 12.0), (4, 8), 1.2, 400),
    "small": SizeSpec(
        "small", (192, 224, 256), (0.6, 0.9), (0.7, 2.5), (80, 140), (0.8, 1.1), (4.0, 30.0), (6, 12), 0.8, 2500
    ),
    "full": SizeSpec("full", (512,), (0.6, 0.78), (1.0, 1.25), (260, 320), (0.8, 1.0), (4.0, 30.0), (8, 16), 0.7, 6000),
}


@dataclass(frozen=True)
class CaseGeometry:
    """Canonical RAS grid of one case and the orientation it is stored in.

    Attributes:
        shape: canonical voxel counts ``(X, Y, Z)``.
        spacing: voxel size ``(sx, sy, sz)`` in mm (multiples of 1/256 mm, exact in float32).
        origin: RAS world position of voxel ``(0, 0, 0)`` in mm (multiples of 1/64 mm).
        orientation: axis codes the array is stored in, e.g. ``("L", "P", "S")``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: tuple[str, str, str] = ("R", "A", "S")

    @property
    def affine(self) -> np.ndarray:
        """Canonical ``(4, 4)`` voxel-to-RAS affine."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff

    def world_to_index(self, points: np.ndarray) -> np.ndarray:
        """Map RAS points ``(N, 3)`` to fractional canonical indices ``(N, 3)`` ordered ``(i, j, k)``."""
        return (np.asarray(points, dtype=np.float64) - np.asarray(self.origin)) / np.asarray(self.spacing)

    def axis(self, a: int) -> np.ndarray:
        """World coordinates ``(n_a,)`` in mm of the voxel centres along canonical axis ``a`` (0=x, 1=y, 2=z)."""
        return self.origin[a] + self.spacing[a] * np.arange(self.shape[a], dtype=np.float64)


@dataclass
class VesselTree:
    """Vessel segments in RAS mm: ``p0``, ``p1`` ``(N, 3)``, radii ``r0``, ``r1`` ``(N,)``."""

    p0: np.ndarray
    p1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray


@dataclass
class Phantom:
    """Noise-free anatomy of one case.

    Attributes:
        geometry: the canonical grid.
        volume: HU, float32, ``(Z, Y, X)``.
        lung: lung mask, bool, ``(Z, Y, X)``.
        vessels: the rendered vessel segments.
        body_box: RAS bounds ``(2, 3)`` (min row, max row) of the body, used to sample other tissue.
    """

    geometry: CaseGeometry
    volume: np.ndarray
    lung: np.ndarray
    vessels: VesselTree
    body_box: np.ndarray = field(default_factory=lambda: np.zeros((2, 3)))

    def lookup(self, points: np.ndarray, array: np.ndarray | None = None) -> np.ndarray:
        """Nearest-voxel values ``(N,)`` of ``array`` (default: lung mask) at RAS points ``(N, 3)``.

        Points outside the grid return ``False`` / ``-1000``.
        """
        arr = self.lung if array is None else array
        idx = np.rint(self.geometry.world_to_index(np.atleast_2d(points))).astype(np.int64)
        shape = np.asarray(self.geometry.shape)
        ok = np.all((idx >= 0) & (idx < shape), axis=1)
        out = np.full(len(idx), False if arr.dtype == bool else -1000, dtype=arr.dtype)
        i, j, k = idx[ok].T
        out[ok] = arr[k, j, i]
        return out


def chunk_slices(nz: int, plane_voxels: int) -> list[slice]:
    """Split ``nz`` slices into chunks of about ``_CHUNK_VOXELS`` voxels."""
    step = max(1, _CHUNK_VOXELS // max(1, plane_voxels))
    return [slice(z0, min(nz, z0 + step)) for z0 in range(0, nz, step)]


def tube_occupancy(
    zyx: tuple[np.ndarray, np.ndarray, np.ndarray], p0: np.ndarray, p1: np.ndarray, r0: float, r1: float, edge: float
) -> np.ndarray:
    """Soft occupancy of a tapered tube (capsule) from ``p0`` to ``p1``.

    Args:
        zyx: broadcastable RAS coordinate grids ``(z, y, x)`` in mm (e.g. ``(nz,1,1)``, ``(1,ny,1)``, ``(1,1,nx)``).
        p0: start point ``(3,)`` as ``(x, y, z)`` mm; p1: end point.
        r0: radius at ``p0`` (mm); r1: radius at ``p1``.
        edge: width of the linear edge ramp in mm (about one voxel: partial-volume anti-aliasing).

    Returns:
        Occupancy in [0, 1], float32, with the broadcast shape of ``zyx``.
    """
    z, y, x = zyx
    d = p1 - p0
    length2 = float(d @ d) or 1e-9
    dx, dy, dz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / length2, 0.0, 1.0)
    dist = np.sqrt((dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2)
    radius = r0 + (r1 - r0) * t
    # thin tubes keep their partial-volume mass: the peak occupancy falls below 1 when 2r < edge
    peak = np.minimum(1.0, 2.0 * radius / edge)
    occ = np.clip((radius - dist) / edge + 0.5, 0.0, 1.0) * peak
    return occ.astype(np.float32)


def index_box(geom: CaseGeometry, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Index box ``(z, y, x)`` of slices covering RAS bounds ``lo``..``hi`` (``(3,)`` each); None if empty."""
    ilo = np.maximum(np.floor(geom.world_to_index(lo[None])[0]).astype(int), 0)
    ihi = np.minimum(np.ceil(geom.world_to_index(hi[None])[0]).astype(int) + 1, geom.shape)
    if np.any(ihi <= ilo):
        return None
    return slice(ilo[2], ihi[2]), slice(ilo[1], ihi[1]), slice(ilo[0], ihi[0])


def box_coords(geom: CaseGeometry, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable RAS coordinates ``(z (n,1,1), y (1,n,1), x (1,1,n))`` of a ``(z, y, x)`` index box."""
    z = geom.axis(2)[box[0]][:, None, None]
    y = geom.axis(1)[box[1]][None, :, None]
    x = geom.axis(0)[box[2]][None, None, :]
    return z, y, x


def _interp_matrix(n: int, m: int) -> np.ndarray:
    """Linear interpolation weights ``(n, m)`` from ``m`` coarse samples to ``n`` fine ones over the same span."""
    pos = np.linspace(0.0, m - 1.0, n)
    i0 = np.minimum(np.floor(pos).astype(int), m - 2)
    w = (pos - i0).astype(np.float32)
    mat = np.zeros((n, m), dtype=np.float32)
    mat[np.arange(n), i0] = 1.0 - w
    mat[np.arange(n), i0 + 1] = w
    return mat


def _lowfreq(rng: np.random.Generator, shape_zyx: tuple[int, int, int], cells: tuple[int, int, int]) -> tuple:
    """Coarse Gaussian field interpolated in y and x; returns ``(field (cz, Y, X), wz (Z, cz))`` for z interpolation."""
    cz, cy, cx = (max(2, c) for c in cells)
    coarse = rng.standard_normal((cz, cy, cx), dtype=np.float32)
    wy, wx = _interp_matrix(shape_zyx[1], cy), _interp_matrix(shape_zyx[2], cx)
    field_ = np.einsum("zab,ya,xb->zyx", coarse, wy, wx, optimize=True).astype(np.float32)
    return field_, _interp_matrix(shape_zyx[0], cz)


def _sample_params(geom: CaseGeometry, rng: np.random.Generator) -> dict[str, float]:
    """Random anatomy parameters (mm, or fractions of the body half-width) for a chest that fits the field of view."""
    fov = geom.shape[0] * geom.spacing[0]
    zs = geom.axis(2)
    a_b = fov * rng.uniform(0.40, 0.46)
    p = {
        "cx": float(geom.axis(0).mean() + rng.uniform(-0.02, 0.02) * fov),
        "cy": float(geom.axis(1).mean() + rng.uniform(-0.05, 0.0) * fov),
        "a_b": a_b,  # body half-width
        "b_ant": a_b * rng.uniform(0.62, 0.74),  # anterior / posterior half-depths
        "b_post": a_b * rng.uniform(0.58, 0.68),
        "pexp": rng.uniform(2.0, 2.6),  # superellipse exponent of the outline
        "fat": rng.uniform(0.03, 0.09),
        "muscle": rng.uniform(0.04, 0.07),
        "rib": rng.uniform(0.04, 0.055),
        "lung_hu": rng.uniform(-875, -835),
    }
    p["r_cav"] = 1.0 - p["fat"] - p["muscle"]  # thoracic cavity, in units of the outline
    p["a_c"] = a_b * p["r_cav"]
    p["scale"] = a_b / 160.0  # 1.0 for an adult chest ~320 mm wide
    p["rib_pitch"] = 32.0 * max(p["scale"], 0.45) * rng.uniform(0.9, 1.1)
    p["disc_pitch"] = 30.0 * max(p["scale"], 0.4)
    # z landmarks from fractions of the z extent (the lung may be cut by the field of view)
    z0, zlen = float(zs[0]), float(zs[-1] - zs[0])
    p["dome_zr"] = z0 + zlen * rng.uniform(0.12, 0.28)  # the right hemidiaphragm is higher (liver)
    p["dome_zl"] = p["dome_zr"] - zlen * rng.uniform(0.02, 0.06)
    p["lung_top"] = z0 + zlen * rng.uniform(0.9, 1.02)
    height = p["lung_top"] - p["dome_zl"]
    p["dome_h"] = height * rng.uniform(0.10, 0.16)
    p["taper_start"] = p["lung_top"] - 0.3 * height
    p["heart_z"], p["heart_rz"] = p["dome_zl"] + 0.12 * zlen, 0.22 * height
    p["hilum_z"] = p["dome_zl"] + 0.45 * height
    return p


def _cross_section(geom: CaseGeometry, p: dict[str, float]) -> dict[str, np.ndarray]:
    """2D maps ``(Y, X)`` shared by all slices: tissue base, bone masks, lung outline, heart and diaphragm."""
    xs, ys = geom.axis(0).astype(np.float32), geom.axis(1).astype(np.float32)
    u = ((xs - p["cx"]) / p["a_b"])[None, :]
    dx, dy = (xs - p["cx"])[None, :], (ys - p["cy"])[:, None]
    v = np.where(dy > 0, dy / p["b_ant"], dy / p["b_post"])
    rho = (np.abs(u) ** p["pexp"] + np.abs(v) ** p["pexp"]) ** (1.0 / p["pexp"])  # 1 at the skin
    r_cav, a_c, rib = p["r_cav"], p["a_c"], p["rib"]
    base = np.full(rho.shape, -1000.0, dtype=np.float32)
    base[rho <= 1.0] = 10.0  # skin
    base[rho <= 1.0 - 2.0 / p["a_b"]] = -100.0  # subcutaneous fat
    base[rho <= 1.0 - p["fat"]] = 40.0  # muscle
    base[rho <= r_cav] = 25.0  # mediastinum / cavity soft tissue
    m: dict[str, np.ndarray] = {"base": base, "v": v, "dy": dy, "cavity": rho <= r_cav}
    m["rib_band"] = (
        (rho <= r_cav) & (rho > r_cav - rib) & ~((np.abs(u) < 0.22) & (v > 0)) & ~((np.abs(u) < 0.16) & (v < 0))
    )
    m["rib_core"] = (rho <= r_cav - 0.25 * rib) & (rho > r_cav - 0.75 * rib)
    m["sternum"] = (rho <= r_cav) & (rho > r_cav - 1.6 * rib) & (np.abs(u) < 0.07) & (v > 0)
    # spine: vertebral body (cortex + cancellous), canal, posterior arch and spinous process
    r_v = 0.14 * a_c
    yv = p["b_post"] * r_cav - 2.6 * r_v  # depth of the vertebral centre behind cy
    d_body = np.sqrt(dx**2 + (dy + yv) ** 2)
    d_canal = np.sqrt(dx**2 + (dy + yv + 1.45 * r_v) ** 2)
    m["vert_body"] = d_body <= r_v
    m["vert_cortex"] = m["vert_body"] & (d_body > r_v - 1.8)
    m["canal"] = d_canal <= 0.42 * r_v
    m["arch"] = (d_canal <= 0.8 * r_v) & ~m["canal"] & (dy < -yv - r_v)
    m["arch"] |= (np.abs(dx) < 0.15 * r_v) & (dy < -yv - 2.0 * r_v) & (dy > -yv - 2.8 * r_v)
    m["aorta"] = np.sqrt((dx + 0.22 * a_c) ** 2 + (dy + yv - 1.4 * r_v) ** 2) <= 0.075 * a_c
    spine_zone = np.sqrt(dx**2 + (dy + yv + 0.5 * r_v) ** 2) <= 1.7 * r_v
    half_med = 0.09 * a_c + 0.06 * a_c * np.clip(v + 0.2, 0.0, 1.0)  # mediastinum half-width
    r_lung = r_cav - rib - 2.5 / p["a_b"]
    m["lung_outline"] = (rho <= r_lung) & ~spine_zone & ~m["aorta"] & (np.abs(dx) > half_med)
    hx, hy = -0.22 * a_c, 0.2 * p["b_ant"] * r_cav  # heart centre, towards the patient's left (-x) and front
    m["heart"] = ((dx - hx) / (0.42 * a_c)) ** 2 + ((dy - hy) / (0.48 * p["b_ant"] * r_cav)) ** 2
    m["periph"] = ((np.abs(dx) / a_c - 0.5) / 0.5) ** 2 + v**2  # 0 at the centre of a lung, ~1 at its rim
    dome = np.where(dx > 0, p["dome_zr"], p["dome_zl"]) - p["dome_h"] * np.clip(m["periph"], 0, 1.5)
    m["dome"] = dome.astype(np.float32)  # diaphragm height per column: lower at the costophrenic recesses
    return m


def build_phantom(geom: CaseGeometry, rng: np.random.Generator, spec: SizeSpec) -> Phantom:
    """Render the noise-free chest anatomy of one case.

    Args:
        geom: canonical grid.
        rng: random generator (consumed deterministically).
        spec: size preset (vessel minimum diameter and segment cap).

    Returns:
        A :class:`Phantom` with ``volume`` (HU, float32) and ``lung`` (bool), both ``(Z, Y, X)``.
    """
    p = _sample_params(geom, rng)
    m = _cross_section(geom, p)
    nx, ny, nz = geom.shape
    zs = geom.axis(2).astype(np.float32)
    field_, wz = _lowfreq(rng, (nz, ny, nx), (int(nz * geom.spacing[2] / 10) + 2, ny // 10 + 2, nx // 10 + 2))
    lung_tissue = (p["lung_hu"] + 35.0 * np.clip(-m["v"], -1, 1)).astype(np.float32)  # denser posteriorly
    spine_any = m["vert_body"] | m["arch"] | m["canal"]
    volume = np.empty((nz, ny, nx), dtype=np.float32)
    lung = np.empty((nz, ny, nx), dtype=bool)
    for sl in chunk_slices(nz, nx * ny):
        z = zs[sl][:, None, None]
        vol = np.broadcast_to(m["base"], (len(z), ny, nx)).copy()
        phase = np.mod((z + 0.35 * m["dy"][None]) / p["rib_pitch"], 1.0)  # ribs slope down anteriorly
        in_rib = m["rib_band"][None] & (phase < 0.32)
        vol[in_rib] = 650.0  # cortical shell
        vol[in_rib & m["rib_core"][None] & (phase > 0.06) & (phase < 0.26)] = 260.0  # marrow
        vol[:, m["sternum"]] = 450.0
        vol[:, m["aorta"]] = 45.0
        disc = np.mod(z / p["disc_pitch"], 1.0) < 0.22
        vb = np.broadcast_to(np.where(disc, 85.0, np.where(m["vert_cortex"][None], 700.0, 250.0)), vol.shape)
        mask_vb = np.broadcast_to(m["vert_body"][None], vol.shape)
        vol[mask_vb] = vb[mask_vb]
        vol[:, m["arch"]] = 600.0
        vol[:, m["canal"]] = 15.0
        # apex: the lung outline shrinks towards the centre of each lung above taper_start
        frac = np.clip((z - p["taper_start"]) / (p["lung_top"] - p["taper_start"]), 0.0, 1.0)
        apex_ok = m["periph"][None] <= (1.0 - frac**2) * 1.2
        heart = (m["heart"][None] + ((z - p["heart_z"]) / p["heart_rz"]) ** 2) <= 1.0
        below = z <= m["dome"][None]
        lung_c = m["lung_outline"][None] & apex_ok & ~below & ~heart & (z < p["lung_top"])
        vol[below & m["cavity"][None] & ~spine_any[None] & ~in_rib] = 55.0  # abdomen (liver, spleen)
        vol[heart & m["cavity"][None]] = 40.0
        tex = np.einsum("zc,cyx->zyx", wz[sl], field_, optimize=True)
        np.copyto(vol, lung_tissue[None] + 18.0 * tex, where=lung_c)
        volume[sl] = vol
        lung[sl] = lung_c
    body_box = np.array(
        [[p["cx"] - p["a_b"], p["cy"] - p["b_post"], zs[0]], [p["cx"] + p["a_b"], p["cy"] + p["b_ant"], zs[-1]]]
    )
    empty = VesselTree(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0))
    phantom = Phantom(geom, volume, lung, empty, body_box)
    phantom.vessels = _grow_vessels(phantom, rng, spec, p)
    _render_vessels(phantom, geom)
    return phantom


def _grow_vessels(ph: Phantom, rng: np.random.Generator, spec: SizeSpec, p: dict[str, float]) -> VesselTree:
    """Grow two pulmonary vessel trees breadth-first from the hila (segments in RAS mm)."""
    scale = max(p["scale"], 0.3)
    roots = []
    for side in (1.0, -1.0):
        hilum = np.array([p["cx"] + side * 0.2 * p["a_c"], p["cy"] + 0.02 * p["a_c"], p["hilum_z"]])
        for _ in range(10):
            dv = np.array([side * rng.uniform(0.3, 1.0), rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0)])
            roots.append((hilum, dv / np.linalg.norm(dv), rng.uniform(3.5, 6.0), hilum))
    segs: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    queue = roots
    while queue and len(segs) < spec.max_segments:
        nxt = []
        for start, direction, diam, hil in queue:
            length = scale * diam * rng.uniform(3.5, 6.5) + 2.0
            for _retry in range(4):  # bend away from the pleura: up to 3 new directions when the end leaves the lung
                end = start + direction * length
                inside = bool(ph.lookup(end)[0])
                if inside:
                    break
                direction = direction + rng.normal(0.0, 0.6, 3)
                direction /= np.linalg.norm(direction) + 1e-9
            d_child = diam * rng.uniform(0.72, 0.86)
            segs.append((start, end, diam / 2.0, d_child / 2.0))
            if len(segs) >= spec.max_segments or d_child < spec.vessel_min_mm or not inside:
                continue
            outward = end - hil
            outward /= np.linalg.norm(outward) + 1e-9
            perp = np.cross(direction, rng.normal(size=3))
            perp /= np.linalg.norm(perp) + 1e-9
            for k, (theta, dd) in enumerate(((0.35, d_child), (0.6, diam * rng.uniform(0.6, 0.78)))):
                ang = rng.uniform(0.7, 1.3) * theta
                sgn = 1.0 if k == 0 else -1.0
                nd = np.cos(ang) * direction + sgn * np.sin(ang) * perp + 0.25 * outward
                if dd >= spec.vessel_min_mm:
                    nxt.append((end, nd / np.linalg.norm(nd), dd, hil))
        queue = nxt
    if not segs:
        return VesselTree(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0))
    p0, p1, r0, r1 = (np.array(c) for c in zip(*segs, strict=True))
    logger.debug("grew %d vessel segments", len(p0))
    return VesselTree(p0, p1, r0.astype(np.float64), r1.astype(np.float64))


def _render_vessels(ph: Phantom, geom: CaseGeometry) -> None:
    """Paint the vessel segments into the lungs of ``ph.volume`` in place (soft edges, ~40 HU)."""
    edge = float(min(geom.spacing))
    vt = ph.vessels
    for p0, p1, r0, r1 in zip(vt.p0, vt.p1, vt.r0, vt.r1, strict=True):
        pad = max(r0, r1) + edge
        box = index_box(geom, np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
        if box is None:
            continue
        occ = tube_occupancy(box_coords(geom, box), p0, p1, r0, r1, edge)
        occ *= ph.lung[box]
        sub = ph.volume[box]
        sub += occ * (40.0 - sub)
