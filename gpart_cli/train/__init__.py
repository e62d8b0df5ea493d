"""Training: the loop (`trainer`), resumable checkpoints (`checkpoint`), and progress display."""
