"""Condition-image renderer: geometry of the projection, camera conventions, the view rotation,
colours and determinism, on analytic shapes and a real mesh."""

import json
import math
import time

import numpy as np
import pytest
import trimesh
from scipy import ndimage

from mar3d.geometry import load_mesh, normalize_mesh
from mar3d.render import (Camera, _cast, _transform, bounding_radius, corner_normals, fit_distance, random_camera, render,
                          render_flat, render_views, rotate_mesh_to_view, rotate_to_view)
from tests.conftest import data_mesh

FIXED = dict(color=(0.6, 0.5, 0.4), light_dir=(0.3, 0.6, 0.75), ambient=0.3, specular=0.0)


@pytest.fixture(scope="module")
def spot():
    mesh, _, _ = normalize_mesh(load_mesh(data_mesh("spot.obj")))
    return mesh


def mask(img):
    return img[..., 3] >= 128


def test_sphere_projects_to_the_pinhole_disc():
    r, d, fov, size = 0.5, 3.0, 40.0, 128
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=r)
    cam = Camera(0.0, 0.0, d, fov, size)
    img = render(sphere, cam, np.random.default_rng(0))
    alpha = img[..., 3] / 255.0
    expected = cam.focal * r / math.sqrt(d * d - r * r)  # silhouette cone of a sphere, in pixels
    measured = math.sqrt(alpha.sum() / math.pi)
    assert abs(measured - expected) < 1.0, (measured, expected)
    rows, cols = np.nonzero(mask(img))
    assert abs((rows.max() - rows.min() + 1) / 2 - expected) < 1.5
    assert abs((cols.max() - cols.min() + 1) / 2 - expected) < 1.5
    ys, xs = np.mgrid[:size, :size]
    centre = (size - 1) / 2  # pixel centres sit at index + 0.5; the principal point at size / 2
    assert abs((alpha * ys).sum() / alpha.sum() - centre) < 0.2
    assert abs((alpha * xs).sum() / alpha.sum() - centre) < 0.2
    assert alpha[0].max() == 0 and alpha[:, 0].max() == 0
    # Anti-aliased edge: some partially covered pixels, opaque inside.
    assert ((alpha > 0) & (alpha < 1)).sum() > 20 and alpha[64, 64] == 1.0


def _bar(marker: bool):
    """A bar along X (top at y = 0.2) with, optionally, a marker cube standing on its +X end."""
    parts = [trimesh.creation.box(extents=(1.6, 0.4, 0.4))]
    if marker:
        parts.append(trimesh.creation.box(extents=(0.3, 0.3, 0.3), transform=trimesh.transformations.
                                          translation_matrix((0.6, 0.35, 0.0))))
    return trimesh.util.concatenate(parts)


def _marker_pixels(azimuth, elevation=0.0):
    """Pixels covered only when the marker is present (centroid row, col) and their count."""
    cam = Camera(azimuth, elevation, 3.0, 40.0, 128)
    with_m, without = (mask(render(_bar(m), cam, **FIXED)) for m in (True, False))
    rows, cols = np.nonzero(with_m & ~without)
    return rows.mean(), cols.mean(), len(rows)


def test_camera_orientation_conventions():
    # Azimuth 0: camera on +Z, +X to the right, +Y up (rows grow downwards).
    row, col, n_front = _marker_pixels(0.0)
    assert col > 64 + 20 and row < 64 - 5
    # Azimuth 180: seen from behind, the +X end is on the left.
    row, col, _ = _marker_pixels(180.0)
    assert col < 64 - 20 and row < 64 - 5
    # Azimuth 90: camera on +X, the marker is at the near end (centred, large); at 270 it is
    # at the far end (smaller by perspective and partly hidden behind the bar).
    row90, col90, n90 = _marker_pixels(90.0)
    _, col270, n270 = _marker_pixels(270.0)
    assert abs(col90 - 63.5) < 2 and abs(col270 - 63.5) < 2 and row90 < 64
    assert n90 > 1.5 * n270
    for az, pos in ((0, (0, 0, 3)), (90, (3, 0, 0)), (180, (0, 0, -3)), (270, (-3, 0, 0))):
        np.testing.assert_allclose(Camera(az, 0.0, 3.0, 40.0, 64).position, pos, atol=1e-9)
    np.testing.assert_allclose(Camera(0.0, 30.0, 2.0, 40.0, 64).position, (0, 1.0, math.sqrt(3)), atol=1e-9)


