"""Causal language models (Llama, Qwen2, Mistral, GPT-2): model folders, JSONL tasks, lm-evaluation-harness-style
scoring, full fine-tuning (`family.CausalLMFamily`)."""
