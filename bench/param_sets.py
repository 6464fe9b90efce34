"""Parameter sets to benchmark, built from shape lists (no downloads, no model code).

A set is a name and a list of tensor shapes in the order a model's ``parameters()`` yields them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ParamSet:
    name: str
    family: str  # "model", "many-tiny", "few-huge" or "overhead": the plot draws one line per family
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)


def resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision's resnet50: bottleneck blocks [3, 4, 6, 3], expansion 4, biases only in BN and fc."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out_ch = planes * 4
            shapes += [(planes, in_ch, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (out_ch, planes, 1, 1), (out_ch,), (out_ch,)]
            if block == 0:  # the downsample projection: 1x1 conv and its BN
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(1000, 2048), (1000,)]
    return shapes


def bert_large_shapes(vocab: int = 30522, hidden: int = 1024, layers: int = 24, intermediate: int = 4096,
                      max_positions: int = 512, type_vocab: int = 2) -> list[tuple[int, ...]]:
    """Hugging Face's BertModel (bert-large-uncased): embeddings, 24 encoder layers, pooler."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden), (max_positions, hidden), (type_vocab, hidden),
                                     (hidden,), (hidden,)]
    for _ in range(layers):
        for _ in range(3):  # query, key, value
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden, hidden), (hidden,), (hidden,), (hidden,)]  # attention output dense + LayerNorm
        shapes += [(intermediate, hidden), (intermediate,)]
        shapes += [(hidden, intermediate), (hidden,), (hidden,), (hidden,)]  # output dense + LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


TINY_LAYER = 4096  # elements per layer of the many-tiny sweep: launch- and Python-overhead bound
HUGE_LAYERS = 4  # layers in the few-huge sweep: bandwidth bound


def many_tiny(total: int) -> ParamSet:
    count = max(1, total // TINY_LAYER)
    return ParamSet(f"many-tiny-{_short(total)}", "many-tiny", ((64, TINY_LAYER // 64),) * count)


def few_huge(total: int) -> ParamSet:
    rows = max(1, total // HUGE_LAYERS // 1024)
    return ParamSet(f"few-huge-{_short(total)}", "few-huge", ((rows, 1024),) * HUGE_LAYERS)


def _short(n: int) -> str:
    for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def all_sets() -> dict[str, ParamSet]:
    sets = [ParamSet("resnet50", "model", tuple(resnet50_shapes())),
            ParamSet("bert-large", "model", tuple(bert_large_shapes()))]
    sets += [many_tiny(2**20 * m) for m in (1, 4, 16)]
    sets += [few_huge(2**20 * m) for m in (1, 4, 16, 64, 256, 1024)]
    # Host overhead alone: 2000 layers of one element each, 2-D so that every layer takes the trust-ratio path
    # (the default exclusion skips 1-D tensors). Nothing to stream: the time is the per-layer work on the host.
    sets.append(ParamSet("many-tiny-2000x1", "overhead", ((1, 1),) * 2000))
    sets.append(ParamSet("tiny", "model", ((16, 8), (37,), (1,), (3, 3, 4, 4), (300, 7))))  # tests, smoke runs
    return {s.name: s for s in sets}


# What runs when --sets is not given: the CPU defaults finish in a few minutes on two cores; the GPU ones
# span 1 M .. 1 G parameters. BERT-large fp32 with state is ~5 GB per optimizer: GPU only by default.
DEFAULT_SETS = {
    "cpu": ("resnet50", "many-tiny-1M", "many-tiny-2000x1", "few-huge-1M", "few-huge-4M", "few-huge-16M"),
    "cuda": ("resnet50", "bert-large", "many-tiny-1M", "many-tiny-4M", "many-tiny-2000x1", "few-huge-1M",
             "few-huge-16M", "few-huge-256M", "few-huge-1G"),
}
