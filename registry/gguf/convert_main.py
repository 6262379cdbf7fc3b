"""Run llama.cpp's converter (vendored) on a model folder, and llama.cpp's quantizer for K-quants.

Run BY PATH in a subprocess of the registry (registry/gguf/converter.py), never imported: the converter imports
torch, its own `conversion` package and its own `gguf` package, none of which may meet the registry's process.
It imports nothing of `registry` either.

    python convert_main.py SOURCE_DIR OUTFILE --outtype q4_k_m --model-name NAME [--pre-tokenizer NAME]
                           [--report REPORT.json]

What it adds to running convert_hf_to_gguf.py by hand:
- a byte-level BPE vocabulary the converter does not recognise (it knows vocabularies only by the hash of how
  they split a fixed text) is converted with --pre-tokenizer NAME instead of refused; a recognised one is
  converted as the converter says, NAME unused;
- K-quants (q4_k_m, q5_k_m, q6_k) are made from an f16 conversion by llama_cpp.llama_model_quantize, as
  llama.cpp's llama-quantize does; the f16 file is removed;
- a JSON report for the caller (the pre-tokenizer written, whether it was an override, the vocabulary's
  chkhsh, the error) and distinct exit codes; nothing is left at OUTFILE when it fails.
"""
import os
import sys

# Run by path, Python put this file's folder first on sys.path, and registry/gguf/inspect.py would then shadow
# the standard library's inspect (torch imports it): drop that folder before importing anything else.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import errno  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import runpy  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNKNOWN_PRE_TOKENIZER = 3  # a BPE vocabulary the converter does not recognise, and no --pre-tokenizer
EXIT_UNSUPPORTED_ARCHITECTURE = 4
EXIT_DISK_FULL = 5

DEFAULT_VENDOR_DIR = Path(_HERE).parent / "_vendor" / "llama_cpp"
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama_cpp's llama_ftype constant of each K-quant (= llama-quantize's Q4_K_M etc.).
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
            "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
# Below this many free bytes after a failed write, the failure was the disk filling up (a write that hits ENOSPC
# first writes what fits, so the file system is left almost exactly full).
NEARLY_FULL = 1 << 20
DISK_FULL_TEXT = re.compile(r"No space left on device|ENOSPC|\d+ requested and \d+ written")
CHKHSH = re.compile(r"chkhsh:\s+([0-9a-f]{64})")


class UnknownPreTokenizer(Exception):
    """The converter did not recognise the BPE vocabulary and no pre-tokenizer was named."""


class UnsupportedArchitecture(Exception):
    pass


class ConversionError(RuntimeError):
    """A failure this script words itself (the message is the whole story)."""


class _LastError(logging.Handler):
    """Keeps the converter's last ERROR log line (it logs, then exits 1) and the vocabulary's chkhsh."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.error: str | None = None
        self.chkhsh: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR and message.strip():
            self.error = message.strip()
        found = CHKHSH.search(message)
        if found:
            self.chkhsh = found.group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a transformers model folder (config.json, safetensors, tokenizer)")
    parser.add_argument("outfile", type=Path, help="the GGUF file to write (a temporary name: the caller moves it)")
    parser.add_argument("--outtype", required=True, choices=CONVERTER_OUTTYPES + tuple(K_QUANTS))
    parser.add_argument("--model-name", required=True, help="general.name; also keeps the bytes folder-independent")
    parser.add_argument("--pre-tokenizer", help="for a byte-level BPE vocabulary the converter does not recognise")
    parser.add_argument("--report", type=Path, help="write a JSON report here")
    parser.add_argument("--vendor-dir", type=Path, default=DEFAULT_VENDOR_DIR)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)

    # basicConfig first (as the converter's own main would), then our handler: the converter's basicConfig is
    # then a no-op and its log still goes to stderr.
    logging.basicConfig(level=logging.INFO)
    last = _LastError()
    logging.getLogger().addHandler(last)
    report: dict = {"ok": False, "outtype": args.outtype, "pre_tokenizer": None, "override": False,
                    "chkhsh": None, "architecture": None, "error": None, "disk_full": False, "seconds": {}}
    k_quant = args.outtype in K_QUANTS
    f16_file = args.outfile.with_name(args.outfile.name + ".f16.part") if k_quant else args.outfile
    code = EXIT_FAILED
    try:
        _use_vendored(args.vendor_dir)
        report["architecture"] = _check_architecture(args.source)
        _hook_pre_tokenizer(args.pre_tokenizer, report, last)
        started = time.monotonic()
        _run_converter(args.vendor_dir, args.source, f16_file, "f16" if k_quant else args.outtype, args.model_name)
        report["seconds"]["convert"] = round(time.monotonic() - started, 3)
        if k_quant:
            started = time.monotonic()
            _quantize(f16_file, args.outfile, args.outtype, args.threads)
            report["seconds"]["quantize"] = round(time.monotonic() - started, 3)
            f16_file.unlink()
        report["ok"], code = True, EXIT_OK
    except UnknownPreTokenizer:
        report["chkhsh"] = report["chkhsh"] or last.chkhsh
        report["error"] = "BPE pre-tokenizer not recognized by the converter and none named"
        code = EXIT_UNKNOWN_PRE_TOKENIZER
    except UnsupportedArchitecture as exc:
        report["error"] = f"architecture {exc} is not supported by the converter"
        code = EXIT_UNSUPPORTED_ARCHITECTURE
    except BaseException as exc:  # the converter's sys.exit(1) too; KeyboardInterrupt: the caller stopped us
        if not isinstance(exc, SystemExit):
            _say(traceback.format_exc())
        elif exc.code in (None, 0):
            exc = ConversionError("the converter exited before writing the file")
        report["error"] = _describe(exc, last)
        if _disk_full(exc, report["error"], args.outfile.parent):  # before the partial file frees its space
            report["disk_full"], code = True, EXIT_DISK_FULL
    if code != EXIT_OK:  # nothing half-written stays behind
        # The traceback is gone with the except block; collecting its frames closes the converter's open output
        # file, so that removing it really frees its space (on a full disk the report needs some).
        gc.collect()
        for path in {f16_file, args.outfile}:
            path.unlink(missing_ok=True)
    if args.report:
        try:
            args.report.write_text(json.dumps(report, indent=1) + "\n")
        except OSError as exc:  # the caller then judges by the exit code and the free space
            _say(f"convert_main: cannot write {args.report}: {exc}\n")
    if report["error"]:
        _say(f"convert_main: {report['error']}\n")
    return code


def _say(text: str) -> None:
    """To stderr, which may be a log file on the disk that just filled up."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except OSError:
        pass


