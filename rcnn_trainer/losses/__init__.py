"""Loss functions of the two heads and their normalization.

reduce.py      the avg_factor (all-reduced under DDP) and sum / avg_factor
classification objectness (BCE / sigmoid focal) and RoI class (CE / softmax focal) per element
box            box regression per positive (smooth L1, L1 on deltas; GIoU / DIoU / CIoU on boxes)
heads          loss_rpn_cls, loss_rpn_box, loss_roi_cls, loss_roi_box: what the heads call
weighting      loss weights, applied in one place
"""
