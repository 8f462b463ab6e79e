"""Head sizes for `auto`: the light head of the CPU demo below MANY_CLASSES classes, the wide
head of configs/many_classes.yaml from there.

Measured (tools/recipe_bench.py, real handwritten digits, 10 classes, 300 iterations of batch
4): the light head found the digits but confused their classes, AP 0.066; the wide one 0.102,
at ~2.3x the time per iteration. On the 4-class synthetic shapes the light head trains to
AP50 >= 0.9 in the default run's minutes.
"""

from __future__ import annotations

MANY_CLASSES = 10
# the mask head follows the box head: torchvision's 4 x 256 convs when wide, 2 x 64 when light
# (a 14 x 14 conv stack per positive RoI is the mask branch's cost on CPU)
LIGHT_HEAD = {"fpn_channels": 64, "representation_size": 256, "roi_batch_size_per_image": 64,
              "mask_num_convs": 2, "mask_conv_channels": 64}
WIDE_HEAD = {"fpn_channels": 128, "representation_size": 1024, "roi_batch_size_per_image": 128,
             "mask_num_convs": 4, "mask_conv_channels": 256}


def head_for(num_classes: int) -> dict[str, int]:
    return WIDE_HEAD if num_classes >= MANY_CLASSES else LIGHT_HEAD
