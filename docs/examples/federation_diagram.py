"""Draw the picture on the README and the docs' home page: hospitals train one model without
pooling their images (FedAvg), then the model answers new radiographs.

    python docs/examples/federation_diagram.py --out docs/federation.png
"""

from __future__ import annotations

import argparse

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

BOX = dict(boxstyle="round,pad=0.02,rounding_size=0.02", linewidth=1.2)


def box(ax, x, y, w, h, text, face):
    ax.add_patch(FancyBboxPatch((x, y), w, h, facecolor=face, edgecolor="#333", **BOX))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9, wrap=True)


def arrow(ax, start, end, text="", color="#333"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=color))
    if text:
        mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
        ax.text(mx + 0.01, my, text, fontsize=7.5, color=color, va="center")


def draw() -> Figure:
    fig = Figure(figsize=(9, 3.6), dpi=110)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    rows = [0.69 - i * 0.3 for i in range(3)]  # below the title
    for y, name in zip(rows, ["hospital A", "hospital B", "hospital C"], strict=True):
        box(ax, 0.02, y, 0.2, 0.2, f"{name}\nX-rays stay here\nlocal epochs", "#e8f0fe")
    box(
        ax,
        0.4,
        0.38,
        0.2,
        0.26,
        "server\nFedAvg: the mean of\nthe hospitals' weights\n(Flower, TLS,\nsecure aggregation)",
        "#fef7e0",
    )
    box(
        ax,
        0.74,
        0.33,
        0.24,
        0.36,
        "one model\nSE-ResNet-18-GN\n\nNORMAL / PNEUMONIA\nwith probability,\n"
        "Grad-CAM, intervals\n(predict, serve, ONNX)",
        "#e6f4ea",
    )
    for i, y in enumerate(rows):  # arrows after the boxes, so no box hides a head
        arrow(ax, (0.22, y + 0.13), (0.4, 0.56 - 0.03 * i), "weights" if i == 0 else "")
        arrow(
            ax,
            (0.4, 0.49 - 0.03 * i),
            (0.22, y + 0.06),
            "global model" if i == 2 else "",
            "#1a73e8",
        )
    arrow(ax, (0.6, 0.51), (0.74, 0.51))
    ax.text(0.67, 0.55, "after R rounds", fontsize=7.5, ha="center")
    ax.text(
        0.02,
        0.97,
        "pneumonia: hospitals build one chest X-ray classifier without pooling images",
        fontsize=10,
        weight="bold",
        va="top",
    )
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/federation.png")
    draw().savefig(parser.parse_args().out)


if __name__ == "__main__":
    main()
