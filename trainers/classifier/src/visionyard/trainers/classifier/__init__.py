"""Visionyard's built-in PyTorch image classifier trainer (ImageFolder in, checkpoints out)."""
