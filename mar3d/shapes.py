"""Procedural training shapes: watertight unions of random parts, plus variants of real meshes.

    python -m mar3d.shapes OUT_DIR [--count 3000] [--seed 0] [--real-dir DIR] [--real-variants 20] [--workers 2]

Each family is a short function `rng -> trimesh.Trimesh` that draws random proportions and part
choices and unions the parts with manifold3d, so every shape is one watertight, outward-facing
body. Conventions (DESIGN.md §2): +Y up, the shape stands on y = 0 and is centred in x and z;
the front faces +Z where a front exists (chair backs at -Z, car and aircraft noses at +Z).
Sizes are metric-ish; normalisation is left to data preparation. No part is thinner than
~2 % of the object (a small VAE cannot represent thinner ones).

The held-out split is `mar3d.data.is_held_out` on the file name, so names must stay stable:
`<family>_<index:05d>.ply` and `real__<mesh stem>@<variant:02d>.ply` (the held-out split groups by the part before "@", so
all variants of one real mesh fall on the same side).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import manifold3d as m3
import numpy as np
import trimesh
from scipy.interpolate import PchipInterpolator
from tqdm import tqdm

from mar3d.geometry import MESH_EXTENSIONS, load_mesh

M = m3.Manifold
SEG = 24  # circle segments: smooth at the 64³–128³ grids we decode to, and a few k faces per shape

# Real meshes stored Z-up (shared/data/SOURCES.md: the YCB scans); all others are Y-up.
Z_UP_PREFIXES = ("ycb_",)


# ---------------------------------------------------------------------------------------------
# Primitives (all return manifold3d.Manifold, in Y-up coordinates)


def block(lo, hi) -> M:
    """Axis-aligned box between corners `lo` and `hi`."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return M.cube(tuple(hi - lo)).translate(tuple(lo))


def frustum(p, q, r0, r1=None, seg=SEG) -> M:
    """Cylinder (or cone frustum) from point p (radius r0) to point q (radius r1)."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    length = float(np.linalg.norm(q - p))
    w = (q - p) / length
    a = np.array([1.0, 0.0, 0.0]) if abs(w[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(a, w)
    u /= np.linalg.norm(u)
    frame = np.column_stack([u, np.cross(w, u), w, p])  # right-handed: local z -> w
    return M.cylinder(length, r0, r0 if r1 is None else r1, seg).transform(frame)


def cyl(r, y0, y1, x=0.0, z=0.0, r_top=None, seg=SEG) -> M:
    """Vertical cylinder/frustum at (x, z) from height y0 to y1."""
    return frustum((x, y0, z), (x, y1, z), r, r_top, seg)


def ball(r, c, seg=SEG) -> M:
    return M.sphere(r, seg).translate(tuple(map(float, c)))


def ellipsoid(radii, c, seg=SEG) -> M:
    return M.sphere(1.0, seg).scale(tuple(map(float, radii))).translate(tuple(map(float, c)))


def capsule(p, q, r0, r1=None, seg=SEG) -> M:
    """Rounded limb: convex hull of a sphere at p (radius r0) and one at q (radius r1)."""
    return M.batch_hull([ball(r0, p, seg), ball(r0 if r1 is None else r1, q, seg)])


def hull(points) -> M:
    return M.hull_points(np.asarray(points, dtype=np.float64))


def revolve_z(profile, seg=SEG * 2) -> M:
    """Solid of revolution about +Z of a (radius, z) profile that starts and ends on the axis."""
    pts = np.asarray(profile, dtype=np.float64)
    area = np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1])
    if area < 0:  # CrossSection fills counter-clockwise contours only
        pts = pts[::-1]
    return m3.CrossSection([pts]).revolve(seg)  # spins about the 2D y axis, which becomes 3D +Z


def revolve(profile, seg=SEG * 2) -> M:
    """Solid of revolution about +Y of a (radius, y) profile that starts and ends on the axis."""
    return revolve_z(profile, seg).rotate((-90.0, 0.0, 0.0))  # +Z -> +Y


def torus(R, r, seg=SEG) -> M:
    """Ring of major radius R and tube radius r in the XY plane (axis +Z), centred at 0."""
    return m3.CrossSection.circle(r, seg).translate((R, 0.0)).revolve(seg * 2)


GRID = 2.0**-16  # snapping grid (15 µm at metre scale)


def snap(solid: M) -> M:
    """Round vertices to GRID. Parts meant to be flush (a shelf on its sides, stacked tiers) then
    meet exactly instead of 1 ulp apart, which leaves slivers that a float32 file cannot hold.
    Measured: without snapping 6 of 3,000 shapes failed finish()'s checks, with it none."""
    return solid.warp_batch(lambda v: np.round(v / GRID) * GRID)


def union(parts) -> M:
    return M.batch_boolean([snap(p) for p in parts], m3.OpType.Add)


def cut(solid: M, tool: M) -> M:
    """solid minus tool, both snapped (see snap)."""
    return snap(solid) - snap(tool)


def _survives_loading(mesh: trimesh.Trimesh) -> bool:
    """Still closed after a float32 file and `geometry.load_mesh`'s clean-up (merge, drop slivers)?"""
    m = trimesh.Trimesh(mesh.vertices.astype(np.float32).astype(np.float64), mesh.faces, process=False)
    m.merge_vertices()
    m.update_faces(m.nondegenerate_faces())
    return m.is_watertight


def finish(solid: M) -> trimesh.Trimesh:
    """One body, standing on y = 0, centred in x and z, as a checked watertight trimesh."""
    if solid.status() != m3.Error.NoError or solid.is_empty():
        raise ValueError(f"invalid solid ({solid.status()})")
    bodies = len(solid.decompose())
    if bodies != 1:
        raise ValueError(f"shape falls apart into {bodies} bodies")
    x0, y0, z0, x1, y1, z1 = solid.bounding_box()
    solid = solid.translate((-(x0 + x1) / 2, -y0, -(z0 + z1) / 2)).as_original()
    size = max(x1 - x0, y1 - y0, z1 - z0)
    # Booleans of flush parts leave zero-area slivers (collinear T-junctions) that load_mesh drops,
    # opening the mesh. as_original() lets simplify() merge coplanar faces across parts, which
    # removes them; simplify() itself rarely (~0.2 %) leaves a new one, so other tolerances follow.
    for tol in (1e-6, 1e-7, 1e-5, 1e-4):
        out = solid.simplify(tol * size).to_mesh64()
        mesh = trimesh.Trimesh(np.asarray(out.vert_properties)[:, :3], np.asarray(out.tri_verts), process=False)
        if not (mesh.is_watertight and mesh.volume > 0 and np.isfinite(mesh.vertices).all()):
            raise ValueError("result is not a closed outward-facing mesh")
        if _survives_loading(mesh):
            return mesh
    raise ValueError("mesh has slivers that open it once saved and reloaded")


# ---------------------------------------------------------------------------------------------
# Families: each draws its own proportions and part choices from `rng`.


