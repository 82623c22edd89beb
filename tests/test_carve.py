"""Silhouette carving (mar3d.carve): the input's outline trims an occupancy field."""

import numpy as np
import pytest
import torch
import trimesh

from mar3d.carve import carve, outline_distance, signed_distance
from mar3d.colour import ViewFit, silhouette
from mar3d.extract import extract_mesh
from mar3d.render import Camera, fit_distance

RADIUS = 0.6


def sphere_logits(points: torch.Tensor) -> torch.Tensor:
    return 40.0 * (RADIUS - points.norm(dim=1))


@pytest.fixture(scope="module")
def view():
    """A camera at azimuth 0, 20° up, framing the sphere; the sphere's ray-cast mask at 96²."""
    camera = Camera(0.0, 20.0, fit_distance(RADIUS, 40.0), 40.0, 96)
    fit = ViewFit(camera, 1.0, (0.0, 0.0), 96, 1.0)
    mask = silhouette(trimesh.creation.icosphere(subdivisions=4, radius=RADIUS), fit, 96)
    return fit, mask


def test_carving_by_half_the_outline_keeps_exactly_that_half(view):
    fit, mask = view
    left = mask.copy()
    left[:, 48:] = False  # the image's right half: x > 0 seen from azimuth 0
    mesh, _ = extract_mesh(carve(sphere_logits, fit, left), resolution=48)
    v = np.asarray(mesh.vertices)
    assert v[:, 0].min() < -RADIUS + 0.05       # the left side is still there
    assert v[:, 0].max() < 0.05                 # the right side is gone, to a cell
    assert np.abs(v[:, 1]).max() > RADIUS - 0.05  # top and bottom of the kept half intact
    # every vertex projects onto the outline or inside it, to a pixel
    assert outline_distance(v, fit, signed_distance(left)).min() > -1.0


def test_carving_by_the_objects_own_outline_changes_nothing(view):
    fit, mask = view
    whole, _ = extract_mesh(sphere_logits, resolution=48)
    carved, _ = extract_mesh(carve(sphere_logits, fit, mask, dilation=1), resolution=48)
    assert len(carved.faces) == len(whole.faces)
    assert np.allclose(carved.bounds, whole.bounds)


def test_signed_distance_to_the_outline(view):
    fit, mask = view
    bar = np.zeros((9, 9), bool)
    bar[:, 3:6] = True  # three columns wide
    d = signed_distance(bar)
    assert d[0].tolist() == [-2.5, -1.5, -0.5, 0.5, 1.5, 0.5, -0.5, -1.5, -2.5]
    # the sphere's centre projects deep inside its outline, a point far off the image outside
    # (clamped to the border, which is background)
    far = np.array([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0], [0.0, -50.0, 0.0]])
    inside, right, below = outline_distance(far, fit, signed_distance(mask))
    assert inside > 20 and right < 0 and below < 0
    assert signed_distance(np.ones((4, 4), bool)).min() >= 16
    with pytest.raises(ValueError, match="dilation"):
        carve(sphere_logits, fit, mask, dilation=-1)
    with pytest.raises(ValueError, match="non-empty"):
        carve(sphere_logits, fit, np.zeros_like(mask))
