"""Training an adapted model: ``fit``, its optimizer and schedule, the methods' life cycles,
checkpoints and RUN directories, activation checkpointing, distributed runs, the HF Trainer
callback."""