def chair(rng) -> M:
    """Seat, legs (square/round/office pedestal), back at -Z (panel/slats/rails), optional arms."""
    u = rng.uniform
    w, d = u(0.40, 0.60), u(0.40, 0.55)
    hs, ts = u(0.40, 0.52), u(0.04, 0.08)  # seat top height, seat thickness
    hb, tb = u(0.30, 0.55), u(0.035, 0.07)  # back height above the seat, back thickness
    parts = [block((-w / 2, hs - ts, -d / 2), (w / 2, hs, d / 2))]

    legs = rng.choice(["square", "round", "pedestal"], p=[0.45, 0.35, 0.2])
    if legs == "pedestal":  # office chair: column + star base on ball casters
        parts.append(cyl(u(0.025, 0.04), 0.05, hs - ts + 0.01))
        n, reach, phase = int(rng.integers(4, 6)), u(0.25, 0.33), u(0, 2 * np.pi)
        for k in range(n):
            a = phase + 2 * np.pi * k / n
            end = (reach * np.cos(a), 0.05, reach * np.sin(a))
            parts += [capsule((0, 0.07, 0), end, 0.025), ball(0.03, (end[0], 0.03, end[2]))]
    else:
        s, inset = u(0.035, 0.055), u(0.0, 0.04)
        spots = [(sx * (w / 2 - inset - s / 2), sz * (d / 2 - inset - s / 2)) for sx in (-1, 1) for sz in (-1, 1)]
        for x, z in spots:
            parts.append(block((x - s / 2, 0, z - s / 2), (x + s / 2, hs - ts + 0.01, z + s / 2))
                         if legs == "square" else cyl(s / 2, 0, hs - ts + 0.01, x, z))
        if rng.random() < 0.35:  # side stretchers between front and back legs
            y = u(0.1, 0.2)
            for sx in (-1, 1):
                x = spots[0 if sx < 0 else 2][0]
                parts.append(frustum((x, y, spots[0][1]), (x, y, spots[1][1]), max(0.4 * s, 0.016)))

    # Back, built with its bottom edge on the origin, then tilted backwards and placed at -Z.
    style = rng.choice(["panel", "slats", "rails"])
    top = hb + ts
    if style == "panel":
        back = [block((-w / 2, 0, -tb / 2), (w / 2, top, tb / 2))]
    else:
        post = u(0.035, 0.05)
        rail = u(0.05, 0.1)
        back = [block((sx * w / 2 - (sx > 0) * post, 0, -tb / 2), (sx * w / 2 + (sx < 0) * post, top, tb / 2))
                for sx in (-1, 1)]
        back.append(block((-w / 2, top - rail, -tb / 2), (w / 2, top, tb / 2)))
        inner = w - 2 * post
        if style == "slats":  # vertical slats with gaps of at least 2.5 cm
            sw = u(0.03, 0.06)
            n = int(rng.integers(1, 5))
            while n > 1 and (inner - n * sw) / (n + 1) < 0.025:
                n -= 1
            for k in range(n):
                x = -inner / 2 + (k + 1) * (inner - n * sw) / (n + 1) + k * sw
                back.append(block((x, 0, -tb / 3), (x + sw, top - rail + 0.005, tb / 3)))
        else:  # horizontal rails
            n = int(rng.integers(1, 4))
            for k in range(n):
                y = ts + (k + 1) * (hb - rail) / (n + 1)
                back.append(block((-w / 2, y - rail / 3, -tb / 3), (w / 2, y + rail / 3, tb / 3)))
    tilt = u(0.0, 12.0)
    parts.append(union(back).rotate((-tilt, 0.0, 0.0)).translate((0.0, hs - ts, -d / 2 + tb / 2)))

    if rng.random() < 0.35:  # armrests on front posts
        aw, at, ha = u(0.04, 0.07), u(0.03, 0.05), u(0.18, 0.26)
        for sx in (-1, 1):
            x0, x1 = sorted((sx * w / 2, sx * (w / 2 - aw)))
            parts.append(block((x0, hs + ha - at, -d / 2 + 0.01), (x1, hs + ha, d / 2 - 0.02)))
            parts.append(block((x0, hs - 0.01, d / 2 - 0.02 - aw), (x1, hs + ha - at + 0.01, d / 2 - 0.02)))
    return union(parts)


def table(rng) -> M:
    """Rectangular/round/oval top on 4 legs, a pedestal or two slab ends; optional apron and shelf."""
    u = rng.uniform
    h = u(0.42, 1.05)  # coffee table … bar table
    shape = rng.choice(["rect", "round", "oval"])
    if shape == "rect":
        w = u(0.6, 1.8)
        d = u(0.5, min(w, 1.0))
    else:
        w = u(0.6, 1.3)
        d = w if shape == "round" else w * u(0.55, 0.85)
    size = max(w, h)
    t = max(u(0.03, 0.06), 0.025 * size)
    if shape == "rect":
        top = block((-w / 2, h - t, -d / 2), (w / 2, h, d / 2))
    else:
        top = cyl(1.0, h - t, h, seg=SEG * 2).scale((w / 2, 1.0, d / 2))
    parts = [top]
    support = rng.choice(["legs", "pedestal", "panels"], p=[0.55, 0.25, 0.2])
    if support == "pedestal" and w > 1.2:
        support = "panels"
    if support == "panels" and shape != "rect":
        support = "legs"
    s = max(u(0.04, 0.07), 0.03 * size)  # leg thickness
    if support == "legs":
        ax, az = (w / 2 - s / 2 - u(0.0, 0.06), d / 2 - s / 2 - u(0.0, 0.06))
        if shape != "rect":  # legs inside the ellipse, at ±45°
            ax, az = w / 2 * 0.65, d / 2 * 0.65
        square = rng.random() < 0.5
        for sx in (-1, 1):
            for sz in (-1, 1):
                x, z = sx * ax, sz * az
                parts.append(block((x - s / 2, 0, z - s / 2), (x + s / 2, h - t + 0.01, z + s / 2))
                             if square else cyl(s / 2, 0, h - t + 0.01, x, z))
        if shape == "rect" and rng.random() < 0.5:  # apron under the top, flush with the legs
            a = u(0.06, 0.12)
            outer = block((-ax - s / 2, h - t - a, -az - s / 2), (ax + s / 2, h - t + 0.01, az + s / 2))
            parts.append(cut(outer, block((-ax + s / 2, h - t - a - 0.1, -az + s / 2), (ax - s / 2, h, az - s / 2))))
        if shape == "rect" and rng.random() < 0.3:  # lower shelf between the legs
            y = u(0.12, 0.25) * h
            parts.append(block((-ax, y, -az), (ax, y + t, az)))
    elif support == "pedestal":
        r = max(u(0.04, 0.08), 0.02 * size)
        parts.append(cyl(r, 0, h - t + 0.01))
        if rng.random() < 0.5:
            parts.append(cyl(u(0.25, 0.4) * w, 0, max(t, 0.03), r_top=r * 1.5))
        else:  # cross feet
            f = u(0.3, 0.42) * w
            parts += [block((-f, 0, -s / 2), (f, s, s / 2)), block((-s / 2, 0, -f), (s / 2, s, f))]
    else:  # two slab ends joined by a stretcher
        x = w / 2 - u(0.05, 0.15)
        depth = d * u(0.6, 0.9)
        for sx in (-1, 1):
            parts.append(block((sx * x - s / 2, 0, -depth / 2), (sx * x + s / 2, h - t + 0.01, depth / 2)))
        y = u(0.1, 0.5) * h
        parts.append(block((-x, y, -s / 2), (x, y + s, s / 2)))
    return union(parts)


