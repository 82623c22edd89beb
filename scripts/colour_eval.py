#!/usr/bin/env python3
"""Score colour from the picture (mar3d.colour) on held-out renders: the model card's numbers.

    python scripts/colour_eval.py --per-family 2                      # true meshes only (seconds)
    python scripts/colour_eval.py --per-family 2 --checkpoint checkpoints  # also the generated meshes

Each case is a procedural shape at a seed no training set uses (10_000 + i), painted with a smooth
3D colour field, rendered unlit (so a pixel is the surface's albedo) from a camera drawn as for
training (elevation −10…40°, fov 30…50°), the shape turned into that view's frame, and
preprocessed as the app does. Reported per case and as means:
- elevation error of the recovered camera, given the true mesh;
- colour error of seen vertices (mean absolute sRGB difference per channel, 0..1) against the
  field's colour at the vertex, with the true mesh, and, with --checkpoint, for the pipeline's
  generated mesh against the colour of the nearest true surface point.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mar3d.colour import colour_mesh, linear_to_srgb, srgb_to_linear, vertex_colours  # noqa: E402
from mar3d.preprocess import preprocess_image  # noqa: E402
from mar3d.render import Camera, bounding_radius, random_camera, render, rotate_mesh_to_view  # noqa: E402
from mar3d.shapes import FAMILIES, make_shape  # noqa: E402


def colour_field(points: np.ndarray) -> np.ndarray:
    """A smooth, multi-coloured sRGB albedo in [0.1, 0.9] over space (bands across x, y and z)."""
    p = np.asarray(points)
    return 0.5 + 0.4 * np.stack([np.sin(3.0 * p[:, 1] + 0.5), np.sin(2.5 * p[:, 0] - 1.0),
                                 np.cos(2.0 * p[:, 2] + 2.0 * p[:, 1])], 1)


def case(family: str, seed: int, rng: np.random.Generator, size: int = 256):
    mesh = make_shape(family, seed).copy()
    mesh.vertices -= mesh.bounds.mean(0)
    mesh.vertices *= 0.9 / np.abs(mesh.vertices).max()
    # small faces, as on a marching-cubes mesh: a face's colour is then its vertices' colour
    mesh = trimesh.Trimesh(*trimesh.remesh.subdivide_to_size(mesh.vertices, mesh.faces, 0.04), process=False)
    camera = random_camera(rng, size=size, radius=bounding_radius(mesh))
    mesh = rotate_mesh_to_view(mesh, camera)
    seen_from = Camera(0.0, camera.elevation_deg, camera.distance, camera.fov_deg, size)
    # per-face colour from the field at the face centre, averaged in linear light (what the picture shows)
    face_colours = linear_to_srgb(srgb_to_linear(colour_field(mesh.triangles.reshape(-1, 3))).reshape(-1, 3, 3).mean(1))
    rgba = render(mesh, seen_from, rng, color=face_colours, ambient=1.0, specular=0.0)
    return mesh, camera, Image.fromarray(rgba)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-family", type=int, default=2)
    p.add_argument("--checkpoint", default="", help="also colour the pipeline's generated meshes")
    p.add_argument("--out", default="", help="write the rows as json here")
    args = p.parse_args(argv)
    pipe = None
    if args.checkpoint:
        from mar3d.pipeline import MAR3DPipeline, Settings

        pipe = MAR3DPipeline.from_pretrained(args.checkpoint)
    rng = np.random.default_rng(14)
    rows = []
    for family in sorted(FAMILIES):
        for i in range(args.per_family):
            mesh, camera, picture = case(family, 10_000 + i, rng)
            pre = preprocess_image(picture, size=128)
            _, fit = colour_mesh(mesh, pre.rgba)
            colours, seen = vertex_colours(mesh, np.asarray(pre.rgba), fit)
            row = {"family": family, "seed": 10_000 + i, "elevation": round(camera.elevation_deg, 1),
                   "elevation_error": round(abs(fit.camera.elevation_deg - camera.elevation_deg), 1),
                   "iou": round(fit.iou, 3),
                   "colour_error_true_mesh": round(float(np.abs(colours[seen, :3] / 255.0
                                                               - colour_field(mesh.vertices[seen])).mean()), 3)}
            if pipe is not None:
                cut = pipe.preprocess(picture)
                result = pipe(cut, Settings(seed=0, lr_mesh=False))
                gen = result.mesh
                seen_g = vertex_colours(gen, np.asarray(cut.rgba), result.view)[1]
                got = np.asarray(gen.visual.vertex_colors)[seen_g, :3] / 255.0
                points = nearest_surface_points(mesh, np.asarray(gen.vertices)[seen_g])
                row["generated_iou"] = round(result.view.iou, 3)
                row["colour_error_generated"] = round(float(np.abs(got - colour_field(points)).mean()), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0] if k not in ("family", "seed", "elevation")}
    summary["elevation_within_5"] = round(float(np.mean([r["elevation_error"] <= 5.0 for r in rows])), 3)
    summary["cases"] = len(rows)
    print(json.dumps({"mean": summary}))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "mean": summary}, indent=1))
    return 0


def nearest_surface_points(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """The nearest of 200k points spread over `mesh`'s surface to each of `points`."""
    surface, _ = trimesh.sample.sample_surface(mesh, 200_000, seed=0)
    _, idx = cKDTree(surface).query(points)
    return surface[idx]


if __name__ == "__main__":
    sys.exit(main())
