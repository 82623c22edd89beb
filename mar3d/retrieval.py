"""Reference shapes by silhouette: the training render whose outline best matches the input's.

Measured on the validation split (checkpoints/README.md, "retrieval"): the training shape whose
preprocessed render has the highest silhouette IoU with the input's scores a median F@0.05 well
above every model trained on this CPU, which underfit their training shapes. A MAR given that
reference's tokens (`MARConfig.reference`) starts from a shape of the right kind and outline and
learns what to change, the way retrieval-augmented generators (e.g. Phidias, 2024, for 3D) use a
reference model.

Silhouettes come from the preprocessed RGB image itself (the object composited on white, as the
MARs see it), not from its alpha, so that training (whose cache keeps only the RGB) and the app
use one rule. The cost: white parts of an object are background to it.

Re-ranking (pilot RL, checkpoints/README.md): silhouettes say nothing about depth, so among the
`candidates` entries of highest IoU the index can pick by IoU plus a 3D cue, how near each
candidate's LR latents are to those a linear probe reads off the MAR-LR's frozen image features.
The probe is a ridge regression fitted on training entries; the two weights are a least-squares
fit, on other training shapes, of each candidate's 3D occupancy IoU with the true shape.

Two ways to hold the entries' latents (pilot V4, checkpoints/README.md): as int8 tokens per entry,
or, for an index of every view of every training shape, as each shape's surface points stored
once (`EncodedLatents`: int16 positions, octahedral int8 normals) with each view's azimuth, the
few entries a lookup needs encoded by the VAE then, as the cache encodes them (the shape turned
into the view's frame, tokens in anchored order). Tokens of 4 views would take 62 MB; the
surfaces take 25 MB. Masks are stored as bits, zlib-compressed (lossless).

More views make a held-out picture likelier to find a training shape of its kind seen from
nearly its own angle, and with surfaces an entry costs only its mask and azimuth (pilot V16: 16
views of each shape, 48,672 entries, 27.7 MB). In memory the masks stay packed; a lookup compares
every entry at 16², a shortlist at 32², a shorter one at 64².

More shapes pay too (pilot S4: the index of 4 times as many procedural shapes as the models
trained on). A procedural shape is a function of its name (mar3d.shapes is deterministic), so the
index stores only its name and its masks, and a lookup makes the shape it picks again
(`ShapeSurfaces`, about 50 ms); only shapes a clone cannot make (the real meshes' variants) keep
their surface points in the file.
"""

import json
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .render import rotate_to_azimuth
from .token_order import anchor_permutation

REFERENCE_FILE = "reference.safetensors"  # beside the MARs that take a reference
MASK_SIZE = 64   # silhouettes are compared at 64² (4,096 values in [0, 1])
# A lookup narrows the entries down in three passes: every entry at 16², the best FIRST of them
# at 32², the best SHORTLIST of those exactly at MASK_SIZE². Both coarse grids are held as uint8
# pixel counts, a quarter of floats' memory (for pilot S4's 180,928 entries: 46 MB at 16², 185 MB
# at 32²), and the 16² pass turns them into floats CHUNK entries at a time. Measured on that index
# with 553 test and validation queries, the exact 64² pick ranked at worst 602nd at 32² and
# 12,183rd at 16²: within both cuts. One pass at 32² over floats would take 740 MB, over the
# counts made floats 0.4 s a lookup.
COARSE_SIZE = 32
FIRST = 32768
SHORTLIST = 1024
CHUNK = 32768
BATCH_QUERIES = 8  # from this many queries at once (training stages) the 32² pass runs over every entry
WHITE = 245      # a pixel whose darkest channel is at least this is background


def silhouettes(images: torch.Tensor, size: int = MASK_SIZE) -> torch.Tensor:
    """(B, size²) soft silhouettes of images (B, H, W, 3) uint8, or (B, 3, H, W) floats in [0, 1],
    composited on white; H and W must be multiples of `size`."""
    if images.dtype == torch.uint8:
        return pool(images.min(dim=-1).values < WHITE, size)
    return pool(images.min(dim=1).values < WHITE / 255, size)