def stool(rng) -> M:
    """Round/square seat on 3 or 4 splayed legs (optional footrest ring or rungs) or a pedestal."""
    u = rng.uniform
    h = u(0.42, 0.8)
    r = u(0.14, 0.22)
    t = max(u(0.03, 0.06), 0.025 * h)
    square = rng.random() < 0.35
    seat = block((-r, h - t, -r), (r, h, r)) if square else cyl(r, h - t, h, seg=SEG * 2)
    parts = [seat]
    if rng.random() < 0.2:  # bar stool on a column and a disc base
        rc = max(u(0.025, 0.045), 0.02 * h)
        parts += [cyl(rc, 0, h - t + 0.01), cyl(u(0.8, 1.1) * r, 0, 0.03, r_top=u(0.6, 0.9) * r)]
        if rng.random() < 0.5:  # footrest ring on 3 spokes
            y, ring = u(0.3, 0.45) * h, u(0.5, 0.8) * r
            parts.append(torus(ring, rc * 0.7).rotate((90.0, 0.0, 0.0)).translate((0, y, 0)))
            for k in range(3):
                a = 2 * np.pi * k / 3
                parts.append(frustum((0, y, 0), (ring * np.cos(a), y, ring * np.sin(a)), rc * 0.6))
        return union(parts)
    n = int(rng.choice([3, 4]))
    rl = max(u(0.016, 0.026), 0.012 * h)
    a0 = np.pi / 4 if (square and n == 4) else u(0, 2 * np.pi)
    top_r, foot_r = 0.7 * r, 0.7 * r + u(0.0, 0.12) * h  # splay
    tops, feet = [], []
    for k in range(n):
        a = a0 + 2 * np.pi * k / n
        c, s = np.cos(a), np.sin(a)
        tops.append(np.array([top_r * c, h - t + 0.01, top_r * s]))
        feet.append(np.array([foot_r * c, 0.0, foot_r * s]))
        parts.append(frustum(feet[-1], tops[-1], rl))
    rest = rng.choice(["none", "ring", "rungs"])
    f = u(0.25, 0.4)  # footrest height as a fraction of the leg
    if rest == "ring":
        y = f * (h - t)
        rad = foot_r + (top_r - foot_r) * f
        parts.append(torus(rad, rl * 0.8).rotate((90.0, 0.0, 0.0)).translate((0, y, 0)))
    elif rest == "rungs":
        pts = [feet[k] + f * (tops[k] - feet[k]) for k in range(n)]
        parts += [frustum(pts[k], pts[(k + 1) % n], rl * 0.8) for k in range(n)]
    return union(parts)


def sofa(rng) -> M:
    """Base, back at -Z, 0/2 arms, 1–3 seat cushions, feet or plinth, optional chaise on one side."""
    u = rng.uniform
    w, d = u(1.3, 2.4), u(0.75, 1.0)
    gap = 0.025 * w
    foot = u(0.05, 0.14) if rng.random() < 0.6 else 0.0
    seat = u(0.40, 0.50)
    cush = u(0.10, 0.18)
    tb, hb = u(0.15, 0.25), u(0.75, 0.95)
    arms = rng.random() < 0.75
    aw, ah = (u(0.1, 0.25), seat + u(0.1, 0.25)) if arms else (0.0, 0.0)
    chaise = u(0.5, 0.8) if rng.random() < 0.25 else 0.0  # extra depth in +Z on the right end
    base_top = seat - cush
    parts = [block((-w / 2, foot, -d / 2), (w / 2, base_top, d / 2)),
             block((-w / 2, foot, -d / 2), (w / 2, hb, -d / 2 + tb))]
    inner = w - 2 * aw
    cw = inner / 2.2 if chaise else inner
    if chaise:
        parts.append(block((w / 2 - aw - cw, foot, d / 2 - 0.05), (w / 2 - aw, base_top, d / 2 + chaise)))
        parts.append(block((w / 2 - aw - cw + gap, base_top - 0.01, d / 2), (w / 2 - aw - gap / 2, seat, d / 2 + chaise)))
    for sx in (-1, 1) if arms else ():
        z1 = d / 2 + (chaise if sx > 0 else 0.0)
        parts.append(block((sx * w / 2 - (sx > 0) * aw, foot, -d / 2), (sx * w / 2 + (sx < 0) * aw, ah, z1)))
    n = int(rng.integers(1, 4))
    cw = (inner - (n + 1) * gap) / n
    for k in range(n):
        x = -inner / 2 + gap + k * (cw + gap)
        parts.append(block((x, base_top - 0.01, -d / 2 + tb), (x + cw, seat, d / 2 - gap)))
    if foot:
        fs = max(u(0.04, 0.07), 0.025 * w)
        for sx in (-1, 1):
            for sz in (-1, 1):
                x, z = sx * (w / 2 - fs), sz * (d / 2 - fs)
                parts.append(cyl(fs / 2 * 1.2, 0, foot + 0.01, x, z, r_top=fs / 2 * 0.8))
        if chaise:
            parts.append(cyl(fs / 2 * 1.2, 0, foot + 0.01, w / 2 - fs, d / 2 + chaise - fs, r_top=fs / 2 * 0.8))
    return union(parts)


def shelf(rng) -> M:
    """Bookcase: sides, top, bottom, 1–6 shelves; optional back, plinth, divider, top overhang."""
    u = rng.uniform
    w = u(0.5, 1.2)
    h = min(w * u(1.2, 2.5), 2.2)
    h = max(h, 1.2 * w)
    d = u(0.25, 0.45)
    t = max(u(0.02, 0.04), 0.025 * h)
    plinth = u(0.05, 0.12) if rng.random() < 0.5 else 0.0
    over = u(0.0, 0.03) if rng.random() < 0.4 else 0.0
    parts = [block((-w / 2, 0, -d / 2), (-w / 2 + t, h, d / 2)), block((w / 2 - t, 0, -d / 2), (w / 2, h, d / 2)),
             block((-w / 2 - over, h - t, -d / 2), (w / 2 + over, h, d / 2 + over)),
             block((-w / 2, plinth, -d / 2), (w / 2, plinth + t, d / 2))]
    if plinth:
        parts.append(block((-w / 2, 0, d / 2 - t - 0.02), (w / 2, plinth + 0.01, d / 2 - 0.02)))
    if rng.random() < 0.6:  # back panel
        parts.append(block((-w / 2, plinth, -d / 2), (w / 2, h, -d / 2 + t)))
    n = int(rng.integers(1, max(2, int((h - plinth) / 0.3)) + 1))
    n = min(n, 6)
    pitch = (h - plinth - t) / (n + 1)
    for k in range(1, n + 1):
        y = plinth + k * pitch
        parts.append(block((-w / 2, y, -d / 2), (w / 2, y + t, d / 2 - u(0.0, 0.03))))
    if w > 0.8 and rng.random() < 0.35:  # vertical divider
        parts.append(block((-t / 2, plinth, -d / 2), (t / 2, h, d / 2 - 0.01)))
    return union(parts)


def mug(rng) -> M:
    """Hollow revolved cup (straight, tapered or barrel) with a round (torus) or squared handle on +X; optional foot."""
    u = rng.uniform
    h = u(0.08, 0.13)
    r = u(0.035, 0.06)
    r_top = r * u(0.85, 1.2)
    bulge = r * u(0.05, 0.15) if rng.random() < 0.35 else 0.0
    wall = max(u(0.08, 0.14) * r, 0.025 * h)
    floor = max(u(0.08, 0.15) * h, 0.025 * h)

    def radius(y):  # outer profile
        return r + (r_top - r) * y / h + bulge * np.sin(np.pi * np.clip(y, 0, h) / h)

    y = np.linspace(0, h, 12)
    parts = [revolve([(0.0, 0.0)] + list(zip(radius(y), y)) + [(0.0, h)])]
    if rng.random() < 0.3:  # foot ring
        parts.append(cyl(r * u(0.95, 1.05), 0, floor * 0.6, seg=SEG * 2))
    ym = h * u(0.45, 0.55)
    tube = u(0.06, 0.09) * h
    span = h * u(0.28, 0.4)  # half height of the handle
    reach = u(0.5, 0.8) * span  # how far it sticks out; the squashed tube stays >= 3 % of h across
    x0 = float(radius(ym)) - wall / 2  # the handle's ends sit in the wall
    if rng.random() < 0.6:  # ring squashed in x; its inner half disappears into the wall and cavity
        parts.append(torus(span, tube).scale((reach / span, 1.0, 1.0)).translate((x0, ym, 0.0)))
    else:
        x1, y0, y1 = x0 + reach, ym - span, ym + span
        parts += [capsule((x0, y1, 0), (x1, y1, 0), tube), capsule((x1, y1, 0), (x1, y0, 0), tube),
                  capsule((x1, y0, 0), (x0, y0, 0), tube)]
    yc = np.linspace(floor, h + 0.01, 12)
    cavity = revolve([(0.0, floor)] + list(zip(radius(yc) - wall, yc)) + [(0.0, h + 0.01)])
    return cut(union(parts), cavity)


