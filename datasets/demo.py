"""A synthetic multimodal behaviour dataset whose text and pictures carry real signal.

The generative story:

1. There are `num_topics` latent topics. Each one owns ~8 made-up words, a two-colour palette, a
   shape (circle, square, triangle, ...) and a texture.
2. Every item has a dominant topic and often a secondary one. Its title and description are drawn
   mostly from the dominant topic's words (plus some from the secondary topic and generic filler
   words), and its picture is drawn with the dominant topic's palette, shape and texture (plus a
   small element from the secondary topic). So a model that reads text or images can place a *new*
   item near similar ones, which an ID-only model cannot do.
3. Items are popular or not following a Zipf-like weight within their topic.
4. Every user has a long-term preference over 2-3 topics and a short-term session topic, redrawn
   every 5-10 events (usually from the long-term preference, sometimes a random topic). Each next
   event follows the session topic with probability `short_term_prob`, else a topic drawn from the
   long-term preference, so the recent history predicts the next item better than overall
   popularity does.

A little bad input is added on purpose (unknown item ids, corrupt image bytes) so the pipeline's
bad-input reporting gets exercised. Shards are shuffled, because real logs are not sorted either.
"""

import colorsys
import io
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from interestformer.errors import ConfigError
from interestformer.datasets.storage import absolute, filesystem, join, read_json, write_json


