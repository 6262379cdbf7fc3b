"""Tiny but real models for the GGUF tests (nothing is downloaded): hidden 256 and intermediate 512, so every
weight row is a multiple of llama.cpp's K-quant block of 256 and q4_k_m really makes Q4_K tensors.

- build_sp_llama: a Llama with a SentencePiece `tokenizer.model` trained here on Chinese and English text
  (byte fallback, as Llama's own), plus the tokenizer.json transformers makes from it.
- build_bpe_llama: the same model shape with tinymodel.py's byte-level BPE tokenizer (tokenizer.json only,
  GPT-2's pre-tokenizer regex); llama.cpp's converter does not recognise its vocabulary by hash.
- build_qwen_style_llama: a byte-level BPE tokenizer that splits text with Qwen2's regex; converting it as
  "gpt-2" tokenizes Chinese differently, which the evaluation gate must catch.

    python tests/ggufmodels.py OUT_DIR [--kind sp|bpe|qwen] [--seed N]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tinymodel import CORPUS, build_tokenizer

ZH = [
    "模型注册表记录每个文件的校验和与来源。",
    "把低秩适配器合并到基础模型以后，再量化成四比特。",
    "今天天气很好，我们去公园散步吧。",
    "中文和英文混合的句子：registry 可以导出 GGUF 文件。",
    "请用一句话解释什么是大语言模型。",
    "你好！我是一个小型的测试模型，只有两层。",
    "数据、权重和分词器必须一起校验。",
    "人类：你会写诗吗？\n助手：会的，请给我一个题目。",
]
EN = [
    "The registry records a checksum and the lineage of every model it holds.",
    "Convert the merged model to GGUF, then run it with llama.cpp or Ollama.",
    "Numbers like 3.14159 and 2048 are split into digits: 1 2 3.",
    "Double  spaces,\ttabs and\nnew lines must survive the tokenizer.",
    "Emoji 🙂 and accents café naïve are bytes to a byte-level tokenizer.",
]
TEXT = ZH + EN + CORPUS

# Qwen2's pre-tokenizer regex (llama.cpp knows it as "qwen2"): digits one by one, CJK runs kept together.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def _model(out: Path, vocab_size: int, seed: int, bos: int = 1, eos: int = 2) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)


def build_sp_tokenizer(out: Path, vocab_size: int = 512) -> None:
    """Train a SentencePiece BPE model (byte fallback, ids 0/1/2 = <unk>/<s>/</s>, as Llama's) and save it with
    the tokenizer.json and tokenizer_config.json transformers makes from it."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "sp-corpus.txt"
    corpus.write_text("\n".join(TEXT * 3) + "\n", encoding="utf-8")
    # remove_extra_whitespaces=False and the identity normalizer: SentencePiece then keeps text as transformers'
    # tokenizer.json does (with the defaults, double spaces differ between the two).
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, num_threads=1,
        minloglevel=2)
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    # add_bos_token=True: without it transformers 5 adds no <s>, and llama.cpp (which reads it) would not either.
    LlamaTokenizer.from_pretrained(out, add_bos_token=True).save_pretrained(out)


def build_sp_llama(out: Path, seed: int = 0) -> Path:
    """A random Llama (hidden 256, 2 layers) with a locally trained SentencePiece tokenizer."""
    out = Path(out)
    build_sp_tokenizer(out)
    _model(out, 512, seed)
    return out


def build_bpe_llama(out: Path, seed: int = 0) -> Path:
    """The same model shape with tinymodel.py's byte-level BPE tokenizer (tokenizer.json only)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    _model(out, 320, seed)
    return out


def build_qwen_style_llama(out: Path, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer with Qwen2's split regex, trained on Chinese and English, and the model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    _model(out, 512, seed, bos=0, eos=0)
    return out


BUILDERS = {"sp": build_sp_llama, "bpe": build_bpe_llama, "qwen": build_qwen_style_llama}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kind", choices=sorted(BUILDERS), default="sp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = BUILDERS[args.kind](args.out, args.seed)
    print(sorted(p.name for p in path.iterdir()))