def vase_bottle(rng) -> M:
    """Solid of revolution of a random smooth profile: vase, bottle (shoulder + neck) or jar; optional open mouth."""
    u = rng.uniform
    h = u(0.2, 0.5)
    kind = rng.choice(["vase", "bottle", "jar"])
    r_max = h * u(0.15, 0.4)
    if kind == "bottle":
        body = u(0.45, 0.7)
        neck = u(0.12, 0.3) * r_max
        ys = [0, 0.02, body - 0.1, body, body + u(0.08, 0.15), 0.96, 1.0]
        rs = [r_max * u(0.85, 1.0), r_max, r_max, r_max * u(0.8, 1.0), neck, neck, neck * u(1.0, 1.3)]
    elif kind == "jar":
        ys = [0, 0.1, 0.5, 0.85, 0.9, 1.0]
        rs = [r_max * u(0.6, 0.9), r_max * u(0.9, 1.0), r_max, r_max * u(0.8, 1.0), r_max * u(0.7, 0.8), r_max * u(0.7, 0.8)]
    else:
        n = int(rng.integers(4, 7))
        ys = np.linspace(0, 1, n)
        rs = r_max * u(0.25, 1.0, n)
        rs[0] = max(rs[0], 0.5 * r_max)  # stable foot
    ys = np.asarray(ys) * h
    rs = np.maximum(np.asarray(rs), 0.03 * h)
    y = np.linspace(0, h, 40)
    r = PchipInterpolator(ys, rs)(y)  # monotone cubic: no overshoot, so the radius stays positive
    solid = revolve([(0.0, 0.0)] + list(zip(r, y)) + [(0.0, h)])
    if rng.random() < 0.5:  # open mouth: a cylindrical well that leaves walls >= 2.5 % of the height
        depth = u(0.1, 0.6) * h
        r_in = r[y >= h - depth].min() - 0.025 * h
        if r_in > 0.02 * h:
            solid = cut(solid, cyl(r_in, h - depth, h + 0.01, seg=SEG * 2))
    return solid


def lamp(rng) -> M:
    """Base (disc/box/dome), straight or bent stem, shade (cone/drum/globe), optional finial."""
    u = rng.uniform
    h = u(0.35, 1.6)  # table lamp … floor lamp
    rs = max(u(0.008, 0.02), 0.012 * h)  # stem radius
    rb = u(0.12, 0.25) * h if h < 0.8 else u(0.12, 0.2)
    tb = max(u(0.02, 0.05), 0.025 * h)
    base = rng.choice(["disc", "box", "dome"])
    if base == "disc":
        parts = [cyl(rb, 0, tb, r_top=rb * u(0.8, 1.0), seg=SEG * 2)]
    elif base == "box":
        parts = [block((-rb, 0, -rb), (rb, tb, rb))]
    else:
        tb = tb * 2
        parts = [ellipsoid((rb, tb, rb), (0, 0, 0)).trim_by_plane((0.0, 1.0, 0.0), 0.0)]
    shade_r = u(0.12, 0.25) * h if h < 0.8 else u(0.15, 0.3)
    shade_h = shade_r * u(0.8, 1.5)
    if rng.random() < 0.3:  # desk lamp: two arms with a ball joint, shade hanging forward (+Z)
        elbow = np.array([0.0, h * u(0.45, 0.6), -u(0.1, 0.25) * h])
        head = np.array([0.0, h * u(0.8, 0.95), u(0.15, 0.35) * h])
        parts += [frustum((0, tb * 0.5, 0), elbow, rs), ball(rs * 1.6, elbow), frustum(elbow, head, rs)]
        direction = np.array([0.0, -1.0, u(0.2, 1.0)])
        direction /= np.linalg.norm(direction)
        sr = shade_r * 0.6
        parts += [ball(rs * 1.6, head),
                  frustum(head - direction * rs, head + direction * sr * 1.4, sr * 0.35, sr)]
        return union(parts)
    top = h - shade_h
    parts.append(cyl(rs, tb * 0.5, top + shade_h * 0.5))
    shade = rng.choice(["cone", "drum", "globe"])
    if shade == "cone":
        parts.append(cyl(shade_r, top, h, r_top=shade_r * u(0.45, 0.8), seg=SEG * 2))
    elif shade == "drum":
        parts.append(cyl(shade_r * 0.9, top, h, seg=SEG * 2))
    else:
        parts.append(ball(shade_h / 2, (0, top + shade_h / 2, 0), seg=SEG * 2))
    if rng.random() < 0.4:  # finial
        parts.append(ball(max(rs * 1.5, 0.015 * h), (0, h + rs, 0)))
    return union(parts)


def car(rng) -> M:
    """Lower body + cabin (sedan/hatch/SUV/pickup with open bed) + 4 wheels, nose at +Z; optional spoiler."""
    u = rng.uniform
    kind = rng.choice(["sedan", "hatch", "suv", "pickup"])
    length = u(3.6, 5.2)
    w = length * u(0.36, 0.44)
    rw = u(0.30, 0.40) * (1.15 if kind in ("suv", "pickup") else 1.0)
    ww = u(0.2, 0.3)
    clear = rw * u(0.45, 0.7)
    belt = clear + u(0.45, 0.65) * (1.15 if kind in ("suv", "pickup") else 1.0)
    nose = u(0.2, 0.5)  # chamfer of the lower body's front edge
    z0, z1 = -length / 2, length / 2
    low_front = clear + (belt - clear) * u(0.4, 0.7)
    body = [(x, y, z) for x in (-w / 2, w / 2) for y, z in
            [(clear, z0 + 0.05), (clear, z1 - 0.1), (low_front, z1), (belt, z1 - nose), (belt, z0), (clear + 0.1, z0)]]
    parts = [hull(body)]
    ch = u(0.38, 0.55) * (1.25 if kind == "suv" else 1.0)
    hood = u(0.22, 0.32) * length
    zb1 = z1 - hood
    if kind == "sedan":
        zb0 = z0 + u(0.18, 0.26) * length
    elif kind == "pickup":
        zb0 = zb1 - u(1.2, 1.6)
    else:
        zb0 = z0 + 0.08
    screen = u(0.5, 0.9) * ch  # windshield run along z
    rear = {"sedan": u(0.4, 0.8), "hatch": u(0.2, 0.5), "suv": u(0.05, 0.2), "pickup": u(0.05, 0.15)}[kind] * ch
    xt = w / 2 * u(0.75, 0.9)
    cabin = [(sx * w / 2 * 0.97, belt - 0.02, zb0) for sx in (-1, 1)] + [(sx * w / 2 * 0.97, belt - 0.02, zb1) for sx in (-1, 1)]
    cabin += [(sx * xt, belt + ch, zb0 + rear) for sx in (-1, 1)] + [(sx * xt, belt + ch, zb1 - screen) for sx in (-1, 1)]
    parts.append(hull(cabin))
    solid = union(parts)
    if kind == "pickup":  # open bed behind the cabin
        wall = max(0.1, 0.025 * length)
        solid = cut(solid, block((-w / 2 + wall, belt - u(0.25, 0.4), z0 + wall), (w / 2 - wall, belt + 0.5, zb0 - 0.05)))
    base = length * u(0.55, 0.65) / 2  # half the wheelbase
    arches, wheels = [], []
    for sx in (-1, 1):
        x = sx * (w / 2 - ww / 2 + u(0.0, 0.03))
        for zc in (-base, base):
            # The arch leaves the inner third of the wheel inside the body, which holds it on.
            arches.append(frustum((sx * (w / 2 - ww * 0.7), rw, zc), (sx * (w / 2 + 0.1), rw, zc), rw * 1.12))
            wheels.append(frustum((x - ww / 2, rw, zc), (x + ww / 2, rw, zc), rw))
    solid = union([cut(solid, union(arches))] + wheels)
    if kind in ("sedan", "hatch") and rng.random() < 0.25:  # rear spoiler on two posts
        top_y = belt + (0.12 if kind == "sedan" else ch * 0.95)
        zs = z0 + 0.15 if kind == "sedan" else zb0 + rear * 0.5
        pt = 0.025 * length  # bar and post thickness
        bars = [block((-w / 2 * 0.8, top_y, zs - 0.15), (w / 2 * 0.8, top_y + pt, zs + 0.1))]
        bars += [block((sx * w / 4 - pt / 2, belt - 0.05, zs - pt / 2), (sx * w / 4 + pt / 2, top_y + 0.01, zs + pt / 2))
                 for sx in (-1, 1)]
        solid = union([solid] + bars)
    return solid


