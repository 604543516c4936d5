"""The SVG canvas docs/img/draw_architecture.py draws on: elements written in drawing
order, and text measured without a font library, so that the drawing stays standard
library only and every text box can be checked for overlaps.
"""

from __future__ import annotations

import html

SANS = "DejaVu Sans, Verdana, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
INK = "#111827"


def text_width(text: str, size: float, mono: bool = False, bold: bool = False) -> float:
    """Width of ``text`` as drawn, an upper bound: DejaVu Sans Mono's advance is 0.602 em;
    DejaVu Sans and Verdana average about 0.53 em over prose (0.6 em allowed, 0.66 bold),
    their capitals and m, w up to 0.8 (0.85 allowed)."""
    if mono:
        return len(text) * size * 0.602
    wide = sum(1 for c in text if c.isupper() or c in "mw")
    return ((len(text) - wide) * (0.66 if bold else 0.6) + wide * 0.85) * size


def _n(value: float) -> str:
    return str(round(value)) if abs(value - round(value)) < 0.05 else f"{value:.1f}"


class Canvas:
    """SVG elements in drawing order, with every text's box kept to check that none
    overlaps another or leaves the picture."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.texts: list[tuple[float, float, float, float, str]] = []
        self.arrows: set[str] = set()  # colours of arrowed lines: one marker each

    def rect(self, x, y, w, h, fill, stroke, *, radius=0, dash=False, width=1.0) -> None:
        extra = ' stroke-dasharray="5 4"' if dash else ""
        self.parts.append(
            f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="{_n(h)}" '
            f'rx="{_n(radius)}" fill="{fill}" stroke="{stroke}" '
            f'stroke-width="{_n(width)}"{extra}/>'
        )

    def circle(self, cx, cy, r, fill) -> None:
        self.parts.append(f'<circle cx="{_n(cx)}" cy="{_n(cy)}" r="{_n(r)}" fill="{fill}"/>')

    def line(self, x1, y1, x2, y2, colour, *, arrow: bool = True, width: float = 1.6) -> None:
        head = ""
        if arrow:
            self.arrows.add(colour)
            head = f' marker-end="url(#head-{colour.lstrip("#")})"'
        self.parts.append(
            f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" stroke="{colour}" '
            f'stroke-width="{_n(width)}"{head}/>'
        )

    def cylinder(self, x, y, w, h, fill, lid_fill, stroke, *, lid: float = 14) -> None:
        """A drum standing on its end, its lid's centre at ``y``: the usual sign for a disk."""
        self.parts.append(
            f'<path d="M{_n(x)},{_n(y)} v{_n(h)} a{_n(w / 2)},{_n(lid)} 0 0 0 {_n(w)},0 '
            f'v{_n(-h)}" fill="{fill}" stroke="{stroke}" stroke-width="1.4"/>'
        )
        self.parts.append(
            f'<ellipse cx="{_n(x + w / 2)}" cy="{_n(y)}" rx="{_n(w / 2)}" ry="{_n(lid)}" '
            f'fill="{lid_fill}" stroke="{stroke}" stroke-width="1.4"/>'
        )

    def text(
        self,
        x: float,
        y: float,
        text: str,
        size: float,
        *,
        mono: bool = False,
        bold: bool = False,
        fill: str = INK,
        anchor: str = "start",
    ) -> float:
        """Draw ``text`` with its baseline at ``y``; returns its width."""
        width = text_width(text, size, mono, bold)
        left = {"start": x, "middle": x - width / 2, "end": x - width}[anchor]
        self.texts.append((left, y - 0.8 * size, left + width, y + 0.25 * size, text))
        style = f'font-family="{MONO if mono else SANS}" font-size="{_n(size)}"'
        if bold:
            style += ' font-weight="bold"'
        if anchor != "start":
            style += f' text-anchor="{anchor}"'
        self.parts.append(
            f'<text x="{_n(x)}" y="{_n(y)}" {style} fill="{fill}">{html.escape(text)}</text>'
        )
        return width

    def document(self, width: float, height: float, comment: str) -> str:
        """The SVG file: a white page of ``width`` by ``height`` with everything drawn."""
        heads = "".join(
            f'<marker id="head-{c.lstrip("#")}" viewBox="0 0 10 10" refX="9" refY="5" '
            f'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
            f'<path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>'
            for c in sorted(self.arrows)
        )
        w, h = _n(width), _n(height)
        return "\n".join(
            [
                f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
                f'viewBox="0 0 {w} {h}">',
                f"<!-- {comment} -->",
                f"<defs>{heads}</defs>",
                f'<rect width="{w}" height="{h}" fill="#ffffff"/>',
                *self.parts,
                "</svg>",
                "",
            ]
        )

    def overlaps(self, width: float, height: float) -> list[str]:
        problems = []
        boxes = sorted(self.texts)
        for i, (x0, y0, x1, y1, text) in enumerate(boxes):
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                problems.append(f"text {text!r} leaves the picture")
            for u0, v0, _u1, v1, other in boxes[i + 1 :]:
                if u0 >= x1:
                    break
                if v0 < y1 and y0 < v1:
                    problems.append(f"text {text!r} overlaps {other!r}")
        return problems


def wrap(words: list[str], width: float, size: float, *, mono: bool, bold: bool = False):
    """Lines of ``words`` (joined by single spaces) no wider than ``width``."""
    lines: list[str] = []
    for word in words:
        if lines and text_width(f"{lines[-1]} {word}", size, mono, bold) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines
