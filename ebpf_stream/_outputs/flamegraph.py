"""The flame graph, as a self-contained SVG file.

The root ("all") is at the bottom, then one frame per process name, then the
stacks, callers below callees; widths are proportional to samples.  By
route, each process's stacks stand on their endpoints (``GET /items/{id}``,
``[no route]``).  The file
needs nothing but a browser: a short script adds what flamegraph.pl users
know (click to zoom and "Reset Zoom", regular expression search with Ctrl-F,
"ic" or Ctrl-I to ignore case, "Reset Search" or Escape to clear it), and
without it the graph and its per-frame tooltips still work.
"""

from __future__ import annotations

import html
import zlib

from .._model.dictionary import valid_utf8
from .._model.labels import KERNEL_SUFFIX
from .._model.profile import Profile
from .folded import collapse

DEFAULT_TITLE = "CPU flame graph"
WIDTH = 1200
FRAME_HEIGHT = 16
FONT_SIZE = 12
CHAR_WIDTH = FONT_SIZE * 0.6  # a monospace glyph's advance, to truncate without measuring
MIN_FRACTION = 0.001
"""Frames (and their callees) below this share of all samples are left out:
they would be about a pixel wide at most and only bloat the file."""

_PAD = 10
_TOP = 50  # title, subtitle and the search control
_BOTTOM = 24  # the details line

# Zooms by clamping every frame to the clicked frame's sample range; frames
# keep their sample range in data-x/data-w and their full name in the tooltip.
# The controls and keys are flamegraph.pl's: "Reset Zoom", "Search" (Ctrl-F
# or F3; "Reset Search" or Escape clears it) and "ic" (Ctrl-I) for a search
# that ignores case.
_SCRIPT = """(function () {
var frames = Array.prototype.slice.call(document.querySelectorAll('g.f'));
var base = frames[0].querySelector('rect'), X0 = +base.getAttribute('x');
var W = +base.getAttribute('width'), C = CHAR_WIDTH;
var details = document.getElementById('details'), matched = document.getElementById('matched');
var unzoom = document.getElementById('unzoom'), searchButton = document.getElementById('search');
var caseButton = document.getElementById('ignorecase');
var query = '', ignorecase = false;
function span(g) { var x = +g.getAttribute('data-x'); return [x, x + +g.getAttribute('data-w')]; }
function tip(g) { return g.querySelector('title').textContent; }
function label(g) { var t = tip(g); return t.slice(0, t.lastIndexOf(' (')); }
var all = span(frames[0]);
function zoom(a, b) {
  frames.forEach(function (g) {
    var s = span(g), l = Math.max(s[0], a), r = Math.min(s[1], b);
    if (r <= l) { g.style.display = 'none'; return; }
    g.style.display = '';
    var x = X0 + (l - a) / (b - a) * W, w = (r - l) / (b - a) * W, n = label(g);
    var m = Math.floor((w - 6) / C), t = g.querySelector('text');
    g.querySelector('rect').setAttribute('x', x); g.querySelector('rect').setAttribute('width', w);
    t.setAttribute('x', x + 3);
    t.textContent = m < 3 ? '' : n.length <= m ? n : n.slice(0, m - 2) + '..';
  });
  unzoom.style.display = a === all[0] && b === all[1] ? 'none' : '';
}
function search(q) {
  var re = null, spans = [], total = 0, end = -1;
  if (q) {
    try { re = new RegExp(q, ignorecase ? 'i' : ''); }
    catch (e) { matched.textContent = 'Invalid regular expression: ' + q; return; }
  }
  query = q;
  frames.forEach(function (g) {
    var r = g.querySelector('rect'), hit = re !== null && re.test(label(g));
    if (!r.hasAttribute('data-fill')) r.setAttribute('data-fill', r.getAttribute('fill'));
    r.setAttribute('fill', hit ? 'rgb(230,0,230)' : r.getAttribute('data-fill'));
    if (hit) spans.push(span(g));
  });
  spans.sort(function (a, b) { return a[0] - b[0]; }).forEach(function (s) {
    if (s[1] > end) { total += s[1] - Math.max(s[0], end); end = s[1]; }
  });
  matched.textContent = re ? 'Matched: ' + (100 * total / (all[1] - all[0])).toFixed(2) + '%' : '';
  searchButton.firstChild.nodeValue = re ? 'Reset Search' : 'Search';
}
function ask() {
  var q = prompt('Search frames (regular expression' + (ignorecase ? ', ignoring case' : '') +
                 '):', query);
  if (q !== null) search(q);
}
function toggleCase() {
  ignorecase = !ignorecase;
  caseButton.setAttribute('class', ignorecase ? 'on' : '');
  if (query) search(query);
}
document.addEventListener('click', function (e) {
  var g = e.target.closest('g.f'), id = e.target.id;
  if (g) { var s = span(g); zoom(s[0], s[1]); }
  else if (id === 'unzoom') zoom(all[0], all[1]);
  else if (id === 'search') { if (query) search(''); else ask(); }
  else if (id === 'ignorecase') toggleCase();
});
document.addEventListener('keydown', function (e) {
  var key = e.key.toLowerCase(), ctrl = e.ctrlKey || e.metaKey;
  if (key === 'f3' || (ctrl && key === 'f')) { e.preventDefault(); ask(); }
  else if (ctrl && key === 'i') { e.preventDefault(); toggleCase(); }
  else if (key === 'escape' && query) search('');
});
document.addEventListener('mouseover', function (e) {
  var g = e.target.closest('g.f');
  details.textContent = g ? tip(g) : '';
});
})();
""".replace("CHAR_WIDTH", str(CHAR_WIDTH))



