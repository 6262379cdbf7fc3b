"""Running llama.cpp's converter (convert_main.py, a subprocess) and turning what it did into a Conversion or
one of the registry's errors. Nothing here imports torch, the converter or llama.cpp."""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInput, DiskFull, OperationFailed
from .options import K_QUANT_TENSOR_TYPE, file_stem
from .tokenizer import TokenizerPlan
from .vendor import LLAMA_CPP_PYTHON_VERSION, VENDOR_DIR, supported_architectures

logger = logging.getLogger("registry.gguf")
CONVERT_MAIN = Path(__file__).resolve().parent / "convert_main.py"
# convert_main.py's exit codes (it imports nothing of ours, so they are repeated there).
EXIT_UNKNOWN_PRE_TOKENIZER = 3
EXIT_UNSUPPORTED_ARCHITECTURE = 4
EXIT_DISK_FULL = 5
POLL_SECONDS = 0.2  # how often a job's cancel is checked while the converter runs
LOG_NAME = "convert.log"
REPORT_NAME = "convert-report.json"
NEARLY_FULL = 1 << 20  # as convert_main.py: a write that hit ENOSPC leaves the file system almost exactly full
DISK_FULL_TEXT = re.compile(r"No space left on device|ENOSPC|\d+ requested and \d+ written")
PRE_TOKENIZER_EXAMPLES = "e.g. gpt-2, llama-bpe, qwen2"


@dataclass
class Conversion:
    """A finished GGUF file in the work folder and how it was made."""

    path: Path
    tokenizer: dict[str, Any]  # model, handling (one sentence), pre_tokenizer, override, requested, chkhsh
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def check_architecture(config: dict) -> None:
    """BadInput unless llama.cpp's converter has code for the model's architecture (config.json)."""
    arch = _architecture(config)
    if arch is None:
        raise BadInput("config.json names no architecture (\"architectures\"), and llama.cpp's converter "
                       "chooses its model code by it; add it (e.g. [\"LlamaForCausalLM\"]) and import the model again")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    text_arch = _architecture(text_config)
    if arch not in supported_architectures() and text_arch not in supported_architectures():
        raise BadInput(f"architecture {arch} is not supported by llama.cpp's converter (llama-cpp-python "
                       f"{LLAMA_CPP_PYTHON_VERSION}); it converts Llama, Mistral, Qwen, Gemma, Phi and about 260 "
                       "other architectures")


def _architecture(config: dict) -> str | None:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return None


def run_converter(source_dir: Path, work_dir: Path, filename: str, outtype: str, model_name: str,
                  plan: TokenizerPlan, reporter=None) -> Conversion:
    """Convert the model folder `source_dir` to `work_dir/filename` (K-quants through an f16 file, in the same
    subprocess). Writes only in work_dir; on any failure or stop nothing of the GGUF file is left there.

    `reporter.check()` (a job's; absent on plain reporters) is called every POLL_SECONDS and may raise: the
    converter is then killed and the exception propagates.
    """
    work_dir = Path(work_dir)
    (work_dir / REPORT_NAME).unlink(missing_ok=True)
    try:
        source_link = _named_source(Path(source_dir), work_dir, model_name)
    except OSError as exc:
        raise _disk_error(exc, model_name, outtype, work_dir) from None
    try:
        return _run(source_link, work_dir, filename, outtype, model_name, plan, reporter)
    finally:
        source_link.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            source_link.parent.rmdir()


def _named_source(source_dir: Path, work_dir: Path, model_name: str) -> Path:
    """The source folder under the model's own name (a symlink in work_dir): gguf-py fills general.basename,
    finetune, version and size_label from the folder's name when config.json has no model id, and a store's
    snapshot folder is named by a digest. Named like this, the file is what converting a folder of that name by
    hand gives, and the same source gives the same bytes wherever its snapshot is."""
    holder = work_dir / "source"
    holder.mkdir(exist_ok=True)
    link = holder / file_stem(model_name)
    link.unlink(missing_ok=True)
    link.symlink_to(source_dir.resolve(), target_is_directory=True)
    return link


