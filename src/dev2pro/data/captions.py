"""Caption transforms per draw, as kohya sd-scripts and ai-toolkit apply them: caption dropout (a draw uses the empty
caption, so the model also learns the unconditional prediction) and tag shuffling (`a, b, c, d` -> `a, c, d, b` with
the first `keep_tokens` comma-separated tags fixed: the trigger, prepended as the first tag, stays first with
`keep_tokens = 1`); and the tag counts kohya records as `ss_tag_frequency`.

Why cached variants rather than encoding on the fly: training never holds the text encoders (T5-XXL alone is ~9 GB in
bf16), so the text cache holds `data.caption_variants` shuffled versions of each caption (seeded by the caption, so a
re-run reuses them) plus the empty caption; each draw picks one (`pick`) from the sampler's seeded draw number, so a
resumed run makes the same choices. With 8 variants a caption of 6 free tags shows 8 of its 720 orders: enough to
stop the model from learning tag positions, which is what shuffling is for.
"""

from __future__ import annotations

import random
from collections import Counter


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """The caption with its comma-separated tags after the first `keep_tokens` shuffled by `rng`."""
    tags = split_tags(caption)
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(fixed + rest)


def caption_variants(caption: str, *, shuffle: bool, keep_tokens: int, count: int) -> list[str]:
    """The versions of `caption` that are cached: itself, or up to `count` distinct shuffles (seeded by the caption,
    the first being the caption's own order)."""
    if not shuffle:
        return [caption]
    out = [", ".join(split_tags(caption))]
    for k in range(4 * count):  # a short caption has fewer than `count` orders: stop trying after a while
        if len(out) >= count:
            break
        v = shuffle_tags(caption, keep_tokens, random.Random(f"{caption}\0{k}"))
        if v not in out:
            out.append(v)
    return out


def pick(draw: int, n_variants: int, dropout: float) -> int | None:
    """Which caption variant draw number `draw` uses: None = the empty caption (probability `dropout`), else an index
    in [0, n_variants). Pure function of its arguments (so resumes repeat it)."""
    rng = random.Random(draw)
    if dropout > 0 and rng.random() < dropout:
        return None
    return rng.randrange(n_variants)


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How often each tag occurs in `captions` (kohya's `ss_tag_frequency` entry of one dataset folder)."""
    counts: Counter = Counter()
    for caption in captions:
        counts.update(split_tags(caption))
    return dict(counts)
