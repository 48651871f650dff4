"""scRNA-seq denoising (in progress): the OpenProblems split and metrics with the rule that closes
the scale shortcut (metrics.py). The task itself is not registered yet."""