def _run(source_dir: Path, work_dir: Path, filename: str, outtype: str, model_name: str, plan: TokenizerPlan,
         reporter) -> Conversion:
    out = work_dir / filename
    part = work_dir / f"{filename}.part"  # the converter writes here; renamed to `out` once complete
    report_path, log_path = work_dir / REPORT_NAME, work_dir / LOG_NAME
    cmd = [sys.executable, str(CONVERT_MAIN), str(source_dir), str(part), "--outtype", outtype,
           "--model-name", model_name, "--report", str(report_path), "--vendor-dir", str(VENDOR_DIR)]
    if plan.pre_tokenizer:
        cmd += ["--pre-tokenizer", plan.pre_tokenizer]
    # Offline: the converter reads only the folder (a tokenizer class it cannot find must not trigger a download).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("NO_LOCAL_GGUF", None)  # would make the converter skip its own gguf-py
    check = getattr(reporter, "check", None)
    started = time.monotonic()
    try:
        with open(log_path, "wb") as log:
            # Its own session: a Ctrl-C meant for us does not reach it half-way; we kill it below instead.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=work_dir, env=env, start_new_session=True)
    except OSError as exc:
        _remove_partials(work_dir, filename)
        raise _disk_error(exc, model_name, outtype, work_dir) from None
    try:
        while True:
            try:
                rc = proc.wait(timeout=POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                if check is not None:
                    check()
    except BaseException:  # stopped (cancel, lost lease, Ctrl-C): no converter may outlive us
        _kill(proc)
        _remove_partials(work_dir, filename)
        raise
    report = _read_report(report_path)
    if rc != 0 or not part.is_file():
        error = _failure(rc, report, log_path, work_dir, model_name, outtype)
        # The log goes with the scratch folder: `registry --debug` shows its end.
        logger.debug("llama.cpp's converter exited %s; the end of its log:\n%s", rc, _log_tail(log_path, 4096))
        _remove_partials(work_dir, filename)
        raise error
    part.replace(out)
    return _conversion(out, outtype, plan, report, time.monotonic() - started)


def _conversion(out: Path, outtype: str, plan: TokenizerPlan, report: dict, seconds: float) -> Conversion:
    from .inspect import read_gguf

    try:
        gguf = read_gguf(out)
    except BadInput as exc:
        out.unlink(missing_ok=True)
        raise OperationFailed(f"llama.cpp's converter wrote a file that does not read as GGUF: {exc}") from None
    warnings: list[str] = []
    pre = gguf.get("pre_tokenizer")
    chkhsh = report.get("chkhsh")
    override = bool(report.get("override"))
    if override:
        origin = "; ".join(plan.notes) or ("named by --pre-tokenizer" if plan.requested else "planned")
        handling = (f"byte-level BPE vocabulary that llama.cpp's converter does not recognise (chkhsh "
                    f"{(chkhsh or '?')[:12]}); converted with pre-tokenizer {pre}, {origin}")
        warnings.append(f"tokenizer: {handling}; the evaluation's tokenizer check shows whether llama.cpp now "
                        "splits text as the source does")
    elif plan.model == "sentencepiece":
        handling = "SentencePiece vocabulary converted from tokenizer.model (scores and byte fallback kept)"
    elif gguf.get("tokenizer_model") == "gpt2":
        handling = f"byte-level BPE vocabulary recognised by llama.cpp's converter as pre-tokenizer {pre}"
    else:
        handling = f"{plan.model} vocabulary converted by llama.cpp's converter as tokenizer model " \
                   f"{gguf.get('tokenizer_model')}"
    if plan.requested and not override:
        warnings.append(f"--pre-tokenizer {plan.pre_tokenizer} was not used: "
                        + ("the vocabulary is SentencePiece (tokenizer.model), which has no pre-tokenizer"
                           if plan.model == "sentencepiece" else
                           f"llama.cpp's converter recognised the vocabulary as {pre}"))
    fallback = k_quant_fallback(outtype, gguf["tensor_types"])
    if fallback:
        warnings.append(fallback)
    tokenizer = {"model": plan.model, "handling": handling, "pre_tokenizer": pre, "override": override,
                 "requested": plan.requested, "chkhsh": chkhsh}
    return Conversion(out, tokenizer, warnings, round(seconds, 3))


def k_quant_fallback(outtype: str, tensor_types: dict[str, int]) -> str | None:
    """A warning when a K-quant's weights are not all K-quant blocks: llama.cpp quantizes a tensor whose rows
    are not a multiple of 256 values with an older type instead (q4_K -> q5_0, q6_K -> q8_0, ...)."""
    if outtype not in K_QUANT_TENSOR_TYPE:
        return None
    weights = {t: n for t, n in tensor_types.items() if t != "F32"}  # F32: norms and biases, never quantized
    fallen = {t: n for t, n in weights.items() if not t.endswith("_K")}
    if not fallen:
        return None
    types = ", ".join(f"{t} x{n}" for t, n in sorted(fallen.items()))
    return (f"{sum(fallen.values())} of {sum(weights.values())} weight tensors are not K-quant blocks ({types}): "
            f"llama.cpp falls back where a row is not a multiple of 256 values, so this {outtype} file is larger "
            f"and quantized differently than {outtype} ({K_QUANT_TENSOR_TYPE[outtype]}) promises")


def _failure(rc: int, report: dict, log_path: Path, work_dir: Path, model_name: str, outtype: str) -> Exception:
    if rc == EXIT_UNKNOWN_PRE_TOKENIZER:
        chkhsh = report.get("chkhsh")
        return BadInput(f"llama.cpp's converter does not recognise {model_name}'s byte-level BPE vocabulary"
                        + (f" (chkhsh {chkhsh[:16]}...)" if chkhsh else "")
                        + " and its tokenizer.json shows no pre-tokenizer llama.cpp implements; name one with "
                        f"--pre-tokenizer ({PRE_TOKENIZER_EXAMPLES}): the one the model was trained with")
    if rc == EXIT_UNSUPPORTED_ARCHITECTURE:
        return BadInput(f"architecture {report.get('architecture')} is not supported by llama.cpp's converter "
                        f"(llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})")
    error = report.get("error") or _last_line(log_path)
    if rc == EXIT_DISK_FULL or report.get("disk_full") or DISK_FULL_TEXT.search(error or "") \
            or _nearly_full(work_dir):
        return DiskFull(f"disk full while converting {model_name} to GGUF {outtype} in {work_dir}; free space "
                        "(registry gc) and try again")
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return OperationFailed(f"llama.cpp's converter was killed by {name} (out of memory?); see the "
                               "machine's log, free memory and try again")
    return OperationFailed(f"llama.cpp's converter failed: {error or f'exit status {rc}'}")


def _read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # killed before it wrote one
    return report if isinstance(report, dict) else {}


def _log_tail(log_path: Path, size: int = 8192) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _last_line(log_path: Path) -> str | None:
    lines = [x.strip() for x in _log_tail(log_path).splitlines() if x.strip()]
    return lines[-1] if lines else None


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < NEARLY_FULL
    except OSError:
        return False


def _disk_error(exc: OSError, model_name: str, outtype: str, work_dir: Path) -> Exception:
    import errno

    if exc.errno == errno.ENOSPC:
        return DiskFull(f"disk full while converting {model_name} to GGUF {outtype} in {work_dir}; free space "
                        "(registry gc) and try again")
    return OperationFailed(f"cannot run llama.cpp's converter in {work_dir}: {exc}")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its session: the converter and anything it started
    except ProcessLookupError:
        pass
    proc.wait()


def _remove_partials(work_dir: Path, filename: str) -> None:
    """The GGUF file's partial outputs: FILE.part and the K-quants' f16 file FILE.part.f16.part."""
    for path in work_dir.glob(f"{glob.escape(filename)}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
