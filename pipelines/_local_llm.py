"""A local Hugging Face causal LM as a plain ``prompt -> answer`` function, shared by the pipeline recipes.

Greedy decoding through the model's chat template when it has one. Point it at any instruction-tuned model
directory you have on disk (e.g. a downloaded Qwen/Qwen3-0.6B); nothing is downloaded here.
"""

from __future__ import annotations

from pathlib import Path


class LocalGenerator:
    def __init__(self, path: str, *, device: str | None = None, max_new_tokens: int = 256) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(path).is_dir():
            raise SystemExit(f"--llm {path}: not a local model directory (expected config.json + weights + tokenizer)")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.name = Path(path).name

    def __call__(self, prompt: str) -> str:
        import torch

        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = prompt
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=not self.tokenizer.chat_template)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
