"""Builds tiny but real Hugging Face models locally (nothing is downloaded): used by tests and `make demo`.

    python tests/tinymodel.py OUT_DIR [--seed N] [--shards N]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

CORPUS = [
    "<s>Human: What is a model registry?\n</s><s>Assistant: A catalog of model weights with checksums.\n</s>",
    "<s>Human: How do I merge a LoRA adapter?\n</s><s>Assistant: Fuse it into the base weights.\n</s>",
    "<s>Human: Why quantize to int4?\n</s><s>Assistant: To fit a large model in less memory.\n</s>",
    "The quick brown fox jumps over the lazy dog. Every shard has a SHA-256 digest.",
    "Llama models are decoder-only transformers trained on large amounts of text.",
]


def build_tokenizer(out: Path) -> None:
    """Train a small byte-level BPE tokenizer on a few lines and save it in transformers' format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + 64, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)


def build_tiny_llama(out: Path, seed: int = 0, shards: int = 1) -> Path:
    """A random LlamaForCausalLM (hidden 64, 2 layers) with its tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    # About 100 KB a shard: enough to split the tiny model into `shards` files.
    max_shard = "100KB" if shards > 1 else "2GB"
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard)
    build_tokenizer(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    build_tiny_llama(args.out, args.seed, args.shards)
    print(json.dumps(sorted(p.name for p in args.out.iterdir())))


def synthetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Short paragraphs with real structure (templates), so a tiny model can learn them and perplexity means something."""
    import random

    rng = random.Random(seed)
    subjects = ["The registry", "A worker", "The store", "Every shard", "The merged model", "A base model",
                "The adapter", "The catalog"]
    verbs = ["records", "verifies", "keeps", "hashes", "exports", "quantizes", "tags", "downloads"]
    objects = ["the weights", "each file", "its lineage", "a checksum", "the tokenizer", "every blob",
               "the manifest", "the calibration text"]
    endings = ["before it is used.", "for the whole team.", "on every host.", "without reading it twice.",
               "in the background.", "as it arrives."]
    corpus = []
    for _ in range(n):
        lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(endings)}"
                 for _ in range(rng.randint(2, 4))]
        if rng.random() < 0.3:
            lines = [f"<s>Human: Who {rng.choice(verbs)} {rng.choice(objects)}?\n</s><s>Assistant: {lines[0]}\n</s>"]
        corpus.append(" ".join(lines))
    return corpus


def train_tiny_llama(out: Path, corpus: list[str], steps: int = 300, seed: int = 0) -> Path:
    """A tiny Llama and a byte-level BPE tokenizer trained on `corpus` on the CPU, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(out)
    ids = torch.tensor([t for text in corpus for t in tokenizer(text + "\n").input_ids])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, batch = 64, 16
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s:s + seq] for s in starts])
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    return out