def _escape(text: str) -> str:
    # html.escape, not xml.sax.saxutils: that module pulls in urllib and email.
    return html.escape(text, quote=False)

def _layout(profile: Profile, by_route: bool) -> tuple[int, list[tuple[str, int, int, int]]]:
    """All samples, and ``(name, depth, first sample, samples)`` of each frame to draw.

    The stacks are sorted, so the stacks under any one frame are adjacent:
    one sweep opens a frame where a stack leaves the previous one's path and
    closes it where a stack leaves its own.  No tree is built, which keeps
    large profiles with few shared prefixes cheap.  "all" comes first.
    """
    stacks = sorted(collapse(profile, by_route=by_route).items())
    total = sum(count for _, count in stacks)
    if not total:
        return 0, []
    floor = total * MIN_FRACTION
    out = [("all", 0, 0, total)]
    opened: list[tuple[str, int]] = []  # (name, first sample) of the current path's frames
    x = 0

    def close(depth: int) -> None:
        while len(opened) > depth:
            name, start = opened.pop()
            if x - start >= floor:
                out.append((name, len(opened) + 1, start, x - start))

    for path, count in stacks:
        shared = 0
        while shared < len(opened) and shared < len(path) and opened[shared][0] == path[shared]:
            shared += 1
        close(shared)
        opened.extend((name, x) for name in path[shared:])
        x += count
    close(0)
    return total, out


def _color(name: str, depth: int) -> str:
    """A color derived from the name, so one function looks the same wherever it appears.

    Levels and kinds get their own palettes: gray for "all", violet for
    processes, blue-green for kernel frames and warm colors for the rest.
    """
    h = zlib.crc32(name.encode("utf-8"))
    v1, v2, v3 = (h & 0xFF) / 255, (h >> 8 & 0xFF) / 255, (h >> 16 & 0xFF) / 255
    if depth == 0:
        return "rgb(200,200,200)"
    if depth == 1:  # processes
        return f"rgb({150 + int(40 * v1)},{130 + int(40 * v2)},{200 + int(55 * v3)})"
    if name.endswith(KERNEL_SUFFIX):
        return f"rgb({50 + int(60 * v1)},{170 + int(50 * v2)},{170 + int(60 * v3)})"
    return f"rgb({205 + int(50 * v3)},{int(230 * v1)},{int(55 * v2)})"


