"""Data: sources -> HTML/normalize -> quality filters -> language id -> PII -> exact and MinHash dedup ->
sentencepiece tokenizer -> Megatron .bin/.idx -> mix plan and blended datasets (`python -m data`)."""
