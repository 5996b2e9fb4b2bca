"""An interactive explorer for explanation maps (ipywidgets), with a static fallback.

Pick an image, a method, an explained class, the top-p percentage and the mask mode, and see the
image with its mask, the original map and the SegX map, with the SegU score c_IoU (the IoU of the
original map's top-p % region with the predicted mask, :func:`segx_helpers.scores.segu.segu_iou`).

The predicted mask is binarised with one threshold everywhere: pass the segmenter's tuned
``segmenter.meta["threshold"]`` as ``threshold``, the value notebooks 04/05 and the analysis use.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

from segx_helpers.explain.targets import Explanations
from segx_helpers.scores.segu import segu_iou
from segx_helpers.scores.segx import segx, top_percent
from segx_helpers.workflows.results import overlay

MASK_MODES = {"binary": {"mode": "binary"}, "binary + 4 px margin": {"mode": "binary", "margin": 4},
              "soft (probabilities)": {"mode": "soft"}}
SCORE_NAME = "c_IoU"


def panel_score(heat: np.ndarray, mask_prob: np.ndarray, p: float, threshold: float = 0.5) -> float:
    """The SegU score the explorer shows for one map: c_IoU, the IoU of the top-``p`` % region of the
    *original* map ``heat`` ``(H, W)`` with the predicted mask ``mask_prob >= threshold``."""
    mask = np.asarray(mask_prob) >= threshold
    return float(segu_iou(np.asarray(heat)[None], mask[None], p)[0])


def render_panels(image: np.ndarray, heat: np.ndarray, mask_prob: np.ndarray, p: float, mask_mode: str,
                  title: str, threshold: float = 0.5) -> plt.Figure:
    """Three panels for one (image, class): image + mask, original map (with its c_IoU), SegX map
    (top-p % outlined). The mask is ``mask_prob >= threshold`` (use the segmenter's tuned threshold)."""
    mask = mask_prob >= threshold
    options = dict(MASK_MODES[mask_mode])
    if options["mode"] == "binary":
        options["threshold"] = threshold
    aligned = segx(heat[None], mask_prob[None], **options)[0]
    certainty = panel_score(heat, mask_prob, p, threshold)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    panels = [(overlay(image, np.zeros_like(heat), mask, alpha=0.0), f"image + predicted mask (≥ {threshold:.2f})"),
              (overlay(image, heat, mask, top_percent(heat, p)[0]), f"original map ({SCORE_NAME} {certainty:.3f})"),
              (overlay(image, aligned, mask, top_percent(aligned, p)[0]), f"SegX map ({mask_mode})")]
    for ax, (picture, name) in zip(axes, panels):
        ax.imshow(picture)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@dataclass
class ExplorerState:
    """What the explorer shows now (for tests and for reading the selection from code)."""

    method: str
    map_index: int
    image_index: int
    class_name: str
    p: float
    mask_mode: str
    score: float
    title: str


class Explorer:
    """The widgets and their wiring; :func:`explorer` builds one and displays :attr:`widget`.

    Every change of image, method, class, p or mask mode redraws. When the image or method changes the
    class list is refreshed and a class is always selected (the same class name when the new list has it,
    else the first), so a figure shows right away.
    """

    def __init__(self, images: np.ndarray, explanations: dict[str, Explanations], mask_prob: np.ndarray,
                 class_names: list[str], image_ids=None, threshold: float = 0.5, p: float = 5.0):
        import ipywidgets as w  # lazy: without ipywidgets the module still gives explorer()'s static fallback

        if not explanations:
            raise ValueError("explorer needs at least one method in explanations")
        self.images, self.explanations, self.mask_prob = images, explanations, mask_prob
        self.class_names = list(class_names)
        self.image_ids = [str(i) for i in image_ids] if image_ids is not None else [str(i) for i in range(len(images))]
        self.threshold = float(threshold)
        self.state: ExplorerState | None = None
        self.draws = 0
        explained = sorted(set.intersection(*[set(e.image_index.tolist()) for e in explanations.values()]))
        if not explained:
            raise ValueError("no image is explained by every method; nothing to explore")
        self.image_box = w.Dropdown(options=[(self.image_ids[i], i) for i in explained], value=explained[0],
                                    description="image")
        self.method_box = w.Dropdown(options=list(explanations), value=next(iter(explanations)), description="method")
        self.class_box = w.Dropdown(description="class")
        self.p_box = w.FloatSlider(value=p, min=1.0, max=50.0, step=1.0, description="top p %")
        self.mode_box = w.Dropdown(options=list(MASK_MODES), value=next(iter(MASK_MODES)), description="mask")
        self.score_label = w.HTML(layout=w.Layout(margin="0 0 0 10px"))
        # The figure goes into an Image widget as PNG bytes: it shows whatever the matplotlib backend
        # (inline, Agg under papermill) and the front end (JupyterLab, Notebook 7, VS Code, Colab).
        self.picture = w.Image(format="png")
        self._refreshing = False
        self.widget = w.VBox([w.HBox([self.image_box, self.method_box, self.class_box]),
                              w.HBox([self.p_box, self.mode_box, self.score_label]), self.picture])
        self.image_box.observe(self.refresh_classes, "value")
        self.method_box.observe(self.refresh_classes, "value")
        for box in (self.class_box, self.p_box, self.mode_box):
            box.observe(self.draw, "value")
        self.refresh_classes()

    def classes_for(self, index: int, method: str) -> list[tuple[str, int]]:
        e = self.explanations[method]
        return [(self.class_names[e.class_index[k]], int(k)) for k in np.flatnonzero(e.image_index == index)]

    def refresh_classes(self, *_) -> None:
        """New class list for the selected image and method; select a class (ipywidgets 8 selects none)."""
        previous = self.class_box.label
        options = self.classes_for(self.image_box.value, self.method_box.value)
        self._refreshing = True
        try:
            self.class_box.options = options
            if options:
                labels = [label for label, _ in options]
                self.class_box.value = options[labels.index(previous) if previous in labels else 0][1]
        finally:
            self._refreshing = False
        self.draw()  # the value may be unchanged (same index under another method): draw anyway

    def draw(self, *_) -> None:
        if self._refreshing or self.class_box.value is None:
            return
        method, k = self.method_box.value, int(self.class_box.value)
        e = self.explanations[method]
        index = int(e.image_index[k])
        class_name = self.class_names[e.class_index[k]]
        title = f"{self.image_ids[index]}: {class_name} (confidence {e.confidence[k]:.2f}, {method})"
        fig = render_panels(self.images[index], e.maps[k], self.mask_prob[index], self.p_box.value, self.mode_box.value,
                            title, threshold=self.threshold)
        score = panel_score(e.maps[k], self.mask_prob[index], self.p_box.value, self.threshold)
        self.state = ExplorerState(method, k, index, class_name, float(self.p_box.value), self.mode_box.value, score,
                                   title)
        self.score_label.value = (f"<b>{SCORE_NAME} = {score:.3f}</b> (top {self.p_box.value:g} % of the original "
                                  f"{method} map vs the predicted mask ≥ {self.threshold:.2f})")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        self.picture.value = buffer.getvalue()
        self.draws += 1


def explorer(images: np.ndarray, explanations: dict[str, Explanations], mask_prob: np.ndarray,
             class_names: list[str], image_ids=None, threshold: float = 0.5):
    """Show the interactive explorer; without ipywidgets or a notebook kernel, a static figure instead.

    ``images`` ``(N, H, W, C)`` in [0, 1]; ``explanations``: method -> :class:`Explanations` over the
    same images; ``mask_prob`` ``(N, H, W)`` predicted clinical-interest probabilities, binarised at
    ``threshold`` (pass ``segmenter.meta["threshold"]``, the segmenter's tuned threshold).
    Returns the static figure in the fallback, else ``None`` (build an :class:`Explorer` yourself to
    read its selection from code).
    """
    try:  # lazy on purpose: a missing ipywidgets/IPython or no kernel means the static fallback below
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is None or not hasattr(get_ipython(), "kernel"):
            raise ImportError("not running inside a Jupyter kernel")
    except ImportError as err:
        print(f"Interactive explorer unavailable ({err}); showing a static view of the first explained image instead.")
        ids = [str(i) for i in image_ids] if image_ids is not None else [str(i) for i in range(len(images))]
        method = next(iter(explanations))
        first, k = explanations[method], 0
        index = int(first.image_index[k])
        return render_panels(images[index], first.maps[k], mask_prob[index], 5.0, "binary",
                             f"{ids[index]}: {class_names[first.class_index[k]]} ({method})", threshold=threshold)
    view = Explorer(images, explanations, mask_prob, class_names, image_ids, threshold=threshold)
    display(view.widget)
    return None
