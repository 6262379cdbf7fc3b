"""`registry convert`: GGUF variants for llama.cpp and Ollama (registry.gguf)."""
from __future__ import annotations

import click

from .. import remote, render
from ..gguf.options import OUTTYPES, PRE_TOKENIZERS
from . import cli
from . import remote as remote_cli
from .common import _reg, _result, _run, detach_option, float_range, json_option


@cli.command()
@click.argument("ref")
@click.option("--to", "to", type=click.Choice(["gguf"]), required=True, help="The format to make (gguf).")
@click.option("--outtype", type=click.Choice(OUTTYPES), default="f16", show_default=True,
              help="f16, bf16 and q8_0 come from llama.cpp's converter; the K-quants (q4_k_m, q5_k_m, q6_k) from "
                   "its quantizer, run on the f16 file.")
@click.option("--pre-tokenizer", metavar="NAME",
              help="The llama.cpp pre-tokenizer of a byte-level BPE vocabulary its converter does not recognise, "
                   f"recorded with a warning; one of: {', '.join(PRE_TOKENIZERS)}.")
@click.option("--no-eval", is_flag=True, help="Skip the evaluation (tokenizer, greedy tokens, perplexity).")
@click.option("--max-ppl-ratio", default=1.5, show_default=True, type=float_range(0, min_open=True),
              help="Fail when the GGUF's perplexity exceeds this multiple of the source's.")
@click.option("--allow-tokenizer-mismatch", is_flag=True,
              help="Register the GGUF even when llama.cpp tokenizes the test strings differently from the source "
                   "(recorded as a warning).")
@click.option("--name", help="Artifact name (default: REF-gguf-OUTTYPE).")
@detach_option
@json_option
def convert(ref, to, outtype, pre_tokenizer, no_eval, max_ppl_ratio, allow_tokenizer_mismatch, name, detach,
            as_json) -> None:
    """Convert a base or merged model to one GGUF file for llama.cpp and Ollama, and evaluate it.

    The converter is llama.cpp's own (convert_hf_to_gguf.py); the result is an artifact of kind gguf with
    lineage to REF. Unless --no-eval, llama.cpp must tokenize Chinese and English text exactly as REF's
    tokenizer does, and the perplexity ratio must stay within --max-ppl-ratio; otherwise nothing is registered.

    \b
    Examples:
      registry convert llama-7b-chat --to gguf --outtype q4_k_m
      registry convert llama-7b-chat --to gguf --outtype q8_0 --name llama-7b-chat.q8 --detach
      registry convert my-bpe-model --to gguf --pre-tokenizer qwen2
    """
    if remote.configured():
        body = {"type": "convert", "ref": ref, "to": to, "outtype": outtype, "pre_tokenizer": pre_tokenizer,
                "evaluate": not no_eval, "max_ppl_ratio": max_ppl_ratio,
                "allow_tokenizer_mismatch": allow_tokenizer_mismatch, "name": name}
        return _converted(ref, remote_cli.run(body, detach, as_json), as_json)
    from ..submit import convert_request

    req = convert_request(_reg(), ref, to, outtype, pre_tokenizer, not no_eval, max_ppl_ratio,
                          allow_tokenizer_mismatch, name)
    _converted(ref, _run(req.type, req.params, req.dedup_key, detach, as_json), as_json)


def _converted(ref: str, job, as_json: bool) -> None:
    r = _result(job, as_json)
    if r is None:
        return
    click.echo(f"converted {ref} into {r['name']} {r['digest']}: GGUF {r['outtype']}, {render.human_size(r['size'])}")
    e = r["evaluation"]
    if e:
        t, g = e["tokenizer"], e["greedy"]
        click.echo(f"tokenizer: {t['strings'] - t['mismatches']} of {t['strings']} strings tokenized as the source "
                   f"does; greedy: {g['equal']} of {g['tokens']} tokens equal")
        click.echo(f"perplexity {e['perplexity_quantized']} vs {e['perplexity_source']} for the source "
                   f"({e['perplexity_ratio']}x); file {e['size_reduction'] * 100:.0f}% smaller than the weights")
