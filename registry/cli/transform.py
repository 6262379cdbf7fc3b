"""Commands that make new models from registered ones, or run them: merge, quantize, generate."""
from __future__ import annotations

import sys

import click

from .. import remote, render
from . import cli
from . import remote as remote_cli
from .common import _fast_read, _reg, _result, _run, detach_option, float_range, int_range, json_option


@cli.command()
@click.argument("base")
@click.argument("adapter")
@click.option("--name", help="Name of the merged artifact (default: ADAPTER-merged).")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Output dtype of float tensors (auto keeps the base's).")
@click.option("--check", is_flag=True, help="Also run one prompt through peft (base + adapter) and the merged "
                                            "model, and record the largest logit difference.")
@click.option("--force", is_flag=True, help="Merge even though the adapter names another base model.")
@click.option("--allow-pickle", is_flag=True, help="Accept an adapter_model.bin (loaded with weights_only=True).")
@detach_option
@json_option
def merge(base, adapter, name, dtype, check, force, allow_pickle, detach, as_json) -> None:
    """Fuse a LoRA ADAPTER into its BASE, tensor by tensor, exactly as peft's merge_and_unload.

    \b
    Examples:
      registry merge llama-7b my-lora --name llama-7b-chat
      registry merge llama-7b my-lora --dtype bf16 --check
    """
    if remote.configured():
        if allow_pickle:  # loading a pickle runs code from it: never on a shared server's say-so from a client
            remote_cli.refuse("merge --allow-pickle", "is not accepted by a catalog server")
        body = {"type": "merge", "base": base, "adapter": adapter, "name": name, "dtype": dtype, "check": check,
                "force": force}
        return _merged(base, adapter, remote_cli.run(body, detach, as_json), as_json)
    from ..submit import merge_request

    req = merge_request(_reg(), base, adapter, name, dtype, check, force, allow_pickle)  # refuses what it can now
    _merged(base, adapter, _run(req.type, req.params, req.dedup_key, detach, as_json), as_json)


def _merged(base: str, adapter: str, job, as_json: bool) -> None:
    r = _result(job, as_json)
    if r is None:
        return
    click.echo(f"merged {adapter} into {base}: {r['name']} {r['digest']} ({r['tensors_merged']} tensors merged, "
               f"{r['tensors_replaced']} replaced, {render.human_size(r['bytes_added'])} added to the store)")
    if r["check"]:
        click.echo(f"check: largest logit difference against peft {r['check']['max_logit_diff']:.3g}")


@cli.command()
@click.argument("ref")
@click.option("--bits", default=4, show_default=True, type=int, help="Bits per weight: 2, 3, 4 or 8.")
@click.option("--group-size", default=128, show_default=True, type=int, help="Columns per quantization group (-1: none).")
@click.option("--desc-act/--no-desc-act", default=False, show_default=True, help="Quantize columns by activation order.")
@click.option("--sym/--no-sym", default=True, show_default=True, help="Symmetric quantization.")
@click.option("--calibration", type=click.Path(dir_okay=False), help=".txt (a sample per paragraph) or .jsonl "
              "(text, or conversations); default: a built-in set of English and Chinese prose, dialogue and code.")
@click.option("--samples", type=int, help="Calibration samples to use  [default: 128, or all there are, with a "
              "warning, when the text has fewer].")
@click.option("--seq-len", default=512, show_default=True, type=int, help="Tokens per calibration sample at most.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for sampling and the engine.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--no-eval", is_flag=True, help="Skip the perplexity evaluation.")
@click.option("--max-ppl-ratio", default=1.5, show_default=True, type=float_range(0, min_open=True),
              help="Fail when quantized perplexity exceeds this multiple of the source's.")
@click.option("--name", help="Artifact name (default: REF-gptq-intN).")
@detach_option
@json_option
def quantize(ref, bits, group_size, desc_act, sym, calibration, samples, seq_len, seed, device, no_eval,
             max_ppl_ratio, name, detach, as_json) -> None:
    """Quantize a base or merged model to int4 (GPTQ, with GPTQModel) and evaluate it.

    \b
    Examples:
      registry quantize llama-7b-chat --bits 4 --group-size 128
      registry quantize llama-7b-chat --calibration chats.jsonl --samples 256 --device cuda
    """
    if remote.configured():
        remote_cli.refuse_host_path("--calibration", calibration)
        body = {"type": "quantize", "ref": ref, "bits": bits, "group_size": group_size, "desc_act": desc_act,
                "sym": sym, "samples": samples, "seq_len": seq_len, "seed": seed, "device": device,
                "evaluate": not no_eval, "max_ppl_ratio": max_ppl_ratio, "name": name}
        return _quantized(ref, remote_cli.run(body, detach, as_json), as_json)
    from ..submit import quantize_request

    req = quantize_request(_reg(), ref, bits, group_size, desc_act, sym, samples, seq_len, seed, device,
                           not no_eval, max_ppl_ratio, name, calibration=calibration)
    _quantized(ref, _run(req.type, req.params, req.dedup_key, detach, as_json), as_json)


def _quantized(ref: str, job, as_json: bool) -> None:
    r = _result(job, as_json)
    if r is None:
        return
    click.echo(f"quantized {ref} into {r['name']} {r['digest']}: {render.human_size(r['size'])}")
    if r["evaluation"]:
        e = r["evaluation"]
        click.echo(f"perplexity {e['perplexity_quantized']} vs {e['perplexity_source']} for the source "
                   f"({e['perplexity_ratio']}x); weights {e['size_reduction'] * 100:.0f}% smaller")


@cli.command()
@click.argument("ref")
@click.option("--prompt", required=True, help="Text to continue (or, with --chat, to answer).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the chat template (or <s>Human: ...</s><s>Assistant: ).")
@click.option("--max-new-tokens", default=128, show_default=True, type=int_range(1, 8192))
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def generate(ref, prompt, chat, max_new_tokens, device) -> None:
    """Generate text with a registered model, streaming tokens to stdout as they are produced.

    An adapter runs on top of its registered base. A GGUF artifact runs through llama.cpp (greedy; needs
    'registry[gguf]', not torch). --device cuda needs a CUDA GPU, or for a GGUF a CUDA build of llama.cpp
    (exit 2 without one).

    \b
    Examples:
      registry generate llama-7b-chat-gptq-int4 --prompt "Hello"
      registry generate llama-7b-chat --prompt "What is a LoRA adapter?" --chat --max-new-tokens 64
      registry generate llama-7b-chat-gguf-q4_k_m --prompt "你好" --chat
    """
    from ..errors import BadInput

    if remote.configured():
        remote_cli.refuse("registry generate", "runs a model from a local store")
    if not prompt.strip():
        raise BadInput("--prompt is empty; give the text to continue (or, with --chat, to answer)")
    if _kind_of(ref) == "gguf":  # llama.cpp, without torch
        from ..gguf.run import generate as run_generate
    else:
        from ..ml import require_ml

        require_ml("generate")
        from ..generate import generate as run_generate

    for piece in run_generate(_reg(), ref, prompt, chat, max_new_tokens, device):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _kind_of(ref: str) -> str:
    """The kind of the artifact REF names, read without the ORM where it can be (fastread.py)."""
    kind = _fast_read(lambda c: c.resolve(ref)["kind"])
    if kind is None:
        from .. import catalog

        with _reg().read_session() as s:
            kind = catalog.resolve(s, ref).kind
    return kind
