"""Rebuild tests/data/meshes and tests/data/images from the public originals (tests/data/README.md).

    python tests/data/make_test_data.py [--source ../shared/data]

The source folder holds the originals under meshes/ and images/ (their origins and licences are in
tests/data/README.md). Each output is either an unchanged copy or a derived file made here by a fixed,
seeded recipe, so a rerun gives the same bytes. The tests only read tests/data and assets/; this script
is for whoever changes the data.
"""

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import trimesh

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))  # mar3d, when run as a script

COPIED_MESHES = ["spot.obj", "torus.obj", "goathead.obj"]  # unchanged
DECIMATED_MESHES = {"ycb_banana.obj": 3000, "ycb_mustard_bottle.obj": 3000}  # name -> faces
COPIED_IMAGES = ["triposr_flamingo.png", "gso_render_shoe.png"]  # the others the tests use are in assets/


def clean(path: Path) -> trimesh.Trimesh:
    """Geometry only, vertices merged by position (as mar3d.geometry.load_mesh reads it)."""
    from mar3d.geometry import load_mesh

    return load_mesh(path)


def write_obj(mesh: trimesh.Trimesh, path: Path, header: str) -> None:
    """Plain OBJ: vertices (6 significant digits) and 1-based triangles, nothing else."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"v {x:.6g} {y:.6g} {z:.6g}" for x, y, z in np.asarray(mesh.vertices)]
    lines += [f"f {a} {b} {c}" for a, b, c in np.asarray(mesh.faces) + 1]
    path.write_text("\n".join(lines) + "\n")


def split_into_patches(mesh: trimesh.Trimesh, gap: float) -> trimesh.Trimesh:
    """Cut the mesh into four patches along the planes x = 0 and y = 0 through its centre, each patch
    with its own copy of the seam vertices; all vertices but those of the first patch are jittered by
    `gap` (standard deviation), so the copies no longer coincide: open seams a hair wide, the way the
    teapot's Bezier patches meet. load_mesh merges only equal positions, so the seams stay open."""
    centre = mesh.bounds.mean(axis=0)
    c = mesh.triangles_center - centre
    patch = (c[:, 0] > 0).astype(int) + 2 * (c[:, 1] > 0)
    vertices, faces = [], []
    rng = np.random.default_rng(0)
    for k in range(4):
        f = mesh.faces[patch == k]
        used, inverse = np.unique(f, return_inverse=True)
        v = mesh.vertices[used] + rng.normal(scale=gap, size=(len(used), 3)) * (k > 0)  # patch 0 stays put
        faces.append(inverse.reshape(-1, 3) + sum(len(x) for x in vertices))
        vertices.append(v)
    return trimesh.Trimesh(np.concatenate(vertices), np.concatenate(faces), process=False)


def cut_holes(mesh: trimesh.Trimesh, centres: np.ndarray, radius: float) -> trimesh.Trimesh:
    """Drop the faces whose centroid lies within `radius` of one of `centres` (leaves open holes)."""
    d = np.linalg.norm(mesh.triangles_center[:, None] - centres[None], axis=-1).min(axis=1)
    out = mesh.copy()
    out.update_faces(d > radius)
    out.remove_unreferenced_vertices()
    return out


def fish_open(src: Path) -> trimesh.Trimesh:
    """The fish in four patches with hair-wide open seams (the role of the teapot's open patches)."""
    mesh = clean(src)
    return split_into_patches(mesh, 1e-4 * mesh.extents.max())


EYE = 0.07  # eye radius / the penguin's size; the holes under the eyes are smaller


def penguin_parts(src: Path) -> trimesh.Trimesh:
    """The penguin with two holes, each covered by a spherical "eye" that pierces the body and is
    open on its inner side: three open parts that interpenetrate (the role of Suzanne's head and
    eyes). The outer surface is closed; ray parity is wrong inside the overlaps."""
    mesh = clean(src)
    size = mesh.extents.max()
    rng = np.random.default_rng(1)
    centres = mesh.vertices[rng.choice(len(mesh.vertices), 2, replace=False)]
    parts = [cut_holes(mesh, centres, 0.6 * EYE * size)]
    for centre in centres:
        eye = trimesh.creation.icosphere(subdivisions=3, radius=EYE * size)
        eye.apply_translation(centre)
        # Open the eye where it lies deep inside the body (its cap facing the body's centre).
        inward = mesh.centroid - centre
        inward /= np.linalg.norm(inward)
        eye.update_faces((eye.triangles_center - centre) @ inward < 0.6 * EYE * size)
        eye.remove_unreferenced_vertices()
        parts.append(eye)
    return trimesh.util.concatenate(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with meshes/ and images/")
    args = ap.parse_args(argv)
    meshes, images = HERE / "meshes", HERE / "images"
    meshes.mkdir(exist_ok=True)
    images.mkdir(exist_ok=True)
    for name in COPIED_MESHES:
        shutil.copyfile(args.source / "meshes" / name, meshes / name)
    for name, faces in DECIMATED_MESHES.items():
        mesh = clean(args.source / "meshes" / name).simplify_quadric_decimation(face_count=faces, aggression=2)
        write_obj(mesh, meshes / name, f"{name}: quadric decimation to {len(mesh.faces)} faces of the original "
                                        f"(tests/data/README.md); geometry only")
    write_obj(fish_open(args.source / "meshes" / "blub_fish_lowres.obj"), meshes / "fish_open.obj",
              "blub_fish_lowres.obj in four patches with open seams 1e-4 wide (tests/data/make_test_data.py)")
    write_obj(penguin_parts(args.source / "meshes" / "penguin.obj"), meshes / "penguin_parts.obj",
              "penguin.obj with two holes, each covered by an open sphere piercing it (tests/data/make_test_data.py)")
    for name in COPIED_IMAGES:
        shutil.copyfile(args.source / "images" / name, images / name)
    for path in sorted(meshes.iterdir()) + sorted(images.iterdir()):
        print(f"{path.relative_to(HERE)}: {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