def _use_vendored(vendor_dir: Path) -> None:
    """The converter's folder (for `conversion`) and its own gguf-py, ahead of anything installed."""
    vendor_dir = vendor_dir.resolve()
    if not (vendor_dir / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(f"no convert_hf_to_gguf.py in {vendor_dir}")
    sys.path[0:0] = [str(vendor_dir), str(vendor_dir / "gguf-py")]


def _check_architecture(source: Path) -> str:
    """The converter's own choice of architecture (text_config's first), refused before it loads anything."""
    from conversion import TEXT_MODEL_MAP, ModelBase, ModelType, get_model_architecture

    arch = get_model_architecture(ModelBase.load_hparams(source, False), ModelType.TEXT)
    if arch not in TEXT_MODEL_MAP:
        raise UnsupportedArchitecture(arch)
    return arch


def _hook_pre_tokenizer(name: str | None, report: dict, last: _LastError) -> None:
    """Wrap the converter's vocabulary-hash lookup: record what it found; where it raises (an unrecognised BPE
    vocabulary) answer `name` instead, or stop with UnknownPreTokenizer when there is none."""
    from conversion.base import TextModel, logger

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        level = logger.level
        logger.setLevel(logging.DEBUG)  # the converter logs chkhsh at DEBUG when it recognises the vocabulary
        try:
            found = original(self, tokenizer)
        except NotImplementedError:
            report["chkhsh"] = last.chkhsh
            if name is None:
                raise UnknownPreTokenizer() from None
            logger.warning(f"registry: using pre-tokenizer {name!r} for this unrecognised BPE vocabulary")
            report.update(pre_tokenizer=name, override=True)
            return name
        finally:
            logger.setLevel(level)
        report.update(pre_tokenizer=found, chkhsh=last.chkhsh, override=False)
        return found

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def _run_converter(vendor_dir: Path, source: Path, outfile: Path, outtype: str, model_name: str) -> None:
    """convert_hf_to_gguf.py as `python convert_hf_to_gguf.py ...` would run it, in this process (the hook
    above must be in its classes)."""
    script = vendor_dir.resolve() / "convert_hf_to_gguf.py"
    saved = sys.argv
    # --outfile always: without it the converter writes into the source folder.
    sys.argv = [str(script), str(source), "--outfile", str(outfile), "--outtype", outtype,
                "--model-name", model_name]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved
    if not outfile.is_file():
        raise ConversionError(f"the converter wrote no {outfile.name}")


def _quantize(f16_file: Path, outfile: Path, outtype: str, threads: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[outtype])
    params.nthread = threads  # the result is the same for any thread count
    rc = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(outfile).encode(), ctypes.byref(params))
    if rc != 0:
        raise ConversionError(f"llama.cpp's quantizer failed making {outtype} (llama_model_quantize returned {rc})")


def _describe(exc: BaseException, last: _LastError) -> str:
    if isinstance(exc, SystemExit):
        return last.error or f"the converter exited with status {exc.code}"
    if isinstance(exc, ConversionError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1]}" if text else type(exc).__name__


def _disk_full(exc: BaseException, message: str, out_dir: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if DISK_FULL_TEXT.search(message):
        return True
    try:
        return shutil.disk_usage(out_dir).free < NEARLY_FULL
    except OSError:
        return False


if __name__ == "__main__":
    exit_code = main()
    try:  # a failed flush at exit (stderr on a full disk) would turn the exit code into 120
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(exit_code)
