"""Model: backbone + FPN (torchvision) -> RPN -> RoI box heads. build.py maps config to modules."""
