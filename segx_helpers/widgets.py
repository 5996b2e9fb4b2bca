"""An interactive explorer for explanation maps (ipywidgets), with a static fallback.

Pick an image, a method, an explained class, the top-p percentage and the mask mode, and see the
image with its mask, the original map and the SegX map, with the SegU overlap score.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .explain import Explanations
from .segu import segu_overlap
from .segx import segx, top_percent
from .viz import overlay

MASK_MODES = {"binary (reference)": {"mode": "binary"}, "binary + 4 px margin": {"mode": "binary", "margin": 4},
              "soft (probabilities)": {"mode": "soft"}}


def render_panels(image: np.ndarray, heat: np.ndarray, mask_prob: np.ndarray, p: float, mask_mode: str,
                  title: str) -> plt.Figure:
    """Three panels for one (image, class): image + mask, original map, SegX map (top-p % outlined)."""
    mask = mask_prob >= 0.5
    aligned = segx(heat[None], mask_prob[None], **MASK_MODES[mask_mode])[0]
    certainty = segu_overlap(heat[None], mask[None], p)[0]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    panels = [(overlay(image, np.zeros_like(heat), mask, alpha=0.0), "image + predicted mask"),
              (overlay(image, heat, mask, top_percent(heat, p)[0]), f"original map (SegU overlap {certainty:.2f})"),
              (overlay(image, aligned, mask, top_percent(aligned, p)[0]), f"SegX map ({mask_mode})")]
    for ax, (picture, name) in zip(axes, panels):
        ax.imshow(picture)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def explorer(images: np.ndarray, explanations: dict[str, Explanations], mask_prob: np.ndarray,
             class_names: list[str], image_ids: list[str] | None = None):
    """Show the interactive explorer; without ipywidgets or a notebook kernel, a static figure instead.

    ``images`` ``(N, H, W, C)`` in [0, 1]; ``explanations``: method -> :class:`Explanations` over the
    same images; ``mask_prob`` ``(N, H, W)`` predicted clinical-interest probabilities.
    """
    image_ids = image_ids or [str(i) for i in range(len(images))]
    first_method = next(iter(explanations))
    first = explanations[first_method]
    try:
        import ipywidgets as w
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is None or not hasattr(get_ipython(), "kernel"):
            raise ImportError("not running inside a Jupyter kernel")
    except ImportError as err:
        print(f"Interactive explorer unavailable ({err}); showing a static view of the first explained image instead.")
        k = 0
        return render_panels(images[first.image_index[k]], first.maps[k], mask_prob[first.image_index[k]], 5.0,
                             "binary (reference)", f"{image_ids[first.image_index[k]]}: {class_names[first.class_index[k]]} "
                             f"({first_method})")

    explained = sorted(set(first.image_index.tolist()).intersection(*[set(e.image_index.tolist()) for e in explanations.values()]))
    image_box = w.Dropdown(options=[(image_ids[i], i) for i in explained], description="image")
    method_box = w.Dropdown(options=list(explanations), description="method")
    class_box = w.Dropdown(description="class")
    p_box = w.FloatSlider(value=5.0, min=1.0, max=50.0, step=1.0, description="top p %")
    mode_box = w.Dropdown(options=list(MASK_MODES), description="mask")
    out = w.Output()

    def classes_for(index: int, method: str) -> list[tuple[str, int]]:
        e = explanations[method]
        return [(class_names[e.class_index[k]], int(k)) for k in np.flatnonzero(e.image_index == index)]

    def refresh_classes(*_):
        class_box.options = classes_for(image_box.value, method_box.value)

    def draw(*_):
        if class_box.value is None:
            return
        e = explanations[method_box.value]
        k = class_box.value
        index = int(e.image_index[k])
        with out:
            out.clear_output(wait=True)
            fig = render_panels(images[index], e.maps[k], mask_prob[index], p_box.value, mode_box.value,
                                f"{image_ids[index]}: {class_names[e.class_index[k]]} "
                                f"(score {e.scores[k]:.2f}, {method_box.value})")
            plt.show(fig)

    image_box.observe(refresh_classes, "value")
    method_box.observe(refresh_classes, "value")
    for box in (class_box, p_box, mode_box):
        box.observe(draw, "value")
    refresh_classes()
    draw()
    display(w.VBox([w.HBox([image_box, method_box, class_box]), w.HBox([p_box, mode_box]), out]))
    return None
