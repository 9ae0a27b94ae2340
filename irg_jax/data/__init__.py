"""Data: IRG's parquet conversation format, image transforms, tokenizers, packing, Grain pipeline."""
