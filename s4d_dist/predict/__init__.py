"""Expression probabilities from a trained model for images, video files and frame folders.

    python -m s4d_dist.predict --model RUN_FOLDER_OR_CHECKPOINT INPUT ...   (__main__.py)

inputs.py lists and decodes what the user names, shards/faces.py (shared with the shard
builder) picks the square to keep, model.py loads a run folder or an official checkpoint,
core.py cuts the evaluation's views and scores.
"""