def _printable(text: str) -> str:
    """``text`` without what XML cannot carry, even escaped."""
    return "".join(c if c.isprintable() else " " for c in valid_utf8(text))


def _fit(name: str, width: float) -> str:
    chars = int((width - 6) / CHAR_WIDTH)
    if chars < 3:
        return ""
    return name if len(name) <= chars else name[: chars - 2] + ".."


def render_flamegraph_svg(profile: Profile, title: str = DEFAULT_TITLE, *,
                          by_route: bool = False, unit: str = "samples") -> str:
    """The flame graph of ``profile`` as an SVG document; by route, split by endpoint first.

    ``unit`` names what a stack's count counts (``µs`` off the CPU).
    """
    total, frames = _layout(profile, by_route)
    depth = max((d for _, d, _, _ in frames), default=0)
    height = _TOP + (depth + 1) * FRAME_HEIGHT + _BOTTOM
    seconds = max(0, profile.end_ns - profile.start_ns) / 1e9
    subtitle = f"{total:,} {unit} over {seconds:.1f} s" if total else f"No {unit}"
    mid = WIDTH / 2
    parts = [
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n',
        f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{WIDTH}" '
        f'height="{height}" viewBox="0 0 {WIDTH} {height}" '
        f'font-family="monospace" font-size="{FONT_SIZE}">\n',
        "<style>g.f:hover rect { stroke: black; stroke-width: 0.5; } "
        "g.f, #search, #ignorecase, #unzoom { cursor: pointer; } "
        "#ignorecase { fill: rgb(160,160,160); } #ignorecase.on { fill: black; "
        "font-weight: bold; }</style>\n",
        f'<rect width="{WIDTH}" height="{height}" fill="rgb(248,248,248)"/>\n',
        f'<text x="{mid}" y="20" text-anchor="middle" font-size="16">'
        f"{_escape(_printable(title))}</text>\n",
        f'<text x="{mid}" y="38" text-anchor="middle">{subtitle}</text>\n',
        f'<text id="unzoom" x="{_PAD}" y="20" style="display: none">Reset Zoom</text>\n',
        f'<text id="search" x="{WIDTH - _PAD - 24}" y="20" text-anchor="end">Search'
        "<title>Search frames by regular expression (Ctrl-F)</title></text>\n",
        f'<text id="ignorecase" x="{WIDTH - _PAD}" y="20" text-anchor="end">ic'
        "<title>Ignore case in searches (Ctrl-I)</title></text>\n",
        f'<text id="matched" x="{WIDTH - _PAD}" y="{height - 8}" text-anchor="end"></text>\n',
        f'<text id="details" x="{_PAD}" y="{height - 8}"></text>\n',
    ]
    scale = (WIDTH - 2 * _PAD) / total if total else 0.0
    for name, d, x, count in frames:
        left, width = _PAD + x * scale, count * scale
        y = height - _BOTTOM - (d + 1) * FRAME_HEIGHT
        tip = f"{name} ({count:,} {unit}, {100 * count / total:.2f}%)"
        parts.append(
            f'<g class="f" data-x="{x}" data-w="{count}"><title>{_escape(tip)}</title>'
            f'<rect x="{left:.2f}" y="{y}" width="{width:.2f}" height="{FRAME_HEIGHT - 1}" '
            f'rx="2" fill="{_color(name, d)}"/>'
            f'<text x="{left + 3:.2f}" y="{y + FRAME_HEIGHT - 4}">'
            f"{_escape(_fit(name, width))}</text></g>\n"
        )
    if frames:
        parts.append(f'<script type="text/ecmascript"><![CDATA[{_SCRIPT}]]></script>\n')
    parts.append("</svg>\n")
    return "".join(parts)
