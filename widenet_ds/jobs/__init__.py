"""The training jobs (pretraining, GLUE fine-tuning, grids) and what they share."""
