"""What runs under every room and knows no model: the precision decision (`core.precision`), step-named atomic
safetensors checkpoints and the learning-rate schedule rebuilt from the step (`core.checkpoints`), and the
seeded, resumable batch loader both trainers draw from (`core.loader`). Imports nothing of the project."""
