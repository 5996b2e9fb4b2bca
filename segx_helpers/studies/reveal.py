"""From *where* to *what* (notebook 08): what lies off the clinical region in the predictions SegU marks least
certain, grouped into the strategies the classifier uses, named with the ground truth a dataset has, and turned
into a fix of exactly that.

SegU says *where* an explanation sits (off the region); it never says *what* is there. The steps, after
SpRAy (Lapuschkin et al. 2019: spectral clustering of attribution maps), CRP (Achtibat et al. 2023: the concepts
a heatmap is made of) and Reveal to Revise (Pahde et al. 2023):

1. **Collect** (:func:`collect_off_region`): the ``share`` of predictions with the lowest SegU score, each
   prediction's map outside the predicted mask (``map × (1 − mask)``) and that off-region map's top ``p`` %
   pixels, where the model looked off the region.
2. **Describe**: *where* (:func:`where_descriptors`: the off-region map downsampled to a small grid, as SpRAy
   clusters maps) and *what* (:func:`what_descriptors`: the classifier's own features at one layer, pooled over
   the off-region top pixels, a light form of CRP's concept relevance).
3. **Cluster** (:func:`cluster_descriptors`) with scikit-learn: k-means on *what*, the number of clusters by the
   silhouette score; spectral clustering on *where*, the number by the eigengap of the graph Laplacian.
4. **Name** the clusters with what the data knows, never used before this step: per-pixel artefact maps
   (:func:`artefact_hits`, the synthetic sets: does the off-region top come within a quarter of a Grad-CAM cell of
   the patch, a ruler, hair, a dark corner?), image-level flags (:func:`flag_auroc`, the ISIC 2018 trap sets: the AUROC of cluster membership for
   each artefact against a random-cluster baseline) and counterfactual twins (the shortcut-driven share).
5. **Revise** (:func:`concept_regions`): the cluster least like ordinary skin (:func:`concept_cluster`) becomes a
   detector on the classifier's features (:func:`concept_detector`); where it fires in each training image, grown by
   a cell, is the region the classifier is then trained against, with no artefact label used
   (:class:`segx_helpers.studies.mask_training.MaskFix` ``"region"``).

:func:`reveal_study` runs steps 1 to 4 on a :class:`~segx_helpers.workflows.results.Results` (or its folder)
and a dataset, with whichever ground truth the dataset has.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import ndimage
from scipy.sparse.csgraph import laplacian
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.metrics import silhouette_score
from sklearn.neighbors import kneighbors_graph
from torch import nn

from segx_helpers.data.format import LoadedDataset
from segx_helpers.data.synthetic import artefact_masks, shortcut_pairs
from segx_helpers.models.checkpoints import TrainedModel, split_tensors
from segx_helpers.models.networks import feature_grid, find_target_layer, previous_block
from segx_helpers.scores.saliency import top_percent
from segx_helpers.studies.artefacts import artefact_columns, artefact_table
from segx_helpers.studies.shortcut import shortcut_driven
from segx_helpers.workflows.results import Results, load_results, load_split_arrays
from segx_helpers.workflows.settings import TutorialPaths

PIXEL_ARTEFACTS = ("patch", "ruler", "hair", "vignette")
"""The artefacts of synthetic-derm whose per-pixel maps name the clusters (``artefacts/<id>.png``)."""


@dataclass(frozen=True)
class RevealOptions:
    """How :func:`reveal_study` collects, describes and clusters.

    ``share``: the share of predictions with the lowest ``score`` collected (0.5: the less certain half by
    SegU); ``p``: the off-region top ``p`` % pixels are where the model looked off the region (5, as the paper's
    saliency map); ``layer``: the classifier module whose features describe *what* (a name for
    ``model.get_submodule``, e.g. ``"layer3"``; None: :func:`classifier_layer`'s default); ``grid``: the *where*
    descriptor's size (``grid`` × ``grid`` cells); ``max_clusters``: the largest number of clusters tried (from 2);
    ``seed``: k-means and spectral clustering's seed; ``tolerance_px``: how near its off-region top must come to an
    artefact for a prediction to count as looking at it, in pixels of the maps (None: a quarter of a Grad-CAM cell of
    the classifier's last block, 8 px at 128 px with a 4 × 4 grid: notebook 05's nearest distance bin, below what
    such a map can resolve).
    """

    share: float = 0.5
    score: str = "c_IoU"
    p: float = 5.0
    layer: str | None = None
    grid: int = 8
    max_clusters: int = 6
    seed: int = 0
    tolerance_px: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share must lie in (0, 1], got {self.share}")
        if not 0.0 < self.p <= 100.0:
            raise ValueError(f"p must lie in (0, 100], got {self.p}")
        if self.grid < 1 or self.max_clusters < 2:
            raise ValueError(f"grid must be >= 1 and max_clusters >= 2, got {self.grid} and {self.max_clusters}")


# ------------------------------------------------------------------------------ 1. collect

@dataclass
class OffRegion:
    """The collected predictions: ``rows`` (their results rows, lowest score first), ``off`` ``(M, H, W)`` each
    one's map outside its predicted mask and ``top`` bool ``(M, H, W)`` that off-region map's top pixels."""

    rows: pd.DataFrame
    off: np.ndarray
    top: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def off_region_maps(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``maps`` ``(M, H, W)`` times ``1 − masks`` (bool ``(M, H, W)``, the predicted region of each map's image):
    the part of each explanation outside the region."""
    maps, masks = np.asarray(maps, dtype=np.float32), np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must have the same shape (one mask per map)")
    return np.where(masks, 0.0, maps).astype(np.float32)


def lowest(table: pd.DataFrame, score: str, share: float) -> np.ndarray:
    """Positions of the ``share`` of ``table``'s rows with the lowest ``score`` (at least one row), lowest first
    (stable: ties keep the table's order). ``KeyError`` naming the column when ``table`` lacks it."""
    if score not in table:
        raise KeyError(f"the results table has no {score!r} column; it has {sorted(table.columns)}")
    n = max(1, int(round(share * len(table))))
    return np.argsort(table[score].to_numpy(dtype=float), kind="stable")[:n]


def collect_off_region(results: Results, masks: np.ndarray, options: RevealOptions = RevealOptions()) -> OffRegion:
    """The ``options.share`` of ``results``' predictions with the lowest ``options.score``, with their off-region
    maps and those maps' top ``options.p`` % pixels. ``masks``: the predicted masks, bool ``(N, H, W)`` per image
    of the split (``results.table["image_index"]`` indexes them)."""
    picked = results.select(lowest(results.table, options.score, options.share))
    masks = np.asarray(masks, dtype=bool)
    off = off_region_maps(picked.maps, masks[picked.table["image_index"].to_numpy()])
    return OffRegion(picked.table, off, top_percent(off, options.p))


# ------------------------------------------------------------------------------ 2. describe

def _pool(maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Area-average ``maps`` ``(M, H, W)`` down to ``grid`` ``(h, w)``: ``(M, h, w)`` float32."""
    tensor = torch.as_tensor(np.asarray(maps, dtype=np.float32))[:, None]
    return nn.functional.adaptive_avg_pool2d(tensor, grid)[:, 0].numpy()


def where_descriptors(off: np.ndarray, grid: int = 8) -> np.ndarray:
    """*Where*: each off-region map ``(M, H, W)`` averaged down to ``grid`` × ``grid`` cells and divided by its
    largest cell (a map without attribution stays zero), flattened: ``(M, grid * grid)``."""
    pooled = _pool(off, (grid, grid)).reshape(len(off), -1)
    peak = pooled.max(axis=1, keepdims=True) if len(pooled) else np.ones((0, 1), np.float32)
    return np.where(peak > 0, pooled / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def classifier_layer(model: nn.Module, layer: str | None = None) -> nn.Module:
    """The module named ``layer`` (``model.get_submodule``). None: a ResNet's second block (``layer2``: 16 × 16 cells
    of 8 px at 128 px, fine enough to outline a small artefact), any other model's block before the last
    (:func:`~segx_helpers.models.networks.previous_block`). A bad name is a ``ValueError`` listing the model's
    top-level modules."""
    if layer is None:
        second = getattr(model, "layer2", None)
        return second[-1] if isinstance(second, nn.Sequential) else previous_block(model)
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [name for name, _ in model.named_children()]
        raise ValueError(f"the classifier has no module {layer!r}; its top-level modules are {names}") from None


def feature_maps(model: nn.Module, images: torch.Tensor, layer: nn.Module, batch_size: int = 64) -> np.ndarray:
    """``layer``'s output for ``images`` ``(N, C, H, W)`` in eval mode without gradients: ``(N, K, h, w)`` float32
    (K channels on the layer's grid). The model's training mode is restored."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output.detach().float().cpu()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size].to(device))
    finally:
        handle.remove()
        model.train(was_training)
    if captured and captured[0].ndim != 4:
        raise ValueError(f"{type(layer).__name__} outputs shape {tuple(captured[0].shape)}, not (B, K, h, w)")
    return torch.cat(captured).numpy() if captured else np.zeros((0, 0, 0, 0), np.float32)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row of ``vectors`` ``(M, K)`` scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def what_descriptors(features: np.ndarray, top: np.ndarray, image_index: np.ndarray) -> np.ndarray:
    """*What*: the classifier's features ``(N, K, h, w)`` (:func:`feature_maps`, one per image) averaged over the
    cells the off-region top pixels ``top`` (bool ``(M, H, W)``, one per prediction) cover, weighted by the share
    of each cell they fill, then scaled to unit length: ``(M, K)``. A prediction without off-region top pixels gets
    its image's mean feature."""
    weights = _pool(np.asarray(top, dtype=np.float32), features.shape[2:])
    weights = np.where(weights.sum(axis=(1, 2), keepdims=True) > 0, weights, 1.0)
    chosen = features[np.asarray(image_index, dtype=np.int64)]
    pooled = np.einsum("mkhw,mhw->mk", chosen, weights) / weights.sum(axis=(1, 2))[:, None]
    return unit_rows(pooled)


def peak_crops(images: np.ndarray, off: np.ndarray, image_index: np.ndarray, size: int = 40) -> np.ndarray:
    """What each prediction looked at, for the eye: the ``size`` × ``size`` crop of its image (``images``
    ``(N, H, W, C)``, indexed by ``image_index``) centred on its off-region map's peak (``off`` ``(M, H, W)``),
    moved inside the image at the borders: ``(M, size, size, C)``."""
    images = np.asarray(images)
    height, width = images.shape[1:3]
    size = min(size, height, width)
    crops = []
    for k, image in enumerate(images[np.asarray(image_index, dtype=np.int64)]):
        y, x = np.unravel_index(int(np.argmax(off[k])), off[k].shape)
        top = int(np.clip(y * height // off.shape[1] - size // 2, 0, height - size))
        left = int(np.clip(x * width // off.shape[2] - size // 2, 0, width - size))
        crops.append(image[top:top + size, left:left + size])
    return np.stack(crops) if crops else np.zeros((0, size, size) + images.shape[3:], images.dtype)


# ------------------------------------------------------------------------------ 3. cluster

@dataclass
class Clustering:
    """Cluster labels ``(M,)`` (0 .. k − 1), the number of clusters ``k``, the ``criterion`` per candidate k
    (columns ``k`` and the criterion's name) and how they were made (``method``, ``criterion_name``)."""

    labels: np.ndarray
    k: int
    criterion: pd.DataFrame
    method: str
    criterion_name: str


def eigengaps(descriptors: np.ndarray, max_clusters: int, n_neighbours: int = 10) -> pd.DataFrame:
    """SpRAy's choice of k: the smallest eigenvalues of the normalised Laplacian of the symmetric k-nearest-neighbour
    graph of ``descriptors`` ``(M, D)``; the gap after the k-th eigenvalue, for k = 2 .. ``max_clusters`` (a large gap
    after k means k well-separated groups). Columns ``k``, ``eigenvalue`` (the k-th), ``eigengap``."""
    neighbours = min(n_neighbours, len(descriptors) - 1)
    graph = kneighbors_graph(descriptors, neighbours, include_self=False)
    graph = 0.5 * (graph + graph.T)
    values = np.sort(np.linalg.eigvalsh(laplacian(graph.toarray(), normed=True)))[:max_clusters + 1]
    ks = np.arange(2, min(max_clusters, len(values) - 1) + 1)
    return pd.DataFrame({"k": ks, "eigenvalue": values[ks - 1], "eigengap": values[ks] - values[ks - 1]})


def silhouettes(descriptors: np.ndarray, max_clusters: int, seed: int = 0) -> pd.DataFrame:
    """The mean silhouette score of k-means with k = 2 .. ``max_clusters`` clusters on ``descriptors`` ``(M, D)``
    (higher: tighter, better separated clusters). Columns ``k``, ``silhouette``."""
    ks = np.arange(2, min(max_clusters, len(descriptors) - 1) + 1)
    scores = [silhouette_score(descriptors, _kmeans(descriptors, int(k), seed)) for k in ks]
    return pd.DataFrame({"k": ks, "silhouette": scores})


def _kmeans(descriptors: np.ndarray, k: int, seed: int) -> np.ndarray:
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(descriptors)


def cluster_descriptors(descriptors: np.ndarray, method: str = "kmeans", k: int | None = None,
                        max_clusters: int = 6, seed: int = 0) -> Clustering:
    """Cluster ``descriptors`` ``(M, D)``: ``method="kmeans"`` (for *what*; k by the highest :func:`silhouettes`) or
    ``"spectral"`` (SpRAy, for *where*: scikit-learn's spectral clustering on the k-nearest-neighbour graph; k by the
    largest :func:`eigengaps`). ``k`` fixes the number instead. Needs at least 3 rows (else ``ValueError``)."""
    descriptors = np.asarray(descriptors, dtype=np.float32)
    if len(descriptors) < 3:
        raise ValueError(f"clustering needs at least 3 collected predictions, got {len(descriptors)}: raise share")
    if method == "kmeans":
        criterion, name = silhouettes(descriptors, max_clusters, seed), "silhouette"
    elif method == "spectral":
        criterion, name = eigengaps(descriptors, max_clusters), "eigengap"
    else:
        raise ValueError(f"method must be 'kmeans' or 'spectral', got {method!r}")
    chosen = int(k) if k is not None else int(criterion.loc[criterion[name].idxmax(), "k"])
    if method == "kmeans":
        labels = _kmeans(descriptors, chosen, seed)
    else:
        labels = SpectralClustering(n_clusters=chosen, affinity="nearest_neighbors",
                                    n_neighbors=min(10, len(descriptors) - 1), random_state=seed).fit_predict(descriptors)
    return Clustering(np.asarray(labels), chosen, criterion, method, name)


def centroids(descriptors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each cluster's mean descriptor scaled to unit length, ``(k, D)`` (row c: cluster c)."""
    labels = np.asarray(labels)
    return unit_rows(np.stack([descriptors[labels == c].mean(axis=0) for c in range(labels.max() + 1)]))


# ------------------------------------------------------------------------------ 4. name: the ground truth a dataset has

def artefact_hits(top: np.ndarray, artefacts: dict[str, np.ndarray], tolerance_px: float = 0.0) -> pd.DataFrame:
    """Does each prediction's off-region top (bool ``(M, H, W)``) come within ``tolerance_px`` of each artefact (0:
    touch it)? ``artefacts``: kind -> bool ``(M, H, W)`` (the artefact's pixels in each prediction's image, at the
    maps' size). One bool column per kind."""
    top = np.asarray(top, bool)
    out = {}
    for kind, where in artefacts.items():
        where = np.asarray(where, bool)
        if tolerance_px > 0:
            where = np.stack([ndimage.distance_transform_edt(~w) <= tolerance_px if w.any() else w for w in where])
        out[kind] = (top & where).any(axis=(1, 2))
    return pd.DataFrame(out)


def pixel_artefacts(data: LoadedDataset, image_ids, size: int, kinds=PIXEL_ARTEFACTS) -> dict[str, np.ndarray] | None:
    """The per-pixel maps of ``kinds`` for ``image_ids`` at ``size`` × ``size`` (nearest), kind -> bool
    ``(M, size, size)``; None for a dataset without artefact maps (real data)."""
    bits = (data.info.generator or {}).get("artefact_bits", [])
    if not (data.root / "artefacts").is_dir() or not bits:
        return None
    out = {}
    for kind in [k for k in kinds if k in bits]:
        maps = artefact_masks(data.root, list(image_ids), [kind])
        if maps.shape[1:] != (size, size):
            maps = np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) for m in maps])
        out[kind] = maps
    return out


def image_flags(data: LoadedDataset, image_ids) -> pd.DataFrame | None:
    """The image-level 0/1 artefact flags of ``artefacts.csv`` (every column holding only 0/1 or booleans) for
    ``image_ids``, as bool columns in that order; None when the dataset has no such column."""
    if not artefact_columns(data.root):
        return None
    table = artefact_table(data).set_index("image_id")
    columns = [c for c in artefact_columns(data.root)
               if table[c].dropna().isin([0, 1, True, False]).all() and table[c].notna().any()]
    if not columns:
        return None
    return table.loc[list(image_ids), columns].fillna(0).astype(bool).reset_index(drop=True)


def cluster_table(rows: pd.DataFrame, labels: np.ndarray, hits: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per cluster: ``cluster``, ``size``, ``shortcut-driven share`` (when ``rows`` has ``shortcut_driven``),
    ``mean confidence``, ``predicted`` (the most frequent predicted class and its share), and per artefact column of
    ``hits`` (bool, one row per collected prediction) the share of members whose off-region top touches it."""
    labels = np.asarray(labels)
    out = []
    for c in range(labels.max() + 1):
        inside = labels == c
        members = rows[inside]
        counts = members["class"].value_counts()
        entry = {"cluster": c, "size": int(inside.sum())}
        if "shortcut_driven" in rows:
            entry["shortcut-driven share"] = float(members["shortcut_driven"].mean())
        entry["mean confidence"] = float(members["confidence"].mean())
        entry["predicted"] = f"{counts.index[0]} ({counts.iloc[0] / len(members):.0%})" if len(members) else ""
        if hits is not None:
            for kind in hits:
                entry[f"on {kind}"] = float(hits[kind].to_numpy()[inside].mean())
        out.append(entry)
    return pd.DataFrame(out)


def best_match(labels: np.ndarray, hit: np.ndarray) -> dict:
    """The cluster that best matches the predictions that ``hit`` marks (bool ``(M,)``, e.g. off-region top on the
    patch): the highest F1 of purity (share of its members that hit) and recall (share of the hits inside it).
    ``{"cluster", "size", "purity", "recall", "f1"}``; NaN purity and recall without any hit."""
    labels, hit = np.asarray(labels), np.asarray(hit, dtype=bool)
    best = {"cluster": -1, "size": 0, "purity": float("nan"), "recall": float("nan"), "f1": float("nan")}
    if not hit.any():
        return best
    for c in range(labels.max() + 1):
        inside = labels == c
        purity, recall = float(hit[inside].mean()), float((hit & inside).sum() / hit.sum())
        f1 = 2 * purity * recall / (purity + recall) if purity + recall > 0 else 0.0
        if not f1 <= best["f1"]:  # the first cluster, or a better one
            best = {"cluster": c, "size": int(inside.sum()), "purity": purity, "recall": recall, "f1": f1}
    return best


def flag_auroc(labels: np.ndarray, flags: pd.DataFrame, n_random: int = 200, seed: int = 0,
               predicted: np.ndarray | None = None) -> pd.DataFrame:
    """For each artefact flag (bool columns of ``flags``, one row per collected prediction): the AUROC of membership
    in the cluster that best separates images with the artefact from those without (the best over clusters),
    next to the same best-of-clusters AUROC for random clusters of the same sizes (``n_random`` shuffles of the
    labels: their mean and 95th percentile). Columns: ``artefact``, ``with``, ``without``, ``cluster``, ``AUROC``,
    ``random AUROC``, ``random 95th``, ``above random`` (AUROC above the random 95th percentile). NaN where the
    artefact is always or never present among the collected predictions.

    ``predicted`` (the predicted class of each collected prediction) adds the baseline a classifier that learnt the
    artefact already offers: ``predicted class AUROC``, the same best-membership AUROC with the predicted classes as
    the clusters, and ``beyond predicted class`` (the clusters' AUROC above it)."""
    labels = np.asarray(labels)
    classes = None if predicted is None else pd.factorize(np.asarray(predicted))[0]
    rng = np.random.default_rng(seed)
    shuffles = [rng.permutation(labels) for _ in range(n_random)]
    rows = []
    for artefact in flags:
        present = flags[artefact].to_numpy(dtype=bool)
        row = {"artefact": artefact, "with": int(present.sum()), "without": int((~present).sum()),
               "cluster": -1, "AUROC": float("nan"), "random AUROC": float("nan"), "random 95th": float("nan")}
        if 0 < present.sum() < len(present):
            scores = [_best_membership_auroc(labels, present)]
            row["cluster"], row["AUROC"] = scores[0]
            random = np.array([_best_membership_auroc(s, present)[1] for s in shuffles])
            row["random AUROC"], row["random 95th"] = float(random.mean()), float(np.percentile(random, 95))
        row["above random"] = bool(row["AUROC"] > row["random 95th"])
        if classes is not None:
            row["predicted class AUROC"] = (_best_membership_auroc(classes, present)[1] if 0 < present.sum() < len(present)
                                            else float("nan"))
            row["beyond predicted class"] = bool(row["AUROC"] > row["predicted class AUROC"])
        rows.append(row)
    return pd.DataFrame(rows)


def _best_membership_auroc(labels: np.ndarray, present: np.ndarray) -> tuple[int, float]:
    """The cluster whose membership best separates ``present`` and that AUROC. Membership is a 0/1 score, whose AUROC is
    ``(1 + TPR − FPR) / 2`` (ties counted half, as ``roc_auc_score``)."""
    members = np.asarray(labels)[:, None] == np.arange(np.max(labels) + 1)[None, :]
    aurocs = 0.5 * (1.0 + members[present].mean(axis=0) - members[~present].mean(axis=0))
    best = int(np.argmax(aurocs))
    return best, float(aurocs[best])


# ------------------------------------------------------------------------------ the study in one call

@dataclass
class RevealStudy:
    """What :func:`reveal_study` found. ``collected``: the :class:`OffRegion` predictions; ``what`` / ``where``: their
    :class:`Clustering` on the *what* and the *where* descriptors (``what_descriptors``, ``where_descriptors``);
    ``rows``: the collected rows with ``what cluster``, ``where cluster``, ``shortcut_driven`` (twins) and one
    ``on <artefact>`` column per artefact map; ``clusters`` / ``where_clusters``: :func:`cluster_table` of each;
    ``concept``: the :class:`Concept` of the cluster chosen without labels (:func:`concept_cluster`,
    :func:`concept_detector`); ``patch`` / ``where_patch``: :func:`best_match` of the *what* / *where* clusters against
    the predictions whose off-region top comes within ``tolerance_px`` of the patch, ``patch_touching`` the *what*
    clusters' against those whose top touches it (None without artefact maps); ``flags``: :func:`flag_auroc` per
    image-level artefact flag (None without flags); ``options``; ``tolerance_px``: the tolerance used."""

    collected: OffRegion
    what: Clustering
    where: Clustering
    what_descriptors: np.ndarray
    where_descriptors: np.ndarray
    rows: pd.DataFrame
    clusters: pd.DataFrame
    where_clusters: pd.DataFrame
    concept: Concept
    options: RevealOptions
    tolerance_px: float = 0.0
    patch: dict | None = None
    where_patch: dict | None = None
    patch_touching: dict | None = None
    flags: pd.DataFrame | None = None

    def members(self, cluster: int, clustering: str = "what") -> np.ndarray:
        """Positions (in ``rows``) of the members of ``cluster`` in the ``"what"`` or ``"where"`` clustering."""
        return np.flatnonzero(self.rows[f"{clustering} cluster"].to_numpy() == cluster)


def _results_and_masks(results: Results | str | Path, masks: np.ndarray | None) -> tuple[Results, np.ndarray]:
    """``results`` loaded when it is a folder (notebook 04's ``maps/<method>``) and the predicted masks: ``masks``,
    else the ``test_masks.npz`` notebook 04 saved beside that folder."""
    folder = None if isinstance(results, Results) else Path(results)
    loaded = load_results(folder) if folder is not None else results
    if masks is None:
        if folder is None:
            raise ValueError("pass masks= (the predicted masks of the split, bool (N, H, W)) with a Results object")
        masks = load_split_arrays(folder.parent / "test_masks.npz")["predicted_masks"]
    return loaded, np.asarray(masks, dtype=bool)


def reveal_study(results: Results | str | Path, data: LoadedDataset, classifier: TrainedModel,
                 masks: np.ndarray | None = None, split: str = "test",
                 options: RevealOptions = RevealOptions()) -> RevealStudy:
    """Steps 1 to 4 of the module docstring for one explanation method's scored predictions of ``split``:
    ``results`` (a :class:`~segx_helpers.workflows.results.Results` whose ``image_index`` refers to the split's
    images, or notebook 04's results folder), ``masks`` (the split's predicted masks, bool ``(N, H, W)``; default
    the ``test_masks.npz`` beside the folder), the ``classifier`` that made the predictions (its features describe
    *what*). The clusters are named with the ground truth ``data`` has: per-pixel artefact maps (synthetic sets),
    image-level flags in ``artefacts.csv`` (real sets such as the ISIC 2018 trap sets), counterfactual twins."""
    results, masks = _results_and_masks(results, masks)
    collected = collect_off_region(results, masks, options)
    tensors = split_tensors(data, split, classifier.meta)
    features = feature_maps(classifier.model, tensors["image"], classifier_layer(classifier.model, options.layer))
    index = collected.rows["image_index"].to_numpy()
    what_x = what_descriptors(features, collected.top, index)
    where_x = where_descriptors(collected.off, options.grid)
    what = cluster_descriptors(what_x, "kmeans", max_clusters=options.max_clusters, seed=options.seed)
    where = cluster_descriptors(where_x, "spectral", max_clusters=options.max_clusters, seed=options.seed)
    rows = collected.rows.reset_index(drop=True).assign(**{"what cluster": what.labels, "where cluster": where.labels})
    if shortcut_pairs(data.info):
        rows["shortcut_driven"] = shortcut_driven(classifier.model, classifier.meta, data, rows)
    chosen = concept_cluster(what_x, what.labels, background_feature(features, masks))
    concept = concept_detector(features, collected, what.labels, chosen, what_x)
    study = RevealStudy(collected, what, where, what_x, where_x, rows, cluster_table(rows, what.labels),
                        cluster_table(rows, where.labels), concept, options)
    _name_clusters(study, data, classifier, [tensors["image_id"][i] for i in index])
    return study


def quarter_cell_px(classifier: TrainedModel) -> float:
    """A quarter of a Grad-CAM cell of ``classifier``'s last block, in pixels of its input (8 at 128 px with 4 × 4)."""
    size = classifier.meta["image_size"]
    grid = feature_grid(classifier.model, find_target_layer(classifier.model), size, classifier.meta.get("in_channels", 3))
    return size / grid[0] / 4


def _name_clusters(study: RevealStudy, data: LoadedDataset, classifier: TrainedModel, image_ids: list[str]) -> None:
    """Step 4 on ``study`` (in place): ``on <artefact>`` columns and the per-cluster shares from per-pixel artefact maps
    (within ``options.tolerance_px``, default :func:`quarter_cell_px`), the patch matches, or else the image-level flags'
    :func:`flag_auroc`."""
    collected, options = study.collected, study.options
    pixel = pixel_artefacts(data, image_ids, collected.top.shape[-1])
    if not pixel:
        flags = image_flags(data, image_ids)
        study.flags = None if flags is None else flag_auroc(study.what.labels, flags, seed=options.seed,
                                                            predicted=study.rows["class"].to_numpy())
        return
    study.tolerance_px = float(options.tolerance_px if options.tolerance_px is not None else quarter_cell_px(classifier))
    hits = artefact_hits(collected.top, pixel, study.tolerance_px)
    study.rows = pd.concat([study.rows, hits.add_prefix("on ")], axis=1)
    study.clusters = cluster_table(study.rows, study.what.labels, hits)
    study.where_clusters = cluster_table(study.rows, study.where.labels, hits)
    if "patch" in hits:
        study.patch = best_match(study.what.labels, hits["patch"].to_numpy())
        study.where_patch = best_match(study.where.labels, hits["patch"].to_numpy())
        touching = artefact_hits(collected.top, {"patch": pixel["patch"]})["patch"].to_numpy()
        study.patch_touching = best_match(study.what.labels, touching)


# ------------------------------------------------------------------------------ 5. revise: where the concept fires

@dataclass(frozen=True)
class Concept:
    """What one *what* cluster looked at, as a detector on the classifier's features: its unit ``centroid``
    ``(K,)`` and the cosine ``threshold`` from which a feature cell shows it (:func:`concept_detector`)."""

    cluster: int
    centroid: np.ndarray
    threshold: float


def cell_similarity(features: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    """Cosine similarity of every feature cell of ``features`` ``(N, K, h, w)`` to ``centroid`` ``(K,)``: ``(N, h, w)``."""
    norms = np.linalg.norm(features, axis=1)
    return np.einsum("nkhw,k->nhw", features, np.asarray(centroid, np.float32)) / np.where(norms > 0, norms, 1.0)


def background_feature(features: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The unit mean of the unit feature vectors of every cell mostly outside the masks (``features`` ``(N, K, h, w)``,
    ``masks`` bool ``(N, H, W)``): what ordinary surroundings look like to the classifier, ``(K,)``."""
    outside = _pool(np.asarray(masks, np.float32), features.shape[2:]) < 0.5
    cells = unit_rows(features.transpose(0, 2, 3, 1)[outside])
    return unit_rows(cells.mean(axis=0, keepdims=True))[0]


def concept_cluster(descriptors: np.ndarray, labels: np.ndarray, background: np.ndarray) -> int:
    """The cluster to revise against, chosen without any label: the one whose centroid is least like the ordinary
    surroundings (lowest cosine similarity to ``background``, :func:`background_feature`): the model looked at
    something there that the rest of the skin is not."""
    return int(np.argmin(centroids(descriptors, labels) @ background))


def concept_detector(features: np.ndarray, collected: OffRegion, labels: np.ndarray, cluster: int,
                     descriptors: np.ndarray) -> Concept:
    """A detector for ``cluster``'s concept: its centroid in the *what* space (``descriptors``), and a threshold set
    from the cluster alone: for each member, the highest similarity to the centroid of a cell under its off-region
    top pixels; the threshold is the lower quartile of those (three members in four show the concept at least this
    clearly where they looked). ``features``: the split's, ``(N, K, h, w)``."""
    centroid = centroids(descriptors, labels)[cluster]
    index = collected.rows["image_index"].to_numpy()
    looked = _pool(np.asarray(collected.top, np.float32), features.shape[2:]) > 0
    similarity = np.where(looked, cell_similarity(features[index], centroid), -1.0).reshape(len(index), -1).max(axis=1)
    return Concept(cluster, centroid, float(np.percentile(similarity[np.asarray(labels) == cluster], 25)))


def concept_cells(features: np.ndarray, concept: Concept, grow: int = 1) -> np.ndarray:
    """Where ``concept`` fires: the cells of ``features`` ``(N, K, h, w)`` whose similarity to its centroid reaches its
    threshold, grown by ``grow`` cells in every direction (an artefact rarely fills whole cells), bool ``(N, h, w)``."""
    cells = cell_similarity(features, concept.centroid) >= concept.threshold
    if grow > 0 and cells.any():
        structure = np.zeros((1, 3, 3), bool)
        structure[0] = True
        cells = ndimage.binary_dilation(cells, structure=structure, iterations=grow)
    return cells


def cells_to_pixels(cells: np.ndarray, size: int) -> np.ndarray:
    """Bool cell grids ``(N, h, w)`` as pixel masks ``(N, size, size)`` (each cell a block; ``size`` a multiple of
    the grid, else ``ValueError``)."""
    n, h, w = cells.shape
    if size % h or size % w:
        raise ValueError(f"image size {size} is not a multiple of the feature grid {h} x {w}")
    return np.repeat(np.repeat(cells, size // h, axis=1), size // w, axis=2)


def concept_regions(study: RevealStudy, classifier: TrainedModel, tensors: dict) -> dict[str, np.ndarray]:
    """Per image of a split (``tensors``: its :func:`~segx_helpers.models.checkpoints.split_tensors`, e.g. the
    training split's): where the study's concept (``study.concept``) fires, image id -> bool ``(S, S)`` at the
    classifier's input size (:func:`concept_cells` on the same layer's features, each cell a block of pixels). The
    region the classifier is trained against in notebook 08 (``MaskFix("region", ...)``); it uses no artefact
    label, only the classifier's features and the clusters."""
    layer = classifier_layer(classifier.model, study.options.layer)
    cells = concept_cells(feature_maps(classifier.model, tensors["image"], layer), study.concept)
    return dict(zip(tensors["image_id"], cells_to_pixels(cells, tensors["image"].shape[-1])))


# ------------------------------------------------------------------------------ what notebook 08 records

def with_notebook_07(table: pd.DataFrame, paths: TutorialPaths, dataset: str, name: str) -> pd.DataFrame:
    """``table`` followed by notebook 07's rows of the same table (``outputs/<dataset>/<name>``: ``fix_comparison.csv``
    or ``fix_rate_by_distance.csv``, with a ``model`` column) for its fixes, renamed ``07: <model>``; its baseline
    rows are left out (the same classifier, measured here too). ``table`` unchanged when notebook 07 has not run."""
    path = paths.outputs(dataset) / name
    if not path.is_file():
        return table
    earlier = pd.read_csv(path)
    earlier = earlier[earlier["model"] != "baseline"]
    return pd.concat([table, earlier.assign(model="07: " + earlier["model"])[table.columns]], ignore_index=True)


def reveal_summary(study: RevealStudy, comparison, baseline: str = "baseline", revised: str = "revised") -> dict:
    """The ``"reveal"`` entry of ``outputs/summary.json``: ``n_low_segu`` (predictions collected), ``n_clusters`` and
    per *what* cluster ``size``, ``shortcut_driven_share`` and ``artefact_share`` (patch, ruler, hair, vignette: the
    share of members whose off-region top touches each; null without artefact maps), the best patch cluster's
    ``patch_cluster_purity`` and ``patch_cluster_recall``, and ``revise``: the shortcut-driven rate of ``baseline`` and
    ``revised`` and the revised accuracy, from ``comparison``
    (:class:`~segx_helpers.studies.mask_training.FixComparison`)."""
    clusters = []
    for row in study.clusters.to_dict("records"):
        clusters.append({"size": int(row["size"]), "shortcut_driven_share": row.get("shortcut-driven share"),
                         "artefact_share": {kind: row.get(f"on {kind}") for kind in PIXEL_ARTEFACTS}})
    patch = study.patch or {}
    return {"n_low_segu": len(study.rows), "n_clusters": int(study.what.k), "clusters": clusters,
            "patch_cluster_purity": patch.get("purity"), "patch_cluster_recall": patch.get("recall"),
            "revise": {"baseline_shortcut_driven_rate": comparison.value(baseline, "shortcut-driven rate"),
                       "revised_shortcut_driven_rate": comparison.value(revised, "shortcut-driven rate"),
                       "revised_accuracy": comparison.value(revised, "accuracy")}}
