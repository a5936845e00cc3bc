"""Training and evaluating the embedded glm5-tiny: its corpus, tokenizer, training run and evaluation."""