def pool(dark: torch.Tensor, size: int = MASK_SIZE, chunk: int = 512) -> torch.Tensor:
    """(B, size²): object masks (B, H, W) bool averaged onto a size² grid (`chunk` masks at a time,
    so that a whole cache's worth never exists as floats at full size)."""
    if dark.shape[-1] % size or dark.shape[-2] % size:
        raise ValueError(f"images of {tuple(dark.shape[-2:])} do not pool to {size}²")
    return torch.cat([F.adaptive_avg_pool2d(dark[s: s + chunk, None].float(), size).flatten(1)
                      for s in range(0, len(dark), chunk)])


def silhouette_iou(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Soft IoU (Q, N) of silhouettes (Q, D) against (N, D): Σ q·k / (Σ q + Σ k − Σ q·k)."""
    inter = queries @ keys.T
    union = queries.sum(1, keepdim=True) + keys.sum(1)[None] - inter
    return inter / union.clamp_min(1e-6)


def nearest(queries: torch.Tensor, keys: torch.Tensor, query_groups: torch.Tensor | None = None,
            key_groups: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """Index (Q,) of the key with the highest silhouette IoU for each query. With groups (integer
    ids, e.g. the shape of each render), keys of the query's own group are skipped: a training
    entry's reference is another shape, as it is for an image the model never saw."""
    out = []
    for s in range(0, len(queries), chunk):
        iou = silhouette_iou(queries[s: s + chunk], keys)
        if query_groups is not None:
            iou[query_groups[s: s + chunk, None] == key_groups[None]] = -1.0
        out.append(iou.argmax(1))
    return torch.cat(out)


def fit_probe(features: torch.Tensor, latents: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """Ridge regression (D + 1, C) of latents (N, L, C) on image features (N, L, D), one map shared
    by every index (the last row is the bias); `ridge` is per training row."""
    x = torch.cat([features.flatten(0, 1).float(), features.new_ones(features.shape[0] * features.shape[1], 1)], 1)
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1])
    return torch.linalg.solve(gram, x.T @ latents.flatten(0, 1).float())


