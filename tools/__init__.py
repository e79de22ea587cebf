"""Tools around the pipeline: the demo, the benchmark and the tokenizer ablation (not the paper's code)."""