def _wing(root_z, chord, span, sweep, taper, dihedral, y, t_root, t_tip, side):
    """Half wing: hull of root and tip airfoil boxes; root on x = 0, tip at x = side * span."""
    tip_y = y + span * np.tan(np.radians(dihedral))
    pts = []
    for x, yc, z_le, c, t in [(0.0, y, root_z, chord, t_root), (side * span, tip_y, root_z - sweep, chord * taper, t_tip)]:
        pts += [(x, yc + s * t / 2, z) for s in (-1, 1) for z in (z_le, z_le - c)]
    return hull(pts)


def aircraft(rng) -> M:
    """Fuselage (nose +Z), swept wings (low/mid/high, dihedral), tailplane (or T-tail), fin, 0/2/4 engines."""
    u = rng.uniform
    length = u(0.8, 1.2)
    r = length * u(0.045, 0.08)
    span = length * u(0.35, 0.7)  # half span
    size = max(length, 2 * span)
    nose = r * u(1.5, 4.0)
    z_full = length * u(0.2, 0.35)
    tail_r = r * u(0.15, 0.35)
    prof = [(0.0, 0.0), (tail_r, 0.0), (r, z_full), (r, length - nose)]
    prof += [(r * np.sqrt(1 - a * a), length - nose + a * nose) for a in np.linspace(0.1, 0.95, 8)] + [(0.0, length)]
    parts = [revolve_z(prof).translate((0.0, 0.0, -length / 2))]  # tail at -Z, nose at +Z

    chord = length * u(0.15, 0.3)
    taper, sweep, dihedral = u(0.25, 0.8), span * u(0.0, 0.6), u(-2.0, 7.0)
    wing_y = r * rng.choice([-0.55, 0.0, 0.6])
    root_z = length * u(0.05, 0.2) + chord / 2
    t_root = size * u(0.03, 0.045)
    t_tip = max(t_root * 0.6, 0.022 * size)
    parts += [_wing(root_z, chord, span, sweep, taper, dihedral, wing_y, t_root, t_tip, s) for s in (-1, 1)]

    fin_h, fin_c = length * u(0.12, 0.22), length * u(0.12, 0.2)
    fin_t = max(0.025 * size, r * 0.25)
    z_tail = -length / 2 + 0.02
    fin_sweep = fin_c * u(0.2, 0.7)
    fin_top = r + fin_h
    top_le = z_tail + fin_c - fin_sweep  # swept back: the fin's tip sits further aft than its root
    parts.append(hull([(s * fin_t / 2, y, z) for s in (-1, 1) for y, z in
                       [(0.0, z_tail + fin_c), (0.0, z_tail), (fin_top, top_le - fin_c * 0.5), (fin_top, top_le)]]))
    t_tail = rng.random() < 0.25
    stab_y = fin_top - t_tip / 2 if t_tail else 0.0
    stab_z = top_le if t_tail else z_tail + fin_c * 0.8
    stab_span = span * u(0.25, 0.4)
    parts += [_wing(stab_z, fin_c * 0.8, stab_span, stab_span * u(0.1, 0.5), u(0.5, 0.8), 0.0, stab_y, t_tip, t_tip, s)
              for s in (-1, 1)]

    engines = int(rng.choice([0, 2, 4], p=[0.3, 0.5, 0.2]))
    stations = [0.35] if engines == 2 else [0.3, 0.6] if engines == 4 else []
    rn = max(r * u(0.35, 0.5), 0.015 * size)
    ln = length * u(0.12, 0.2)
    for f in stations:
        for s in (-1, 1):
            x = s * f * span
            wy = wing_y + f * span * np.tan(np.radians(dihedral))
            z_le = root_z - f * sweep
            ny = wy - t_tip / 2 - rn * 1.3
            z_front = z_le + ln * 0.4
            parts.append(frustum((x, ny, z_front - ln), (x, ny, z_front), rn * 0.8, rn))
            pw = max(0.02 * size, rn * 0.4)
            parts.append(block((x - pw / 2, ny, z_le - ln * 0.5), (x + pw / 2, wy, z_le - 0.01)))
    return union(parts)


def animal(rng) -> M:
    """Blob animal: ellipsoid body, 4 tapered legs, neck + head at +Z, optional snout, ears and tail."""
    u = rng.uniform
    rz = u(0.25, 0.5)
    rx, ry = rz * u(0.4, 0.7), rz * u(0.4, 0.75)
    leg = u(0.12, 0.7)
    neck_h = u(0.05, 0.9) * rz * 2
    rh = ry * u(0.45, 0.8)
    size = max(2.6 * rz, leg + 2 * ry + neck_h + rh)
    rmin = 0.015 * size  # thinnest radius: 3 % of the size across
    cy = leg + ry * 0.8
    parts = [ellipsoid((rx, ry, rz), (0, cy, 0))]
    rl = max(u(0.2, 0.4) * rx, rmin)
    rf = max(rl * u(0.6, 1.0), rmin)
    splay, stance = u(0.0, 0.1) * rx, u(-0.1, 0.15) * rz
    for sx in (-1, 1):
        for sz in (-1, 1):
            hip = (sx * 0.5 * rx, cy - 0.45 * ry, sz * 0.6 * rz)
            parts.append(capsule(hip, (sx * (0.5 * rx + splay), rf, sz * (0.6 * rz + stance)), rl, rf))
    head = np.array([0.0, cy + ry * 0.4 + neck_h, rz + u(0.0, 0.5) * rh])
    parts.append(capsule((0, cy + 0.3 * ry, 0.7 * rz), head, max(rh * u(0.45, 0.7), rmin)))
    parts.append(ellipsoid((rh * u(0.8, 1.0), rh, rh * u(1.0, 1.3)), head))
    if rng.random() < 0.6:  # snout
        parts.append(ellipsoid((rh * 0.55, rh * 0.45, rh * u(0.5, 0.9)), head + (0, -0.2 * rh, 0.8 * rh)))
    if rng.random() < 0.6:  # ears
        ear = u(0.4, 1.0) * rh
        for sx in (-1, 1):
            parts.append(capsule(head + (sx * 0.45 * rh, 0.6 * rh, 0), head + (sx * 0.6 * rh, 0.7 * rh + ear, -0.1 * rh),
                                 max(0.25 * rh, rmin), max(0.12 * rh, rmin)))
    if rng.random() < 0.7:  # tail
        tail = u(0.3, 1.0) * rz
        parts.append(capsule((0, cy + 0.2 * ry, -0.8 * rz), (0, cy + u(-0.6, 0.8) * ry, -rz - tail),
                             max(0.15 * ry, rmin), max(0.07 * ry, rmin)))
    return union(parts)


