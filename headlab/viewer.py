"""An attention viewer: a prompt's tokens coloured by the attention a chosen query gives them, head by head; hover a
token to make it the query. Self-contained HTML (no network), for notebooks (`_repr_html_`), files and the report.

    view = headlab.show_attention(model, "When Mary and John went to the store, John gave a drink to", heads=["L18H6"])
    view                      # in a notebook
    view.save("attention.html")

Short prompts show each head's full pattern (N x N from the bridge); past `max_full` tokens the viewer reads the
kernel's statistics instead (no N x N): each query's top-1 key and the attention each key receives. Image tokens of a
vision-language model are drawn as a grid of patches.
"""

from __future__ import annotations

import html
import json

from pathlib import Path

import torch

from headlab.capture import attention_stats, stack_stats
from headlab.errors import InputError
from headlab.heads import head_name
from headlab.hooks import attention_patterns

MAX_FULL = 512  # longest prompt drawn from full patterns; longer ones from the kernel's statistics
LEVELS = 255  # attention weights are stored as integers 0..LEVELS (what a colour can show)


def attention_data(model, prompt, heads=None, *, max_full: int = MAX_FULL, pixel_values=None) -> dict:
    """The viewer's data for one prompt: tokens, heads, and per head either `full` rows (query i: its weights on keys
    0..i, or on every key for an encoder, as integers 0..255) or `stats` (`top1` [n]: each query's most-attended key;
    `received` [n]: attention each key receives per query that sees it, scaled to 0..255 by the head's largest)."""
    tokens = model.as_tokens(prompt)
    if tokens.shape[0] != 1:
        raise InputError("the attention viewer takes one prompt at a time")
    n = tokens.shape[1]
    chosen = model.check_heads(heads) if heads is not None else [
        (layer, head) for layer in range(model.n_layers) for head in range(model.n_heads)]
    image = _image_span(model, tokens[0])
    data = {"tokens": model.to_str_tokens(tokens[0]), "heads": [head_name(*h) for h in chosen],
            "causal": model.is_causal, "image": image, "mode": "full" if n <= max_full else "stats"}
    extra = model.check_pixel_values(pixel_values)
    if data["mode"] == "full":
        patterns = attention_patterns(model, tokens, **extra)[0].float()  # [layer, head, n, n]
        data["full"] = {head_name(l, h): [_levels(patterns[l, h, i, :i + 1 if model.is_causal else n])
                                          for i in range(n)] for l, h in chosen}
        return data
    if extra:
        raise InputError(f"prompts with an image are drawn from full patterns; keep them under {max_full} tokens")
    stats = attention_stats(model, tokens, want=("top1", "colsum"), query_rows=range(n))
    top1, colsum = stack_stats(stats, "top1")[:, 0], stack_stats(stats, "colsum")[:, 0]  # [layer, head, n]
    seeing = torch.arange(n, 0, -1, dtype=torch.float32) if model.is_causal else torch.full((n,), float(n))
    received = colsum.float() / seeing
    data["stats"] = {head_name(l, h): {"top1": top1[l, h].tolist(),
                                       "received": _levels(received[l, h] / received[l, h].max().clamp(min=1e-12))}
                     for l, h in chosen}
    return data


def _levels(row: torch.Tensor) -> list[int]:
    return (row.clamp(0, 1) * LEVELS).round().int().tolist()


def _image_span(model, tokens) -> list[int] | None:
    image = model.image_token_id
    if image is None:
        return None
    where = (tokens == image).nonzero().flatten()
    return [int(where[0]), int(where[-1]) + 1] if len(where) else None


VIEWER_CSS = """
.hl-view { font: 13px/1.9 system-ui, sans-serif; }
.hl-view .hl-heads button { margin: 0 4px 4px 0; border: 1px solid #bbb; background: #f6f6f6; border-radius: 3px;
  cursor: pointer; font: 12px monospace; }
.hl-view .hl-heads button.on { background: #264f8f; color: #fff; }
.hl-view .hl-tokens { border: 1px solid #ddd; padding: 6px; max-height: 420px; overflow: auto; }
.hl-view .hl-tok { white-space: pre-wrap; padding: 1px 0; margin-right: 1px; border-radius: 2px; cursor: default;
  font-family: ui-monospace, monospace; }
.hl-view .hl-tok.q { outline: 2px solid #d33; }
.hl-view .hl-tok.top { outline: 2px dashed #264f8f; }
.hl-view .hl-grid { display: inline-grid; vertical-align: middle; margin: 0 4px; border: 1px solid #999; }
.hl-view .hl-grid span { width: 12px; height: 12px; }
.hl-view .hl-info { color: #555; font-size: 12px; }
"""

