"""Dataset converters: raw datasets → WebDataset shards (installed as `s4d_dist.shards`)."""
