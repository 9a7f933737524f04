"""Data: sources -> normalize -> exact dedup -> sentencepiece tokenizer -> Megatron .bin/.idx -> blended datasets."""