def test_top_face_visible_only_from_above():
    """Light straight down from world +Y, no ambient: only faces pointing up are lit."""
    bar = _bar(False)
    lit = {}
    for el in (40.0, -10.0):
        cam = Camera(30.0, el, 3.0, 40.0, 128)
        up_in_camera = cam.rotation.T @ np.array([0.0, 1.0, 0.0])
        img = render(bar, cam, color=(0.8, 0.8, 0.8), light_dir=up_in_camera, ambient=0.0, specular=0.0)
        bright = mask(img) & (img[..., :3].max(-1) > 100)
        lit[el] = (bright[:64].sum(), bright[64:].sum())  # above / below the image centre
    above, below = lit[40.0]
    assert above > 300 and above > below
    assert sum(lit[-10.0]) < 10


def test_backfaces_are_lit_like_front_faces():
    quad = trimesh.Trimesh([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]], [[0, 1, 2], [0, 2, 3]])
    fixed = dict(color=(0.5, 0.5, 0.5), light_dir=(0, 0, 1), ambient=0.2, specular=0.1)
    front = render(quad, Camera(0.0, 0.0, 2.0, 40.0, 64), **fixed)
    back = render(quad, Camera(180.0, 0.0, 2.0, 40.0, 64), **fixed)
    assert mask(front).sum() == mask(back).sum() > 500
    np.testing.assert_allclose(front[mask(front)][:, :3].mean(0), back[mask(back)][:, :3].mean(0), atol=1)


def test_rotate_to_view_matches_the_picture(spot):
    cam = Camera(123.0, 20.0, fit_distance(bounding_radius(spot), 40.0), 40.0, 128)
    original = render(spot, cam, **FIXED)
    cam0 = Camera(0.0, cam.elevation_deg, cam.distance, cam.fov_deg, cam.size)
    rotated = render(rotate_mesh_to_view(spot, cam), cam0, **FIXED)
    a, b = mask(original), mask(rotated)
    assert (a & b).sum() / (a | b).sum() >= 0.99
    assert np.mean(a == b) >= 0.99
    assert np.abs(original[..., :3].astype(int) - rotated[..., :3]).mean() < 1.0  # lights follow the camera
    # (N, 6): normals rotate with the points; a point facing the camera ends up facing +Z.
    pn = np.concatenate([spot.vertices, spot.vertex_normals], 1)
    out = rotate_to_view(pn, cam)
    np.testing.assert_allclose(out[:, :3], rotate_to_view(spot.vertices, cam))
    np.testing.assert_allclose(out[:, 3:], rotate_to_view(spot.vertex_normals, cam))
    np.testing.assert_allclose(rotate_to_view(cam.position[None], cam)[0], cam0.position, atol=1e-9)
    with pytest.raises(ValueError):
        rotate_to_view(np.zeros((4, 4)), cam)


def test_random_renders_are_deterministic_and_coloured(spot):
    normals = corner_normals(spot)
    cam = random_camera(np.random.default_rng(3), radius=bounding_radius(spot))
    imgs = [render(spot, cam, np.random.default_rng(seed), normals=normals) for seed in (7, 7, 8, 9, 10)]
    np.testing.assert_array_equal(imgs[0], imgs[1])
    means = [img[mask(img)][:, :3].mean(0) for img in imgs[1:]]
    for i in range(len(means)):
        for j in range(i):
            assert np.abs(means[i] - means[j]).max() > 5, "colours should vary across seeds"
    for img in imgs:
        rgb = img[mask(img)][:, :3].astype(int)
        assert 40 < rgb.max(-1).mean() < 230
        assert np.mean(rgb.max(-1) <= 10) < 0.01 and np.mean(rgb.min(-1) >= 250) < 0.01
        assert np.all(img[~(img[..., 3] > 0)][:, :3] == 0)


def test_camera_dict_round_trip_and_projection_consistency(spot):
    views = render_views(spot, 3, np.random.default_rng(11), size=96)
    for img, cam in views:
        assert img.shape == (96, 96, 4) and img.dtype == np.uint8
        back = Camera.from_dict(json.loads(json.dumps(cam.to_dict())))
        assert back == cam
        R = cam.pose[:3, :3]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.isclose(np.linalg.det(R), 1.0)
        np.testing.assert_allclose(cam.pose[:3, 2] * cam.distance, cam.position)  # looks at the origin
        # Project with K and the inverse pose by hand (glTF camera -> OpenCV axes: flip y and z).
        v = np.c_[spot.vertices, np.ones(len(spot.vertices))]
        cam_pts = (np.linalg.inv(cam.pose) @ v.T).T[:, :3] * np.array([1.0, -1.0, -1.0])
        uvw = (cam.K @ cam_pts.T).T
        uv = uvw[:, :2] / uvw[:, 2:]
        np.testing.assert_allclose(uv, cam.project(spot.vertices), atol=1e-9)
        grown = ndimage.binary_dilation(img[..., 3] > 0, iterations=1)
        col, row = np.floor(uv).astype(int).T
        inside = (row >= 0) & (row < 96) & (col >= 0) & (col < 96)
        assert inside.all()
        assert grown[row, col].mean() >= 0.98
        # Framed on the bounding ball: the object never touches the border.
        alpha = img[..., 3]
        assert alpha[[0, -1]].max() == 0 and alpha[:, [0, -1]].max() == 0


