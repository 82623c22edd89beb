"""Colour from the picture (mar3d.colour, issue 14): camera recovery, vertex colours, exports."""

import numpy as np
import pytest
import trimesh
from PIL import Image

from mar3d.colour import colour_mesh, fit_view, linear_to_srgb, srgb_to_linear, vertex_colours
from mar3d.mesh_io import export_mesh, glb_colours_to_srgb
from mar3d.mesh_io import vertex_colours as mesh_vertex_colours
from mar3d.preprocess import preprocess_image
from mar3d.render import Camera, bounding_radius, fit_distance, random_camera, render, rotate_mesh_to_view
from mar3d.shapes import make_shape

RED, BLUE = np.array([0.9, 0.1, 0.1]), np.array([0.1, 0.2, 0.9])


def normalised(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    mesh = mesh.copy()
    mesh.vertices -= mesh.bounds.mean(0)
    mesh.vertices *= 0.9 / np.abs(mesh.vertices).max()
    return mesh


def processed(mesh, camera, face_colours, size=128):
    """The pipeline's condition image (crop, ratio, size) of an unlit render: pixels are the albedo."""
    rgba = render(mesh, camera, np.random.default_rng(0), color=face_colours, ambient=1.0, specular=0.0)
    return preprocess_image(Image.fromarray(rgba), size=size)


@pytest.mark.parametrize("family,elevation", [("chair", 20.0), ("mug", 5.0), ("car", 35.0)])
def test_upper_half_red_lower_half_blue(family, elevation):
    mesh = normalised(make_shape(family, 7))
    mid = mesh.bounds.mean(0)[1]
    faces_up = mesh.triangles_center[:, 1] > mid
    camera = Camera(0.0, elevation, fit_distance(bounding_radius(mesh), 40.0), 40.0, 256)
    pre = processed(mesh, camera, np.where(faces_up[:, None], RED, BLUE))
    out, fit = colour_mesh(mesh, pre.rgba)

    colours, seen = vertex_colours(mesh, np.asarray(pre.rgba), fit)
    assert np.array_equal(np.asarray(out.visual.vertex_colors), colours)
    assert 0.05 < seen.mean() < 0.95  # a view shows part of the shape, never all of it
    got = colours[:, :3] / 255.0
    up = mesh.vertices[:, 1] > mid
    # vertices right at the boundary are a mix in the picture: judge the ones clearly on either side
    clear = np.abs(mesh.vertices[:, 1] - mid) > 0.05
    err_up = np.abs(got[seen & up & clear] - RED).mean()
    err_down = np.abs(got[seen & ~up & clear] - BLUE).mean()
    assert err_up <= 0.1 and err_down <= 0.1, (err_up, err_down)
    # unseen vertices take a seen surface's colour: red or blue, never the white background or black
    unseen = got[~seen]
    to_paint = np.minimum(np.abs(unseen - RED).mean(1), np.abs(unseen - BLUE).mean(1))
    assert np.all(to_paint < 0.25)
    assert np.all(np.abs(unseen - 1.0).mean(1) > 0.3) and np.all(unseen.max(1) > 0.3)


def test_recovered_elevation_within_5_degrees_on_held_out_renders():
    """The true mesh in the view's frame, cameras drawn as for training (elevation −10…40, fov 30…50)."""
    rng = np.random.default_rng(2026)
    errors = []
    for family in ("chair", "table", "lamp", "sofa", "aircraft", "bench"):
        mesh = normalised(make_shape(family, 1000 + len(errors)))
        camera = random_camera(rng, size=192, radius=bounding_radius(mesh))
        in_view = rotate_mesh_to_view(mesh, camera)
        seen_from = Camera(0.0, camera.elevation_deg, camera.distance, camera.fov_deg, camera.size)
        pre = processed(in_view, seen_from, np.full((len(in_view.faces), 3), 0.6))
        fit = fit_view(in_view, np.asarray(pre.rgba)[..., 3] >= 128)
        errors.append(abs(fit.camera.elevation_deg - camera.elevation_deg))
        assert fit.iou > 0.8
    assert max(errors) <= 5.0, errors


def test_fit_projects_the_mesh_onto_the_mask():
    mesh = normalised(make_shape("stool", 3))
    camera = Camera(0.0, 25.0, fit_distance(bounding_radius(mesh), 35.0), 35.0, 256)
    pre = processed(mesh, camera, np.full((len(mesh.faces), 3), 0.5))
    mask = np.asarray(pre.rgba)[..., 3] >= 128
    fit = fit_view(mesh, mask)
    uv = fit.project(mesh.vertices)
    ys, xs = np.nonzero(mask)
    # the projected vertices' box is the mask's box, to a pixel or two
    assert np.allclose([uv[:, 0].min(), uv[:, 1].min(), uv[:, 0].max(), uv[:, 1].max()],
                       [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=2.0)
    # and projecting into a bigger copy of the image scales the coordinates
    assert np.allclose(fit.project(mesh.vertices, size=2 * mask.shape[0]), 2 * uv)


def test_fit_view_refuses_empty_input():
    mesh = trimesh.creation.icosphere()
    with pytest.raises(ValueError, match="non-empty"):
        fit_view(mesh, np.zeros((32, 32), bool))
    with pytest.raises(ValueError, match="square"):
        fit_view(mesh, np.ones((32, 16), bool))


def test_srgb_round_trip():
    x = np.linspace(0, 1, 101)
    assert np.allclose(linear_to_srgb(srgb_to_linear(x)), x, atol=1e-9)
    assert srgb_to_linear(0.5) == pytest.approx(0.214, abs=1e-3)


@pytest.mark.parametrize("fmt", ["glb", "ply", "obj"])
def test_exports_carry_vertex_colours(tmp_path, fmt):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    colours = np.zeros((len(mesh.vertices), 4), np.uint8)
    colours[:, 0] = np.linspace(0, 255, len(colours))
    colours[:, 1], colours[:, 2], colours[:, 3] = 40, 200, 255
    mesh = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=colours, process=False)
    path = export_mesh(mesh, tmp_path / f"m.{fmt}")
    back = trimesh.load(path, force="mesh", process=False, skip_materials=True)
    got = mesh_vertex_colours(back)
    assert got is not None and len(got) == len(colours)
    if fmt == "glb":  # COLOR_0 is linear light in glTF
        assert np.abs(got[:, :3].astype(int) - colours[:, :3]).max() > 20  # really converted
        got = glb_colours_to_srgb(got)
    assert np.abs(got[:, :3].astype(int) - colours[:, :3]).max() <= 6  # uint8 linear steps near black


def test_stl_and_grey_meshes_have_no_colours(tmp_path):
    grey = trimesh.creation.box()
    assert mesh_vertex_colours(trimesh.load(export_mesh(grey, tmp_path / "g.glb"), force="mesh",
                                            skip_materials=True)) is None
    coloured = trimesh.Trimesh(grey.vertices, grey.faces, vertex_colors=[255, 0, 0, 255], process=False)
    stl = trimesh.load(export_mesh(coloured, tmp_path / "c.stl"), force="mesh")
    assert mesh_vertex_colours(stl) is None
