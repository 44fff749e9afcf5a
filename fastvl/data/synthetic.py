"""The built-in dataset: seeded rendered scenes of 2-3 coloured shapes with spatial relations,
captions that name them, and ARO-style hard negatives per caption.

A scene has 2 or 3 objects, each a (size, colour, shape) drawn inside a square box; boxes never
overlap (a gap of at least ``GAP`` pixels). Between two objects a relation *holds* along an axis
when their boxes are separated along it ("a left of b": a's right edge is left of b's left edge;
"a above b" likewise in y; a diagonal pair holds one relation per axis). A relation is *clear*
when it holds along one axis only and the boxes overlap by at least half the smaller box along the
other axis (side by side, or stacked). Captions only state clear relations, chained so every
object is named: "a large red circle to the left of a small blue square and a small green star
is below a small blue square".

Hard negatives (ARO: Yuksekgonul et al., "When and why vision-language models behave like
bags-of-words"), built on the caption's first clause and each guaranteed to differ from the
caption and from the other two (otherwise the scene is redrawn):
  * ``relation_swap``: the two objects exchanged around the relation
    ("a small blue square to the left of a large red circle");
  * ``attribute_swap``: colours (or, if that collides, sizes) exchanged between the two objects
    ("a large blue circle to the left of a small red square");
  * ``shuffle``: the caption's words in a random order.

Held-out split (compositional generalisation): ``HELDOUT_ATTRIBUTES`` (colour, shape) pairs and
``HELDOUT_RELATIONS`` (shape, relation, shape) triples never occur in the training split — not in
any object and not in any relation that holds in a training image, clear or not. Every held-out
scene's caption names at least one of them (listed under ``"novel"`` in its metadata).

Samples are drawn from a ``random.Random`` seeded by (seed, split, index), so a dataset is a pure
function of its arguments: the same call writes byte-identical shards.

Output (webdataset convention): ``{out}/train/shard-000000.tar``, ..., ``{out}/heldout/...``, each
sample ``{key}.jpg``, ``{key}.txt`` (caption), ``{key}.json`` (objects with boxes, relations,
caption relations, negatives, novel combinations); ``{out}/info.json`` records the arguments and
the held-out rules.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw

from .shards import ShardWriter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 215, 45),
    "purple": (135, 55, 175),
    "orange": (245, 140, 30),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES: dict[str, tuple[float, float]] = {"small": (0.15, 0.20), "large": (0.28, 0.34)}
"""Box side as a fraction of the image side."""
RELATIONS = ("left_of", "right_of", "above", "below")
INVERSE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
RELATION_PHRASES = {
    "left_of": ("to the left of", "left of", "on the left of"),
    "right_of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
CLAUSE_TEMPLATES = ("a {s} {r} a {o}", "a {s} is {r} a {o}", "there is a {s} {r} a {o}", "a {s} placed {r} a {o}")
JOIN_TEMPLATES = ("{a} and {b}", "{a} while {b}", "{a} and also {b}")

HELDOUT_ATTRIBUTES = frozenset({
    ("red", "triangle"), ("blue", "circle"), ("green", "star"), ("yellow", "square"), ("purple", "diamond"),
})
"""(colour, shape) pairs that appear only in the held-out split (each shape and colour still appears
in training with other partners)."""
HELDOUT_RELATIONS = frozenset({
    ("circle", "left_of", "square"), ("triangle", "left_of", "star"), ("square", "left_of", "diamond"),
    ("diamond", "above", "circle"), ("star", "above", "triangle"), ("triangle", "above", "square"),
})
"""(shape, relation, shape) triples in canonical form (``canonical_relation``) that appear only in the
held-out split: e.g. no training image has a circle left of a square (= a square right of a circle)."""

NEGATIVE_TYPES = ("relation_swap", "attribute_swap", "shuffle")
GAP = 3
"""Minimum pixels between two object boxes."""
MARGIN = 2
"""Minimum pixels between a box and the image border."""


@dataclass
class SceneObject:
    size: str
    colour: str
    shape: str
    box: tuple[int, int, int, int]
    """(x0, y0, x1, y1) in pixels, x1/y1 exclusive; the shape is drawn inside."""

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


def canonical_relation(subject_shape: str, relation: str, object_shape: str) -> tuple[str, str, str]:
    """Write a relation with "left_of"/"above" only: (a, right_of, b) -> (b, left_of, a)."""
    if relation in ("right_of", "below"):
        return object_shape, INVERSE[relation], subject_shape
    return subject_shape, relation, object_shape


def relations_between(a: SceneObject, b: SceneObject) -> tuple[list[str], bool]:
    """Relations of ``a`` to ``b`` that hold (one per axis along which their boxes are separated) and
    whether the relation is clear (one axis, with at least half-box overlap along the other)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    held = []
    if ax1 <= bx0:
        held.append("left_of")
    elif bx1 <= ax0:
        held.append("right_of")
    if ay1 <= by0:
        held.append("above")
    elif by1 <= ay0:
        held.append("below")
    clear = False
    if len(held) == 1:
        if held[0] in ("left_of", "right_of"):
            overlap, extent = min(ay1, by1) - max(ay0, by0), min(ay1 - ay0, by1 - by0)
        else:
            overlap, extent = min(ax1, bx1) - max(ax0, bx0), min(ax1 - ax0, bx1 - bx0)
        clear = overlap >= extent / 2
    return held, clear


def boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 0) -> bool:
    """True when the boxes intersect or come closer than ``gap`` pixels."""
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


class _Redraw(Exception):
    """The sampled scene cannot give a valid caption/negatives; draw another."""


def _sample_objects(rng: random.Random, image_size: int, split: str) -> list[SceneObject]:
    count = rng.choice((2, 3))
    colours = rng.sample(sorted(COLOURS), count)  # distinct colours keep colour swaps meaningful
    objects, boxes = [], []
    for colour in colours:
        shapes = [s for s in SHAPES if split != "train" or (colour, s) not in HELDOUT_ATTRIBUTES]
        shape, size = rng.choice(shapes), rng.choice(sorted(SIZES))
        side = round(image_size * rng.uniform(*SIZES[size]))
        for _ in range(100):
            x0 = rng.randint(MARGIN, image_size - MARGIN - side)
            y0 = rng.randint(MARGIN, image_size - MARGIN - side)
            box = (x0, y0, x0 + side, y0 + side)
            if not any(boxes_overlap(box, other, GAP) for other in boxes):
                break
        else:
            raise _Redraw
        boxes.append(box)
        objects.append(SceneObject(size, colour, shape, box))
    return objects


def _relations(objects: list[SceneObject]) -> tuple[list[dict], list[tuple[int, int, str]]]:
    """Every relation that holds (lower index as subject) and the clear ones as (i, j, relation)."""
    held_all, clear = [], []
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            held, is_clear = relations_between(objects[i], objects[j])
            held_all += [{"subject": i, "relation": r, "object": j, "clear": is_clear} for r in held]
            if is_clear:
                clear.append((i, j, held[0]))
    return held_all, clear


def _spanning_clauses(rng: random.Random, n: int, clear: list[tuple[int, int, str]]) -> list[tuple[int, str, int]]:
    """Clear relations, as (subject, relation, object) with a random direction, connecting all ``n``
    objects (a random spanning tree of the clear-relation graph)."""
    edges = clear[:]
    rng.shuffle(edges)
    component = list(range(n))

    def root(i):
        while component[i] != i:
            i = component[i]
        return i

    chosen = []
    for i, j, relation in edges:
        if root(i) != root(j):
            component[root(i)] = root(j)
            chosen.append((i, relation, j) if rng.random() < 0.5 else (j, INVERSE[relation], i))
    if len(chosen) != n - 1:
        raise _Redraw
    rng.shuffle(chosen)
    return chosen


def _clause(template: str, phrase: str, subject: str, obj: str) -> str:
    return template.format(s=subject, r=phrase, o=obj)


def _swap_attribute(a: SceneObject, b: SceneObject, attribute: str) -> tuple[str, str]:
    """The two noun phrases with ``attribute`` exchanged between them."""
    values = {"size": (a.size, b.size), "colour": (a.colour, b.colour)}
    first, second = values[attribute]
    if attribute == "size":
        return f"{second} {a.colour} {a.shape}", f"{first} {b.colour} {b.shape}"
    return f"{a.size} {second} {a.shape}", f"{b.size} {first} {b.shape}"


def describe(objects: list[SceneObject], clauses: list[tuple[int, str, int]], rng: random.Random
             ) -> tuple[str, dict[str, str]]:
    """Caption and the three hard negatives for a scene described by ``clauses``."""
    templates = [rng.choice(CLAUSE_TEMPLATES) for _ in clauses]
    phrases = [rng.choice(RELATION_PHRASES[relation]) for _, relation, _ in clauses]
    join = rng.choice(JOIN_TEMPLATES)
    texts = [_clause(template, phrase, objects[s].phrase, objects[o].phrase)
             for template, phrase, (s, _, o) in zip(templates, phrases, clauses)]

    def assemble(first: str) -> str:
        return first if len(texts) == 1 else join.format(a=first, b=texts[1])

    caption = assemble(texts[0])
    subject, _, obj = clauses[0]
    a, b = objects[subject], objects[obj]
    relation_swap = assemble(_clause(templates[0], phrases[0], b.phrase, a.phrase))
    attribute_swap = None
    for attribute in ("colour", "size"):
        candidate = assemble(_clause(templates[0], phrases[0], *_swap_attribute(a, b, attribute)))
        if candidate not in (caption, relation_swap):
            attribute_swap = candidate
            break
    if attribute_swap is None:  # same shape and size: every swap reads like the relation swap
        raise _Redraw
    words = caption.split()
    for _ in range(20):
        rng.shuffle(words)
        shuffle = " ".join(words)
        if shuffle not in (caption, relation_swap, attribute_swap):
            break
    else:
        raise _Redraw
    return caption, {"relation_swap": relation_swap, "attribute_swap": attribute_swap, "shuffle": shuffle}