def probe_latents(probe: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The probe's latents (B, L, C) for features (B, L, D)."""
    return features.float() @ probe[:-1] + probe[-1]


def rerank_cues(iou: torch.Tensor, predicted: torch.Tensor, lr: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k entries of highest IoU (B, N) per query, (B, k), and their cues (`candidate_cues`)."""
    top = iou.topk(min(k, iou.shape[1]), dim=1).indices  # (B, k)
    return top, candidate_cues(top, iou.gather(1, top), predicted, lr)


def candidate_cues(top: torch.Tensor, iou: torch.Tensor, predicted: torch.Tensor, lr) -> torch.Tensor:
    """Cues (B, k, 2) of candidates `top` (B, k) whose IoU is `iou` (B, k): the IoU and minus the
    mean squared distance of the entry's LR latents (N, L, C) to the predicted ones (B, L, C)."""
    near = -(lr[top].float() - predicted[:, None].float()).pow(2).mean((2, 3))  # (B, k)
    return torch.stack([iou, near], dim=-1)


def fit_rerank_weights(cues: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Least-squares weights (2,) of cues (R, k, 2) for targets (R, k), both centred per query: only
    the order within a query's candidates matters."""
    x = (cues - cues.mean(1, keepdim=True)).flatten(0, 1).double()
    y = (targets - targets.mean(1, keepdim=True)).flatten().double()
    return torch.linalg.lstsq(x, y[:, None]).solution[:, 0].float()


@dataclass(frozen=True)
class SurfaceRecipe:
    """How data preparation made a procedural shape's surface points (scripts/train_demo.py's
    shapes and prepare stages): mar3d.shapes.make_shape at the dataset seed, normalised into the
    vertical cylinder of `extent`, `num_surface` area-weighted samples in FPS order, seeded by
    the shape's name."""

    dataset_seed: int = 0
    extent: float = 1.9
    normalize: str = "cylinder"
    num_surface: int = 4096


PROCEDURAL_NAME = re.compile(r"^([a-z_]+?)_(\d{5})$")  # "<family>_<number>", e.g. "chair_00042"


def procedural_mesh(name: str, recipe: SurfaceRecipe = SurfaceRecipe()):
    """Procedural shape `name` ("<family>_<number>") as data preparation normalised it."""
    from .geometry import normalize_mesh
    from .shapes import make_shape
    from .shapes import shape_seed as dataset_shape_seed

    match = PROCEDURAL_NAME.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a procedural shape's name (<family>_<5 digits>)")
    family, number = match.group(1), int(match.group(2))
    mesh = make_shape(family, dataset_shape_seed(recipe.dataset_seed, family, number))
    return normalize_mesh(mesh, recipe.extent, recipe.normalize)[0]


def procedural_surface(name: str, num_points: int, recipe: SurfaceRecipe = SurfaceRecipe(), mesh=None) -> np.ndarray:
    """The first `num_points` FPS surface points (P, 6) float32 of procedural shape `name`, as data
    preparation made them (of `mesh`, its `procedural_mesh`, when given)."""
    from .geometry import fps_order, sample_surface
    from .prepare import shape_seed

    mesh = procedural_mesh(name, recipe) if mesh is None else mesh
    rng = np.random.default_rng(shape_seed(name))
    surface = sample_surface(mesh, recipe.num_surface, rng)
    return surface[fps_order(surface[:, :3], rng)][:num_points]


def extent(surface) -> torch.Tensor:
    """(…, 3): the extent of surface points (…, P, 6), a fingerprint of a shape."""
    xyz = torch.as_tensor(surface)[..., :3].float()
    return xyz.amax(-2) - xyz.amin(-2)


class ShapeSurfaces:
    """The FPS surface points (P, 6) of an index's shapes, by row: the `stored` ones (S, P, 6) first,
    then the procedural shapes `names`, made again by `procedural_surface` when asked for. The last
    one made is kept (as one immutable pair, so concurrent requests at worst make a shape again):
    a lookup asks for its pick twice, for the LR and for the HR tokens. `extents` (len(names), 3)
    are their points' `extent` when the index was built, for `check`."""

    def __init__(self, stored: torch.Tensor, names: list[str] = (), extents: torch.Tensor | None = None,
                 recipe: SurfaceRecipe = SurfaceRecipe()):
        self.stored, self.names, self.recipe = stored, list(names), recipe
        self._last = (-1, None)  # (row, points) of the procedural shape made last
        self.extents = torch.zeros(len(self.names), 3) if extents is None else extents.float()
        if len(self.extents) != len(self.names):
            raise ValueError(f"{len(self.names)} procedural shapes with {len(self.extents)} extents")

    def __len__(self) -> int:
        return len(self.stored) + len(self.names)

    @property
    def num_points(self) -> int:
        return self.stored.shape[1]

    def __getitem__(self, i) -> torch.Tensor:
        i = int(i)
        if i < len(self.stored):
            return self.stored[i]
        if not len(self.stored) <= i < len(self):
            raise IndexError(f"shape {i} of {len(self)}")
        row, points = self._last
        if row != i:
            points = torch.from_numpy(procedural_surface(self.names[i - len(self.stored)], self.num_points, self.recipe))
            self._last = (i, points)
        return points

    def check(self, rows: list[int]) -> float:
        """The largest difference between the extents of procedural shapes `rows` (0-based among
        the procedural ones) made now and when the index was built: near 0 unless the generator
        changed since."""
        made = (procedural_surface(self.names[r], self.num_points, self.recipe) for r in rows)
        return max((float((extent(m) - self.extents[r]).abs().max()) for m, r in zip(made, rows)), default=0.0)


class EncodedLatents:
    """Stands in for an index's latents (N, L, C): entry i is shape `shape_ids[i]`'s surface
    (S, P, 6) turned into the frame of a camera at `azimuths[i]`, encoded by `vae` (`tokens` "lr" or
    "hr"; posterior means) and put in anchored order by `anchors` (L, 3) (None: as the VAE emits
    them). Indexing with any integer tensor encodes the entries it names, each once; nothing is
    kept between calls (no state shared by the app's concurrent requests)."""

    def __init__(self, vae, tokens: str, surfaces, shape_ids: torch.Tensor, azimuths: torch.Tensor,
                 anchors: np.ndarray | None = None):
        surfaces = surfaces if isinstance(surfaces, ShapeSurfaces) else ShapeSurfaces(surfaces)
        if len(shape_ids) != len(azimuths) or len(shape_ids) == 0 or int(shape_ids.max()) >= len(surfaces):
            raise ValueError(f"{len(shape_ids)} entries with {len(azimuths)} azimuths over {len(surfaces)} surfaces")
        self.vae, self.tokens, self.surfaces = vae, tokens, surfaces
        self.shape_ids, self.azimuths, self.anchors = shape_ids.long(), azimuths.float(), anchors

    def __len__(self) -> int:
        return len(self.shape_ids)

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self), self.vae.cfg.num_tokens(self.tokens), self.vae.cfg.latent_dim

    def surface(self, i: int) -> np.ndarray:
        """Entry i's surface points (P, 6) float32 in its view's frame, in FPS order."""
        return rotate_to_azimuth(self.surfaces[self.shape_ids[i]].float().numpy(), float(self.azimuths[i]))

    @torch.no_grad()
    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long)
        wanted, encoded = list(dict.fromkeys(idx.flatten().tolist())), {}
        device = next(self.vae.parameters()).device
        for s in range(0, len(wanted), 64):
            chunk = wanted[s: s + 64]
            surface = torch.from_numpy(np.stack([self.surface(i) for i in chunk]))
            latents = self.vae.encode(surface.to(device), self.tokens).float().cpu()
            if self.anchors is not None:
                M = latents.shape[1]
                perm = torch.from_numpy(anchor_permutation(surface[:, :M, :3].numpy(), self.anchors))
                latents = torch.take_along_dim(latents, perm[..., None], dim=1)
            encoded.update(zip(chunk, latents))
        return torch.stack([encoded[i] for i in idx.flatten().tolist()]).view(*idx.shape, *self.shape[1:])


def _sign(v: torch.Tensor) -> torch.Tensor:
    """±1 with sign(0) = +1, as the octahedral map needs."""
    return torch.where(v >= 0, 1.0, -1.0)


def octahedral(normals: torch.Tensor) -> torch.Tensor:
    """Unit normals (..., 3) → (..., 2) int8, the octahedral map (about 1° of error at 8 bits)."""
    n = normals / normals.abs().sum(-1, keepdim=True).clamp_min(1e-12)
    x, y, z = n.unbind(-1)
    folded = torch.stack([(1 - y.abs()) * _sign(x), (1 - x.abs()) * _sign(y)], -1)
    uv = torch.where((z < 0)[..., None], folded, torch.stack([x, y], -1))
    return (uv * 127).round().clamp(-127, 127).to(torch.int8)


def from_octahedral(uv: torch.Tensor) -> torch.Tensor:
    """(..., 2) int8 of `octahedral` → unit normals (..., 3) float32."""
    uv = uv.float() / 127
    x, y = uv.unbind(-1)
    z = 1 - x.abs() - y.abs()
    fx, fy = (1 - y.abs()) * _sign(x), (1 - x.abs()) * _sign(y)
    n = torch.stack([torch.where(z < 0, fx, x), torch.where(z < 0, fy, y), z], -1)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ReferenceIndex:
    """Training renders' object masks (N, H, W) bool and the VAE latents of their shapes in each
    render's frame: LR (N, L_lr, C) and HR (N, L_hr, C). With a `probe` (D + 1, C_lr) on the MAR-LR's
    image features and `weights` (2,), `lookup` re-ranks the top `candidates` by IoU (module docstring).
    The masks are held as packed bits, plus COARSE_SIZE² and (COARSE_SIZE / 2)² pixel counts for the
    lookup's first passes."""

    def __init__(self, dark: torch.Tensor, lr, hr, probe: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None, candidates: int = 6):
        self._hold(np.packbits(dark.numpy().reshape(len(dark), -1), axis=1), tuple(dark.shape[1:]), lr, hr,
                   probe, weights, candidates)

    @classmethod
    def from_bits(cls, bits: np.ndarray, mask_shape: tuple[int, int], lr, hr, **rerank) -> "ReferenceIndex":
        """The index of masks packed row-major as bits (N, H·W/8) uint8, never unpacked all at once."""
        index = cls.__new__(cls)
        index._hold(bits, tuple(mask_shape), lr, hr, **rerank)
        return index

    def _hold(self, bits, mask_shape, lr, hr, probe=None, weights=None, candidates=6, chunk: int = 4096):
        if not (len(bits) == len(lr) == len(hr)) or len(bits) == 0:
            raise ValueError(f"a reference index needs as many masks as latents, and some: "
                             f"{len(bits)} / {len(lr)} / {len(hr)}")
        if (probe is None) != (weights is None):
            raise ValueError("a re-ranking index needs both its probe and its weights")
        self.lr, self.hr, self.probe, self.weights, self.candidates = lr, hr, probe, weights, candidates
        self.bits, self.mask_shape = bits, mask_shape  # (N, H·W/8) uint8
        self._cell = mask_shape[0] * mask_shape[1] // COARSE_SIZE**2  # mask pixels in a coarse cell
        self.coarse = torch.empty(len(bits), COARSE_SIZE**2, dtype=torch.uint8)      # pixel counts
        self.first = torch.empty(len(bits), COARSE_SIZE**2 // 4, dtype=torch.uint8)  # at (COARSE_SIZE / 2)²
        for s in range(0, len(bits), chunk):
            pooled = pool(self.masks_of(torch.arange(s, min(s + chunk, len(bits)))), COARSE_SIZE)
            self.coarse[s: s + chunk] = (pooled * self._cell).round()
            quarter = F.avg_pool2d(pooled.view(-1, 1, COARSE_SIZE, COARSE_SIZE), 2).flatten(1)
            self.first[s: s + chunk] = (quarter * 4 * self._cell).round()

    def __len__(self) -> int:
        return len(self.bits)

    @property
    def reranks(self) -> bool:
        return self.probe is not None

    @property
    def dark(self) -> torch.Tensor:
        """The masks (N, H, W) bool, unpacked."""
        return self.masks_of(torch.arange(len(self)))

    def masks_of(self, idx: torch.Tensor) -> torch.Tensor:
        """The masks (*idx.shape, H, W) bool of entries `idx`."""
        h, w = self.mask_shape
        flat = np.unpackbits(self.bits[idx.flatten().numpy()], axis=1, count=h * w)
        return torch.from_numpy(flat.astype(bool)).view(*idx.shape, h, w)

    def exact_iou(self, queries: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """Exact IoU (Q, N) of query silhouettes (Q, MASK_SIZE²) with every entry (training stages)."""
        return torch.cat([silhouette_iou(queries, pool(self.masks_of(torch.arange(s, min(s + chunk, len(self))))))
                          for s in range(0, len(self), chunk)], 1)

    def shortlist_iou(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k entries (Q, k) of highest silhouette IoU with each query (Q, MASK_SIZE²), best first,
        and their IoU (Q, k): FIRST by IoU at (COARSE_SIZE / 2)², SHORTLIST of them at COARSE_SIZE²,
        then exact at MASK_SIZE² (the later passes a query at a time: FIRST entries at 32² are
        134 MB of floats; from BATCH_QUERIES queries on, the 32² pass runs over every entry for all
        of them at once, `_shortlists`)."""
        small = F.adaptive_avg_pool2d(queries.view(-1, 1, MASK_SIZE, MASK_SIZE), COARSE_SIZE)  # (Q, 1, C, C)
        quarter = F.avg_pool2d(small, 2).flatten(1)
        firsts = torch.cat([silhouette_iou(quarter, self.first[s: s + CHUNK].float() / (4 * self._cell))
                            for s in range(0, len(self), CHUNK)], 1)
        firsts = firsts.topk(min(FIRST, len(self)), dim=1).indices                   # (Q, F)
        shorts = (self._shortlists(small.flatten(1), firsts) if len(queries) >= BATCH_QUERIES else
                  [first[self._coarse_iou(q32, first).topk(min(SHORTLIST, len(first))).indices]
                   for q32, first in zip(small.flatten(1), firsts)])
        tops, ious = [], []
        for query, short in zip(queries, shorts):
            masks = self.masks_of(short)
            keys = masks.flatten(1).float() if self.mask_shape == (MASK_SIZE, MASK_SIZE) else pool(masks)  # (S, D)
            inter = keys @ query
            iou = inter / (query.sum() + keys.sum(-1) - inter).clamp_min(1e-6)
            best = iou.topk(min(k, len(iou)))
            tops.append(short[best.indices])
            ious.append(best.values)
        return torch.stack(tops), torch.stack(ious)

    def _coarse_iou(self, q32: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """IoU (F,) at COARSE_SIZE² of one query (C²,) with entries `first` (F,)."""
        keys = self.coarse[first].float() / self._cell                                 # (F, C²)
        inter = keys @ q32
        return inter / (q32.sum() + keys.sum(-1) - inter).clamp_min(1e-6)

    def _shortlists(self, q32: torch.Tensor, firsts: torch.Tensor) -> torch.Tensor:
        """The SHORTLIST (Q, S) of many queries at once: the 32² pass over every entry, CHUNK at a
        time (each count made float once for all the queries, not once a query), then each query's
        FIRST entries taken in their order. The same IoUs, bit for bit, as a query at a time (sums
        of quarter-pixel values are exact in float32), so the same shortlists; training stages only
        (BATCH_QUERIES): (Q, N) floats."""
        iou = torch.empty(len(q32), len(self))
        total = q32.sum(1, keepdim=True)
        for s in range(0, len(self), CHUNK):
            keys = self.coarse[s: s + CHUNK].float() / self._cell
            inter = q32 @ keys.T
            iou[:, s: s + CHUNK] = inter / (total + keys.sum(1) - inter).clamp_min(1e-6)
        iou = iou.gather(1, firsts)                                                     # (Q, F), FIRST order
        return firsts.gather(1, iou.topk(min(SHORTLIST, firsts.shape[1]), dim=1).indices)

    def nearest_other(self, queries: torch.Tensor, own: torch.Tensor, groups: torch.Tensor, k: int = 96) -> torch.Tensor:
        """For each query silhouette (Q, MASK_SIZE²), the entry (Q,) of highest IoU whose group
        (`groups` (N,), e.g. each entry's shape) is not the query's `own` (Q,): a training entry's
        reference is another shape, as it is for a picture the model never saw. Searched among the
        k best entries of `shortlist_iou`: k must exceed the entries a group has."""
        top = self.shortlist_iou(queries, k)[0]
        other = groups[top] != own[:, None]
        if not other.any(1).all():
            raise ValueError(f"a query's {k} nearest entries are all of its own group: ask for more")
        return top.gather(1, other.byte().argmax(1, keepdim=True))[:, 0]

    def lookup(self, pixels: torch.Tensor, features: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For condition images (B, 3, H, W) in [0, 1]: the chosen entries' LR and HR latents
        (float32) and their indices. The nearest silhouette, or, given the MAR-LR's image
        `features` (B, L_lr, D) and an index that re-ranks, the best of its candidates."""
        queries = silhouettes(pixels.cpu())
        if features is None or not self.reranks:
            idx = self.shortlist_iou(queries, 1)[0][:, 0]
        else:
            if features.shape[1:] != (self.lr.shape[1], self.probe.shape[0] - 1):
                raise ValueError(f"this index's probe reads ({self.lr.shape[1]}, {self.probe.shape[0] - 1}) "
                                 f"image features, got {tuple(features.shape[1:])}: another image encoder's")
            top, iou = self.shortlist_iou(queries, self.candidates)
            cues = candidate_cues(top, iou, probe_latents(self.probe, features.cpu()), self.lr)
            idx = top.gather(1, (cues @ self.weights).argmax(1, keepdim=True))[:, 0]
        return self.lr[idx].float().to(pixels.device), self.hr[idx].float().to(pixels.device), idx

    def save(self, path: str | Path) -> None:
        """Masks as bits, zlib-compressed (lossless; 64² silhouettes shrink about 10×). Latents as
        int8 with one scale per channel (an error of at most half a step, about 1 % of a channel's
        range: far below the VAE's own token noise), or, for `EncodedLatents`, the surfaces:
        positions as int16 (|x| ≤ 1), normals octahedral int8."""
        tensors = {"dark_zlib": torch.from_numpy(np.frombuffer(zlib.compress(self.bits.tobytes(), 9), np.uint8).copy()),
                   "dark_shape": torch.tensor([len(self), *self.mask_shape])}
        if isinstance(self.lr, EncodedLatents):
            lr, hr = self.lr, self.hr
            stored = lr.surfaces.stored
            if stored.float().abs()[..., :3].max() > 1:
                raise ValueError("surface positions must lie in [-1, 1] to be stored as int16")
            tensors |= {"xyz": (stored[..., :3].float() * 32767).round().to(torch.int16).contiguous(),
                        "normals": octahedral(stored[..., 3:].float()).contiguous(),
                        "shape_ids": lr.shape_ids.int(), "azimuths": lr.azimuths.float()}
            if lr.surfaces.names:  # procedural shapes: their names (utf-8 json), extents and recipe
                meta = json.dumps({"names": lr.surfaces.names, "recipe": asdict(lr.surfaces.recipe)})
                tensors |= {"procedural": torch.frombuffer(bytearray(meta.encode()), dtype=torch.uint8),
                            "procedural_extents": lr.surfaces.extents.float().contiguous()}
            for key, latents in (("lr", lr), ("hr", hr)):
                if latents.anchors is not None:
                    tensors[f"{key}_anchors"] = torch.from_numpy(np.asarray(latents.anchors, dtype=np.float64))
        else:
            for key in ("lr", "hr"):
                tensors[key], tensors[f"{key}_scale"] = quantize(getattr(self, key).float())
        if self.reranks:
            tensors |= {"probe": self.probe.float().contiguous(), "weights": self.weights.float(),
                        "candidates": torch.tensor(self.candidates)}
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: str | Path, vae=None) -> "ReferenceIndex":
        """The index saved at `path`; one that stores surfaces needs the `vae` that encodes them."""
        t = load_file(str(path))
        n, h, w = t["dark_shape"].tolist()
        bits = (np.frombuffer(zlib.decompress(t["dark_zlib"].numpy().tobytes()), np.uint8).reshape(n, -1)
                if "dark_zlib" in t else t["dark"].numpy())  # files before stop 26: the bits as they are
        rerank = {"probe": t["probe"], "weights": t["weights"], "candidates": int(t["candidates"])} if "probe" in t else {}
        if "xyz" not in t:
            return cls.from_bits(bits, (h, w), *(dequantize(t[key], t[f"{key}_scale"]) for key in ("lr", "hr")),
                                 **rerank)
        if vae is None:
            raise ValueError(f"{path} stores surfaces, not latents: load it with the VAE that encodes them")
        surfaces = ShapeSurfaces(torch.cat([t["xyz"].float() / 32767, from_octahedral(t["normals"])], -1))
        if "procedural" in t:
            meta = json.loads(t["procedural"].numpy().tobytes().decode())
            surfaces = ShapeSurfaces(surfaces.stored, meta["names"], t["procedural_extents"],
                                     SurfaceRecipe(**meta["recipe"]))
        lr, hr = (EncodedLatents(vae, key, surfaces, t["shape_ids"], t["azimuths"],
                                 t[f"{key}_anchors"].numpy() if f"{key}_anchors" in t else None)
                  for key in ("lr", "hr"))
        return cls.from_bits(bits, (h, w), lr, hr, **rerank)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., C) → int8 values and a per-channel scale (C,) with x ≈ values · scale."""
    scale = x.flatten(0, -2).abs().amax(0).clamp_min(1e-8) / 127
    return (x / scale).round().clamp(-127, 127).to(torch.int8), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (values.float() * scale).half()


def build_index(images: torch.Tensor, lr: torch.Tensor, hr: torch.Tensor) -> ReferenceIndex:
    """The index of renders (N, H, W, 3) uint8 and their shapes' latents (N, L, C) in each view's frame."""
    return ReferenceIndex(images.min(dim=-1).values < WHITE, lr.half(), hr.half())
