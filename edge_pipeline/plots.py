"""Figures for the HTML report, embedded as PNG (matplotlib without a display); stages draw their own sections
with these too."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def figure(title: str, fig) -> str:
    return (f'<figure><img class="plot" alt="{html.escape(title)}" src="data:image/png;base64,{png(fig)}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")