def plush(rng) -> M:
    """Stocky organic quadruped (cow, pig, bear, dog, cat; toys and figurines): a body of chest,
    belly and hips ellipsoids, thick short legs, a large head near the body with an optional muzzle,
    ears, horns and tail. One in three sits: hips on the ground, the body raised towards the head.
    Stop 33: `animal` (long thin legs, small head, one ellipsoid) covered few organic shapes."""
    u = rng.uniform
    L = u(0.35, 0.6)                       # half body length (z)
    W, H = L * u(0.45, 0.8), L * u(0.5, 0.85)  # half width (x), half height (y)
    rh = H * u(0.55, 0.95)                 # head radius
    size = 2.5 * L + 2 * rh
    rmin = 0.015 * size
    rl = max(W * u(0.3, 0.55), rmin)       # leg radius
    parts = []
    sitting = rng.random() < 1 / 3
    if sitting:  # the body pitched up about the hips, hind legs folded under
        pitch = np.radians(u(30, 60))
        axis = np.array([0.0, np.sin(pitch), np.cos(pitch)])
        R = max(W, H) * 0.9  # the seat: a sphere on the floor
        hips = np.array([0.0, R, -0.2 * L])
        chest = hips + axis * L * u(0.8, 1.1)
        parts.append(capsule(hips, chest, R, max(W, H) * u(0.65, 0.85)))
        for sx in (-1, 1):
            parts.append(ellipsoid((0.45 * W, 0.6 * H, 0.7 * L), (sx * 0.75 * W, 0.6 * H, -0.05 * L)))  # haunch
            parts.append(capsule((sx * 0.6 * W, rl, 0.25 * L), (sx * 0.6 * W, rl, 0.65 * L), rl))  # hind paw
            rf = rl * u(0.8, 1.1)
            foot = np.array([sx * 0.5 * W, rf, chest[2] + u(0.0, 0.3) * L])
            parts.append(capsule(chest + (sx * 0.5 * W, -0.3 * H, 0), foot, rl, rf))  # front leg
        top, front = chest + (0, 0.3 * H, 0), chest[2]
        root = hips + (0, -0.2 * H, -0.7 * R)
    else:
        leg = u(0.05, 0.8) * H                 # leg length below the body
        cy = leg + 1.2 * H                     # the chest and hips below reach 1.2 H down
        tilt = u(-0.15, 0.15) * H              # chest higher (or lower) than the hips
        parts.append(ellipsoid((W, H, L), (0, cy, 0)))
        parts.append(ellipsoid((W * u(0.85, 1.05), H * u(0.85, 1.05), 0.6 * L), (0, cy + tilt, 0.45 * L)))  # chest
        parts.append(ellipsoid((W * u(0.85, 1.1), H * u(0.85, 1.05), 0.6 * L), (0, cy - tilt, -0.45 * L)))  # hips
        rf = max(rl * u(0.75, 1.05), rmin)
        splay = u(0.0, 0.15) * W
        for sx in (-1, 1):
            for sz in (-1, 1):
                hip = (sx * 0.55 * W, cy - 0.4 * H, sz * 0.6 * L)
                parts.append(capsule(hip, (sx * (0.55 * W + splay), rf, sz * 0.6 * L * u(0.9, 1.1)), rl, rf))
        top, front = np.array([0.0, cy + tilt + 0.3 * H, 0.7 * L]), 0.7 * L
        root = np.array([0.0, cy + 0.2 * H, -0.9 * L])
    head = np.array([0.0, top[1] + H * u(0.1, 0.8), front + rh * u(0.3, 0.9)])
    parts.append(capsule(top, head, rh * u(0.5, 0.8)))  # neck
    parts.append(ellipsoid((rh * u(0.8, 1.05), rh * u(0.85, 1.05), rh * u(0.9, 1.2)), head))
    if rng.random() < 0.8:  # muzzle
        parts.append(ellipsoid((rh * u(0.5, 0.75), rh * u(0.4, 0.6), rh * u(0.4, 0.7)), head + (0, -0.3 * rh, 0.75 * rh)))
    if rng.random() < 0.8:  # ears: out to the side (cow) or up (cat, bear)
        up = u(0.0, 1.0)
        ear = u(0.3, 0.7) * rh
        for sx in (-1, 1):
            base = head + (sx * 0.6 * rh, 0.55 * rh, -0.1 * rh)
            tip = base + (sx * ear * (1 - up * 0.7), ear * up, -0.1 * rh)
            parts.append(capsule(base, tip, max(0.25 * rh, rmin), max(0.15 * rh, rmin)))
    if rng.random() < 0.35:  # horns
        horn = u(0.3, 0.8) * rh
        for sx in (-1, 1):
            base = head + (sx * 0.35 * rh, 0.8 * rh, -0.1 * rh)
            parts.append(capsule(base, base + (sx * horn * 0.6, horn, -0.2 * horn),
                                 max(0.15 * rh, rmin), max(0.08 * rh, rmin)))
    if rng.random() < 0.7:  # tail
        tail = u(0.3, 1.0) * L
        end = root + (0, u(-0.8, 0.8) * tail, -tail)
        end[1] = max(end[1], rl)  # above the floor
        parts.append(capsule(root, end, max(0.2 * rl, rmin), max(0.1 * rl, rmin)))
    return union(parts)


def bed(rng) -> M:
    """Frame on legs or a plinth, mattress, headboard at -Z (optional posts), optional footboard, pillows."""
    u = rng.uniform
    w, length = u(0.9, 1.9), u(1.9, 2.2)
    legs = u(0.05, 0.15) if rng.random() < 0.6 else 0.0
    frame, mat = u(0.2, 0.4), u(0.15, 0.3)
    tb = u(0.05, 0.1)
    hb = frame + mat + u(0.3, 0.7)
    parts = [block((-w / 2, legs, -length / 2), (w / 2, frame, length / 2)),
             block((-w / 2 + 0.03, frame - 0.02, -length / 2 + tb), (w / 2 - 0.03, frame + mat, length / 2 - 0.03)),
             block((-w / 2, legs if legs else 0, -length / 2), (w / 2, hb, -length / 2 + tb))]
    if legs:
        s = u(0.05, 0.09)
        for sx in (-1, 1):
            for sz in (-1, 1):
                parts.append(block((sx * w / 2 - (sx > 0) * s, 0, sz * length / 2 - (sz > 0) * s),
                                   (sx * w / 2 + (sx < 0) * s, legs + 0.01, sz * length / 2 + (sz < 0) * s)))
    if rng.random() < 0.3:  # posts with ball finials at the head end
        pr = u(0.04, 0.06)
        for sx in (-1, 1):
            x = sx * (w / 2 + pr * 0.3)
            parts += [cyl(pr, 0, hb + 0.1, x, -length / 2 + tb / 2), ball(pr * 1.4, (x, hb + 0.1 + pr, -length / 2 + tb / 2))]
    if rng.random() < 0.5:  # footboard
        fh = frame + mat * u(0.5, 1.0) + u(0.0, 0.3)
        parts.append(block((-w / 2, legs if legs else 0, length / 2 - tb), (w / 2, fh, length / 2)))
    n = 1 if w < 1.2 else int(rng.integers(1, 3))
    pw = (w - 0.1) / n
    for k in range(n):
        x = -w / 2 + 0.05 + (k + 0.5) * pw
        parts.append(ellipsoid((pw * 0.45, u(0.07, 0.1), u(0.15, 0.22)), (x, frame + mat + 0.03, -length / 2 + tb + 0.25)))
    return union(parts)


