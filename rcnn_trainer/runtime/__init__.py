"""What training and inference share: devices and precision, distributed helpers, checkpoint files."""
