"""After training: what the model and the labels get wrong (rcnn-eval --analyze)."""
