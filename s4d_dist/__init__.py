"""s4d_dist: distributed training for S4D (Static for Dynamic facial expression recognition).

Data flows one way: shards → data pipelines → models → train (DeepSpeed) ← orchestrate (Ray).
"""