def _novel(objects: list[SceneObject], relations: list[dict], clauses: list[tuple[int, str, int]]) -> dict:
    """Held-out combinations: in objects / in any relation that holds / in the caption's clauses."""
    attributes = sorted({f"{o.colour} {o.shape}" for o in objects if (o.colour, o.shape) in HELDOUT_ATTRIBUTES})

    def triples(items):
        found = set()
        for s, r, o in items:
            triple = canonical_relation(objects[s].shape, r, objects[o].shape)
            if triple in HELDOUT_RELATIONS:
                found.add(" ".join(triple))
        return sorted(found)

    return {
        "attributes": attributes,
        "relations_held": triples((r["subject"], r["relation"], r["object"]) for r in relations),
        "relations_captioned": triples(clauses),
    }


def sample_scene(seed: int, split: str, index: int, image_size: int = 96) -> dict:
    """The metadata of scene ``index`` of ``split`` ("train" or "heldout"): objects, relations, caption,
    negatives, novel combinations. Deterministic for (seed, split, index, image_size)."""
    rng = random.Random(f"fastvl-synth:{seed}:{split}:{index}:{image_size}")
    for _ in range(1000):
        try:
            objects = _sample_objects(rng, image_size, split)
            relations, clear = _relations(objects)
            novel = _novel(objects, relations, [])
            if split == "train" and (novel["attributes"] or novel["relations_held"]):
                continue
            clauses = _spanning_clauses(rng, len(objects), clear)
            novel = _novel(objects, relations, clauses)
            if split != "train" and not (novel["attributes"] or novel["relations_captioned"]):
                continue
            caption, negatives = describe(objects, clauses, rng)
        except _Redraw:
            continue
        grey = rng.randint(100, 150)  # neutral: no object colour blends into it
        background = tuple(grey + rng.randint(-6, 6) for _ in range(3))
        return {
            "key": f"{split}-{index:07d}",
            "split": split,
            "image_size": image_size,
            "background": list(background),
            "objects": [{"size": o.size, "colour": o.colour, "shape": o.shape, "box": list(o.box)} for o in objects],
            "relations": relations,
            "caption_relations": [{"subject": s, "relation": r, "object": o} for s, r, o in clauses],
            "caption": caption,
            "negatives": negatives,
            "novel": novel,
        }
    raise RuntimeError(f"could not draw a valid {split} scene {index} at image size {image_size}; "
                       "the image is too small for the object sizes")


def _shape_points(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "triangle":
        return [(x0, y1), (x1, y1), (cx, y0)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(shape)


def render(scene: dict, supersample: int = 2) -> Image.Image:
    """Draw a scene (``sample_scene`` output) at ``supersample`` x resolution and box-filter it down,
    which antialiases the edges."""
    size = scene["image_size"] * supersample
    image = Image.new("RGB", (size, size), tuple(scene["background"]))
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        x0, y0, x1, y1 = (v * supersample for v in obj["box"])
        box = (x0, y0, x1 - 1, y1 - 1)  # Pillow boxes are inclusive
        colour = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=colour)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon(_shape_points(obj["shape"], box), fill=colour)
    return image.reduce(supersample) if supersample > 1 else image


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)  # 4:4:4: keep small shapes' colours
    return buffer.getvalue()


def generate(out: str | Path, train: int = 4000, heldout: int = 400, seed: int = 0, image_size: int = 96,
             shard_size: int = 1000, progress: bool = True) -> dict:
    """Write the train and held-out splits under ``out`` (see the module docstring) and return the
    summary also saved as ``out/info.json``."""
    from tqdm import tqdm

    if image_size < 32:
        raise ValueError("image_size must be at least 32 pixels")
    out = Path(out)
    started = time.perf_counter()
    summary = {"seed": seed, "image_size": image_size, "shard_size": shard_size, "splits": {},
               "heldout_attributes": sorted(" ".join(p) for p in HELDOUT_ATTRIBUTES),
               "heldout_relations": sorted(" ".join(t) for t in HELDOUT_RELATIONS)}
    with tqdm(total=train + heldout, desc="synth", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for split, count in (("train", train), ("heldout", heldout)):
            with ShardWriter(out / split, shard_size) as writer:
                for index in range(count):
                    scene = sample_scene(seed, split, index, image_size)
                    writer.write(scene["key"], {"jpg": encode_jpeg(render(scene)), "txt": scene["caption"],
                                                "json": scene})
                    bar.update(1)
            summary["splits"][split] = {"samples": count, "shards": [p.name for p in writer.paths]}
    (out / "info.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fastvl data synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/synth", help="output folder (train/ and heldout/ go inside)")
    parser.add_argument("--train", type=int, default=4000, help="training samples")
    parser.add_argument("--heldout", type=int, default=400, help="held-out samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    summary = generate(args.out, args.train, args.heldout, args.seed, args.image_size, args.shard_size,
                       progress=not args.quiet)
    for split, info in summary["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards under {Path(args.out) / split}")
    print(f"done in {summary['seconds']} s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fastvl data synth ...`` (the arguments after "synth")."""
    return run(build_parser().parse_args(argv))