def bench(rng) -> M:
    """Slab or slatted seat on slab ends / 4 or 6 legs; optional backrest at -Z and arms."""
    u = rng.uniform
    length, d, h = u(0.9, 2.0), u(0.3, 0.5), u(0.4, 0.5)
    t = max(u(0.04, 0.08), 0.025 * length)
    s = max(u(0.04, 0.07), 0.025 * length)  # leg / post thickness
    x_end = length / 2 - u(0.03, 0.15)
    slab_ends = rng.random() < 0.4
    xs = [-x_end, x_end] + ([0.0] if length > 1.4 and not slab_ends else [])
    parts = []
    for x in xs:
        if slab_ends:
            parts.append(block((x - s / 2, 0, -d / 2 * 0.9), (x + s / 2, h - t + 0.01, d / 2 * 0.9)))
        else:
            for sz in (-1, 1):
                z = sz * (d / 2 - s / 2 - 0.02)
                parts.append(block((x - s / 2, 0, z - s / 2), (x + s / 2, h - t + 0.01, z + s / 2)))
    if rng.random() < 0.5:
        parts.append(block((-length / 2, h - t, -d / 2), (length / 2, h, d / 2)))
    else:  # slats along the bench (gaps 2.5 % of its length) on cross bearers above the supports
        gap = 0.025 * length
        n = int(rng.integers(2, 5))
        while n > 2 and (d - (n - 1) * gap) / n < gap * 1.5:
            n -= 1
        sw = (d - (n - 1) * gap) / n
        for k in range(n):
            z = -d / 2 + k * (sw + gap)
            parts.append(block((-length / 2, h - t * 0.6, z), (length / 2, h, z + sw)))
        for x in xs:
            parts.append(block((x - s / 2, h - t - 0.01, -d / 2), (x + s / 2, h - t * 0.6 + 0.01, d / 2)))
    if rng.random() < 0.4:  # backrest: posts and a wide rail
        bh, rail = u(0.3, 0.45), u(0.08, 0.18)
        z = -d / 2
        for x in (-x_end, x_end):
            parts.append(block((x - s / 2, h - t, z - s), (x + s / 2, h + bh, z + 0.01)))
        parts.append(block((-length / 2, h + bh - rail, z - s * 0.9), (length / 2, h + bh, z - s * 0.1)))
        if rng.random() < 0.5:  # arms
            for x in (-x_end, x_end):
                parts.append(block((x - s / 2, h + 0.2, z - s), (x + s / 2, h + 0.2 + s, d / 2)))
                parts.append(block((x - s / 2, h - 0.01, d / 2 - s), (x + s / 2, h + 0.21, d / 2)))
    return union(parts)


def rocket(rng) -> M:
    """Revolved core (1–2 stages, ogive nose), engine bell, 3/4 fins it stands on, optional side boosters."""
    u = rng.uniform
    h = u(1.0, 2.0)
    rb = h * u(0.04, 0.08)
    y0 = h * u(0.04, 0.1)  # body starts above the fin tips
    nose = rb * u(2.0, 4.0)
    prof = [(0.0, y0), (rb, y0)]
    y_top = h - nose
    if rng.random() < 0.4:  # second, narrower stage on an adapter
        r2 = rb * u(0.6, 0.9)
        y1 = y0 + (y_top - y0) * u(0.45, 0.7)
        prof += [(rb, y1), (r2, y1 + rb * 0.8)]
    else:
        r2 = rb
    prof += [(r2, y_top)] + [(r2 * np.sqrt(1 - a * a), y_top + a * nose) for a in np.linspace(0.1, 0.95, 8)] + [(0.0, h)]
    parts = [revolve(prof), cyl(rb * u(0.4, 0.6), y0 * 0.3, y0 + 0.01, r_top=rb * 0.35)]
    n = int(rng.choice([3, 4]))
    fin_span, chord = rb * u(1.0, 2.5), h * u(0.1, 0.2)
    tf = max(0.025 * h, rb * 0.2)
    for k in range(n):
        pts = [(x, y, s * tf / 2) for s in (-1, 1) for x, y in
               [(rb * 0.5, y0), (rb * 0.5, y0 + chord), (rb + fin_span, 0.0), (rb + fin_span, chord * u(0.2, 0.5))]]
        parts.append(hull(pts).rotate((0.0, 360.0 * k / n + 45.0, 0.0)))
    if rng.random() < 0.3:  # side boosters
        rs = max(rb * u(0.35, 0.55), 0.02 * h)
        hb = (h - nose) * u(0.35, 0.6)
        for k in range(int(rng.choice([2, 4]))):
            a = np.radians(360.0 * k / (2 if n == 4 else 4) + (0 if n == 4 else 45))
            x, z = (rb + rs * 0.7) * np.cos(a), (rb + rs * 0.7) * np.sin(a)
            parts += [cyl(rs, y0, y0 + hb, x, z), cyl(rs, y0 + hb, y0 + hb + rs * 2.5, x, z, r_top=rs * 0.15)]
    return union(parts)


def tower(rng) -> M:
    """2–5 stacked tapering tiers (square/round/octagonal), optional ledges; roof: cone/pyramid, dome (+ spire) or battlements."""
    u = rng.uniform
    seg = {"square": 4, "round": SEG * 2, "octagon": 8}[rng.choice(["square", "round", "octagon"])]
    n = int(rng.integers(2, 6))
    height = u(1.0, 3.0)  # of the tiers, without the roof
    tiers = height * rng.dirichlet(np.full(n, 3.0))
    r, y, parts = height * u(0.1, 0.3), 0.0, []
    for th in tiers:
        r_top = r * u(0.85, 1.0)
        parts.append(cyl(r, y, y + th, r_top=r_top, seg=seg))
        y += th
        if rng.random() < 0.4:  # ledge
            lt = u(0.025, 0.04) * height
            parts.append(cyl(r_top * 1.15, y - 0.005, y + lt, seg=seg))
            y += lt
        r = r_top * u(0.6, 0.95)  # next tier is narrower
    size = max(y, 2 * r_top)
    roof = rng.choice(["cone", "dome", "battlements"])
    if roof == "cone":
        rr = r_top * u(1.0, 1.2)
        parts.append(cyl(rr, y - 0.005, y + rr * u(1.0, 3.0), r_top=0.0, seg=seg))
    elif roof == "dome":
        arc = np.linspace(0, np.pi / 2 * 0.95, 10)
        rise = r_top * u(0.8, 1.0)
        parts.append(revolve([(0.0, y - 0.005)] + [(r_top * np.cos(a), y + rise * np.sin(a)) for a in arc] + [(0.0, y + rise)]))
        if rng.random() < 0.5:  # spire
            parts.append(cyl(max(0.015 * size, r_top * 0.1), y + rise * 0.8, y + rise * 1.8, r_top=0.0, seg=8))
    else:
        mh = max(u(0.05, 0.1), 0.025 * size)
        mw = max(0.025 * size, r_top * 0.25)
        ring = r_top * np.cos(np.pi / seg) - mw * 0.6  # inside the polygon's inscribed circle
        n = 4 * max(2, int(2 * np.pi * ring / (2.2 * mw) / 4))
        for k in range(n):
            a = 2 * np.pi * k / n
            merlon = block((-mw / 2, -0.005, -mw / 2), (mw / 2, mh, mw / 2)).rotate((0.0, -np.degrees(a), 0.0))
            parts.append(merlon.translate((ring * np.cos(a), y, ring * np.sin(a))))
    spin = 45.0 if seg == 4 else 0.0  # square faces along the axes
    return union(parts).rotate((0.0, spin, 0.0))


def _as_mesh(build: Callable[[np.random.Generator], M]) -> Callable[[np.random.Generator], trimesh.Trimesh]:
    def make(rng: np.random.Generator) -> trimesh.Trimesh:
        return finish(build(rng))

    make.__doc__ = build.__doc__
    return make