@dataclass
class DemoDataConfig:
    """Size and shape of the generated demo dataset."""

    num_users: int = 1500
    """Users to generate."""
    num_items: int = 1000
    """Items in the catalogue."""
    num_topics: int = 12
    """Latent topics; each item's words and picture depend on its topics."""
    mean_events_per_user: int = 40
    """Mean behaviour-sequence length (lengths vary per user, minimum 3)."""
    start_days: int = 365
    """Each user's first event falls on a day drawn uniformly from this many days after
    2025-01-01; fewer days give more users active at the same time (benchmarks/incremental.py)."""
    num_shards: int = 4
    """Parquet files the events are written to."""
    image_size: int = 48
    """Width and height of generated images in pixels."""
    short_term_prob: float = 0.5
    """Probability that the next event follows the user's current short-term topic rather than their long-term preference."""
    bad_event_fraction: float = 0.002
    """Fraction of events whose item id is not in the catalogue (to exercise bad-input reporting)."""
    num_bad_images: int = 3
    """Items whose image bytes are corrupt (to exercise bad-input reporting)."""
    seed: int = 0
    """Random seed; the same config gives byte-identical files."""

    def __post_init__(self):
        for key, low in [("num_users", 1), ("num_topics", 1), ("mean_events_per_user", 3), ("start_days", 1),
                         ("num_shards", 1), ("image_size", 8), ("num_bad_images", 0)]:
            if getattr(self, key) < low:
                raise ConfigError(key, f"must be >= {low}, got {getattr(self, key)}")
        if self.num_items < self.num_topics:
            raise ConfigError("num_items", "must be >= num_topics (every topic needs an item)")
        if self.num_bad_images > self.num_items:
            raise ConfigError("num_bad_images", "must be <= num_items")
        for key in ("short_term_prob", "bad_event_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(key, "must be within [0, 1]")


SHAPES = ["circle", "square", "triangle", "stripes", "dots", "cross"]
TEXTURES = ["smooth", "grainy", "speckled"]
FILLER = ["the", "new", "classic", "premium", "edition", "set", "with", "for", "and", "best",
          "original", "deluxe", "collection", "series", "daily", "essential", "mini", "pro", "plus"]
EVENT_TYPES = np.array(["view", "click", "purchase"])
# A fixed window in the past: the same seed gives the same events on any date, all of them before
# the wall clock that prepare checks timestamps against.
START = 1735689600  # 2025-01-01T00:00:00Z
SUCCESS = "_SUCCESS"


def _make_topics(rng, num_topics):
    """Distinct pronounceable pseudo-words, colours spread around the hue wheel, cycling shapes."""
    consonants, vowels = list("bdfgklmnprstvz"), list("aeiou")
    seen, topics = set(FILLER), []
    for t in range(num_topics):
        words = []
        while len(words) < 8:
            n_syl = int(rng.integers(2, 4))
            w = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(n_syl))
            if w not in seen:  # a word shared by two topics would blur the text signal
                seen.add(w)
                words.append(w)
        hue = (t / num_topics + rng.uniform(-0.02, 0.02)) % 1.0
        palette = [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))
                   for h, s, v in [(hue, 0.35, 0.95), (hue + 0.08, 0.9, 0.55)]]
        topics.append(dict(words=words, palette=palette, shape=SHAPES[t % len(SHAPES)],
                           texture=TEXTURES[(t // len(SHAPES)) % len(TEXTURES)]))
    return topics


def _draw_shape(draw, rng, shape, colour, box):
    """Draw one `shape` inside box = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "stripes":
        step = max(3, w // 4)
        for x in range(x0, x1, step):
            draw.rectangle((x, y0, x + step // 2, y1), fill=colour)
    elif shape == "dots":
        r = max(1, w // 10)
        for _ in range(6):
            cx, cy = rng.integers(x0, x1 + 1), rng.integers(y0, y1 + 1)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "cross":
        draw.rectangle((x0 + w // 3, y0, x1 - w // 3, y1), fill=colour)
        draw.rectangle((x0, y0 + h // 3, x1, y1 - h // 3), fill=colour)


def _render_image(rng, size, topic, secondary):
    """Dominant topic: background, 2-3 big shapes, texture. Secondary: one small corner shape."""
    img = Image.new("RGB", (size, size), topic["palette"][0])
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 4))):
        s = int(rng.integers(size // 3, size // 2 + 1))
        x, y = rng.integers(0, size - s + 1, size=2)
        box = (int(x), int(y), int(x) + s, int(y) + s)
        _draw_shape(draw, rng, topic["shape"], topic["palette"][1], box)
    if secondary is not None:
        s = max(4, size // 5)
        _draw_shape(draw, rng, secondary["shape"], secondary["palette"][1], (1, 1, 1 + s, 1 + s))
    px = np.asarray(img, dtype=np.int16)
    noise_std = {"smooth": 4, "grainy": 18, "speckled": 4}[topic["texture"]]
    px = px + rng.normal(0, noise_std, size=px.shape).round().astype(np.int16)
    if topic["texture"] == "speckled":
        px[rng.random((size, size)) < 0.06] = 255
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))


def _make_items(rng, cfg, topics):
    n, T = cfg.num_items, cfg.num_topics
    dominant = rng.permutation(np.arange(n) % T)  # every topic gets items
    # about half the items mix in a second, different topic
    has_sec = (rng.random(n) < 0.5) & (T > 1)
    secondary = np.where(has_sec, (dominant + rng.integers(1, max(T, 2), n)) % T, -1)
    # Zipf-like popularity within each topic: a random rank inside the topic, weight 1/rank^0.9
    popularity = np.empty(n)
    for t in range(T):
        members = np.flatnonzero(dominant == t)
        popularity[members] = 1.0 / (rng.permutation(len(members)) + 1.0) ** 0.9

    bad_images = set(rng.choice(n, size=cfg.num_bad_images, replace=False).tolist())
    titles, descriptions, images = [], [], []
    for i in range(n):
        dom = topics[dominant[i]]["words"]
        sec = topics[secondary[i]]["words"] if secondary[i] >= 0 else None
        words = list(rng.choice(dom, size=int(rng.integers(2, 4)), replace=False))
        if rng.random() < 0.6:  # maybe one extra word: from the secondary topic, or filler
            extra = rng.choice(sec if sec and rng.random() < 0.7 else FILLER)
            words.insert(int(rng.integers(0, len(words) + 1)), extra)
        titles.append(" ".join(w.capitalize() for w in words))
        desc = [rng.choice(dom if x < 0.55 else (sec or dom) if x < 0.7 else FILLER)
                for x in rng.random(int(rng.integers(6, 13)))]
        descriptions.append(" ".join(desc) + ".")

        sec_topic = topics[secondary[i]] if secondary[i] >= 0 else None
        img = _render_image(rng, cfg.image_size, topics[dominant[i]], sec_topic)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90) if i % 2 == 0 else img.save(buf, "PNG")
        data = buf.getvalue()
        if i in bad_images:  # half-written header or plain garbage: both must fail to decode
            data = data[:40] if i % 2 == 0 else b"not an image"
        images.append(data)

    table = pa.table({
        "item_id": pa.array([f"i{i + 1:06d}" for i in range(n)], pa.string()),
        "title": pa.array(titles, pa.string()),
        "description": pa.array(descriptions, pa.string()),
        "image": pa.array(images, pa.binary()),
        "image_uri": pa.nulls(n, pa.string()),
        "topic": pa.array(dominant, pa.int32()),
    })
    return table, dominant, secondary, popularity


def _topic_sampler(dominant, secondary, popularity, T):
    """Lay out (topic, item) entries sorted by topic with per-topic cumulative weights shifted by
    the topic index, so one searchsorted on `topic + u` draws an item for many events at once.
    An item is also drawable (with less weight) from its secondary topic."""
    items = np.concatenate([np.arange(len(dominant)), np.flatnonzero(secondary >= 0)])
    topic_of = np.concatenate([dominant, secondary[secondary >= 0]])
    weight = np.concatenate([popularity, 0.35 * popularity[secondary >= 0]])
    order = np.lexsort((items, topic_of))
    items, topic_of, weight = items[order], topic_of[order], weight[order]
    cum = np.empty(len(items))
    for t in range(T):
        sl = np.flatnonzero(topic_of == t)
        c = np.cumsum(weight[sl])
        cum[sl] = c / c[-1]
        cum[sl[-1]] = 1.0  # exact, so `t + u` with u < 1 never spills into the next topic
    return items, topic_of + cum


def _make_events(rng, cfg, sampler):
    T, mean = cfg.num_topics, cfg.mean_events_per_user
    entry_items, shifted_cum = sampler

    def draw_items(topic):  # one popularity-weighted item per entry of `topic`
        u = rng.random(len(topic))
        return entry_items[np.searchsorted(shifted_cum, topic + u, side="right")]

    sigma = 0.6  # lognormal lengths with the requested mean: some short and some long histories
    lengths = mean * rng.lognormal(-sigma**2 / 2, sigma, cfg.num_users)
    lengths = np.clip(np.round(lengths), 3, 4 * mean).astype(int)
    users, items, stamps = [], [], []
    for u, L in enumerate(lengths):
        # long-term: most mass on 2-3 topics, a little spread everywhere
        k = min(T, int(rng.integers(2, 4)))
        pref = np.full(T, 0.05 / T)
        pref[rng.choice(T, size=k, replace=False)] += 0.95 * rng.dirichlet(np.full(k, 2.0))
        pref /= pref.sum()
        # sessions of 5-10 events, each with a topic: usually a preferred one, sometimes anything
        session_len = rng.integers(5, 11, size=L // 5 + 1)
        session = np.searchsorted(np.cumsum(session_len), np.arange(L), side="right")
        S = len(session_len)
        s_topic = np.where(rng.random(S) < 0.85, rng.choice(T, S, p=pref), rng.integers(0, T, S))
        long_topic = rng.choice(T, size=L, p=pref)
        topic = np.where(rng.random(L) < cfg.short_term_prob, s_topic[session], long_topic)
        seq = draw_items(topic)
        for j in range(L):  # avoid repeating the last 3 items; give up after 5 tries (tiny topics)
            for _ in range(5):
                if seq[j] not in seq[max(0, j - 3):j]:
                    break
                seq[j] = draw_items(topic[j:j + 1])[0]
        # minutes apart inside a session, hours to days between sessions
        new_session = np.r_[False, session[1:] != session[:-1]]
        between = np.clip(rng.lognormal(np.log(6 * 3600), 1.2, L), 600, 5 * 86400)
        within = np.clip(rng.lognormal(np.log(120), 1.0, L), 5, 3600)
        gaps = np.where(new_session, between, within).astype(np.int64)
        gaps[0] = 0
        stamps.append(START + int(rng.integers(0, cfg.start_days * 86400)) + np.cumsum(gaps))
        users.append(np.full(L, u))
        items.append(seq)
    return np.concatenate(users), np.concatenate(items), np.concatenate(stamps)


def generate_demo(out_dir: str, cfg: DemoDataConfig) -> dict:
    """Write events/part-00000.parquet ... (cfg.num_shards files) and items/part-00000.parquet
    under out_dir. Returns {"events", "users", "items", "bad_events", "bad_images", "path"}.
    A `_SUCCESS` file holding the same config means the data is already there: reuse it.
    out_dir is a local folder or an object-store URI (s3://...)."""
    uri = absolute(out_dir)
    fs, root = filesystem(uri)
    marker = f"{root}/{SUCCESS}"
    done = read_json(join(uri, SUCCESS))
    if done is not None:
        if done.get("config") == asdict(cfg):
            return {**done["summary"], "path": out_dir}
        fs.delete_file(marker)  # different config: regenerate, and never leave a stale marker behind

    rng = np.random.default_rng(cfg.seed)
    topics = _make_topics(rng, cfg.num_topics)
    item_table, dominant, secondary, popularity = _make_items(rng, cfg, topics)
    sampler = _topic_sampler(dominant, secondary, popularity, cfg.num_topics)
    users, items, stamps = _make_events(rng, cfg, sampler)
    n = len(users)

    user_ids = np.array([f"u{u + 1:06d}" for u in range(cfg.num_users)], dtype=object)[users]
    item_ids = item_table.column("item_id").to_numpy(zero_copy_only=False).astype(object)[items]
    n_bad = int(round(cfg.bad_event_fraction * n))
    item_ids[rng.choice(n, size=n_bad, replace=False)] = [f"i_missing_{k}" for k in range(n_bad)]
    events = pa.table({
        "user_id": pa.array(user_ids, pa.string()),
        "item_id": pa.array(item_ids, pa.string()),
        "timestamp": pa.array(stamps, pa.int64()),
        "event_type": pa.array(EVENT_TYPES[rng.choice(3, n, p=[0.8, 0.15, 0.05])], pa.string()),
        "value": pa.array(np.round(rng.lognormal(3.0, 1.0, n), 1), pa.float64()),  # dwell seconds
    })

    for sub in ("events", "items"):  # drop shards of an earlier, different config
        fs.create_dir(f"{root}/{sub}", recursive=True)
        for info in fs.get_file_info(pafs.FileSelector(f"{root}/{sub}")):
            if info.base_name.startswith("part-") and info.base_name.endswith(".parquet"):
                fs.delete_file(info.path)
    shard = users % cfg.num_shards  # a user's events live in one shard, in shuffled row order
    for s in range(cfg.num_shards):
        rows = rng.permutation(np.flatnonzero(shard == s))
        pq.write_table(events.take(rows), f"{root}/events/part-{s:05d}.parquet", filesystem=fs)
    pq.write_table(item_table, f"{root}/items/part-00000.parquet", filesystem=fs)

    summary = dict(events=n, users=cfg.num_users, items=cfg.num_items, bad_events=n_bad,
                   bad_images=cfg.num_bad_images, path=out_dir)
    # Written last and atomically: present means complete.
    write_json(join(uri, SUCCESS + ".tmp"), {"config": asdict(cfg), "summary": summary})
    fs.move(marker + ".tmp", marker)
    return summary


if __name__ == "__main__":  # python -m interestformer.datasets.demo [out_dir]
    import sys

    print(generate_demo(sys.argv[1] if len(sys.argv) > 1 else "data/demo", DemoDataConfig()))