def test_windowed_cast_hits_as_casting_every_ray(spot):
    """`_cast` casts only the sub-pixels around the projected mesh: every ray's hit must be the one
    a cast of all (size·ss)² rays gives, for a mesh in the middle, off to a side, and cut by the
    frame's edge (a camera too close)."""
    off_side = spot.copy()
    off_side.vertices = off_side.vertices * 0.3 + [0.9, -0.4, 0.2]
    cases = [(spot, random_camera(np.random.default_rng(4), size=48, radius=bounding_radius(spot))),
             (off_side, Camera(30.0, 10.0, 4.0, 40.0, 48)),
             (spot, Camera(200.0, 20.0, 1.8, 50.0, 48))]
    for mesh, cam in cases:
        for ss in (1, 2):
            n = cam.size * ss
            s = (np.arange(n) + 0.5) / ss
            u, v = np.meshgrid(s, s)
            dirs = np.stack([(u - n / ss / 2) / cam.focal, -(v - n / ss / 2) / cam.focal, -np.ones_like(u)], -1)
            dirs = _transform(dirs.reshape(-1, 3), cam.rotation)
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
            every = mesh.ray.intersects_first(np.broadcast_to(cam.position, dirs.shape), dirs)
            tri, hit_dirs = _cast(mesh, cam, ss)
            assert (every >= 0).sum() > 50
            np.testing.assert_array_equal(tri, every)
            np.testing.assert_array_equal(hit_dirs, dirs[tri >= 0])
    assert (_cast(*cases[2], 1)[0].reshape(48, 48)[[0, -1]] >= 0).any()  # cut by the frame's edge


def test_flat_render_keeps_coverage_and_draws(spot):
    """render_flat: `render`'s alpha exactly, one colour where covered, none elsewhere, and the
    same draws from the generator, so that views rendered after it are the same."""
    cam = random_camera(np.random.default_rng(5), radius=bounding_radius(spot))
    shaded_rng, flat_rng = np.random.default_rng(6), np.random.default_rng(6)
    shaded, flat = render(spot, cam, shaded_rng), render_flat(spot, cam, flat_rng)
    np.testing.assert_array_equal(flat[..., 3], shaded[..., 3])
    covered = flat[..., 3] > 0
    assert len(np.unique(flat[covered][:, :3], axis=0)) == 1 and not flat[~covered][:, :3].any()
    assert shaded_rng.uniform() == flat_rng.uniform()
    a, b = (render_views(spot, 3, np.random.default_rng(7), size=64, shaded=s) for s in (True, False))
    assert [c for _, c in a] == [c for _, c in b]
    assert all(np.array_equal(x[..., 3], y[..., 3]) for (x, _), (y, _) in zip(a, b))


def test_random_camera_ranges():
    rng = np.random.default_rng(0)
    cams = [random_camera(rng, size=64, elevation=(-10, 40), fov=(30, 50)) for _ in range(50)]
    assert all(0 <= c.azimuth_deg < 360 and -10 <= c.elevation_deg <= 40 and 30 <= c.fov_deg <= 50 for c in cams)
    # Default radius holds the whole normalised cube [-0.95, 0.95]^3 (corner at radius 0.95·√3).
    corners = np.array(np.meshgrid(*[[-0.95, 0.95]] * 3)).reshape(3, -1).T
    for c in cams:
        uv = c.project(corners)
        assert uv.min() >= 0 and uv.max() <= 64


def test_render_time(spot, capsys):
    cam = random_camera(np.random.default_rng(0), radius=bounding_radius(spot))
    normals = corner_normals(spot)
    render(spot, cam, np.random.default_rng(0), normals=normals)
    t = time.perf_counter()
    for _ in range(5):
        render(spot, cam, np.random.default_rng(0), normals=normals)
    per = (time.perf_counter() - t) / 5
    t = time.perf_counter()
    corner_normals(spot)
    t_normals = time.perf_counter() - t
    with capsys.disabled():
        print(f"\n128x128 render of spot ({len(spot.faces)} faces, 2x2 supersampling, embree="
              f"{trimesh.ray.has_embree}): {per * 1e3:.1f} ms; corner normals {t_normals * 1e3:.1f} ms")
