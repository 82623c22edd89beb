"""mar3d.projection: a view-frame point lands where the preprocessed condition image shows it."""

import numpy as np
import pytest
import torch
import trimesh

from mar3d.preprocess import preprocess_image
from mar3d.projection import crop_camera, project
from mar3d.render import Camera, fit_distance, render, rotate_mesh_to_view


@pytest.mark.parametrize("azimuth, elevation, fov", [(0.0, 30.0, 40.0), (130.0, -8.0, 32.0), (250.0, 38.0, 49.0)])
def test_projected_points_fill_the_preprocessed_mask(azimuth, elevation, fov):
    """An off-centre, asymmetric shape turned into the view's frame: its projected vertices span the
    preprocessed mask's box (a wrong sign, elevation or crop scale moves some edge by many pixels),
    and a corner's projection lands on the object."""
    post = trimesh.creation.box((0.3, 1.2, 0.3), trimesh.transformations.translation_matrix((0.5, 0.6, -0.1)))
    mesh = trimesh.util.concatenate([trimesh.creation.box((1.4, 0.3, 0.5)), post])
    camera = Camera(azimuth, elevation, fit_distance(np.linalg.norm(mesh.vertices, axis=1).max(), fov), fov, 96)
    rgba = render(mesh, camera, color=(0.7, 0.7, 0.7))
    size = 64
    pre = np.asarray(preprocess_image(rgba, "auto", 0.85, size=size).rgba)[..., 3] > 8
    params = crop_camera(camera, rgba[..., 3], 0.85, size=size)
    view = rotate_mesh_to_view(mesh, camera)
    dense = trimesh.sample.sample_surface(view, 20000, seed=0)[0]
    uv = project(torch.tensor(dense)[None].float(), torch.tensor(params)[None])[0].numpy()
    px = (uv + 1) * size / 2  # grid_sample units → pixels
    ys, xs = np.nonzero(pre)
    np.testing.assert_allclose(px.min(0), [xs.min(), ys.min()], atol=1.5)
    np.testing.assert_allclose(px.max(0), [xs.max() + 1, ys.max() + 1], atol=1.5)
    inside = pre[np.clip(px[:, 1].astype(int), 0, size - 1), np.clip(px[:, 0].astype(int), 0, size - 1)]
    assert inside.mean() > 0.97  # every surface point is seen on the object, not beside it


def test_crop_camera_refuses_an_empty_mask():
    with pytest.raises(ValueError, match="empty"):
        crop_camera(Camera(0.0, 0.0, 3.0, 40.0, 32), np.zeros((32, 32), np.uint8))


def test_a_fitted_view_gives_the_crop_camera():
    """fit_view on the true mesh and the preprocessed mask recovers the camera: its CAMERA_FIELDS
    project the mesh where crop_camera's do (within a pixel and a half)."""
    from mar3d.colour import fit_view
    from mar3d.projection import from_view_fit

    post = trimesh.creation.box((0.3, 1.2, 0.3), trimesh.transformations.translation_matrix((0.5, 0.6, -0.1)))
    mesh = trimesh.util.concatenate([trimesh.creation.box((1.4, 0.3, 0.5)), post])
    camera = Camera(40.0, 25.0, fit_distance(np.linalg.norm(mesh.vertices, axis=1).max(), 40.0), 40.0, 96)
    rgba = render(mesh, camera, color=(0.7, 0.7, 0.7))
    size = 64
    mask = np.asarray(preprocess_image(rgba, "auto", 0.85, size=size).rgba)[..., 3] >= 128
    view = rotate_mesh_to_view(mesh, camera)
    fitted = from_view_fit(fit_view(view, mask))
    assert abs(fitted[0] - 25.0) <= 3.0
    points = torch.tensor(view.vertices)[None].float()
    a, b = (project(points, torch.tensor(p)[None])[0].numpy() for p in (fitted, crop_camera(camera, rgba[..., 3], size=size)))
    assert np.abs(a - b).max() * size / 2 < 1.5