VIEWER_JS = """
function hlAttentionView(root, data) {
  const heads = data.heads, n = data.tokens.length;
  let head = heads[0], query = n - 1;
  root.classList.add("hl-view");
  root.innerHTML = '<div class="hl-heads"></div><label class="hl-info"><input type="checkbox" class="hl-scale" checked> ' +
    'colours relative to the largest weight past the first token (which often takes most of it: a sink)</label>' +
    '<div class="hl-info"></div><div class="hl-tokens"></div>';
  const bar = root.querySelector(".hl-heads"), info = root.querySelectorAll(".hl-info")[1],
        box = root.querySelector(".hl-tokens"), scale = root.querySelector(".hl-scale");
  scale.onchange = () => draw();
  heads.forEach(h => { const b = document.createElement("button"); b.textContent = h; b.dataset.head = h;
    b.onclick = () => { head = h; draw(); }; bar.appendChild(b); });
  if (heads.length < 2) bar.style.display = "none";
  const cells = [];
  const image = data.image || [n, n];
  let grid = null;
  for (let i = 0; i < n; i++) {
    const inImage = i >= image[0] && i < image[1];
    if (inImage && !grid) {
      grid = document.createElement("span"); grid.className = "hl-grid";
      const side = Math.ceil(Math.sqrt(image[1] - image[0]));
      grid.style.gridTemplateColumns = "repeat(" + side + ", 12px)"; box.appendChild(grid);
    }
    const t = document.createElement("span");
    t.className = "hl-tok"; t.textContent = inImage ? "" : data.tokens[i].replace(/\\n/g, "\\u21b5\\n");
    t.title = i + ": " + JSON.stringify(data.tokens[i]);
    t.onmouseenter = () => { query = i; draw(); };
    (inImage ? grid : box).appendChild(t); cells.push(t);
  }
  function weights() {
    if (data.mode === "full") { const row = data.full[head][query]; return k => (k < row.length ? row[k] : 0) / 255; }
    const s = data.stats[head]; return k => s.received[k] / 255;
  }
  function draw() {
    bar.querySelectorAll("button").forEach(b => b.classList.toggle("on", b.dataset.head === head));
    const w = weights();
    let best = 0, top = 0;
    for (let k = 1; k < n; k++) top = Math.max(top, w(k));
    const unit = scale.checked && top > 0 ? top : 1;
    cells.forEach((c, k) => { const x = w(k); c.style.background = "rgba(214, 39, 40, " + Math.min(1, x / unit).toFixed(3) + ")";
      c.classList.toggle("q", k === query); c.classList.remove("top"); if (x > w(best)) best = k; });
    if (data.mode === "stats") best = data.stats[head].top1[query];
    cells[best].classList.add("top");
    info.textContent = head + " \\u2014 query " + query + " " + JSON.stringify(data.tokens[query]) +
      (data.mode === "full" ? ": colour = its attention on each key; most attended: " :
       ": colour = attention each key receives (per query, from the kernel's statistics); its top-1 key: ") +
      best + " " + JSON.stringify(data.tokens[best]) + ". Hover a token to make it the query.";
  }
  draw();
}
"""


class AttentionView:
    """A prompt's attention, head by head: `.html` (a self-contained fragment), `_repr_html_`, `save(path)`."""

    def __init__(self, data: dict, title: str = ""):
        self.data = data
        self.title = title

    @property
    def html(self) -> str:
        element = f"hl-attention-{abs(hash(json.dumps(self.data['heads']) + self.title)) % 10**9}"
        payload = json.dumps(self.data, separators=(",", ":")).replace("</", "<\\/")
        return (f"<div><style>{VIEWER_CSS}</style><b>{html.escape(self.title)}</b><div id='{element}'></div>"
                f"<script>{VIEWER_JS}\nhlAttentionView(document.getElementById('{element}'), {payload});</script>"
                "</div>")

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path: str | Path) -> Path:
        """A standalone page (opens offline)."""
        from headlab.files import atomic_write_text

        path = Path(path)
        atomic_write_text(path, "<!doctype html><html><head><meta charset='utf-8'><title>"
                                f"{html.escape(self.title)}</title></head><body>{self.html}</body></html>\n")
        return path

    def __repr__(self) -> str:
        return f"AttentionView({self.title!r}: {len(self.data['tokens'])} tokens, {len(self.data['heads'])} heads)"


def show_attention(model, prompt, heads=None, *, max_full: int = MAX_FULL, pixel_values=None) -> AttentionView:
    """The attention viewer for `prompt` (text, token ids or [1, pos] tokens) and `heads` ("L3H1" or (3, 1); default:
    every head). Full patterns up to `max_full` tokens, the kernel's statistics beyond."""
    data = attention_data(model, prompt, heads, max_full=max_full, pixel_values=pixel_values)
    mode = "full patterns" if data["mode"] == "full" else "kernel statistics"
    return AttentionView(data, f"{model.name}: {len(data['tokens'])} tokens, {mode}")


def example_prompts(model, seq_len: int = 11) -> list[tuple[str, torch.Tensor]]:
    """Short prompts every head page shows: seeded random tokens repeated twice (induction and previous-token heads
    show at a glance) and a sentence."""
    from headlab.probes.detectors import repeated_random_tokens

    half = max(2, min(seq_len, (model.n_ctx - 1) // 2))
    return [("random tokens, repeated", repeated_random_tokens(model, half, 1, seed=0)),
            ("a sentence", model.to_tokens("When Mary and John went to the store, John gave a drink to"))]


def head_examples(model) -> list[dict]:
    """The attention data of `example_prompts` for every head (what a scan folder's attention.json holds)."""
    out = []
    for title, tokens in example_prompts(model):
        if tokens.shape[1] <= model.n_ctx:
            out.append({"title": title, **attention_data(model, tokens)})
    return out