FAMILIES: dict[str, Callable[[np.random.Generator], trimesh.Trimesh]] = {
    fn.__name__: _as_mesh(fn)
    for fn in (chair, table, stool, sofa, shelf, mug, vase_bottle, lamp, car, aircraft, animal, bed, bench, rocket, tower, plush)
}


def make_shape(family: str, seed: int) -> trimesh.Trimesh:
    """One shape of `family`; deterministic in (family, seed)."""
    rng = np.random.default_rng([zlib.crc32(family.encode()), int(seed)])
    return FAMILIES[family](rng)


# ---------------------------------------------------------------------------------------------
# Real meshes under random pose and stretch


def real_variant(path, seed: int) -> trimesh.Trimesh:
    """A real mesh turned about +Y, tilted ≤ 10°, stretched ×U(0.8, 1.2) per axis; on y = 0.

    Open meshes (teapot, Suzanne) stay open: data preparation labels them by winding number.
    """
    path = Path(path)
    mesh = load_mesh(path, z_up=path.stem.startswith(Z_UP_PREFIXES))
    rng = np.random.default_rng([zlib.crc32(path.stem.encode()), int(seed)])
    stretch = np.diag(rng.uniform(0.8, 1.2, 3))  # in the object's own axes, before turning it
    yaw = trimesh.transformations.rotation_matrix(rng.uniform(0, 2 * np.pi), [0, 1, 0])[:3, :3]
    a = rng.uniform(0, 2 * np.pi)
    tilt = trimesh.transformations.rotation_matrix(np.radians(rng.uniform(0, 10)), [np.cos(a), 0, np.sin(a)])[:3, :3]
    v = np.asarray(mesh.vertices) @ (tilt @ yaw @ stretch).T
    lo, hi = v.min(0), v.max(0)
    v -= ((lo[0] + hi[0]) / 2, lo[1], (lo[2] + hi[2]) / 2)
    return trimesh.Trimesh(v, mesh.faces.copy(), process=False)


# ---------------------------------------------------------------------------------------------
# Dataset


def shape_seed(seed: int, key: str, index: int) -> int:
    """Per-shape seed from (dataset seed, family or mesh stem, index): independent of order and workers."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(key.encode()), int(index)]).generate_state(1)[0])


def _write_ply(mesh: trimesh.Trimesh, path: Path) -> None:
    """Binary PLY written to a temp file and renamed, so an interrupted run leaves no half file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(trimesh.exchange.ply.export_ply(mesh, encoding="binary"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _job(kind: str, key: str, arg, seed: int, out_path: Path):
    """Build and write one shape; never raises. Returns (group, name, error or None, seconds)."""
    start = time.perf_counter()
    try:
        mesh = make_shape(key, seed) if kind == "family" else real_variant(arg, seed)
        _write_ply(mesh, out_path)
        error = None
    except Exception as exc:  # one bad shape must not stop the batch
        error = f"{type(exc).__name__}: {exc}"
    group = key if kind == "family" else "real"
    return group, out_path.stem, error, time.perf_counter() - start


def _plan(out_dir: Path, count: int, seed: int, real_dir, real_variants: int, real_meshes=None,
          families=None) -> list[tuple]:
    """All jobs of the dataset: `count` spread evenly over `families` (None: all FAMILIES), then the
    real variants (of the meshes in `real_dir` whose stems are in `real_meshes`; None: all of them)."""
    jobs = []
    names = list(FAMILIES) if families is None else list(families)
    for i, family in enumerate(names):
        n = count // len(names) + (i < count % len(names))
        jobs += [("family", family, None, shape_seed(seed, family, k), out_dir / f"{family}_{k:05d}.ply") for k in range(n)]
    if real_dir is not None:
        meshes = sorted(p for p in Path(real_dir).iterdir() if p.suffix.lower() in MESH_EXTENSIONS)
        for path in (p for p in meshes if real_meshes is None or p.stem in real_meshes):
            jobs += [("real", path.stem, path, shape_seed(seed, path.stem, k), out_dir / f"real__{path.stem}@{k:02d}.ply")
                     for k in range(real_variants)]
    return jobs


def build_dataset(out_dir, count: int, seed: int = 0, real_dir=None, real_variants: int = 20, workers: int = 1,
                  real_meshes=None, families=None) -> dict:
    """Write `count` procedural shapes (+ real variants) as PLY files; resumable; returns the report.

    `real_meshes`: the stems of the meshes in `real_dir` to make variants of (None: every mesh
    there). A variant depends only on its mesh, `seed` and number, so a mesh left out of one
    dataset and built into another gets the same variants. `families`: those `count` is spread
    over (None: all of FAMILIES).

    The report (also `out_dir/shapes.json`) has per-group counts of files present, the shapes written
    now, those skipped because they existed, failures with their error, and timings.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if real_dir is not None and not Path(real_dir).is_dir():
        raise FileNotFoundError(f"real mesh folder does not exist: {real_dir}")
    plan = _plan(out_dir, count, seed, real_dir, real_variants, real_meshes, families)
    todo = [job for job in plan if not job[-1].exists()]

    start = time.perf_counter()
    failures, written, build_seconds = [], 0, 0.0
    progress = tqdm(total=len(todo), desc="shapes", unit="shape")
    pool = None
    if workers > 1 and todo:
        # spawn, not fork: forking a process that already runs threads (manifold's TBB, igl) can hang.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        futures = {pool.submit(_job, *job): job for job in todo}
        results = _pool_results(futures)
    else:
        results = (_job(*job) for job in todo)
    try:
        for group, name, error, seconds in results:
            build_seconds += seconds
            if error is None:
                written += 1
            else:
                failures.append({"name": name, "group": group, "error": error})
            progress.update()
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    counts: dict[str, int] = {}
    for kind, key, _, _, path in plan:
        group = key if kind == "family" else "real"
        counts[group] = counts.get(group, 0) + int(path.exists())
    seconds = time.perf_counter() - start
    report = {
        "count": count, "seed": seed, "real_dir": None if real_dir is None else str(real_dir),
        "real_variants": real_variants if real_dir is not None else 0, "workers": workers,
        "counts": counts, "total": sum(counts.values()), "written": written,
        "skipped_existing": len(plan) - len(todo), "failures": sorted(failures, key=lambda f: f["name"]),
        "seconds": round(seconds, 3), "seconds_per_shape": round(build_seconds / max(len(todo), 1), 5),
    }
    (out_dir / "shapes.json").write_text(json.dumps(report, indent=2))
    return report


def _pool_results(futures):
    """Results as they complete; a crashed worker becomes a failure, not an abort."""
    for future in as_completed(futures):
        try:
            yield future.result()
        except Exception as exc:  # e.g. BrokenProcessPool after a crash in native code
            kind, key, _, _, path = futures[future]
            yield (key if kind == "family" else "real"), path.stem, f"worker failed: {type(exc).__name__}: {exc}", 0.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mar3d.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for the .ply files and shapes.json")
    parser.add_argument("--count", type=int, default=3000, help="procedural shapes, spread evenly over the families")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-dir", type=Path, default=None, help="folder of real meshes to add variants of")
    parser.add_argument("--real-variants", type=int, default=20, help="variants per real mesh")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (1: in-process)")
    args = parser.parse_args(argv)
    try:
        report = build_dataset(args.out_dir, args.count, args.seed, args.real_dir, args.real_variants, args.workers)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"written {report['written']}, skipped (existing) {report['skipped_existing']}, "
          f"failed {len(report['failures'])}, total {report['total']} in {report['seconds']:.1f}s "
          f"({report['seconds_per_shape'] * 1000:.1f} ms/shape per worker); report: {args.out_dir / 'shapes.json'}")
    for failure in report["failures"]:
        print(f"  failed {failure['name']}: {failure['error']}", file=sys.stderr)


if __name__ == "__main__":
    main()
