"""rcnn_trainer: a config-driven two-stage (Faster R-CNN family) detector trainer.

Layers, top to bottom: config -> data -> model -> losses -> engine -> monitor -> cli.
"""

__version__ = "0.1.0"
